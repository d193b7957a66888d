"""The ``adadpigu`` CLI: privacy calculator output and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simulations.cli import main


def test_privacy_json_epsilon(capsys):
    assert (
        main(
            [
                "privacy",
                "--noise-multiplier",
                "1.5",
                "--sample-rate",
                "0.04",
                "--steps",
                "2250",
                "--delta",
                "1e-5",
                "--accountant",
                "rdp",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] == pytest.approx(7.3291, abs=1e-3)
    assert out["noise_multiplier"] == 1.5 and out["steps"] == 2250


def test_privacy_json_calibrates(capsys):
    assert (
        main(
            [
                "privacy",
                "--target-epsilon",
                "8",
                "--sample-rate",
                "0.04",
                "--steps",
                "500",
                "--accountant",
                "rdp",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert 0.98 * 8 <= out["epsilon"] <= 8
    assert out["noise_multiplier"] > 0


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--method", "bogus"],
        ["train", "--epochs", "0"],
        ["train", "--dataset", "mnist", "--data-dir", "/nonexistent/adadpigu-data", "--epochs", "1"],
        ["privacy", "--sample-rate", "0.04", "--steps", "10"],
        ["privacy", "--noise-multiplier", "1", "--sample-rate", "3", "--steps", "10"],
    ],
)
def test_user_errors_are_one_line_without_traceback(argv):
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("adadpigu: error:")]
    assert len(lines) == 1, proc.stderr


def test_every_help_page_renders(capsys):
    """``adadpigu --help`` and each sub-command's ``--help`` (a stray ``%`` in a help string
    once made the top-level page crash)."""
    import argparse

    from simulations.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for argv in [[], *[[name] for name in sub.choices]]:
        with pytest.raises(SystemExit) as done:
            main([*argv, "--help"])
        assert done.value.code == 0, argv
        assert "usage:" in capsys.readouterr().out
