"""The ``npsparse`` command line: one thin function per subcommand (parse, call the library, print).

User errors print one line ``npsparse: error: ...`` and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, replace

from .errors import NpsparseError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None and False: an option whose help states its
    default in words, a required option, or a flag that is off."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _add_model(parser):
    parser.add_argument("model", metavar="MODEL",
                        help="'smollm2' (the embedded default), a .gguf file or a Hugging Face "
                             "folder")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _print_json(payload: dict) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True))


def _set_attention(llm, args) -> dict | str:
    """Apply ``--attention``/``--pq`` (already parsed into ``args.keep``, ``args.pq``) to ``llm``;
    return what was used ("exact", or the top-L settings and calibration)."""
    from .sparse_attention import calibrate_topk_attention

    if args.keep is None:
        return "exact"
    info = calibrate_topk_attention(llm, args.keep, *args.pq)
    return {"kind": "topk", **info}


def _attention_line(used: dict) -> str:
    cal = used["calibration"]
    return (f"attention: top-{used['keep']} keys per query by PQ (M={used['pq_subspaces']}, "
            f"C={used['pq_centroids']}) fitted on {cal['windows']} {cal['data']} calibration "
            f"windows of {cal['seqlen']} tokens (seed {cal['seed']}) in "
            f"{used['fit_seconds']:.1f} s")


def _parse_attention_options(args) -> None:
    """``--attention``/``--pq`` -> ``args.keep`` (None: exact) and ``args.pq``, before loading."""
    from .sparse_attention import PQ_CENTROIDS, PQ_SUBSPACES, parse_attention, parse_pq

    args.keep = parse_attention(args.attention)
    if args.keep is None and args.pq is not None:
        raise NpsparseError("--pq applies only with --attention topk:L")
    args.pq = parse_pq(args.pq) if args.pq is not None else (PQ_SUBSPACES, PQ_CENTROIDS)


def cmd_eval(args) -> None:
    """``npsparse eval``: perplexity of a model on non-overlapping token windows, per text."""
    from .api import load
    from .data import eval_domains

    texts = eval_domains(args.data)  # before the model loads
    _parse_attention_options(args)
    llm = load(args.model)
    attention = _set_attention(llm, args)
    if not args.json and attention != "exact":  # exact: the output it always had
        print(_attention_line(attention))
    results = {text: llm.perplexity(text, args.seqlen, args.windows, progress=not args.json)
               for text in texts}
    if len(texts) == 1:  # one text: the output of one text, as it always was
        text, result = texts[0], results[texts[0]]
        if args.json:
            _print_json({"model": str(llm.path), "data": str(text), "attention": attention,
                         **result.to_dict()})
        else:
            print(f"{llm.path.name}: {result}")
        return
    if args.json:
        per_text = [{"data": str(text), **result.to_dict()} for text, result in results.items()]
        _print_json({"model": str(llm.path), "attention": attention, "domains": per_text})
        return
    for text, result in results.items():
        print(f"{llm.path.name} on {text}: {result}")


HEAD_HELP = ("output head: auto = the checkpoint's own Q8_0 blocks where it stores Q8_0 "
             "(lossless), else bf16; q8_0 = int8 per 32 (lossy for other checkpoints); "
             "dense = float32")
ACTIVATIONS_HELP = ("int8 = the lossy fast mode: every block layer packed as qpanel (int8 weights, "
                    "a scale per row) and activations quantized per 32 values in each product")


def cmd_generate(args) -> None:
    """``npsparse generate``: continue a prompt, optionally with the layers repacked."""
    from .api import load
    from .generate import check_sampling
    from .tokenizer import check_text

    # Before loading, and before the prompt is echoed.
    check_text(args.prompt, "the prompt")
    check_sampling(args.temp, args.top_k, args.top_p)
    _parse_attention_options(args)
    llm = load(args.model)
    attention = _set_attention(llm, args)
    if not args.json and attention != "exact":
        print(_attention_line(attention), file=sys.stderr)
    from .packing import apply_format, layer_formats

    if args.threads is not None:  # fixed, whatever the format (a packed folder runs --format dense)
        from .kernels import set_threads

        set_threads(args.threads)
    if args.format != "dense":
        apply_format(llm.model, args.format, head=args.head, checkpoint=llm.checkpoint,
                     activations=args.activations)
    elif args.activations != "fp32":
        apply_format(llm.model, "qpanel", head=args.head, checkpoint=llm.checkpoint)
    fmt = layer_formats(llm.model)  # what runs: a packed folder stays packed with --format dense
    stream = None if args.json else (lambda text: print(text, end="", flush=True))
    if stream and not args.chat:
        print(args.prompt, end="", flush=True)
    result = llm.generate(args.prompt, args.n, temperature=args.temp, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, chat=args.chat, on_text=stream,
                          adapt_threads=args.threads is None)
    if args.json:
        _print_json({"model": str(llm.path), "prompt": args.prompt, "format": fmt,
                     "attention": attention, **result.to_dict()})
        return
    print()
    print(f"[{len(result.ids)} tokens; prefill {result.prompt_tokens} tokens at "
          f"{result.prefill_tok_s:.1f} tok/s; decode {result.decode_tok_s:.1f} tok/s; "
          f"format {fmt}]", file=sys.stderr)


def cmd_demo(args) -> None:
    """The main job: prune the default model, evaluate dense and pruned, generate sparsely."""
    from .api import load
    from .sequential import PruneSettings, prune_model
    from .packing import apply_format

    dense = load(args.model)
    print(f"model: {dense!r}")
    before = dense.perplexity(windows=args.windows, progress=True)
    print(f"dense: {before}")
    settings = PruneSettings(method=args.method, pattern=args.sparsity, nsamples=args.nsamples)
    report = prune_model(args.model, args.out, settings, progress=True)
    print(f"pruned with {args.method} at {args.sparsity} in {report['seconds']:.0f} s "
          f"(peak RSS {report['peak_rss_mib']:.0f} MiB) -> {args.out}")
    pruned = load(args.out)
    after = pruned.perplexity(windows=args.windows, progress=True)
    print(f"pruned: {after}")
    info = apply_format(pruned.model, args.format)
    print(f"packed block linears as {info['formats']} in {info['seconds']:.1f} s: "
          f"{info['weight_bytes'] / 1e6:.0f} MB read per token (dense float32: "
          f"{dense.model.weight_bytes() / 1e6:.0f} MB)")
    runs = (("dense float32", dense), (f"pruned, {args.format} kernels", pruned))
    start = time.perf_counter()
    for _, llm in runs:  # first calls compile the kernels (or load them from Numba's disk cache)
        llm.generate(args.prompt, 2, chat=True)
    print(f"kernels ready in {time.perf_counter() - start:.1f} s (first calls: compile or load "
          "from cache), not counted in the speeds below")
    for name, llm in runs:
        print(f"\n[{name}] {args.prompt}")
        gen = llm.generate(args.prompt, args.n, chat=True,
                           on_text=lambda text: print(text, end="", flush=True))
        print(f"\n[{len(gen.ids)} tokens; prefill {gen.prefill_tok_s:.1f} tok/s; "
              f"decode {gen.decode_tok_s:.1f} tok/s]")


def cmd_prune(args) -> None:
    """``npsparse prune``: prune a model block by block and write a Hugging Face folder."""
    from .prune import DSnoTOptions
    from .sequential import PruneSettings, prune_model

    if (args.sparsity is None) == (args.pattern is None):
        raise NpsparseError("give exactly one of --sparsity S or --pattern N:M")
    dsnot = asdict(replace(DSnoTOptions(), max_cycles=args.dsnot_cycles,
                           threshold=args.dsnot_threshold, same_sign=args.dsnot_same_sign,
                           guard=args.dsnot_guard))
    settings = PruneSettings(
        method=args.method, pattern=args.pattern or args.sparsity, base=args.base,
        calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        owl=args.owl, dsnot=dsnot, error_report=args.error_report, layers=args.layers)
    report = prune_model(args.model, args.out, settings, progress=not args.json)
    summary = {k: report[k] for k in ("pattern", "mean_layer_sparsity", "seconds",
                                      "peak_rss_mib", "weights_sha256", "calibration")}
    if args.json:
        _print_json({"out": str(args.out), "method": args.method, "base": args.base, **summary})
        return
    errors = [v["recon_rel"] for v in report["layers"].values() if "recon_rel" in v]
    error = (f"mean relative reconstruction error {sum(errors) / len(errors):.4f}" if errors else
             "no reconstruction error measured (--error-report measures it)")
    chosen = f" ({len(report['layers'])} layers)" if args.layers else ""
    print(f"pruned {args.model}{chosen} with {args.method}"
          f"{' + ' + args.base if args.base else ''} at "
          f"{report['pattern']}{' (OWL)' if args.owl else ''}: mean layer sparsity "
          f"{report['mean_layer_sparsity']:.4f}, {error}, {report['seconds']:.1f} s, peak RSS "
          f"{report['peak_rss_mib']:.0f} MiB -> {args.out}")


def cmd_pack(args) -> None:
    """``npsparse pack``: save a model with its layers packed in a kernel format."""
    from .packing import pack_model

    report = pack_model(args.model, args.out, args.format, head=args.head,
                        activations=args.activations)
    if args.json:
        _print_json(report)
        return
    print(f"packed {args.model} as {report['format']} ({report['formats']}, head {report['head']}) "
          f"in {report['seconds']:.1f} s: {report['weight_bytes_per_token'] / 1e6:.1f} MB read "
          f"per token -> {report['out']}")


def cmd_monarch(args) -> None:
    """``npsparse monarch``: project chosen linear layers onto Monarch matrices, save a folder."""
    from .monarch import monarch_model

    report = monarch_model(args.model, args.out, args.blocks, layers=args.layers,
                           values=args.values)
    if args.json:
        _print_json(report)
        return
    info = report["monarch"]
    errors = [layer["relative_error"] for layer in info["layers"].values()]
    share = info["parameters"] / info["dense_parameters"]
    print(f"projected {len(errors)} layers of {args.model} onto {args.blocks}-block Monarch "
          f"matrices ({args.values}): {info['parameters']:,} parameters for "
          f"{info['dense_parameters']:,} dense ({share:.1%}), relative Frobenius error mean "
          f"{sum(errors) / len(errors):.4f} max {max(errors):.4f}, {report['seconds']:.1f} s "
          f"-> {report['out']}")


def cmd_bench(args) -> None:
    """``npsparse bench``: run the kernel or decode benchmark with its own options."""
    if args.which == "kernels":
        from .benchmarks.kernels import main
    elif args.which == "head":
        from .benchmarks.head import main
    else:
        from .benchmarks.decode import main
    status = main(args.rest)
    if status:
        sys.exit(status)


def cmd_finetune(args) -> None:
    """``npsparse finetune``: train a (pruned) model's kept weights; see :mod:`npsparse.train`."""
    from .train.finetune import FinetuneSettings, finetune

    settings = FinetuneSettings(
        loss=args.loss, temperature=args.temperature, tokens=args.tokens, steps=args.steps,
        lr=args.lr, batch=args.batch, seqlen=args.seqlen, warmup=args.warmup, decay=args.decay,
        weight_decay=args.weight_decay, clip=args.clip, seed=args.seed, data=args.data,
        val_windows=args.val_windows, val_every=args.val_every, eval_windows=args.eval_windows,
        train_embeddings=args.train_embeddings, teacher=args.teacher, method=args.method,
        pattern=args.pattern if args.sparsity is None else str(args.sparsity), rank=args.rank,
        fraction=args.fraction, nuclear=args.nuclear, experts=args.experts, top_k=args.top_k,
        adapter_dim=args.adapter_dim, adapter_scale=args.adapter_scale, balance=args.balance,
        blocks=args.blocks, active=args.active, router_init=args.router_init)
    settings.check()  # before loading anything
    log = (lambda text: print(text, file=sys.stderr)) if args.json else print
    report = finetune(args.model, args.out, settings, resume=args.resume,
                      progress=not args.json, log=log)
    if "interrupted" in report:
        raise SystemExit(130)
    before, after = report["ppl_before"], report["ppl_after"]
    summary = {"out": str(args.out), "method": report["method"],
               "trainable_parameters": report["trainable_parameters"],
               "optimizer_state_bytes": report["optimizer_state_bytes"],
               "loss": report["loss"], "steps": report["steps"],
               "tokens": report["tokens"], "ppl_before": before and before["ppl"],
               "ppl_after": after and after["ppl"], "val_first": report["validation"][0],
               "val_last": report["validation"][-1],
               "train_tokens_per_s": report["train_tokens_per_s"],
               "matmul_fraction": report["matmul_fraction"], "seconds": report["seconds"],
               "peak_rss_mib": report["peak_rss_mib"], "weights_sha256": report["weights_sha256"]}
    by_domain = report["ppl_by_domain"] or {}
    if len(by_domain) > 1:
        summary["ppl_by_domain"] = {name: {"before": ppl["before"]["ppl"],
                                           "after": ppl["after"]["ppl"]}
                                    for name, ppl in by_domain.items()}
    if args.json:
        _print_json(summary)
        return
    ppl = ""
    if before and after:
        changes = [f"{before['ppl']:.4f} -> {after['ppl']:.4f}"]
        if len(by_domain) > 1:
            changes = [f"{name} {ppl['before']['ppl']:.4f} -> {ppl['after']['ppl']:.4f}"
                       for name, ppl in by_domain.items()]
        ppl = (f"; perplexity {', '.join(changes)} ({after['windows']} x {after['seqlen']} "
               f"eval tokens{' each' if len(changes) > 1 else ''})")
    print(f"fine-tuned {args.model} ({report['method']}: {report['trainable_parameters']:,} "
          f"trainable parameters, {report['optimizer_state_bytes'] / 2**20:.1f} MiB optimizer "
          f"state) with {report['loss']} for {report['steps']} steps "
          f"({report['tokens']} tokens): validation loss {report['validation'][0]['loss']:.4f} "
          f"-> {report['validation'][-1]['loss']:.4f}{ppl}; "
          f"{report['train_tokens_per_s']:.1f} tok/s ({100 * report['matmul_fraction']:.0f}% of "
          f"{report['matmul_gflops']:.0f} GFLOP/s matmul), {report['seconds']:.0f} s, peak RSS "
          f"{report['peak_rss_mib']:.0f} MiB -> {args.out}")


