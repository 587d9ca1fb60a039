"""Random weights for presets, drawn directly on the model's device and dtype."""

from __future__ import annotations

import torch
from torch import nn

from pdserve.models.layers import RMSNorm


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Normal(0, std) matrices, unit norms, zero biases: activations stay finite in bf16."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, (RMSNorm, nn.LayerNorm))}
    for name, param in model.named_parameters():
        if id(param) in norms:
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)
