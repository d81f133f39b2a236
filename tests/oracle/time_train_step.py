"""Time one SmolLM2 training step in npsparse and in PyTorch eager, interleaved, same machine.

Runs in the oracle environment (see make_train_golden.py; needs torch, numpy, safetensors):

    /work/oracle/bin/python tests/oracle/time_train_step.py [--rounds 3] [--tokens 512]

The step is the one ``npsparse finetune`` takes per window: the dense teacher's forward (block
outputs, no gradient), the student's forward and backward with loss ce+squarehead, embeddings
frozen, float32, one window of ``--tokens`` tokens. PyTorch runs the port in
make_train_golden.py (eager, autograd, ``torch.set_num_threads`` = this machine's cores) on the
same weights; npsparse runs in the project's ``.venv`` as a child process that times its own
steps. Rounds alternate (PyTorch, npsparse, PyTorch, ...) so both see the same machine load; the
best step of each side is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from make_train_golden import ROOT, DATA, Config, forward, loss_terms

NPSPARSE_STEP = r"""
import json, sys, time
import numpy as np
from npsparse.train import LossWeights, hidden_states, loss_and_grads, parameters
from npsparse.train.engine import head_of
from npsparse.train.finetune import load_trainable
ids = np.load(sys.argv[1]); steps = int(sys.argv[2])
student, teacher = load_trainable("smollm2")[0], load_trainable("smollm2")[0]
names = {n for n in parameters(student) if n != "model.embed_tokens.weight"}
losses = LossWeights.parse("ce+squarehead")
times = []
for _ in range(steps + 1):
    start = time.perf_counter()
    t_out, t_h = hidden_states(teacher, ids)
    loss_and_grads(student, ids, losses, teacher=(t_out, t_h, head_of(teacher)), trainable=names)
    times.append(time.perf_counter() - start)
print(json.dumps(times[1:]))
"""

DUMP = r"""
import sys
import numpy as np
from npsparse.train import parameters
from npsparse.train.finetune import load_trainable
np.savez(sys.argv[1], **parameters(load_trainable("smollm2")[0]))
"""


def torch_steps(params, cfg, ids, steps: int) -> list[float]:
    student = {n: torch.tensor(a, requires_grad=n != "model.embed_tokens.weight")
               for n, a in params.items()}
    teacher = {n: torch.tensor(a) for n, a in params.items()}
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.no_grad():
            t = forward(teacher, cfg, ids)
        for p in student.values():
            p.grad = None
        terms = loss_terms(forward(student, cfg, ids), t, ids, {"ce": 1.0, "squarehead": 1.0},
                           1.0)
        terms["loss"].backward()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round and side")
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    python = str(ROOT / ".venv" / "bin" / "python")
    with tempfile.TemporaryDirectory() as tmp:
        dump, ids_path = Path(tmp) / "w.npz", Path(tmp) / "ids.npy"
        subprocess.run([python, "-c", DUMP, str(dump)], check=True, cwd=ROOT)
        with np.load(dump) as handle:
            params = {n: handle[n] for n in handle.files}
        ids = np.load(DATA / "smollm2_tokens_llamacpp.npy")[:args.tokens].astype(np.int64)
        np.save(ids_path, ids)
        cfg = Config({"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                      "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
                      "rope_parameters": {"rope_theta": 100000.0}, "tie_word_embeddings": True,
                      "vocab_size": 49152})
        best = {"torch": [], "npsparse": []}
        for round_ in range(args.rounds):
            best["torch"] += torch_steps(params, cfg, ids, args.steps)
            out = subprocess.run([python, "-c", NPSPARSE_STEP, str(ids_path), str(args.steps)],
                                 check=True, cwd=ROOT, capture_output=True, text=True)
            best["npsparse"] += json.loads(out.stdout)
            print(f"round {round_ + 1}: torch {min(best['torch']):.3f} s, "
                  f"npsparse {min(best['npsparse']):.3f} s", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    t, n = min(best["torch"]), min(best["npsparse"])
    print(f"CPU {cpu}, {os.cpu_count()} threads, torch {torch.__version__}; {args.tokens}-token "
          f"step (teacher forward + student forward/backward, ce+squarehead, float32): "
          f"PyTorch eager {t:.3f} s ({args.tokens / t:.0f} tok/s), npsparse {n:.3f} s "
          f"({args.tokens / n:.0f} tok/s): npsparse / PyTorch = {n / t:.2f}x")


if __name__ == "__main__":
    main()
