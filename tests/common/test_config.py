"""Config validation: every bad value names the setting, the value and what is allowed."""

from __future__ import annotations

import pytest

from common.config import TrainConfig, parse_schedule
from common.errors import ConfigError


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("method", "sgd-dp", "allowed: nonprivate"),
        ("dataset", "imagenet", "allowed: mnist"),
        ("model", "vgg", "allowed: auto"),
        ("accountant", "moments", "allowed: pld, rdp"),
        ("epsilon", -1.0, "must be a number in (0"),
        ("delta", 1.5, "(0, 1)"),
        ("batch-size", 0, "must be an integer in [1"),
        ("batch-size", "many", "must be an integer"),
        ("clip-norm", 0.0, "(0, inf]"),
        ("lr", float("nan"), "must be a number"),
        ("momentum", 1.0, "[0, 1)"),
        ("epochs", 2.5, "must be an integer"),
        ("r0", 0.0, "(0, 1]"),
        ("schedule", "cosine", "allowed: linear, none, steps"),
        ("schedule", "steps:0.8,0.6", "must not decrease"),
        ("importance", "fisher", "allowed: squared, abs"),
        ("scale-rule", "cube", "allowed: optimal, sqrt"),
        ("optimizer", "lbfgs", "allowed: sgd, adam"),
        ("sample-rate", 2.0, "(0, 1]"),
        ("validation-fraction", 0.95, "[0, 0.9]"),
        ("device", "tpu", "allowed: auto, cpu, cuda"),
        ("no-such-key", 1, "unknown setting"),
    ],
)
def test_bad_value_names_setting_value_and_allowed(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_mapping({key: value})
    msg = str(err.value)
    assert f"'{key}'" in msg
    assert fragment in msg


def test_r_max_below_r0_rejected():
    with pytest.raises(ConfigError, match="r-max"):
        TrainConfig(r0=0.8, r_max=0.5)


def test_private_method_needs_epsilon_or_sigma():
    with pytest.raises(ConfigError, match="epsilon"):
        TrainConfig(method="dpsgd", epsilon=None)
    assert TrainConfig(method="dpsgd", epsilon=None, noise_multiplier=1.0).noise_multiplier == 1.0
    assert TrainConfig(method="nonprivate", epsilon=None).private is False


def test_round_trip_kebab_and_strings():
    cfg = TrainConfig.from_mapping(
        {"method": "dpsgd", "batch-size": "256", "lr": "0.1", "epsilon": "none", "noise-multiplier": "1.2"}
    )
    assert cfg.batch_size == 256 and cfg.lr == 0.1 and cfg.epsilon is None
    assert TrainConfig.from_mapping(cfg.to_dict()) == cfg


def test_config_is_frozen():
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_schedule_parsing():
    assert parse_schedule("linear") == ("linear", ())
    assert parse_schedule("steps:0.6,0.8,1") == ("steps", (0.6, 0.8, 1.0))


def test_batch_larger_than_data_rejected():
    with pytest.raises(ConfigError, match="batch-size"):
        TrainConfig(batch_size=100).resolved_sample_rate(50)


def test_every_setting_has_a_help_line_and_the_cli_shows_it(capsys):
    from dataclasses import fields

    from common.config import HELP, FederatedConfig, TrainConfig
    from simulations.cli import main

    keys = {f.name.replace("_", "-") for cls in (TrainConfig, FederatedConfig) for f in fields(cls)}
    assert keys == set(HELP)
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = capsys.readouterr().out
    assert "fedavg | fedavgm" in out and "(default: 'fedavg')" in out and "--client-optimizer-state" in out


def test_zero_means_unset_for_optional_numbers_on_every_path():
    """--noise-multiplier 0 (the help: 0 = calibrate) is the same as 0 in a TOML; epsilon 0 is
    an error, not 'unset'; a boolean is not a number."""
    for value in ("0", 0, 0.0):
        assert TrainConfig.from_mapping({"noise-multiplier": value}).noise_multiplier is None
        assert TrainConfig.from_mapping({"sample-rate": value}).sample_rate is None
    with pytest.raises(ConfigError, match="epsilon"):
        TrainConfig.from_mapping({"epsilon": "0"})
    with pytest.raises(ConfigError, match="'epsilon' = True"):
        TrainConfig.from_mapping({"epsilon": True})
