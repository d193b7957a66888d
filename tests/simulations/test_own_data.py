"""Real silos (issue 26): each silo trains on its own folder (per-silo CSV files, per-silo image
folders) with a user model given by import path, in a Ray simulation, in-process and with
``deploy-local``; no central test set (federated, noisy, accounted) or the coordinator's own;
every bad input of a silo's data refused with its message before anything runs."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld

from common.config import FederatedConfig, TrainConfig
from common.schema import builtin_schema, schema_toml
from common.silos import write_silo_file, write_silos_file
from server.runner import run_federated
from server.strategy import RoundError
from simulations.split import split
from tests.inprocess import InProcessGrid

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHEM97_SCHEMA = os.path.join(ROOT, "simulations", "schemas", "chem97.toml")
USER_TABLE_MODEL = "simulations.example_models:residual_mlp"
USER_IMAGE_MODEL = "simulations.example_models:small_cnn"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADADPIGU_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def chem_silos(tmp_path, data_dir):
    """Chem97 in 3 silos of consecutive education authorities (CSV), as adadpigu split writes them."""
    args = argparse.Namespace(
        dataset="custom", data_dir=data_dir, schema=CHEM97_SCHEMA,
        source=os.path.join(data_dir, "chem97", "chem97.csv"), silos=3, partitioner="column", by="lea",
        alpha=0.5, classes_per_silo=2, min_silo_size=10, seed=0, format="csv", out=str(tmp_path / "chem"),
    )  # fmt: skip
    result = split(args)
    assert result["silos"] == 3 and sum(result["sizes"]) == 31022
    return str(tmp_path / "chem")


@pytest.fixture
def image_silos(tmp_path, data_dir):
    """Two silos of MNIST PNGs with different digits (0-4, 5-9), and the coordinator's own
    test folder: what a user with image folders has."""
    from PIL import Image

    from common.datafiles import read_mnist

    x, y = read_mnist(os.path.join(data_dir, "MNIST", "raw"), "mnist", False)
    root = tmp_path / "images"
    for name, digits, rows in (
        ("silo-0", range(5), range(0, 4000)),
        ("silo-1", range(5, 10), range(0, 4000)),
        ("server-test", range(10), range(4000, 4300)),
    ):
        count = 0
        for i in rows:
            if int(y[i]) in digits and (name == "server-test" or count < 200):
                (root / name / str(int(y[i]))).mkdir(parents=True, exist_ok=True)
                Image.fromarray(x[i]).save(root / name / str(int(y[i])) / f"{i}.png")
                count += 1
        if name != "server-test":
            write_silo_file(str(root / name), count, name)
    write_silos_file(str(root), ["silo-0", "silo-1"])
    (root / "schema.toml").write_text(schema_toml(builtin_schema("mnist")))
    return str(root)


def grid_on(root: str, silos: int) -> InProcessGrid:
    """An in-process grid whose silos read the per-silo root ``root`` (the run's data-dir)."""
    grid = InProcessGrid(silos)
    for ctx in grid.contexts.values():
        ctx.run_config["data-dir"] = root
    return grid


def _cli(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _simulate_chem(chem_silos: str, out, *extra: str) -> subprocess.CompletedProcess:
    """``adadpigu simulate`` of the 3 Chem97 silos with CHEM_SIM's plan."""
    return _cli(
        "simulate",
        "--num-supernodes",
        "3",
        "--data-dir",
        chem_silos,
        "--out-dir",
        str(out),
        *CHEM_SIM,
        *extra,
    )


def _summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CHEM_SIM = [
    "--dataset", "custom", "--schema", CHEM97_SCHEMA, "--model", USER_TABLE_MODEL, "--test-fraction", "0.2",
    "--num-server-rounds", "3", "--importance-rounds", "1", "--batch-size", "128", "--lr", "0.5",
    "--clip-norm", "1.0", "--epsilon", "3", "--seed", "0",
]  # fmt: skip


def test_simulate_on_per_silo_csv_files_with_a_user_model_and_no_central_test_set(tmp_path, chem_silos):
    out = tmp_path / "runs"
    summary = _summary(_simulate_chem(chem_silos, out, "--json"))
    assert (
        summary["stop_reason"] == "completed"
        and summary["dataset"] == "custom"
        and summary["schema"] == "chem97"
    )
    assert summary["test_source"].startswith("federated, noisy")
    assert 0 < summary["test_accuracy_std"] < 0.02 and 0.2 < summary["test_accuracy_final"] <= 1
    assert summary["max_epsilon"] <= 3.0
    rows = json.load(open(os.path.join(summary["run_dir"], "metrics.json")))
    assert math.isnan(rows[0]["test_accuracy"])  # the initial model is not measured (no release for it)
    assert all(r["test_accuracy_std"] > 0 for r in rows[1:])
    plan = json.load(open(os.path.join(summary["run_dir"], "plan.json")))
    # each silo released the size its own silo.toml declares (split into train / validation / test)
    for i in range(3):
        declared = int(
            open(os.path.join(chem_silos, f"silo-{i}", "silo.toml")).read().split("declared-size = ")[1]
        )
        n_test = round(declared * 0.2)
        assert plan[f"silo-{i}"]["n_train"] == declared - n_test - round((declared - n_test) * 0.1)


def test_simulate_on_per_silo_image_folders_with_the_coordinators_test_set(tmp_path, image_silos):
    summary = _summary(
        _cli(
            "simulate", "--num-supernodes", "2", "--data-dir", image_silos, "--dataset", "custom",
            "--schema", os.path.join(image_silos, "schema.toml"), "--model", USER_IMAGE_MODEL,
            "--server-test-data", os.path.join(image_silos, "server-test"), "--num-server-rounds", "3",
            "--importance-rounds", "1", "--batch-size", "32", "--epsilon", "8", "--seed", "0",
            "--out-dir", str(tmp_path / "runs"), "--json",
        )
    )  # fmt: skip
    assert summary["stop_reason"] == "completed" and summary["test_source"].startswith("server (")
    assert (
        summary["test_accuracy_std"] == 0.0 and summary["test_accuracy_final"] > 0.15
    )  # 10 classes: chance 0.1


def test_the_federated_test_release_is_accounted_as_dp_accounting_composes_it(tmp_path, chem_silos):
    cfg = TrainConfig(
        method="dpsgd", dataset="custom", schema=CHEM97_SCHEMA, model="logreg", test_fraction=0.2, batch_size=128,
        lr=0.5, clip_norm=1.0, epsilon=4.0, seed=0, data_dir=chem_silos, out_dir=str(tmp_path), accountant="pld",
    )  # fmt: skip
    fed = FederatedConfig(
        num_server_rounds=3, importance_rounds=0, local_steps=2, min_available_nodes=3, min_train_nodes=3,
        startup_timeout=30, test_noise=8.0,
    )  # fmt: skip
    summary = run_federated(grid_on(chem_silos, 3), cfg, fed, log_fn=lambda s: None)
    assert summary["stop_reason"] == "completed"
    ledger = json.load(open(os.path.join(summary["run_dir"], "ledger.json")))
    entry = ledger["clients"]["silo-0"]
    train = [p for p in entry["phases"] if p["sample_rate"] < 1]
    test = [p for p in entry["phases"] if p["sample_rate"] == 1.0]
    assert sum(p["steps"] for p in test) == 3  # one test release per round (test-every auto: every round)
    assert all(p["noise_multiplier"] == pytest.approx(8.0 / math.sqrt(2)) for p in test)
    sigma, q = train[0]["noise_multiplier"], train[0]["sample_rate"]
    acc = pld.PLDAccountant()
    acc.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 6
                ),
                dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(8.0 / math.sqrt(2)), 3),
            ]
        )
    )
    assert entry["epsilon"] == pytest.approx(acc.get_epsilon(cfg.delta), rel=1e-6)
    assert entry["epsilon"] <= 4.0 + 1e-9  # calibrated with the test releases in the plan


