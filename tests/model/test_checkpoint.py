"""Checkpoints: every accepted format loads, every bad file is refused with a message that says why."""

from __future__ import annotations

import os
import pickle
import shlex

import pytest
import torch
from safetensors.torch import save_file

from model.arch import MPRNet
from model.bundled import bundled_weights
from model.checkpoint import (
    CheckpointError,
    build_from_state_dict,
    load_mprnet,
    read_state_dict,
    save_release_format,
    save_safetensors,
)
from model.variants import TINY


@pytest.fixture(scope="module")
def tiny() -> MPRNet:
    torch.manual_seed(7)
    return MPRNet(**TINY).eval()


def _plain_sd(model: MPRNet) -> dict[str, torch.Tensor]:
    # clone every tensor: torch.save keeps the shared PReLU storage either way, but tests then
    # prefix or edit entries one by one
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_weights(loaded: MPRNet, model: MPRNet) -> None:
    assert loaded.hparams == model.hparams
    a, b = loaded.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not loaded.training


def _prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


# ---------------------------------------------------------------- formats that load


def _release(sd: dict, model: MPRNet) -> dict:
    """The authors' training checkpoint: epoch, state dict and an Adam optimizer state."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    return {"epoch": 3, "state_dict": sd, "optimizer": opt.state_dict()}


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda sd, m: _release(sd, m), id="release"),
        pytest.param(lambda sd, m: _release(_prefixed(sd, "module."), m), id="release-module"),
        pytest.param(lambda sd, m: sd, id="plain"),
        pytest.param(lambda sd, m: _prefixed(sd, "_orig_mod."), id="compiled"),
        pytest.param(lambda sd, m: _prefixed(sd, "module._orig_mod."), id="dataparallel-compiled"),
        pytest.param(lambda sd, m: {"state_dict": _prefixed(sd, "_orig_mod.module.")}, id="nested-prefixes"),
    ],
)
def test_pth_formats_load(tmp_path, tiny, make):
    path = tmp_path / "w.pth"
    torch.save(make(_plain_sd(tiny), tiny), path)
    _assert_same_weights(load_mprnet(path), tiny)


def test_our_training_checkpoints_load(tmp_path, tiny):
    """`mprnet train`'s last.pt / best.pt: `mprnet evaluate --weights runs/x/last.pt` works."""
    import argparse

    import numpy as np

    from model.training.train import save_checkpoint

    args = argparse.Namespace(n_feat=TINY["n_feat"], scale_unet=TINY["scale_unetfeats"], scale_ors=TINY["scale_orsnetfeats"],
                              num_cab=TINY["num_cab"], reduction=TINY["reduction"])
    opt = torch.optim.Adam(tiny.parameters(), lr=2e-4)
    path = tmp_path / "last.pt"
    save_checkpoint(path, tiny, opt, 10, 25.0, 1.0, np.random.default_rng(0), args)
    _assert_same_weights(load_mprnet(path), tiny)


def test_legacy_non_zip_torch_format_loads(tmp_path, tiny):
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": _plain_sd(tiny)}, path, _use_new_zipfile_serialization=False)
    _assert_same_weights(load_mprnet(path), tiny)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])  # found by content too, whatever the name
def test_safetensors_loads(tmp_path, tiny, suffix):
    path = tmp_path / f"w{suffix}"
    save_safetensors(tiny, path)
    _assert_same_weights(load_mprnet(path), tiny)


def test_read_state_dict_strips_prefixes(tmp_path, tiny):
    path = tmp_path / "w.pth"
    torch.save({"state_dict": _prefixed(_plain_sd(tiny), "module.")}, path)
    assert set(read_state_dict(path)) == set(tiny.state_dict())


CONFIGS = [
    dict(TINY),
    dict(TINY, n_feat=12, scale_unetfeats=8, scale_orsnetfeats=4, num_cab=2),
    dict(TINY, n_feat=16, scale_unetfeats=8, scale_orsnetfeats=8, num_cab=3, reduction=8),
    dict(TINY, n_feat=20, scale_unetfeats=12, scale_orsnetfeats=8, kernel_size=5, bias=True),
    dict(TINY, in_c=1, out_c=1),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"n{c['n_feat']}-u{c['scale_unetfeats']}-o{c['scale_orsnetfeats']}"
                         f"-cab{c['num_cab']}-k{c['kernel_size']}-r{c['reduction']}-b{int(c['bias'])}-c{c['in_c']}")
def test_configuration_is_read_from_shapes(tmp_path, config):
    torch.manual_seed(0)
    model = MPRNet(**config)
    path = tmp_path / "w.safetensors"
    save_safetensors(model, path)
    loaded = load_mprnet(path)  # no hint about the widths
    assert loaded.hparams == config
    _assert_same_weights(loaded, model)


# ---------------------------------------------------------------- saving


@pytest.mark.parametrize("save", [save_safetensors, save_release_format], ids=["safetensors", "release"])
def test_save_and_reload_gives_equal_outputs(tmp_path, tiny, save):
    path = tmp_path / ("w.safetensors" if save is save_safetensors else "w.pth")
    save(tiny, path)
    loaded = load_mprnet(path)
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for a, b in zip(loaded(x), tiny(x), strict=True):
            assert torch.equal(a, b)
    # the PReLU is shared again after loading, whatever the file held
    cab_acts = {id(m.body[1].weight) for m in loaded.modules() if type(m).__name__ == "CAB"}
    assert len(cab_acts) == 1


