"""`npsparse bench decode --llama-cpp`: llama.cpp beside npsparse (issue 13).

llama-cpp-python is an optional extra that compiles llama.cpp, so CI does not have it: the parts
that do not need it are tested everywhere, the rest only where it is installed.
"""

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader

from npsparse.benchmarks import llama_cpp
from npsparse.cli import main
from npsparse.errors import NpsparseError


def test_without_llama_cpp_python_it_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    status = main(["bench", "decode", "smollm2", "--llama-cpp", "--tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "--llama-cpp needs llama-cpp-python" in err[0] and "npsparse[compare]" in err[0]


def test_the_shipped_file_type_and_bytes_per_token(smollm2_path):
    assert llama_cpp.file_type(smollm2_path) == "Q4_1"
    # Independently: every tensor's elements / block size x bytes per block, from its type.
    reader = GGUFReader(smollm2_path)
    expected = 0
    for tensor in reader.tensors:
        block, size = GGML_QUANT_SIZES[tensor.tensor_type]
        expected += int(np.prod(tensor.shape)) // block * size
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: the head is read whole
    assert llama_cpp.weight_bytes(smollm2_path) == expected
    assert 0.9 < expected / smollm2_path.stat().st_size < 1.0


def test_the_shipped_variant_needs_no_quantizer_and_unknown_ones_are_refused(smollm2_path,
                                                                           tmp_path):
    files = llama_cpp.variant_files(smollm2_path, ("shipped", "Q4_1"), tmp_path, 1)
    assert files == {"Q4_1 (shipped)": smollm2_path} and not any(tmp_path.iterdir())
    with pytest.raises(NpsparseError, match="unknown llama.cpp variant 'Q3_X'"):
        llama_cpp.variant_files(smollm2_path, ("Q3_X",), tmp_path, 1)


def test_ppl_windows_must_not_be_negative():
    out = subprocess.run([sys.executable, "-m", "npsparse.cli", "bench", "decode", "smollm2",
                          "--ppl-windows", "-1"], capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "--ppl-windows must be 0 or more" in out.stderr
    assert "Traceback" not in out.stderr


def test_llama_cpp_decodes_the_shipped_file_and_a_requantized_copy(smollm2_path, tmp_path):
    pytest.importorskip("llama_cpp")
    files = llama_cpp.variant_files(smollm2_path, ("shipped", "Q8_0"), tmp_path, 2)
    assert set(files) == {"Q4_1 (shipped)", "Q8_0"}
    assert llama_cpp.file_type(files["Q8_0"]) == "Q8_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{smollm2_path.stem}.Q8_0.gguf"]
    prompt = np.array([504, 3275, 5149, 3568, 1517])
    for path in files.values():
        model = llama_cpp.LlamaCppModel(path, 2, 64)
        tok_s, prefill, ids = model.decode(prompt, 6)
        assert len(ids) == 6 and tok_s > 0 and prefill > 0
        assert model.decode(prompt, 6)[2] == ids  # greedy: the same ids again
