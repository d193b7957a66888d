"""``adadpigu split``: write a dataset into one folder per silo, the layout a simulation and a
deployment of user data read (common/silos.py), so that the own-data path can be exercised
with known data.

Sources: a built-in dataset (MNIST, FashionMNIST, CIFAR-10 in torchvision's layout) or the
user's dataset in any format of :mod:`common.sources`, read with its schema. Partitions: the
cross-silo splits of :mod:`common.partition` (IID, Dirichlet, pathological, size skew) or
``column``: natural silos, one per value of a column (``--by``), or ``--silos`` groups of
consecutive values. Formats: ``imagefolder`` (PNG), ``npz``, ``hf`` (``save_to_disk``) for
images; ``csv``, ``parquet``, ``hf``, ``npz`` (numeric features only) for tables.

Written: ``<out>/silo-<i>/`` (each a complete dataset, with its copy of the schema and its
``silo.toml`` declaring its size rounded to two significant digits, the kind of figure an
owner states publicly: a folder that can be moved to the silo's own machine as it is),
``<out>/silos.toml`` (the order), ``<out>/schema.toml`` (the public schema) and, for a
built-in source, ``<out>/server-test/`` (its test split: the coordinator's own test set,
``server-test-data``). An existing non-empty ``<out>`` is refused.

    adadpigu split --dataset mnist --silos 10 --partitioner dirichlet --alpha 0.5 --format imagefolder --out silos/mnist
    adadpigu split --dataset custom --schema simulations/schemas/chem97.toml --source ../shared/data/chem97/chem97.csv \\
        --partitioner column --by lea --silos 10 --format csv --out silos/chem97-10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from common.config import BUILTIN_DATASETS, SPLITTING_PARTITIONERS, TrainConfig
from common.errors import DataError, UserError
from common.schema import Schema, builtin_schema, class_key, load_schema, resolve_schema_path, schema_toml
from common.silos import SILO_FILE, write_silo_file, write_silos_file

IMAGE_FORMATS = ("imagefolder", "npz", "hf")
TABLE_FORMATS = ("csv", "parquet", "hf", "npz")
PARTITIONERS = (*SPLITTING_PARTITIONERS, "column")


@dataclass
class Source:
    """A whole dataset to split: its schema, labels (class indices) and how to write a subset."""

    schema: Schema
    labels: torch.Tensor
    images: np.ndarray | None = None  # uint8 [n, H, W(, C)] (built-in or decoded images)
    files: list[str] | None = None  # image files of an image folder (copied as they are)
    table: object | None = None  # a pyarrow.Table with the original columns
    test_images: np.ndarray | None = None  # a built-in dataset's test split
    test_labels: torch.Tensor | None = None


def public_round(n: int) -> int:
    """``n`` rounded to two significant digits (at least 2).

    >>> public_round(5923), public_round(87), public_round(1)
    (5900, 87, 2)
    """
    if n < 100:
        return max(n, 2)
    scale = 10 ** (int(math.log10(n)) - 1)
    return int(round(n / scale) * scale)


def load_source(args: argparse.Namespace) -> Source:
    if args.dataset in BUILTIN_DATASETS:
        from common.data import _read_files

        schema = builtin_schema(args.dataset)
        x, y = _read_files(args.dataset, os.path.abspath(args.data_dir), True)
        tx, ty = _read_files(args.dataset, os.path.abspath(args.data_dir), False)
        if getattr(args, "subset", 0):  # the examples train-subset = N keeps (common.data.take_subset)
            keep = (
                torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: args.subset]
                .sort()
                .values
            )
            x, y = x[keep.numpy()], y[keep.numpy()]
        return Source(
            schema,
            torch.from_numpy(y.copy()),
            images=x,
            test_images=tx,
            test_labels=torch.from_numpy(ty.copy()),
        )
    if not args.schema or not args.source:
        raise UserError(
            "--dataset custom needs --schema (the public schema) and --source (the dataset to split)"
        )
    schema = load_schema(resolve_schema_path(args.schema))
    from common.sources import detect

    det = detect(args.source)
    if schema.kind == "table":
        table = _read_table(det, schema)
        labels = schema.encode_labels(table.column(schema.label_column).to_pylist(), args.source)
        return Source(schema, labels, table=table)
    if det.format == "imagefolder":
        index = schema.class_index()
        labels = []
        for f in det.files:
            cls = os.path.relpath(f, det.path).split(os.sep)[0]
            if class_key(cls) not in index:
                raise DataError(f"{det.path}: class folder '{cls}' is not a class of the schema")
            labels.append(index[class_key(cls)])
        return Source(schema, torch.tensor(labels, dtype=torch.int64), files=det.files)
    from common.sources import read

    got = read(det, schema)  # decoded: written back as uint8 images
    imgs = got.data.x * torch.tensor(schema.std).view(1, -1, 1, 1) + torch.tensor(schema.mean).view(
        1, -1, 1, 1
    )
    arr = (imgs.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return Source(schema, got.data.y, images=arr[..., 0] if schema.channels == 1 else arr)


def _read_table(det, schema: Schema):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if det.format == "csv":
        tables = [
            pcsv.read_csv(f, convert_options=pcsv.ConvertOptions(strings_can_be_null=True)) for f in det.files
        ]
    elif det.format == "parquet":
        tables = [pq.read_table(f) for f in det.files]
    elif det.format == "hf":
        from common.sources import load_hf

        tables = [load_hf(det.path).data.table]
    else:
        raise DataError(
            f"{det.path}: split a table from CSV, Parquet or a datasets folder (not {det.format})"
        )
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{det.path}: its files do not share one set of columns: {exc}") from None


def assign(source: Source, args: argparse.Namespace) -> list[torch.Tensor]:
    """The row indices of every silo."""
    if args.partitioner == "column":
        if source.table is None or not args.by:
            raise UserError("--partitioner column needs a table source and --by COLUMN")
        if args.by not in source.table.column_names:
            raise DataError(f"{args.source}: no column '{args.by}' to split by")
        values = source.table.column(args.by).to_pylist()
        keys = sorted({class_key(v) for v in values}, key=_natural)
        groups = _contiguous_groups(keys, [class_key(v) for v in values], args.silos)
        group_of = {k: g for g, ks in enumerate(groups) for k in ks}
        owner = torch.tensor([group_of[class_key(v)] for v in values])
        return [torch.nonzero(owner == g).flatten() for g in range(len(groups))]
    from common.partition import partition_indices

    cfg = TrainConfig(
        partitioner=args.partitioner, alpha=args.alpha, classes_per_silo=args.classes_per_silo,
        min_silo_size=args.min_silo_size, seed=args.seed,
    )  # fmt: skip
    if args.silos < 1:
        raise UserError(f"--silos must be at least 1, got {args.silos}")
    return partition_indices(source.labels, args.silos, cfg)


def _natural(key: str) -> tuple:
    try:
        return (0, float(key), key)
    except ValueError:
        return (1, 0.0, key)


def _contiguous_groups(keys: list[str], values: list[str], silos: int) -> list[list[str]]:
    """One group per key (``silos`` 0), or ``silos`` groups of consecutive keys with about
    equal numbers of rows."""
    if silos <= 0 or silos >= len(keys):
        return [[k] for k in keys]
    counts = {k: 0 for k in keys}
    for v in values:
        counts[v] += 1
    total, groups, current, filled = len(values), [], [], 0
    for i, k in enumerate(keys):
        current.append(k)
        filled += counts[k]
        left_keys, left_groups = len(keys) - i - 1, silos - len(groups) - 1
        if left_groups > 0 and (filled >= total * (len(groups) + 1) / silos or left_keys == left_groups):
            groups.append(current)
            current = []
    groups.append(current)
    return [g for g in groups if g]


# ----- writing ----------------------------------------------------------------------------------


def write_subset(source: Source, index: torch.Tensor, folder: str, fmt: str, *, test: bool = False) -> int:
    """Write the rows ``index`` of ``source`` (its test split with ``test``) into ``folder``."""
    schema = source.schema
    os.makedirs(folder, exist_ok=True)
    idx = index.numpy()
    if schema.kind == "table":
        if fmt not in TABLE_FORMATS:
            raise UserError(f"--format {fmt} is for images; a table is written as {', '.join(TABLE_FORMATS)}")
        _write_table(source.table.take(idx), schema, folder, fmt)
        return len(idx)
    if fmt not in IMAGE_FORMATS:
        raise UserError(f"--format {fmt} is for tables; images are written as {', '.join(IMAGE_FORMATS)}")
    labels = (source.test_labels if test else source.labels)[index].tolist()
    if source.files is not None and fmt == "imagefolder":
        for i in idx:
            src = source.files[i]
            cls = schema.classes[int(source.labels[i])]
            os.makedirs(os.path.join(folder, cls), exist_ok=True)
            shutil.copy2(src, os.path.join(folder, cls, f"{i:07d}-{os.path.basename(src)}"))
        return len(idx)
    images = source.test_images if test else source.images
    if images is None:  # an image folder into npz / hf: decode first
        from common.sources import _open_image

        images = np.stack([_open_image(source.files[i], schema)[0] for i in idx])
        idx = np.arange(len(idx))
    _write_images(images[idx], [schema.classes[k] for k in labels], index.numpy(), schema, folder, fmt)
    return len(idx)


def _write_images(
    images: np.ndarray, classes: list[str], ids: np.ndarray, schema: Schema, folder: str, fmt: str
) -> None:
    from PIL import Image

    if fmt == "imagefolder":
        for c in sorted(set(classes)):
            os.makedirs(os.path.join(folder, c), exist_ok=True)
        for img, c, i in zip(images, classes, ids):
            Image.fromarray(img).save(os.path.join(folder, c, f"{int(i):07d}.png"))
    elif fmt == "npz":
        np.savez(os.path.join(folder, "data.npz"), x=images, y=np.array(classes))
    else:
        import datasets

        features = datasets.Features(
            {
                schema.image_column: datasets.Image(),
                schema.label_column: datasets.ClassLabel(names=list(schema.classes)),
            }
        )
        ds = datasets.Dataset.from_dict(
            {
                schema.image_column: [Image.fromarray(i) for i in images],
                schema.label_column: [schema.classes.index(c) for c in classes],
            },
            features=features,
        )
        ds.save_to_disk(folder)


def _write_table(table, schema: Schema, folder: str, fmt: str) -> None:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if fmt == "csv":
        pcsv.write_csv(table, os.path.join(folder, "data.csv"))
    elif fmt == "parquet":
        pq.write_table(table, os.path.join(folder, "data.parquet"))
    elif fmt == "hf":
        import datasets

        datasets.Dataset(table).save_to_disk(folder)
    else:
        cats = [f.column for f in schema.features if f.type != "numeric"]
        if cats:
            raise UserError(
                f"--format npz holds numbers only; feature '{cats[0]}' is categorical (use csv or parquet)"
            )
        x = np.stack(
            [np.asarray(table.column(f.column).to_pylist(), dtype=np.float64) for f in schema.features],
            axis=1,
        )
        y = np.array([class_key(v) for v in table.column(schema.label_column).to_pylist()])
        np.savez(os.path.join(folder, "data.npz"), x=x, y=y)


def split(args: argparse.Namespace) -> dict:
    out = os.path.abspath(args.out)
    if os.path.exists(out) and os.listdir(out):
        raise UserError(f"--out {out} exists and is not empty: choose a new folder")
    source = load_source(args)
    parts = assign(source, args)
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(f"silo {empty[0]} would hold no records: fewer silos or another partition")
    os.makedirs(out, exist_ok=True)
    try:
        folders, sizes = [], []
        for i, idx in enumerate(parts):
            name = f"silo-{i}"
            n = write_subset(source, idx, os.path.join(out, name), args.format)
            write_silo_file(os.path.join(out, name), public_round(n), name)
            with open(os.path.join(out, name, "schema.toml"), "w") as fh:  # each silo holds its copy
                fh.write(schema_toml(source.schema))
            folders.append(name)
            sizes.append(n)
        write_silos_file(out, folders)
        with open(os.path.join(out, "schema.toml"), "w") as fh:
            fh.write(schema_toml(source.schema))
        if source.test_images is not None:
            write_subset(
                source,
                torch.arange(len(source.test_labels)),
                os.path.join(out, "server-test"),
                args.format,
                test=True,
            )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-written is left behind
        raise
    return {
        "out": out,
        "silos": len(folders),
        "sizes": sizes,
        "format": args.format,
        "schema": source.schema.name,
    }


def cmd_split(args: argparse.Namespace) -> int:
    result = split(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"wrote {result['silos']} silos ({result['format']}) of {result['schema']} to {result['out']}: "
            f"{min(result['sizes'])}..{max(result['sizes'])} records each; run with data-dir={result['out']} "
            f"(and dataset='custom' schema='{os.path.join(result['out'], 'schema.toml')}')"
        )
    return 0


def register(sub, add_config_flags, config_from_args) -> None:
    """Add ``adadpigu split`` (its own flags: it writes data, it does not train)."""
    from common.config import default_data_dir

    p = sub.add_parser(
        "split",
        help="write a built-in or user dataset into one folder per silo (IID, Dirichlet, ..., by column)",
    )
    p.add_argument("--dataset", default="mnist", choices=(*BUILTIN_DATASETS, "custom"))
    p.add_argument(
        "--data-dir", default=default_data_dir(), help="a built-in dataset's folder (torchvision layout)"
    )
    p.add_argument("--schema", default=None, help="--dataset custom: the public schema (TOML)")
    p.add_argument("--source", default=None, help="--dataset custom: the dataset to split (a file or folder)")
    p.add_argument(
        "--silos", type=int, default=10, help="number of silos (column: groups of values; 0 = one per value)"
    )
    p.add_argument("--partitioner", default="iid", choices=PARTITIONERS)
    p.add_argument("--by", default=None, help="--partitioner column: the column whose values are the silos")
    p.add_argument("--alpha", type=float, default=0.5, help="dirichlet concentration")
    p.add_argument("--classes-per-silo", type=int, default=2, help="pathological: classes per silo")
    p.add_argument("--min-silo-size", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--subset",
        type=int,
        default=0,
        help="a built-in dataset: only the examples train-subset = N uses (0 = all)",
    )
    p.add_argument("--format", required=True, choices=sorted({*IMAGE_FORMATS, *TABLE_FORMATS}))
    p.add_argument("--out", required=True, help="a new folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_split)


__all__ = ["split", "register", "SILO_FILE"]
