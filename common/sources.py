"""Sources: one reader per data format, each through a well-kept library, each giving the
tensors the schema prescribes (:mod:`common.schema`).

| format | what | read with |
|---|---|---|
| ``imagefolder`` | ``<root>/<class>/<file>.png|jpg|...`` (torchvision's layout) | Pillow |
| ``csv`` | one or more ``*.csv`` files with a header row (concatenated in name order) | pyarrow.csv |
| ``parquet`` | one or more ``*.parquet`` files | pyarrow.parquet |
| ``hf`` | a Hugging Face ``datasets`` folder written by ``save_to_disk`` | datasets.load_from_disk |
| ``npz`` | one ``.npz`` with ``x`` and ``y`` | numpy (``allow_pickle=False``) |
| ``builtin`` | MNIST / FashionMNIST / CIFAR-10 in torchvision's layout | :mod:`common.datafiles` |

:func:`detect` says which format a folder or file holds (and the files a read will touch,
for the tensor cache's key); :func:`read` decodes it. Every refusal is a
:class:`~common.errors.DataError` naming the file, row or column; values of the data never
appear in a message except the offending cell itself, on the silo's own log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.data import TensorData
from common.errors import DataError
from common.schema import Schema, class_key

# torchvision's IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TABLE_EXTENSIONS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}
# files of a data folder that are not data: the schema, the silo's declaration, notes
META_FILES = ("schema.toml", "silo.toml", "silos.toml")
SPLIT_DIRS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
NULL_VALUES = ["", "NA", "NaN", "nan", "null", "NULL", "None"]
_MODES = {1: "L", 3: "RGB"}


@dataclass
class Detected:
    """What a dataset path holds: its format and the files a read touches."""

    path: str
    format: str
    files: list[str] = field(default_factory=list)


@dataclass
class Read:
    """A decoded dataset and what the silo's own log should hear about it."""

    data: TensorData
    clipped: dict[str, int] = field(default_factory=dict)  # numeric values clipped to bounds, per column
    converted: int = 0  # images converted to the schema's size or mode


def _is_meta(name: str) -> bool:
    low = name.lower()
    return (
        name.startswith(".") or low in META_FILES or low.startswith("readme") or low.endswith((".md", ".txt"))
    )


def detect(path: str) -> Detected:
    """The format of the dataset at ``path`` (a folder or a file); a missing, empty or
    mixed folder is refused by name."""
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist")
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in TABLE_EXTENSIONS:
            raise DataError(f"{path}: unknown data file type '{ext}' (.csv, .parquet, .npz, or a folder)")
        return Detected(path, TABLE_EXTENSIONS[ext], [path])
    names = sorted(os.listdir(path))
    if "dataset_dict.json" in names or ("dataset_info.json" in names and "state.json" in names):
        files = [os.path.join(dp, f) for dp, _, fs in sorted(os.walk(path)) for f in sorted(fs)]
        return Detected(path, "hf", files)
    files = [n for n in names if os.path.isfile(os.path.join(path, n)) and not _is_meta(n)]
    dirs = [n for n in names if os.path.isdir(os.path.join(path, n)) and not n.startswith(".")]
    kinds = {TABLE_EXTENSIONS.get(os.path.splitext(n)[1].lower()) for n in files} - {None}
    images = [n for n in files if n.lower().endswith(IMAGE_EXTENSIONS)]
    if images:
        raise DataError(
            f"{path}: {len(images)} image(s) directly in the folder (e.g. {images[0]}); an image folder "
            "holds one sub-folder per class (<root>/<class>/<file>)"
        )
    if len(kinds) > 1 or (kinds and dirs):
        what = sorted(kinds) + (["sub-folders"] if dirs else [])
        raise DataError(f"{path} mixes {', '.join(what)}: a dataset folder holds one format")
    if kinds:
        fmt = kinds.pop()
        found = [
            os.path.join(path, n)
            for n in files
            if TABLE_EXTENSIONS.get(os.path.splitext(n)[1].lower()) == fmt
        ]
        if fmt == "npz" and len(found) != 1:
            raise DataError(f"{path}: {len(found)} .npz files; a dataset is one .npz with arrays x and y")
        return Detected(path, fmt, found)
    if dirs:
        return Detected(path, "imagefolder", _image_files(path, dirs))
    raise DataError(
        f"{path} is empty: no data files (.csv, .parquet, .npz), class folders or datasets folder"
    )


