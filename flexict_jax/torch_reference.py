"""A compact PyTorch reference of the FlexiCT backbone forward (eval mode), for PyTorch users and parity tests.

Self-contained: it imports only torch and numpy (and safetensors to read a safetensors export), so the file can be
copied into any PyTorch project. Module and parameter names are upstream's (`Flexi_CT_Backbone`,
docs/torch_format.md §1.2), so an upstream `.pth` loads into it with `load_state_dict(strict=True)`, and so does our
export. Semantics reproduced (docs/torch_format.md §2): [CLS, storage, patches] tokens; FlexiViT PI-resize of the
patch kernel for a runtime patch size (bicubic-antialias basis in 2-D, trilinear in 3-D, fp32 pinv); axial
RoPE with "separate" coordinates, computed op by op in the dtype of the `periods` buffer (bf16 upstream),
q and k cast to that dtype (prefix rows included) for the rotation; exact-erf GELU; LayerNorm eps 1e-6.
It has no drop path, so `.train()` changes nothing: it is the eval-mode forward.

    from flexict_jax.torch_reference import load_pth, load_safetensors
    model = load_pth("FlexiCT_2D.pth")              # upstream payload {"teacher": {"backbone.*": ...}}
    out = model(x)                                   # x [B, 1, H, W] or [B, 1, D, H, W], z-scored HU
    out["cls_token"], out["patch_tokens"]            # [B, dim], [B, N, dim]; forward_features: all outputs
"""
from __future__ import annotations

import functools
import json
import math
import pathlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:  # only FlexiCTModel's from_pretrained / save_pretrained need it
    from huggingface_hub import PyTorchModelHubMixin
except ImportError:
    PyTorchModelHubMixin = object

LAYER_NORM_EPS = 1e-6
SAFETENSORS_WEIGHTS, SAFETENSORS_CONFIG, MODEL_CARD = "model.safetensors", "config.json", "README.md"
ROPE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@functools.cache
def _pi_resize_pinv(old_size: tuple[int, ...], new_size: tuple[int, ...]) -> torch.Tensor:
    """pinv(R) [∏old, ∏new] in fp32, R = the interpolation of every one-hot basis kernel (cached, as upstream)."""
    n_old = math.prod(old_size)
    basis = torch.eye(n_old, dtype=torch.float32).reshape(n_old, 1, *old_size)
    if len(old_size) == 2:
        resized = F.interpolate(basis, size=new_size, mode="bicubic", antialias=True, align_corners=False)
    else:
        resized = F.interpolate(basis, size=new_size, mode="trilinear", align_corners=False)
    return torch.linalg.pinv(resized.reshape(n_old, -1).T)  # R is [∏new, ∏old]


