"""The AdaDPIGU ServerApp (Flower Message API).

Settings come from ``context.run_config`` (``[tool.flwr.app.config]`` plus
``flwr run --run-config`` overrides); :func:`make_server_app` builds the same app with
settings fixed in Python (used by ``adadpigu simulate``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from logging import ERROR

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from common.config import FederatedConfig, TrainConfig, split_run_config
from common.errors import UserError
from server.runner import run_federated


def _run_guarded(grid: Grid, cfg: TrainConfig, fed: FederatedConfig, **kwargs) -> dict | None:
    try:
        return run_federated(grid, cfg, fed, **kwargs)
    except UserError as exc:
        log(ERROR, "adadpigu: error: %s", exc)
        return None


# Flower's logger has its own console handler; do not print every line twice via the root logger.
logging.getLogger("flwr").propagate = False

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg, fed = split_run_config(dict(context.run_config))
    except UserError as exc:
        log(ERROR, "adadpigu: error: %s", exc)
        return
    _run_guarded(grid, cfg, fed)


def make_server_app(
    cfg: TrainConfig,
    fed: FederatedConfig,
    *,
    command: str | None = None,
    run_dir: str | None = None,
    on_done: Callable[[dict | None], None] | None = None,
) -> ServerApp:
    """A ServerApp with fixed settings; ``on_done`` receives the run summary, or
    ``{"error": reason}`` when the run failed."""
    fixed = ServerApp()

    @fixed.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            summary = run_federated(grid, cfg, fed, command=command, run_dir=run_dir)
        except Exception as exc:  # the caller's last line names the cause (not "see above")
            log(ERROR, "adadpigu: error: %s", exc)
            summary = {"error": str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"}
        if on_done is not None:
            on_done(summary)

    return fixed