def _finetune_options(ft) -> None:
    from .train.adapted import METHODS
    from .train.finetune import FinetuneSettings
    from .train.optim import DECAYS
    from .train.pesc import DEFAULT_BALANCE, DEFAULT_SCALE

    F = FinetuneSettings()  # the library's defaults, shown by --help
    ft.description = ("Sparse fine-tuning: the zeros of a pruned folder stay zero; the kept "
                      "weights, the norms (and with --train-embeddings the embedding) train on "
                      "the calibration part of the default text. A dense model fine-tunes "
                      "without masks (the control); a folder of 'npsparse monarch' trains its "
                      "Monarch factors and stays Monarch.")
    _add_model(ft)
    ft.add_argument("--loss", default=F.loss,
                    help="terms ce, kd, squarehead joined by +, each optionally WEIGHT*TERM")
    ft.add_argument("--teacher", default=None,
                    help="dense teacher for kd/squarehead (default: the model the pruned "
                         "or Monarch folder came from, as its pruning.json or packed.json "
                         "names it)")
    budget = ft.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=_positive, help="training tokens (rounded up to steps)")
    budget.add_argument("--steps", type=_positive, help="optimizer steps")
    ft.add_argument("--lr", type=float, default=F.lr, help="peak learning rate")
    ft.add_argument("--batch", type=_positive, default=F.batch,
                    help="windows per optimizer step (computed one at a time and accumulated)")
    ft.add_argument("--seqlen", type=_positive, default=F.seqlen, help="window length in tokens")
    ft.add_argument("--warmup", type=int, default=None,
                    help="linear warm-up steps (default: 20, at most a tenth of the steps)")
    ft.add_argument("--decay", default=F.decay, choices=DECAYS,
                    help="learning-rate schedule after the warm-up")
    ft.add_argument("--weight-decay", type=float, default=F.weight_decay,
                    help="AdamW's decoupled decay")
    ft.add_argument("--clip", type=float, default=F.clip,
                    help="clip gradients to this global norm (kept weights only); 0 = off")
    ft.add_argument("--temperature", type=float, default=F.temperature, help="temperature of kd")
    ft.add_argument("--seed", type=int, default=F.seed, help="window order")
    ft.add_argument("--data", default=F.data,
                    help="'pydoc' (calibration part of the default text), 'stdlib' (of "
                         "standard-library source), a mix 'pydoc+stdlib' (an equal share of "
                         "each), FILE.txt or TOKENS.npy")
    ft.add_argument("--val-windows", type=int, default=F.val_windows,
                    help="windows held out from the end of the data for a validation loss")
    ft.add_argument("--val-every", type=_positive, default=None,
                    help="steps between validation losses (default: a fifth of the run)")
    ft.add_argument("--eval-windows", type=int, default=F.eval_windows,
                    help="eval-text windows for the perplexity before and after, on pydoc and "
                         "on each other named text of --data; 0 = skip")
    ft.add_argument("--train-embeddings", action="store_true",
                    help="also train the embedding (and so a tied head)")
    ft.add_argument("--method", default=F.method, choices=METHODS,
                    help="full: every kept weight trains; lora: low-rank adapters merged into "
                         "the weights; pst: dense -> sparse with learned masks (needs "
                         "--sparsity or --pattern); sara: only the smallest-|w| entries train "
                         "(needs --fraction); pesc: every FFN becomes a mixture of routed "
                         "adapter experts, kept in the output (needs --experts, --top-k, "
                         "--adapter-dim); routed-ffn: every FFN runs only its router's top-A "
                         "of B blocks of units, routers and FFN weights train (needs --blocks, "
                         "--active)")
    target = ft.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, default=None,
                        help="PST's final unstructured sparsity per matrix, 0 <= S < 1")
    target.add_argument("--pattern", default=None,
                        help="PST's final N:M pattern (N pruned of every M), e.g. 2:4")
    ft.add_argument("--rank", type=int, default=F.rank, help="LoRA's and PST's rank")
    ft.add_argument("--fraction", type=float, default=None,
                    help="SaRA's trained share of each matrix's kept weights, 0 < F < 1")
    ft.add_argument("--nuclear", type=float, default=F.nuclear,
                    help="SaRA's nuclear-norm penalty weight on one matrix per step")
    ft.add_argument("--experts", type=int, default=None, help="PESC's experts per FFN, E >= 1")
    ft.add_argument("--top-k", type=int, default=None,
                    help="PESC's experts chosen per token, 1 <= k <= E")
    ft.add_argument("--adapter-dim", type=int, default=None,
                    help="PESC's adapter inner dimension R >= 1 (the reference's default: 64)")
    ft.add_argument("--adapter-scale", type=float, default=None,
                    help=f"PESC's adapter scale (default: {DEFAULT_SCALE}, the reference's)")
    ft.add_argument("--balance", type=float, default=None,
                    help=f"the Switch-Transformer balance loss weight alpha of PESC's experts "
                         f"or the routed FFN's blocks, summed over layers (default: pesc "
                         f"{DEFAULT_BALANCE}, routed-ffn 0; 0 = off, as both references train)")
    ft.add_argument("--blocks", type=int, default=None,
                    help="routed FFN's blocks per FFN, B >= 1 dividing the FFN dim")
    ft.add_argument("--active", type=int, default=None,
                    help="routed FFN's blocks active per token, 1 <= A <= B")
    ft.add_argument("--router-init", choices=("random", "oracle"), default=None,
                    help="routed FFN's routers at step 0: random (default: small, near-uniform "
                         "weights) or oracle (MoEfication: each router ridge-fitted on the dense "
                         "model's first 8 training windows to predict the blocks with the "
                         "largest activation norms, logits scaled by 0.1)")
    ft.add_argument("--resume", action="store_true",
                    help="continue an interrupted run (any --method) from OUT.resume; the "
                         "other options must be those of the interrupted run")
    ft.add_argument("--out", required=True, help="output folder (written when the run ends)")
    ft.add_argument("--json", action="store_true", help="print one JSON object")
    ft.set_defaults(func=cmd_finetune)


