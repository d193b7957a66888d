"""The pieces of the container end-to-end test (deploy/compose_e2e.sh) that need no containers.

The e2e itself (Podman, images, compose up, runs) is run by CI as its own step
(``deploy/compose_e2e.sh``, docs/DEPLOY.md); here: the run-folder checker it relies on, the
SuperNode-authentication variant of the compose generator, the key script, and the build
files (.dockerignore, layer order) that the e2e exercises.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "deploy" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_run = _load("check_run")
make_compose = _load("make_compose")


# ----- deploy/check_run.py ----------------------------------------------------------------------


def _ledger_rows(rounds: list[int], eps_per_round: float = 2.0) -> list[dict]:
    rows, total = [], 0
    for i, r in enumerate(rounds, start=1):
        total += 10
        rows.append({"round": r, "noise_multiplier": 0.7, "sample_rate": 0.03, "steps": 10, "total_steps": total,
                     "epsilon": eps_per_round * i})  # fmt: skip
    return rows


def _run(
    tmp_path: Path, charged: dict[str, list[int]], rounds: int = 3, failed: dict[int, int] | None = None
):
    """A run folder as the ServerApp writes it, reduced to what the checker reads."""
    failed = failed or {}
    run = tmp_path / "run"
    run.mkdir(parents=True)
    clients = {name: {"epsilon": 2.0 * len(rs), "rounds": _ledger_rows(rs)} for name, rs in charged.items()}
    top = max(c["epsilon"] for c in clients.values())
    ledger = {"private": True, "delta": 1e-5, "target_epsilon": 8.0, "clients": clients, "max_epsilon": top}
    metrics = [{"round": 0, "max_epsilon": 0.0, "clients": None, "failed_clients": None}]
    for r in range(1, rounds + 1):
        sent = sum(r in rs for rs in charged.values())
        eps = max((2.0 * (rs.index(r) + 1) for rs in charged.values() if r in rs), default=0.0)
        metrics.append({"round": r, "max_epsilon": eps, "clients": sent, "failed_clients": failed.get(r, 0)})
    for i in range(1, len(metrics)):
        metrics[i]["max_epsilon"] = max(metrics[i]["max_epsilon"], metrics[i - 1]["max_epsilon"])
    summary = {
        "num_silos": len(charged),
        "rounds_completed": rounds,
        "stop_reason": "completed",
        "target_epsilon": 8.0,
        "max_epsilon": top,
        "test_accuracy_final": 0.35,
    }
    for name, doc in (("summary.json", summary), ("metrics.json", metrics), ("ledger.json", ledger)):
        (run / name).write_text(json.dumps(doc))
    return run


def _rewrite(run: Path, name: str, change) -> None:
    doc = json.loads((run / name).read_text())
    change(doc)
    (run / name).write_text(json.dumps(doc))


def test_check_run_accepts_a_complete_run(tmp_path):
    run = _run(tmp_path, {"silo-0": [1, 2, 3], "silo-1": [1, 2, 3]})
    problems, report = check_run.check(run, silos=2, rounds=3, min_accuracy=0.15)
    assert problems == []
    assert report["charged_rounds"] == {"silo-0": [1, 2, 3], "silo-1": [1, 2, 3]}
    assert check_run.main([str(run), "--silos", "2", "--rounds", "3"]) == 0


def test_check_run_accepts_a_stopped_silo(tmp_path):
    # silo-1 stopped while training round 1: charged once (when it was sent), then left out
    run = _run(tmp_path, {"silo-0": [1, 2, 3], "silo-1": [1]}, failed={1: 1})
    assert check_run.check(run, silos=2, rounds=3, expect_failed=True)[0] == []
    problems = check_run.check(run, silos=2, rounds=3)[0]
    assert problems == []  # nothing wrong with the accounting either way
    run2 = _run(tmp_path / "b", {"silo-0": [1, 2, 3], "silo-1": [1, 2, 3]})
    assert any("failed client" in p for p in check_run.check(run2, silos=2, rounds=3, expect_failed=True)[0])


def test_check_run_finds_a_double_charge(tmp_path):
    run = _run(tmp_path, {"silo-0": [1, 2, 3], "silo-1": [1, 2, 3]})

    def twice(ledger):
        rows = ledger["clients"]["silo-1"]["rounds"]
        extra = copy.deepcopy(rows[1])
        extra["total_steps"] = rows[1]["total_steps"] + 10
        rows.insert(2, extra)
        for later in rows[3:]:
            later["total_steps"] += 10

    _rewrite(run, "ledger.json", twice)
    problems = check_run.check(run, silos=2, rounds=3)[0]
    assert any("a round twice" in p for p in problems), problems
    assert any("round 2 charged 3 silos, sent to 2" in p for p in problems), problems


def test_check_run_finds_a_charge_for_a_silo_not_sent_to(tmp_path):
    run = _run(tmp_path, {"silo-0": [1, 2, 3], "silo-1": [1]}, failed={1: 1})
    _rewrite(run, "metrics.json", lambda m: m[2].update(clients=0))
    problems = check_run.check(run, silos=2, rounds=3, expect_failed=True)[0]
    assert problems == ["ledger: round 2 charged 1 silos, sent to 0"]


def test_check_run_budget_accuracy_and_shape(tmp_path):
    run = _run(tmp_path, {"silo-0": [1, 2, 3, 4, 5]}, rounds=5)  # 2 per round: 10 > 8
    problems = check_run.check(run, silos=1, rounds=5)[0]
    assert any("not within (0, 8.0]" in p for p in problems)
    assert any("epsilon 10.0 (target 8.0)" in p for p in problems)
    run = _run(tmp_path / "b", {"silo-0": [1, 2], "silo-1": [1, 2]}, rounds=2)
    _rewrite(run, "summary.json", lambda s: s.update(test_accuracy_final=0.11))
    problems = check_run.check(run, silos=3, rounds=3, min_accuracy=0.15)[0]
    assert any("num_silos 2, expected 3" in p for p in problems)
    assert any("expected 3 (completed)" in p for p in problems)
    assert any("not above 0.15" in p for p in problems)
    assert any("accounts ['silo-0', 'silo-1'], expected" in p for p in problems)
    (run / "ledger.json").unlink()
    assert check_run.check(run, silos=2, rounds=2)[0] == [f"ledger.json missing from {run}"]


def test_check_run_stop_with_a_reason_is_accepted_only_after_a_fault(tmp_path):
    run = _run(tmp_path, {"silo-0": [1], "silo-1": [1]}, rounds=1, failed={1: 2})
    _rewrite(run, "summary.json", lambda s: s.update(stop_reason="clients: round 1 got 0 valid updates"))
    assert check_run.check(run, silos=2, rounds=3, expect_failed=True)[0] == []
    assert check_run.check(run, silos=2, rounds=3)[0]


# ----- make_compose.py --tls --auth ---------------------------------------------------------------


def _opt(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


@pytest.mark.parametrize("silos", [2, 3])
def test_auth_override(silos):
    doc = yaml.safe_load(make_compose.compose_tls(silos, auth=True))
    link = [str(c) for c in doc["services"]["superlink"]["command"]]
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    for i in range(1, silos + 1):
        node = doc["services"][f"supernode-{i}"]
        cmd = [str(c) for c in node["command"]]
        key = _opt(cmd, "--auth-supernode-private-key")
        assert key == f"/supernode-keys/supernode-{i}"
        assert {"source": f"supernode-{i}-key", "target": key} in node["secrets"]
        assert doc["secrets"][f"supernode-{i}-key"]["file"].endswith(f"/supernode-{i}")
        assert "ADADPIGU_SUPERNODE_KEYS_DIR" in doc["secrets"][f"supernode-{i}-key"]["file"]
    # without --auth: the committed TLS file, unchanged
    plain = yaml.safe_load(make_compose.compose_tls(silos))
    assert "--enable-supernode-auth" not in plain["services"]["superlink"]["command"]
    assert not any(k.endswith("-key") and k.startswith("supernode") for k in plain["secrets"])


def test_auth_needs_tls(tmp_path):
    with pytest.raises(ValueError, match="TLS"):
        make_compose.superlink_command(False, auth=True)
    with pytest.raises(SystemExit):
        make_compose.main(["--silos", "2", "--auth"])
    out = tmp_path / "auth.yml"
    assert make_compose.main(["--silos", "2", "--tls", "--auth", "-o", str(out)]) == 0
    assert "--silos 2 --tls --auth" in out.read_text()


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="ssh-keygen (openssh-client) not installed")
def test_gen_supernode_keys(tmp_path):
    script = ROOT / "deploy" / "gen_supernode_keys.sh"
    proc = subprocess.run(["bash", str(script), "2", "-o", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for i in (1, 2):
        assert (tmp_path / f"supernode-{i}").stat().st_mode & 0o077 == 0
        assert (tmp_path / f"supernode-{i}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    again = subprocess.run(["bash", str(script), "2", "-o", str(tmp_path)], capture_output=True, text=True)
    assert again.returncode == 1 and "exists" in again.stderr
    # the keys load the way Flower loads them (OpenSSH format, an EC key)
    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    key = serialization.load_ssh_private_key((tmp_path / "supernode-1").read_bytes(), password=None)
    assert key.curve.name == "secp384r1"


# ----- the build files the e2e uses ---------------------------------------------------------------


def test_e2e_script_parses_and_uses_the_committed_files():
    script = (ROOT / "deploy" / "compose_e2e.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "deploy" / "compose_e2e.sh")]).returncode == 0
    assert '-f $ROOT/docker-compose.yml"' in script  # the committed file, unchanged
    assert '"$ROOT/docker-compose.tls.yml"' in script
    assert "down -v" in script and "trap cleanup EXIT" in script
    assert re.search(r'-f "\$ROOT/Dockerfile"', script)


def test_dockerignore_admits_exactly_what_the_dockerfile_copies():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set()
    for line in dockerfile.splitlines():
        m = re.match(r"COPY (?:--\S+ )*(.+) \S+$", line)
        if m:
            copied.update(m.group(1).split())
    assert copied == {"pyproject.toml", "README.md", "common", "client", "server", "simulations"}
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    ignore = [ln for ln in ignore if ln and not ln.startswith("#")]
    assert ignore[0] == "**"  # an allow-list: nothing else enters the build context
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert allowed == copied


def test_dockerfile_layers_change_least_often_first():
    text = (ROOT / "Dockerfile").read_text()
    torch = text.index("torch==2.14.1 torchvision==0.29.1")
    deps = text.index("COPY --chown=app:app pyproject.toml ./")
    code = text.index("COPY --chown=app:app common ./common")
    assert torch < deps < code
    # the project itself is installed without resolving dependencies again
    assert "pip install --no-cache-dir --no-deps ." in text
    assert "TORCH_INDEX_URL" in text  # CPU-only builds (docs/DEPLOY.md)
