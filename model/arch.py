"""MPRNet, written from the paper (Zamir et al., CVPR 2021, "Multi-Stage Progressive Image Restoration").

Three stages on one image:

* stage 1 sees the four quarters of the image, encodes each with a shared U-Net encoder, joins
  left/right encodings per half and decodes each half; a supervised attention module (SAM)
  produces the stage-1 image and attention-weighted features;
* stage 2 sees the top and bottom halves, fuses shallow features with the stage-1 SAM features,
  encodes each half with cross-stage feature fusion (CSFF), joins the halves and decodes the
  whole image; a second SAM produces the stage-2 image and features;
* stage 3 works at full resolution without down-sampling (ORSNet), with the stage-2 encoder and
  decoder features injected after each of its three blocks.

The module names and parameter shapes follow the released checkpoints exactly, so the authors'
files load strictly. One PReLU (a single learnable scalar) is shared by every CAB in the network;
it therefore appears in the state dict once per CAB under ``...body.1.weight``.

Contract: input ``(B, in_c, H, W)`` float in [0, 1] with H and W multiples of 8 (``MULTIPLE_OF``);
output ``[stage3, stage2, stage1]`` images of the same shape; element 0 is the restoration.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MULTIPLE_OF = 8  # two halvings per quarter patch: H/2 and W/2 must be divisible by 4


def conv(c_in: int, c_out: int, kernel_size: int, bias: bool = False) -> nn.Conv2d:
    """'Same' convolution (odd kernel, stride 1)."""
    return nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=bias)


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: global mean -> 1x1 down by `reduction` -> ReLU -> 1x1 up -> sigmoid."""

    def __init__(self, channels: int, reduction: int, bias: bool) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=bias),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv_du(x.mean(dim=(2, 3), keepdim=True))


class CAB(nn.Module):
    """Channel attention block: conv -> act -> conv -> channel attention, plus the input."""

    def __init__(self, channels: int, kernel_size: int, reduction: int, bias: bool, act: nn.Module) -> None:
        super().__init__()
        # `act` is the network-wide shared PReLU; registering it here puts it in the state dict
        # under every CAB's `body.1.weight`, as the released checkpoints have it.
        self.body = nn.Sequential(conv(channels, channels, kernel_size, bias), act, conv(channels, channels, kernel_size, bias))
        self.CA = ChannelAttention(channels, reduction, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.CA(self.body(x)) + x


def _resample(scale: float, c_in: int, c_out: int) -> nn.Sequential:
    """Bilinear resize by `scale`, then a 1x1 conv from `c_in` to `c_out` channels (weights at ``.1``)."""
    return nn.Sequential(
        nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False),
        nn.Conv2d(c_in, c_out, 1, bias=False),
    )


class Down(nn.Module):
    """Encoder down-sampling: half resolution, `s` more channels."""

    def __init__(self, channels: int, s: int) -> None:
        super().__init__()
        self.down = _resample(0.5, channels, channels + s)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(x)


class Up(nn.Module):
    """Double resolution, `s` fewer channels (``channels + s`` -> ``channels``)."""

    def __init__(self, channels: int, s: int) -> None:
        super().__init__()
        self.up = _resample(2.0, channels + s, channels)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = self.up(x)
        return x if skip is None else x + skip


class SAM(nn.Module):
    """Supervised attention module: emits a stage image and attention-reweighted features."""

    def __init__(self, n_feat: int, out_c: int, bias: bool) -> None:
        super().__init__()
        self.conv1 = conv(n_feat, n_feat, 1, bias)
        self.conv2 = conv(n_feat, out_c, 1, bias)
        self.conv3 = conv(out_c, n_feat, 1, bias)

    def forward(self, x: Tensor, x_img: Tensor) -> tuple[Tensor, Tensor]:
        img = self.conv2(x) + x_img
        return self.conv1(x) * torch.sigmoid(self.conv3(img)) + x, img