def _add_attention(parser) -> None:
    parser.add_argument("--attention", default="exact", metavar="exact|topk:L",
                        help="exact, or SPT's sparse attention: each query reads only its top-L "
                             "keys, ranked by PQ codebooks fitted on 4 windows of 512 tokens "
                             "of the pydoc calibration text (seed 0)")
    parser.add_argument("--pq", metavar="M,C",
                        help="with topk: PQ subspaces M (dividing the head dim) and centroids "
                             "C per subspace (default: 8,16)")


def _eval_options(ev) -> None:
    _add_model(ev)
    ev.add_argument("--data", nargs="+", default=["pydoc"], metavar="TEXT",
                    help="texts to evaluate, one perplexity each: 'pydoc' (eval part of the "
                         "default text), 'stdlib' (eval part of standard-library source), a "
                         "UTF-8 text file; several, a comma list or a mix 'pydoc+stdlib' "
                         "(each of its texts)")
    ev.add_argument("--seqlen", type=_positive, default=512, help="window length in tokens")
    ev.add_argument("--windows", type=_positive, default=None,
                    help="evaluate the first N windows of each text (default: 40 for a "
                         "named text, all for a file)")
    _add_attention(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_eval)


def _generate_options(gen) -> None:
    from .packing import ACTIVATION_CHOICES, FORMAT_CHOICES, HEAD_CHOICES

    _add_model(gen)
    gen.add_argument("-p", "--prompt", required=True,
                     help="text to continue (with --chat: the user's message)")
    gen.add_argument("-n", type=_positive, default=64,
                     help="new tokens (fewer if the model ends its text or turn)")
    gen.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy")
    gen.add_argument("--top-k", type=int, default=0,
                     help="sample among the k most likely tokens; 0 = all")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="sample among the most likely tokens that reach this probability "
                          "(nucleus); 1 = all")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--format", default="dense",
                     choices=list(FORMAT_CHOICES),
                     help="weight format of the block linear layers (dense = as loaded: float32 "
                          "for a checkpoint, the stored formats for a packed folder; auto = "
                          "fewest bytes per layer)")
    gen.add_argument("--threads", type=_positive, default=None,
                     help="kernel threads, fixed (default: as many as the other processes leave "
                          "CPUs free, re-read while decoding, up to NUMBA_NUM_THREADS)")
    gen.add_argument("--head", default="auto", choices=HEAD_CHOICES,
                     help=HEAD_HELP + " (with --format other than dense)")
    gen.add_argument("--activations", default="fp32", choices=ACTIVATION_CHOICES,
                     help=ACTIVATIONS_HELP)
    _add_attention(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=cmd_generate)


