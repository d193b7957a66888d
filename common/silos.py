"""A data holder's folder: its splits, its declared size, the per-silo layout of a
simulation, and the tensor cache (DESIGN.md §4).

**One data holder's folder** holds one dataset in any format of :mod:`common.sources`, or
split sub-folders ``train/``, ``val/`` (or ``validation/``) and ``test/``, each a dataset
(a Hugging Face ``DatasetDict`` brings its own splits). Without sub-folders the records are
split locally by ``validation-fraction`` and ``test-fraction`` (a fixed permutation, so every
process of a silo agrees). Beside the data it may hold:

- ``schema.toml``: the silo's copy of the run's public schema (compared by hash at
  registration: a silo whose copy differs is refused by name);
- ``silo.toml``: the silo's public declarations, ``declared-size = N`` (its record count as
  the owner declares it: what ``silo-sizes = "declared"`` releases, checked locally).

**A simulation's root** (``data-dir``) holds one such folder per silo and a ``silos.toml``
listing them in partition order (``adadpigu split`` writes both)::

    [[silo]]
    folder = "silo-0"

Deployed silos point at their own folder instead (node config ``data-dir`` or
``$ADADPIGU_DATA_DIR`` of their container); a folder with a ``silos.toml`` is always a root.

**The tensor cache**: a silo decodes its images or parses its table once; the tensors are
kept in ``$ADADPIGU_CACHE_DIR/data`` under a key of the schema's hash and every file's name,
size and modification time, so that the deployment runtime's per-message ClientApp process
reads tensors instead of decoding again. A changed file or schema is a new key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

import torch

from common.data import Splits, TensorData, load_splits, take_subset, with_features
from common.errors import DataError, read_toml
from common.schema import SCHEMA_FILE, Schema, load_schema, schema_of

SILOS_FILE = "silos.toml"
SILO_FILE = "silo.toml"
CACHE_VERSION = 1
_log = logging.getLogger("adadpigu.data")


@dataclass(frozen=True)
class LocalSplits:
    """One data holder's train / validation / test data (the test part may be empty), where it
    came from, the schema it was read with and the holder's declared size."""

    train: TensorData
    validation: TensorData
    test: TensorData
    folder: str
    schema: Schema | None = None
    declared: int = 0


@dataclass(frozen=True)
class ReadInfo:
    seconds: float
    cached: bool


LAST_READ: dict[str, ReadInfo] = {}  # per dataset path: how the last read went (benchmarks)


# ----- the per-silo layout ----------------------------------------------------------------


def silo_folders(root: str) -> list[str] | None:
    """The silo folders a root's ``silos.toml`` lists, in partition order (None: no file)."""
    path = os.path.join(root, SILOS_FILE)
    if not os.path.isfile(path):
        return None
    data = read_toml(path, DataError)
    entries = data.get("silo")
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) and isinstance(e.get("folder"), str) for e in entries)
    ):
        raise DataError(f'{path}: expected [[silo]] tables, each with folder = "<sub-folder>"')
    folders = [os.path.join(root, e["folder"]) for e in entries]
    for f in folders:
        if not os.path.isdir(f):
            raise DataError(f"{path} lists {os.path.relpath(f, root)}, which is not a folder of {root}")
    return folders