def _cabs(n: int, channels: int, kernel_size: int, reduction: int, bias: bool, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(*(CAB(channels, kernel_size, reduction, bias, act) for _ in range(n)))


class Encoder(nn.Module):
    """Three levels of two CABs (widths n, n+s, n+2s); optional cross-stage feature fusion."""

    def __init__(self, n: int, s: int, kernel_size: int, reduction: int, bias: bool, act: nn.Module, csff: bool) -> None:
        super().__init__()
        widths = (n, n + s, n + 2 * s)
        for i, w in enumerate(widths, start=1):
            setattr(self, f"encoder_level{i}", _cabs(2, w, kernel_size, reduction, bias, act))
        self.down12 = Down(n, s)
        self.down23 = Down(n + s, s)
        self.csff = csff
        if csff:
            for i, w in enumerate(widths, start=1):
                setattr(self, f"csff_enc{i}", conv(w, w, 1, bias))
                setattr(self, f"csff_dec{i}", conv(w, w, 1, bias))

    def _fuse(self, i: int, x: Tensor, enc: list[Tensor] | None, dec: list[Tensor] | None) -> Tensor:
        if not self.csff:
            return x
        assert enc is not None and dec is not None, "stage-2 encoder needs stage-1 features"
        return x + getattr(self, f"csff_enc{i}")(enc[i - 1]) + getattr(self, f"csff_dec{i}")(dec[i - 1])

    def forward(self, x: Tensor, enc: list[Tensor] | None = None, dec: list[Tensor] | None = None) -> list[Tensor]:
        e1 = self._fuse(1, self.encoder_level1(x), enc, dec)  # (B, n, H, W)
        e2 = self._fuse(2, self.encoder_level2(self.down12(e1)), enc, dec)  # (B, n+s, H/2, W/2)
        e3 = self._fuse(3, self.encoder_level3(self.down23(e2)), enc, dec)  # (B, n+2s, H/4, W/4)
        return [e1, e2, e3]


class Decoder(nn.Module):
    """Mirror of the encoder; skips pass through a CAB and are added after up-sampling."""

    def __init__(self, n: int, s: int, kernel_size: int, reduction: int, bias: bool, act: nn.Module) -> None:
        super().__init__()
        for i, w in enumerate((n, n + s, n + 2 * s), start=1):
            setattr(self, f"decoder_level{i}", _cabs(2, w, kernel_size, reduction, bias, act))
        self.skip_attn1 = CAB(n, kernel_size, reduction, bias, act)
        self.skip_attn2 = CAB(n + s, kernel_size, reduction, bias, act)
        self.up21 = Up(n, s)
        self.up32 = Up(n + s, s)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        e1, e2, e3 = feats
        d3 = self.decoder_level3(e3)
        d2 = self.decoder_level2(self.up32(d3, self.skip_attn2(e2)))
        d1 = self.decoder_level1(self.up21(d2, self.skip_attn1(e1)))
        return [d1, d2, d3]


class ORB(nn.Module):
    """Original-resolution block: `num_cab` CABs then a conv, plus the input."""

    def __init__(self, channels: int, kernel_size: int, reduction: int, bias: bool, act: nn.Module, num_cab: int) -> None:
        super().__init__()
        cabs = [CAB(channels, kernel_size, reduction, bias, act) for _ in range(num_cab)]
        # The release's ORB ends in a conv without bias even when `bias` is set: kept, so that
        # checkpoints of bias=True configurations load too.
        self.body = nn.Sequential(*cabs, conv(channels, channels, kernel_size, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + x


class ORSNet(nn.Module):
    """Stage 3: three ORBs at full resolution; U-Net features of stage 2 injected after each."""

    def __init__(self, n: int, s_unet: int, s_ors: int, kernel_size: int, reduction: int, bias: bool,
                 act: nn.Module, num_cab: int) -> None:
        super().__init__()
        w = n + s_ors
        for i in (1, 2, 3):
            setattr(self, f"orb{i}", ORB(w, kernel_size, reduction, bias, act, num_cab))
            setattr(self, f"conv_enc{i}", conv(n, w, 1, bias))
            setattr(self, f"conv_dec{i}", conv(n, w, 1, bias))
        # level-2 features need one up-sampling, level-3 features two, to reach full resolution
        self.up_enc1 = Up(n, s_unet)
        self.up_dec1 = Up(n, s_unet)
        self.up_enc2 = nn.Sequential(Up(n + s_unet, s_unet), Up(n, s_unet))
        self.up_dec2 = nn.Sequential(Up(n + s_unet, s_unet), Up(n, s_unet))

    def forward(self, x: Tensor, enc: list[Tensor], dec: list[Tensor]) -> Tensor:
        x = self.orb1(x) + self.conv_enc1(enc[0]) + self.conv_dec1(dec[0])
        x = self.orb2(x) + self.conv_enc2(self.up_enc1(enc[1])) + self.conv_dec2(self.up_dec1(dec[1]))
        x = self.orb3(x) + self.conv_enc3(self.up_enc2(enc[2])) + self.conv_dec3(self.up_dec2(dec[2]))
        return x


def _join(parts: Tensor, groups: int, dim: int) -> Tensor:
    """Split the batch into `groups` equal blocks and concatenate them along `dim`: (g*N, ...) -> (N, ...)."""
    return torch.cat(parts.chunk(groups, dim=0), dim=dim)


class MPRNet(nn.Module):
    """Multi-stage progressive restoration network (hyperparameters named as in the release)."""

    def __init__(
        self,
        *,
        in_c: int = 3,
        out_c: int = 3,
        n_feat: int = 40,
        scale_unetfeats: int = 20,
        scale_orsnetfeats: int = 16,
        num_cab: int = 8,
        kernel_size: int = 3,
        reduction: int = 4,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if n_feat % reduction or (n_feat + scale_orsnetfeats) % reduction or scale_unetfeats % reduction:
            raise ValueError(f"channel widths must be divisible by reduction={reduction}")
        self.hparams = dict(
            in_c=in_c, out_c=out_c, n_feat=n_feat, scale_unetfeats=scale_unetfeats,
            scale_orsnetfeats=scale_orsnetfeats, num_cab=num_cab, kernel_size=kernel_size,
            reduction=reduction, bias=bias,
        )
        n, s, k, r = n_feat, scale_unetfeats, kernel_size, reduction
        act = nn.PReLU()  # the single PReLU shared by every CAB
        for i in (1, 2, 3):
            setattr(self, f"shallow_feat{i}", nn.Sequential(conv(in_c, n, k, bias), CAB(n, k, r, bias, act)))
        self.stage1_encoder = Encoder(n, s, k, r, bias, act, csff=False)
        self.stage1_decoder = Decoder(n, s, k, r, bias, act)
        self.stage2_encoder = Encoder(n, s, k, r, bias, act, csff=True)
        self.stage2_decoder = Decoder(n, s, k, r, bias, act)
        self.stage3_orsnet = ORSNet(n, s, scale_orsnetfeats, k, r, bias, act, num_cab)
        self.sam12 = SAM(n, out_c, bias)
        self.sam23 = SAM(n, out_c, bias)
        self.concat12 = conv(2 * n, n, k, bias)
        self.concat23 = conv(2 * n, n + scale_orsnetfeats, k, bias)
        self.tail = conv(n + scale_orsnetfeats, out_c, k, bias)

    def forward(self, x3_img: Tensor) -> list[Tensor]:
        B, _, H, W = x3_img.shape
        if H % MULTIPLE_OF or W % MULTIPLE_OF:
            raise ValueError(f"MPRNet needs H and W to be multiples of {MULTIPLE_OF}, got {H}x{W}; pad first")
        h, w = H // 2, W // 2

        # Halves stacked on the batch axis: rows [top; bottom], each (B, C, H/2, W).
        x2_img = torch.cat((x3_img[:, :, :h], x3_img[:, :, h:]), dim=0)  # (2B, C, H/2, W)
        # Quarters stacked as [left-top; left-bottom; right-top; right-bottom] so that joining
        # left and right along width is one cat of the two batch halves.
        x1_img = torch.cat((x2_img[..., :w], x2_img[..., w:]), dim=0)  # (4B, C, H/2, W/2)

        # ---- Stage 1: the four quarters as one batch ----
        feat1 = self.stage1_encoder(self.shallow_feat1(x1_img))  # 3 levels of (4B, ...)
        feat1 = [_join(f, 2, dim=3) for f in feat1]  # left|right -> (2B, ..., H/2/2^l, W/2^l)
        res1 = self.stage1_decoder(feat1)  # per half, (2B, ...)
        x2_samfeats, stage1_img = self.sam12(res1[0], x2_img)  # (2B, n, H/2, W), (2B, C, H/2, W)

        # ---- Stage 2: the two halves as one batch ----
        x2 = self.concat12(torch.cat((self.shallow_feat2(x2_img), x2_samfeats), dim=1))
        feat2 = self.stage2_encoder(x2, feat1, res1)  # (2B, ...)
        feat2 = [_join(f, 2, dim=2) for f in feat2]  # top/bottom -> (B, ..., H/2^l, W/2^l)
        res2 = self.stage2_decoder(feat2)
        x3_samfeats, stage2_img = self.sam23(res2[0], x3_img)

        # ---- Stage 3: full resolution ----
        x3 = self.concat23(torch.cat((self.shallow_feat3(x3_img), x3_samfeats), dim=1))
        x3 = self.stage3_orsnet(x3, feat2, res2)
        stage3_img = self.tail(x3) + x3_img
        return [stage3_img, stage2_img, _join(stage1_img, 2, dim=2)]
