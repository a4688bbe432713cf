"""The synthetic degradations match their published spec (model/training/degrade.py docstring)."""

import numpy as np
import pytest

from model.training import degrade as D


def flat(value=0.5, size=128):
    return np.full((size, size, 3), value, np.float32)


def test_noise_statistics():
    rng = np.random.default_rng(0)
    noisy = D.add_noise(flat(), 25.0, rng)
    diff = (noisy - 0.5) * 255.0
    assert abs(diff.mean()) < 0.5
    assert diff.std() == pytest.approx(25.0, rel=0.03)
    # independent per channel: channels are uncorrelated
    assert abs(np.corrcoef(diff[..., 0].ravel(), diff[..., 1].ravel())[0, 1]) < 0.05


def test_random_noise_sigma_range():
    rng = np.random.default_rng(1)
    sigmas = [((D.random_noise(flat(size=64), rng) - 0.5) * 255).std() for _ in range(200)]
    assert 4.0 < min(sigmas) < 8.0 and 45.0 < max(sigmas) < 53.0


def test_noise_is_seeded_and_clipped():
    a = D.random_noise(flat(0.98), np.random.default_rng(3))
    b = D.random_noise(flat(0.98), np.random.default_rng(3))
    assert np.array_equal(a, b) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_blur_kernels_sum_to_one_fit_and_are_centred():
    rng = np.random.default_rng(2)
    for _ in range(100):
        k = D.random_blur_kernel(rng)
        assert k.shape == (25, 25) and k.min() >= 0.0
        assert k.sum() == pytest.approx(1.0, abs=1e-5)
        ys, xs = np.nonzero(k > 1e-6)
        assert ys.max() - ys.min() <= 25 and xs.max() - xs.min() <= 25
        cy, cx = (k * np.arange(25)[:, None]).sum(), (k * np.arange(25)[None, :]).sum()
        assert abs(cy - 12) < 1.0 and abs(cx - 12) < 1.0  # blurring does not shift the image


def test_linear_motion_kernel_length_and_angle():
    k = D.linear_motion_kernel(21.0, 0.0)  # horizontal: one row (two with bilinear weights)
    cols = np.nonzero(k.sum(axis=0) > 1e-6)[0]
    assert 20 <= cols.max() - cols.min() <= 22
    assert np.count_nonzero(k.sum(axis=1) > 1e-6) <= 2
    v = D.linear_motion_kernel(15.0, 90.0)
    assert np.count_nonzero(v.sum(axis=0) > 1e-6) <= 2


def test_shake_kernel_extent():
    rng = np.random.default_rng(5)
    for _ in range(30):
        k = D.shake_kernel(rng, 21.0)
        ys, xs = np.nonzero(k > 1e-6)
        assert max(np.ptp(ys), np.ptp(xs)) <= 23  # 21 px path plus the bilinear footprint


def test_blur_preserves_mean_and_size():
    img = np.random.default_rng(0).random((64, 80, 3), dtype=np.float32)
    k = D.random_blur_kernel(np.random.default_rng(9))
    out = D.blur(img, k)
    assert out.shape == img.shape and abs(out.mean() - img.mean()) < 0.01
    assert D.blur(img, k, valid=True).shape == (40, 56, 3)
    assert D.degrade("deblur", img, np.random.default_rng(0), valid=True).shape == (40, 56, 3)


def test_rain_streak_angles_and_lengths_in_range():
    rng = np.random.default_rng(4)
    for _ in range(50):
        layer, angles = D.rain_layer((96, 96), rng, return_angles=True)
        assert np.all(np.abs(angles) <= D.RAIN_MAX_ANGLE)
        assert layer.min() >= 0.0 and layer.max() <= 1.0


def test_rain_streaks_orientation():
    # A dense layer's structure tensor points along the streaks: within 30 degrees of vertical.
    rng = np.random.default_rng(7)
    for _ in range(10):
        layer, angles = D.rain_layer((128, 128), rng, return_angles=True)
        gy, gx = np.gradient(layer)
        jxx, jyy, jxy = (gx * gx).sum(), (gy * gy).sum(), (gx * gy).sum()
        # Dominant gradient angle from the x axis = streak angle from the y axis (they are perpendicular).
        streak_from_vertical = 0.5 * np.degrees(np.arctan2(2 * jxy, jxx - jyy))
        assert abs(streak_from_vertical) <= 32.0
        assert abs(abs(streak_from_vertical) - abs(np.median(angles))) < 8.0


