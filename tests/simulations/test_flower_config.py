"""pyproject's [tool.flwr.app.config] holds every setting and parses into valid configs."""

from __future__ import annotations

import pathlib
import tomllib
from dataclasses import fields

from common.config import APP_DEFAULTS, CENTRALIZED_ONLY, FederatedConfig, TrainConfig, split_run_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


# pyproject's value differs from the dataclass default only here, and why
DIFFERENT_ON_PURPOSE = {
    "batch-size": "a silo holds ~1/10 of the data: 256 per silo (centralized default 512)",
    "lr": "the federated plan's client lr, chosen on validation (RESULTS §3c); centralized 0.5",
    "lr-schedule": "the federated plan decays lr by a cosine over its rounds; centralized constant",
    "min-available-nodes": "a deployment waits for two silos before starting",
    "min-train-nodes": "a round needs two valid updates",
    "features": "the federated main job runs on ScatterNet features (RESULTS §3g: higher accuracy, "
    "about a third of the time); centralized default pixels",
    "model": "the linear model on those features (RESULTS §3g); centralized auto",
}


def test_every_setting_is_a_kebab_case_key():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    expected = {f.name.replace("_", "-") for f in (*fields(TrainConfig), *fields(FederatedConfig))}
    assert set(conf) == expected - set(CENTRALIZED_ONLY)
    cfg, fed = split_run_config(conf)
    assert cfg.method == "adadpigu" and cfg.noise_multiplier is None and cfg.sample_rate is None
    assert fed.num_server_rounds >= 2


def test_components_point_at_the_apps():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    from client.app import app as client_app
    from server.app import app as server_app

    assert client_app is not None and server_app is not None


def test_pyproject_and_dataclass_defaults_agree_or_say_why():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg, fed = split_run_config(conf)
    parsed = {**cfg.to_dict(), **fed.to_dict()}
    defaults = {**TrainConfig().to_dict(), **FederatedConfig().to_dict()}
    differ = {k for k in conf if parsed[k] != defaults[k]}
    assert differ == set(DIFFERENT_ON_PURPOSE), differ ^ set(DIFFERENT_ON_PURPOSE)
    # the code's copy of them (the reproduce command of a federated run reads it)
    assert {k: parsed[k] for k in differ} == APP_DEFAULTS


def test_the_reproduce_command_of_a_federated_run_starts_from_the_right_defaults():
    from common.outputs import federated_command

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    shipped, fed = split_run_config(conf)
    flwr_part, simulate_part = federated_command(shipped, fed).split("  # or: ")
    # flwr run . already has the app's settings; adadpigu simulate starts from the dataclass
    assert flwr_part == "flwr run . --run-config ''"
    for key, value in APP_DEFAULTS.items():
        assert f"--{key} {value}" in simulate_part
    # a run with the dataclass's plan (as a federated sweep that does not set it) says so to flwr
    flwr_part, simulate_part = federated_command(
        TrainConfig(features="scatter", model="scatter-linear"), fed
    ).split("  # or: ")
    assert "batch-size=512" in flwr_part and "lr=0.5" in flwr_part and 'lr-schedule="constant"' in flwr_part
    assert "--batch-size" not in simulate_part


def test_the_flower_app_refuses_settings_it_would_ignore():
    import pytest

    from common.errors import ConfigError

    for key in CENTRALIZED_ONLY:
        with pytest.raises(ConfigError, match="centralized training only"):
            split_run_config({key: 5})