def _prune_options(pr) -> None:
    from .calibration import NSAMPLES, SEQLEN
    from .prune import METHODS, DSnoTOptions, bases
    from .prune.dsnot import GUARDS
    from .sequential import PruneSettings

    DSNOT, P = DSnoTOptions(), PruneSettings("", "")  # the library's defaults, shown by --help
    _add_model(pr)
    pr.add_argument("--method", required=True, choices=list(METHODS), help="pruning method")
    pr.add_argument("--base", choices=bases(),
                    help="DSnoT's initial method (required with --method dsnot, refused without)")
    pr.add_argument("--sparsity", help="unstructured sparsity, e.g. 0.5 or 50%%")
    pr.add_argument("--pattern", help="N:M pattern, N pruned of every M inputs, e.g. 2:4")
    pr.add_argument("--calib", default=P.calib,
                    help="'pydoc' (calibration part of the default text), 'stdlib' (of "
                         "standard-library source), a mix 'pydoc+stdlib' (an equal share of "
                         "each), FILE.txt or TOKENS.npy")
    pr.add_argument("--nsamples", type=_positive,
                    help=f"calibration windows, or a .npy file's own row count (default: "
                         f"{NSAMPLES})")
    pr.add_argument("--seqlen", type=_positive,
                    help=f"calibration window length in tokens, or a .npy file's own (default: "
                         f"{SEQLEN})")
    pr.add_argument("--seed", type=int, default=P.seed,
                    help="seed of the calibration window sampler (text sources)")
    pr.add_argument("--owl", action="store_true", help="OWL non-uniform block sparsity")
    pr.add_argument("--layers", nargs="+", metavar="PATTERN",
                    help="prune only these layers, as shell patterns or block prefixes "
                         "('model.layers.2?.mlp.*', 'model.layers.3'); the others stay as "
                         "loaded; default: every block linear layer")
    pr.add_argument("--error-report", action=argparse.BooleanOptionalAction,
                    help="measure each layer's reconstruction error on the calibration windows "
                         "(default: on, except for magnitude pruning, which needs no calibration "
                         "and then takes seconds)")
    pr.add_argument("--dsnot-cycles", type=int, default=DSNOT.max_cycles,
                    help="DSnoT: at most this many swap cycles")
    pr.add_argument("--dsnot-threshold", type=float, default=DSNOT.threshold,
                    help="DSnoT: a row stops once its mean output shift |e_i| is this small")
    pr.add_argument("--dsnot-same-sign", action="store_true",
                    help="DSnoT: refuse swaps that flip the sign of the row error")
    pr.add_argument("--dsnot-guard", choices=GUARDS, default=DSNOT.guard,
                    help="DSnoT: apply a swap only if it lowers the row's reconstruction error "
                         "(recon), its mean shift |e_i| (mean), or always (none, the reference "
                         "code)")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.set_defaults(func=cmd_prune)


