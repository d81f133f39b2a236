"""npsparse: sparse large language models in NumPy and Numba.

Load a LLaMA-family, GPT-2 or OPT checkpoint (GGUF or Hugging Face), evaluate and generate with a
readable NumPy forward pass, prune it without training, and run it with sparse Numba kernels.
"""

from .api import LLM, load
from .config import ModelConfig
from .data import pydoc_text, stdlib_text, windows
from .errors import NpsparseError
from .evaluate import PerplexityResult, perplexity
from .generate import GenerationResult, generate
from .io import open_checkpoint
from .models import build_model
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "LLM", "GenerationResult", "ModelConfig", "NpsparseError", "PerplexityResult", "Tokenizer",
    "build_model", "generate", "load", "load_tokenizer", "open_checkpoint", "perplexity",
    "pydoc_text", "stdlib_text", "windows",
]
