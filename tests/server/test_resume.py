"""Checkpoint / resume of a federated run: the ledger is never lost or under-counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from common.errors import UserError
from server.runner import run_federated
from tests.inprocess import InProcessGrid, small_run_configs

pytestmark = pytest.mark.slow


def configs(tmp_path, data_dir, **fed_kw):
    return small_run_configs(tmp_path, data_dir, epsilon=4.0, rounds=4, train_subset=1800, seed=0, **fed_kw)


def ledger_phases(run_dir):
    data = json.load(open(os.path.join(run_dir, "ledger.json")))
    return {c: (v["phases"], round(v["epsilon"], 9)) for c, v in data["clients"].items()}


class Crash(Exception):
    pass


class CrashBetweenRounds(InProcessGrid):
    """Dies when the server asks for nodes for round 3 (after round 2's checkpoint)."""

    def get_node_ids(self):
        if self.train_rounds_sent == 2 and self.evaluate_rounds_sent == 2:
            raise Crash("server process died")
        return super().get_node_ids()


def test_resume_between_rounds_equals_uninterrupted_run(tmp_path, data_dir):
    cfg, fed = configs(tmp_path / "a", data_dir)
    full = run_federated(
        InProcessGrid(3), cfg, fed, log_fn=lambda s: None, run_dir=str(tmp_path / "a" / "run")
    )
    assert full["rounds_completed"] == 4

    cfg_b, fed_b = configs(tmp_path / "b", data_dir)
    run_b = str(tmp_path / "b" / "run")
    with pytest.raises(Crash):
        run_federated(CrashBetweenRounds(3), cfg_b, fed_b, log_fn=lambda s: None, run_dir=run_b)
    resumed = run_federated(
        InProcessGrid(3), cfg_b, fed_b.__class__(**{**fed_b.__dict__, "resume": run_b}), log_fn=lambda s: None
    )
    assert resumed["rounds_completed"] == 4 and resumed["stop_reason"] == "completed"
    assert ledger_phases(run_b) == ledger_phases(full["run_dir"])
    rows = json.load(open(os.path.join(run_b, "metrics.json")))
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("method", ["dpsgd", "adaclip", "adadpigu", "adadpigu-dynamic"])
def test_seeded_resume_continues_bit_identically(tmp_path, data_dir, method):
    """Client state (AdaCliP statistics, momentum, spend) comes back from the silo's disk
    after a restart: the resumed run is the uninterrupted run, number for number. With a
    dynamic mask (re-scored every round) the server's movement scores come back too."""

    def run_configs(sub):
        cfg, fed = configs(tmp_path / sub, data_dir)
        if method == "adadpigu-dynamic":
            return cfg.replace(method="adadpigu-static", r0=0.5, mask_refresh=1), fed
        return cfg.replace(method=method), fed

    cfg, fed = run_configs("a")
    full = run_federated(
        InProcessGrid(3), cfg, fed, log_fn=lambda s: None, run_dir=str(tmp_path / "a" / "run")
    )
    cfg_b, fed_b = run_configs("b")
    run_b = str(tmp_path / "b" / "run")
    with pytest.raises(Crash):
        run_federated(CrashBetweenRounds(3), cfg_b, fed_b, log_fn=lambda s: None, run_dir=run_b)
    assert os.listdir(os.path.join(run_b, "client-state")), "clients kept no durable state"
    resumed = run_federated(
        InProcessGrid(3), cfg_b, fed_b.__class__(**{**fed_b.__dict__, "resume": run_b}), log_fn=lambda s: None
    )
    assert resumed["stop_reason"] == "completed"
    rows_a = json.load(open(os.path.join(full["run_dir"], "metrics.json")))
    rows_b = json.load(open(os.path.join(run_b, "metrics.json")))
    for key in ("test_accuracy", "test_loss", "val_accuracy", "max_epsilon"):
        assert [r.get(key) for r in rows_a] == [r.get(key) for r in rows_b], key
    assert ledger_phases(run_b) == ledger_phases(full["run_dir"])
    if method == "adadpigu-dynamic":  # built in round 2, re-scored in rounds 3 and 4
        assert [r.get("mask_version") for r in rows_b][1:] == [0, 1, 2, 3]


def test_resume_finds_the_silos_state_whatever_out_dir_says_and_refuses_a_renamed_folder(tmp_path, data_dir):
    """Simulated silos keep their state under the run folder: resuming with another out-dir
    still continues number for number; a renamed run folder would give the silos another run
    key (fresh momentum and empty own privacy accounts) and is refused."""
    cfg, fed = configs(tmp_path / "a", data_dir)
    cfg = cfg.replace(method="dpsgd")
    full = run_federated(
        InProcessGrid(3), cfg, fed, log_fn=lambda s: None, run_dir=str(tmp_path / "a" / "run")
    )
    run_b = str(tmp_path / "b" / "run")
    with pytest.raises(Crash):
        run_federated(CrashBetweenRounds(3), cfg, fed, log_fn=lambda s: None, run_dir=run_b)
    resume = fed.__class__(**{**fed.__dict__, "resume": run_b})
    resumed = run_federated(
        InProcessGrid(3), cfg.replace(out_dir=str(tmp_path / "elsewhere")), resume, log_fn=lambda s: None
    )
    assert resumed["stop_reason"] == "completed" and not os.path.exists(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="finished all its 4 rounds"):  # nothing left to continue
        run_federated(InProcessGrid(3), cfg, resume, log_fn=lambda s: None)
    rows_a = json.load(open(os.path.join(full["run_dir"], "metrics.json")))
    rows_b = json.load(open(os.path.join(run_b, "metrics.json")))
    assert [r["test_accuracy"] for r in rows_a] == [r["test_accuracy"] for r in rows_b]

    run_c = str(tmp_path / "c" / "run")
    with pytest.raises(Crash):
        run_federated(CrashBetweenRounds(3), cfg, fed, log_fn=lambda s: None, run_dir=run_c)
    os.rename(run_c, run_c + "-renamed")
    renamed = fed.__class__(**{**fed.__dict__, "resume": run_c + "-renamed"})
    with pytest.raises(UserError, match="renamed"):
        run_federated(InProcessGrid(3), cfg, renamed, log_fn=lambda s: None)


def test_resume_with_different_settings_is_refused(tmp_path, data_dir):
    cfg, fed = configs(tmp_path, data_dir)
    run = str(tmp_path / "run")
    with pytest.raises(Crash):
        run_federated(CrashBetweenRounds(3), cfg, fed, log_fn=lambda s: None, run_dir=run)
    before = open(os.path.join(run, "ledger.json")).read()
    changed = fed.__class__(**{**fed.__dict__, "resume": run})
    with pytest.raises(UserError, match=r"settings differ.*epsilon"):
        run_federated(InProcessGrid(3), cfg.replace(epsilon=5.0), changed, log_fn=lambda s: None)
    assert open(os.path.join(run, "ledger.json")).read() == before  # nothing damaged


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_old_behaviour(tmp_path, data_dir):
    """A run checkpointed before ``features`` / ``scatter-groups`` existed resumes when they are
    at the values that reproduce it; a missing key without such a value is still refused."""
    import torch

    from server.runner import ADDED_SETTINGS

    cfg, fed = configs(tmp_path, data_dir)
    run = str(tmp_path / "run")
    with pytest.raises(Crash):
        run_federated(CrashBetweenRounds(3), cfg, fed, log_fn=lambda s: None, run_dir=run)
    path = os.path.join(run, "checkpoint.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert {k: ckpt["fingerprint"][k] for k in ADDED_SETTINGS} == ADDED_SETTINGS  # the defaults
    for key in ADDED_SETTINGS:
        del ckpt["fingerprint"][key]
    ckpt["fingerprint"]["partitioner"] = "iid"  # before "auto" existed, "iid" was the default
    torch.save(ckpt, path)
    resume = fed.__class__(**{**fed.__dict__, "resume": run})
    with pytest.raises(UserError, match=r"settings differ.*features: 'pixels' -> 'scatter'"):
        run_federated(InProcessGrid(3), cfg.replace(features="scatter", model="scatter-linear"), resume,
                      log_fn=lambda s: None)  # fmt: skip
    resumed = run_federated(InProcessGrid(3), cfg, resume, log_fn=lambda s: None)
    assert resumed["rounds_completed"] == 4 and resumed["stop_reason"] == "completed"

    del ckpt["fingerprint"]["lr"]  # a key that is not in ADDED_SETTINGS: refused
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"settings differ.*lr: None"):
        run_federated(InProcessGrid(3), cfg, resume, log_fn=lambda s: None)


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from common.config import FederatedConfig, TrainConfig
from server.runner import run_federated
from tests.inprocess import InProcessGrid, small_run_configs
from tests.server.test_resume import configs
import pathlib
cfg, fed = configs(pathlib.Path({out!r}), {data!r})
if {resume!r}:
    fed = fed.__class__(**{{**fed.__dict__, "resume": {run!r}}})
print(run_federated(InProcessGrid(3), cfg, fed, log_fn=lambda s: None, run_dir={run!r})["rounds_completed"])
"""


def test_sigkill_mid_run_then_resume_keeps_the_ledger(tmp_path, data_dir):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ref_cfg, ref_fed = configs(tmp_path / "ref", data_dir)
    ref = run_federated(
        InProcessGrid(3), ref_cfg, ref_fed, log_fn=lambda s: None, run_dir=str(tmp_path / "ref" / "run")
    )
    run = str(tmp_path / "killed" / "run")

    def script(resume: bool) -> list[str]:
        code = SCRIPT.format(root=root, out=str(tmp_path / "killed"), data=data_dir, resume=resume, run=run)
        return [sys.executable, "-c", code]

    proc = subprocess.Popen(script(False), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    ckpt = os.path.join(run, "checkpoint.pt")
    while not os.path.exists(ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert os.path.exists(ckpt), "no checkpoint was written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    out = subprocess.run(script(True), cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.load(open(os.path.join(run, "summary.json")))
    ref_ledger = json.load(open(os.path.join(ref["run_dir"], "ledger.json")))
    led = json.load(open(os.path.join(run, "ledger.json")))
    assert summary["max_epsilon"] <= 4.0  # the budget is never exceeded
    for client, entry in ref_ledger["clients"].items():
        ref_steps = sum(p["steps"] for p in entry["phases"])
        steps = sum(p["steps"] for p in led["clients"][client]["phases"])
        # nothing lost: at least the uninterrupted spend for the rounds that completed; a round that
        # was in flight when the server died stays charged (at most one extra round)
        per_round = ref_steps // 4
        assert steps >= per_round * summary["rounds_completed"]
        assert steps <= ref_steps + per_round


class CrashMidRound(InProcessGrid):
    """Dies while round 3's training messages are out (after the write-ahead ledger)."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if self.train_rounds_sent == 2 and any(m.metadata.message_type == "train" for m in messages):
            raise Crash("server process died mid-round")
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("reserve", [0, 1])
def test_a_kill_mid_round_costs_a_round_unless_a_reserve_was_planned(tmp_path, data_dir, reserve):
    cfg, fed = configs(tmp_path, data_dir, reserve_rounds=reserve)
    run = str(tmp_path / "run")
    with pytest.raises(Crash):
        run_federated(CrashMidRound(3), cfg, fed, log_fn=lambda s: None, run_dir=run)
    resumed = run_federated(
        InProcessGrid(3), cfg, fed.__class__(**{**fed.__dict__, "resume": run}), log_fn=lambda s: None
    )
    assert resumed["max_epsilon"] <= 4.0  # the interrupted round stays charged, the budget holds
    if reserve:
        assert resumed["stop_reason"] == "completed" and resumed["rounds_completed"] == 4
    else:
        assert resumed["stop_reason"].startswith("budget") and resumed["rounds_completed"] == 3


class CrashAfterThreeRounds(InProcessGrid):
    def get_node_ids(self):
        if self.train_rounds_sent == 3:
            raise Crash("server process died")
        return super().get_node_ids()


def test_sparse_evaluation_and_a_kill_between_test_rounds(tmp_path, data_dir):
    """test-every / evaluate-every 2 over 5 rounds: the test set is evaluated on rounds 2, 4
    and the last; the best model is chosen among validation rounds; a kill after round 3
    (between test rounds) resumes to the uninterrupted run's metrics and ledger."""
    import math

    def run_configs(sub):
        cfg, fed = small_run_configs(
            tmp_path / sub, data_dir, epsilon=4.0, rounds=5, train_subset=1800, seed=0,
            test_every=2, evaluate_every=2,
        )  # fmt: skip
        return cfg.replace(method="dpsgd"), fed

    cfg, fed = run_configs("a")
    full = run_federated(
        InProcessGrid(3), cfg, fed, log_fn=lambda s: None, run_dir=str(tmp_path / "a" / "run")
    )
    rows_a = json.load(open(os.path.join(full["run_dir"], "metrics.json")))
    tested = [r["round"] for r in rows_a if not math.isnan(r["test_accuracy"])]
    validated = [r["round"] for r in rows_a if not math.isnan(r.get("val_accuracy", math.nan))]
    assert tested == [0, 2, 4, 5] and validated == [2, 4, 5]
    best = max((r for r in rows_a if r["round"] in validated), key=lambda r: r["val_accuracy"])
    assert full["best_round"] == best["round"]

    cfg_b, fed_b = run_configs("b")
    run_b = str(tmp_path / "b" / "run")
    with pytest.raises(Crash):
        run_federated(CrashAfterThreeRounds(3), cfg_b, fed_b, log_fn=lambda s: None, run_dir=run_b)
    resumed = run_federated(
        InProcessGrid(3), cfg_b, fed_b.__class__(**{**fed_b.__dict__, "resume": run_b}), log_fn=lambda s: None
    )
    assert resumed["stop_reason"] == "completed"
    rows_b = json.load(open(os.path.join(run_b, "metrics.json")))
    for key in ("round", "test_accuracy", "val_accuracy", "max_epsilon"):
        want = [r.get(key, math.nan) for r in rows_a]
        got = [r.get(key, math.nan) for r in rows_b]
        assert len(got) == len(want) and all(
            a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(want, got)
        ), key
    assert ledger_phases(run_b) == ledger_phases(full["run_dir"])
    assert resumed["test_accuracy_best_val"] == full["test_accuracy_best_val"]
