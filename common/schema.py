"""The public schema of a dataset: every data-dependent choice of preprocessing, fixed in
advance and shared by all silos (DESIGN.md §4, docs/PRIVACY.md "The schema").

A class list, a vocabulary, a min/max or a mean computed from one silo's rows is a release
of that silo's data; here none is computed. The schema declares them, as Tumult, OpenDP and
Google's DP libraries do with public bounds:

- ``kind = "table"``: the label column and its classes, each feature's type (``numeric``
  with bounds ``min``/``max``: values are clipped to them, counted, and scaled to [0, 1];
  ``categorical`` with its ``categories``: one-hot, an unseen category is an error or an
  all-zero row), what a missing cell becomes (``missing = "error"``, or ``"fill"``: the
  declared ``fill`` constant and a missing-flag column), and the columns to ``drop``;
- ``kind = "image"``: the classes (class folder names, in order), the image size and
  channels, what an image of another size or mode gets (converted or refused), and the
  normalization constants (``mean``/``std``, public numbers, not statistics of the data).

A schema is a TOML file (:func:`load_schema`); its :meth:`Schema.digest` is what silos and
server compare at registration. The built-in datasets have built-in schemas
(:func:`builtin_schema`), so they go through the same data layer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.errors import DataError, read_toml

KINDS = ("table", "image")
FEATURE_TYPES = ("numeric", "categorical")
MISSING = ("error", "fill")
UNSEEN = ("error", "zero")
OTHER_SIZE = ("resize", "refuse")
OTHER_MODE = ("convert", "refuse")
LABEL_COLUMN_DEFAULT = "label"
SCHEMA_FILE = "schema.toml"


def class_key(value: Any) -> str:
    """How a label value is matched against the schema's classes: integral numbers as
    integers (``2``, ``2.0`` and ``"2"`` are one class), everything else as its text.

    >>> class_key(2.0), class_key("2"), class_key(" A "), class_key(True)
    ('2', '2', 'A', 'true')
    """
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
        return repr(float(value))
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if math.isfinite(number) and number.is_integer() else text


@dataclass(frozen=True)
class Feature:
    """One input column of a table schema."""

    column: str
    type: str
    min: float = 0.0
    max: float = 1.0
    categories: tuple[str, ...] = ()
    unseen: str = "error"
    missing: str = "error"
    fill: Any = None

    @property
    def width(self) -> int:
        """Columns it becomes: 1 (numeric) or one per category, plus a missing flag."""
        base = 1 if self.type == "numeric" else len(self.categories)
        return base + (1 if self.missing == "fill" else 0)


@dataclass(frozen=True)
class Schema:
    name: str
    kind: str
    classes: tuple[str, ...]
    label_column: str = LABEL_COLUMN_DEFAULT
    features: tuple[Feature, ...] = ()
    drop: tuple[str, ...] = ()
    # image
    size: tuple[int, int] = (0, 0)  # (height, width)
    channels: int = 0
    other_size: str = "refuse"
    other_mode: str = "convert"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    image_column: str = "image"  # Hugging Face datasets: the column holding the images
    flip: bool = False  # augmult: a mirrored image keeps its class (natural images)
    source: str = field(default="", compare=False)  # the file it was read from (not hashed)

    # ----- what the model sees -----------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) for images, (encoded columns,) for tables."""
        if self.kind == "image":
            return (self.channels, *self.size)
        return (sum(f.width for f in self.features),)

    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def encoded_names(self) -> list[str]:
        """The names of the encoded table columns, in order (``age``, ``gender=F``, ...)."""
        names: list[str] = []
        for f in self.features:
            names += [f.column] if f.type == "numeric" else [f"{f.column}={c}" for c in f.categories]
            if f.missing == "fill":
                names.append(f"{f.column}:missing")
        return names

    # ----- identity ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The canonical form: what is hashed, and what :func:`schema_from_dict` reads back."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "label": {"column": self.label_column, "classes": list(self.classes)},
        }
        if self.kind == "table":
            out["feature"] = [
                {
                    "column": f.column,
                    "type": f.type,
                    **({"min": f.min, "max": f.max} if f.type == "numeric" else {}),
                    **(
                        {"categories": list(f.categories), "unseen": f.unseen}
                        if f.type == "categorical"
                        else {}
                    ),
                    "missing": f.missing,
                    **({"fill": f.fill} if f.missing == "fill" else {}),
                }
                for f in self.features
            ]
            out["drop"] = list(self.drop)
        else:
            out["image"] = {
                "size": list(self.size),
                "channels": self.channels,
                "other-size": self.other_size,
                "other-mode": self.other_mode,
                "mean": list(self.mean),
                "std": list(self.std),
                "column": self.image_column,
                "flip": self.flip,
            }
        return out

    def digest(self) -> str:
        """sha256 of the canonical form: equal for equal schemas whatever the file's layout."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    # ----- encoding ----------------------------------------------------------------------
    def encode_labels(
        self, values: Sequence[Any], where: str, rows: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Class indices of ``values``; a missing label or one not in the schema is an error
        naming the row (``rows``: the row numbers to name, default 1-based positions)."""
        index = self.class_index()
        out = np.empty(len(values), dtype=np.int64)
        for i, v in enumerate(values):
            if (
                v is None
                or (isinstance(v, float) and math.isnan(v))
                or (isinstance(v, str) and not v.strip())
            ):
                raise DataError(f"{where}: row {_row(rows, i)} has no label ('{self.label_column}')")
            k = index.get(class_key(v))
            if k is None:
                raise DataError(
                    f"{where}: row {_row(rows, i)}: label {v!r} is not a class of the schema "
                    f"({', '.join(self.classes[:12])}{', ...' if len(self.classes) > 12 else ''})"
                )
            out[i] = k
        return torch.from_numpy(out)

    def encode_table(
        self, columns: dict[str, list[Any]], where: str, rows: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, dict[str, int]]:
        """The feature matrix ``[n, input_shape[0]]`` (float32) of a table given as
        ``{column: values}``, and how many values of each numeric column were clipped to its
        bounds. Every refusal names the column and the row (never a statistic of the data)."""
        n = len(next(iter(columns.values()))) if columns else 0
        blocks, clipped = [], {}
        for f in self.features:
            values = columns[f.column]
            missing = np.array([_is_missing(v) for v in values], dtype=bool)
            if missing.any() and f.missing == "error":
                i = int(np.argmax(missing))
                raise DataError(
                    f"{where}: row {_row(rows, i)}, column '{f.column}': the cell is empty and the "
                    "schema says missing = 'error' (declare missing = 'fill' with a fill value to accept it)"
                )
            if f.type == "numeric":
                block, count = _encode_numeric(f, values, missing, where, rows)
                if count:
                    clipped[f.column] = count
            else:
                block = _encode_categorical(f, values, missing, where, rows)
            blocks.append(block)
            if f.missing == "fill":
                blocks.append(missing.astype(np.float32)[:, None])
        x = np.concatenate(blocks, axis=1) if blocks else np.zeros((n, 0), dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), clipped

    def normalize_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images ``[n, H, W, C]`` (or ``[n, H, W]``) as float32 ``[n, C, H, W]``,
        scaled to [0, 1] and standardized with the schema's public mean and std."""
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        else:
            x = x.permute(0, 3, 1, 2).contiguous()
        m = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return ((x - m) / s).contiguous()


