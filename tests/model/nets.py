"""Stand-in networks for tests where exactness or speed matters more than restoration."""

from __future__ import annotations

from torch import Tensor, nn


class IdentityNet(nn.Module):
    """Stands in for MPRNet where exactness matters: returns the input as element 0 of a list."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []  # input shapes, in call order

    def forward(self, x: Tensor) -> list[Tensor]:
        self.calls.append(tuple(x.shape))
        return [x.clone()]
