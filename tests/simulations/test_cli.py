"""The ``adadpigu`` CLI: privacy calculator output and one-line user errors."""

from __future__ import annotations

import json
import os
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


def _cli(*argv: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def test_privacy_names_the_accountant_that_produced_the_number():
    """Issue 28.6: below sigma 0.3 the PLD request is answered by RDP's bound; the output says rdp."""
    low = json.loads(
        _cli(
            "privacy", "--noise-multiplier", "0.25", "--sample-rate", "0.01", "--steps", "100", "--json"
        ).stdout
    )
    assert low["accountant"] == "rdp" and low["accountant_requested"] == "pld"
    from common.accounting import compute_epsilon

    rdp = compute_epsilon(noise_multiplier=0.25, sample_rate=0.01, steps=100, delta=1e-5, accountant="rdp")
    assert low["epsilon"] == pytest.approx(rdp, rel=1e-12)
    high = json.loads(
        _cli(
            "privacy", "--noise-multiplier", "1.0", "--sample-rate", "0.01", "--steps", "100", "--json"
        ).stdout
    )
    assert high["accountant"] == "pld"
    text = _cli("privacy", "--noise-multiplier", "0.25", "--sample-rate", "0.01", "--steps", "100").stdout
    assert "(rdp, as an upper bound on pld's" in text


@pytest.mark.parametrize(
    "command, hidden, shown",
    [
        (
            "simulate",
            ("--epochs", "--pretrain-fraction", "--pretrain-noise-multiplier"),
            ("--partitioner", "--local-epochs"),
        ),
        (
            "train",
            ("--partitioner", "--alpha", "--silo-sizes", "--declared-silo-size"),
            ("--epochs", "--pretrain-fraction"),
        ),
    ],
)
def test_a_command_offers_only_the_settings_it_accepts(command, hidden, shown):
    """Issue 28.4: simulate listed --epochs (always refused); train listed the silo settings."""
    page = _cli(command, "--help").stdout
    for flag in hidden:
        assert f"{flag} " not in page, flag
        proc = _cli(command, flag, "5")
        assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr, flag
    for flag in shown:
        assert f"{flag} " in page, flag


@pytest.mark.slow
def test_a_truncated_test_file_leaves_no_run_folder(tmp_path, data_dir):
    """Issue 28.5: the server read the test split after it had made the run folder."""
    import shutil

    data = tmp_path / "data" / "MNIST" / "raw"
    data.mkdir(parents=True)
    for name in os.listdir(os.path.join(data_dir, "MNIST", "raw")):
        shutil.copy(os.path.join(data_dir, "MNIST", "raw", name), data / name)
    with open(data / "t10k-images-idx3-ubyte", "r+b") as fh:
        fh.truncate(1 << 20)
    out = tmp_path / "runs"
    proc = _cli(
        "simulate", "--num-supernodes", "2", "--num-server-rounds", "2", "--importance-rounds", "1",
        "--train-subset", "600", "--batch-size", "64", "--features", "pixels", "--model", "mnist-cnn",
        "--data-dir", str(tmp_path / "data"), "--out-dir", str(out),
        timeout=600, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "t10k-images-idx3-ubyte is corrupt" in proc.stderr
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