def _row(rows: Sequence[int] | None, i: int) -> int:
    return int(rows[i]) if rows is not None else i + 1


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float | np.floating):
        return bool(np.isnan(v))
    return isinstance(v, str) and not v.strip()


def _encode_numeric(
    f: Feature, values: list[Any], missing: np.ndarray, where: str, rows: Sequence[int] | None
) -> tuple[np.ndarray, int]:
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if missing[i]:
            out[i] = float(f.fill)
            continue
        if isinstance(v, bool | np.bool_):
            out[i] = float(v)
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            raise DataError(
                f"{where}: row {_row(rows, i)}, column '{f.column}': {str(v)[:40]!r} is not a number "
                "(the schema declares it numeric)"
            ) from None
        if not math.isfinite(out[i]):
            raise DataError(
                f"{where}: row {_row(rows, i)}, column '{f.column}': {v!r} is not a finite number"
            )
    count = int(((out < f.min) | (out > f.max))[~missing].sum())  # filled cells are not the data's
    out = np.clip(out, f.min, f.max)
    return ((out - f.min) / (f.max - f.min)).astype(np.float32)[:, None], count


def _encode_categorical(
    f: Feature, values: list[Any], missing: np.ndarray, where: str, rows: Sequence[int] | None
) -> np.ndarray:
    index = {c: i for i, c in enumerate(f.categories)}
    out = np.zeros((len(values), len(f.categories)), dtype=np.float32)
    fill = None if f.fill is None else index.get(class_key(f.fill))
    for i, v in enumerate(values):
        if missing[i]:
            if fill is not None:
                out[i, fill] = 1.0
            continue
        k = index.get(class_key(v))
        if k is None:
            if f.unseen == "zero":
                continue
            raise DataError(
                f"{where}: row {_row(rows, i)}, column '{f.column}': category {str(v)[:40]!r} is not in "
                f"the schema ({', '.join(f.categories[:12])}); declare it, or unseen = 'zero' to encode "
                "unseen categories as an all-zero row"
            )
        out[i, k] = 1.0
    return out


# ----- reading a schema ---------------------------------------------------------------------


