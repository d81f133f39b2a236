"""A toy architecture, written the way a new one joins npsparse: this module plus one registry line.

"Toy" is a residual MLP language model with no attention: ``x <- x + W_out relu(W_in rmsnorm(x))``
per block, then a final RMSNorm and a head tied to the embedding. tests/test_architectures.py
registers it with ``register_architecture("toy", "toy_arch")`` and runs it through the library.
"""

import numpy as np

from npsparse.config import ModelConfig, check_activation
from npsparse.linear import DenseLinear, as_linear
from npsparse.models.base import CausalLM
from npsparse.models.layers import rms_norm

FAMILY = "toy"
LINEARS = ("mlp.fc_in", "mlp.fc_out")


def expected_shapes(cfg: ModelConfig) -> dict:
    shapes = {"embed.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,)}
    for i in range(cfg.n_layers):
        shapes.update({f"blocks.{i}.norm.weight": (cfg.dim,),
                       f"blocks.{i}.mlp.fc_in.weight": (cfg.ffn_dim, cfg.dim),
                       f"blocks.{i}.mlp.fc_out.weight": (cfg.dim, cfg.ffn_dim)})
    return shapes


class ToyBlock:
    input_groups = (("mlp.fc_in",), ("mlp.fc_out",))

    def __init__(self, cfg: ModelConfig, tensors: dict):
        self.eps = cfg.norm_eps
        self.norm = tensors["norm.weight"]
        self.linears = {name: as_linear(tensors[name + ".weight"]) for name in LINEARS}

    def __call__(self, x, start=0, cache_k=None, cache_v=None):
        h = rms_norm(x, self.norm, self.eps)
        return x + self.linears["mlp.fc_out"](np.maximum(self.linears["mlp.fc_in"](h), 0))

    def state(self) -> dict:
        out = {"norm.weight": self.norm}
        out.update({name + ".weight": layer.to_dense() for name, layer in self.linears.items()})
        return out


class ToyModel(CausalLM):
    def __init__(self, config: ModelConfig, weights, load_blocks: bool = True):
        self.config, self.weights = config, weights
        self.shapes = expected_shapes(config)
        self.embed_tokens = weights.get_checked("embed.weight", self.shapes["embed.weight"])
        self.norm = weights.get_checked("norm.weight", (config.dim,))
        self.head = DenseLinear(self.embed_tokens)
        self.blocks = [self.load_block(i) for i in range(config.n_layers)] if load_blocks else []

    def block_prefix(self, i):
        return f"blocks.{i}"

    def load_block(self, i):
        prefix = self.block_prefix(i) + "."
        return ToyBlock(self.config, {name[len(prefix):]: self.weights.get_checked(name, shape)
                                      for name, shape in self.shapes.items()
                                      if name.startswith(prefix)})

    def embed(self, ids, start):
        return np.array(self.embed_tokens[ids])

    def final(self, x):
        return self.head(rms_norm(x, self.norm, self.config.norm_eps))

    def outer_state(self):
        return {"embed.weight": self.embed_tokens, "norm.weight": self.norm}


Model = ToyModel


def config_from_hf(hf: dict, model_type: str) -> dict:
    dim = hf["hidden_size"]
    return dict(dim=dim, n_layers=hf["num_hidden_layers"], n_heads=1, n_kv_heads=1, head_dim=dim,
                ffn_dim=hf["intermediate_size"], max_position=hf.get("max_position", 256),
                tie_embeddings=True, activation=check_activation(hf.get("act", "relu"), ("relu",)))


def config_to_hf(cfg: ModelConfig) -> dict:
    return {"model_type": "toy", "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
            "intermediate_size": cfg.ffn_dim, "max_position": cfg.max_position, "act": "relu"}
