"""The training engine: whole-model gradients, masked AdamW, the schedule, and `finetune` runs."""

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import loss_with_values, random_weights, tiny_config
from hypothesis import given, strategies as st

import npsparse
from npsparse.errors import NpsparseError
from npsparse.io import open_checkpoint, write_hf_dir
from npsparse.io.weights import DictWeights
from npsparse.models import build_model
from npsparse.sequential import PruneSettings, prune_model
from npsparse.tokenizer import Tokenizer
from npsparse.train import (AdamW, AdamWSettings, FinetuneSettings, LossWeights,
                            clip_by_global_norm, finetune, hidden_states, learning_rate,
                            loss_and_grads, parameters)
from npsparse.train.engine import head_of
from npsparse.train.finetune import window_index


def model64(arch, seed=0, **changes):
    config = tiny_config(arch, **changes)
    return build_model(config, DictWeights(random_weights(config, seed), dtype=np.float64))


def random_masks(model, rng):
    return {name: rng.random(p.shape) < 0.5 for name, p in parameters(model).items()
            if name.endswith("_proj.weight")}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("loss", ["ce", "ce+squarehead", "kd", "0.5*ce+2*kd+squarehead"])
def test_whole_model_gradient_equals_finite_differences(arch, loss):
    """Every parameter at once (masked student, dense teacher), float64, along random directions."""
    rng = np.random.default_rng(1)
    student, teacher = model64(arch), model64(arch)
    params = parameters(student)
    masks = random_masks(student, rng)
    for name, mask in masks.items():
        params[name] *= mask
    losses = LossWeights.parse(loss, temperature=2.0)
    ids = rng.integers(0, student.config.vocab_size, 12)
    t_out, t_h = hidden_states(teacher, ids)
    teacher_view = (t_out, t_h, head_of(teacher))

    loss_at = loss_with_values(student, params, ids, losses, teacher_view)

    terms, grads = loss_and_grads(student, ids, losses, teacher=teacher_view)
    assert set(grads) == set(params)
    if losses.squarehead:
        assert terms["squarehead"] > 0
    for _ in range(3):
        direction = {n: rng.standard_normal(p.shape) * (masks[n] if n in masks else 1)
                     for n, p in params.items()}
        eps = 1e-6
        plus = loss_at({n: params[n] + eps * d for n, d in direction.items()})
        minus = loss_at({n: params[n] - eps * d for n, d in direction.items()})
        analytic = sum(float(np.sum(grads[n] * d)) for n, d in direction.items())
        assert analytic == pytest.approx((plus - minus) / (2 * eps), rel=1e-6)


def test_tied_embedding_gradient_is_lookup_plus_head():
    """With tied embeddings the one matrix gets both gradients; untied, each its own."""
    rng = np.random.default_rng(0)
    model = model64("qwen2")
    ids = rng.integers(0, model.config.vocab_size, 6)
    _, grads = loss_and_grads(model, ids, LossWeights())
    assert "lm_head.weight" not in grads
    _, head_only = loss_and_grads(model, ids, LossWeights(),
                                  trainable={"model.embed_tokens.weight"})
    np.testing.assert_allclose(head_only["model.embed_tokens.weight"],
                               grads["model.embed_tokens.weight"])
    unused = np.setdiff1d(np.arange(model.config.vocab_size), ids)
    assert np.any(grads["model.embed_tokens.weight"][unused] != 0)  # the head's part


def test_accumulated_gradients_are_the_scaled_sum():
    rng = np.random.default_rng(2)
    model = model64("llama")
    a, b = rng.integers(0, model.config.vocab_size, (2, 8))
    _, ga = loss_and_grads(model, a, LossWeights())
    _, gb = loss_and_grads(model, b, LossWeights())
    into = {n: np.zeros_like(p) for n, p in parameters(model).items()}
    loss_and_grads(model, a, LossWeights(), into=into, scale=0.5)
    loss_and_grads(model, b, LossWeights(), into=into, scale=0.5)
    for name in into:
        np.testing.assert_allclose(into[name], 0.5 * (ga[name] + gb[name]), atol=1e-15)


# ---- optimizer ---------------------------------------------------------------------------