def load_schema(path: str) -> Schema:
    """The schema in the TOML file ``path``; a bad file is a :class:`DataError` naming the key."""
    data = read_toml(path, DataError, what="schema")
    schema = schema_from_dict(data, where=f"schema {path}")
    return Schema(**{**schema.__dict__, "source": os.path.abspath(path)})


def schema_from_dict(data: dict[str, Any], *, where: str = "schema") -> Schema:
    """A :class:`Schema` from its TOML / canonical dictionary form, every key checked."""
    known = {"name", "kind", "label", "feature", "drop", "image"}
    extra = sorted(set(data) - known)
    if extra:
        raise DataError(f"{where}: unknown key(s) {', '.join(extra)} (known: {', '.join(sorted(known))})")
    kind = data.get("kind")
    if kind not in KINDS:
        raise DataError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    name = str(data.get("name", "custom"))
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
        raise DataError(f"{where}: name {name!r} must be letters, digits, '-', '_' or '.'")
    label = data.get("label")
    if not isinstance(label, dict):
        raise DataError(f"{where}: a [label] table with the classes is required")
    _only(label, {"column", "classes"}, f"{where} [label]")
    classes = label.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise DataError(f"{where}: [label] classes must list at least 2 classes")
    keys = [class_key(c) for c in classes]
    if len(set(keys)) != len(keys):
        raise DataError(f"{where}: [label] classes has duplicates: {classes}")
    label_column = str(label.get("column", LABEL_COLUMN_DEFAULT))
    if kind == "table":
        if "image" in data:
            raise DataError(f"{where}: a table schema has no [image] table")
        features = tuple(_feature(f, i, where) for i, f in enumerate(data.get("feature", [])))
        if not features:
            raise DataError(f"{where}: a table schema needs at least one [[feature]]")
        drop = data.get("drop", [])
        if not isinstance(drop, list) or not all(isinstance(c, str) for c in drop):
            raise DataError(f"{where}: drop must be a list of column names")
        names = [f.column for f in features] + [label_column] + list(drop)
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise DataError(
                f"{where}: column(s) {', '.join(dup)} declared more than once (features, label, drop)"
            )
        return Schema(name, kind, tuple(keys), label_column, features, tuple(drop))
    if "feature" in data or "drop" in data:
        raise DataError(f"{where}: an image schema has no [[feature]] or drop")
    image = data.get("image")
    if not isinstance(image, dict):
        raise DataError(f"{where}: an image schema needs an [image] table (size, channels, mean, std)")
    _only(
        image,
        {"size", "channels", "other-size", "other-mode", "mean", "std", "column", "flip"},
        f"{where} [image]",
    )
    if not isinstance(image.get("flip", False), bool):
        raise DataError(f"{where}: [image] flip must be true or false")
    size = image.get("size")
    if not (
        isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and 1 <= s <= 4096 for s in size)
    ):
        raise DataError(f"{where}: [image] size must be [height, width] in pixels, got {size!r}")
    channels = image.get("channels")
    if channels not in (1, 3):
        raise DataError(f"{where}: [image] channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    mean, std = image.get("mean", [0.5] * channels), image.get("std", [0.5] * channels)
    for key, vals in (("mean", mean), ("std", std)):
        if not (
            isinstance(vals, list) and len(vals) == channels and all(isinstance(v, int | float) for v in vals)
        ):
            raise DataError(f"{where}: [image] {key} must list {channels} number(s) (public constants)")
    if any(s <= 0 for s in std):
        raise DataError(f"{where}: [image] std must be > 0")
    other_size, other_mode = image.get("other-size", "refuse"), image.get("other-mode", "convert")
    if other_size not in OTHER_SIZE:
        raise DataError(f"{where}: [image] other-size must be one of {', '.join(OTHER_SIZE)}")
    if other_mode not in OTHER_MODE:
        raise DataError(f"{where}: [image] other-mode must be one of {', '.join(OTHER_MODE)}")
    return Schema(
        name, kind, tuple(keys), label_column, size=(size[0], size[1]), channels=channels,
        other_size=other_size, other_mode=other_mode, mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std), image_column=str(image.get("column", "image")),
        flip=bool(image.get("flip", False)),
    )  # fmt: skip