def write_silos_file(root: str, folders: list[str]) -> None:
    lines = ["# The silos of this simulation, in partition order (partition-id 0 is the first)."]
    for f in folders:
        lines += ["", "[[silo]]", f"folder = {json.dumps(f)}"]
    with open(os.path.join(root, SILOS_FILE), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def silo_folder(data_dir: str, partition_id: int, num_partitions: int) -> str:
    """The folder of silo ``partition_id``: the root's ``silos.toml`` entry, or ``data_dir``
    itself (a deployed silo's own folder)."""
    folders = silo_folders(data_dir)
    if folders is None:
        if not os.path.isdir(data_dir):
            raise DataError(f"the silo's data folder {data_dir} does not exist")
        return data_dir
    if len(folders) != num_partitions:
        raise DataError(
            f"{os.path.join(data_dir, SILOS_FILE)} lists {len(folders)} silos; the run has {num_partitions} "
            "(num-supernodes / --silos)"
        )
    return folders[partition_id]


def declared_size(folder: str) -> int:
    """The silo's ``declared-size`` from its ``silo.toml`` (0: none declared)."""
    path = os.path.join(folder, SILO_FILE)
    if not os.path.isfile(path):
        return 0
    data = read_toml(path, DataError)
    extra = sorted(set(data) - {"declared-size", "name"})
    if extra:
        raise DataError(f"{path}: unknown key(s) {', '.join(extra)} (known: declared-size, name)")
    n = data.get("declared-size", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise DataError(f"{path}: declared-size must be a whole number of records, got {n!r}")
    return n


def write_silo_file(folder: str, declared: int, name: str) -> None:
    with open(os.path.join(folder, SILO_FILE), "w") as fh:
        fh.write(
            "# This silo's public declarations (docs/PRIVACY.md): its record count as its owner states it.\n"
            f"name = {json.dumps(name)}\ndeclared-size = {int(declared)}\n"
        )


def silo_schema(folder: str, run_schema, root: str | None = None) -> Schema:
    """The schema this silo holds: its own ``schema.toml`` (or its root's), else the run's
    (``run_schema``: a callable, so that a silo with its own copy never needs the run's file)."""
    for base in (folder, root):
        if base and os.path.isfile(os.path.join(base, SCHEMA_FILE)):
            return load_schema(os.path.join(base, SCHEMA_FILE))
    return run_schema()


# ----- reading, with the tensor cache ---------------------------------------------------------


def cache_root() -> str:
    from common.scatter import cache_dir

    return os.path.join(cache_dir(), "data")


def _cache_key(det, schema: Schema) -> str:
    stats = []
    for f in det.files:
        st = os.stat(f)
        stats.append(
            (
                os.path.relpath(f, det.path) if f != det.path else os.path.basename(f),
                st.st_size,
                st.st_mtime_ns,
            )
        )
    blob = json.dumps([CACHE_VERSION, schema.digest(), det.format, os.path.abspath(det.path), stats]).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def read_dataset(path: str, schema: Schema, *, cache: bool = True) -> TensorData:
    """The dataset at ``path`` as the schema's tensors, decoded once and then read from the
    tensor cache. Clipped values and converted images are reported on this process's log
    (the silo's own), never elsewhere."""
    from common.sources import detect, read

    t0 = time.perf_counter()
    det = detect(path)
    key = _cache_key(det, schema) if cache else ""
    target = os.path.join(cache_root(), f"{schema.name}-{key}.pt")
    if cache and os.path.isfile(target):
        try:
            saved = torch.load(target, map_location="cpu", weights_only=True)
            data = TensorData(saved["x"], saved["y"])
            LAST_READ[os.path.abspath(path)] = ReadInfo(time.perf_counter() - t0, True)
            return data
        except Exception:  # noqa: BLE001 - a damaged cache entry is decoded again
            pass
    got = read(det, schema)
    for column, count in sorted(got.clipped.items()):
        f = next(f for f in schema.features if f.column == column)
        _log.warning(
            "%s: %d value(s) of column '%s' outside [%g, %g] clipped to the schema's bounds",
            path,
            count,
            column,
            f.min,
            f.max,
        )
    if got.converted:
        _log.warning(
            "%s: %d image(s) converted to the schema's %s (other-size / other-mode)",
            path,
            got.converted,
            "x".join(map(str, schema.size)),
        )
    if cache:
        os.makedirs(cache_root(), exist_ok=True)
        tmp = f"{target}.{os.getpid()}.tmp"
        torch.save({"x": got.data.x, "y": got.data.y}, tmp)
        os.replace(tmp, target)
    LAST_READ[os.path.abspath(path)] = ReadInfo(time.perf_counter() - t0, False)
    return got.data


def split_folders(folder: str) -> dict[str, str] | None:
    """``{"train": path, "validation": path, "test": path}`` of a folder laid out in split
    sub-folders (None: one dataset)."""
    from common.sources import SPLIT_DIRS

    if not os.path.isdir(folder):
        return None
    subs = [n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)) and not n.startswith(".")]
    splits = {SPLIT_DIRS[n.lower()]: os.path.join(folder, n) for n in subs if n.lower() in SPLIT_DIRS}
    if not splits:
        return None
    others = [n for n in subs if n.lower() not in SPLIT_DIRS]
    if others:
        raise DataError(
            f"{folder} mixes split folders ({', '.join(sorted(splits))}) with other folders ({others[0]})"
        )
    if "train" not in splits:
        raise DataError(f"{folder} has split folders ({', '.join(sorted(splits))}) but no train/")
    if len([n for n in subs if n.lower() in ("val", "validation")]) > 1:
        raise DataError(f"{folder} has both val/ and validation/")
    return splits


