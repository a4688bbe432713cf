"""Training: the loss goes down on a tiny model, checkpoints resume, the fp16 export loads."""

import json
import math

import numpy as np
import pytest
import torch

from model.arch import MPRNet
from model.checkpoint import load_mprnet
from model.cli import build_parser
from model.training.data import SyntheticPatches, augment, batch, find_pairs, load_photos
from model.training.losses import charbonnier, edge_loss, laplacian, mprnet_loss
from model.training.train import lr_at, train, train_step, validation_set
from model.variants import TINY

TINY_ARGS = ["--n-feat", "8", "--scale-unet", "4", "--scale-ors", "4", "--num-cab", "1", "--batch", "2", "--patch", "32",
             "--val-crop", "48", "--quiet", "--threads", "1"]


def parse(*argv):
    return build_parser().parse_args(["train", *argv, *TINY_ARGS])


def test_loss_is_zero_for_perfect_outputs_and_sums_stages():
    y = torch.rand(2, 3, 32, 32)
    assert mprnet_loss([y, y, y], y).item() == pytest.approx(3 * 1.05e-3, rel=1e-3)  # eps floor only
    x = y + 0.1
    one = charbonnier(x, y) + 0.05 * edge_loss(x, y)
    assert mprnet_loss([x, x, x], y).item() == pytest.approx(3 * one.item(), rel=1e-5)
    assert laplacian(torch.full((1, 3, 16, 16), 0.7)).abs().max() < 1e-5  # flat images have no edges


def test_lr_schedule_warms_up_then_decays_to_min():
    args = parse("--task", "denoise", "--out", "unused", "--warmup", "10")
    assert lr_at(0.0, 0, args) == pytest.approx(2e-5)
    assert lr_at(0.0, 10, args) == pytest.approx(2e-4)
    assert lr_at(0.5, 500, args) == pytest.approx((2e-4 + 1e-6) / 2)
    assert lr_at(1.0, 1000, args) == pytest.approx(1e-6)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    source = SyntheticPatches(load_photos(["astronaut.png"]), "denoise", 32)
    low, high = batch(source, 4, rng)
    model = MPRNet(**TINY)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    nothing = torch.autocast("cpu", enabled=False)
    losses = [train_step(model, opt, low, high, nothing) for _ in range(25)]
    assert losses[-1] < 0.7 * losses[0]


def test_augment_applies_the_same_transform_to_pairs():
    a = np.arange(2 * 3 * 1, dtype=np.float32).reshape(2, 3, 1)
    for seed in range(8):
        x, y = augment([a, a.copy()], np.random.default_rng(seed))
        assert np.array_equal(x, y)


def test_train_resumes_step_and_optimizer(tmp_path):
    out = tmp_path / "run"
    r1 = train(parse("--task", "derain", "--out", str(out), "--steps", "4", "--val-every", "2"))
    assert r1["step"] == 4 and math.isfinite(r1["best_psnr"])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 4
    assert all(int(s["step"]) == 4 for s in state["optimizer"]["state"].values())
    r2 = train(parse("--task", "derain", "--out", str(out), "--steps", "6", "--val-every", "2", "--resume"))
    assert r2["step"] == 6
    state = torch.load(out / "last.pt", weights_only=True)
    assert all(int(s["step"]) == 6 for s in state["optimizer"]["state"].values())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 4, 6]
    model = load_mprnet(out / "best.safetensors")  # fp16 export, widths read back from shapes
    assert model.shallow_feat1[0].weight.shape[0] == 8


def test_resume_refuses_other_widths(tmp_path):
    out = tmp_path / "run"
    train(parse("--task", "denoise", "--out", str(out), "--steps", "2", "--val-every", "2"))
    args = build_parser().parse_args(["train", "--task", "denoise", "--out", str(out), "--steps", "4", "--resume", "--quiet",
                                      "--n-feat", "12", "--scale-unet", "4", "--scale-ors", "4", "--num-cab", "1",
                                      "--patch", "32", "--batch", "2", "--val-crop", "48"])
    with pytest.raises(SystemExit, match="widths"):
        train(args)


def test_find_pairs_layouts(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (8, 8))
    for d in ("gopro/scene1/blur", "gopro/scene1/sharp", "rain/input", "rain/target", "sidd/0001"):
        (tmp_path / d).mkdir(parents=True)
    for d in ("gopro/scene1/blur", "gopro/scene1/sharp", "rain/input", "rain/target"):
        img.save(tmp_path / d / "a.png")
    img.save(tmp_path / "rain/input/orphan.png")
    img.save(tmp_path / "sidd/0001/NOISY_SRGB_010.PNG")
    img.save(tmp_path / "sidd/0001/GT_SRGB_010.PNG")
    pairs = find_pairs(tmp_path)
    names = sorted(f"{a.parent.name}/{a.name}->{b.parent.name}/{b.name}" for a, b in pairs)
    assert names == ["0001/NOISY_SRGB_010.PNG->0001/GT_SRGB_010.PNG", "blur/a.png->sharp/a.png", "input/a.png->target/a.png"]


