"""The released MPRNet configurations, as data, and reading a configuration back from tensor shapes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# Task -> the paper's task name and the hyperparameters of the authors' released checkpoint.
# All three share num_cab 8, kernel 3, reduction 4, no bias; they differ only in widths.
_SHARED = dict(in_c=3, out_c=3, num_cab=8, kernel_size=3, reduction=4, bias=False)
VARIANTS: dict[str, dict[str, Any]] = {
    "deblur": dict(n_feat=96, scale_unetfeats=48, scale_orsnetfeats=32, **_SHARED),  # GoPro
    "denoise": dict(n_feat=80, scale_unetfeats=48, scale_orsnetfeats=32, **_SHARED),  # SIDD
    "derain": dict(n_feat=40, scale_unetfeats=20, scale_orsnetfeats=16, **_SHARED),  # Rain13K
}
PAPER_TASKS = {"deblur": "Deblurring", "denoise": "Denoising", "derain": "Deraining"}
TASKS = tuple(VARIANTS)

# A tiny configuration for tests and smoke runs (a few thousand parameters).
TINY: dict[str, Any] = dict(
    in_c=3, out_c=3, n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1, kernel_size=3, reduction=4, bias=False
)


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read MPRNet hyperparameters from tensor shapes, so any width loads without being told which.

    Expects keys without wrapper prefixes. Raises KeyError naming the first missing key.
    """
    shallow = sd["shallow_feat1.0.weight"]  # (n_feat, in_c, k, k)
    n_feat, in_c, kernel_size = shallow.shape[0], shallow.shape[1], shallow.shape[2]
    squeeze = sd["shallow_feat1.1.CA.conv_du.0.weight"]  # (n_feat // reduction, n_feat, 1, 1)
    tail = sd["tail.weight"]  # (out_c, n_feat + s_ors, k, k)
    level2 = sd["stage1_encoder.encoder_level2.0.body.0.weight"]  # (n_feat + s_unet, ...)
    num_cab = 0
    while f"stage3_orsnet.orb1.body.{num_cab}.body.0.weight" in sd:
        num_cab += 1
    return dict(
        in_c=int(in_c),
        out_c=int(tail.shape[0]),
        n_feat=int(n_feat),
        scale_unetfeats=int(level2.shape[0] - n_feat),
        scale_orsnetfeats=int(tail.shape[1] - n_feat),
        num_cab=num_cab,
        kernel_size=int(kernel_size),
        reduction=int(n_feat // squeeze.shape[0]),
        bias="shallow_feat1.0.bias" in sd,
    )