def _pack_options(pk) -> None:
    from .packing import ACTIVATION_CHOICES, FORMAT_CHOICES, HEAD_CHOICES

    _add_model(pk)
    pk.add_argument("--format", default="auto",
                    choices=[fmt for fmt in FORMAT_CHOICES if fmt != "dense"],
                    help="auto = per layer, the format that reads the fewest bytes")
    pk.add_argument("--head", default="auto", choices=HEAD_CHOICES, help=HEAD_HELP)
    pk.add_argument("--activations", default="fp32", choices=ACTIVATION_CHOICES,
                    help=ACTIVATIONS_HELP)
    pk.add_argument("--out", required=True, help="output folder (written atomically)")
    pk.add_argument("--json", action="store_true", help="print one JSON object")
    pk.set_defaults(func=cmd_pack)


def _monarch_options(mo) -> None:
    _add_model(mo)
    mo.add_argument("--blocks", type=int, required=True,
                    help="b, the diagonal blocks of each factor (b >= 2 dividing N and K, b^2 "
                         "dividing min(N, K))")
    mo.add_argument("--layers", nargs="+", metavar="PATTERN",
                    help="layers to project, as shell patterns or block prefixes "
                         "('model.layers.2?.mlp.*', 'model.layers.3'); default: every block "
                         "linear layer")
    mo.add_argument("--values", default="fp32", choices=["fp32", "bf16"],
                    help="storage of the factors")
    mo.add_argument("--out", required=True, help="output folder (written atomically)")
    mo.add_argument("--json", action="store_true", help="print one JSON object")
    mo.set_defaults(func=cmd_monarch)