def _two_round_plan(tmp_path, chem_silos) -> tuple[TrainConfig, FederatedConfig]:
    cfg = TrainConfig(
        method="dpsgd", dataset="custom", schema=CHEM97_SCHEMA, model="logreg", test_fraction=0.2, batch_size=64,
        epsilon=4.0, seed=0, data_dir=chem_silos, out_dir=str(tmp_path / "runs"),
    )  # fmt: skip
    fed = FederatedConfig(
        num_server_rounds=2, importance_rounds=0, min_available_nodes=3, min_train_nodes=3, startup_timeout=30
    )
    return cfg, fed


def test_a_silo_whose_schema_differs_is_refused_by_name_before_anything_is_spent(tmp_path, chem_silos):
    text = open(os.path.join(chem_silos, "schema.toml")).read().replace("max = 8", "max = 9")
    with open(os.path.join(chem_silos, "silo-1", "schema.toml"), "w") as fh:
        fh.write(text)
    cfg, fed = _two_round_plan(tmp_path, chem_silos)
    with pytest.raises(RoundError, match=r"silo 1: its schema differs from the run's"):
        run_federated(grid_on(chem_silos, 3), cfg, fed, log_fn=lambda s: None)
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")  # no run folder left


def test_the_server_hears_only_that_a_silos_data_do_not_match(tmp_path, chem_silos, caplog):
    path = os.path.join(chem_silos, "silo-2", "data.csv")
    with open(path, "a") as fh:
        fh.write('999,1,1,4,"X",0,5.5\n')  # gender X is not a category of the schema
    cfg, fed = _two_round_plan(tmp_path, chem_silos)
    with caplog.at_level(logging.ERROR):
        with pytest.raises(RoundError) as err:
            run_federated(grid_on(chem_silos, 3), cfg, fed, log_fn=lambda s: None)
    assert (
        str(err.value) == "silo 2: its data do not match the schema (the details are on the silo's own log)"
    )
    assert "category 'X' is not in the schema" in caplog.text  # the silo's own log has the detail