def local_splits(
    folder: str, schema: Schema, *, validation_fraction: float, test_fraction: float, cache: bool = True
) -> LocalSplits:
    """A data holder's train / validation / test tensors: from split sub-folders (or a
    ``DatasetDict``'s splits), else by fractions over a fixed permutation."""
    import datasets

    from common.data import train_validation_split
    from common.sources import detect, read_hf_dataset

    parts: dict[str, TensorData] = {}
    splits = split_folders(folder)
    if splits is not None:
        parts = {name: read_dataset(path, schema, cache=cache) for name, path in splits.items()}
    elif os.path.isdir(folder) and detect(folder).format == "hf":
        from common.sources import load_hf

        ds = load_hf(folder)
        if isinstance(ds, datasets.DatasetDict):
            names = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
            unknown = [k for k in ds if k not in names]
            if unknown or "train" not in ds:
                raise DataError(
                    f"{folder}: DatasetDict splits {list(ds)}; expected train and optionally validation/val, test"
                )
            parts = {names[k]: read_hf_dataset(v, schema, f"{folder}[{k}]").data for k, v in ds.items()}
    if not parts:
        whole = read_dataset(folder, schema, cache=cache)
        return _split_by_fraction(whole, folder, validation_fraction, test_fraction)
    train = parts["train"]
    if "validation" not in parts and validation_fraction > 0:
        t_idx, v_idx = train_validation_split(len(train), validation_fraction, seed=0)
        train, parts["validation"] = train.subset(t_idx), train.subset(v_idx)
    empty = TensorData(train.x[:0], train.y[:0])
    return LocalSplits(train, parts.get("validation", empty), parts.get("test", empty), folder)


def _split_by_fraction(
    data: TensorData, folder: str, validation_fraction: float, test_fraction: float
) -> LocalSplits:
    n = len(data)
    if n < 2:
        raise DataError(f"{folder} holds {n} record(s); a data holder needs at least 2")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_test = _count(n, test_fraction)
    n_val = _count(n - n_test, validation_fraction)
    if n - n_test - n_val < 1:
        raise DataError(
            f"{folder} holds {n} records: validation-fraction {validation_fraction} and test-fraction "
            f"{test_fraction} leave none to train on"
        )
    test = perm[:n_test].sort().values
    val = perm[n_test : n_test + n_val].sort().values
    train = perm[n_test + n_val :].sort().values
    return LocalSplits(data.subset(train), data.subset(val), data.subset(test), folder)


def _count(n: int, fraction: float) -> int:
    k = int(round(fraction * n))
    return max(k, 1) if fraction > 0 and n > 1 else k


# ----- centralized training's data ------------------------------------------------------------


def splits_for(cfg) -> Splits:
    """Train / validation / test splits of one data holder as a run's settings (``TrainConfig``)
    ask: a built-in dataset (its test split is the test set), or the user's data at
    ``data-dir`` read with the run's schema (its local test split, or ``test/`` sub-folder;
    a simulation root with ``silos.toml`` pools every silo's splits, the centralized baseline)."""
    if not cfg.custom:
        return load_splits(
            cfg.dataset,
            cfg.data_dir,
            validation_fraction=cfg.validation_fraction,
            train_subset=cfg.train_subset,
            test_subset=cfg.test_subset,
            features=cfg.features,
        )
    schema = schema_of(cfg.dataset, cfg.schema)
    folders = silo_folders(cfg.data_dir) or [cfg.data_dir]
    parts = [
        local_splits(f, schema, validation_fraction=cfg.validation_fraction, test_fraction=cfg.test_fraction)
        for f in folders
    ]

    def pooled(name: str) -> TensorData:
        chunks = [getattr(p, name) for p in parts]
        return TensorData(torch.cat([c.x for c in chunks]), torch.cat([c.y for c in chunks]))

    test = take_subset(pooled("test"), cfg.test_subset)
    if len(test) == 0:
        raise DataError(
            f"{cfg.data_dir} has no test data: set test-fraction > 0 or give the data a test/ sub-folder"
        )
    train = take_subset(pooled("train"), cfg.train_subset)
    label = f"{schema.name}-{schema.digest()[:12]}"
    return Splits(
        with_features(train, cfg.features, f"{label}-train", schema=schema),
        with_features(pooled("validation"), cfg.features, f"{label}-validation", schema=schema),
        with_features(test, cfg.features, f"{label}-test", schema=schema),
    )
