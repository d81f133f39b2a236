"""--router-init oracle (MoEfication's init of SPT's routed FFN): routers fitted to the oracle."""

import json
import os
import signal

import numpy as np
import pytest
from helpers import random_weights, tiny_config, tiny_model
from scipy.special import log_softmax

from npsparse.cli import main
from npsparse.config import RoutedFfnConfig
from npsparse.errors import NpsparseError
from npsparse.ffn_routing import oracle_blocks, route_blocks
from npsparse.io import open_checkpoint, write_hf_dir
from npsparse.tokenizer import Tokenizer
from npsparse.train import FinetuneSettings, finetune
from npsparse.train.routed_ffn import (fit_routers, router_tensors, set_routers,
                                      with_oracle_routing, with_routed_ffn)

ROUTED = RoutedFfnConfig(blocks=8, active=2)  # the tiny llama's F = 48: blocks of 6 units


@pytest.fixture(scope="module")
def fitted():
    dense = tiny_model("llama")
    windows = np.random.default_rng(1).integers(0, dense.config.vocab_size, (4, 64))
    return dense, windows, fit_routers(dense, windows, ROUTED)


def routed_with(dense, routers):
    model = with_routed_ffn(dense, ROUTED, seed=0)
    if routers is not None:
        set_routers(model, routers)
    return model


def agreement(dense, model, windows):
    """Mean share of each token's oracle top-A that the router picks, over tokens and layers."""
    shares = []
    for ids in windows:
        x = dense.embed(ids, 0)
        for plain, routed in zip(dense.blocks, model.blocks):
            tape = {}
            x = plain(x, tape=tape)  # the dense model's own FFN inputs
            h = tape["h_mlp"]
            oracle = oracle_blocks(h, plain.linears["mlp.gate_proj"].weight,
                                   plain.linears["mlp.up_proj"].weight, ROUTED.blocks,
                                   ROUTED.active)
            chosen, _, _ = route_blocks(h @ routed.ffn_router.router.T, ROUTED.active)
            shares += [len(set(a) & set(b)) / ROUTED.active for a, b in zip(oracle, chosen)]
    return float(np.mean(shares))


def test_fitted_routers_choose_the_oracles_blocks_and_random_ones_do_not(fitted):
    dense, windows, routers = fitted
    # chance is A / B = 0.25; measured: fitted 0.62, random 0.26 (512 token-layers)
    assert agreement(dense, routed_with(dense, routers), windows) > 0.5
    assert abs(agreement(dense, routed_with(dense, None), windows) - 0.25) < 0.08


def test_fitted_routers_start_closer_to_the_dense_model_with_weights_near_1(fitted):
    # The loss at step 0 is the KL divergence from the dense model's next-token distribution:
    # on random weights and random tokens the cross-entropy is near log(V) whatever routes, so
    # only the distance from the model being sparsified measures the routing.
    dense, windows, routers = fitted

    def kl(model):
        terms = []
        for ids in windows:
            p, q = log_softmax(dense.forward(ids), -1), log_softmax(model.forward(ids), -1)
            terms.append(np.mean(np.sum(np.exp(p) * (p - q), -1)))
        return float(np.mean(terms))

    fit, random = kl(routed_with(dense, routers)), kl(routed_with(dense, None))
    assert fit < 0.8 * random  # measured: 0.37 against 0.61 (the oracle: 0.26)
    assert kl(with_oracle_routing(dense, ROUTED)) < fit
    tape = {}
    routed_with(dense, routers).blocks[0](dense.embed(windows[0], 0), tape=tape)
    weights = tape["routed_ffn"]["weights"]  # B * softmax at the chosen blocks
    assert 1.0 < weights.mean() < 1.2 and weights.max() < 1.5  # measured: 1.09, 1.29


