"""`npsparse finetune --method routed-ffn` on a tiny model with SmolLM2's tokenizer (issue 16)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import random_weights, tiny_config

import npsparse
from npsparse.cli import main
from npsparse.io import open_checkpoint, write_hf_dir
from npsparse.tokenizer import Tokenizer
from npsparse.train import FinetuneSettings, LossWeights, finetune
from npsparse.train.finetune import training_windows, validation_terms

B, A, D, F, LAYERS = 4, 1, 32, 64, 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    tokenizer = Tokenizer.from_gguf(open_checkpoint(smollm2_path))
    root = tmp_path_factory.mktemp("routed")
    config = tiny_config("llama", vocab_size=tokenizer.vocab_size, dim=D, ffn_dim=F,
                         max_position=256)
    write_hf_dir(root / "dense", config, random_weights(config), tokenizer_json=tokenizer.to_json())
    return root


def settings(**changes):
    values = dict(method="routed-ffn", blocks=B, active=A, loss="ce", steps=3, seqlen=64,
                  batch=1, lr=1e-2, eval_windows=0, val_windows=2)
    values.update(changes)
    return FinetuneSettings(**values)


@pytest.fixture(scope="module")
def trained(tiny):
    report = finetune(tiny / "dense", tiny / "ft", settings(), progress=False)
    return tiny / "ft", report


def test_the_folder_records_the_structure_and_only_routers_and_ffns_train(tiny, trained):
    folder, report = trained
    hf = json.loads((folder / "config.json").read_text())
    assert hf["npsparse_routed_ffn"] == {"blocks": B, "active": A}
    llm = npsparse.load(folder)
    assert all(block.ffn_router is not None for block in llm.model.blocks)
    state = llm.model.state_dict()
    base = npsparse.load(tiny / "dense").model.state_dict()
    routers = {f"model.layers.{i}.mlp.block_router.weight" for i in range(LAYERS)}
    assert set(state) - set(base) == routers
    for name, array in base.items():
        if ".mlp." in name:
            assert not np.array_equal(state[name], array), name  # the FFN weights trained
        else:
            np.testing.assert_array_equal(state[name], array, err_msg=name)  # frozen
    assert report["trainable_parameters"] == LAYERS * (B * D + 3 * F * D)
    data = training_windows("pydoc", llm.tokenizer, llm.config.vocab_size, 64)
    loaded = validation_terms(llm.model, None, data[-2:], LossWeights(ce=1.0))
    assert loaded["ce"] == pytest.approx(report["validation"][-1]["ce"], rel=1e-6)
    routing = report["routed_ffn"]["routing"]
    assert report["routed_ffn"]["blocks"] == B and len(routing["load"]) == LAYERS
    assert all(sum(layer) == pytest.approx(1.0) for layer in routing["load"])


def test_the_routers_move_with_one_active_block(tiny, trained):
    from npsparse.train.routed_ffn import router_tensors

    llm = npsparse.load(trained[0])
    fresh = router_tensors(llm.model, llm.config.routed_ffn, 0)
    for i, block in enumerate(llm.model.blocks):
        assert not np.allclose(block.ffn_router.router,
                               fresh[f"model.layers.{i}.mlp.block_router.weight"])


def test_cli_run_then_eval_and_generate_and_pack_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "npsparse.cli", "finetune", str(tiny / "dense"), "--method",
         "routed-ffn", "--blocks", "2", "--active", "1", "--loss", "ce", "--steps", "2",
         "--batch", "1", "--seqlen", "64", "--lr", "1e-2", "--eval-windows", "0",
         "--val-windows", "1", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["method"] == "routed-ffn"
    assert main(["eval", str(out), "--seqlen", "64", "--windows", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 1
    assert main(["generate", str(out), "-p", "def f(x):", "-n", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "def f(x):"
    assert main(["pack", str(out), "--out", str(tmp_path / "packed"), "--format", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "routed-FFN model runs from dense float32 weights" in err[0]


@pytest.mark.parametrize("extra,message", [
    (["--method", "routed-ffn", "--blocks", "4", "--active", "5"],
     "5 active blocks is more than the 4 blocks"),
    (["--method", "routed-ffn", "--blocks", "4", "--active", "0"],
     "active blocks must be at least 1, not 0"),
    (["--method", "routed-ffn", "--blocks", "0", "--active", "1"],
     "number of FFN blocks must be at least 1, not 0"),
    (["--method", "routed-ffn", "--blocks", "4"], "needs --blocks B and --active A"),
    (["--blocks", "4", "--active", "1"], "only it takes them"),
    (["--method", "pesc", "--experts", "2", "--top-k", "1", "--adapter-dim", "2",
      "--active", "1"], "only it takes them"),
    (["--method", "routed-ffn", "--blocks", "4", "--active", "1", "--balance", "-1"],
     "--balance must be 0 or more, got -1.0"),
    (["--method", "routed-ffn", "--blocks", "4", "--active", "1", "--balance", "nan"],
     "--balance must be 0 or more, got nan"),
])
def test_bad_settings_are_one_line_exit_2(tmp_path, capsys, extra, message):
    status = main(["finetune", str(tmp_path / "no-such-model"), "--steps", "2", "--out",
                   str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert message in err[0] and err[0].startswith("npsparse: error:")
    assert not (tmp_path / "out").exists()


def test_blocks_that_do_not_divide_the_ffn_are_one_line_exit_2(tiny, tmp_path, capsys):
    status = main(["finetune", str(tiny / "dense"), "--method", "routed-ffn", "--blocks", "5",
                   "--active", "1", "--steps", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "5 blocks do not divide the FFN's 64 hidden units" in err[0]
    assert not (tmp_path / "out").exists()


def test_an_interrupted_run_resumes_to_the_same_weights(tiny, tmp_path):
    def stop_after_1(record):
        if record["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    whole = finetune(tiny / "dense", tmp_path / "whole", settings(steps=2), progress=False)
    cut = finetune(tiny / "dense", tmp_path / "cut", settings(steps=2), progress=False,
                   on_step=stop_after_1, log=lambda text: None)
    assert cut["interrupted"] == 1
    done = finetune(tiny / "dense", tmp_path / "cut", settings(steps=2), resume=True,
                    progress=False, log=lambda text: None)
    assert done["weights_sha256"] == whole["weights_sha256"]


def test_the_balance_loss_is_a_flag_recorded_in_the_report_that_changes_training(tiny, trained,
                                                                                  tmp_path):
    plain = trained[1]
    assert plain["loss"] == "1*ce" and plain["routed_ffn"]["balance"] == 0.0  # off by default
    alone = finetune(tiny / "dense", tmp_path / "alone", settings(steps=2), progress=False)
    balanced = finetune(tiny / "dense", tmp_path / "balanced", settings(steps=2, balance=1.0),
                        progress=False)
    assert balanced["loss"] == "1*ce+1*balance" and balanced["routed_ffn"]["balance"] == 1.0
    assert all(step["balance"] >= LAYERS * (1.0 - 1e-9) for step in balanced["train"])
    assert all("balance" not in step for step in alone["train"])
    # the same first forward: CE equal, then the routers' extra gradient changes the weights
    assert balanced["train"][0]["ce"] == alone["train"][0]["ce"]
    assert balanced["weights_sha256"] != alone["weights_sha256"]
