"""llama.cpp beside npsparse: the same GGUF timed through ``llama-cpp-python`` (issue 13).

``npsparse bench decode ... --llama-cpp`` adds one run per llama.cpp variant of a GGUF file
(by default the embedded SmolLM2) to the same interleaved rounds as npsparse's runs:

- the file as shipped (SmolLM2: Q4_1, with its tied embedding/head in Q8_0);
- ``Q8_0`` and ``F16`` re-quantized from it by llama.cpp's own quantizer (``allow_requantize``:
  each weight is dequantized from the shipped type first, so no variant is better than the
  file it comes from). They are written once into a cache folder, atomically (temporary file,
  then rename), and reused.

Each variant decodes greedily with llama.cpp's own kernels: the prompt in one batch, then one
token at a time, the next token the argmax of the last logits, timed from Python as npsparse's
:func:`npsparse.generate.generate` is (tokens 2..n over the decode steps). Its bytes per token are
the GGUF's tensor bytes (every weight is read once per token; a tied embedding is read whole as
the head) plus llama.cpp's f16 KV cache at the mean position.

``llama-cpp-python`` compiles llama.cpp when it is installed, so it is an optional extra
(``pip install 'npsparse[compare]'``), never installed by CI; without it ``--llama-cpp`` is a
one-line error.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np

from npsparse.errors import NpsparseError

INSTALL = "pip install 'npsparse[compare]'"
# variant name -> llama.cpp's ``llama_ftype`` (LLAMA_FTYPE_MOSTLY_*), for re-quantization
FTYPES = {"F16": 1, "Q8_0": 7, "Q4_1": 3}
VARIANTS = ("shipped", "Q8_0", "F16")  # what --llama-cpp runs by default


def import_llama_cpp():
    """The ``llama_cpp`` module, or a one-line error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise NpsparseError(f"--llama-cpp needs llama-cpp-python, an optional extra that "
                            f"compiles llama.cpp: {INSTALL}") from None
    return llama_cpp


def describe(llama_cpp) -> str:
    """The binding's version and the CPU features llama.cpp was built with and uses."""
    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return f"llama-cpp-python {llama_cpp.__version__}; {' '.join(info.split())}"


def file_type(path: Path) -> str:
    """The GGUF's ``general.file_type`` as a variant name (``Q4_1``, ``Q8_0``, ``F16`` ...)."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(path).get_field("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"ftype {value}"


def weight_bytes(path: Path) -> int:
    """Bytes of the GGUF's tensors read per decoded token.

    Every tensor once, except a separate ``token_embd`` (only one row is read when
    ``output.weight`` exists; a tied one is the head and read whole).
    """
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    if "output.weight" in tensors and "token_embd.weight" in tensors:
        embed = tensors["token_embd.weight"]
        rows = int(embed.shape[-1])  # GGUF lists dims fastest first: [dim, vocab]
        total -= int(embed.n_bytes) - int(embed.n_bytes) // rows
    return total


def variant_files(source: Path, variants: tuple, cache: Path, threads: int) -> dict[str, Path]:
    """Each variant's GGUF: ``shipped`` is ``source``; others re-quantized into ``cache`` once.

    Parameters
    ----------
    source : Path
        The GGUF file as shipped.
    variants : tuple of str
        ``"shipped"`` and/or names of :data:`FTYPES`.
    cache : Path
        Folder of the re-quantized files (``{stem}.{variant}.gguf``), created if needed.
    threads : int
        Threads of llama.cpp's quantizer.

    Returns
    -------
    dict of str -> Path
        By label: ``"Q4_1 (shipped)"`` for the source, else the variant's name.
    """
    shipped = file_type(source)
    out = {}
    for name in variants:
        if name == "shipped" or name == shipped:
            out[f"{shipped} (shipped)"] = source
            continue
        if name not in FTYPES:
            raise NpsparseError(f"unknown llama.cpp variant {name!r} (shipped, "
                                f"{', '.join(FTYPES)})")
        dest = cache / f"{source.stem}.{name}.gguf"
        if not dest.exists():
            quantize(source, dest, FTYPES[name], threads)
        out[name] = dest
    return out


def quantize(source: Path, dest: Path, ftype: int, threads: int) -> None:
    """Re-quantize ``source`` to ``ftype`` with llama.cpp's quantizer, written atomically."""
    llama_cpp = import_llama_cpp()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = threads
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(),
                                                ctypes.byref(params))
        if status != 0:
            raise NpsparseError(f"llama.cpp could not quantize {source} to ftype {ftype} "
                                f"(status {status})")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


class LlamaCppModel:
    """One GGUF loaded by llama.cpp, decoded greedily one token at a time.

    Parameters
    ----------
    path : Path
        The GGUF file.
    threads : int
        llama.cpp's threads, for the prompt and for decode.
    context : int
        Positions of its KV cache (prompt plus new tokens must fit).
    """

    def __init__(self, path: Path, threads: int, context: int):
        llama_cpp = import_llama_cpp()
        self.path = Path(path)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.weight_bytes = weight_bytes(self.path)

    def _argmax(self) -> int:
        """The greedy next token: argmax of the last evaluated token's logits.

        Without ``logits_all`` llama.cpp computes logits for the batch's last token only, and
        the binding no longer copies them into ``scores``; read them from the context.
        """
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def decode(self, prompt: np.ndarray, tokens: int) -> tuple[float, float, list[int]]:
        """Greedy decode of ``tokens`` tokens after ``prompt``.

        Returns
        -------
        (float, float, list of int)
            Decode tokens/s (tokens 2..n over the one-token steps, as
            :attr:`npsparse.generate.GenerationResult.decode_tok_s`), prefill tokens/s (the
            prompt's batch, which yields token 1), and the generated ids.
        """
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval([int(t) for t in prompt])
        token = self._argmax()
        prefill = time.perf_counter() - start
        ids = [token]
        start = time.perf_counter()
        while len(ids) < tokens:
            llm.eval([token])
            token = self._argmax()
            ids.append(token)
        decode = time.perf_counter() - start
        return ((len(ids) - 1) / decode if decode else 0.0, len(prompt) / prefill, ids)

    def kv_bytes_per_token(self, config, mean_position: float) -> float:
        """llama.cpp's f16 KV cache read at ``mean_position`` (its default cache type)."""
        return 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2 * mean_position
