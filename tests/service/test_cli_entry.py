"""`python -m service` / `mprnet-serve`: --help and --version answer without starting a server."""

from __future__ import annotations

import pytest

from service.__main__ import main


def test_help_lists_the_settings_and_starts_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mprnet-serve" in out
    assert "MPRNET_DEVICE" in out and "MPRNET_MAX_UPLOAD_BYTES" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("mprnet-serve ")


def test_an_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--port", "9000"])
    assert exit_.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