def _bench_options(bn) -> None:
    bn.description = ("npsparse bench kernels --help / npsparse bench decode --help list each "
                      "benchmark's options.")
    bn.add_argument("which", choices=["kernels", "decode", "head"])
    bn.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    bn.set_defaults(func=cmd_bench)


def _demo_options(demo) -> None:
    from .calibration import NSAMPLES
    from .prune import bases

    demo.add_argument("model", nargs="?", default="smollm2", metavar="MODEL",
                      help="model to evaluate, prune and run")
    demo.add_argument("--windows", type=_positive, default=8, help="eval windows of 512 tokens")
    demo.add_argument("--method", default="wanda", choices=bases(),
                      help="pruning method")
    demo.add_argument("--sparsity", default="0.5", help="unstructured sparsity or N:M")
    demo.add_argument("--nsamples", type=_positive, default=NSAMPLES, help="calibration windows")
    demo.add_argument("--format", default="auto", help="kernel format for the pruned model")
    demo.add_argument("--out", default="runs/demo", help="where the pruned model is written")
    demo.add_argument("-p", "--prompt", default="Explain what a Python generator is.",
                      help="chat message for the dense and the pruned model")
    demo.add_argument("-n", type=_positive, default=64, help="new tokens")
    demo.set_defaults(func=cmd_demo)


