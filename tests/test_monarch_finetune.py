"""Fine-tuning a Monarch folder: factor gradients, whole runs, and packing that keeps Monarch.

The factor gradients are checked twice in float64: against central finite differences through
the whole model (every parameter at once, Monarch and dense layers mixed), and against the other
route to them, the engine's ``dL/dW`` of a dense model holding ``W = to_dense()`` pushed through
``to_dense`` by the chain rule.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import (check_directional_derivative, loss_with_values, random_weights,
                     tiny_config)

import npsparse
from npsparse.io import open_checkpoint, write_hf_dir
from npsparse.io.weights import DictWeights
from npsparse.linear import DenseLinear
from npsparse.models import build_model
from npsparse.monarch import MonarchLinear, monarch_model, project
from npsparse.sequential import PruneSettings, prune_model
from npsparse.tokenizer import Tokenizer
from npsparse.train import FinetuneSettings, LossWeights, finetune, hidden_states, loss_and_grads
from npsparse.train import parameters
from npsparse.train.engine import head_of

# (layer, b): MLP layers with 2 blocks, attention with 4 (k/v are 16 x 32: b^2 = 16 divides 16)
CHOSEN = {"model.layers.0.mlp.up_proj": 2, "model.layers.0.mlp.down_proj": 2,
          "model.layers.1.mlp.gate_proj": 2, "model.layers.1.self_attn.k_proj": 4,
          "model.layers.1.self_attn.o_proj": 4}


def model64(seed=0):
    config = tiny_config("llama")
    return build_model(config, DictWeights(random_weights(config, seed), dtype=np.float64))


def monarch64(seed=0):
    """The tiny float64 model with the CHOSEN layers projected onto float64 Monarch copies."""
    model = model64(seed)
    for name, b in CHOSEN.items():
        weight = model.linears()[name].to_dense()  # [N, K] float64
        model.set_linear(name, project(weight, b).trainable_copy(np.float64))
    return model


def test_parameters_name_the_factors_as_a_packed_folder_does():
    model = monarch64()
    params = parameters(model)
    for name, b in CHOSEN.items():
        assert f"{name}.weight" not in params
        layer = model.linears()[name]
        assert params[f"{name}.weight::right"] is layer.arrays["right"]  # live, not a copy
        assert params[f"{name}.weight::left"].dtype == np.float64
        assert params[f"{name}.weight::right"].shape[0] == b
    assert "model.layers.0.self_attn.q_proj.weight" in params


@pytest.mark.parametrize("loss", ["ce", "ce+squarehead"])
def test_whole_model_gradient_with_monarch_layers_equals_finite_differences(loss):
    """Every parameter at once (factors, dense weights, norms, embedding), float64."""
    rng = np.random.default_rng(3)
    student, teacher = monarch64(), model64()
    params = parameters(student)
    losses = LossWeights.parse(loss)
    ids = rng.integers(0, student.config.vocab_size, 10)
    t_out, t_h = hidden_states(teacher, ids)
    teacher_view = (t_out, t_h, head_of(teacher))

    loss_at = loss_with_values(student, params, ids, losses, teacher_view)

    terms, grads = loss_and_grads(student, ids, losses, teacher=teacher_view)
    assert set(grads) == set(params)
    factors = [n for n in params if "::" in n]
    assert len(factors) == 2 * len(CHOSEN)
    for subset in (factors, list(params)):  # the factors alone, then everything
        for _ in range(2):
            check_directional_derivative(loss_at, params, grads, subset, rng)


def chain_rule(d_weight, right, left):
    """dL/dR and dL/dL from dL/dW, W[o b + l, k p + i] = sum_j L[l, o, k r + j] R[k, j b + l, i]."""
    b, q, p = right.shape
    s, r = left.shape[1], q // b
    g4 = d_weight.reshape(s, b, b, p)  # [o, l, k, i]
    left4 = left.reshape(b, s, b, r)  # [l, o, k, j]
    right4 = right.reshape(b, r, b, p)  # [k, j, l, i]
    d_left = np.einsum("olki,kjli->lokj", g4, right4).reshape(left.shape)
    d_right = np.einsum("olki,lokj->kjli", g4, left4).reshape(right.shape)
    return d_right, d_left


def test_factor_gradients_equal_the_chain_rule_through_to_dense():
    """The route not taken (dense W_eff, then the chain rule) gives the same gradients."""
    rng = np.random.default_rng(4)
    student, teacher = monarch64(), model64()
    dense = model64()
    for name in CHOSEN:
        dense.set_linear(name, DenseLinear(student.linears()[name].to_dense()))
    ids = rng.integers(0, student.config.vocab_size, 10)
    t_out, t_h = hidden_states(teacher, ids)
    losses = LossWeights.parse("ce+squarehead")
    view = (t_out, t_h, head_of(teacher))
    terms, grads = loss_and_grads(student, ids, losses, teacher=view)
    dense_terms, dense_grads = loss_and_grads(dense, ids, losses, teacher=view)
    assert terms["loss"] == pytest.approx(dense_terms["loss"], rel=1e-12)
    for name in CHOSEN:
        layer = student.linears()[name]
        d_right, d_left = chain_rule(dense_grads.pop(f"{name}.weight"), *layer.factors())
        np.testing.assert_allclose(grads.pop(f"{name}.weight::right"), d_right, rtol=1e-9,
                                   atol=1e-12)
        np.testing.assert_allclose(grads.pop(f"{name}.weight::left"), d_left, rtol=1e-9,
                                   atol=1e-12)
    assert set(grads) == set(dense_grads)
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, dense_grads[name], rtol=1e-9, atol=1e-12)


# ---- whole runs on a tiny Monarch folder (SmolLM2's tokenizer) --------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    tokenizer = Tokenizer.from_gguf(open_checkpoint(smollm2_path))
    root = tmp_path_factory.mktemp("monarch_ft")
    config = tiny_config("llama", vocab_size=tokenizer.vocab_size, dim=32, ffn_dim=64,
                         max_position=256)
    write_hf_dir(root / "dense", config, random_weights(config), tokenizer_json=tokenizer.to_json())
    monarch_model(root / "dense", root / "m", 2, layers=["*.mlp.*"])
    monarch_model(root / "dense", root / "m16", 2, layers=["*.mlp.*"], values="bf16")
    prune_model(root / "dense", root / "p50",
                PruneSettings(method="magnitude", pattern="0.5", nsamples=4, seqlen=64),
                progress=False)
    monarch_model(root / "p50", root / "pm", 2, layers=["model.layers.1.mlp.*"])
    return root


def small(**changes):
    values = dict(loss="ce+squarehead", steps=4, seqlen=64, batch=2, lr=1e-2, eval_windows=0,
                  val_windows=2)
    values.update(changes)
    return FinetuneSettings(**values)


def monarch_names(llm):
    return sorted(n for n, layer in llm.model.linears().items()
                  if isinstance(layer, MonarchLinear))


def test_finetune_trains_the_factors_and_writes_a_monarch_folder(tiny, tmp_path):
    report = finetune(tiny / "m", tmp_path / "out", small(eval_windows=1), progress=False)
    assert report["teacher"].endswith("dense")  # packed.json names the model it came from
    before, after = npsparse.load(tiny / "m"), npsparse.load(tmp_path / "out")
    chosen = [f"model.layers.{i}.mlp.{n}" for i in (0, 1) for n in ("down_proj", "gate_proj",
                                                                     "up_proj")]
    assert monarch_names(before) == monarch_names(after) == chosen
    for name, layer in after.model.linears().items():
        old = before.model.linears()[name]
        if name in chosen:
            assert layer.values_type == "fp32" and layer.blocks == 2
            for key in ("right", "left"):
                assert np.any(layer.arrays[key] != old.arrays[key]), (name, key)
        else:
            assert isinstance(layer, DenseLinear) and np.any(layer.weight != old.weight), name
    packed = json.loads((tmp_path / "out" / "packed.json").read_text())
    assert packed["formats"] == {"monarch": 6, "dense": 8}
    assert packed["teacher"] == report["teacher"] and packed["mask_from_zeros"] is False
    saved = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert saved["weights_sha256"] == report["weights_sha256"]
    assert saved["monarch"] == {"blocks": 2, "values": "fp32", "layers": 6,
                                "parameters": packed["monarch"]["parameters"],
                                "dense_parameters": 6 * 64 * 32}
    assert report["masked_parameters"] == 0 and report["ppl_after"]["windows"] == 1
    state = npsparse.load(tiny / "dense").model.state_dict()
    dense_count = sum(a.size for n, a in state.items() if n not in ("model.embed_tokens.weight",
                                                                    "lm_head.weight"))
    monarch_count = report["monarch"]["parameters"]
    assert report["trainable_parameters"] == dense_count - 6 * 64 * 32 + monarch_count
    ids = after.encode("def f(x):\n    return x")
    assert np.all(np.isfinite(after.logits(ids)))
    assert len(after.generate("x = ", 3).ids) == 3


def test_training_loss_falls_on_an_overfit_sequence(tiny, tmp_path):
    """One window over and over: cross-entropy falls from chance (ln V = 10.8) towards 0."""
    window = np.random.default_rng(0).integers(0, 1000, 64)
    np.save(tmp_path / "one.npy", np.stack([window] * 3))
    settings = small(loss="ce", steps=24, val_windows=1, decay="constant", warmup=0,
                     data=str(tmp_path / "one.npy"))
    report = finetune(tiny / "m", tmp_path / "out", settings, progress=False)
    losses = [r["loss"] for r in report["train"]]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_same_seed_same_sha256_and_resume_equals_uninterrupted(tiny, tmp_path):
    settings = small(steps=5)
    a = finetune(tiny / "m", tmp_path / "a", settings, progress=False)
    b = finetune(tiny / "m", tmp_path / "b", settings, progress=False)
    c = finetune(tiny / "m", tmp_path / "c", small(steps=5, seed=1), progress=False)
    assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]

    def stop(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    cut = finetune(tiny / "m", tmp_path / "cut", settings, progress=False, on_step=stop,
                   log=lambda text: None)
    assert cut["interrupted"] == 2 and not (tmp_path / "cut").exists()
    done = finetune(tiny / "m", tmp_path / "cut", settings, resume=True, progress=False,
                    log=lambda text: None)
    assert done["weights_sha256"] == a["weights_sha256"]
    assert [r["loss"] for r in done["train"]] == [r["loss"] for r in a["train"]]
    assert (tmp_path / "cut" / "packed.json").is_file()


def test_bf16_factors_train_in_float32(tiny, tmp_path):
    finetune(tiny / "m16", tmp_path / "out", small(loss="ce", steps=2), progress=False)
    after = npsparse.load(tmp_path / "out")
    assert {after.model.linears()[n].values_type for n in monarch_names(after)} == {"fp32"}


def test_a_monarch_folder_of_a_pruned_model_keeps_its_zeros(tiny, tmp_path):
    packed = json.loads((tiny / "pm" / "packed.json").read_text())
    assert packed["teacher"].endswith("dense") and packed["mask_from_zeros"] is True
    report = finetune(tiny / "pm", tmp_path / "out", small(), progress=False)
    assert report["teacher"].endswith("dense") and report["masked_parameters"] > 0
    before, after = npsparse.load(tiny / "pm"), npsparse.load(tmp_path / "out")
    for name, layer in after.model.linears().items():
        if isinstance(layer, DenseLinear):
            np.testing.assert_array_equal(layer.weight == 0,
                                          before.model.linears()[name].to_dense() == 0)
    assert monarch_names(after) == [f"model.layers.1.mlp.{n}" for n in ("down_proj",
                                                                      "gate_proj", "up_proj")]


def test_adapters_refuse_a_monarch_folder_in_one_line(tiny, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "npsparse.cli", "finetune", str(tiny / "m"), "--method", "lora",
         "--rank", "2", "--loss", "ce", "--steps", "2", "--seqlen", "64", "--out",
         str(tmp_path / "o")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Monarch folder" in lines[0] and "--method full" in lines[0]


# ---- pack and generate keep Monarch layers -----------------------------------------------------

def test_pack_and_generate_keep_monarch_layers(tiny, tmp_path):
    from npsparse.packing import apply_format, pack_model

    source = npsparse.load(tiny / "m")
    ids = source.encode("def area(r):\n    return 3.14159 * r ** 2")
    expected = source.logits(ids)
    report = pack_model(tiny / "m", tmp_path / "bf16", "bf16")
    assert report["formats"] == {"monarch": 6, "bf16": 9}  # 8 block layers and the head
    packed = npsparse.load(tmp_path / "bf16")
    assert monarch_names(packed) == monarch_names(source)
    for name in monarch_names(source):
        for key in ("right", "left"):
            np.testing.assert_array_equal(packed.model.linears()[name].arrays[key],
                                          source.model.linears()[name].arrays[key])
    np.testing.assert_allclose(packed.logits(ids), expected, rtol=0.05, atol=0.05)
    info = apply_format(source.model, "auto")
    assert info["formats"]["MonarchLinear"] == 6
    assert monarch_names(source) == monarch_names(packed)


def test_cli_generate_with_a_format_runs_the_monarch_layers(tiny, capsys):
    from npsparse.cli import main

    assert main(["generate", str(tiny / "m"), "-p", "x = ", "-n", "2", "--format", "bf16",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "bf16 8 + monarch 6"
