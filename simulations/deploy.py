"""Flower's deployment topology as local processes: ``adadpigu deploy-local``.

:func:`deploy_local` starts what ``docker-compose.yml`` starts, as plain processes on
loopback: one ``flower-superlink`` (insecure or TLS, no runtime dependency installation,
state in a temporary folder) and N ``flower-supernode``\\ s with
``--node-config "partition-id=i num-partitions=N"``. It submits the app with
``flwr run <project> <connection> --stream --run-config <file>`` through a temporary
``FLWR_HOME``, streams the run's log, and stops **every** process it started (their
process groups and all their descendants; SIGTERM, then SIGKILL after a grace period)
when the run ends, on errors, on timeouts and on Ctrl-C.

The SuperLink and the SuperNodes spawn ``flower-superexec`` children (the ServerApp and
the ClientApps run in those); the SuperLink's is in a session of its own. The launcher
therefore records the descendants of the processes it started while they run, so that
it can stop them even after their parent is gone.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import queue
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import split_run_config
from common.errors import ConfigError, UserError
from simulations.launcher import preflight
from simulations.processes import (  # noqa: F401  (process_alive: re-exported for callers)
    GRACE_SECONDS,
    ProcessTracker,
    _Managed,
    _signals_ignored,
    _sigterm_as_interrupt,
    _strip_ansi,
    _Terminated,
    process_alive,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "adadpigu-deploy"
STARTUP_SECONDS = 90.0


# ----- run config ------------------------------------------------------------------------


def app_config_defaults(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the project (the keys a run config may override)."""
    with open(root / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def parse_run_config(text: str | None) -> dict[str, Any]:
    """Parse ``"k=v k2='str'"`` the way ``flwr run --run-config`` does (values are TOML)."""
    if not text:
        return {}
    out: dict[str, Any] = {}
    rest = _PAIR.sub("", text).strip()
    if rest:
        raise UserError(
            f"--run-config: cannot parse {rest!r}; use key=value pairs, e.g. \"epsilon=3 method='dpsgd'\""
        )
    for key, raw in _PAIR.findall(text):
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"--run-config: bad value for {key}: {raw} (strings need quotes)") from exc
    return out


def _toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(key, value, "must be a finite number")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise ConfigError(key, value, "a run-config value must be a bool, int, float or string")


def resolve_run_config(
    overrides: Mapping[str, Any],
    *,
    silos: int,
    data_dir: str | os.PathLike | None = None,
    silo_dirs: list[str] | None = None,
) -> dict[str, Any]:
    """Validate the overrides (keys, types, values) before anything is started; with
    ``silo_dirs``, every silo's own folder is read and checked.

    Returns the overrides with ``out-dir``, ``schema`` and ``server-test-data`` made absolute
    (the ServerApp runs in another process with another working directory).
    """
    defaults = app_config_defaults()
    unknown = sorted(k for k in overrides if k not in defaults)
    if unknown:
        raise UserError(
            f"unknown run-config key(s) {', '.join(unknown)}: every key must exist in "
            "[tool.flwr.app.config] of pyproject.toml"
        )
    merged = {**defaults, **overrides}
    cfg, fed = split_run_config(merged)  # raises ConfigError on a bad value
    # settings that fail only together, every silo's plan and noise, a resume: before any
    # process starts (on the data the silos will read)
    preflight(cfg, fed, silos, data_dir=os.fspath(data_dir) if data_dir else None, silo_dirs=silo_dirs)
    out = dict(overrides)
    out["out-dir"] = os.path.abspath(str(merged["out-dir"]))
    if cfg.schema:
        from common.schema import resolve_schema_path

        out["schema"] = resolve_schema_path(cfg.schema)
    if fed.server_test_data not in ("auto", "none"):
        out["server-test-data"] = os.path.abspath(fed.server_test_data)
    return out


