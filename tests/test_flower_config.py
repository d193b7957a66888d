"""pyproject's [tool.flwr.app.config] holds every setting and parses into valid configs."""

from __future__ import annotations

import pathlib
import tomllib
from dataclasses import fields

from common.config import FederatedConfig, TrainConfig, split_run_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_setting_is_a_kebab_case_key():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    expected = {f.name.replace("_", "-") for f in (*fields(TrainConfig), *fields(FederatedConfig))}
    assert set(conf) == expected
    cfg, fed = split_run_config(conf)
    assert cfg.method == "adadpigu" and cfg.noise_multiplier is None and cfg.sample_rate is None
    assert fed.num_server_rounds >= 2


def test_components_point_at_the_apps():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    from client.app import app as client_app
    from server.app import app as server_app

    assert client_app is not None and server_app is not None
