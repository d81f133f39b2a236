"""Check that transformers loads an npsparse-pruned folder and gives the same perplexity.

    /work/oracle/bin/python tests/oracle/check_pruned_transformers.py DIR WINDOWS.npy

``WINDOWS.npy`` holds the token windows ``[W, L]`` that ``npsparse eval`` used (save them with
``npsparse.load(DIR).eval_windows(...)``). Prints one JSON line with transformers' perplexity
(float32, eager attention) and its sparsity check of every 2-D block weight.
"""

import json
import math
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    folder, windows_path = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    zeros = total = 0
    for name, param in model.named_parameters():
        if param.ndim == 2 and ".layers." in name:
            zeros += int((param == 0).sum())
            total += param.numel()
    windows = np.load(windows_path)
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            ids = torch.tensor(row, dtype=torch.long)[None]
            logits = model(ids).logits[0].double()
            nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
            nll_sum += float(nll)
            count += len(row) - 1
    print(json.dumps({"folder": folder, "windows": int(windows.shape[0]),
                      "ppl": math.exp(nll_sum / count), "nll": nll_sum / count,
                      "block_linear_sparsity": zeros / total}))


if __name__ == "__main__":
    main()
