"""The training engine against PyTorch autograd (golden data from tests/oracle/make_train_golden.py).

Tiny checkpoints in float64: every loss term and every parameter's gradient to 1e-9 relative,
and three AdamW steps equal to torch.optim.AdamW. SmolLM2 in float32 (what training runs): every
gradient within 1e-4 relative L2 of PyTorch's float64 gradient, estimated on 256 sampled entries
per tensor, and every gradient's norm.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from npsparse.io import open_checkpoint
from npsparse.io.weights import DictWeights
from npsparse.models import build_model
from npsparse.train import (AdamW, AdamWSettings, LossWeights, clip_by_global_norm, hidden_states,
                            loss_and_grads, parameters)
from npsparse.train.engine import head_of

DATA = Path(__file__).parent / "data"
GOLDEN = np.load(DATA / "train_golden.npz")
META = json.loads(str(GOLDEN["meta"]))
CASES = {case["case"]: case for case in META["cases"]}


def load_tiny(name: str, dtype=np.float64):
    checkpoint = open_checkpoint(DATA / "tiny" / name)
    weights = checkpoint.weights
    arrays = {n: np.array(weights.get_checked(n, weights.shapes[n])) for n in weights}
    return build_model(checkpoint.config, DictWeights(arrays, source=checkpoint.path, dtype=dtype))


def golden(prefix: str) -> dict:
    return {key[len(prefix):]: GOLDEN[key] for key in GOLDEN.files if key.startswith(prefix)}


def masked_student(name: str, masks: dict):
    student = load_tiny(name)
    params = parameters(student)
    for weight, mask in masks.items():
        params[weight] *= mask
    return student, params


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_equal_pytorch_autograd_in_float64(case):
    spec = CASES[case]
    masks = golden(f"{case}/mask/")
    ids = GOLDEN[f"{case}/ids"]
    student, params = masked_student(spec["checkpoint"], masks)
    teacher = load_tiny(spec["checkpoint"])
    t_out, t_h = hidden_states(teacher, ids)
    losses = LossWeights.parse(spec["loss"], temperature=float(GOLDEN["temperature"]))
    terms, grads = loss_and_grads(student, ids, losses, teacher=(t_out, t_h, head_of(teacher)))
    for name, want in golden(f"{case}/term/").items():
        assert terms[name] == pytest.approx(float(want), rel=1e-10, abs=1e-13), name
    want_grads = golden(f"{case}/grad/")
    assert set(grads) == set(want_grads) == set(params)
    for name, want in want_grads.items():
        assert grads[name].dtype == np.float64
        assert relative_error(grads[name], want) < 1e-9, name


def test_adamw_steps_equal_torch_adamw():
    """Masked gradients, clipped to global norm 1, three steps: the weights torch.optim.AdamW
    reaches, and every pruned weight still exactly zero."""
    masks = {name[len("llama_ce_sq_2of4/mask/"):]: GOLDEN[name] for name in GOLDEN.files
             if name.startswith("llama_ce_sq_2of4/mask/")}
    student, params = masked_student(META["checkpoint"], masks)
    teacher = load_tiny(META["checkpoint"])
    optimizer = AdamW(params, masks, AdamWSettings(betas=tuple(META["betas"]), eps=META["eps"],
                                                   weight_decay=META["weight_decay"]))
    losses = LossWeights.parse(META["loss"], temperature=float(GOLDEN["temperature"]))
    for step, lr in enumerate(META["lrs"]):
        ids = GOLDEN[f"adamw/ids/{step}"]
        t_out, t_h = hidden_states(teacher, ids)
        _, grads = loss_and_grads(student, ids, losses, teacher=(t_out, t_h, head_of(teacher)))
        optimizer.mask_gradients(grads)
        norm = clip_by_global_norm(grads, META["clip"])
        assert norm == pytest.approx(float(GOLDEN[f"adamw/norm/{step}"]), rel=1e-10)
        optimizer.step(grads, lr)
    for name, want in golden("adamw/weight/").items():
        assert relative_error(params[name], want) < 1e-9, name
        if name in masks:
            assert not np.any(params[name][~masks[name]])


def magnitude_2of4(weight: np.ndarray) -> np.ndarray:
    """The oracle's mask: the 2 largest |w| of each 4 consecutive weights (stable on ties)."""
    groups = np.abs(weight).reshape(-1, 4)
    order = np.argsort(-groups, axis=1, kind="stable")[:, :2]
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask.reshape(weight.shape)


def test_smollm2_float32_gradients_match_pytorch_float64(smollm2_path):
    """What training runs: float32 SmolLM2, 2:4 student against the dense teacher, ce+squarehead
    on 128 tokens; each gradient within 1e-4 relative of PyTorch's float64 gradient."""
    from npsparse.train.finetune import load_trainable

    data = np.load(DATA / "train_golden_smollm2.npz")
    student = load_trainable(smollm2_path)[0]
    teacher = load_trainable(smollm2_path)[0]
    params = parameters(student)
    for name, p in params.items():
        if name.endswith("_proj.weight"):
            p *= magnitude_2of4(p)
    ids = data["ids"]
    t_out, t_h = hidden_states(teacher, ids)
    terms, grads = loss_and_grads(student, ids, LossWeights.parse("ce+squarehead"),
                                  teacher=(t_out, t_h, head_of(teacher)))
    for name in ("ce", "squarehead", "loss"):
        assert terms[name] == pytest.approx(float(data[f"term/{name}"]), rel=1e-5), name
    worst, errors = 0.0, {}
    for name, grad in grads.items():
        assert grad.dtype == np.float32
        index, want = data[f"index/{name}"], data[f"sample/{name}"]
        got = grad.ravel()[index].astype(np.float64)
        error = relative_error(got, want)
        norm = np.linalg.norm(grad.astype(np.float64))
        assert norm == pytest.approx(float(data[f"norm/{name}"]), rel=1e-4), name
        worst = max(worst, error)
        errors[name] = error
        assert error < 1e-4, (name, error)
    top = sorted(errors, key=errors.get)[-3:]
    print(f"worst sampled relative error {worst:.2e} over {len(grads)} tensors:",
          ", ".join(f"{n} {errors[n]:.1e}" for n in top))