def _image_files(root: str, classes: list[str]) -> list[str]:
    """torchvision's ``make_dataset`` order: classes by name, then a sorted walk of each."""
    out = []
    for c in sorted(classes):
        for dirpath, _, fnames in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            out += [os.path.join(dirpath, f) for f in sorted(fnames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return out


def read(det: Detected, schema: Schema) -> Read:
    """Decode the dataset ``det`` into the schema's tensors."""
    if det.format == "imagefolder":
        return _read_imagefolder(det, schema)
    if det.format in ("csv", "parquet"):
        _need(schema, "table", det)
        return _read_table(det, schema)
    if det.format == "npz":
        return _read_npz(det, schema)
    if det.format == "hf":
        return _read_hf(det, schema)
    raise DataError(f"{det.path}: unknown format {det.format}")


def _need(schema: Schema, kind: str, det: Detected) -> None:
    if schema.kind != kind:
        raise DataError(
            f"{det.path} holds {det.format} data ({kind}s); the schema '{schema.name}' is for {schema.kind}s"
        )


# ----- images ----------------------------------------------------------------------------


def conform_image(img: Any, schema: Schema, where: str) -> tuple[np.ndarray, bool]:
    """A Pillow image as the schema's uint8 array (``H x W`` or ``H x W x 3``): converted to
    its mode and resized (bilinear, as torchvision's ``Resize``) where the schema allows,
    refused where it does not. Returns the array and whether it was converted."""
    from PIL import Image

    target = _MODES[schema.channels]
    converted = False
    if img.mode != target:
        if schema.other_mode == "refuse":
            raise DataError(f"{where}: mode {img.mode}, the schema wants {target} (other-mode = 'refuse')")
        # torchvision's ImageFolder loader opens as RGB; Grayscale() then takes L of that
        img = img.convert("RGB") if target == "RGB" else img.convert("RGB").convert("L")
        converted = True
    h, w = schema.size
    if img.size != (w, h):
        if schema.other_size == "refuse":
            raise DataError(
                f"{where}: {img.size[0]}x{img.size[1]} pixels, the schema wants {w}x{h} (other-size = 'refuse')"
            )
        img = img.resize((w, h), Image.BILINEAR)
        converted = True
    return np.asarray(img, dtype=np.uint8), converted


def _open_image(path: str, schema: Schema) -> tuple[np.ndarray, bool]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return conform_image(img, schema, path)
    except UnidentifiedImageError:
        raise DataError(f"{path} is corrupt: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / broken files
        raise DataError(f"{path} is corrupt: {exc}") from None


def _read_imagefolder(det: Detected, schema: Schema) -> Read:
    _need(schema, "image", det)
    index = schema.class_index()
    classes = sorted(
        n for n in os.listdir(det.path) if os.path.isdir(os.path.join(det.path, n)) and not n.startswith(".")
    )
    unknown = [c for c in classes if class_key(c) not in index]
    if unknown:
        raise DataError(
            f"{det.path}: class folder '{unknown[0]}' is not a class of the schema "
            f"({', '.join(schema.classes[:12])}{', ...' if len(schema.classes) > 12 else ''})"
        )
    images, labels, converted = [], [], 0
    for path in det.files:
        rel = os.path.relpath(path, det.path)
        arr, conv = _open_image(path, schema)
        images.append(arr)
        labels.append(index[class_key(rel.split(os.sep)[0])])
        converted += conv
    if not images:
        raise DataError(f"{det.path}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    x = schema.normalize_images(np.stack(images))
    return Read(TensorData(x, torch.tensor(labels, dtype=torch.int64)), converted=converted)


def _images_from_arrays(x: np.ndarray, schema: Schema, where: str) -> tuple[np.ndarray, int]:
    """uint8 image arrays ``[n, H, W]`` / ``[n, H, W, C]`` conformed one by one if needed."""
    from PIL import Image

    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise DataError(
            f"{where}: x must be uint8 images [n, H, W] or [n, H, W, C], got {x.dtype} {list(x.shape)}"
        )
    want = (*schema.size, *([] if schema.channels == 1 else [3]))
    if tuple(x.shape[1:]) == want:
        return x, 0
    out = [
        conform_image(Image.fromarray(img), schema, f"{where}, image {i + 1}")[0] for i, img in enumerate(x)
    ]
    return np.stack(out), len(out)


# ----- tables ----------------------------------------------------------------------------


def _check_columns(names: list[str], schema: Schema, where: str) -> None:
    declared = [f.column for f in schema.features] + [schema.label_column]
    missing = [c for c in declared if c not in names]
    if missing:
        raise DataError(
            f"{where}: column '{missing[0]}' of the schema is missing (the file has {', '.join(names[:12])})"
        )
    extra = [c for c in names if c not in declared and c not in schema.drop]
    if extra:
        raise DataError(
            f"{where}: column '{extra[0]}' is not in the schema; declare it as a feature or list it in drop"
        )
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise DataError(f"{where}: column '{dup[0]}' appears more than once")


def _encode(columns: dict[str, list[Any]], schema: Schema, where: str, rows: list[int]) -> Read:
    y = schema.encode_labels(columns[schema.label_column], where, rows)
    x, clipped = schema.encode_table(columns, where, rows)
    return Read(TensorData(x, y), clipped=clipped)


def _read_csv_file(path: str, schema: Schema) -> tuple[dict[str, list[Any]], list[int]]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        header = fh.readline()
    if not header.strip():
        raise DataError(f"{path} is empty: no header row")
    import csv

    names = next(csv.reader([header]))
    _check_columns(names, schema, path)
    try:
        table = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(use_threads=False),
            convert_options=pcsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                null_values=NULL_VALUES,
                strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: {exc}".replace("CSV parse error: ", "")) from None
    columns = {c: table.column(c).to_pylist() for c in names if c not in schema.drop}
    return columns, [i + 2 for i in range(table.num_rows)]  # file lines (the header is line 1)


def _read_table(det: Detected, schema: Schema) -> Read:
    parts = []
    for path in det.files:
        if det.format == "csv":
            columns, rows = _read_csv_file(path, schema)
            where = f"{path} (rows are file lines)"
        else:
            columns, rows = _read_parquet_file(path, schema)
            where = path
        if not rows:
            raise DataError(f"{path} has no rows")
        parts.append(_encode(columns, schema, where, rows))
    return _concat(parts)


def _read_parquet_file(path: str, schema: Schema) -> tuple[dict[str, list[Any]], list[int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path} is corrupt: {exc}") from None
    _check_columns(table.column_names, schema, path)
    columns = {c: table.column(c).to_pylist() for c in table.column_names if c not in schema.drop}
    return columns, list(range(1, table.num_rows + 1))


def _concat(parts: list[Read]) -> Read:
    if len(parts) == 1:
        return parts[0]
    clipped: dict[str, int] = {}
    for p in parts:
        for k, v in p.clipped.items():
            clipped[k] = clipped.get(k, 0) + v
    x = torch.cat([p.data.x for p in parts])
    y = torch.cat([p.data.y for p in parts])
    return Read(TensorData(x, y), clipped=clipped, converted=sum(p.converted for p in parts))


# ----- NumPy and Hugging Face ----------------------------------------------------------------


def _read_npz(det: Detected, schema: Schema) -> Read:
    path = det.files[0]
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise DataError(
                    f"{path}: an .npz dataset holds arrays 'x' and 'y' (it has {', '.join(z.files)})"
                )
            x, y = z["x"], z["y"]
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path} is corrupt: {exc}") from None
    if len(x) != len(y) or y.ndim != 1:
        raise DataError(f"{path}: x has {len(x)} rows and y has shape {list(y.shape)}; y must be [len(x)]")
    if len(y) == 0:
        raise DataError(f"{path} has no rows")
    rows = list(range(1, len(y) + 1))
    labels = schema.encode_labels(y.tolist(), path, rows)
    if schema.kind == "image":
        images, converted = _images_from_arrays(x, schema, path)
        return Read(TensorData(schema.normalize_images(images), labels), converted=converted)
    cats = [f.column for f in schema.features if f.type != "numeric"]
    if cats:
        raise DataError(
            f"{path}: an .npz table holds numbers only; feature '{cats[0]}' is categorical (use CSV or Parquet)"
        )
    if x.ndim != 2 or x.shape[1] != len(schema.features):
        raise DataError(
            f"{path}: x must be [rows, {len(schema.features)}] (the schema's features, in order), got {list(x.shape)}"
        )
    columns = {f.column: x[:, j].tolist() for j, f in enumerate(schema.features)}
    feats, clipped = schema.encode_table(columns, path, rows)
    return Read(TensorData(feats, labels), clipped=clipped)


def load_hf(path: str):
    """``datasets.load_from_disk`` with a refusal that names the folder."""
    import datasets

    try:
        return datasets.load_from_disk(path)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds
        raise DataError(f"{path} is not a readable Hugging Face datasets folder: {exc}") from None


def _read_hf(det: Detected, schema: Schema) -> Read:
    import datasets

    ds = load_hf(det.path)
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{det.path} holds splits ({', '.join(ds)}); read through the silo layout")
    return read_hf_dataset(ds, schema, det.path)


def read_hf_dataset(ds, schema: Schema, where: str) -> Read:
    """One ``datasets.Dataset``: a table (its columns) or images (an Image column)."""
    import datasets

    names = list(ds.column_names)
    if len(ds) == 0:
        raise DataError(f"{where} has no rows")
    rows = list(range(1, len(ds) + 1))
    label = schema.label_column
    if label not in names:
        raise DataError(
            f"{where}: column '{label}' of the schema is missing (it has {', '.join(names[:12])})"
        )
    values = ds[label]
    feature = ds.features[label]
    if isinstance(feature, datasets.ClassLabel):  # stored as indices: match by the names
        values = [feature.names[v] if v is not None and 0 <= v < len(feature.names) else v for v in values]
    labels = schema.encode_labels(values, where, rows)
    if schema.kind == "image":
        col = schema.image_column
        if col not in names:
            raise DataError(
                f"{where}: no image column '{col}' (it has {', '.join(names[:12])}); set [image] column"
            )
        images, converted = [], 0
        for i, img in enumerate(ds.cast_column(col, datasets.Image())[col]):
            arr, conv = conform_image(img, schema, f"{where}, row {i + 1}")
            images.append(arr)
            converted += conv
        return Read(TensorData(schema.normalize_images(np.stack(images)), labels), converted=converted)
    _check_columns(names, schema, where)
    columns = {}
    for f in schema.features:
        vals = ds[f.column]
        feat = ds.features[f.column]
        if isinstance(feat, datasets.ClassLabel):
            vals = [feat.names[v] if v is not None and 0 <= v < len(feat.names) else v for v in vals]
        columns[f.column] = vals
    x, clipped = schema.encode_table(columns, where, rows)
    return Read(TensorData(x, labels), clipped=clipped)