def reference_adamw(w, grads, lr, betas, eps, wd):
    """AdamW written out step by step (Loshchilov & Hutter, PyTorch's bias correction)."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        w = w * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        w = w - lr * (m / (1 - betas[0] ** t)) / (np.sqrt(v / (1 - betas[1] ** t)) + eps)
    return w


@given(seed=st.integers(0, 2**32 - 1), wd=st.sampled_from([0.0, 0.1]), steps=st.integers(1, 4))
def test_adamw_equals_its_definition(seed, wd, steps):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((4, 5))
    grads = [rng.standard_normal((4, 5)) for _ in range(steps)]
    params = {"w": w0.copy()}
    opt = AdamW(params, settings=AdamWSettings(lr=1e-2, weight_decay=wd))
    for g in grads:
        opt.step({"w": g.copy()}, 1e-2)
    expected = reference_adamw(w0, grads, 1e-2, (0.9, 0.999), 1e-8, wd)
    np.testing.assert_allclose(params["w"], expected, rtol=1e-12, atol=1e-14)


@given(seed=st.integers(0, 2**32 - 1), n=st.sampled_from([2, 4]))
def test_masked_weights_stay_exactly_zero(seed, n):
    """Unstructured and N:M masks: after many steps with weight decay, pruned entries keep their
    bits (zeros, of either sign) and the moments there stay 0."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 8)).astype(np.float32)
    if n == 4:  # 2:4, the two largest of each group kept
        order = np.argsort(-np.abs(w.reshape(6, 2, 4)), axis=-1, kind="stable")
        mask = np.zeros((6, 2, 4), bool)
        np.put_along_axis(mask, order[..., :2], True, axis=-1)
        mask = mask.reshape(6, 8)
    else:
        mask = rng.random(w.shape) < 0.5
    w *= mask
    start = w.copy()
    params = {"w": w}
    opt = AdamW(params, {"w": mask}, AdamWSettings(lr=1e-2, weight_decay=0.1))
    for _ in range(20):
        grads = {"w": rng.standard_normal(w.shape).astype(np.float32)}
        opt.mask_gradients(grads)
        clip_by_global_norm(grads, 0.5)
        opt.step(grads, 1e-2)
    assert np.all(w[~mask] == 0)
    np.testing.assert_array_equal(w[~mask].view(np.uint32), start[~mask].view(np.uint32))
    assert np.all(w[mask] != 0)
    assert np.all(opt.exp_avg["w"][~mask] == 0)


def test_clip_counts_only_what_it_is_given():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert clip_by_global_norm(grads, 10.0) == pytest.approx(5.0)
    assert grads["a"][0] == 3.0  # under the limit: unchanged
    clip_by_global_norm(grads, 1.0)
    assert math.hypot(grads["a"][0], grads["b"][0, 0]) == pytest.approx(1.0, rel=1e-5)


@given(total=st.integers(1, 200), warmup=st.integers(0, 30),
       decay=st.sampled_from(["linear", "cosine", "constant"]))
def test_schedule_warms_up_then_decays(total, warmup, decay):
    rates = [learning_rate(s, total, 1.0, warmup, decay) for s in range(1, total + 1)]
    assert all(0 < r <= 1.0 for r in rates)
    for s in range(1, min(warmup, total) + 1):
        assert rates[s - 1] == pytest.approx(s / warmup)
    after = rates[warmup:]
    if after:
        assert after[0] == 1.0
        assert all(b <= a for a, b in zip(after, after[1:]))


@pytest.mark.parametrize("text,message", [
    ("ce+foo", "unknown loss term"), ("x*ce", "not a number"), ("-1*ce", "positive"),
    ("", "unknown loss term"),
])
def test_bad_loss_specs_are_refused(text, message):
    with pytest.raises(NpsparseError, match=message):
        LossWeights.parse(text)


def test_loss_spec_reads_weights():
    w = LossWeights.parse("0.5*ce + squarehead+2*kd", temperature=3.0)
    assert (w.ce, w.kd, w.squarehead, w.temperature) == (0.5, 2.0, 1.0, 3.0)
    assert w.needs_teacher and not LossWeights.parse("ce").needs_teacher


