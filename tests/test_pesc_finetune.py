"""`npsparse finetune --method pesc` on a tiny model with SmolLM2's tokenizer (issue 16)."""

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

E, K, R, D, LAYERS = 4, 2, 3, 32, 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    tokenizer = Tokenizer.from_gguf(open_checkpoint(smollm2_path))
    root = tmp_path_factory.mktemp("pesc")
    config = tiny_config("llama", vocab_size=tokenizer.vocab_size, dim=D, ffn_dim=64,
                         max_position=256)
    write_hf_dir(root / "dense", config, random_weights(config), tokenizer_json=tokenizer.to_json())
    return root


def settings(**changes):
    values = dict(method="pesc", experts=E, top_k=K, adapter_dim=R, loss="ce", steps=3,
                  seqlen=64, batch=1, lr=1e-2, eval_windows=0, val_windows=2)
    values.update(changes)
    return FinetuneSettings(**values)


@pytest.fixture(scope="module")
def trained(tiny):
    report = finetune(tiny / "dense", tiny / "ft", settings(balance=0.1), progress=False)
    return tiny / "ft", report


def test_the_folder_records_the_structure_and_loads_as_the_trained_model(tiny, trained):
    folder, report = trained
    hf = json.loads((folder / "config.json").read_text())
    assert hf["npsparse_pesc"] == {"experts": E, "top_k": K, "adapter_dim": R, "scale": 0.25}
    llm = npsparse.load(folder)
    assert all(block.moe is not None for block in llm.model.blocks)
    up = llm.model.blocks[0].moe.up
    assert up.shape == (E, D, R) and np.any(up != 0)  # the adapters trained
    state = llm.model.state_dict()
    base = npsparse.load(tiny / "dense").model.state_dict()
    assert {n for n in state if n not in base} == {
        f"model.layers.{i}.mlp.{a}" for i in range(LAYERS)
        for a in ("router.weight", "adapters.down", "adapters.up")}
    for name, array in base.items():  # the base model is frozen
        np.testing.assert_array_equal(state[name], array, err_msg=name)
    # the last validation loss was computed on the model in memory; the loaded one agrees
    data = training_windows("pydoc", llm.tokenizer, llm.config.vocab_size, 64)
    loaded = validation_terms(llm.model, None, data[-2:], LossWeights(ce=1.0))
    assert loaded["ce"] == pytest.approx(report["validation"][-1]["ce"], rel=1e-6)


def test_the_report_names_the_structure_the_balance_and_each_blocks_load(trained):
    folder, report = trained
    saved = json.loads((folder / "finetune.json").read_text())
    assert saved["method"] == "pesc" and saved["loss"] == "1*ce+0.1*balance"
    pesc = saved["pesc"]
    assert (pesc["experts"], pesc["top_k"], pesc["adapter_dim"], pesc["scale"],
            pesc["balance"]) == (E, K, R, 0.25, 0.1)
    assert saved["trainable_parameters"] == LAYERS * (E * D + 2 * E * R * D)
    assert all("balance" in step for step in saved["train"])
    routing = pesc["routing"]
    assert routing["windows"] == 2 and len(routing["blocks"]) == LAYERS
    for block in routing["blocks"]:
        assert len(block["load"]) == E and sum(block["load"]) == pytest.approx(1.0)
        assert block["balance"] >= 1.0 - 1e-9  # E * sum f P is 1 only when balanced


def test_same_seed_same_weights(tiny, trained, tmp_path):
    again = finetune(tiny / "dense", tmp_path / "again", settings(balance=0.1), progress=False)
    assert again["weights_sha256"] == trained[1]["weights_sha256"]


def test_cli_run_then_eval_generate_and_pack_keep_the_experts(tiny, tmp_path, capsys):
    from npsparse.packing import pack_model

    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "npsparse.cli", "finetune", str(tiny / "dense"), "--method",
         "pesc", "--experts", "3", "--top-k", "1", "--adapter-dim", "2", "--balance", "0",
         "--loss", "ce", "--steps", "2", "--batch", "1", "--seqlen", "64", "--lr", "1e-2",
         "--eval-windows", "0", "--val-windows", "1", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["method"] == "pesc"
    assert json.loads((out / "finetune.json").read_text())["pesc"]["balance"] == 0.0
    assert main(["eval", str(out), "--seqlen", "64", "--windows", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 1
    # generate: one-token decode through the PESC blocks
    assert main(["generate", str(out), "-p", "def f(x):", "-n", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "def f(x):"
    llm = npsparse.load(out)
    pack_model(out, tmp_path / "packed", "bf16")
    packed = npsparse.load(tmp_path / "packed")
    assert packed.config.pesc == llm.config.pesc
    ids = llm.encode("import numpy as np")
    np.testing.assert_allclose(packed.model.forward(ids), llm.model.forward(ids), atol=0.05)


@pytest.mark.parametrize("extra,message", [
    (["--method", "pesc", "--experts", "2", "--top-k", "3", "--adapter-dim", "4"],
     "top-k 3 is more than the 2 experts"),
    (["--method", "pesc", "--experts", "0", "--top-k", "1", "--adapter-dim", "4"],
     "number of experts must be at least 1, not 0"),
    (["--method", "pesc", "--experts", "4", "--top-k", "2", "--adapter-dim", "0"],
     "adapter dimension must be at least 1, not 0"),
    (["--method", "pesc", "--experts", "4", "--top-k", "2"], "needs --experts E"),
    (["--experts", "4"], "only it takes them"),
    (["--method", "lora", "--balance", "0.1"], "--balance applies to --method pesc and "
                                                "routed-ffn only"),
    (["--method", "pesc", "--experts", "4", "--top-k", "2", "--adapter-dim", "4",
      "--balance", "-1"], "--balance must be 0 or more"),
])
def test_bad_pesc_settings_are_one_line_exit_2(tmp_path, capsys, extra, message):
    status = main(["finetune", str(tmp_path / "no-such-model"), "--steps", "2", "--out",
                   str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert message in err[0] and err[0].startswith("npsparse: error:")
    assert not (tmp_path / "out").exists()


def test_pesc_on_a_pesc_folder_is_refused(trained, tmp_path):
    with pytest.raises(npsparse.NpsparseError, match="PESC experts already"):
        finetune(trained[0], tmp_path / "o", settings(steps=1), progress=False)


def test_an_interrupted_run_resumes_to_the_same_weights(tiny, tmp_path):
    def stop_after_2(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    whole = finetune(tiny / "dense", tmp_path / "whole", settings(steps=4), progress=False)
    cut = finetune(tiny / "dense", tmp_path / "cut", settings(steps=4), progress=False,
                   on_step=stop_after_2, log=lambda text: None)
    assert cut["interrupted"] == 2
    done = finetune(tiny / "dense", tmp_path / "cut", settings(steps=4), resume=True,
                    progress=False, log=lambda text: None)
    assert done["weights_sha256"] == whole["weights_sha256"]
