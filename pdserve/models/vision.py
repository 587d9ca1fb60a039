"""SmolVLM's vision tower (a SigLIP encoder) and connector: image tiles in, text-space rows out.

A tile [3, S, S] becomes (S / patch)^2 patch embeddings (a strided conv plus learned
positions), runs through pre-LayerNorm transformer layers with bidirectional attention and a
final LayerNorm; the connector then folds each scale x scale square of patches into one row
(pixel shuffle) and projects it to the text model's hidden size. Weights arrive under
Hugging Face names (`model.vision_model.*`, `model.connector.*`) through `load_weights`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.config import VisionConfig

_QKV = {".q_proj.": 0, ".k_proj.": 1, ".v_proj.": 2}


class VisionEmbeddings(nn.Module):
    """Patch conv plus learned position embeddings over a patches_per_side^2 grid."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.per_side = config.patches_per_side
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         config.patch_size, config.patch_size)
        self.position_embedding = nn.Embedding(self.per_side**2, config.hidden_size)

    def position_ids(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """Grid positions of a rows x cols patch tile: fractional coordinates bucketed over
        the grid as transformers does (NaViT). Computed even for a full tile: where 1/n is
        not exact in float32 (27 patches a side) the buckets are not simply 0..n-1."""
        n = self.per_side
        boundaries = torch.arange(1 / n, 1.0, 1 / n, device=device)
        # float32 steps 1/rows, 1/cols: the same rounding as the reference
        h = torch.arange(rows, device=device, dtype=torch.float32) * (1.0 / torch.tensor(rows))
        w = torch.arange(cols, device=device, dtype=torch.float32) * (1.0 / torch.tensor(cols))
        h = torch.bucketize(h.clamp(max=1.0 - 1e-6), boundaries, right=True)
        w = torch.bucketize(w.clamp(max=1.0 - 1e-6), boundaries, right=True)
        return (h[:, None] * n + w[None, :]).reshape(-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] -> [tiles, (H/p)*(W/p), hidden]."""
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        rows, cols = (side // self.patch_size for side in pixel_values.shape[2:])
        return patches + self.position_embedding(self.position_ids(rows, cols, patches.device))


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention over one tile's patches, with a fused qkv."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, d // config.num_heads
        self.qkv_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles, seq, d = x.shape
        qkv = self.qkv_proj(x).view(tiles, seq, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [tiles, heads, seq, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(tiles, seq, d))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_layers))


class VisionTransformer(nn.Module):
    """The SigLIP encoder (HF's `model.vision_model`)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[tiles, side*side, d] -> [tiles, (side/scale)^2, d*scale^2]: each scale x scale square
    of patches becomes one row, in the channel order of the reference."""
    tiles, seq, d = x.shape
    side = int(round(seq**0.5))
    out = side // scale
    # (tile, row-block, row-in-block, col-block, col-in-block, d): a row per (row-block,
    # col-block), its channels ordered row-in-block, col-in-block, d as in the reference
    x = x.view(tiles, out, scale, out, scale, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(tiles, out * out, scale * scale * d)


class Connector(nn.Module):
    """Pixel shuffle then a bias-free projection to the text hidden size (`model.connector`)."""

    def __init__(self, config: VisionConfig, text_hidden_size: int) -> None:
        super().__init__()
        self.scale_factor = config.scale_factor
        self.proj = nn.Linear(config.hidden_size * config.scale_factor**2, text_hidden_size,
                              bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(x, self.scale_factor))


def check_tiles(config: VisionConfig, pixel_values: torch.Tensor) -> int:
    """Rows the tiles [tiles, 3, S, S] give; ValueError if the tower cannot take them."""
    if pixel_values.dim() != 4 or pixel_values.shape[1] != config.num_channels:
        raise ValueError(f"pixel_values must be [tiles, {config.num_channels}, H, W], "
                         f"not {list(pixel_values.shape)}")
    tiles, _, h, w = pixel_values.shape
    unit = config.patch_size * config.scale_factor
    if h != w or h % unit or not 0 < h <= config.image_size:
        raise ValueError(f"image tiles must be square, a multiple of {unit} pixels and at most "
                         f"{config.image_size}; got {h}x{w}")
    return tiles * (h // unit) ** 2


class VisionTower(nn.Module):
    """Encoder and connector: what turns an image's tiles into its prompt rows."""

    def __init__(self, config: VisionConfig, text_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config)
        self.connector = Connector(config, text_hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, S, S] -> [tiles * tokens_per_tile, text hidden], tile after tile."""
        check_tiles(self.config, pixel_values)
        weight = self.connector.proj.weight
        x = self.vision_model(pixel_values.to(device=weight.device, dtype=weight.dtype))
        rows = self.connector(x)
        return rows.reshape(-1, rows.shape[-1])

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load tensors under HF names relative to `model.` (`vision_model.*`,
        `connector.modality_projection.proj.weight`); raises if one is missing."""
        params = dict(self.named_parameters())
        loaded: set[tuple[str, int | None]] = set()
        for hf_name, tensor in named_tensors:
            name, shard = _our_name(hf_name)
            if name not in params:
                raise KeyError(f"unexpected vision weight {hf_name!r}")
            param = params[name]
            tensor = tensor.to(device=param.device, dtype=param.dtype)
            with torch.no_grad():
                if shard is None:
                    param.copy_(tensor)
                else:  # q, k, v stack along the output dimension
                    param.view(3, -1, *param.shape[1:])[shard].copy_(tensor)
            loaded.add((name, shard))
        expected = {(n, s) for n in params
                    for s in ((0, 1, 2) if ".qkv_proj." in n else (None,))}
        missing = sorted(str(key) for key in expected - loaded)
        if missing:
            raise KeyError(f"vision weights missing from the checkpoint: {missing[:5]} ...")


def _our_name(hf_name: str) -> tuple[str, int | None]:
    name = hf_name.replace("connector.modality_projection.proj.", "connector.proj.")
    for fragment, shard in _QKV.items():
        if fragment in name:
            return name.replace(fragment, ".qkv_proj."), shard
    return name, None
