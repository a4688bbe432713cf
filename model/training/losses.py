"""The paper's training loss: Charbonnier plus 0.05 x edge loss, summed over MPRNet's stage outputs.

All tensors are (B, 3, H, W) float. The edge loss compares Laplacian-pyramid band-pass responses
(image minus its Gaussian-smoothed, down-then-up-sampled copy), which weights fine structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0  # 5-tap approximation of a Gaussian


def charbonnier(x: Tensor, y: Tensor, eps: float = 1e-3) -> Tensor:
    """mean(sqrt((x - y)^2 + eps^2)): L1-like, but smooth at zero."""
    return torch.sqrt((x - y) ** 2 + eps * eps).mean()


def _smooth(x: Tensor) -> Tensor:
    k = (_BINOMIAL[:, None] * _BINOMIAL[None, :]).to(x)
    k = k.expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k, groups=x.shape[1])


def laplacian(x: Tensor) -> Tensor:
    """One Laplacian-pyramid level: x minus its blurred, 2x decimated and re-expanded copy."""
    low = _smooth(x)[:, :, ::2, ::2]  # (B, C, ceil(H/2), ceil(W/2))
    # Expand by repetition then smooth: unlike zero insertion, this keeps flat regions exactly
    # flat up to the borders, so only real edges give a response.
    up = F.interpolate(low, size=x.shape[-2:], mode="nearest")
    return x - _smooth(up)


def edge_loss(x: Tensor, y: Tensor, eps: float = 1e-3) -> Tensor:
    return charbonnier(laplacian(x), laplacian(y), eps)


def mprnet_loss(outputs: Sequence[Tensor], target: Tensor, edge_weight: float = 0.05) -> Tensor:
    """Sum over stage outputs of charbonnier + edge_weight * edge loss (a plain loop, then stack-sum)."""
    terms = [charbonnier(o.float(), target) + edge_weight * edge_loss(o.float(), target) for o in outputs]
    return torch.stack(terms).sum()
