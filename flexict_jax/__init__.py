"""flexict_jax: a JAX/Flax (NNX) stack for pretraining FlexiCT CT foundation models."""
import flax as _flax

# Parameters are placed by `jax.jit(..., out_shardings=...)` in the trainer, so Flax's eager per-variable
# sharding (on by default since 0.12, FLIP 4844) stays off: with it on, building a model that carries
# logical axis names outside a mesh context (tests, export, notebooks) raises.
_flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