def pi_resize_kernel(weight: torch.Tensor, new_size: tuple[int, ...]) -> torch.Tensor:
    """FlexiViT PI-resize of a conv kernel [O, I, *old] to [O, I, *new] (docs/torch_format.md §2.1)."""
    old_size, new_size = tuple(weight.shape[2:]), tuple(new_size)
    if old_size == new_size:
        return weight
    pinv = _pi_resize_pinv(old_size, new_size).to(weight.device)
    flat = weight.float().reshape(weight.shape[0], weight.shape[1], -1)
    return (flat @ pinv).reshape(*weight.shape[:2], *new_size).to(weight.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, spatial_dims: int, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.patch_size = (patch_size,) * spatial_dims

    def set_patch_size(self, patch_size: int | tuple[int, ...]) -> None:
        self.patch_size = (patch_size,) * len(self.patch_size) if isinstance(patch_size, int) else tuple(patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        conv = F.conv2d if x.dim() == 4 else F.conv3d
        weight = pi_resize_kernel(self.proj.weight, self.patch_size)
        x = conv(x, weight, self.proj.bias, stride=self.patch_size)
        return x.flatten(2).transpose(1, 2), tuple(x.shape[2:])


class RopeEmbedding(nn.Module):
    """Axial RoPE tables; every op runs in the dtype of the `periods` buffer, as upstream (docs/torch_format.md §2.3)."""

    def __init__(self, head_dim: int, num_axes: int, base: float, dtype: torch.dtype,
                 periods: list[float] | tuple[float, ...] | None = None):
        super().__init__()
        if periods is None:  # upstream's op-by-op computation
            count = head_dim // (2 * num_axes)
            exponent = 2 * torch.arange(count, dtype=dtype) / (head_dim // 2)
            periods = base ** exponent
        self.register_buffer("periods", torch.as_tensor(periods, dtype=dtype), persistent=True)

    def forward(self, grid: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        dtype, device = self.periods.dtype, self.periods.device
        axes = [torch.arange(0.5, n, dtype=dtype, device=device) / n for n in grid]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flatten(0, -2)  # [N, axes]
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return angles.sin(), angles.cos()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotates the last sin.shape[0] tokens of x [B, heads, T, head_dim] in the table dtype; the prefix passes."""
    original = x.dtype
    x = x.to(sin.dtype)  # all of q or k, prefix rows included
    prefix = x.shape[-2] - sin.shape[0]
    head, tail = x[..., :prefix, :], x[..., prefix:, :]
    tail = tail * cos + _rotate_half(tail) * sin
    return torch.cat([head, tail], dim=-2).to(original)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = apply_rope(qkv[0], sin, cos), apply_rope(qkv[1], sin, cos), qkv[2]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="none"), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=LAYER_NORM_EPS), Attention(dim, num_heads)
        self.ls1, self.norm2 = LayerScale(dim), nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp, self.ls2 = Mlp(dim, hidden), LayerScale(dim)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), sin, cos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class FlexiCTBackbone(nn.Module):
    """The upstream `Flexi_CT_Backbone`; defaults are the released 864/16/12 model with 4 storage tokens.
    rope_periods_2d/3d: explicit periods (as a safetensors config.json "architecture" may list); None = computed
    as upstream. Either way `load_state_dict` then loads the file's own `periods` buffers."""

    def __init__(self, *, dim: int = 864, depth: int = 16, num_heads: int = 12, mlp_ratio: float = 4.0,
                 num_storage_tokens: int = 4, in_chans: int = 1, base_patch_size: int = 8, rope_base: float = 100.0,
                 rope_dtype: torch.dtype = torch.bfloat16, rope_periods_2d: list[float] | None = None,
                 rope_periods_3d: list[float] | None = None):
        super().__init__()
        head_dim = dim // num_heads
        self.num_prefix_tokens = 1 + num_storage_tokens
        self.patch_size = base_patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, num_storage_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed_2D = PatchEmbed(2, in_chans, dim, base_patch_size)
        self.patch_embed_3D = PatchEmbed(3, in_chans, dim, base_patch_size)
        self.rope_embed_2D = RopeEmbedding(head_dim, 2, rope_base, rope_dtype, rope_periods_2d)
        self.rope_embed_3D = RopeEmbedding(head_dim, 3, rope_base, rope_dtype, rope_periods_3d)
        self.blocks = nn.ModuleList(Block(dim, num_heads, int(dim * mlp_ratio)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def set_patch_size(self, patch_size: int) -> None:
        """Runtime patch size for both patch embeddings (the kernels are PI-resized on the fly)."""
        self.patch_size = patch_size
        self.patch_embed_2D.set_patch_size(patch_size)
        self.patch_embed_3D.set_patch_size(patch_size)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: [B, C, H, W] or [B, C, D, H, W]. Returns upstream's `forward_features` dict (masks omitted)."""
        two_d = x.dim() == 4
        tokens, grid = (self.patch_embed_2D if two_d else self.patch_embed_3D)(x)
        batch = tokens.shape[0]
        # `+ 0 * mask_token` as upstream: a non-finite mask token poisons the output there too (§2.2).
        cls = self.cls_token.expand(batch, -1, -1) + 0 * self.mask_token
        x = torch.cat([cls, self.storage_tokens.expand(batch, -1, -1), tokens], dim=1)
        sin, cos = (self.rope_embed_2D if two_d else self.rope_embed_3D)(grid)
        for block in self.blocks:
            x = block(x, sin, cos)
        normed = self.norm(x)
        prefix = self.num_prefix_tokens
        return {"x_norm_clstoken": normed[:, 0], "x_storage_tokens": normed[:, 1:prefix],
                "x_norm_patchtokens": normed[:, prefix:], "x_prenorm": x}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The `Flexi_CT_2D` / `Flexi_CT_3D` wrapper output."""
        out = self.forward_features(x)
        return {"cls_token": out["x_norm_clstoken"], "patch_tokens": out["x_norm_patchtokens"]}


def backbone_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone state_dict of a FlexiCT `.pth` payload, selected as the upstream loaders do (§1.4, §3.2):
    `teacher` → `backbone.*` keys without heads; VLM `model` → `vision_model.*` keys."""
    if "teacher" in checkpoint:
        return {k[len("backbone."):]: v for k, v in checkpoint["teacher"].items()
                if k.startswith("backbone.") and "ibot" not in k and "dino_head" not in k}
    if "model" in checkpoint:
        return {k[len("vision_model."):]: v for k, v in checkpoint["model"].items() if k.startswith("vision_model.")}
    raise KeyError(f"not a FlexiCT checkpoint: no 'teacher' or 'model' entry (top-level keys {sorted(checkpoint)})")


def load_pth(path: str | pathlib.Path, *, weights_only: bool = True, **architecture: Any) -> FlexiCTBackbone:
    """A FlexiCT `.pth` (released or exported) as an eval-mode backbone.

    architecture: FlexiCTBackbone arguments for files of another size (`--allow-custom-architecture`).
    weights_only: False unpickles arbitrary objects, i.e. runs code from the file: trusted files only.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    model = FlexiCTBackbone(**architecture)
    model.load_state_dict(backbone_state_dict(checkpoint), strict=True)
    return model.eval()


def load_safetensors(directory: str | pathlib.Path, model_class: type[FlexiCTBackbone] = FlexiCTBackbone
                     ) -> tuple[FlexiCTBackbone, dict[str, Any]]:
    """A `--format=safetensors` export (model.safetensors + config.json) as (eval-mode backbone, config);
    for a VLM export, its vision backbone."""
    from safetensors.torch import load_file

    directory = pathlib.Path(directory)
    config = json.loads((directory / SAFETENSORS_CONFIG).read_text())
    model = model_class(**config["architecture"], rope_dtype=ROPE_DTYPES[config["rope"]["dtype"]])
    state = load_file(directory / SAFETENSORS_WEIGHTS)
    if config["kind"] == "vlm":  # the vision tower of a VLM export; the text tower is a Hugging Face Qwen3Model
        state = backbone_state_dict({"model": state})
    model.load_state_dict(state, strict=True)
    return model.eval(), config


class FlexiCTModel(FlexiCTBackbone, PyTorchModelHubMixin):
    """The backbone with Hugging Face's `from_pretrained` / `save_pretrained` (needs `huggingface_hub`):

        model = FlexiCTModel.from_pretrained("demo_3d/")   # a --format=safetensors export; strict load, eval mode
        model.save_pretrained("copy/")                     # model.safetensors + config.json + README.md again

    Local folders only: a name that is not a folder is refused, nothing is downloaded. `model.config` is the
    export's config.json (architecture, preprocessing, model_type), `model.model_card` its README.md. A VLM
    export loads (and saves) its vision backbone as a 3d model."""

    config: dict[str, Any]
    model_card: str

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | pathlib.Path, **kwargs: Any) -> FlexiCTModel:
        directory = pathlib.Path(pretrained_model_name_or_path)
        if not (directory / SAFETENSORS_CONFIG).is_file():
            raise FileNotFoundError(f"{directory}: no {SAFETENSORS_CONFIG}; from_pretrained reads a local "
                                    f"--format=safetensors export folder (nothing is downloaded)")
        return super().from_pretrained(directory, local_files_only=True, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **_: Any) -> FlexiCTModel:
        # The hub mixin passes config.json entries that share a name with an __init__ argument; the
        # architecture is read from config.json here instead.
        model, config = load_safetensors(model_id, model_class=cls)
        card = pathlib.Path(model_id) / MODEL_CARD
        model.config, model.model_card = config, card.read_text() if card.is_file() else ""
        return model

    def _save_pretrained(self, save_directory: pathlib.Path) -> None:
        from safetensors.torch import save_file

        config = dict(self.config)
        if config["kind"] == "vlm":  # only the vision backbone was loaded
            config.pop("vision_language", None)
            config.update(kind="3d", model_type="flexict")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(save_directory / SAFETENSORS_WEIGHTS),
                  metadata={"format": "pt"})
        (save_directory / SAFETENSORS_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        if self.model_card:
            (save_directory / MODEL_CARD).write_text(self.model_card)


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A numpy array (bf16 from ml_dtypes included) as a contiguous, writable tensor of the same dtype."""
    if array.dtype.name == "bfloat16":  # ml_dtypes: reinterpret the 16-bit payload
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True, order="C"))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as numpy; bf16 and fp16 become float32 (exact)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor).numpy()
