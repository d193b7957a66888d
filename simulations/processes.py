"""Process supervision: processes started in their own sessions, their descendants found
through /proc (PID reuse guarded by start times), and all of them stopped — SIGTERM, then
SIGKILL after a grace period. Used by ``deploy-local`` and by ``simulate`` on Ctrl-C."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

GRACE_SECONDS = 5.0
_TAIL_LINES = 6


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether the process exists, is not a zombie and (if given) has this start time."""
    st = _proc_stat(pid)
    if st is None:
        if not os.path.isdir("/proc"):  # no procfs (macOS): fall back to signal 0
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return False
    return st[0] != "Z" and (start is None or st[2] == start)


class _Managed:
    """A process started in its own session, with its output in a log file."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str], cwd: str, *, pipe: bool = False
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.fh = open(log_path, "wb")  # closed in close()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else self.fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        st = _proc_stat(self.pid)
        self.start = st[2] if st else None
        self.reported_exit = False

    def poll(self) -> int | None:
        return self.popen.poll()

    def tail(self, n: int = _TAIL_LINES) -> str:
        """The last ``n`` non-empty lines of the log, joined into one line."""
        try:
            self.fh.flush()
            lines = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, ValueError):
            return ""
        kept = [_strip_ansi(line).strip() for line in lines if line.strip()][-n:]
        return " | ".join(kept)[-1500:] or "(no output)"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class ProcessTracker:
    """Remembers the processes started and all their descendants, and stops them all."""

    def __init__(self) -> None:
        self.managed: list[_Managed] = []
        self.known: dict[int, int] = {}  # pid -> start time (guards against PID reuse)
        self._own_pgid = os.getpgid(0)

    def add(self, proc: _Managed) -> None:
        self.managed.append(proc)
        if proc.start is not None:
            self.known[proc.pid] = proc.start

    def scan(self) -> None:
        """Record the descendants of every known process (call while they run)."""
        if not self.known or not os.path.isdir("/proc"):
            return
        children: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            st = _proc_stat(int(entry))
            if st is not None:
                children[st[1]].append((int(entry), st[2]))
        stack = [pid for pid, start in self.known.items() if process_alive(pid, start)]
        while stack:
            pid = stack.pop()
            for child, start in children.get(pid, ()):
                if child not in self.known:
                    self.known[child] = start
                    stack.append(child)

    def descendants(self) -> list[int]:
        roots = {p.pid for p in self.managed}
        return sorted(pid for pid in self.known if pid not in roots)

    def _living(self) -> list[tuple[int, int]]:
        return [(pid, start) for pid, start in self.known.items() if process_alive(pid, start)]

    def _signal_all(self, sig: int) -> None:
        groups: set[int] = set()
        for proc in self.managed:
            if proc.poll() is None:
                groups.add(proc.pid)  # started with start_new_session: pgid == pid
        for pid, _ in self._living():
            with contextlib.suppress(OSError):
                pgid = os.getpgid(pid)
                if pgid != self._own_pgid and pgid in self.known:
                    groups.add(pgid)
        for pgid in groups:
            if pgid != self._own_pgid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, sig)
        for pid, _ in self._living():
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    def _wait_all(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            for proc in self.managed:
                proc.poll()  # reap our own children
            if not self._living() and all(p.poll() is not None for p in self.managed):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def stop_all(self, grace: float = GRACE_SECONDS) -> list[int]:
        """SIGTERM every process group and descendant, SIGKILL what is left after ``grace``.

        Returns the PIDs that were still alive at the end (normally none).
        """
        self.scan()
        if self._living() or any(p.poll() is None for p in self.managed):
            self._signal_all(signal.SIGTERM)
            if not self._wait_all(grace):
                self._signal_all(signal.SIGKILL)
                self._wait_all(grace)
        for proc in self.managed:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=1.0)
            proc.close()
        return [pid for pid, _ in self._living()]


class _Terminated(KeyboardInterrupt):
    """SIGTERM received by the launcher: handled like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def descendants_of(root: int) -> list[int]:
    """PIDs of every living descendant of ``root`` (children, their children, ...)."""
    if not os.path.isdir("/proc"):
        return []
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                children[st[1]].append(int(entry))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            out.append(child)
            stack.append(child)
    return out


def processes_with_env(key: str, value: str) -> list[int]:
    """PIDs (other than ours) of living processes whose environment holds ``key=value``: how
    the processes a job started are found after their parent is gone (a tag it exported)."""
    needle = f"{key}={value}".encode()
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if needle in env and process_alive(int(entry)):
            found.append(int(entry))
    return found


def _signal_and_wait(pids: list[int], sig: int, grace: float) -> None:
    """Send ``sig`` to ``pids`` and wait up to ``grace`` seconds for them to end (reaping
    children of ours on the way)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(process_alive(p) for p in pids):
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        time.sleep(0.1)


def kill_descendants(root: int, grace: float = GRACE_SECONDS) -> list[int]:
    """SIGTERM every descendant of ``root``, SIGKILL what is left after ``grace``; returns
    the PIDs still alive at the end (normally none)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_and_wait([p for p in descendants_of(root) if process_alive(p)], sig, grace)
    return [p for p in descendants_of(root) if process_alive(p)]


def stop_processes(roots: list[int], grace: float = GRACE_SECONDS) -> list[int]:
    """SIGTERM ``roots`` and all their descendants, SIGKILL what is left after ``grace``;
    returns the PIDs still alive at the end (normally none)."""

    def living() -> list[int]:
        return [p for r in roots for p in (r, *descendants_of(r)) if process_alive(p)]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_and_wait(living(), sig, grace)
    return living()


def flwr_home() -> Path:
    """Flower's home folder as ``flwr`` resolves it: ``$FLWR_HOME``, else ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def local_superlink_pids(home: Path | None = None) -> list[int]:
    """PIDs of the ``flower-superlink`` that ``flwr run .`` started for the Flower home
    ``home`` (default: :func:`flwr_home`): Flower 1.42 starts it detached with
    ``--log-file <home>/local-superlink/superlink.log``, which names its home exactly, so a
    SuperLink of another home, project or deployment is never matched."""
    log_file = str((home or flwr_home()).resolve() / "local-superlink" / "superlink.log")
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        except OSError:
            continue
        names = [os.path.basename(a) for a in argv[:2]]  # the script, or the interpreter + the script
        if "flower-superlink" not in names:
            continue
        given = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--log-file"]
        if given and os.path.realpath(given[-1]) == log_file and process_alive(int(entry)):
            found.append(int(entry))
    return found


def stop_local_superlink(home: Path | None = None, grace: float = GRACE_SECONDS) -> list[int]:
    """Stop the local SuperLink of ``home`` and its children (the ``flower-superexec`` it
    runs apps in); the PIDs it stopped. Raises RuntimeError naming any that survived."""
    roots = local_superlink_pids(home)
    stopped = [p for r in roots for p in (r, *descendants_of(r))]
    left = stop_processes(roots, grace=grace)
    if left:
        raise RuntimeError(f"processes {left} did not stop")
    return stopped