def test_screen_blend_only_brightens():
    img = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    rainy = D.random_rain(img, np.random.default_rng(1))
    assert np.all(rainy >= img - 1e-6) and rainy.max() <= 1.0
    assert (rainy - img).max() > 0.2  # streaks are visible (intensity 0.5-1.0 before softening)


def test_benchmark_degrade_is_deterministic():
    img = np.random.default_rng(0).random((48, 48, 3), dtype=np.float32)
    for task in ("denoise", "deblur", "derain"):
        assert np.array_equal(D.benchmark_degrade(task, img, 3), D.benchmark_degrade(task, img, 3))
    with pytest.raises(ValueError):
        D.degrade("dehaze", img, np.random.default_rng(0))


def test_family_rain_stays_in_range_and_only_brightens_without_haze():
    img = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    for seed in range(30):
        rainy = D.family_rain(img, np.random.default_rng(seed), haze=0.0)
        assert rainy.shape == img.shape and rainy.dtype == np.float32
        assert np.all(rainy >= img - 1e-6) and rainy.max() <= 1.0
    hazy = D.family_rain(img, np.random.default_rng(0), haze=1.0)
    assert hazy.min() > 0.02  # a grey veil lifts the blacks


def test_derain_training_draws_the_family_and_the_evaluation_keeps_the_spec():
    img = np.random.default_rng(0).random((48, 48, 3), dtype=np.float32)
    trained_on = D.degrade("derain", img, np.random.default_rng(5))
    assert np.array_equal(trained_on, D.family_rain(img, np.random.default_rng(5)))
    assert np.array_equal(D.benchmark_degrade("derain", img, 5), D.random_rain(img, np.random.default_rng(5)))
    with pytest.raises(ValueError, match="rain renderer"):
        D.benchmark_degrade("derain", img, 5, rain="other")


def _edge_ratio(layer: np.ndarray) -> float:
    """Mean absolute horizontal step over mean brightness: high for sharp lines, low for soft ones."""
    return float(np.abs(np.diff(layer, axis=1)).mean() / max(layer.mean(), 1e-9))


def test_every_family_profile_draws_visible_streaks_and_hard_ones_are_sharpest():
    ratios = {}
    for profile in D.RAIN_PROFILES:
        layers = [D.family_rain_layer((96, 96), np.random.default_rng(s), profiles=(profile,)) for s in range(12)]
        assert all(0.0 <= la.min() and la.max() <= 1.0 for la in layers)
        assert np.mean([la.max() for la in layers]) > 0.25 and np.mean([(la > 0.05).mean() for la in layers]) > 0.01
        ratios[profile] = np.mean([_edge_ratio(la) for la in layers])
    assert ratios["hard"] > ratios["blurred"]


def test_family_covers_denser_rain_than_the_spec():
    spec = [(D.rain_layer((96, 96), np.random.default_rng(s)) > 0.1).mean() for s in range(40)]
    fam = [(D.family_rain_layer((96, 96), np.random.default_rng(s)) > 0.1).mean() for s in range(40)]
    assert max(fam) > max(spec) * 0.8 and np.percentile(fam, 90) > np.percentile(spec, 50)


def test_heldout_renderer_follows_the_spec():
    from model.training import heldout_rain as H

    img = np.random.default_rng(0).random((96, 96, 3), dtype=np.float32)
    for seed in range(10):
        rainy = H.heldout_rain(img, np.random.default_rng(seed))
        assert np.all(rainy >= img - 1e-6) and rainy.max() <= 1.0 and (rainy - img).max() > 0.2
        assert np.array_equal(rainy, D.benchmark_degrade("derain", img, seed, rain="heldout"))
        layer = H.heldout_layer((128, 128), np.random.default_rng(seed))
        gy, gx = np.gradient(layer)
        jxx, jyy, jxy = (gx * gx).sum(), (gy * gy).sum(), (gx * gy).sum()
        assert abs(0.5 * np.degrees(np.arctan2(2 * jxy, jxx - jyy))) <= 32.0  # streaks within 30 degrees of vertical


