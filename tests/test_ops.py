"""l2_normalize: torch F.normalize values, finite gradients where the norm is zero or underflows."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from flexict_jax.ops import l2_normalize


def test_matches_torch_normalize():
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    x[1] = 0.0
    x[2] *= 1e-14  # below eps: divided by eps, not by its norm, as torch does
    expected = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1).numpy()
    np.testing.assert_allclose(np.asarray(l2_normalize(jnp.asarray(x))), expected, rtol=1e-6, atol=1e-7)


def test_gradient_is_finite_at_zero_and_on_underflow():
    # 1e-25 squares to 0 in float32: jnp.linalg.norm's gradient would be 0/0 there (the bug this guards).
    for x in (jnp.zeros(4), jnp.full(4, 1e-25, jnp.float32)):
        grad = jax.grad(lambda v: jnp.sum(l2_normalize(v) * jnp.arange(4.0)))(x)
        assert np.all(np.isfinite(np.asarray(grad)))