def silo_dirs_for(
    overrides: Mapping[str, Any], silos: int, data_dir: str | os.PathLike | None, silo_data: list[str] | None
) -> list[str] | None:
    """Each silo's own data folder, handed to its SuperNode alone (node config ``data-dir``):
    ``--silo-data`` (one per silo), or for user data the folders a ``silos.toml`` under
    ``data_dir`` lists. None: every silo reads the shared ``data_dir`` (a built-in dataset)."""
    if silo_data:
        if len(silo_data) != silos:
            raise UserError(
                f"--silo-data gives {len(silo_data)} folders for {silos} silos: one folder per silo"
            )
        missing = [d for d in silo_data if not os.path.isdir(d)]
        if missing:
            raise UserError(f"--silo-data: {missing[0]} is not a folder")
        return [os.path.abspath(d) for d in silo_data]
    custom = str(overrides.get("dataset", app_config_defaults().get("dataset"))) == "custom"
    if not custom:
        return None
    from common.silos import silo_folders

    root = os.fspath(data_dir) if data_dir else os.environ.get("ADADPIGU_DATA_DIR", "data")
    folders = silo_folders(root)
    if folders is None:
        raise UserError(
            f"dataset = 'custom': give each silo its folder (--silo-data DIR ... , one per silo) or a "
            f"--data-dir whose silos.toml lists them ({root} has none)"
        )
    if len(folders) != silos:
        raise UserError(f"{root}/silos.toml lists {len(folders)} silos; --silos is {silos}")
    return [os.path.abspath(f) for f in folders]


