"""The bad-input battery: each bad input ends with exit status 2 and one clear line, no traceback,
and nothing is written to the output folder."""

from __future__ import annotations

import os

import pytest

from simulations.cli import main


@pytest.fixture
def corrupt_data(tmp_path):
    raw = tmp_path / "corrupt" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"\x00\x00\x08\x03garbage")
    return str(tmp_path / "corrupt")


def _sweep_file(tmp_path, text):
    path = tmp_path / "s.toml"
    path.write_text(text)
    return str(path)


# a two-silo simulation on a small subset: the federated cases below change one thing in it
SMALL_SIM = [
    "simulate", "--num-supernodes", "2", "--min-available-nodes", "2", "--min-train-nodes", "2",
    "--train-subset", "600", "--batch-size", "64",
]  # fmt: skip

CASES = {
    "unknown method": (["train", "--method", "bogus"], "method"),
    "zero epochs": (["train", "--epochs", "0"], "epochs"),
    "bad delta": (["train", "--delta", "2"], "delta"),
    "decreasing schedule": (["train", "--schedule", "steps:0.9,0.5"], "re-frozen"),
    "negative alpha": ([*SMALL_SIM, "--alpha", "-1"], "alpha"),
    "bad seed": (["train", "--seed", "-5"], "seed"),
    "not a number": (["train", "--lr", "fast"], "lr"),
    "unknown partitioner": ([*SMALL_SIM, "--partitioner", "random"], "partitioner"),
    "missing data": (
        ["train", "--data-dir", "/nonexistent/adadpigu", "--epochs", "1"],
        "could not be downloaded",
    ),
    "model for another dataset": (
        [
            "train",
            "--model",
            "cifar-cnn",
            "--dataset",
            "mnist",
            "--train-subset",
            "500",
            "--batch-size",
            "100",
        ],
        "needs 3x32x32",
    ),
    "batch larger than data": (["train", "--train-subset", "200", "--batch-size", "5000"], "batch-size"),
    "unreachable epsilon": (
        ["train", "--train-subset", "500", "--batch-size", "400", "--epsilon", "0.00001", "--delta", "1e-12"],
        "cannot be reached",
    ),
    "sigma over budget": (
        [
            "train",
            "--train-subset",
            "500",
            "--batch-size",
            "100",
            "--noise-multiplier",
            "0.2",
            "--epsilon",
            "1",
        ],
        "spends epsilon",
    ),
    "privacy: neither sigma nor target": (
        ["privacy", "--sample-rate", "0.1", "--steps", "10"],
        "exactly one",
    ),
    "privacy: bad rate": (
        ["privacy", "--noise-multiplier", "1", "--sample-rate", "3", "--steps", "10"],
        "sample-rate",
    ),
    "privacy: zero steps": (
        ["privacy", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "0"],
        "steps",
    ),
    "privacy: negative sigma": (
        ["privacy", "--noise-multiplier", "-1", "--sample-rate", "0.1", "--steps", "5"],
        "noise-multiplier",
    ),
    "privacy: unreachable": (
        [
            "privacy",
            "--target-epsilon",
            "0.000001",
            "--sample-rate",
            "1",
            "--steps",
            "100000",
            "--delta",
            "1e-12",
            "--accountant",
            "rdp",
        ],
        "cannot be reached",
    ),
    "privacy: nan sigma": (
        ["privacy", "--noise-multiplier", "nan", "--sample-rate", "0.1", "--steps", "5"],
        "noise-multiplier",
    ),
    "privacy: infinite sigma": (
        ["privacy", "--noise-multiplier", "inf", "--sample-rate", "0.1", "--steps", "5"],
        "noise-multiplier",
    ),
    "privacy: nan target": (
        ["privacy", "--target-epsilon", "nan", "--sample-rate", "0.1", "--steps", "5"],
        "target-epsilon",
    ),
    "privacy: delta 1": (
        ["privacy", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "5", "--delta", "1"],
        "delta",
    ),
    "privacy: absurd steps": (
        ["privacy", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "1000000000000"],
        "steps",
    ),
    "train: delta 1": (["train", "--delta", "1"], "delta"),
    "train: nan epsilon": (["train", "--epsilon", "nan"], "epsilon"),
    "train: infinite lr": (["train", "--lr", "inf"], "lr"),
    "simulate: bad server optimizer": (["simulate", "--server-optimizer", "sgd"], "server-optimizer"),
    "simulate: momentum without fedavgm": (["simulate", "--server-momentum", "0.9"], "server-momentum"),
    "simulate: negative local steps": (["simulate", "--local-steps", "-1"], "local-steps"),
    "simulate: bad lr schedule": (["simulate", "--lr-schedule", "warm"], "lr-schedule"),
    # (simulate does not offer --epochs at all: tests/simulations/test_cli.py)
    "deploy-local: a centralized-only setting": (
        ["deploy-local", "--silos", "2", "--run-config", "pretrain-fraction=0.2"],
        "pretrain-fraction",
    ),
    "simulate: batch larger than a silo": (
        ["simulate", "--num-supernodes", "3", "--train-subset", "600", "--batch-size", "300"],
        "batch-size",
    ),
    "deploy-local: batch larger than a silo": (
        ["deploy-local", "--silos", "2", "--run-config", "train-subset=400 batch-size=300"],
        "batch-size",
    ),
    "simulate: no silos": (["simulate", "--num-supernodes", "0"], "num-supernodes"),
    "simulate: more required than silos": (
        ["simulate", "--num-supernodes", "2", "--min-available-nodes", "5"],
        "min-available-nodes",
    ),
    "simulate: zero fraction": (["simulate", "--fraction-train", "0"], "fraction-train"),
    "simulate: importance rounds >= rounds": (
        ["simulate", "--importance-rounds", "5", "--num-server-rounds", "3"],
        "importance-rounds",
    ),
    "sweep: missing file": (["sweep", "/nonexistent/sweep.toml"], "does not exist"),
    "nonprivate with a NaN epsilon": (["train", "--method", "nonprivate", "--epsilon", "nan"], "epsilon"),
    "seed beyond 64 bits": (["train", "--seed", "99999999999999999999"], "seed"),
    "adaptive method, one-step plan": (
        ["train", "--method", "adaclip", "--train-subset", "400", "--sample-rate", "1", "--epochs", "1"],
        "needs at least 2",
    ),
    "simulate: NaN cpus": (["simulate", "--num-cpus", "nan"], "num-cpus"),
    "simulate: more secure-aggregation survivors than silos": (
        [
            "simulate",
            "--num-supernodes",
            "3",
            "--min-available-nodes",
            "3",
            "--min-train-nodes",
            "3",
            "--method",
            "dpsgd",
            "--dp-noise",
            "distributed",
            "--local-steps",
            "1",
            "--secagg-survivors",
            "10",
        ],
        "secagg-survivors",
    ),
    "a flag's type names the flag": (["train", "--batch-size", "1.5"], "'batch-size' = '1.5'"),
    # federated plans that cannot run, refused before Ray starts (they used to fail after it)
    "simulate: fixed sigma over the target": (
        [*SMALL_SIM, "--method", "dpsgd", "--noise-multiplier", "0.3", "--epsilon", "1"],
        "spends epsilon",
    ),
    "simulate: validation noise alone over the target": (
        [
            *SMALL_SIM,
            "--method",
            "dpsgd",
            "--validation-release",
            "noisy",
            "--validation-noise",
            "0.05",
            "--epsilon",
            "2",
        ],
        "'validation-noise' = 0.05",
    ),
    "simulate: a plan over the step limit": (
        [*SMALL_SIM, "--method", "dpsgd", "--local-steps", "1000000", "--num-server-rounds", "101"],
        "'local-steps'",
    ),
    "simulate: resume a folder that is no run": (
        [*SMALL_SIM, "--resume", "/nonexistent/run"],
        "does not exist",
    ),
    "simulate: negative Ray CPUs": (["simulate", "--ray-num-cpus", "-1"], "ray-num-cpus"),
    "simulate: an adaptive server optimizer's setting with fedavg": (
        ["simulate", "--server-tau", "0.1"],
        "server-tau",
    ),
    "simulate: a client larger than Ray": (
        ["simulate", "--num-cpus", "3", "--ray-num-cpus", "2"],
        "num-cpus",
    ),
    "deploy-local: a combination only the server checked": (
        [
            "deploy-local",
            "--silos",
            "2",
            "--run-config",
            "method='dpsgd' validation-release='noisy' validation-fraction=0.0 min-available-nodes=2 min-train-nodes=2",
        ],
        "validation-release",
    ),
    "an absurd learning rate": (["train", "--lr", "1e300"], "lr"),
    "a sample rate of a billion steps": (
        ["train", "--sample-rate", "1e-9", "--train-subset", "500"],
        "'sample-rate'",
    ),
    "simulate: a flag's type names the flag": (
        ["simulate", "--num-server-rounds", "2.5"],
        "'num-server-rounds'",
    ),
    "deploy-local: importance rounds >= rounds": (
        ["deploy-local", "--silos", "2", "--run-config", "num-server-rounds=2 importance-rounds=2"],
        "importance-rounds",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2(name, capsys, tmp_path, data_dir):
    argv, fragment = CASES[name]
    out_dir = tmp_path / "out"
    if argv[0] == "train":
        argv = [*argv, "--out-dir", str(out_dir)]
        if "--data-dir" not in argv:
            argv += ["--data-dir", data_dir]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adadpigu: error:"), err
    assert fragment in err[0]
    assert not out_dir.exists() or not any(out_dir.iterdir()), "a failed start left files behind"


def test_corrupt_data_files(capsys, corrupt_data, tmp_path):
    assert main(["train", "--data-dir", corrupt_data, "--epochs", "1", "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adadpigu: error:" in err[0] and "MNIST" in err[0] or "mnist" in err[0]


def test_sweep_bad_toml_and_bad_cell(capsys, tmp_path):
    assert main(["sweep", _sweep_file(tmp_path, "[sweep\nname=")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["sweep", _sweep_file(tmp_path, '[grid]\nmethod = ["dpsgd", "bogus"]\n')]) == 2
    assert "'method' = 'bogus'" in capsys.readouterr().err
    assert main(["sweep", _sweep_file(tmp_path, "[grid]\n")]) == 2
    assert "grid" in capsys.readouterr().err
    grid = "[grid]\nseed = [0]\n"
    for text, fragment in [
        ("[bsae]\nepochs = 1\n" + grid, "'bsae'"),  # a typo in a table name: its settings would be dropped
        ('[sweep]\nout_dir = "x"\n' + grid, "'sweep.out_dir'"),
        ("sweep = 5\n" + grid, "'sweep' = 5"),
        ("grid = [1, 2]\n", "'grid'"),
        ("[sweep]\nnum-supernodes = 2.7\n" + grid, "'sweep.num-supernodes' = 2.7"),
        ("[sweep]\nnum-cpus = -1\n" + grid, "'sweep.num-cpus' = -1"),
        ('[sweep]\nmode = "central"\n[base]\nnum-server-rounds = 5\n' + grid, "federated setting"),
        ("[grid]\nepsilon = [true]\n", "'epsilon' = True"),
    ]:
        assert main(["sweep", _sweep_file(tmp_path, text)]) == 2, text
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (text, err)


def test_report_group_by_a_setting_no_run_has(capsys, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "summary.json").write_text('{"test_accuracy_best_val": 0.9}')
    (run / "config.json").write_text('{"method": "dpsgd", "seed": 0}')
    assert main(["report", str(tmp_path), "--group", "method,bogus"]) == 2
    assert "'group' = 'bogus'" in capsys.readouterr().err


def test_report_on_empty_folder(capsys, tmp_path):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