# ----- bad input through the CLI: refused before Ray starts, one line, no run folder ---------------


def _bad(tmp_path, chem_silos, edit, *extra):
    edit(chem_silos)
    out = tmp_path / "runs"
    proc = _simulate_chem(chem_silos, out, *extra)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not os.listdir(out)
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("adadpigu: error:")][-1]


def _append(row):
    def edit(root):
        with open(os.path.join(root, "silo-1", "data.csv"), "a") as fh:
            fh.write(row)

    return edit


BAD = {
    "a missing label": (
        _append("1,1,1,,F,0,5.0\n"),
        r"silo 1: .*data.csv \(rows are file lines\): row \d+ has no label",
    ),
    "a wrong type": (_append("1,1,1,4,F,old,5.0\n"), r"column 'age': 'old' is not a number"),
    "too many columns": (_append("1,1,1,4,F,0,5.0,7\n"), r"Expected 7 columns, got 8"),
    "a category not in the schema": (_append("1,1,1,4,X,0,5.0\n"), r"category 'X' is not in the schema"),
    "a label not in the schema": (_append("1,1,1,5,F,0,5.0\n"), r"label '5' is not a class of the schema"),
    "an empty silo folder": (
        lambda root: os.remove(os.path.join(root, "silo-1", "data.csv")),
        r"silo 1: .*silo-1 is empty",
    ),
    "a missing silo folder": (
        lambda root: shutil.rmtree(os.path.join(root, "silo-2")),
        r"silos.toml lists silo-2, which is not a folder",
    ),
    "a silo far from its declared size": (
        lambda root: open(os.path.join(root, "silo-0", "silo.toml"), "w").write("declared-size = 100\n"),
        r"silo 0: this silo's number of records differs from its declared size",
    ),
    "a silo whose schema differs": (
        lambda root: open(os.path.join(root, "silo-2", "schema.toml"), "w").write(
            open(CHEM97_SCHEMA).read().replace("max = 12", "max = 24")
        ),
        r"silo 2: the schema it holds .* differs from the run's",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_silo_data_is_refused_before_anything_runs(case, tmp_path, chem_silos):
    edit, message = BAD[case]
    import re

    line = _bad(tmp_path, chem_silos, edit)
    assert re.search(message, line), line


@pytest.mark.parametrize(
    "model, message",
    [
        ("nosuchpackage.models:make", r"module 'nosuchpackage.models' does not import"),
        ("simulations.example_models:nothing", r"has no callable 'nothing'"),
        (
            "tests.simulations.bad_models:wrong_width",
            r"returns \[3, 7\] for a batch of 3; the schema has 6 classes",
        ),
        ("tests.simulations.bad_models:batchnorm", r"BatchNorm1d: BatchNorm mixes examples"),
        ("tests.simulations.bad_models:mixing", r"per-sample gradient differs from its own gradient"),
    ],
)
def test_a_bad_user_model_is_refused_before_anything_runs(model, message, tmp_path, chem_silos):
    import re

    line = _bad(tmp_path, chem_silos, lambda root: None, "--model", model)
    assert re.search(message, line), line


def test_an_out_of_bounds_value_is_clipped_counted_and_warned_on_the_silos_log(tmp_path, chem_silos):
    from common.schema import load_schema
    from common.silos import read_dataset

    with open(os.path.join(chem_silos, "silo-1", "data.csv"), "a") as fh:
        fh.write("1,1,1,4,F,40,5.0\n")  # age 40 months from the centre: outside [-12, 12]
    with_log = []
    handler = logging.Handler()
    handler.emit = lambda record: with_log.append(record.getMessage())
    logging.getLogger("adadpigu.data").addHandler(handler)
    try:
        data = read_dataset(os.path.join(chem_silos, "silo-1"), load_schema(CHEM97_SCHEMA))
    finally:
        logging.getLogger("adadpigu.data").removeHandler(handler)
    assert any("1 value(s) of column 'age' outside [-12, 12] clipped" in m for m in with_log)
    assert float(data.x[-1, 2]) == 1.0  # clipped to the bound, then scaled


# ----- deploy-local: each SuperNode gets its own folder -----------------------------------------


def test_deploy_local_on_per_silo_csv_files(tmp_path, chem_silos):
    from simulations.deploy import deploy_local

    shutil.rmtree(os.path.join(chem_silos, "silo-2"))  # two silos, of different sizes
    write_silos_file(chem_silos, ["silo-0", "silo-1"])
    path = os.path.join(chem_silos, "silo-1", "data.csv")
    lines = open(path).read().splitlines(keepends=True)
    open(path, "w").write("".join(lines[:3001]))
    write_silo_file(os.path.join(chem_silos, "silo-1"), 3000, "silo-1")
    result = deploy_local(
        {
            "dataset": "custom", "schema": CHEM97_SCHEMA, "model": USER_TABLE_MODEL, "features": "pixels",
            "test-fraction": 0.2, "num-server-rounds": 2, "importance-rounds": 1, "batch-size": 128, "lr": 0.5,
            "clip-norm": 1.0, "epsilon": 3.0, "seed": 0, "out-dir": str(tmp_path / "runs"),
            "min-available-nodes": 2, "min-train-nodes": 2,
        },
        silos=2, superlink_port=0, base_supernode_port=0, timeout=600, data_dir=chem_silos, log=lambda s: None,
    )  # fmt: skip
    assert result["returncode"] == 0 and result["summary"] is not None, result["errors"]
    s = result["summary"]
    assert s["stop_reason"] == "completed" and s["test_source"].startswith("federated, noisy")
    # each SuperNode read its own folder: silo 1 holds (and declared) 3,000 records
    plan = json.load(open(os.path.join(result["run_dir"], "plan.json")))
    assert plan["silo-1"]["n_train"] == 2160 and plan["silo-0"]["n_train"] > 5000


def test_deploy_local_on_per_silo_image_folders(tmp_path, image_silos):
    from simulations.deploy import deploy_local

    result = deploy_local(
        {
            "dataset": "custom", "schema": os.path.join(image_silos, "schema.toml"), "model": USER_IMAGE_MODEL,
            "features": "pixels", "server-test-data": os.path.join(image_silos, "server-test"),
            "num-server-rounds": 2, "importance-rounds": 1, "batch-size": 32, "epsilon": 8.0, "seed": 0,
            "out-dir": str(tmp_path / "runs"), "min-available-nodes": 2, "min-train-nodes": 2,
        },
        silo_data=[os.path.join(image_silos, "silo-0"), os.path.join(image_silos, "silo-1")],
        silos=2, superlink_port=0, base_supernode_port=0, timeout=600, log=lambda s: None,
    )  # fmt: skip
    assert result["returncode"] == 0 and result["summary"] is not None, result["errors"]
    assert result["summary"]["stop_reason"] == "completed" and result["summary"]["test_accuracy_final"] > 0.1
    assert np.isfinite(result["summary"]["max_epsilon"])


def test_split_writes_exactly_the_built_in_partitions_examples(tmp_path, data_dir):
    """The exported per-silo image folders hold, silo by silo, exactly the examples (the same
    normalized tensors) of the built-in Dirichlet partition: the own-data path is exact."""
    import torch

    from common.federated import load_silo
    from common.schema import load_schema
    from common.silos import read_dataset

    args = argparse.Namespace(
        dataset="mnist", data_dir=data_dir, schema=None, source=None, silos=3, partitioner="dirichlet", by=None,
        alpha=0.5, classes_per_silo=2, min_silo_size=10, seed=0, format="imagefolder", out=str(tmp_path / "m"),
        subset=600,
    )  # fmt: skip
    split(args)
    schema = load_schema(str(tmp_path / "m" / "schema.toml"))
    assert schema.digest() == builtin_schema("mnist").digest()
    cfg = TrainConfig(
        dataset="mnist", partitioner="dirichlet", alpha=0.5, seed=0, train_subset=600, data_dir=data_dir
    )
    for pid in range(3):
        shard = load_silo(cfg, pid, 3)
        ours = read_dataset(str(tmp_path / "m" / f"silo-{pid}"), schema)
        theirs_x = torch.cat([shard.train.x, shard.validation.x])
        theirs_y = torch.cat([shard.train.y, shard.validation.y])

        def rows(x, y):
            return sorted((int(label), tuple(img.flatten().tolist())) for img, label in zip(x, y))

        assert rows(ours.x, ours.y) == rows(theirs_x, theirs_y), pid


@pytest.mark.parametrize(
    "fed_kw",
    [
        {"dp_noise": "distributed", "local_steps": 1, "secagg_key_rounds": 2},
        {"server_optimizer": "fedadam", "server_lr": 0.05, "local_steps": 2},
    ],
    ids=["secure-aggregation", "fedadam"],
)
def test_adadpigu_masks_secure_aggregation_and_server_optimizers_run_on_a_user_model(
    fed_kw, tmp_path, chem_silos
):
    cfg = TrainConfig(
        method="adadpigu", dataset="custom", schema=CHEM97_SCHEMA, model=USER_TABLE_MODEL, test_fraction=0.2,
        batch_size=128, lr=0.5, clip_norm=1.0, epsilon=8.0, seed=0, data_dir=chem_silos, out_dir=str(tmp_path),
    )  # fmt: skip
    fed = FederatedConfig(
        num_server_rounds=4,
        importance_rounds=1,
        min_available_nodes=3,
        min_train_nodes=3,
        startup_timeout=30,
        **fed_kw,
    )
    summary = run_federated(grid_on(chem_silos, 3), cfg, fed, log_fn=lambda s: None)
    assert summary["stop_reason"] == "completed" and summary["max_epsilon"] <= 8.0
    rows = json.load(open(os.path.join(summary["run_dir"], "metrics.json")))
    # the mask came from the importance round
    assert rows[-1]["mask_version"] >= 1 and rows[2]["active_ratio"] < 1.0
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows[1:])  # the silos' federated test releases
    assert len({round(r["test_accuracy"], 6) for r in rows[1:]}) > 1  # the model moved between rounds
