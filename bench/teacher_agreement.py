"""How close models are to the dense SmolLM2 on eval windows.

    python bench/teacher_agreement.py WINDOWS MODEL [MODEL ...]

For each MODEL (a pruned or fine-tuned folder), on the first WINDOWS x 512 eval tokens: the mean
per-token KL(teacher || model) of the next-token distributions, the share of positions where both
pick the same top-1 token, and the SquareHead distance (sum over blocks of
||h_model - h_teacher||^2 / ||h_teacher||^2 on block outputs). Perplexity says how well a model fits
the text; these say how close it stays to the dense model it came from.
"""

import json
import sys

import numpy as np

import npsparse


def block_outputs_and_logits(model, ids):
    x = model.embed(ids, 0)
    outs = []
    for block in model.blocks:
        x = block(x, 0)
        outs.append(x)
    return outs, model.final(x)


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


windows = int(sys.argv[1])
teacher = npsparse.load("smollm2")
ids = npsparse.windows(teacher.encode(npsparse.pydoc_text("eval")), 512, windows)
cache = [block_outputs_and_logits(teacher.model, w) for w in ids]
for path in sys.argv[2:]:
    student = npsparse.load(path)
    kl, agree, sq = [], [], []
    for w, (t_outs, t_logits) in zip(ids, cache):
        s_outs, s_logits = block_outputs_and_logits(student.model, w)
        lt, ls = log_softmax(t_logits.astype(np.float64)), log_softmax(s_logits.astype(np.float64))
        kl.append(np.mean(np.sum(np.exp(lt) * (lt - ls), axis=-1)))
        agree.append(np.mean(t_logits.argmax(-1) == s_logits.argmax(-1)))
        sq.append(sum(float(np.sum((s - t) ** 2) / np.sum(t ** 2)) for s, t in zip(s_outs, t_outs)))
    print(json.dumps({"model": path, "windows": windows,
                      "kl_teacher_student": round(float(np.mean(kl)), 4),
                      "top1_agreement": round(float(np.mean(agree)), 4),
                      "squarehead_sum": round(float(np.mean(sq)), 4)}))
