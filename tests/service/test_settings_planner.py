"""Settings parsing and refusal messages; the planner's buckets, tiles and static shapes."""

from __future__ import annotations

import os

import pytest
import torch
from pydantic import ValidationError

from service import settings as settings_module
from service.planner import Planner
from service.settings import Settings, available_cpus, cgroup_cpu_quota, settings_error, unknown_variables


def refused(monkeypatch, **env) -> str:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError) as e:
        Settings()
    return settings_error(e.value)


def test_settings_from_the_environment(monkeypatch, tmp_path):
    (tmp_path / "denoise.pth").write_bytes(b"x")
    for k, v in {"MPRNET_TASKS": "denoise, deblur", "MPRNET_BUCKETS": "256, 512x384", "MPRNET_API_TOKEN": "t",
                 "MPRNET_UI_ENABLED": "false", "MPRNET_PRECISION": "BF16", "MPRNET_WEIGHTS_DIR": str(tmp_path),
                 "MPRNET_DEVICE": "cuda:1"}.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.tasks == ("denoise", "deblur") and s.buckets == ((256, 256), (512, 384)) and s.precision == "bf16"
    assert s.api_token.get_secret_value() == "t" and not s.ui_enabled and s.device == "cuda:1"
    assert s.weights_for("denoise") == tmp_path / "denoise.pth" and s.weights_for("deblur") is None  # -> bundled
    assert Settings.model_fields["host"].default == "127.0.0.1"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MPRNET_PORT": "eighty"}, "MPRNET_PORT='eighty'"),
        ({"MPRNET_TASKS": "deblur,sharpen"}, "MPRNET_TASKS='deblur,sharpen'"),
        ({"MPRNET_BUCKETS": "250"}, "MPRNET_BUCKETS='250'"),
        ({"MPRNET_DEVICE": "tpu"}, "MPRNET_DEVICE='tpu'"),
        ({"MPRNET_PRECISION": "int8"}, "MPRNET_PRECISION='int8'"),
        ({"MPRNET_MAX_BATCH_SIZE": "0"}, "MPRNET_MAX_BATCH_SIZE='0'"),
        ({"MPRNET_WEIGHTS_DEBLUR": "/no/such/file"}, "MPRNET_WEIGHTS_DEBLUR='/no/such/file'"),
        ({"MPRNET_TILE_OVERLAP": "300"}, "MPRNET_TILE_OVERLAP=300"),
        ({"MPRNET_BATCH_MEGAPIXELS": "0.1"}, "MPRNET_BATCH_MEGAPIXELS=0.1"),
        ({"MPRNET_MAX_PIXELS": "900000000"}, "MPRNET_MAX_PIXELS=900000000"),
        ({"MPRNET_UI_ENABLED": "maybe"}, "MPRNET_UI_ENABLED='maybe'"),
        ({"MPRNET_PNG_EFFORT": "max"}, "MPRNET_PNG_EFFORT='max'"),
    ],
)
def test_bad_settings_are_refused_naming_the_variable_and_value(monkeypatch, env, named):
    assert named in refused(monkeypatch, **env)


def test_weights_directory_without_the_task_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("MPRNET_WEIGHTS_DERAIN", str(tmp_path))
    with pytest.raises(ValueError, match="MPRNET_WEIGHTS_DERAIN"):
        Settings().weights_for("derain")


def test_unknown_variables_are_named_with_a_suggestion():
    assert unknown_variables({"MPRNET_PRECISON": "fp16", "MPRNET_PORT": "1", "HOME": "/"}) == [
        "MPRNET_PRECISON is not a setting of the service; ignored (did you mean MPRNET_PRECISION?)"
    ]


PLANNER = Planner(((256, 256), (512, 384)), tile_size=512, overlap=32)  # buckets are WIDTHxHEIGHT


def test_static_shapes_cover_buckets_and_tiles():
    assert PLANNER.static_shapes() == [(256, 256), (256, 512), (512, 256), (384, 512), (512, 384), (512, 512)]


@pytest.mark.parametrize(
    ("h", "w", "shape", "items"),
    [(1, 1, (256, 256), 1), (256, 256, (256, 256), 1), (300, 500, (384, 512), 1), (384, 600, (384, 512), 2),
     (8, 4000, (256, 512), 9), (4000, 8, (512, 256), 9), (1000, 1000, (512, 512), 9)],
)
def test_every_plan_uses_a_static_shape_and_reassembles_exactly(h, w, shape, items):
    image = torch.rand(3, h, w)
    plan = PLANNER.plan(image)
    assert plan.shape == shape and len(plan) == items and plan.shape in PLANNER.static_shapes()
    assert torch.allclose(plan.assemble(list(plan.inputs)), image, atol=1e-6)  # identity model
    assert 0 <= plan.padding_waste < 1


def test_out_of_memory_fallback_halves_tiles_down_to_a_floor():
    image = torch.rand(3, 100, 90)
    plan = PLANNER.plan(image)
    sizes = []
    while plan is not None:
        sizes.append(max(plan.shape))
        assert torch.allclose(plan.assemble(list(plan.inputs)), image, atol=1e-6)
        plan = PLANNER.smaller(image, plan)
    assert sizes == [256, 104, 48]  # 100x90 in 128 px tiles is one 104x96 item; below 32 px it stops


# ---------------------------------------------------------------- CPUs of a container


def _cgroup(root, files: dict[str, str]):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.mark.parametrize(
    "files, quota",
    [
        ({"cpu.max": "max 100000"}, None),
        ({"cpu.max": "150000 100000"}, 1.5),
        ({"cpu.max": "400000 100000"}, 4.0),
        ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2.0),  # cgroup v1
        ({"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, None),
        ({}, None),  # no cgroup files (not Linux, or not mounted)
    ],
)
def test_cgroup_cpu_quota(tmp_path, files, quota):
    assert cgroup_cpu_quota(_cgroup(tmp_path, files)) == quota


def test_thread_defaults_follow_the_containers_cpu_limit_not_the_nodes_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)  # a 64-core node
    monkeypatch.setattr(settings_module, "CGROUP", _cgroup(tmp_path, {"cpu.max": "150000 100000"}))
    assert available_cpus() == 2  # a limit of 1.5 CPUs: two threads, not 64
    settings = Settings()
    assert settings.model_threads() == 2 and settings.codec_threads == 2
    assert Settings(torch_threads=3).model_threads() == 3  # set: as set
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 9}, raising=False)  # pinned to 3 CPUs
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus() == 3