# Subcommand -> (its one-line help, the function adding its options). Options are added only to
# the subcommand being run, so running one imports only the modules it needs.
SUBCOMMANDS = {
    "eval": ("perplexity on non-overlapping token windows", _eval_options),
    "generate": ("generate text from a prompt", _generate_options),
    "prune": ("prune a model block by block and write a HF folder", _prune_options),
    "pack": ("save a model with its layers packed in a kernel format", _pack_options),
    "monarch": ("project linear layers onto Monarch matrices and save a packed folder",
                _monarch_options),
    "bench": ("kernel or decode benchmarks against the memory roofline", _bench_options),
    "demo": ("the main job on the embedded model: evaluate and generate", _demo_options),
    "finetune": ("train a (pruned) model's kept weights against a teacher", _finetune_options),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``npsparse`` argument parser.

    Parameters
    ----------
    command : str, optional
        Build only this subcommand's options (the others are listed with their help line), so
        that running one subcommand imports only what it needs; None builds them all.

    Returns
    -------
    argparse.ArgumentParser
        With the subcommands of :data:`SUBCOMMANDS`; each sets ``func`` to its ``cmd_*``
        function, which :func:`main` calls with the parsed namespace.
    """
    parser = argparse.ArgumentParser(
        prog="npsparse", description="Sparse LLMs in NumPy and Numba: evaluate, prune, generate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_line, add_options) in SUBCOMMANDS.items():
        subparser = sub.add_parser(name, help=help_line, formatter_class=_HelpFormatter)
        if command in (None, name):
            add_options(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``npsparse`` command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments after the program name; None reads ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success; 2 on a user error (:class:`~npsparse.errors.NpsparseError`,
        printed as one line ``npsparse: error: ...`` on stderr, no traceback); 130 on Ctrl-C;
        143 on SIGTERM (``timeout``, ``kill``, a job scheduler), which unwinds like Ctrl-C so
        that temporary output folders are removed; 141 when stdout's reader has gone
        (``npsparse generate ... | head``), silently, as a process killed by SIGPIPE; 1 when
        out of memory. Bad arguments make argparse exit with status 2 itself.
    """
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    previous = _catch_sigterm()
    try:
        args.func(args)
    except NpsparseError as err:
        print(f"npsparse: error: {err}", file=sys.stderr)
        return 2
    except _Terminated:
        print("npsparse: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("npsparse: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Python ignores SIGPIPE, so a closed pipe raises here; stdout now points at devnull so
        # that the interpreter's final flush of it does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MemoryError:
        print("npsparse: error: out of memory", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that cleanup (``with``, ``finally``) runs."""


def _catch_sigterm():
    """Make SIGTERM raise :class:`_Terminated`; return the previous handler (None off the main
    thread, where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
        raise _Terminated

    return signal.signal(signal.SIGTERM, terminate)


if __name__ == "__main__":
    sys.exit(main())
