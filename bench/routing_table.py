"""Routed sparsity on SmolLM2 (issue 16): PESC against single adapters, routed FFN against a dense
FFN and an activation-norm oracle, routing by text, and decode speed.

    python bench/routing_table.py --out-root DIR [--tokens N] [--only NAME ...] [--plot F.png]
    python bench/routing_table.py --out-root DIR --table     # print from DIR's arms, train nothing

Every arm is ``npsparse finetune smollm2 --loss ce --data pydoc+stdlib`` on the same token budget
(both texts' calibration parts, an equal share of windows each) with perplexity on the first 40 x
512 eval windows of each text before and after, run in its own process; an arm whose folder
already holds ``finetune.json`` is not run again.

- PESC: E = 4 experts, top-2, adapter dim 16, Switch balance loss alpha = 0.01.
- One adapter with the same *active* parameters (2 x 16 = dim 32) and one with the same *total*
  parameters (4 x 16 = dim 64): ``--method pesc --experts 1 --top-k 1`` (the one expert's gate is
  1 for every token, so it is a plain parallel adapter on the FFN output, same scale, no balance).
- Routed FFN: B = 8 blocks of 192 units, A = 2 active (25%), routers and FFN weights training;
  its control is the same run with A = 8 (every block active: a dense FFN, same trainable set);
  and A = 2 again with the routers first fitted to the activation-norm oracle's choice
  (``--router-init oracle``, as MoEfication does) instead of random; and A = 2 with random
  routers again with the Switch balance loss on the blocks, against router collapse, at
  Switch's alpha (``--balance 0.01``) and at 1.

Then, forward only: each PESC arm's expert load per block on 8 eval windows of each text, with
the total-variation distance between the texts' loads per block beside the distance between two
halves (4 + 4 windows) of the same text, the noise floor (the figure: ``--plot``); the oracle
(top-2 of 8 blocks by activation norm, ``with_oracle_routing``) on the base model and on the
trained routed model's own FFN weights; and decode tokens/s of the base model, the routed 25%
model and its A = 8 control, 64 tokens after a short prompt, best of 3 interleaved runs, all
float32 NumPy (no packed kernels: ``pack`` refuses a routed model). Results go to
``OUT/routing.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ARMS = [  # (name, finetune options, peak learning rate)
    ("pesc-e4k2-r16", ["--method", "pesc", "--experts", "4", "--top-k", "2", "--adapter-dim",
                       "16", "--balance", "0.01"], 2e-4),
    ("adapter-r32", ["--method", "pesc", "--experts", "1", "--top-k", "1", "--adapter-dim", "32",
                     "--balance", "0"], 2e-4),
    ("adapter-r64", ["--method", "pesc", "--experts", "1", "--top-k", "1", "--adapter-dim", "64",
                     "--balance", "0"], 2e-4),
    ("routed-ffn-b8a2", ["--method", "routed-ffn", "--blocks", "8", "--active", "2"], 2e-4),
    ("routed-ffn-b8a8", ["--method", "routed-ffn", "--blocks", "8", "--active", "8"], 2e-4),
    ("routed-ffn-b8a2-oracle-init", ["--method", "routed-ffn", "--blocks", "8", "--active", "2",
                                     "--router-init", "oracle"], 2e-4),
    ("routed-ffn-b8a2-balance", ["--method", "routed-ffn", "--blocks", "8", "--active", "2",
                                 "--balance", "0.01"], 2e-4),
    ("routed-ffn-b8a2-balance1", ["--method", "routed-ffn", "--blocks", "8", "--active", "2",
                                  "--balance", "1"], 2e-4),
]
TEXTS = ("pydoc", "stdlib")
ROUTING_WINDOWS = 8  # eval windows per text for the routing figure
PROMPT = "What is a Python list?"


def run_arms(args) -> None:
    for name, options, lr in ARMS:
        out = args.out_root / name
        if (out / "finetune.json").exists() or (args.only and name not in args.only):
            continue
        command = [sys.executable, "-m", "npsparse.cli", "finetune", "smollm2", "--loss", "ce",
                   "--tokens", str(args.tokens), "--lr", repr(lr), "--data", "pydoc+stdlib",
                   "--eval-windows", "40", *options, "--out", str(out), "--json"]
        print(f"== {name}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def arm_row(name: str, options: list[str], report: dict) -> dict:
    """One arm's table row from its ``finetune.json``."""
    row = {"name": name, "options": options, "tokens": report["tokens"],
           "lr": report["settings"]["lr"], "trainable": report["trainable_parameters"],
           "ppl": {text: {"before": v["before"]["ppl"], "after": v["after"]["ppl"]}
                   for text, v in report["ppl_by_domain"].items()},
           "seconds": report["seconds"], "cpu": report["cpu"]}
    if "pesc" in report:
        pesc = report["pesc"]
        loads = np.array([block["load"] for block in pesc["routing"]["blocks"]]) \
            if "routing" in pesc else None
        e, k, r = (int(options[options.index(flag) + 1])
                   for flag in ("--experts", "--top-k", "--adapter-dim"))
        dim = 576
        row["active_adapter_parameters_per_block"] = k * 2 * dim * r
        row["total_adapter_parameters_per_block"] = e * 2 * dim * r
        if loads is not None and e > 1:
            row["min_expert_load"] = float(loads.min())
    if "routed_ffn" in report:
        loads = np.array(report["routed_ffn"]["routing"]["load"])  # [layers, B]
        row["min_block_load"] = float(loads.min())
        row["max_block_load"] = float(loads.max())
        row["blocks_under_1pct"] = int((loads < 0.01).sum())  # of layers x B (router collapse)
    return row


