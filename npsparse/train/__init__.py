"""Training in NumPy: the backward pass, masked AdamW, and sparse fine-tuning with SquareHead.

- :mod:`.engine`: a LLaMA-family model's loss and gradients on one window (the blocks' own body
  forward, :meth:`~npsparse.models.llama.LlamaBlock.backward` in reverse).
- :mod:`.losses`: cross-entropy and KL through the output head (chunked), SquareHead.
- :mod:`.optim`: AdamW with masks, the learning-rate schedule, clipping by global norm.
- :mod:`.finetune`: the whole run (data, teacher, steps, resume, output folder).
- :mod:`.adapters`: LoRA, PST and SaRA reparametrisations of one weight; :mod:`.adapted` puts
  them on a model's block weights for ``finetune --method lora|pst|sara``.
"""

from .engine import LossWeights, hidden_states, loss_and_grads, parameters
from .finetune import FinetuneSettings, finetune
from .optim import AdamW, AdamWSettings, clip_by_global_norm, learning_rate

__all__ = ["AdamW", "AdamWSettings", "FinetuneSettings", "LossWeights", "clip_by_global_norm",
           "finetune", "hidden_states", "learning_rate", "loss_and_grads", "parameters"]