def test_heldout_renderer_shares_no_code_with_training():
    import ast
    import inspect

    from model.training import data, heldout_rain

    def imports(module) -> set[str]:
        tree = ast.parse(inspect.getsource(module))
        return {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert not {m for m in imports(heldout_rain) if "degrade" in m or "data" in m or m.startswith(".")}
    assert not {m for m in imports(data) if "heldout" in m}
    training_draw = (D.degrade, D.family_rain, D.family_rain_layer, D._family_streaks)
    assert not [f.__name__ for f in training_draw if "heldout" in inspect.getsource(f)]


def test_heldout_thin_corner_is_dense_one_pixel_rain():
    from model.training import heldout_rain as H

    img = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    assert np.array_equal(H.heldout_rain(img, np.random.default_rng(2), thin=True),
                          D.benchmark_degrade("derain", img, 2, rain="heldout-thin"))
    thin = [H.heldout_layer((96, 96), np.random.default_rng(s), thin=True) for s in range(8)]
    wide = [H.heldout_layer((96, 96), np.random.default_rng(s)) for s in range(8)]
    assert np.mean([_edge_ratio(la) for la in thin]) > np.mean([_edge_ratio(la) for la in wide])
    assert min((la > 0.1).mean() for la in thin) > 0.02  # dense: every image is well covered


def test_rain_family_parses_subsets_in_family_order_and_refuses_unknown_names():
    assert D.parse_rain_family() == {"profiles": D.RAIN_PROFILES, "blends": D.RAIN_BLENDS, "haze": D.RAIN_HAZE}
    family = D.parse_rain_family("blurred, hard", "add", 0.0)
    assert family == {"profiles": ("hard", "blurred"), "blends": ("add",), "haze": 0.0}
    for bad, match in ((("soft",), "'soft'.*hard, tapered, blurred"), ((None, "screen,mult"), "'mult'.*screen, add"),
                       (("",), "none given"), (("hard,hard",), "twice"), ((None, None, 1.5), "probability")):
        with pytest.raises(ValueError, match=match):
            D.parse_rain_family(*bad)


def test_a_restricted_family_draws_only_what_it_names():
    img = np.full((64, 64, 3), 0.5, np.float32)
    # additive only: every rainy pixel is the image plus the layer; screen only: 1 - (1 - img)(1 - layer)
    for blend in D.RAIN_BLENDS:
        for seed in range(6):
            rain = D.parse_rain_family(blends=blend, haze=0.0)
            rainy = D.degrade("derain", img, np.random.default_rng(seed), rain=rain)
            layer = D.family_rain_layer(img.shape[:2], np.random.default_rng(seed))
            want = D.screen(img, layer) if blend == "screen" else np.clip(img + layer[:, :, None], 0.0, 1.0)
            assert np.allclose(rainy, want, atol=1e-6)
    # one profile: the same draw as the family layer restricted to it
    rainy = D.degrade("derain", img, np.random.default_rng(3), rain=D.parse_rain_family("hard", "add", 0.0))
    layer = D.family_rain_layer(img.shape[:2], np.random.default_rng(3), profiles=("hard",))
    assert np.allclose(rainy, np.clip(img + layer[:, :, None], 0.0, 1.0), atol=1e-6)
    # haze 0 never veils, haze 1 always does (the blacks lift)
    black = np.zeros((48, 48, 3), np.float32)
    assert min(D.degrade("derain", black, np.random.default_rng(s), rain={"haze": 1.0}).min() for s in range(5)) > 0.02
    assert all(D.degrade("derain", black, np.random.default_rng(s), rain={"haze": 0.0}).min() == 0.0 for s in range(5))


def test_evaluation_can_draw_one_profile_of_the_training_family():
    img = np.random.default_rng(0).random((48, 48, 3), dtype=np.float32)
    for profile in D.RAIN_PROFILES:
        got = D.benchmark_degrade("derain", img, 4, rain=f"family-{profile}")
        assert np.array_equal(got, D.family_rain(img, np.random.default_rng(4), profiles=(profile,)))
    assert np.array_equal(D.benchmark_degrade("derain", img, 4, rain="family"), D.family_rain(img, np.random.default_rng(4)))
    with pytest.raises(ValueError, match="rain renderer"):
        D.benchmark_degrade("derain", img, 4, rain="family-soft")
