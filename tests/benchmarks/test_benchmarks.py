"""Benchmarks run in smoke mode so they cannot rot (no timing thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_bench_step_smoke_produces_every_row():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_step", "--smoke", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    from benchmarks.bench_step import METHODS

    assert {r["method"] for r in rows} == set(METHODS)
    assert {"opacus-ghost", "dpsgd-rows", "adadpigu-rows"} <= set(METHODS)
    for r in rows:
        for key in (
            "model",
            "batch_size",
            "method",
            "median_ms",
            "peak_mb",
            "ratio_nonprivate",
            "ratio_opacus",
            "ratio_opacus_ghost",
        ):
            assert key in r, key
        assert r["median_ms"] > 0 and r["peak_mb"] > 0
    assert next(r for r in rows if r["method"] == "nonprivate")["ratio_nonprivate"] == 1.0
    assert next(r for r in rows if r["method"] == "opacus")["ratio_opacus"] == 1.0


def test_bench_comm_sparse_upload_is_r_times_dense():
    from benchmarks.bench_comm import measure

    for r in (0.2, 0.6, 1.0):
        row = measure("mnist-cnn", r)
        assert row["up_ratio_to_r_dense"] <= 1.05
        assert row["mask_bits_bytes"] == (0 if r == 1.0 else (row["parameters"] + 7) // 8)


@pytest.mark.parametrize("local_steps", ["0", "1"])
def test_bench_sim_smoke_produces_a_row(tmp_path, local_steps):
    cmd = [sys.executable, "-m", "benchmarks.bench_sim", "--smoke", "--json", "--out-dir", str(tmp_path)]
    proc = subprocess.run(
        cmd + ["--local-steps", local_steps],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1
    for key in ("clients", "round_seconds_median", "ideal_round_seconds", "overhead_ratio", "peak_rss_mb"):
        assert key in rows[0] and rows[0][key] > 0
    assert 0 < rows[0]["client_phase_seconds_median"] <= rows[0]["round_seconds_median"] * 1.5
    assert rows[0]["server_seconds_median"] >= 0 and rows[0]["flower_ray_seconds_median"] >= 0
    assert 0 < rows[0]["peak_pss_mb"] <= rows[0]["peak_rss_mb"]
    if local_steps == "1":
        assert rows[0]["local_steps"] == 1


def test_bench_accounting_smoke_rows_parse_and_match_the_accountant(tmp_path):
    out = tmp_path / "acc.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_accounting", "--smoke", "--json", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]  # it raises if an epsilon differs from PLDAccountant
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 5 and json.loads(out.read_text())["rows"] == rows
    assert all(r["seconds"] > 0 for r in rows)
    assert all(r["epsilon"] > 0 for r in rows if r["what"].startswith("ledger"))
    from benchmarks.tables import render

    table = render(str(out)).splitlines()
    assert table[0].startswith("| what |") and len(table) == 2 + len(rows)


def test_tables_render_step_and_sim_files(tmp_path):
    from benchmarks.tables import render

    step = {"rows": [{"model": "m", "batch_size": 8, "method": "dpsgd", "median_ms": 1.0, "peak_mb": 10.0,
                      "ratio_nonprivate": 2.0, "ratio_opacus": 0.9}]}  # fmt: skip
    sim = {"rows": [{"clients": 10, "examples_per_client": 600, "local_steps": 8, "batch_size": 64,
                     "round_seconds_median": 1.0, "client_phase_seconds_median": 0.8,
                     "ideal_round_seconds": 0.5, "overhead_ratio": 2.0, "peak_rss_mb": 100.0}]}  # fmt: skip
    for name, data, head in (("s.json", step, "| model |"), ("i.json", sim, "| clients |")):
        (tmp_path / name).write_text(json.dumps(data))
        lines = render(str(tmp_path / name)).splitlines()
        assert lines[0].startswith(head) and len(lines) == 3
    (tmp_path / "bad.json").write_text(json.dumps({"rows": [{"x": 1}]}))
    with pytest.raises(ValueError, match="not a bench"):
        render(str(tmp_path / "bad.json"))


def test_bench_client_start_smoke(tmp_path, data_dir):
    import json

    from benchmarks import bench_client_start

    out = tmp_path / "start.json"
    assert bench_client_start.main(["--repeats", "1", "--data-dir", data_dir, "--out", str(out)]) == 0
    rows = json.load(open(out))["rows"]
    assert [r["variant"] for r in rows] == list(bench_client_start.VARIANTS) and all(
        r["median_s"] > 0 for r in rows
    )


def test_bench_api_smoke(tmp_path):
    from benchmarks import bench_api

    out = tmp_path / "api.json"
    assert bench_api.main(["--batch", "16", "--iters", "2", "--out", str(out)]) == 0
    assert json.load(open(out))["api_over_engine_dpsgd"] > 0


def test_bench_deploy_smoke_produces_a_row(tmp_path):
    """The deployment runtime's per-message cost (no timing threshold: a row that parses)."""
    out = tmp_path / "deploy.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_deploy", "--smoke", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert row["rounds"] == 2 and row["client_phase_seconds_median"] > row["compute_seconds_per_message"] > 0
    assert json.load(open(out))["rows"][0]["silos"] == 2


def test_bench_main_job_smoke_runs_the_readme_command_twice_and_leaves_nothing(tmp_path, data_dir):
    """The README's main job (shrunk by run-config overrides), cold then warm feature cache."""
    from benchmarks import bench_main_job

    out = tmp_path / "main.json"
    plan = "num-server-rounds=2 importance-rounds=1 train-subset=2000 test-subset=300 batch-size=32 seed=0"
    assert bench_main_job.main(["--run-config", plan, "--timeout", "600", "--out", str(out)]) == 0
    rows = json.load(open(out))["rows"]
    assert len(rows) == 2 and all(r["returncode"] == 0 and r["rounds"] == 2 for r in rows)
    assert all(0.1 < r["test_accuracy_final"] <= 1 and 0 < r["max_epsilon"] <= 8 for r in rows)


def test_bench_secagg_smoke_recovers_the_sum_and_counts_bytes():
    from benchmarks.bench_secagg import measure

    row = measure(3, 1000, 2, 1)  # asserts the unmasked sum internally
    assert row["bits_per_coordinate"] == 32 and row["up_ratio"] >= 1.0
    assert row["key_setup_s"] > 0 and row["unmask_s"] > 0


def test_bench_silo_read_smoke_decodes_once_then_reads_the_cache(tmp_path, data_dir):
    out = tmp_path / "silo-read.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_silo_read",
            "--smoke",
            "--data-dir",
            data_dir,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["data"] for r in rows] == ["mnist", "chem97"] and rows[0]["records"] == 300
    assert all(r["decode_read_seconds"] > 0 and r["cached_read_seconds_median"] > 0 for r in rows)