def test_the_fit_is_deterministic_and_leaves_the_dense_model_alone(fitted):
    dense, windows, routers = fitted
    before = {n: a.copy() for n, a in dense.state_dict().items()}
    again = fit_routers(dense, windows, ROUTED)
    assert routers.keys() == again.keys() == router_tensors(dense, ROUTED, 0).keys()
    for name, array in routers.items():
        assert array.dtype == np.float32 and array.shape == (8, 32)
        np.testing.assert_array_equal(array, again[name])
    for name, array in dense.state_dict().items():
        np.testing.assert_array_equal(array, before[name])
    with pytest.raises(NpsparseError, match="plain FFNs"):
        fit_routers(routed_with(dense, routers), windows, ROUTED)


@pytest.mark.parametrize("extra", [
    ["--router-init", "oracle"],
    ["--router-init", "random"],
    ["--method", "pesc", "--experts", "2", "--top-k", "1", "--adapter-dim", "2",
     "--router-init", "oracle"],
])
def test_router_init_with_another_method_is_one_line_exit_2(tmp_path, capsys, extra):
    status = main(["finetune", str(tmp_path / "no-such-model"), "--steps", "2", "--out",
                   str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "--router-init applies to --method routed-ffn only" in err[0]
    assert err[0].startswith("npsparse: error:")
    assert not (tmp_path / "out").exists()


def test_settings_record_the_init_and_default_to_random():
    common = dict(method="routed-ffn", blocks=4, active=1, steps=1)
    assert FinetuneSettings(**common).router_init == "random"
    assert FinetuneSettings().router_init is None
    with pytest.raises(NpsparseError, match="unknown --router-init 'zero'"):
        FinetuneSettings(**common, router_init="zero").check()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    tokenizer = Tokenizer.from_gguf(open_checkpoint(smollm2_path))
    root = tmp_path_factory.mktemp("router_init")
    config = tiny_config("llama", vocab_size=tokenizer.vocab_size, max_position=256)
    write_hf_dir(root / "dense", config, random_weights(config), tokenizer_json=tokenizer.to_json())
    return root


def settings(**changes):
    values = dict(method="routed-ffn", blocks=4, active=1, loss="ce", steps=2, seqlen=64,
                  batch=1, lr=1e-2, eval_windows=0, val_windows=2, router_init="oracle")
    values.update(changes)
    return FinetuneSettings(**values)


def test_finetune_records_oracle_init_and_resume_checks_it(tiny, tmp_path):
    def stop_after_1(record):
        if record["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    whole = finetune(tiny / "dense", tmp_path / "whole", settings(), progress=False)
    saved = json.loads((tmp_path / "whole" / "finetune.json").read_text())
    assert saved["settings"]["router_init"] == whole["settings"]["router_init"] == "oracle"
    random = finetune(tiny / "dense", tmp_path / "random", settings(router_init="random"),
                      progress=False)
    assert random["weights_sha256"] != whole["weights_sha256"]
    cut = finetune(tiny / "dense", tmp_path / "cut", settings(), progress=False,
                   on_step=stop_after_1, log=lambda text: None)
    assert cut["interrupted"] == 1
    with pytest.raises(NpsparseError, match=r"other settings \(router_init\)"):
        finetune(tiny / "dense", tmp_path / "cut", settings(router_init="random"), resume=True,
                 progress=False, log=lambda text: None)
    done = finetune(tiny / "dense", tmp_path / "cut", settings(), resume=True, progress=False,
                    log=lambda text: None)
    assert done["weights_sha256"] == whole["weights_sha256"]


def test_a_state_from_before_the_option_resumes_as_random(tiny, tmp_path):
    def stop_after_1(record):
        if record["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    plain = settings(router_init=None)  # the default: random
    whole = finetune(tiny / "dense", tmp_path / "whole", plain, progress=False)
    finetune(tiny / "dense", tmp_path / "cut", plain, progress=False, on_step=stop_after_1,
             log=lambda text: None)
    state = tmp_path / "cut.resume" / "state.json"
    record = json.loads(state.read_text())
    del record["settings"]["router_init"]  # as written before --router-init existed
    state.write_text(json.dumps(record))
    done = finetune(tiny / "dense", tmp_path / "cut", plain, resume=True, progress=False,
                    log=lambda text: None)
    assert done["weights_sha256"] == whole["weights_sha256"]
    assert done["settings"]["router_init"] == "random"