def test_release_format_is_the_authors_layout(tmp_path, tiny):
    path = tmp_path / "w.pth"
    save_release_format(tiny, path, epoch=12)
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 12 and set(raw["state_dict"]) == set(tiny.state_dict())


def test_fp16_safetensors_loads_as_fp32(tmp_path, tiny):
    path = tmp_path / "half.safetensors"
    save_safetensors(tiny, path, dtype=torch.float16, metadata={"task": "test"})
    loaded = load_mprnet(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(loaded.tail.weight, tiny.tail.weight, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- refusals


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_mprnet(path)
    return str(info.value)


def test_missing_file(tmp_path):
    assert "not found" in _error(tmp_path / "nope.pth")


def test_directory_and_empty_file(tmp_path):
    assert "not a file" in _error(tmp_path)
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.pth")


@pytest.mark.parametrize("name, content", [
    ("random.pth", os.urandom(4096)),
    ("notes.pth", b"these are not the weights you are looking for\n" * 20),
    ("weights.json", b'{"state_dict": {}}'),
])
def test_not_a_checkpoint(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    msg = _error(tmp_path / name)
    assert "not a checkpoint" in msg or "not a readable" in msg
    assert "arbitrary code" not in msg  # a random file is not reported as an attack


@pytest.mark.parametrize("kind", ["pth", "safetensors", "safetensors-unnamed", "legacy-pth"])
def test_truncated_file(tmp_path, tiny, kind):
    full = tmp_path / f"full.{kind}"
    if kind == "pth":
        save_release_format(tiny, full)
    elif kind == "legacy-pth":
        torch.save(_plain_sd(tiny), full, _use_new_zipfile_serialization=False)
    else:
        save_safetensors(tiny, full)
    data = full.read_bytes()
    cut = tmp_path / ("half.safetensors" if kind == "safetensors" else "half.bin")
    cut.write_bytes(data[: len(data) // 2])
    msg = _error(cut)
    assert "truncated or corrupt" in msg, msg


def test_another_architecture_names_missing_and_unexpected_keys(tmp_path):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3))
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    msg = _error(path)
    assert "not an MPRNet" in msg
    assert "missing keys" in msg and "shallow_feat1.0.weight" in msg
    assert "unexpected keys" in msg and "0.weight" in msg


def test_mprnet_with_extra_and_missing_keys(tmp_path, tiny):
    sd = _plain_sd(tiny)
    del sd["sam23.conv3.weight"]
    sd["head.extra.weight"] = torch.zeros(3)
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    msg = _error(path)
    assert "sam23.conv3.weight" in msg and "head.extra.weight" in msg


def test_shape_mismatch_names_the_tensor(tmp_path, tiny):
    sd = _plain_sd(tiny)
    sd["stage2_encoder.csff_enc2.weight"] = torch.zeros(12, 12, 3, 3)  # a 1x1 conv stored as 3x3
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    msg = _error(path)
    assert "wrong shape" in msg and "stage2_encoder.csff_enc2.weight" in msg and "(12, 12, 3, 3)" in msg


@pytest.mark.parametrize("key, tensor", [
    ("shallow_feat1.0.weight", torch.zeros(8)),  # too few dimensions to read widths from
    ("shallow_feat1.1.CA.conv_du.0.weight", torch.zeros(16, 8, 1, 1)),  # squeeze wider than its input
])
def test_shapes_that_describe_no_mprnet(tiny, key, tensor):
    sd = _plain_sd(tiny)
    sd[key] = tensor
    with pytest.raises(CheckpointError):
        build_from_state_dict(sd)


def test_non_tensor_entries_are_refused(tmp_path, tiny):
    sd = _plain_sd(tiny)
    sd["note"] = "hello"
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    assert "not tensors" in _error(path)
    torch.save([1, 2, 3], path)
    assert "not a state dict" in _error(path)


class _ShellPayload:
    """Unpickling this runs a shell command."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _OpenPayload:
    """Unpickling this creates a file, without a shell."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("how", ["torch.save", "torch.save-nested", "pickle", "pickle-legacy-name"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / ("evil.pth" if how != "pickle" else "evil.pkl")
    if how == "torch.save":
        torch.save(_ShellPayload(marker), path)
    elif how == "torch.save-nested":  # hidden inside an otherwise plausible release checkpoint
        torch.save({"epoch": 1, "state_dict": {"tail.weight": torch.zeros(3, 12, 3, 3), "x": _ShellPayload(marker)}}, path)
    else:
        path.write_bytes(pickle.dumps(_OpenPayload(marker), protocol=2))
    msg = _error(path)
    assert "refused" in msg and "arbitrary code" in msg, msg
    assert not marker.exists()


def test_malicious_payload_would_run_if_unpickled(tmp_path):
    """Control for the test above: the payload is live, so its absence of effect means something."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_OpenPayload(marker))).close()
    assert marker.exists()


def test_bundled_weights_errors():
    with pytest.raises(ValueError, match="unknown task"):
        bundled_weights("sharpen")
    for task in ("deblur", "derain", "denoise"):
        try:
            path = bundled_weights(task)
        except CheckpointError as e:
            assert "no bundled weights" in str(e)
        else:
            assert path.is_file() and path.suffix == ".safetensors"
