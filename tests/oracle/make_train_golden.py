"""Golden gradients and AdamW steps for npsparse.train, from PyTorch autograd.

Not part of the package or the test suite: it imports torch, which npsparse never does. It runs in
the oracle virtual environment (see make_golden.py; this part needs only torch, numpy and
safetensors):

    python3 -m venv /work/oracle
    /work/oracle/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \
        numpy safetensors
    /work/oracle/bin/python tests/oracle/make_train_golden.py [--part all|tiny|smollm2]

(from the repository root). The forward pass below is a small, separate PyTorch port of the
LLaMA-family block (RMSNorm, RoPE, grouped-query causal attention, SwiGLU, q/k/v biases for Qwen2,
tied or untied head) written from the architecture's definition; its gradients come from
autograd, not from anything npsparse computes. Two constants are taken as npsparse uses them so
that float64 results differ only by rounding: the RoPE cos/sin tables are float32 (as in
Hugging Face's rotary embedding) and the attention scale is ``1/sqrt(head_dim)`` rounded to
float32, as is the norm's ``eps``.

Parts:

- tiny:    tests/data/train_golden.npz. On the tiny checkpoints in tests/data/tiny (llama,
           llama_tied, qwen2), float64: loss terms and the gradient of every parameter for a
           student whose projections are masked (random 50% or 2:4), against the unmasked
           model as the teacher, for ce, ce+squarehead, kd (temperature 2) and a weighted mix;
           then three torch.optim.AdamW steps (masked gradients, clip_grad_norm_ 1.0, weight
           decay 0.1, a given learning rate per step) and the resulting weights.
- smollm2: tests/data/train_golden_smollm2.npz. SmolLM2 as npsparse dequantizes the GGUF (dumped
           by the project's .venv, whose GGUF reading is checked against transformers by
           make_golden.py), student = 2:4 magnitude mask of every projection, teacher = dense,
           loss ce+squarehead on the first 128 tokens of the pydoc stream, in float64: the loss
           terms, every gradient's norm and 256 sampled entries per tensor (the flat indices
           are stored), so a float32 run's per-tensor relative error can be estimated.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent.parent
DATA = ROOT / "tests" / "data"
torch.set_num_threads(2)


# ----------------------------------------------------------------------------- the model port

class Config:
    """The few config.json fields a LLaMA-family forward pass needs."""

    def __init__(self, raw: dict):
        self.dim = raw["hidden_size"]
        self.n_layers = raw["num_hidden_layers"]
        self.n_heads = raw["num_attention_heads"]
        self.n_kv = raw.get("num_key_value_heads", self.n_heads)
        self.head_dim = raw.get("head_dim") or self.dim // self.n_heads
        self.eps = float(np.float32(raw["rms_norm_eps"]))
        rope = raw.get("rope_parameters") or {"rope_theta": raw.get("rope_theta", 10000.0)}
        self.theta = rope["rope_theta"]
        self.tied = raw.get("tie_word_embeddings", False)
        self.vocab = raw["vocab_size"]


def rope_tables(cfg: Config, n_tok: int):
    """float32 cos/sin [T, hd] (Hugging Face's default RoPE in float32 arithmetic)."""
    exponent = np.arange(0, cfg.head_dim, 2).astype(np.float32) / np.float32(cfg.head_dim)
    inv_freq = (1.0 / (np.float32(cfg.theta) ** exponent)).astype(np.float32)
    angles = np.arange(n_tok).astype(np.float32)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles), np.sin(angles)


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def block(p, prefix, x, cfg, cos, sin):
    """One decoder block on x [T, D]."""
    n_tok = x.shape[0]
    h = rms_norm(x, p[prefix + "input_layernorm.weight"], cfg.eps)

    def proj(name, heads):
        y = h @ p[f"{prefix}self_attn.{name}_proj.weight"].T
        bias = p.get(f"{prefix}self_attn.{name}_proj.bias")
        if bias is not None:
            y = y + bias
        return y.reshape(n_tok, heads, cfg.head_dim).transpose(0, 1)  # [heads, T, hd]

    q = rotate(proj("q", cfg.n_heads), cos, sin)
    k = rotate(proj("k", cfg.n_kv), cos, sin)
    v = proj("v", cfg.n_kv)
    group = cfg.n_heads // cfg.n_kv
    k = k.repeat_interleave(group, dim=0)  # query head i reads kv head i // group
    v = v.repeat_interleave(group, dim=0)
    scale = float(np.float32(1.0 / math.sqrt(cfg.head_dim)))
    scores = (q @ k.transpose(1, 2)) * scale  # [H, T, T]
    future = torch.triu(torch.ones(n_tok, n_tok, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    att = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(n_tok, -1)  # [T, H*hd]
    x = x + att @ p[prefix + "self_attn.o_proj.weight"].T
    h = rms_norm(x, p[prefix + "post_attention_layernorm.weight"], cfg.eps)
    gate = h @ p[prefix + "mlp.gate_proj.weight"].T
    up = h @ p[prefix + "mlp.up_proj.weight"].T
    return x + (torch.nn.functional.silu(gate) * up) @ p[prefix + "mlp.down_proj.weight"].T


def forward(p, cfg, ids):
    """Block outputs (list of [T, D]) and the logits [T, V]."""
    cos, sin = (torch.from_numpy(t).to(p["model.norm.weight"].dtype)
                for t in rope_tables(cfg, len(ids)))
    x = p["model.embed_tokens.weight"][torch.from_numpy(ids)]
    outputs = []
    for i in range(cfg.n_layers):
        x = block(p, f"model.layers.{i}.", x, cfg, cos, sin)
        outputs.append(x)
    h = rms_norm(x, p["model.norm.weight"], cfg.eps)
    head = p["model.embed_tokens.weight"] if cfg.tied else p["lm_head.weight"]
    return outputs, h @ head.T


def loss_terms(student, teacher, ids, weights, temperature):
    """{"ce", "kd", "squarehead", "loss"} as tensors; teacher = (outputs, logits) or None."""
    outputs, logits = student
    targets = torch.from_numpy(ids[1:])
    n = len(targets)
    terms = {}
    if weights.get("ce"):
        terms["ce"] = torch.nn.functional.cross_entropy(logits[:n], targets)
    if weights.get("kd"):
        t_logp = torch.log_softmax(teacher[1][:n] / temperature, dim=-1)
        s_logp = torch.log_softmax(logits[:n] / temperature, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum() / n
        terms["kd"] = temperature**2 * kl
    if weights.get("squarehead"):
        terms["squarehead"] = sum(((s - t) ** 2).sum() / (t**2).sum()
                                  for s, t in zip(outputs, teacher[0]))
    terms["loss"] = sum(weights[name] * terms[name] for name in weights if weights[name])
    return terms


# ----------------------------------------------------------------------------- helpers

def load_tiny(name: str):
    from safetensors.numpy import load_file
    folder = DATA / "tiny" / name
    raw = json.loads((folder / "config.json").read_text())
    return Config(raw), load_file(str(folder / "model.safetensors"))


def projections(arrays: dict) -> list[str]:
    return sorted(n for n in arrays if n.endswith("_proj.weight"))


def random_masks(arrays: dict, rng) -> dict:
    return {n: rng.random(arrays[n].shape) < 0.5 for n in projections(arrays)}


def masks_2of4(arrays: dict) -> dict:
    """Keep the 2 largest |w| of every 4 consecutive weights of a row (stable order on ties)."""
    out = {}
    for name in projections(arrays):
        w = np.abs(arrays[name].astype(np.float32)).reshape(-1, 4)
        order = np.argsort(-w, axis=1, kind="stable")[:, :2]
        mask = np.zeros(w.shape, dtype=bool)
        np.put_along_axis(mask, order, True, axis=1)
        out[name] = mask.reshape(arrays[name].shape)
    return out


def torch_params(arrays: dict, dtype, masks: dict | None = None) -> dict:
    out = {}
    for name, value in arrays.items():
        value = value.astype(np.float64)
        if masks and name in masks:
            value = value * masks[name]
        out[name] = torch.tensor(value, dtype=dtype, requires_grad=True)
    return out


def parse_loss(text: str) -> dict:
    """"0.5*ce+2*kd+squarehead" -> {"ce": 0.5, "kd": 2.0, "squarehead": 1.0}."""
    weights = {}
    for part in text.split("+"):
        factor, _, name = part.rpartition("*")
        weights[name] = float(factor) if factor else 1.0
    return weights


def versions() -> str:
    return json.dumps({"python": sys.version.split()[0], "torch": torch.__version__,
                       "numpy": np.__version__})


# ----------------------------------------------------------------------------- parts

TINY_CASES = [  # (case name, checkpoint, loss, mask kind, seed)
    ("llama_ce", "llama", "ce", "random", 0),
    ("llama_ce_sq", "llama", "ce+squarehead", "random", 1),
    ("llama_kd", "llama", "kd", "random", 2),
    ("llama_mix", "llama", "0.5*ce+2*kd+squarehead", "random", 3),
    ("llama_tied_ce_sq", "llama_tied", "ce+squarehead", "random", 4),
    ("qwen2_ce_sq", "qwen2", "ce+squarehead", "random", 5),
    ("qwen2_kd", "qwen2", "kd", "2:4", 6),
    ("llama_ce_sq_2of4", "llama", "ce+squarehead", "2:4", 7),
]
TEMPERATURE = 2.0
N_TOK = 12
ADAMW = dict(case="llama_ce_sq_2of4", lrs=[1e-2, 2e-2, 5e-3], betas=(0.9, 0.999), eps=1e-8,
             weight_decay=0.1, clip=1.0, seeds=[10, 11, 12])


def part_tiny() -> None:
    out = {"versions": np.array(versions()), "temperature": np.array(TEMPERATURE)}
    cases = []
    for case, ckpt, loss, kind, seed in TINY_CASES:
        cfg, arrays = load_tiny(ckpt)
        rng = np.random.default_rng(seed)
        masks = random_masks(arrays, rng) if kind == "random" else masks_2of4(arrays)
        ids = rng.integers(0, cfg.vocab, N_TOK)
        teacher_p = torch_params(arrays, torch.float64)
        student_p = torch_params(arrays, torch.float64, masks)
        with torch.no_grad():
            teacher = forward(teacher_p, cfg, ids)
        terms = loss_terms(forward(student_p, cfg, ids), teacher, ids, parse_loss(loss),
                           TEMPERATURE)
        terms["loss"].backward()
        cases.append(dict(case=case, checkpoint=ckpt, loss=loss, masks=kind))
        out[f"{case}/ids"] = ids
        for name, value in terms.items():
            out[f"{case}/term/{name}"] = np.array(value.item())
        for name, mask in masks.items():
            out[f"{case}/mask/{name}"] = mask
        for name, p in student_p.items():
            out[f"{case}/grad/{name}"] = p.grad.numpy()
        print(f"{case}: loss {terms['loss'].item():.6f}")

    # AdamW: masked gradients, clipped, three steps with given learning rates
    case = ADAMW["case"]
    ckpt, loss = next((c[1], c[2]) for c in TINY_CASES if c[0] == case)
    cfg, arrays = load_tiny(ckpt)
    masks = masks_2of4(arrays)
    teacher_p = torch_params(arrays, torch.float64)
    student_p = torch_params(arrays, torch.float64, masks)
    names = list(student_p)
    opt = torch.optim.AdamW([student_p[n] for n in names], lr=ADAMW["lrs"][0],
                            betas=ADAMW["betas"], eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"])
    for step, (lr, seed) in enumerate(zip(ADAMW["lrs"], ADAMW["seeds"])):
        ids = np.random.default_rng(seed).integers(0, cfg.vocab, N_TOK)
        with torch.no_grad():
            teacher = forward(teacher_p, cfg, ids)
        opt.zero_grad()
        loss_terms(forward(student_p, cfg, ids), teacher, ids, parse_loss(loss),
                   TEMPERATURE)["loss"].backward()
        with torch.no_grad():
            for name, mask in masks.items():
                student_p[name].grad *= torch.from_numpy(mask)
        norm = torch.nn.utils.clip_grad_norm_([student_p[n] for n in names], ADAMW["clip"])
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        out[f"adamw/ids/{step}"] = ids
        out[f"adamw/norm/{step}"] = np.array(norm.item())
    for name in names:
        out[f"adamw/weight/{name}"] = student_p[name].detach().numpy()
    meta = {**ADAMW, "loss": loss, "checkpoint": ckpt, "masks": "2:4", "cases": cases,
            "n_tok": N_TOK}
    out["meta"] = np.array(json.dumps(meta))
    path = DATA / "train_golden.npz"
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


SMOLLM2_TOKENS = 128
SAMPLES = 256

DUMP = """
import json, sys
import numpy as np
from npsparse.train import parameters
from npsparse.train.finetune import load_trainable
model = load_trainable("smollm2")[0]
arrays = {n: np.ascontiguousarray(p) for n, p in parameters(model).items()}
np.savez(sys.argv[1], **arrays)
"""


def part_smollm2() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "smollm2.npz"
        subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", DUMP, str(dump)],
                       check=True, cwd=ROOT)
        with np.load(dump) as handle:
            arrays = {n: handle[n] for n in handle.files}
    raw = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
           "rope_parameters": {"rope_theta": 100000.0}, "tie_word_embeddings": True,
           "vocab_size": 49152}
    cfg = Config(raw)
    assert arrays["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    ids = np.load(DATA / "smollm2_tokens_llamacpp.npy")[:SMOLLM2_TOKENS].astype(np.int64)
    masks = masks_2of4(arrays)
    teacher_p = torch_params(arrays, torch.float64)
    student_p = torch_params(arrays, torch.float64, masks)
    with torch.no_grad():
        teacher = forward(teacher_p, cfg, ids)
    terms = loss_terms(forward(student_p, cfg, ids), teacher, ids,
                       {"ce": 1.0, "squarehead": 1.0}, 1.0)
    terms["loss"].backward()
    rng = np.random.default_rng(0)
    out = {"versions": np.array(versions()), "ids": ids,
           "config": np.array(json.dumps(raw)), "loss": np.array("ce+squarehead")}
    for name, value in terms.items():
        out[f"term/{name}"] = np.array(value.item())
    for name, p in student_p.items():
        grad = p.grad.numpy().ravel()
        index = np.sort(rng.choice(grad.size, min(SAMPLES, grad.size), replace=False))
        out[f"index/{name}"] = index.astype(np.int64)
        out[f"sample/{name}"] = grad[index]
        out[f"norm/{name}"] = np.array(np.linalg.norm(grad))
    path = DATA / "train_golden_smollm2.npz"
    np.savez_compressed(path, **out)
    print(f"{path}: loss {terms['loss'].item():.6f} ({path.stat().st_size} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "tiny", "smollm2"], default="all")
    args = parser.parse_args()
    if args.part in ("all", "tiny"):
        part_tiny()
    if args.part in ("all", "smollm2"):
        part_smollm2()


if __name__ == "__main__":
    main()