def test_window_order_covers_each_epoch_once():
    seen = [window_index(s, j, 3, 10, seed=5) for s in range(10) for j in range(3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen != [window_index(s, j, 3, 10, seed=6) for s in range(10) for j in range(3)]


# ---- whole runs on a tiny model with SmolLM2's tokenizer ---------------------------------------

@pytest.fixture(scope="module")
def tiny_pruned(tmp_path_factory, smollm2_path):
    tokenizer = Tokenizer.from_gguf(open_checkpoint(smollm2_path))
    root = tmp_path_factory.mktemp("finetune")
    config = tiny_config("llama", vocab_size=tokenizer.vocab_size, dim=32, ffn_dim=64,
                         max_position=256)
    write_hf_dir(root / "dense", config, random_weights(config), tokenizer_json=tokenizer.to_json())
    for name, pattern in (("p50", "0.5"), ("p24", "2:4")):
        prune_model(root / "dense", root / name,
                    PruneSettings(method="magnitude", pattern=pattern, nsamples=4, seqlen=64),
                    progress=False)
    return root


def small(**changes):
    values = dict(steps=4, seqlen=64, batch=2, lr=1e-2, eval_windows=1, val_windows=2)
    values.update(changes)
    return FinetuneSettings(**values)


def test_finetune_keeps_the_mask_and_lowers_the_loss(tiny_pruned, tmp_path):
    report = finetune(tiny_pruned / "p24", tmp_path / "out", small(steps=8), progress=False)
    assert report["teacher"].endswith("dense")  # found through pruning.json
    first, last = report["validation"][0], report["validation"][-1]
    assert last["loss"] < first["loss"]
    before, after = npsparse.load(tiny_pruned / "p24"), npsparse.load(tmp_path / "out")
    changed = 0
    for name, layer in after.model.linears().items():
        new, old = layer.to_dense(), before.model.linears()[name].to_dense()
        np.testing.assert_array_equal(new == 0, old == 0)  # the 2:4 pattern, bit for bit
        changed += int(np.any(new != old))
    assert changed == len(after.model.linears())
    saved = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert saved["weights_sha256"] == report["weights_sha256"]
    assert saved["masked_parameters"] > 0 and saved["ppl_after"]["windows"] == 1


def test_finetuned_2of4_model_packs_as_nm(tiny_pruned, tmp_path):
    from npsparse.packing import pack_model

    finetune(tiny_pruned / "p24", tmp_path / "ft", small(loss="ce"), progress=False)
    llm = npsparse.load(tmp_path / "ft")
    ids = llm.encode("def f(x):\n    return x * 2\n")
    dense_logits = llm.logits(ids)
    pack_model(tmp_path / "ft", tmp_path / "packed", "nm")
    packed = npsparse.load(tmp_path / "packed")
    assert {type(layer).__name__ for layer in packed.model.linears().values()} == {"NMLinear"}
    np.testing.assert_allclose(packed.logits(ids), dense_logits, rtol=0.05, atol=0.05)


def test_same_seed_same_weights_and_another_seed_differs(tiny_pruned, tmp_path):
    a = finetune(tiny_pruned / "p50", tmp_path / "a", small(eval_windows=0), progress=False)
    b = finetune(tiny_pruned / "p50", tmp_path / "b", small(eval_windows=0), progress=False)
    c = finetune(tiny_pruned / "p50", tmp_path / "c", small(eval_windows=0, seed=1),
                 progress=False)
    assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]
    assert a["train"][-1]["loss"] == b["train"][-1]["loss"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_and_resumed_equals_uninterrupted(tiny_pruned, tmp_path, sig):
    settings = small(steps=6, eval_windows=0)
    whole = finetune(tiny_pruned / "p50", tmp_path / "whole", settings, progress=False)

    def interrupt(record):
        if record["step"] == 2:
            os.kill(os.getpid(), sig)

    notes = []
    part = finetune(tiny_pruned / "p50", tmp_path / "cut", settings, progress=False,
                    on_step=interrupt, log=notes.append)
    assert part == {"interrupted": 2, "resume": str(tmp_path / "cut.resume")}
    assert not (tmp_path / "cut").exists() and "--resume" in notes[0]
    with pytest.raises(NpsparseError, match="--resume"):
        finetune(tiny_pruned / "p50", tmp_path / "cut", settings, progress=False)
    with pytest.raises(NpsparseError, match="other settings"):
        finetune(tiny_pruned / "p50", tmp_path / "cut", small(steps=7, eval_windows=0),
                 resume=True, progress=False)
    done = finetune(tiny_pruned / "p50", tmp_path / "cut", settings, resume=True, progress=False,
                    log=notes.append)
    assert done["weights_sha256"] == whole["weights_sha256"]
    assert [r["loss"] for r in done["train"]] == [r["loss"] for r in whole["train"]]
    assert not (tmp_path / "cut.resume").exists()


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "npsparse.cli", "finetune", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("extra,message", [
    (["--steps", "2", "--lr", "nan"], "--lr must be a finite number"),
    (["--steps", "2", "--lr=-1e-4"], "--lr must be positive"),
    (["--tokens", "0"], "must be at least 1"),
    (["--steps", "2", "--loss", "ce+mse"], "unknown loss term"),
    (["--steps", "2", "--teacher", "/nonexistent/model"], "/nonexistent/model"),
    (["--steps", "2", "--data", "EMPTY"], "empty"),
    (["--steps", "2", "--data", "SHORT"], "fewer than one window"),
    (["--steps", "2", "--teacher", "smollm2"], "does not match the student"),
    (["--steps", "2", "--seqlen", "4096"], "exceeds the model's context"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_pruned, tmp_path, extra, message):
    (tmp_path / "EMPTY").write_text("")
    (tmp_path / "SHORT").write_text("just a few words")
    extra = [str(tmp_path / e) if e in ("EMPTY", "SHORT") else e for e in extra]
    result = run_cli(tiny_pruned / "p50", "--out", tmp_path / "out", "--eval-windows", "0",
                     "--seqlen", "64", *extra)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # argparse prints its usage lines first
    assert message in last and "error:" in last and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_dense_model_without_a_teacher_is_refused_for_squarehead(tiny_pruned, tmp_path):
    result = run_cli(tiny_pruned / "dense", "--steps", "1", "--seqlen", "64", "--out",
                     tmp_path / "out")
    assert result.returncode == 2 and "pass --teacher" in result.stderr


def test_cli_dense_control_runs(tiny_pruned, tmp_path):
    """Dense fine-tuning with cross-entropy: no masks, no teacher."""
    result = run_cli(tiny_pruned / "dense", "--loss", "ce", "--steps", "2", "--seqlen", "64",
                     "--eval-windows", "1", "--val-windows", "1", "--json", "--out",
                     tmp_path / "out")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    report = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert report["masked_parameters"] == 0 and report["teacher"] is None
    assert summary["weights_sha256"] == report["weights_sha256"]
