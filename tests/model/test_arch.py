"""The architecture: same function as an independent implementation, same state dict as the release."""

from __future__ import annotations

import pytest
import torch

from bench.reference import reference_mprnet
from model.arch import CAB, MPRNet
from model.variants import TINY, VARIANTS

TOL = 1e-5  # max abs difference allowed between us and the reference, fp32 on the CPU

# Tiny configurations that exercise every hyperparameter the release leaves fixed.
TINY_CONFIGS = {
    "tiny": TINY,
    "tiny-bias-k5": dict(TINY, n_feat=12, scale_unetfeats=8, scale_orsnetfeats=4, num_cab=2, kernel_size=5, bias=True),
    "tiny-r8": dict(TINY, n_feat=16, scale_unetfeats=8, scale_orsnetfeats=8, num_cab=3, reduction=8),
}


def _pair(hparams: dict, seed: int = 0) -> tuple[MPRNet, torch.nn.Module]:
    """Ours with default-init random weights, and the reference loaded strictly with the same weights."""
    torch.manual_seed(seed)
    ours = MPRNet(**hparams).eval()
    ref = reference_mprnet(**hparams).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


@torch.inference_mode()
def _max_abs_diffs(ours: MPRNet, ref: torch.nn.Module, x: torch.Tensor) -> list[float]:
    a, b = ours(x), ref(x)
    assert len(a) == len(b) == 3
    for ya, yb in zip(a, b, strict=True):
        assert ya.shape == yb.shape == x.shape
        assert torch.isfinite(ya).all()
    return [(ya - yb).abs().max().item() for ya, yb in zip(a, b, strict=True)]


@pytest.fixture(scope="module")
def released_pairs() -> dict:
    return {}  # variant -> (ours, ref), built on first use: a deblur pair is 40 M parameters


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(16, 16), (32, 24)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_released_configurations(variant, size, batch, released_pairs):
    if variant not in released_pairs:
        released_pairs[variant] = _pair(VARIANTS[variant])
    ours, ref = released_pairs[variant]
    x = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(batch * 100 + size[1]))
    diffs = _max_abs_diffs(ours, ref, x)
    print(f"\nparity {variant} {size[0]}x{size[1]} batch {batch}: max abs diff [stage3, stage2, stage1] = {diffs}")
    assert max(diffs) <= TOL


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(8, 8), (16, 40), (40, 24)])
@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_parity_tiny_configurations(name, size, batch):
    ours, ref = _pair(TINY_CONFIGS[name], seed=len(name))
    x = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(size[0] * size[1] + batch))
    diffs = _max_abs_diffs(ours, ref, x)
    print(f"\nparity {name} {size[0]}x{size[1]} batch {batch}: max abs diff = {diffs}")
    assert max(diffs) <= TOL


def test_parity_check_detects_a_changed_weight():
    """Negative control: the comparison above would notice one weight being different."""
    ours, ref = _pair(TINY)
    with torch.no_grad():
        ref.stage3_orsnet.orb2.body[0].body[0].weight[0, 0, 1, 1] += 0.05
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    diffs = _max_abs_diffs(ours, ref, x)
    assert diffs[0] > TOL  # stage 3 changed
    assert max(diffs[1:]) <= TOL  # stages 1 and 2 do not use ORSNet


def test_quarters_are_processed_independently_in_stage1():
    """Stage 1 sees four separate patches: changing one quarter leaves the other quarters' stage-1 image alone."""
    torch.manual_seed(0)
    model = MPRNet(**TINY).eval()
    x = torch.rand(1, 3, 16, 16)
    y = x.clone()
    y[:, :, :8, :8] = torch.rand(1, 3, 8, 8)  # top-left quarter only
    with torch.inference_mode():
        sx, sy = model(x)[2], model(y)[2]
    assert not torch.equal(sx[..., :8, :8], sy[..., :8, :8])
    # the top-right quarter is joined with the top-left one in the decoder, so only the bottom half is untouched
    assert torch.equal(sx[..., 8:, :], sy[..., 8:, :])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_matches_release(variant, reference_state_dicts):
    entry = reference_state_dicts[variant]
    assert entry["hyperparameters"] == VARIANTS[variant]
    model = MPRNet(**VARIANTS[variant])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    released = {k: shape for k, shape in entry["state_dict"]}
    assert len(released) == len(entry["state_dict"]) == 316
    assert sorted(set(ours) - set(released)) == [] and sorted(set(released) - set(ours)) == []
    assert ours == released
    assert sum(p.numel() for p in model.parameters()) == entry["num_parameters"]


def test_one_prelu_shared_by_every_cab():
    model = MPRNet(**TINY)
    cabs = [m for m in model.modules() if isinstance(m, CAB)]
    prelus = {id(cab.body[1]) for cab in cabs}
    weights = {id(cab.body[1].weight) for cab in cabs}
    assert len(cabs) > 20 and len(prelus) == 1 and len(weights) == 1
    act = cabs[0].body[1]
    assert isinstance(act, torch.nn.PReLU) and act.weight.numel() == 1
    # in the state dict under every CAB's body.1.weight, as the release lists it
    shared = [k for k, v in model.state_dict().items() if v.data_ptr() == act.weight.data_ptr()]
    assert len(shared) == len(cabs) and all(k.endswith(".body.1.weight") for k in shared)
    # parameters() yields it once
    assert sum(1 for p in model.parameters() if p is act.weight) == 1


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_forward_any_batch_size(batch):
    torch.manual_seed(0)
    model = MPRNet(**TINY).eval()
    x = torch.rand(batch, 3, 16, 24)
    with torch.inference_mode():
        out = model(x)
        singles = [model(x[i : i + 1]) for i in range(batch)]
    assert [o.shape for o in out] == [x.shape] * 3
    for i, single in enumerate(singles):  # each image is restored on its own, whatever the batch
        for o, s in zip(out, single, strict=True):
            torch.testing.assert_close(o[i : i + 1], s, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(12, 16), (16, 20), (7, 8), (8, 9)])
def test_non_multiple_of_8_is_a_clear_error(size):
    model = MPRNet(**TINY).eval()
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 3, *size))


def test_hyperparameters_are_keyword_only_and_checked():
    with pytest.raises(TypeError):
        MPRNet(3, 3)  # type: ignore[misc]
    with pytest.raises(TypeError):
        MPRNet(n_feats=8)  # type: ignore[call-arg]  # a typo fails loudly
    with pytest.raises(ValueError, match="reduction"):
        MPRNet(n_feat=10, scale_unetfeats=4, scale_orsnetfeats=4, reduction=4)
