"""Shared fixtures. The real datasets come from ``$ADADPIGU_DATA_DIR`` (CI: ../shared/data)."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _data_dir() -> str:
    env = os.environ.get("ADADPIGU_DATA_DIR")
    if env:
        return env
    return str((ROOT / ".." / "shared" / "data").resolve())


os.environ.setdefault("ADADPIGU_DATA_DIR", _data_dir())
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> str:
    path = _data_dir()
    assert os.path.isdir(os.path.join(path, "MNIST", "raw")), (
        f"MNIST not found under {path}: set ADADPIGU_DATA_DIR to torchvision's data folder"
    )
    return path


# ----- the suite writes only under pytest's temporary folders, never into the checkout ----------

_BUILD_LITTER = ("__pycache__", ".pyc", ".ruff_cache", ".pytest_cache", ".egg-info", ".venv")


def checkout_files() -> set[str] | None:
    """Untracked and ignored paths of the checkout (git's view), leaving out what importing
    and linting write; None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "-uall", "-z"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    paths = {entry[3:] for entry in out.stdout.split("\0") if entry[:2] in ("??", "!!")}
    return {p for p in paths if not any(part in p for part in _BUILD_LITTER)}


def pytest_configure(config: pytest.Config) -> None:
    # Hypothesis keeps its example database and constants cache in ./.hypothesis unless told
    # otherwise; send them to a temporary folder that the session removes
    import shutil
    import tempfile

    from hypothesis import configuration

    home = tempfile.mkdtemp(prefix="adadpigu-hypothesis-")
    configuration.set_hypothesis_home_dir(home)
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config._checkout_before = checkout_files()  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = getattr(session.config, "_checkout_before", None)
    after = checkout_files()
    if before is None or after is None:
        return
    # an output folder that was there already (results/ of a sweep running beside the suite on a
    # developer's machine) may grow meanwhile; on CI's clean clone there is none
    busy = {p.split("/", 1)[0] for p in before if "/" in p}
    new = sorted(p for p in after - before if p.split("/", 1)[0] not in busy)
    if new:
        shown = "\n  ".join(new[:20])
        print(f"\nthe tests wrote {len(new)} file(s) into the checkout (tmp_path is the place):\n  {shown}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