def test_init_fine_tunes_from_a_weights_file_with_its_widths(tmp_path):
    first = tmp_path / "first"
    train(parse("--task", "denoise", "--out", str(first), "--steps", "2", "--val-every", "2"))
    start = load_mprnet(first / "best.safetensors")
    # --n-feat 12 is overridden by the file's widths (8); a near-zero lr leaves the weights as loaded
    args = build_parser().parse_args(["train", "--task", "denoise", "--out", str(tmp_path / "tuned"),
                                      "--init", str(first / "best.safetensors"), "--steps", "1", "--val-every", "1",
                                      "--lr", "1e-12", "--lr-min", "1e-12", "--warmup", "1", "--seed", "5",
                                      *TINY_ARGS, "--n-feat", "12"])  # another seed: a fresh init would not match
    train(args)
    tuned = load_mprnet(tmp_path / "tuned" / "best.safetensors")
    assert tuned.shallow_feat1[0].weight.shape[0] == 8
    for (name, a), b in zip(start.state_dict().items(), tuned.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-3), name  # fp16 export of the same weights


def test_init_refuses_a_file_that_is_not_mprnet(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, bad)
    args = parse("--task", "denoise", "--out", str(tmp_path / "run"), "--init", str(bad), "--steps", "1")
    with pytest.raises(SystemExit, match="--init"):
        train(args)


def test_validation_repeats_add_new_degradations_of_the_same_photos():
    one = validation_set(parse("--task", "deblur", "--out", "unused"))
    three = validation_set(parse("--task", "deblur", "--out", "unused", "--val-repeats", "3"))
    assert len(one) == 3 and len(three) == 9
    for (low, high), (low3, high3) in zip(one, three[:3], strict=True):  # repeat 0 is the default set, unchanged
        assert torch.equal(low, low3) and torch.equal(high, high3)
    for i in range(3):  # the same clean crop, blurred with another kernel each time
        assert torch.equal(three[i][1], three[i + 3][1]) and torch.equal(three[i][1], three[i + 6][1])
        assert not torch.equal(three[i][0], three[i + 3][0]) and not torch.equal(three[i + 3][0], three[i + 6][0])


def test_val_repeats_must_be_positive():
    from model.training.train import _main

    with pytest.raises(SystemExit, match="--val-repeats must be at least 1"):
        _main(parse("--task", "deblur", "--out", "unused", "--val-repeats", "0"))


def test_each_step_is_validated_once_also_when_the_last_step_is_off_the_grid(tmp_path):
    out = tmp_path / "run"
    train(parse("--task", "denoise", "--out", str(out), "--steps", "3", "--val-every", "2"))
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2, 3]


def test_rain_family_options_restrict_the_training_rain_and_are_recorded(tmp_path):
    from safetensors import safe_open

    from model.training.degrade import family_rain
    from model.training.train import train_source

    args = parse("--task", "derain", "--out", str(tmp_path / "run"), "--rain-profiles", "blurred", "--rain-blends", "add",
                 "--rain-haze", "0", "--steps", "2", "--val-every", "2")
    source = train_source(args)
    assert source.rain == {"profiles": ("blurred",), "blends": ("add",), "haze": 0.0}
    rng, copy = np.random.default_rng(9), np.random.default_rng(9)
    low, high = source.sample(rng)
    # replay the crop's draws on the copy, then the rain: the sample is exactly the restricted family's rain
    source.rain = None
    img = source.images[int(copy.choice(len(source.images), p=source.p))]
    y, x = int(copy.integers(0, img.shape[0] - 31)), int(copy.integers(0, img.shape[1] - 31))
    k, flip = int(copy.integers(4)), bool(copy.integers(2))
    crop = np.rot90(img[y:y + 32, x:x + 32], k, axes=(0, 1))
    crop = np.ascontiguousarray(crop[:, ::-1] if flip else crop)
    assert np.array_equal(high, crop)
    assert np.array_equal(low, family_rain(crop, copy, profiles=("blurred",), blends=("add",), haze=0.0))
    train(args)
    with safe_open(str(tmp_path / "run" / "best.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["rain_family"]) == {"profiles": ["blurred"], "blends": ["add"], "haze": 0.0}


@pytest.mark.parametrize("argv, match", [
    (["--task", "derain", "--rain-profiles", "hard,soft"], "'soft'.*hard, tapered, blurred"),
    (["--task", "derain", "--rain-blends", "multiply"], "'multiply'.*screen, add"),
    (["--task", "derain", "--rain-haze", "-0.1"], "probability"),
    (["--task", "denoise", "--rain-haze", "0"], "do nothing with another task"),
    (["--task", "derain", "--pairs", "somewhere", "--rain-profiles", "hard"], "or with --pairs"),
])
def test_bad_rain_family_options_are_refused_before_training(argv, match, tmp_path):
    from model.training.train import _main

    with pytest.raises(SystemExit, match=match):
        _main(parse(*argv, "--out", str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()
