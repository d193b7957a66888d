"""Run configuration: one frozen, self-validating dataclass for every setting.

The same settings appear as kebab-case keys in ``[tool.flwr.app.config]``
(``pyproject.toml``) and as ``--kebab-case`` CLI flags; :meth:`TrainConfig.from_mapping`
accepts either spelling. A bad value raises :class:`~common.errors.ConfigError`
naming the setting, the value and what is allowed.

The method names follow DESIGN.md §2 ("Baselines live in the same code path").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from common.errors import ConfigError
from common.feature_norm import SCATTER_NORMS
from common.scatter import FEATURES, SCATTER_CHANNELS

METHODS = ("nonprivate", "dpsgd", "adaclip", "adadpigu-static", "adadpigu")
BUILTIN_DATASETS = ("mnist", "fashionmnist", "cifar10")
# "custom": the user's own data, described by a public schema (schema = "path/to/schema.toml",
# common/schema.py), one folder per silo (common/silos.py)
DATASETS = (*BUILTIN_DATASETS, "custom")
MODELS = (
    "auto",
    "mnist-cnn",
    "mnist-cnn-gn",
    "cifar-cnn",
    "cifar-cnn-gn",
    "resnet18-gn",
    "wrn16-4",
    "scatter-cnn",
    "scatter-linear",
    "logreg",
    "mlp",
)
# a user's model: "package.module:factory", called with (input shape, number of classes)
USER_MODEL = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
# the models that take ScatterNet features (features = "scatter"), not pixels
SCATTER_MODELS = ("scatter-cnn", "scatter-linear")
ACTIVATIONS = ("tanh", "relu")
ACCOUNTANTS = ("pld", "rdp")
OPTIMIZERS = ("sgd", "adam")
IMPORTANCE = ("squared", "abs")
SCALE_RULES = ("optimal", "sqrt")
MASK_SCOPES = ("global", "per-layer")
DEVICES = ("auto", "cpu", "cuda")
PER_SAMPLE_BACKENDS = ("auto", "ghost", "native", "hooks", "functorch")
# how a data holder's records become silos: a split of a built-in dataset, "none" (each silo
# trains on all of its local records: its own folder), or "auto" (built-in: iid; custom: none)
SPLITTING_PARTITIONERS = ("iid", "dirichlet", "pathological", "size-skew")
PARTITIONERS = ("auto", "none", *SPLITTING_PARTITIONERS)
CLIENT_OPTIMIZER_STATES = ("keep", "reset")
# what leaves a silo for model selection (docs/PRIVACY.md): nothing (the last round's model is
# released), its correct-prediction count with accounted Gaussian noise, or exact metrics
# (the opt-out: outside the DP guarantee, flagged in the run folder and the console)
VALIDATION_RELEASES = ("none", "noisy", "exact")
DP_NOISE = ("local", "distributed")
SILO_SIZES = ("declared", "exact")
# the server's test set: "auto" (a built-in dataset's test split; user data: none), "none", or a
# dataset path read with the run's schema
SERVER_TEST_AUTO = ("auto", "none")
# federated evaluation on the silos' local test splits: "auto" (noisy when the server has no
# test set, else none), "none", "noisy" (counts + Gaussian noise, accounted), "exact" (opt-out)
FEDERATED_TESTS = ("auto", "none", "noisy", "exact")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")  # common.server_opt
LR_SCHEDULES = ("constant", "cosine", "linear")  # common.server_opt.lr_factor

DEFAULT_DATA_DIR_ENV = "ADADPIGU_DATA_DIR"


def default_data_dir() -> str:
    """The data directory: ``$ADADPIGU_DATA_DIR`` or ``./data``."""
    return os.environ.get(DEFAULT_DATA_DIR_ENV, "data")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(name, value, "allowed: " + ", ".join(allowed))


def check_number(
    name: str,
    value: object,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
) -> None:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise ConfigError(name, value, f"must be {kind}")
    v = float(value)  # type: ignore[arg-type]
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(name, value, f"must be {kind} in {left}{lo_s}, {hi_s}{right}")


def parse_schedule(text: str) -> tuple[str, tuple[float, ...]]:
    """Parse an unfreezing schedule.

    ``"linear"``: r grows linearly from ``r0`` to ``r-max`` over the training phase.
    ``"none"``: r stays at ``r0`` (the static mask).
    ``"steps:0.6,0.8,1.0"``: explicit ratios, one per training epoch (federated: per
    round); the last value is held after the list ends.
    """
    text = text.strip()
    if text in ("linear", "none"):
        return text, ()
    if text.startswith("steps:"):
        try:
            values = tuple(float(v) for v in text[len("steps:") :].split(",") if v.strip())
        except ValueError:
            raise ConfigError(
                "schedule", text, "steps must be comma-separated numbers, e.g. steps:0.6,0.8,1.0"
            ) from None
        if not values:
            raise ConfigError("schedule", text, "steps: needs at least one ratio")
        if any(not (0.0 < v <= 1.0) for v in values):
            raise ConfigError("schedule", text, "every ratio must be in (0, 1]")
        if any(b < a for a, b in zip(values, values[1:])):
            raise ConfigError("schedule", text, "ratios must not decrease (nothing is re-frozen)")
        return "steps", values
    raise ConfigError("schedule", text, "allowed: linear, none, steps:r1,r2,...")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run (centralized or one federated client's local training).

    Privacy settings follow DESIGN.md §1: a target ``(epsilon, delta)`` from which the
    noise multiplier is calibrated over the whole planned schedule, unless
    ``noise_multiplier`` is given explicitly.
    """

    method: str = "adadpigu"
    dataset: str = "mnist"
    model: str = "auto"
    activation: str = "tanh"  # of the paper's CNNs
    # what the model sees: the images, or their ScatterNet features (Tramer & Boneh 2021; a fixed
    # transform, no privacy cost, common/scatter.py), normalized per example by a GroupNorm of
    # scatter-groups groups without parameters
    features: str = "pixels"
    scatter_groups: int = 27
    # or "data": standardize each feature channel by a mean and scale of the training set
    # released under DP before training (Tramer & Boneh 2021; common/feature_norm.py), two
    # Gaussian sum queries with noise multiplier scatter-norm-noise on per-example statistics
    # clipped to scatter-norm-clip; charged to the budget. Centralized training only.
    scatter_norm: str = "group"
    scatter_norm_noise: float = 8.0
    scatter_norm_clip: float = 1.0
    # privacy
    epsilon: float | None = 8.0
    delta: float = 1e-5
    accountant: str = "pld"
    noise_multiplier: float | None = None
    pretrain_noise_multiplier: float | None = None
    # sampling: expected batch size (q = batch_size / n) unless sample_rate is given
    batch_size: int = 512
    sample_rate: float | None = None
    # clipping: L2 clip of per-sample rows; in phase 2 of rows standardized by the AdaCliP
    # statistics, whose scale is normalised (mean(b^2) = 1) so C keeps its raw-gradient units
    clip_norm: float = 0.1
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.9
    # the client learning rate over the plan: per epoch (centralized) or per round (federated)
    lr_schedule: str = "constant"
    # exponential moving average of the weights (De et al. 2022), 0 = off: evaluation and model
    # selection use the averaged weights. Per model update: a step (centralized), a round (federated)
    ema_decay: float = 0.0
    # augmentation multiplicity (De et al. 2022): K augmented copies per example, gradients
    # averaged before clipping (sensitivity unchanged); 0 = no augmentation
    augmult: int = 0
    epochs: int = 40
    # AdaDPIGU
    pretrain_fraction: float = 0.1
    r0: float = 0.6
    r_max: float = 1.0
    schedule: str = "linear"
    mask_scope: str = "global"
    importance: str = "squared"
    # dynamic mask: re-score the importance every m stages (epochs / rounds) from the weights'
    # movement under released updates (0 = the paper's static ranking from the importance phase)
    mask_refresh: int = 0
    # AdaCliP statistics
    beta1: float = 0.99
    beta2: float = 0.9
    h1: float = 1e-10
    h2: float = 1e2
    scale_rule: str = "optimal"
    # data
    data_dir: str = field(default_factory=default_data_dir)
    # dataset = "custom": the public schema (a TOML file; relative paths are looked up in the
    # working folder, then in the app's folder, which Flower ships to every silo)
    schema: str = ""
    validation_fraction: float = 0.1
    # share of each data holder's records held out as its local test split (a test/ sub-folder
    # of its data takes precedence); federated evaluation measures the model there
    test_fraction: float = 0.0
    train_subset: int = 0
    test_subset: int = 0
    # model = "mlp": hidden layer widths, comma-separated ("" = none: logistic regression)
    mlp_hidden: str = "64"
    # federated data split (used by the Flower apps)
    partitioner: str = "auto"
    alpha: float = 0.5
    classes_per_silo: int = 2
    min_silo_size: int = 10
    # what a silo tells the server about its size (aggregation weights, q = B / n): a public
    # "declared" size (node config declared-size, else declared-silo-size, else the IID share
    # of the public dataset size), checked locally within silo-size-tolerance; or the
    # "exact" counts (the opt-out: a release outside the DP guarantee, flagged)
    silo_sizes: str = "declared"
    declared_silo_size: int = 0
    silo_size_tolerance: float = 0.25
    # execution
    seed: int = -1
    device: str = "auto"
    per_sample_backend: str = "auto"
    max_physical_batch: int = 1024
    out_dir: str = "runs"

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("dataset", self.dataset, DATASETS)
        self._check_data()
        self._check_model_and_features()
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("accountant", self.accountant, ACCOUNTANTS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("importance", self.importance, IMPORTANCE)
        _choice("scale-rule", self.scale_rule, SCALE_RULES)
        _choice("mask-scope", self.mask_scope, MASK_SCOPES)
        _choice("device", self.device, DEVICES)
        _choice("per-sample-backend", self.per_sample_backend, PER_SAMPLE_BACKENDS)
        _choice("partitioner", self.partitioner, PARTITIONERS)
        _choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        self._check_privacy()
        self._check_optimisation()
        self._check_adaptive()
        self._check_splits_and_paths()

    def _check_privacy(self) -> None:
        if self.private and self.epsilon is None and self.noise_multiplier is None:
            raise ConfigError("epsilon", self.epsilon, "a private method needs a target epsilon > 0")
        if self.epsilon is not None:  # checked for every method: a nonprivate run records it too
            check_number("epsilon", self.epsilon, lo=0.0, lo_open=True, hi=1e4)
        check_number("delta", self.delta, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        if self.noise_multiplier is not None:
            check_number("noise-multiplier", self.noise_multiplier, lo=0.0, lo_open=True, hi=1e9)
        if self.pretrain_noise_multiplier is not None:
            check_number(
                "pretrain-noise-multiplier",
                self.pretrain_noise_multiplier,
                lo=0.0,
                lo_open=True,
                hi=1e9,
            )

    def _check_optimisation(self) -> None:
        check_number("batch-size", self.batch_size, lo=1, integer=True)
        if self.sample_rate is not None:
            check_number("sample-rate", self.sample_rate, lo=0.0, hi=1.0, lo_open=True)
        check_number("clip-norm", self.clip_norm, lo=0.0, lo_open=True)
        check_number("lr", self.lr, lo=0.0, lo_open=True, hi=1e6)
        check_number("momentum", self.momentum, lo=0.0, hi=1.0, hi_open=True)
        check_number("ema-decay", self.ema_decay, lo=0.0, hi=1.0, hi_open=True)
        check_number("augmult", self.augmult, lo=0, hi=256, integer=True)
        check_number("epochs", self.epochs, lo=1, integer=True)
        check_number("pretrain-fraction", self.pretrain_fraction, lo=0.0, hi=1.0, hi_open=True)

    def _check_adaptive(self) -> None:
        """AdaDPIGU's mask schedule and AdaCliP's clipping statistics."""
        check_number("r0", self.r0, lo=0.0, hi=1.0, lo_open=True)
        check_number("r-max", self.r_max, lo=0.0, hi=1.0, lo_open=True)
        if self.r_max < self.r0:
            raise ConfigError("r-max", self.r_max, f"must be >= r0 ({self.r0})")
        parse_schedule(self.schedule)
        check_number("mask-refresh", self.mask_refresh, lo=0, hi=1_000_000, integer=True)
        if self.mask_refresh > 0 and not self.uses_mask:
            raise ConfigError(
                "mask-refresh",
                self.mask_refresh,
                f"re-scores AdaDPIGU's mask; method {self.method} has no mask",
            )
        check_number("beta1", self.beta1, lo=0.0, hi=1.0, hi_open=True)
        check_number("beta2", self.beta2, lo=0.0, hi=1.0, hi_open=True)
        check_number("h1", self.h1, lo=0.0, lo_open=True)
        check_number("h2", self.h2, lo=0.0, lo_open=True)
        if self.h2 <= self.h1:
            raise ConfigError("h2", self.h2, f"must be > h1 ({self.h1:g})")
        if self.method in ("adadpigu", "adadpigu-static", "adaclip") and self.pretrain_fraction <= 0:
            raise ConfigError(
                "pretrain-fraction",
                self.pretrain_fraction,
                f"method {self.method} needs a pre-training phase (> 0) for its "
                "importance scores and clipping statistics",
            )

    def _check_splits_and_paths(self) -> None:
        check_number("validation-fraction", self.validation_fraction, lo=0.0, hi=0.9)
        check_number("test-fraction", self.test_fraction, lo=0.0, hi=0.9)
        if self.validation_fraction + self.test_fraction > 0.95:
            raise ConfigError(
                "test-fraction",
                self.test_fraction,
                "with validation-fraction it leaves (almost) nothing to train on",
            )
        check_number("train-subset", self.train_subset, lo=0, integer=True)
        check_number("test-subset", self.test_subset, lo=0, integer=True)
        check_number("alpha", self.alpha, lo=0.0, lo_open=True)
        check_number("classes-per-silo", self.classes_per_silo, lo=1, integer=True)
        check_number("min-silo-size", self.min_silo_size, lo=1, integer=True)
        _choice("silo-sizes", self.silo_sizes, SILO_SIZES)
        check_number("declared-silo-size", self.declared_silo_size, lo=0, hi=10**9, integer=True)
        check_number("silo-size-tolerance", self.silo_size_tolerance, lo=0.0, hi=10.0)
        check_number("seed", self.seed, lo=-1, hi=2**63 - 1, integer=True)
        check_number("max-physical-batch", self.max_physical_batch, lo=1, integer=True)
        if not isinstance(self.data_dir, str) or not self.data_dir:
            raise ConfigError("data-dir", self.data_dir, "must be a non-empty path")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigError("out-dir", self.out_dir, "must be a non-empty path")

    # ----- derived properties -------------------------------------------------
    @property
    def private(self) -> bool:
        return self.method != "nonprivate"

    @property
    def uses_mask(self) -> bool:
        return self.method in ("adadpigu", "adadpigu-static")

    @property
    def uses_adaptive_clip(self) -> bool:
        return self.method in ("adaclip", "adadpigu", "adadpigu-static")

    @property
    def seeded(self) -> bool:
        return self.seed >= 0

    @property
    def custom(self) -> bool:
        return self.dataset == "custom"

    @property
    def user_model(self) -> bool:
        """``model`` names a factory of the user's ("package.module:factory")."""
        return ":" in self.model

    def resolved_partitioner(self) -> str:
        if self.partitioner != "auto":
            return self.partitioner
        return "none" if self.custom else "iid"

    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.mlp_hidden.split(",") if v.strip())

    def resolved_model(self, kind: str | None = None, input_shape: tuple[int, ...] | None = None) -> str:
        """The model ``auto`` stands for: on built-in data the paper's CNN (ScatterNet CNN on
        features); on user data (its schema's ``kind`` and ``input_shape``) an MLP for tables,
        the paper's CNNs for 1x28x28 / 3x32x32 images, the GroupNorm ResNet-18 otherwise."""
        if self.model != "auto":
            return self.model
        if self.features == "scatter":
            return "scatter-cnn"
        if self.custom:
            if kind == "table":
                return "mlp"
            if input_shape == (1, 28, 28):
                return "mnist-cnn"
            return "cifar-cnn" if input_shape == (3, 32, 32) else "resnet18-gn"
        return "cifar-cnn" if self.dataset == "cifar10" else "mnist-cnn"

    def _check_data(self) -> None:
        if not isinstance(self.schema, str):
            raise ConfigError("schema", self.schema, "must be a path")
        if self.custom and not self.schema:
            raise ConfigError(
                "schema", self.schema, "dataset = 'custom' needs the public schema of the data (a TOML file)"
            )
        if not self.custom and self.schema:
            raise ConfigError(
                "schema", self.schema, f"describes user data: set dataset = 'custom' (not '{self.dataset}')"
            )
        if self.custom and self.partitioner in SPLITTING_PARTITIONERS:
            raise ConfigError(
                "partitioner",
                self.partitioner,
                "splits a built-in dataset; user data come in one folder per silo (adadpigu split "
                "writes them from one dataset): use auto or none",
            )
        if not isinstance(self.mlp_hidden, str) or not all(
            v.strip().isdigit() and 1 <= int(v) <= 100_000 for v in self.mlp_hidden.split(",") if v.strip()
        ):
            raise ConfigError(
                "mlp-hidden", self.mlp_hidden, 'must be comma-separated widths, e.g. "64,32" ("" = none)'
            )

    def _check_model_and_features(self) -> None:
        if not (isinstance(self.model, str) and USER_MODEL.match(self.model)):
            _choice("model", self.model, MODELS)
        _choice("features", self.features, FEATURES)
        scatter_model = self.model in SCATTER_MODELS
        if self.features == "scatter" and self.model not in ("auto", *SCATTER_MODELS) and not self.user_model:
            raise ConfigError(
                "model",
                self.model,
                f"features = 'scatter' needs a model made for them ({', '.join(SCATTER_MODELS)}, or auto)",
            )
        if scatter_model and self.features != "scatter":
            raise ConfigError("features", self.features, f"model {self.model} needs features = 'scatter'")
        _choice("scatter-norm", self.scatter_norm, SCATTER_NORMS)
        if self.scatter_norm != "group" and self.features != "scatter":
            raise ConfigError(
                "scatter-norm",
                self.scatter_norm,
                "normalizes ScatterNet features: it needs features = 'scatter'",
            )
        if self.features == "scatter":
            if self.augmult > 0:
                raise ConfigError(
                    "augmult",
                    self.augmult,
                    "augments images; with features = 'scatter' the model sees fixed features (set 0)",
                )
            check_number("scatter-groups", self.scatter_groups, lo=1, integer=True)
            check_number("scatter-norm-noise", self.scatter_norm_noise, lo=0.0, lo_open=True, hi=1e9)
            check_number("scatter-norm-clip", self.scatter_norm_clip, lo=0.0, lo_open=True, hi=1e9)
            if SCATTER_CHANNELS % self.scatter_groups:
                raise ConfigError(
                    "scatter-groups",
                    self.scatter_groups,
                    f"must divide the {SCATTER_CHANNELS} scattering channels per image channel",
                )

    def resolved_sample_rate(self, n_train: int) -> float:
        """q: the Poisson sampling rate for a training set of ``n_train`` examples."""
        if n_train <= 0:
            raise ConfigError("dataset", n_train, "the training set is empty")
        if self.sample_rate is not None:
            return float(self.sample_rate)
        if self.batch_size > n_train:
            raise ConfigError(
                "batch-size",
                self.batch_size,
                f"must not exceed the number of training examples ({n_train})",
            )
        return self.batch_size / n_train

    def ratio_schedule(self) -> tuple[str, tuple[float, ...]]:
        if self.method == "adadpigu-static":
            return "none", ()
        return parse_schedule(self.schedule)

    # ----- (de)serialisation ----------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, strict: bool = True) -> TrainConfig:
        """Build from a mapping with kebab-case or snake_case keys.

        Unknown keys raise :class:`ConfigError` when ``strict``; otherwise they are
        ignored (the Flower run config also holds federated-only keys).
        Empty strings and "none" mean ``None`` for optional numbers.
        """
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = raw_key.replace("-", "_")
            if key == "data_dir" and value in ("", None):
                continue  # Flower configs cannot hold None: "" means the default ($ADADPIGU_DATA_DIR)
            if key not in known:
                if strict:
                    raise ConfigError(raw_key, value, "unknown setting")
                continue
            kwargs[key] = _coerce(raw_key, known[key], value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping, round-trips through :meth:`from_mapping`."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def digest(self, *, exclude: tuple[str, ...] = ("out-dir", "data-dir", "device")) -> str:
        """A short hash of the settings that change results (for run names and resume)."""
        items = {k: v for k, v in self.to_dict().items() if k not in exclude}
        blob = json.dumps(items, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


_OPTIONAL_FLOAT = {"epsilon", "noise_multiplier", "pretrain_noise_multiplier", "sample_rate"}


def _coerce(raw_key: str, f: dataclasses.Field, value: Any) -> Any:
    """Coerce strings from the CLI / run config into the field's type."""
    name = f.name
    if name in _OPTIONAL_FLOAT:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        if isinstance(value, bool):
            raise ConfigError(raw_key, value, "must be a number")
        v = float(value) if isinstance(value, (int, float)) else _to_float(raw_key, value)
        # Flower run configs cannot hold None: 0 means "not set" for these keys (also on the
        # command line, as its help says), except epsilon
        return None if v == 0 and name != "epsilon" else v
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(raw_key, value, "must be true or false")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ConfigError(raw_key, value, "must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(raw_key, value, "must be an integer") from None
        raise ConfigError(raw_key, value, "must be an integer")
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ConfigError(raw_key, value, "must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        return _to_float(raw_key, value)
    if isinstance(value, str):
        return value
    raise ConfigError(raw_key, value, "must be a string")


def _to_float(raw_key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(raw_key, value, "must be a number") from None


@dataclass(frozen=True)
class FederatedConfig:
    """Settings of the federated protocol (DESIGN.md §3), on top of :class:`TrainConfig`.

    ``importance_rounds`` rounds of local DP-SGD precede the masked training rounds
    (methods with a pre-training phase only); each sampled client runs
    ``local_epochs`` epochs of Poisson-sampled steps per round.
    """

    num_server_rounds: int = 60
    importance_rounds: int = 2
    local_epochs: float = 1.0
    local_steps: int = 0  # Poisson steps per round; 0 = round(local_epochs / q)
    # a client's optimizer state (momentum, Adam moments) across rounds: "keep" it in the
    # client's own state (as a real silo would) or "reset" it every round
    client_optimizer_state: str = "keep"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    validation_release: str = "none"
    # std of the Gaussian noise on a silo's count of correct validation predictions
    # (sensitivity 1): validation-release = "noisy" charges Phase(validation-noise, 1, 1)
    validation_noise: float = 30.0
    min_available_nodes: int = 1
    min_train_nodes: int = 1
    round_timeout: float = 600.0
    startup_timeout: float = 600.0
    # validation (clients) and test-set evaluation (server) every k rounds, always at the last;
    # 0 = auto: every round for plans under 100 rounds, 50-100 evaluations for longer ones
    evaluate_every: int = 0
    test_every: int = 0
    resume: str = ""  # a run folder to continue (its checkpoint.pt and ledger.json)
    reserve_rounds: int = 0  # extra rounds the noise is calibrated for (interruptions)
    max_update_norm: float = 1e3  # replies with a larger L2 norm are rejected as absurd
    # the server's step on the aggregated update (common.server_opt): fedavg, fedavgm (uses
    # server-momentum), fedadagrad / fedadam / fedyogi (server-beta1, server-beta2, server-tau)
    server_optimizer: str = "fedavg"
    server_momentum: float = 0.0
    server_lr: float = 1.0
    server_lr_schedule: str = "constant"
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    # where the Gaussian noise comes from (docs/PRIVACY.md): "local" (each silo adds all of it,
    # the server sees each update) | "distributed" (secure aggregation: the server sees only the
    # sum, each silo adds a discrete Gaussian share; DP-FedSGD, one local step per round)
    dp_noise: str = "local"
    secagg_survivors: int = 0  # t: silos whose shares the claim assumes (0 = every silo)
    secagg_key_rounds: int = 10  # rounds served by one secure-aggregation key set-up
    # the server's own test set: "auto" (a built-in dataset's test split; user data: none),
    # "none", or the path of a dataset read with the run's schema (the coordinator's own data)
    server_test_data: str = "auto"
    # federated evaluation on each silo's local test split, every test-every rounds and at the
    # last: "auto" (noisy when the server has no test set, else none) | "none" | "noisy" (the
    # correct count and the bounded loss sum, each + Gaussian of std test-noise; accounted)
    # | "exact" (opt-out, outside the DP guarantee, flagged)
    federated_test: str = "auto"
    test_noise: float = 10.0
    test_loss_bound: float = 5.0  # each example's loss is clipped to [0, bound] before the sum

    def __post_init__(self) -> None:
        check_number("num-server-rounds", self.num_server_rounds, lo=1, integer=True)
        check_number("importance-rounds", self.importance_rounds, lo=0, integer=True)
        check_number("local-epochs", self.local_epochs, lo=0.0, lo_open=True, hi=1e4)
        check_number("fraction-train", self.fraction_train, lo=0.0, hi=1.0, lo_open=True)
        check_number("fraction-evaluate", self.fraction_evaluate, lo=0.0, hi=1.0)
        _choice("validation-release", self.validation_release, VALIDATION_RELEASES)
        check_number("validation-noise", self.validation_noise, lo=0.0, lo_open=True, hi=1e9)
        check_number("min-available-nodes", self.min_available_nodes, lo=1, integer=True)
        check_number("min-train-nodes", self.min_train_nodes, lo=1, integer=True)
        check_number("round-timeout", self.round_timeout, lo=0.0, lo_open=True)
        check_number("startup-timeout", self.startup_timeout, lo=0.0, lo_open=True)
        check_number("evaluate-every", self.evaluate_every, lo=0, integer=True)
        check_number("test-every", self.test_every, lo=0, integer=True)
        check_number("reserve-rounds", self.reserve_rounds, lo=0, hi=10**4, integer=True)
        check_number("max-update-norm", self.max_update_norm, lo=0.0, lo_open=True)
        check_number("local-steps", self.local_steps, lo=0, hi=10**6, integer=True)
        _choice("client-optimizer-state", self.client_optimizer_state, CLIENT_OPTIMIZER_STATES)
        _choice("server-optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        check_number("server-momentum", self.server_momentum, lo=0.0, hi=1.0, hi_open=True)
        if self.server_momentum > 0 and self.server_optimizer != "fedavgm":
            raise ConfigError(
                "server-momentum",
                self.server_momentum,
                f"is used by server-optimizer 'fedavgm' only (here '{self.server_optimizer}')",
            )
        check_number("server-lr", self.server_lr, lo=0.0, lo_open=True, hi=1e4)
        _choice("server-lr-schedule", self.server_lr_schedule, LR_SCHEDULES)
        check_number("server-beta1", self.server_beta1, lo=0.0, hi=1.0, hi_open=True)
        check_number("server-beta2", self.server_beta2, lo=0.0, hi=1.0, hi_open=True)
        check_number("server-tau", self.server_tau, lo=0.0, lo_open=True)
        if self.server_optimizer not in ("fedadagrad", "fedadam", "fedyogi"):
            for f in fields(self):
                if (
                    f.name in ("server_beta1", "server_beta2", "server_tau")
                    and getattr(self, f.name) != f.default
                ):
                    raise ConfigError(
                        f.name.replace("_", "-"),
                        getattr(self, f.name),
                        f"is used by server-optimizer fedadagrad / fedadam / fedyogi only (here '{self.server_optimizer}')",
                    )
        _choice("dp-noise", self.dp_noise, DP_NOISE)
        check_number("secagg-survivors", self.secagg_survivors, lo=0, hi=10**4, integer=True)
        check_number("secagg-key-rounds", self.secagg_key_rounds, lo=1, hi=1000, integer=True)
        if not isinstance(self.server_test_data, str) or not self.server_test_data:
            raise ConfigError("server-test-data", self.server_test_data, "auto, none, or a dataset path")
        _choice("federated-test", self.federated_test, FEDERATED_TESTS)
        check_number("test-noise", self.test_noise, lo=0.0, lo_open=True, hi=1e9)
        check_number("test-loss-bound", self.test_loss_bound, lo=0.0, lo_open=True, hi=1e6)

    def server_test(self, cfg: TrainConfig) -> str | None:
        """What the server evaluates on: "builtin" (the built-in test split), a dataset path,
        or None (no test set of its own)."""
        if self.server_test_data == "auto":
            return None if cfg.custom else "builtin"
        return None if self.server_test_data == "none" else self.server_test_data

    def resolved_federated_test(self, cfg: TrainConfig) -> str:
        """none | noisy | exact: "auto" is noisy (exact for a non-private run, which promises
        nothing) when the server has no test set, else none."""
        if self.federated_test != "auto":
            return self.federated_test
        if self.server_test(cfg) is not None:
            return "none"
        return "noisy" if cfg.private else "exact"

    def test_rounds(self, cfg: TrainConfig, rounds: int | None = None) -> list[int]:
        """The rounds that ask the silos for test metrics (none without federated evaluation)."""
        if self.resolved_federated_test(cfg) == "none" or self.fraction_evaluate <= 0:
            return []
        last = self.num_server_rounds if rounds is None else rounds
        k = self.test_interval
        return [r for r in range(1, last + 1) if r % k == 0 or r == self.num_server_rounds or r == last]

    def check_with(self, cfg: TrainConfig) -> None:
        """Settings valid alone but not together with ``cfg``: refused by name."""
        if self.resolved_federated_test(cfg) != "none" and cfg.test_fraction == 0 and not cfg.custom:
            raise ConfigError(
                "federated-test",
                self.federated_test,
                "needs each silo's local test split: set test-fraction > 0 (built-in data have no "
                "test/ sub-folders)",
            )
        if self.validation_release != "none" and self.fraction_evaluate > 0 and cfg.validation_fraction == 0:
            raise ConfigError(
                "validation-release",
                self.validation_release,
                "needs validation data, but validation-fraction is 0 (each silo would release noise "
                "or nothing about an empty set); set validation-release = 'none' to release the "
                "last round's model",
            )
        self.check_distributed(cfg)

    def check_distributed(self, cfg: TrainConfig) -> None:
        """``dp-noise = "distributed"`` is DP-FedSGD: each round every silo releases one noisy
        share of one Poisson batch's clipped gradient sum at the global model; the server
        takes the optimizer step. Settings that would break that are refused by name."""
        if self.dp_noise != "distributed":
            return
        if not cfg.private:
            raise ConfigError("dp-noise", self.dp_noise, f"needs a private method, not {cfg.method}")
        if self.local_steps != 1:
            raise ConfigError(
                "local-steps",
                self.local_steps,
                "must be 1 with dp-noise = 'distributed': further local steps would train on "
                "a model that saw only this silo's share of the noise",
            )
        if self.fraction_train != 1.0:
            raise ConfigError(
                "fraction-train",
                self.fraction_train,
                "must be 1 with dp-noise = 'distributed' (every silo, every round)",
            )
        if cfg.optimizer != "sgd":
            raise ConfigError(
                "optimizer", cfg.optimizer, "dp-noise = 'distributed' runs SGD (with momentum) on the server"
            )
        if self.server_optimizer not in ("fedavg", "fedavgm"):
            raise ConfigError(
                "server-optimizer",
                self.server_optimizer,
                "dp-noise = 'distributed' takes the SGD step on the server: fedavg (the run's momentum) or fedavgm",
            )

    def evaluation_rounds(self, rounds: int | None = None) -> list[int]:
        """The rounds that ask clients for validation metrics (none when nothing is released)."""
        if self.validation_release == "none" or self.fraction_evaluate <= 0:
            return []
        last = self.num_server_rounds if rounds is None else rounds
        k = self.evaluate_interval
        return [r for r in range(1, last + 1) if r % k == 0 or r == self.num_server_rounds or r == last]

    def _interval(self, k: int) -> int:
        return k if k > 0 else max(1, self.num_server_rounds // 50)

    @property
    def evaluate_interval(self) -> int:
        """Rounds between validation evaluations (``evaluate-every``, 0 = auto)."""
        return self._interval(self.evaluate_every)

    @property
    def test_interval(self) -> int:
        """Rounds between test-set evaluations on the server (``test-every``, 0 = auto)."""
        return self._interval(self.test_every)

    def importance_rounds_for(self, cfg: TrainConfig) -> int:
        """Importance (pre-training) rounds actually run for ``cfg.method``."""
        if cfg.method in ("nonprivate", "dpsgd"):
            return 0
        if self.importance_rounds < 1:
            raise ConfigError(
                "importance-rounds", self.importance_rounds, f"method {cfg.method} needs at least 1"
            )
        if self.importance_rounds >= self.num_server_rounds:
            raise ConfigError(
                "importance-rounds",
                self.importance_rounds,
                f"must be < num-server-rounds ({self.num_server_rounds}) to leave training rounds",
            )
        return self.importance_rounds

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FederatedConfig:
        known = {f.name: f for f in fields(cls)}
        kwargs = {
            k.replace("-", "_"): _coerce(k, known[k.replace("-", "_")], v)
            for k, v in values.items()
            if k.replace("-", "_") in known
        }
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}


# TrainConfig settings that only centralized training reads: a federated run refuses them
# (its plan is num-server-rounds, importance-rounds, local-epochs / local-steps)
CENTRALIZED_ONLY = ("epochs", "pretrain-fraction", "pretrain-noise-multiplier")
# TrainConfig settings that only a federated run reads (how the data are split into silos and
# what a silo says of its size): centralized training's command line does not offer them
FEDERATED_ONLY = (
    "partitioner", "alpha", "classes-per-silo", "min-silo-size", "silo-sizes", "declared-silo-size",
    "silo-size-tolerance",
)  # fmt: skip
# The Flower app's settings in pyproject.toml ([tool.flwr.app.config]) that differ from the
# dataclass defaults: what `flwr run .` starts from, where `adadpigu simulate`, `train` and the
# sweeps start from the dataclass (tests/simulations/test_flower_config.py keeps the two equal).
APP_DEFAULTS: dict[str, Any] = {
    "batch-size": 256,
    "lr": 2.0,
    "lr-schedule": "cosine",
    "min-available-nodes": 2,
    "min-train-nodes": 2,
    "features": "scatter",
    "model": "scatter-linear",
}
# settings a federated run accepts with these values only: scatter-norm = "data" releases
# statistics of a training set before training, which no silo's ledger accounts for yet
CENTRALIZED_ONLY_VALUES = {"scatter-norm": ("group",)}


def split_run_config(values: Mapping[str, Any]) -> tuple[TrainConfig, FederatedConfig]:
    """Split a Flower run config into (TrainConfig, FederatedConfig); unknown keys and
    centralized-only settings are errors."""
    train_keys = {f.name for f in fields(TrainConfig)}
    fed_keys = {f.name for f in fields(FederatedConfig)}
    train_part, fed_part = {}, {}
    for k, v in values.items():
        name = k.replace("-", "_")
        if name.replace("_", "-") in CENTRALIZED_ONLY:
            raise ConfigError(
                k,
                v,
                "is read by centralized training only (adadpigu train); a federated run's plan is "
                "num-server-rounds, importance-rounds and local-epochs / local-steps",
            )
        allowed = CENTRALIZED_ONLY_VALUES.get(name.replace("_", "-"))
        if allowed is not None and v not in allowed:
            raise ConfigError(
                k,
                v,
                f"is centralized training only (adadpigu train); a federated run allows {', '.join(allowed)}",
            )
        if name in train_keys:
            train_part[k] = v
        elif name in fed_keys:
            fed_part[k] = v
        else:
            raise ConfigError(k, v, "unknown setting")
    return TrainConfig.from_mapping(train_part), FederatedConfig.from_mapping(fed_part)


# One line per setting: shown by every CLI flag (with its default) and checked complete by a
# test, so that a new setting cannot arrive without its meaning.
HELP: dict[str, str] = {
    "method": "nonprivate | dpsgd | adaclip | adadpigu-static | adadpigu (DESIGN.md §2)",
    "dataset": "mnist | fashionmnist | cifar10 | custom (your own data, described by schema)",
    "schema": "dataset = custom: the public schema of the data (TOML; docs/DATA.md)",
    "test-fraction": "share of each data holder's records kept as its local test split (a test/ sub-folder wins)",
    "mlp-hidden": 'model = mlp: hidden widths, comma-separated ("" = logistic regression)',
    "model": "auto | mnist-cnn | mnist-cnn-gn | cifar-cnn | cifar-cnn-gn | resnet18-gn (-gn: GroupNorm) | wrn16-4 (De et al. 2022, GroupNorm) | scatter-cnn | scatter-linear (on features = scatter) | logreg | mlp | package.module:factory (yours: factory(input_shape, num_classes) -> nn.Module)",
    "features": "pixels | scatter: ScatterNet features (J = 2, L = 8; Tramer & Boneh 2021), a fixed transform, no privacy cost",
    "scatter-groups": "groups of the parameter-free GroupNorm on the scattering features (divides 81)",
    "scatter-norm": "group (per-example GroupNorm, free) | data (per-channel mean and scale of the training set released under DP, charged; centralized only)",
    "scatter-norm-noise": "scatter-norm = data: noise multiplier of its two Gaussian releases",
    "scatter-norm-clip": "scatter-norm = data: L2 clip of each example's per-channel statistics",
    "activation": "tanh | relu, of the paper's CNNs",
    "epsilon": "target epsilon per data holder (calibrates sigma over the whole plan)",
    "delta": "target delta, in (0, 1); well below 1/n",
    "accountant": "pld | rdp",
    "noise-multiplier": "fix sigma instead of calibrating it (0 = calibrate)",
    "pretrain-noise-multiplier": "sigma of the pre-training / importance phase (0 = same as training)",
    "batch-size": "expected Poisson batch size (q = batch-size / n)",
    "sample-rate": "Poisson sampling rate q instead of batch-size (0 = from batch-size)",
    "clip-norm": "L2 clip C of per-sample gradients (standardized ones in the adaptive phase)",
    "optimizer": "sgd | adam (the client's / trainer's optimizer)",
    "lr": "learning rate of the local optimizer",
    "momentum": "SGD momentum in [0, 1)",
    "lr-schedule": "constant | cosine | linear, over epochs (centralized) or rounds (federated)",
    "ema-decay": "EMA of the weights per update, evaluated and selected (0 = off)",
    "augmult": "augmentation multiplicity K: gradients averaged over K copies before clipping (0 = off)",
    "epochs": "centralized epochs",
    "pretrain-fraction": "centralized: fraction of the steps spent on DP-SGD pre-training (importance)",
    "r0": "AdaDPIGU: initial retention ratio of the mask, in (0, 1]",
    "r-max": "AdaDPIGU: final retention ratio, >= r0",
    "schedule": "unfreezing schedule: linear | none | steps:r1,r2,...",
    "mask-scope": "global | per-layer top-k",
    "mask-refresh": "dynamic mask: re-score importance from the weights' movement every m epochs/rounds (0 = static)",
    "importance": "squared (debiased mean of g^2) | abs (the paper's mean |g|)",
    "beta1": "AdaCliP: EMA rate of the mean a",
    "beta2": "AdaCliP: EMA rate of the variance statistic",
    "h1": "AdaCliP: lower clamp of the variance statistic",
    "h2": "AdaCliP: upper clamp of the variance statistic, > h1",
    "scale-rule": "AdaCliP: optimal (b ~ s^1/4) | sqrt (b = s^1/2)",
    "data-dir": "folder with MNIST/, FashionMNIST/, cifar-10-batches-py/ (default $ADADPIGU_DATA_DIR or ./data)",
    "validation-fraction": "share of each data holder's training data held out for model selection (0: train on all of it; the result is the last model)",
    "train-subset": "use only this many training examples (0 = all)",
    "test-subset": "use only this many test examples (0 = all)",
    "partitioner": "federated split: auto (built-in: iid; custom: none) | none (each silo trains on all its own records) | iid | dirichlet | pathological | size-skew",
    "alpha": "Dirichlet concentration (smaller = more label skew)",
    "classes-per-silo": "pathological split: classes per silo",
    "min-silo-size": "dirichlet / size-skew: smallest silo",
    "silo-sizes": "declared (public sizes for weights and q, checked locally) | exact (opt-out: counts leave the silo, outside the guarantee)",
    "declared-silo-size": "records per silo that silos declare (0 = the dataset's size / silos; a node's declared-size wins)",
    "silo-size-tolerance": "a silo refuses to run when its records differ from its declared size by more than this fraction",
    "seed": "-1 = OS randomness (real releases); >= 0 reproducible, for experiments only",
    "device": "auto | cpu | cuda",
    "per-sample-backend": "auto (ghost clipping where the model allows, else Opacus hooks) | ghost | native (materialised rows) | hooks | functorch",
    "max-physical-batch": "examples per chunk of a Poisson batch (memory); noise once per batch",
    "out-dir": "where run folders are written",
    "num-server-rounds": "federated rounds (importance rounds included)",
    "importance-rounds": "rounds of DP-SGD with released importance before the mask (adadpigu*, adaclip)",
    "local-epochs": "local epochs per round (steps = round(local-epochs / q))",
    "local-steps": "local Poisson steps per round, overrides local-epochs (0 = from local-epochs)",
    "client-optimizer-state": "keep (momentum survives across rounds, in the client's own state) | reset",
    "fraction-train": "share of clients sampled per round (no amplification is claimed)",
    "fraction-evaluate": "share of clients asked for validation accuracy",
    "validation-release": "none (release the last model; nothing else leaves a silo) | noisy (Gaussian on correct counts, accounted) | exact (opt-out: outside the DP guarantee)",
    "validation-noise": "noisy validation: std of the Gaussian on each silo's correct-prediction count (sensitivity 1)",
    "server-test-data": "the server's test set: auto (built-in test split; custom: none) | none | a dataset path",
    "federated-test": "evaluation on the silos' test splits: auto (noisy if the server has no test set) | none | noisy (accounted) | exact (opt-out)",
    "test-noise": "noisy federated test: std of the Gaussian on each silo's correct count and on its loss sum / test-loss-bound",
    "test-loss-bound": "federated test: each example's loss is clipped to [0, bound] before it is summed",
    "min-available-nodes": "clients to wait for before starting",
    "min-train-nodes": "fewest valid updates for a round to count",
    "round-timeout": "seconds to wait for a round's replies",
    "startup-timeout": "seconds to wait for clients at the start",
    "evaluate-every": "ask clients for validation accuracy every k rounds and at the last (0 = auto: rounds // 50, at least 1)",
    "test-every": "server test-set evaluation and metrics files every k rounds and at the last (0 = auto, as evaluate-every)",
    "resume": "run folder to continue (its checkpoint.pt and ledger.json)",
    "reserve-rounds": "rounds of budget kept for replays after interruptions (sigma calibrated for rounds + reserve)",
    "max-update-norm": "replies with a larger L2 norm are rejected",
    "server-optimizer": "fedavg | fedavgm | fedadagrad | fedadam | fedyogi, on the aggregated update",
    "server-momentum": "fedavgm momentum in [0, 1)",
    "server-lr": "server learning rate (1 with fedavg = plain averaging)",
    "server-lr-schedule": "constant | cosine | linear over rounds",
    "server-beta1": "fedadam / fedyogi / fedadagrad first-moment rate",
    "server-beta2": "fedadam / fedyogi second-moment rate",
    "server-tau": "adaptive server optimizers' epsilon (adaptivity)",
    "dp-noise": "local (each silo adds all the noise) | distributed (secure aggregation; each silo adds a discrete Gaussian share; one local step per round)",
    "secagg-survivors": "distributed noise: t, the fewest silos whose shares the epsilon assumes; a round with fewer survivors is refused (0 = every silo)",
    "secagg-key-rounds": "distributed noise: rounds served by one secure-aggregation key set-up (fresh keys per round within it)",
}


def setting_help(name: str, default: object) -> str:
    """A CLI flag's help line: its meaning (:data:`HELP`) and its default."""
    shown = "not set" if default is None else repr(default)
    return f"{HELP[name]} (default: {shown})"


def refuse_centralized_only(values: Mapping[str, Any]) -> None:
    """A federated run refuses the settings only centralized training reads."""
    for key in CENTRALIZED_ONLY:
        if values.get(key) is not None:
            split_run_config({key: values[key]})  # raises the one error message for it
    for key, allowed in CENTRALIZED_ONLY_VALUES.items():
        if values.get(key) not in (None, *allowed):
            split_run_config({key: values[key]})