# ----- ports -------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise :class:`UserError` if ``host:port`` cannot be bound (SO_REUSEADDR, like the servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"port {port} on {host} (for the {what}) is already in use ({exc.strerror}); "
                "stop what uses it or choose another port"
            ) from None


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _flower_bin(name: str) -> str:
    """The Flower executable next to this interpreter (the same venv), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise UserError(f"{name} not found: install the project (pip install -e .) in this environment")
    return found


# ----- the launcher ------------------------------------------------------------------------


def _reader(stream, out: queue.Queue) -> None:
    try:
        for raw in iter(stream.readline, b""):
            out.put(raw.decode(errors="replace").rstrip("\n"))
    finally:
        out.put(None)


def _wait_ready(proc: _Managed, host: str, port: int, deadline: float, what: str) -> None:
    while not _port_open(host, port):
        rc = proc.poll()
        if rc is not None:
            raise UserError(f"{what} (pid {proc.pid}) exited with code {rc} during start-up: {proc.tail()}")
        if time.monotonic() > deadline:
            raise UserError(f"{what} (pid {proc.pid}) did not listen on {host}:{port} in time: {proc.tail()}")
        time.sleep(0.2)


def _find_run_dir(out_dir: str, lines: Iterable[str], t_start: float) -> str | None:
    for line in lines:
        m = re.search(r"run folder (\S+)", _strip_ansi(line))
        if m and os.path.isdir(m.group(1)):
            return m.group(1)
    if not os.path.isdir(out_dir):
        return None
    candidates = [
        os.path.join(out_dir, d)
        for d in os.listdir(out_dir)
        if os.path.isdir(os.path.join(out_dir, d))
        and os.path.getmtime(os.path.join(out_dir, d)) >= t_start - 1
    ]
    return max(candidates, key=os.path.getmtime) if candidates else None


def _trim_work(work: Path, *, remove_home: bool) -> None:
    """Drop the SuperLink state and the installed apps of a work folder, keep its logs."""
    for name in ("state.db", "state.db-shm", "state.db-wal", "run-config.toml"):
        with contextlib.suppress(OSError):
            (work / name).unlink()
    if remove_home:
        shutil.rmtree(work / "flwr-home", ignore_errors=True)


@dataclass
class _Workspace:
    """The temporary folder of one deploy-local run: logs, FLWR_HOME, the run config, env."""

    work: Path
    logs: Path
    home: Path
    run_config_file: Path
    env: dict[str, str]
    tls: dict[str, str]
    superlink_security: list[str]
    supernode_security: list[str]
    silo_dirs: list[str] | None = None  # one data folder per silo: each SuperNode's node-config data-dir


def deploy_local(
    cfg_overrides: Mapping[str, Any],
    *,
    silos: int,
    superlink_port: int = 8000,
    base_supernode_port: int = 9094,
    timeout: float = 3600.0,
    data_dir: str | os.PathLike | None = None,
    flwr_home: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    on_started: Callable[[dict[str, int]], None] | None = None,
    host: str = "127.0.0.1",
    grace: float = GRACE_SECONDS,
    certs_dir: str | os.PathLike | None = None,
    silo_data: list[str] | None = None,
) -> dict:
    """Run one federated job on SuperLink + ``silos`` SuperNodes started as local processes.

    ``silo_data`` (or, for ``dataset = "custom"``, the folders of ``data_dir``'s ``silos.toml``):
    one data folder per silo, handed to that silo's SuperNode alone (node config ``data-dir``).

    ``cfg_overrides`` are run-config keys of ``[tool.flwr.app.config]`` (kebab-case).
    A port of 0 picks a free one (SuperNodes: one each). ``data_dir`` is exported as
    ``ADADPIGU_DATA_DIR`` to every process (default: the current environment's).
    ``on_started`` receives ``{name: pid}`` once everything runs. ``certs_dir`` (the
    output of ``deploy/gen_certs.sh``) switches the SuperLink, the SuperNodes and the
    ``flwr`` CLI to TLS. Returns a summary with
    ``returncode`` (of ``flwr run``), ``run_dir``, ``summary`` (the run's summary.json or
    None), ``pids`` and ``descendant_pids`` (all stopped by then) and ``logs``.
    Raises :class:`UserError` on a taken port, a process dying during start-up, the
    SuperLink dying during the run, or the timeout.
    """
    # 1. check everything that can be checked before a process starts
    _check_positive(silos=silos, timeout=timeout)
    dirs = silo_dirs_for(cfg_overrides, silos, data_dir, silo_data)
    overrides = resolve_run_config(cfg_overrides, silos=silos, data_dir=data_dir, silo_dirs=dirs)
    superlink_port, node_ports = _plan_ports(host, superlink_port, base_supernode_port, silos)
    tls = _tls_files(certs_dir)
    t0, t_wall = time.monotonic(), time.time()
    deadline = t0 + timeout
    ws = _workspace(overrides, host, superlink_port, tls, data_dir, flwr_home)
    ws.silo_dirs = dirs

    # 2. start, watch, stop
    run = _start_watch_stop(
        ws, host, superlink_port, node_ports, t0=t0, deadline=deadline, timeout=timeout, log=log,
        on_started=on_started, grace=grace, keep_home=flwr_home is not None,
    )  # fmt: skip

    # 3. what the run left
    run_dir, summary, logs_dir = _collect(overrides["out-dir"], run.output, t_wall, run.ok, ws, flwr_home)
    processes = {"pids": run.pids, "descendant_pids": run.tracker.descendants()}
    where = {"superlink_address": f"{host}:{superlink_port}", "supernode_ports": node_ports}
    return {"returncode": run.rc, "run_dir": run_dir, "summary": summary, "errors": run.errors, **processes,
            **where, "seconds": time.monotonic() - t0, "logs": logs_dir}  # fmt: skip


@dataclass
class _RunOutcome:
    """What step 2 of :func:`deploy_local` leaves: ``flwr run``'s return code, whether the
    run was watched to its end, the processes started and what ``flwr run`` printed."""

    rc: int | None = None
    ok: bool = False
    pids: dict[str, int] = field(default_factory=dict)
    tracker: ProcessTracker = field(default_factory=ProcessTracker)
    output: collections.deque = field(default_factory=lambda: collections.deque(maxlen=400))
    errors: list[str] = field(default_factory=list)


def _start_watch_stop(
    ws: _Workspace, host: str, superlink_port: int, node_ports: list[int], *, t0: float, deadline: float,
    timeout: float, log: Callable[[str], None], on_started, grace: float, keep_home: bool,
) -> _RunOutcome:  # fmt: skip
    """Start the SuperLink and the SuperNodes, submit the run and watch it to its end, then
    stop every process whatever happened (a second Ctrl-C does not cut that short). A failed
    run keeps its logs (its message names them), not its state; an interrupted one keeps
    nothing."""
    run = _RunOutcome()
    interrupted = False

    def start(name: str, argv: list[str], *, pipe: bool = False) -> _Managed:
        proc = _Managed(name, argv, ws.logs / f"{name}.log", ws.env, os.getcwd(), pipe=pipe)
        run.tracker.add(proc)
        run.pids[name] = proc.pid
        return proc

    try:
        with _sigterm_as_interrupt():
            log(
                f"[deploy] SuperLink on {host}:{superlink_port} ({'TLS' if ws.tls else 'insecure'}), "
                f"{len(node_ports)} SuperNodes on ports {node_ports}"
            )
            superlink, nodes = _start_topology(start, ws, host, superlink_port, node_ports, t0, deadline)
            run.tracker.scan()
            log(
                "[deploy] started "
                + ", ".join(f"{name} (pid {pid})" for name, pid in run.pids.items())
                + f" in {time.monotonic() - t0:.1f}s; submitting the run"
            )
            runner = start(
                "flwr-run",
                [_flower_bin("flwr"), "run", str(PROJECT_ROOT), CONNECTION, "--stream"]
                + ["--run-config", str(ws.run_config_file)],
                pipe=True,
            )
            if on_started is not None:
                on_started(dict(run.pids))
            run.rc = _watch_run(
                runner, superlink, nodes, run.tracker, run.output, run.errors, log, deadline, timeout, ws.logs
            )
            run.ok = True
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        with _signals_ignored():  # a second Ctrl-C must not cut the clean-up short
            left = run.tracker.stop_all(grace)
            if interrupted:
                shutil.rmtree(ws.work, ignore_errors=True)
            elif not run.ok:
                _trim_work(ws.work, remove_home=not keep_home)
        if left:
            log(f"[deploy] warning: processes still alive after SIGKILL: {left}")
    return run


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(name, value, "must be > 0" if name != "silos" else "must be >= 1")


def _plan_ports(
    host: str, superlink_port: int, base_supernode_port: int, silos: int
) -> tuple[int, list[int]]:
    """The SuperLink's and the SuperNodes' ports, each checked free by binding (0 = pick one)."""
    superlink_port = superlink_port or free_port(host)
    check_port_free(host, superlink_port, "SuperLink")
    if base_supernode_port:
        node_ports = [base_supernode_port + i for i in range(silos)]
    else:
        node_ports = []
        while len(node_ports) < silos:
            p = free_port(host)
            if p != superlink_port and p not in node_ports:
                node_ports.append(p)
    if superlink_port in node_ports:
        raise UserError(f"the SuperLink port {superlink_port} collides with the SuperNode ports {node_ports}")
    for i, p in enumerate(node_ports):
        check_port_free(host, p, f"SuperNode {i}")
    return superlink_port, node_ports


def _tls_files(certs_dir: str | os.PathLike | None) -> dict[str, str]:
    tls: dict[str, str] = {}
    if certs_dir is not None:
        for name in ("ca.crt", "server.pem", "server.key"):
            path = Path(certs_dir, name).resolve()
            if not path.is_file():
                raise UserError(f"TLS: {path} not found; create the certificates with deploy/gen_certs.sh")
            tls[name] = str(path)
    return tls


def _workspace(
    overrides: Mapping[str, Any],
    host: str,
    superlink_port: int,
    tls: dict[str, str],
    data_dir: str | os.PathLike | None,
    flwr_home: str | os.PathLike | None,
) -> _Workspace:
    work = Path(tempfile.mkdtemp(prefix="adadpigu-deploy-"))
    logs = work / "logs"
    logs.mkdir()
    home = Path(flwr_home) if flwr_home else work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    security = f"root-certificates = {json.dumps(tls['ca.crt'])}\n" if tls else "insecure = true\n"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{host}:{superlink_port}"\n' + security
    )
    run_config_file = work / "run-config.toml"
    run_config_file.write_text("".join(f"{k} = {_toml_value(k, v)}\n" for k, v in overrides.items()))
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if data_dir is not None:
        env["ADADPIGU_DATA_DIR"] = os.path.abspath(os.fspath(data_dir))
    return _Workspace(
        work,
        logs,
        home,
        run_config_file,
        env,
        tls,
        superlink_security=(
            ["--ssl-ca-certfile", tls["ca.crt"], "--ssl-certfile", tls["server.pem"]]
            + ["--ssl-keyfile", tls["server.key"]]
            if tls
            else ["--insecure"]
        ),
        supernode_security=["--root-certificates", tls["ca.crt"]] if tls else ["--insecure"],
    )


def _start_topology(
    start: Callable[..., _Managed],
    ws: _Workspace,
    host: str,
    superlink_port: int,
    node_ports: list[int],
    t0: float,
    deadline: float,
) -> tuple[_Managed, list[_Managed]]:
    """The SuperLink, then one SuperNode per silo, each waited for until it listens."""
    superlink = start(
        "superlink",
        [
            _flower_bin("flower-superlink"),
            *ws.superlink_security,
            "--disable-runtime-dependency-installation",
            "--host",
            host,
            "--port",
            str(superlink_port),
            "--database",
            str(ws.work / "state.db"),
        ],
    )
    _wait_ready(superlink, host, superlink_port, min(deadline, t0 + STARTUP_SECONDS), "flower-superlink")
    silos = len(node_ports)
    nodes = [
        start(
            f"supernode-{i}",
            [
                _flower_bin("flower-supernode"),
                *ws.supernode_security,
                "--superlink",
                f"{host}:{superlink_port}",
                "--host",
                host,
                "--port",
                str(port),
                "--node-config",
                f"partition-id={i} num-partitions={silos}"
                + (f" data-dir={json.dumps(ws.silo_dirs[i])}" if ws.silo_dirs else ""),
            ],
        )
        for i, port in enumerate(node_ports)
    ]
    startup_deadline = min(deadline, time.monotonic() + STARTUP_SECONDS)
    for node, port in zip(nodes, node_ports):
        _wait_ready(node, host, port, startup_deadline, f"flower-supernode {node.name}")
    return superlink, nodes


def _watch_run(
    runner: _Managed,
    superlink: _Managed,
    nodes: list[_Managed],
    tracker: ProcessTracker,
    output: collections.deque,
    errors: list[str],
    log: Callable[[str], None],
    deadline: float,
    timeout: float,
    logs: Path,
) -> int:
    """Stream ``flwr run``'s output until it exits (its return code); stop on the timeout or a
    dead SuperLink; report SuperNodes that exit (the run goes on without them)."""
    flwr_run = runner.popen
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(flwr_run.stdout, lines), daemon=True).start()
    eof = False
    last_scan = 0.0
    while True:
        batch: list[str | None] = []
        with contextlib.suppress(queue.Empty):
            batch.append(lines.get(timeout=0.5))
            while True:
                batch.append(lines.get_nowait())
        for line in batch:
            if line is None:
                eof = True
                continue
            runner.fh.write((line + "\n").encode())
            line = _strip_ansi(line)
            output.append(line)
            if "adadpigu: error:" in line:  # the message only (the log prefix and ours dropped)
                errors.append(line.split("adadpigu: error:", 1)[1].strip())
            log(line)
        runner.fh.flush()
        if eof and flwr_run.poll() is not None:
            return flwr_run.returncode
        now = time.monotonic()
        if now > deadline:
            raise UserError(
                f"the run did not finish within {timeout:g}s; all processes were stopped (logs: {logs})"
            )
        if superlink.poll() is not None:
            raise UserError(
                f"flower-superlink (pid {superlink.pid}) exited with code {superlink.poll()} "
                f"during the run: {superlink.tail()} (logs: {logs})"
            )
        for node in nodes:
            if node.poll() is not None and not node.reported_exit:
                node.reported_exit = True
                log(
                    f"[deploy] {node.name} (pid {node.pid}) exited with code {node.poll()}; "
                    "the run continues with the remaining silos"
                )
        if now - last_scan > 1.0:
            tracker.scan()
            last_scan = now


def _collect(
    out_dir: str, output: Iterable[str], t_wall: float, ok: bool, ws: _Workspace, flwr_home
) -> tuple[str | None, dict | None, str]:
    """(run folder, its summary.json, where the logs are): a finished run keeps its process
    logs in ``<run folder>/deploy-logs``; the temporary folder goes."""
    run_dir = _find_run_dir(out_dir, output, t_wall)
    summary = None
    if run_dir and os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as fh:
            summary = json.load(fh)
    logs_dir = str(ws.logs)
    if ok and run_dir:
        dest = Path(run_dir) / "deploy-logs"
        shutil.copytree(ws.logs, dest, dirs_exist_ok=True)
        logs_dir = str(dest)
        shutil.rmtree(ws.work, ignore_errors=True)
    else:
        _trim_work(ws.work, remove_home=flwr_home is None)
    return run_dir, summary, logs_dir


# ----- CLI ---------------------------------------------------------------------------------


def cmd_deploy_local(args: argparse.Namespace) -> int:
    overrides = parse_run_config(args.run_config)
    result = deploy_local(
        overrides,
        silos=args.silos,
        superlink_port=args.superlink_port,
        base_supernode_port=args.supernode_port,
        timeout=args.timeout,
        data_dir=args.data_dir,
        certs_dir=args.certs_dir,
        silo_data=args.silo_data,
    )
    summary = result["summary"]
    if args.json:
        print(json.dumps(result))
    if result["returncode"] != 0 or summary is None:
        reason = "; ".join(result["errors"]) or f"flwr run exited with code {result['returncode']}"
        print(
            f"adadpigu: error: the federated run did not complete ({reason}); logs: {result['logs']}",
            file=sys.stderr,
        )
        return 2
    if not args.json:
        print(
            f"[deploy] {summary['rounds_completed']} rounds ({summary['stop_reason']}), max epsilon "
            f"{summary['max_epsilon']}, {result['seconds']:.0f}s; run folder {result['run_dir']}"
        )
    return 0


def register(sub, add_config_flags, config_from_args) -> None:
    """Add ``adadpigu deploy-local`` (the config-flag helpers are unused: settings go through --run-config)."""
    p = sub.add_parser(
        "deploy-local",
        help="run SuperLink + N SuperNodes as local processes and submit the app (flwr run)",
        description="Flower's deployment runtime on one machine: a SuperLink and one SuperNode per silo "
        "on loopback; every process is stopped when the run ends.",
    )
    p.add_argument("--silos", type=int, required=True, help="number of SuperNodes (one data partition each)")
    p.add_argument(
        "--run-config",
        default=None,
        metavar="'k=v ...'",
        help="run-config overrides, as for flwr run, e.g. \"num-server-rounds=5 method='dpsgd'\"",
    )
    p.add_argument("--superlink-port", type=int, default=8000, help="SuperLink HTTP port (0: any free port)")
    p.add_argument(
        "--supernode-port",
        type=int,
        default=9094,
        help="first SuperNode port; silo i uses +i (0: free ports)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="stop everything after this many seconds")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $ADADPIGU_DATA_DIR)")
    p.add_argument(
        "--silo-data",
        nargs="+",
        default=None,
        metavar="DIR",
        help="one data folder per silo, each handed to its own SuperNode only (dataset = 'custom' "
        "default: the folders of --data-dir's silos.toml)",
    )
    p.add_argument(
        "--certs-dir", default=None, help="TLS certificates from deploy/gen_certs.sh (default: insecure)"
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_deploy_local)
