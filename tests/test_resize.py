"""flexict_jax.resize against torch 2.13 `F.interpolate(align_corners=False)`."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from flexict_jax.resize import resize_2d, resize_matrix

torch = pytest.importorskip("torch")
F = torch.nn.functional

SIZES = (2, 3, 5, 8, 16, 17)
TORCH_2D_MODE = {"cubic": "bicubic", "linear": "bilinear"}


def _torch_matrix_2d(in_size: int, out_size: int, method: str, antialias: bool, dtype) -> np.ndarray:
    # Resizing only the rows of an identity image yields R itself. (A [n, 1] probe would be simpler, but
    # torch's antialiased kernels return wrong values when the untouched axis has size 1.)
    eye = torch.eye(in_size, dtype=dtype)[None, None]
    out = F.interpolate(eye, size=(out_size, in_size), mode=TORCH_2D_MODE[method], antialias=antialias,
                        align_corners=False)
    return out[0, 0].double().numpy()


@pytest.mark.parametrize("method,antialias", [("cubic", True), ("cubic", False), ("linear", True),
                                              ("linear", False)])
def test_matrix_matches_torch_2d(method, antialias):
    for in_size, out_size in itertools.product(SIZES, SIZES + (31, 40)):
        ours = resize_matrix(in_size, out_size, method, antialias)
        assert ours.shape == (out_size, in_size) and ours.dtype == np.float64
        # torch in float64 runs the same arithmetic; in float32 it differs only by rounding of the scale.
        np.testing.assert_allclose(ours, _torch_matrix_2d(in_size, out_size, method, antialias, torch.float64),
                                   atol=1e-12, err_msg=f"{in_size}->{out_size}")
        np.testing.assert_allclose(ours, _torch_matrix_2d(in_size, out_size, method, antialias, torch.float32),
                                   atol=3e-6, err_msg=f"{in_size}->{out_size} float32")


def test_antialias_cubic_is_not_the_plain_cubic():
    # The two torch paths use different kernels (a=-0.5 vs a=-0.75) even when upsampling.
    assert np.abs(resize_matrix(8, 16, "cubic", True) - resize_matrix(8, 16, "cubic", False)).max() > 1e-2


def test_linear_1d_matches_torch():
    for in_size, out_size in itertools.product(SIZES, SIZES):
        eye = torch.eye(in_size, dtype=torch.float64)
        theirs = F.interpolate(eye[:, None, :], size=(out_size,), mode="linear", align_corners=False)[:, 0].T
        np.testing.assert_allclose(resize_matrix(in_size, out_size, "linear", False), theirs.numpy(), atol=1e-12)


@pytest.mark.parametrize("old,new", [((8, 8, 8), (16, 16, 16)), ((4, 6, 5), (3, 9, 5)), ((8, 8, 8), (4, 12, 8))])
def test_trilinear_3d_is_the_kron_product(old, new):
    """The 3-D PI-resize operator (docs/recipe.md §2.3) built from one-hot basis kernels, as upstream does."""
    basis = torch.eye(int(np.prod(old)), dtype=torch.float64).reshape(-1, 1, *old)
    theirs = F.interpolate(basis, size=new, mode="trilinear", align_corners=False).reshape(len(basis), -1).T
    ours = np.kron(np.kron(resize_matrix(old[0], new[0], "linear", False),
                           resize_matrix(old[1], new[1], "linear", False)),
                   resize_matrix(old[2], new[2], "linear", False))
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-12)


@pytest.mark.parametrize("new", [16, 4, 12])
def test_bicubic_antialias_2d_basis_is_the_kron_product(new):
    """The 2-D PI-resize operator: one-hot 8x8 basis kernels through antialiased bicubic (docs/recipe.md §2.3)."""
    basis = torch.eye(64, dtype=torch.float32).reshape(64, 1, 8, 8)
    theirs = F.interpolate(basis, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    r = resize_matrix(8, new, "cubic", True)
    np.testing.assert_allclose(np.kron(r, r), theirs.reshape(64, -1).T.double().numpy(), atol=1e-6)


@pytest.mark.parametrize("method", ["cubic", "linear"])
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("out_hw", [(20, 7), (5, 30), (13, 11)])
def test_resize_2d_matches_torch_batched(method, antialias, out_hw):
    image = np.random.default_rng(0).normal(size=(2, 3, 13, 11))
    theirs = F.interpolate(torch.from_numpy(image), size=out_hw, mode=TORCH_2D_MODE[method], antialias=antialias,
                           align_corners=False).numpy()
    ours = resize_2d(image, out_hw, method, antialias)
    assert ours.shape == (2, 3) + out_hw and ours.dtype == np.float64
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_resize_2d_keeps_float32_and_promotes_integers():
    image = np.arange(48, dtype=np.int16).reshape(6, 8)
    assert resize_2d(image.astype(np.float32), (3, 4)).dtype == np.float32
    out = resize_2d(image, (12, 16), "cubic", antialias=False)
    assert out.dtype == np.float64
    # Fractional values survive: an integer result would have been truncated.
    assert not np.allclose(out, np.round(out))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="method"):
        resize_matrix(8, 16, "nearest")
    with pytest.raises(ValueError, match="positive"):
        resize_matrix(0, 16)
    with pytest.raises(ValueError, match="rank"):
        resize_2d(np.zeros(5), (3, 3))