def _only(table: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise DataError(f"{where}: unknown key(s) {', '.join(extra)} (known: {', '.join(sorted(allowed))})")


def _feature(raw: Any, i: int, where: str) -> Feature:
    if not isinstance(raw, dict) or not isinstance(raw.get("column"), str):
        raise DataError(f"{where}: [[feature]] {i + 1} needs a column name")
    col = raw["column"]
    here = f"{where}, feature '{col}'"
    _only(raw, {"column", "type", "min", "max", "categories", "unseen", "missing", "fill"}, here)
    ftype = raw.get("type")
    if ftype not in FEATURE_TYPES:
        raise DataError(f"{here}: type must be one of {', '.join(FEATURE_TYPES)}, got {ftype!r}")
    missing = raw.get("missing", "error")
    if missing not in MISSING:
        raise DataError(f"{here}: missing must be one of {', '.join(MISSING)}")
    if missing == "fill" and "fill" not in raw:
        raise DataError(f"{here}: missing = 'fill' needs the fill value (a declared constant)")
    if ftype == "numeric":
        lo, hi = raw.get("min"), raw.get("max")
        if not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi)
        ):
            raise DataError(
                f"{here}: a numeric feature needs finite public bounds min and max (not computed from the data)"
            )
        if not hi > lo:
            raise DataError(f"{here}: max ({hi}) must be > min ({lo})")
        if "categories" in raw or "unseen" in raw:
            raise DataError(f"{here}: categories / unseen are for categorical features")
        fill = raw.get("fill")
        if missing == "fill" and not (isinstance(fill, int | float) and math.isfinite(fill)):
            raise DataError(f"{here}: fill must be a number")
        return Feature(
            col, ftype, float(lo), float(hi), missing=missing, fill=None if fill is None else float(fill)
        )
    cats = raw.get("categories")
    if not isinstance(cats, list) or not cats:
        raise DataError(f"{here}: a categorical feature needs its categories (public, declared)")
    keys = [class_key(c) for c in cats]
    if len(set(keys)) != len(keys):
        raise DataError(f"{here}: categories has duplicates")
    unseen = raw.get("unseen", "error")
    if unseen not in UNSEEN:
        raise DataError(f"{here}: unseen must be one of {', '.join(UNSEEN)}")
    if "min" in raw or "max" in raw:
        raise DataError(f"{here}: min / max are for numeric features")
    fill = raw.get("fill")
    if missing == "fill" and class_key(fill) not in keys:
        raise DataError(f"{here}: fill {fill!r} must be one of its categories")
    return Feature(col, ftype, categories=tuple(keys), unseen=unseen, missing=missing, fill=fill)


# ----- the built-in datasets' schemas ---------------------------------------------------------

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_BUILTIN_IMAGES = {
    "mnist": ((28, 28), 1, (0.1307,), (0.3081,), tuple(str(i) for i in range(10))),
    "fashionmnist": ((28, 28), 1, (0.2860,), (0.3530,), tuple(str(i) for i in range(10))),
    "cifar10": ((32, 32), 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10_CLASSES),
}


def builtin_schema(name: str) -> Schema:
    """The schema of a built-in dataset (torchvision's normalization constants)."""
    if name not in _BUILTIN_IMAGES:
        raise DataError(f"unknown dataset '{name}' (known: {', '.join(_BUILTIN_IMAGES)})")
    size, channels, mean, std, classes = _BUILTIN_IMAGES[name]
    return Schema(
        name, "image", classes, size=size, channels=channels, mean=mean, std=std, flip=name != "mnist"
    )


def schema_toml(schema: Schema) -> str:
    """The schema as a TOML file (what ``adadpigu split`` writes beside the silos)."""
    d = schema.to_dict()
    lines = [
        "# The public schema of this dataset, shared by every silo (docs/PRIVACY.md, 'The schema').",
        f"name = {json.dumps(d['name'])}",
        f"kind = {json.dumps(d['kind'])}",
    ]
    if schema.kind == "table":
        lines.append(f"drop = {json.dumps(d['drop'])}")
    lines += [
        "",
        "[label]",
        f"column = {json.dumps(d['label']['column'])}",
        f"classes = {json.dumps(d['label']['classes'])}",
    ]
    if schema.kind == "image":
        lines += ["", "[image]"] + [f"{k} = {json.dumps(v)}" for k, v in d["image"].items()]
    else:
        for f in d["feature"]:
            lines += ["", "[[feature]]"] + [f"{k} = {json.dumps(v)}" for k, v in f.items()]
    return "\n".join(lines) + "\n"


# ----- the run's schema -------------------------------------------------------------------------

APP_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the Flower app's folder


def resolve_schema_path(path: str) -> str:
    """A ``schema`` setting as a file: absolute, else in the working folder, else in the app's
    folder (``flwr run`` ships the project's TOML files to the server and every silo)."""
    path = os.path.expanduser(path)
    for candidate in (path, os.path.join(APP_ROOT, path)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise DataError(f"schema {path} does not exist (looked in {os.getcwd()} and {APP_ROOT})")


_LOADED: dict[tuple[str, int], Schema] = {}


def schema_of(dataset: str, schema_path: str = "") -> Schema:
    """The schema of a run's data: a built-in dataset's, or the user's file (read once per
    process and file version)."""
    if dataset != "custom":
        return builtin_schema(dataset)
    path = resolve_schema_path(schema_path)
    key = (path, os.stat(path).st_mtime_ns)
    if key not in _LOADED:
        _LOADED[key] = load_schema(path)
    return _LOADED[key]
