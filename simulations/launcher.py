"""Run the federated system in Flower's simulation runtime (Ray backend), from Python."""

from __future__ import annotations

import math
import os
import sys

from common.config import FederatedConfig
from common.errors import ConfigError
from common.federated import check_silo_plans, silo_noise


def _check(cfg, fed: FederatedConfig, num_supernodes, num_cpus, num_gpus, ray_num_cpus, ray_address) -> None:
    """Everything that can fail before Ray starts, with the same messages as elsewhere."""
    if ray_address is not None and ray_num_cpus is not None:
        raise ConfigError(
            "ray-num-cpus",
            ray_num_cpus,
            "is set by the cluster's `ray start --num-cpus` when joining one (ray-address)",
        )
    if ray_address is not None and not ray_address.strip():
        raise ConfigError("ray-address", ray_address, "give HOST:PORT of the Ray head, or 'auto'")
    if num_supernodes < 1:
        raise ConfigError("num-supernodes", num_supernodes, "must be >= 1")
    if not (num_cpus > 0 and math.isfinite(num_cpus)):
        raise ConfigError("num-cpus", num_cpus, "must be a number > 0")
    if not (num_gpus >= 0 and math.isfinite(num_gpus)):
        raise ConfigError("num-gpus", num_gpus, "must be a number >= 0")
    preflight(cfg, fed, num_supernodes)
    if ray_num_cpus is not None and not (isinstance(ray_num_cpus, int) and ray_num_cpus >= 1):
        raise ConfigError("ray-num-cpus", ray_num_cpus, "must be an integer >= 1")
    available = ray_num_cpus if ray_num_cpus is not None else (os.cpu_count() or 1)
    if ray_address is None and num_cpus > available:
        raise ConfigError(
            "num-cpus",
            num_cpus,
            f"a client needs more than the {available} CPUs Ray has: no client could start",
        )


def preflight(
    cfg, fed: FederatedConfig, silos: int, *, data_dir: str | None = None, silo_dirs: list[str] | None = None
) -> None:
    """The checks of a federated run that need no process: settings that fail only together,
    every silo's plan (as centrally) and its noise, a resume. ``simulate`` and
    ``deploy-local`` run it before they start anything; the server checks again."""
    fed.importance_rounds_for(cfg)
    fed.check_with(cfg)
    need = max(fed.min_available_nodes, fed.min_train_nodes)
    if need > silos:
        raise ConfigError("min-available-nodes", need, f"cannot exceed the number of silos ({silos})")
    if fed.dp_noise == "distributed" and fed.secagg_survivors > silos:
        raise ConfigError("secagg-survivors", fed.secagg_survivors, f"exceeds the number of silos ({silos})")
    from common.models import build_model_for

    build_model_for(cfg)  # the model (a user's factory: imported and checked) before any data or process
    plans = check_silo_plans(cfg, fed, silos, data_dir=data_dir, silo_dirs=silo_dirs)
    if fed.server_test(cfg) not in (None, "builtin"):
        from server.runner import server_test_set

        server_test_set(cfg, fed)  # the coordinator's test set is read (and checked) before anything runs
    if cfg.private:  # the noise of each distinct plan (calibrated, or the fixed one checked)
        distinct = {(p.sample_rate, p.local_steps): (i, p) for i, p in enumerate(plans)}
        for i, plan in distinct.values():
            silo_noise(cfg, fed, plan, name=f"silo-{i}")
    if fed.resume:
        from server.runner import open_checkpoint

        open_checkpoint(fed.resume, cfg, fed)  # a run that can be continued, with these settings


def simulate(
    cfg,
    fed: FederatedConfig,
    *,
    num_supernodes: int,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    ray_num_cpus: int | None = None,
    ray_address: str | None = None,
    command: str | None = None,
    run_dir: str | None = None,
) -> dict | None:
    """Run the federated system in Flower's simulation runtime (Ray backend) from Python.

    ``ray_address`` ("HOST:PORT" of a head started with ``ray start --head``, or "auto")
    joins an existing Ray cluster, whose nodes then run the clients: the project and the
    data folder must be at the same paths on every node (README "More than one machine").
    """
    _check(cfg, fed, num_supernodes, num_cpus, num_gpus, ray_num_cpus, ray_address)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "ADADPIGU_DATA_DIR")}
    try:
        return _simulate(
            cfg, fed, num_supernodes, num_cpus, num_gpus, ray_num_cpus, ray_address, command, run_dir
        )
    finally:  # the run's settings must not leak into the next run of this process (a sweep's next cell)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _simulate(cfg, fed, num_supernodes, num_cpus, num_gpus, ray_num_cpus, ray_address, command, run_dir):
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray starts its workers at nice 15: next to any normal-priority process the clients
    # then get a few percent of a core. Run them at the caller's priority unless told otherwise.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Ray workers import the apps by module name: make the project importable there.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = root + os.pathsep + os.environ.get("PYTHONPATH", "")
    # the run's data folder (flag > $ADADPIGU_DATA_DIR > ./data, resolved in cfg) is the one
    # every simulated silo reads: a different $ADADPIGU_DATA_DIR must not win in the workers
    os.environ["ADADPIGU_DATA_DIR"] = os.path.abspath(cfg.data_dir)
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import make_server_app

    holder: list[dict | None] = []
    server_app = make_server_app(cfg, fed, command=command, run_dir=run_dir, on_done=holder.append)
    if ray_address is not None:  # a running cluster: its nodes declare their own resources
        init_args: dict = {"address": ray_address.strip()}
    else:
        init_args = {"num_cpus": int(ray_num_cpus or os.cpu_count() or 1)}
        if num_gpus > 0:
            init_args["num_gpus"] = 1
    backend_config = {
        "client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "init_args": init_args,
    }
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_config=backend_config,
    )
    summary = holder[0] if holder else None
    if summary is not None and "run_dir" in summary:
        from simulations.plots import plot_run_label_distribution

        try:
            plot_run_label_distribution(summary["run_dir"])
        except Exception as exc:  # a missing picture must not fail a finished run
            print(f"adadpigu: no label-distribution plot: {exc}", file=sys.stderr)
    return summary
