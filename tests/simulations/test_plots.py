"""Result and split figures: every plot writes a real PNG from small synthetic runs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from simulations import plots
from simulations.cli import main
from simulations.sweep import collect

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    assert path is not None and os.path.isfile(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    assert head == PNG_SIGNATURE
    assert os.path.getsize(path) > 5000  # axes, lines and labels, not an empty canvas


def write_run(
    root,
    name,
    *,
    federated=True,
    method="adadpigu",
    seed=0,
    epsilon=8.0,
    r0=0.6,
    partitioner="iid",
    alpha=0.5,
    final=0.9,
    rounds=5,
):
    """A finished run folder as the trainer / ServerApp write it (config, summary, metrics)."""
    run = root / name
    run.mkdir(parents=True)
    train = {
        "method": method,
        "dataset": "mnist",
        "epsilon": epsilon,
        "r0": r0,
        "partitioner": partitioner,
        "alpha": alpha,
        "seed": seed,
        "out-dir": str(run),
        "data-dir": "/data",
    }
    rng = np.random.default_rng(seed)
    acc = [final * (1 - 0.5**t) + 0.005 * rng.standard_normal() for t in range(1, rounds + 1)]
    eps = [epsilon * (t / rounds) ** 0.5 for t in range(1, rounds + 1)]
    if federated:
        config = {"train": train, "federated": {"num-server-rounds": rounds}}
        metrics = [{"round": 0, "phase": "init", "test_accuracy": 0.1, "max_epsilon": 0.0}] + [
            {
                "round": t,
                "test_accuracy": a,
                "val_accuracy": a - 0.01,
                "max_epsilon": e,
                "retention_ratio": r0,
            }
            for t, (a, e) in enumerate(zip(acc, eps), start=1)
        ]
        summary = {"test_accuracy_best_val": max(acc), "test_accuracy_final": acc[-1], "max_epsilon": eps[-1]}
    else:
        config = train
        metrics = [
            {"epoch": t, "test_accuracy": a, "val_accuracy": a, "epsilon": e, "active_ratio": r0}
            for t, (a, e) in enumerate(zip(acc, eps), start=1)
        ]
        summary = {"test_accuracy_best_val": max(acc), "test_accuracy_final": acc[-1], "epsilon": eps[-1]}
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def grid_rows(tmp_path):
    """Federated runs over method x epsilon x r0 x alpha x 2 seeds, plus IID and non-private baselines."""
    root = tmp_path / "runs"
    i = 0
    for seed in (0, 1):
        for eps in (1.0, 3.0, 8.0):
            for method in ("adadpigu", "dpsgd"):
                write_run(root, f"r{i}", method=method, seed=seed, epsilon=eps, final=0.8 + eps / 50)
                i += 1
        for r0 in (0.4, 0.8):
            write_run(root, f"r{i}", seed=seed, r0=r0, final=0.85 + r0 / 20)
            i += 1
        for alpha in (0.1, 1.0, 100.0):
            write_run(
                root, f"r{i}", seed=seed, partitioner="dirichlet", alpha=alpha, final=0.9 - 0.05 / alpha
            )
            i += 1
        write_run(root, f"r{i}", method="nonprivate", seed=seed, final=0.99)
        i += 1
    return collect(str(root))


def test_plot_label_distribution_writes_png(tmp_path):
    # Prepare
    dist = np.random.default_rng(0).integers(0, 500, size=(10, 10))
    # Execute
    path = plots.plot_label_distribution(dist, str(tmp_path / "sub" / "dist.png"), title="synthetic")
    # Assert
    assert_png(path)


@pytest.mark.parametrize(
    ("function", "kwargs"),
    [
        (plots.plot_accuracy_curves, {"kind": "round"}),
        (plots.plot_epsilon_curves, {"kind": "round"}),
        (plots.plot_accuracy_vs_epsilon, {}),
        (plots.plot_accuracy_vs_r0, {}),
        (plots.plot_accuracy_vs_alpha, {}),
    ],
)
def test_each_result_plot_writes_png(grid_rows, tmp_path, function, kwargs):
    # Prepare
    out = tmp_path / f"{function.__name__}.png"
    # Execute
    path = function(grid_rows, str(out), **kwargs)
    # Assert
    assert path == str(out)
    assert_png(path)


def test_centralized_epoch_curves_write_png(tmp_path):
    # Prepare
    for seed in (0, 1):
        for method in ("adadpigu", "dpsgd"):
            write_run(tmp_path / "central", f"{method}-{seed}", federated=False, method=method, seed=seed)
    rows = collect(str(tmp_path / "central"))
    # Execute
    acc = plots.plot_accuracy_curves(rows, str(tmp_path / "acc.png"), kind="epoch")
    eps = plots.plot_epsilon_curves(rows, str(tmp_path / "eps.png"), kind="epoch")
    per_round = plots.plot_accuracy_curves(rows, str(tmp_path / "round.png"), kind="round")
    # Assert
    assert_png(acc)
    assert_png(eps)
    assert per_round is None and not (tmp_path / "round.png").exists()


def test_plots_without_varying_data_are_skipped(tmp_path):
    # Prepare: one target epsilon, one r0, IID only
    rows = collect(str(write_run(tmp_path / "runs", "only")))
    # Execute
    paths = plots.plot_all(rows, str(tmp_path / "plots"))
    # Assert
    assert sorted(os.path.basename(p) for p in paths) == ["accuracy-vs-round.png", "epsilon-vs-round.png"]
    assert plots.plot_accuracy_vs_epsilon(rows, str(tmp_path / "e.png")) is None
    assert plots.plot_accuracy_vs_alpha(rows, str(tmp_path / "a.png")) is None


def test_plot_all_returns_every_supported_plot(grid_rows, tmp_path):
    # Prepare
    out = tmp_path / "plots"
    # Execute
    paths = plots.plot_all(grid_rows, str(out))
    # Assert
    assert sorted(os.path.basename(p) for p in paths) == [
        "accuracy-vs-alpha.png",
        "accuracy-vs-epsilon.png",
        "accuracy-vs-r0.png",
        "accuracy-vs-round.png",
        "epsilon-vs-round.png",
    ]
    for p in paths:
        assert_png(p)


def test_plot_command_writes_pngs_and_refuses_an_empty_folder(tmp_path, capsys):
    # Prepare
    for eps in (3.0, 8.0):
        write_run(tmp_path / "runs", f"eps{eps}", epsilon=eps)
    (tmp_path / "empty").mkdir()
    # Execute
    ok = main(["plot", str(tmp_path / "runs"), "--out", str(tmp_path / "figs")])
    printed = capsys.readouterr().out.split()
    empty = main(["plot", str(tmp_path / "empty")])
    # Assert
    assert ok == 0 and empty == 2
    assert str(tmp_path / "figs" / "accuracy-vs-epsilon.png") in printed
    for p in printed:
        assert_png(p)
    assert "no finished runs" in capsys.readouterr().err