def domain_loads(folder: Path) -> dict:
    """A PESC folder's expert load per block on each text's first eval windows."""
    import npsparse
    from npsparse.train.pesc import routing_summary

    llm = npsparse.load(folder)
    out = {}
    for text in TEXTS:
        windows = llm.eval_windows(text, windows=ROUTING_WINDOWS)
        halves = [routing_summary(llm.model, part) for part in
                  (windows[:ROUTING_WINDOWS // 2], windows[ROUTING_WINDOWS // 2:])]
        loads = [np.array([b["load"] for b in h["blocks"]]) for h in halves]  # 2 x [L, E]
        out[text] = {"load": ((loads[0] + loads[1]) / 2).tolist(),
                     "halves_tv": (0.5 * np.abs(loads[0] - loads[1]).sum(axis=1)).tolist()}
    a, b = (np.array(out[t]["load"]) for t in TEXTS)
    out["texts_tv"] = (0.5 * np.abs(a - b).sum(axis=1)).tolist()  # [L]
    return out


def oracle_ppl(out_root: Path) -> dict:
    """Perplexity of top-A-by-activation-norm routing on the base model and on the trained routed
    model's FFN weights (its routers dropped), on each text's 40 eval windows."""
    import npsparse
    from npsparse.config import RoutedFfnConfig
    from npsparse.evaluate import perplexity
    from npsparse.models import build_model
    from npsparse.train.routed_ffn import with_oracle_routing

    base = npsparse.load("smollm2")
    routed = RoutedFfnConfig(blocks=8, active=2)
    models = {"base": base.model}
    folder = out_root / "routed-ffn-b8a2"
    if (folder / "finetune.json").exists():
        trained = npsparse.load(folder).model
        models["trained-b8a2-weights"] = build_model(trained.config.replace(routed_ffn=None),
                                                     trained.weights)
    out = {}
    for name, model in models.items():
        oracle = with_oracle_routing(model, routed)
        out[name] = {text: perplexity(oracle, base.eval_windows(text), progress=False).ppl
                     for text in TEXTS}
        print(f"oracle top-2 of 8 on {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def decode_speed(out_root: Path, repeats: int = 3, tokens: int = 64) -> dict:
    """Best-of-``repeats`` decode tokens/s, interleaved: base, routed 25%, routed A = 8."""
    import npsparse

    models = {"base": npsparse.load("smollm2")}
    for name in ("routed-ffn-b8a2", "routed-ffn-b8a2-oracle-init", "routed-ffn-b8a8"):
        if (out_root / name / "finetune.json").exists():
            models[name] = npsparse.load(out_root / name)
    best = {name: 0.0 for name in models}
    for _ in range(repeats):
        for name, llm in models.items():
            result = llm.generate(PROMPT, tokens, chat=True)
            best[name] = max(best[name], result.decode_tok_s)
    return {"tokens": tokens, "repeats": repeats, "tok_s": best,
            "x_base": {name: best[name] / best["base"] for name in best}}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routing = result["routing"]["pesc-e4k2-r16"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1, 1.4]})
    top = max(np.max(routing[text]["load"]) for text in TEXTS)  # one color scale for both
    for ax, text in zip(axes, TEXTS):
        load = np.array(routing[text]["load"])
        im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0, vmax=top)
        ax.set_title(f"expert load, {text}")
        ax.set_xlabel("expert")
        ax.set_ylabel("block")
        ax.set_xticks(range(load.shape[1]))
    fig.colorbar(im, ax=axes[:2], shrink=0.8)
    ax = axes[2]
    blocks = np.arange(len(routing["texts_tv"]))
    ax.plot(blocks, routing["texts_tv"], "o-", label="pydoc vs stdlib")
    for text in TEXTS:
        ax.plot(blocks, routing[text]["halves_tv"], ".--", label=f"two halves of {text}")
    ax.set_xlabel("block")
    ax.set_ylabel("total-variation distance of expert loads")
    ax.set_title("routing differs by text")
    ax.legend()
    fig.suptitle("PESC E=4, top-2 on SmolLM2 after fine-tuning on pydoc+stdlib "
                 f"({ROUTING_WINDOWS // 2} + {ROUTING_WINDOWS // 2} eval windows per text)")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def table(result: dict) -> str:
    lines = ["| arm | trainable | pydoc before -> after | stdlib before -> after | load |",
             "|---|---|---|---|---|"]
    for row in result["arms"]:
        ppl = row["ppl"]
        load = (f"min expert {row['min_expert_load']:.3f}" if "min_expert_load" in row else
                f"blocks {row['min_block_load']:.3f}-{row['max_block_load']:.3f}, "
                f"{row['blocks_under_1pct']} under 1%"
                if "min_block_load" in row else "")
        lines.append(f"| {row['name']} | {row['trainable']:,} | "
                     + " | ".join(f"{ppl[t]['before']:.2f} -> {ppl[t]['after']:.2f}"
                                  for t in TEXTS) + f" | {load} |")
    for name, ppl in result.get("oracle", {}).items():
        lines.append(f"| oracle top-2 of 8 on {name} | 0 | "
                     + " | ".join(f"{ppl[t]:.2f}" for t in TEXTS) + " | |")
    for name, routing in result.get("routing", {}).items():
        lines.append(f"\n{name}: TV distance of expert loads, pydoc vs stdlib, mean over blocks "
                     f"{np.mean(routing['texts_tv']):.3f} (max {np.max(routing['texts_tv']):.3f});"
                     f" two halves of one text: " + ", ".join(
                         f"{t} {np.mean(routing[t]['halves_tv']):.3f}" for t in TEXTS))
    if "decode" in result:
        d = result["decode"]
        lines.append(f"\ndecode, {d['tokens']} tokens, best of {d['repeats']} interleaved: "
                     + ", ".join(f"{n} {v:.1f} tok/s ({d['x_base'][n]:.2f}x base)"
                                 for n, v in d["tok_s"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-root", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=65536, help="training tokens per arm")
    parser.add_argument("--only", nargs="*", help="run only these arms")
    parser.add_argument("--table", action="store_true", help="train nothing")
    parser.add_argument("--skip", nargs="*", default=[], choices=["oracle", "decode", "routing"],
                        help="leave out these forward-only parts")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    args.out_root.mkdir(parents=True, exist_ok=True)
    if not args.table:
        run_arms(args)
    result = {"arms": [], "routing": {}}
    for name, options, _ in ARMS:
        report_path = args.out_root / name / "finetune.json"
        if report_path.exists():
            result["arms"].append(arm_row(name, options, json.loads(report_path.read_text())))
            if name.startswith("pesc") and "routing" not in args.skip:
                result["routing"][name] = domain_loads(args.out_root / name)
    if "oracle" not in args.skip:
        result["oracle"] = oracle_ppl(args.out_root)
    if "decode" not in args.skip:
        started = time.perf_counter()
        result["decode"] = decode_speed(args.out_root)
        result["decode"]["seconds"] = time.perf_counter() - started
    (args.out_root / "routing.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.plot and "pesc-e4k2-r16" in result["routing"]:
        plot(result, args.plot)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
