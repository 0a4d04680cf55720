"""DINO / iBOT projection head (docs/recipe.md §2.4): the two heads are separate instances of this one class."""
from __future__ import annotations

import jax
from flax import nnx

from flexict_jax import ops
from flexict_jax.models.layers import gelu, linear


class DINOHead(nnx.Module):
    """3-layer GELU MLP -> L2-normalised bottleneck -> prototype logits (no bias, no weight norm).

    Parameters: mlp.fc1, mlp.fc2, mlp.fc3 (kernel, bias) and last_layer.kernel; trunc-normal(0.02), zero bias.
    """

    def __init__(self, in_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_prototypes: int = 65536, last_layer_init_std: float = 0.02, rngs: nnx.Rngs):
        self.mlp = _HeadMlp(in_dim, hidden_dim, bottleneck_dim, rngs=rngs)
        # 0.02 is the recipe's; a larger value (prototype vectors of norm ~1, as DINOv2's weight-normalised layer)
        # gives from-scratch runs sharp teacher targets at once, which short CPU demos need.
        self.last_layer = linear(bottleneck_dim, num_prototypes, ("bottleneck", "proto"), use_bias=False,
                                 init_std=last_layer_init_std, rngs=rngs)

    def bottleneck(self, x: jax.Array) -> jax.Array:
        """The L2-normalised bottleneck features [..., bottleneck_dim]."""
        return ops.l2_normalize(self.mlp(x))

    def prototypes(self, z: jax.Array) -> jax.Array:
        """Prototype logits [..., num_prototypes] of normalised bottleneck features."""
        return self.last_layer(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.prototypes(self.bottleneck(x))


class _HeadMlp(nnx.Module):
    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, *, rngs: nnx.Rngs):
        self.fc1 = linear(in_dim, hidden_dim, ("embed", "head_mlp"), rngs=rngs)
        self.fc2 = linear(hidden_dim, hidden_dim, ("head_mlp", "head_mlp2"), rngs=rngs)
        self.fc3 = linear(hidden_dim, bottleneck_dim, ("head_mlp2", "bottleneck"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = gelu(self.fc1(x))
        x = gelu(self.fc2(x))
        return self.fc3(x)
