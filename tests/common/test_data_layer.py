"""The data layer against naive references: the schema's encoding by hand, the readers against
torchvision's ImageFolder and pyarrow / numpy reads of the same files, the local splits, the
tensor cache, and every bad input of a silo's data with its message (issue 26)."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch

from common.errors import DataError
from common.schema import Schema, builtin_schema, load_schema, schema_from_dict, schema_toml
from common.silos import LAST_READ, local_splits, read_dataset, silo_folder, write_silos_file

TABLE = {
    "name": "toy",
    "kind": "table",
    "drop": ["id"],
    "label": {"column": "y", "classes": ["lo", "mid", "hi"]},
    "feature": [
        {"column": "age", "type": "numeric", "min": 0, "max": 100},
        {"column": "color", "type": "categorical", "categories": ["red", "green"], "unseen": "zero"},
        {"column": "score", "type": "numeric", "min": -1, "max": 1, "missing": "fill", "fill": 0.5},
    ],
}
CSV = "id,age,color,score,y\n1,50,red,0.0,lo\n2,120,green,,hi\n3,-5,blue,1.0,mid\n4,25,green,-0.5,lo\n"
# by hand: age (clip to [0, 100]) / 100; color one-hot (blue unseen: zeros); score clipped to
# [-1, 1] then (s + 1) / 2, missing -> the fill 0.5 -> 0.75 and a missing flag
EXPECTED_X = [
    [0.50, 1, 0, 0.50, 0],
    [1.00, 0, 1, 0.75, 1],
    [0.00, 0, 0, 1.00, 0],
    [0.25, 0, 1, 0.25, 0],
]
EXPECTED_Y = [0, 2, 1, 0]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADADPIGU_CACHE_DIR", str(tmp_path / "cache"))


def table_schema() -> Schema:
    return schema_from_dict(TABLE)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


# ----- the schema ---------------------------------------------------------------------------


def test_a_table_is_encoded_as_the_schema_says(tmp_path, caplog):
    path = write(tmp_path / "d" / "data.csv", CSV)
    with caplog.at_level(logging.WARNING, logger="adadpigu.data"):
        data = read_dataset(os.path.dirname(path), table_schema())
    torch.testing.assert_close(data.x, torch.tensor(EXPECTED_X, dtype=torch.float32))
    assert data.y.tolist() == EXPECTED_Y
    # two ages outside [0, 100] were clipped and counted on this process's log
    assert "2 value(s) of column 'age' outside [0, 100] clipped" in caplog.text


def test_the_canonical_form_round_trips_and_its_hash_ignores_layout(tmp_path):
    s = table_schema()
    path = write(tmp_path / "schema.toml", schema_toml(s))
    again = load_schema(path)
    assert again.digest() == s.digest() and again.input_shape == (5,) and again.num_classes == 3
    other = schema_from_dict({**TABLE, "feature": TABLE["feature"][:2]})
    assert other.digest() != s.digest()
    assert s.encoded_names() == ["age", "color=red", "color=green", "score", "score:missing"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "graph"}, "kind must be one of"),
        ({"label": {"classes": ["a"]}}, "at least 2 classes"),
        ({"feature": [{"column": "age", "type": "numeric", "min": 0}]}, "public bounds min and max"),
        ({"feature": [{"column": "age", "type": "numeric", "min": 5, "max": 5}]}, "must be > min"),
        ({"feature": [{"column": "c", "type": "categorical"}]}, "needs its categories"),
        ({"feature": [{"column": "c", "type": "text"}]}, "type must be one of"),
        (
            {"feature": [{"column": "age", "type": "numeric", "min": 0, "max": 1, "missing": "fill"}]},
            "fill value",
        ),
        ({"drop": ["y"]}, "declared more than once"),
        ({"colour": 1}, "unknown key"),
    ],
)
def test_a_bad_schema_names_its_key(change, message):
    with pytest.raises(DataError, match=message):
        schema_from_dict({**TABLE, **change})


# ----- readers against references --------------------------------------------------------------


def _image_folder(root, n_per_class=3):
    """Grayscale 28x28 PNGs and RGB 30x30 JPEGs (other size and mode) in three class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / c / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(
            root / c / "x.jpg", quality=90
        )
    return str(root)


def image_schema(**image) -> Schema:
    return schema_from_dict(
        {
            "name": "toyimg",
            "kind": "image",
            "label": {"classes": ["a", "b", "c"]},
            "image": {"size": [28, 28], "channels": 1, "mean": [0.5], "std": [0.25], **image},
        }
    )


def test_the_image_folder_reader_gives_torchvision_imagefolder_tensors(tmp_path):
    from torchvision import datasets, transforms

    root = _image_folder(tmp_path / "imgs")
    schema = image_schema(**{"other-size": "resize", "other-mode": "convert"})
    ours = read_dataset(root, schema, cache=False)
    ref = datasets.ImageFolder(
        root,
        transform=transforms.Compose(
            [
                transforms.Grayscale(1),
                transforms.Resize((28, 28)),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.25]),
            ]
        ),
    )
    xs, ys = zip(*[ref[i] for i in range(len(ref))])
    assert ours.x.shape == (12, 1, 28, 28)
    torch.testing.assert_close(ours.x, torch.stack(xs), rtol=0, atol=1e-6)
    assert ours.y.tolist() == list(ys)


def test_csv_parquet_npz_and_datasets_folders_read_the_same_table(tmp_path):
    import datasets
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    schema = schema_from_dict(
        {**TABLE, "feature": [TABLE["feature"][0], TABLE["feature"][2]], "drop": ["id", "color"]}
    )
    csv = write(tmp_path / "csv" / "data.csv", CSV)
    table = pcsv.read_csv(csv)  # the reference reader, as a user would read the file
    pq.write_table(table, tmp_path / "data.parquet")
    (tmp_path / "hf").mkdir()
    datasets.Dataset(table).save_to_disk(str(tmp_path / "hf"))
    x = np.stack(
        [
            table.column("age").to_numpy(zero_copy_only=False),
            table.column("score").to_numpy(zero_copy_only=False),
        ],
        1,
    )
    np.savez(tmp_path / "data.npz", x=x, y=np.array(table.column("y").to_pylist()))
    ref = read_dataset(str(tmp_path / "csv"), schema)
    for path in ("data.parquet", "hf", "data.npz"):
        got = read_dataset(str(tmp_path / path), schema)
        torch.testing.assert_close(got.x, ref.x, msg=path)
        assert torch.equal(got.y, ref.y), path
    expected_age = np.clip(table.column("age").to_numpy(), 0, 100) / 100
    np.testing.assert_allclose(ref.x[:, 0].numpy(), expected_age, rtol=1e-6)


def test_builtin_mnist_through_the_schema_is_the_old_tensor(data_dir):
    from common.data import load_dataset
    from common.datafiles import read_mnist

    x, _ = read_mnist(os.path.join(data_dir, "MNIST", "raw"), "mnist", False)
    ours = builtin_schema("mnist").normalize_images(x[:100])
    assert torch.equal(ours, load_dataset("mnist", data_dir, False).x[:100])


# ----- a holder's folder: splits, cache, the per-silo root ----------------------------------------


def test_split_sub_folders_win_over_fractions_and_fractions_are_fixed(tmp_path):
    schema = table_schema()
    rows = "".join(f"{i},{i % 100},red,0.1,lo\n" for i in range(40))
    head = "id,age,color,score,y\n"
    write(tmp_path / "a" / "train" / "t.csv", head + rows)
    write(tmp_path / "a" / "test" / "t.csv", head + "".join(rows.splitlines(keepends=True)[:3]))
    s = local_splits(str(tmp_path / "a"), schema, validation_fraction=0.1, test_fraction=0.5)
    assert (len(s.train), len(s.validation), len(s.test)) == (36, 4, 3)
    write(tmp_path / "b" / "data.csv", head + rows)
    one = local_splits(str(tmp_path / "b"), schema, validation_fraction=0.25, test_fraction=0.25)
    two = local_splits(str(tmp_path / "b"), schema, validation_fraction=0.25, test_fraction=0.25)
    assert (len(one.train), len(one.validation), len(one.test)) == (22, 8, 10)
    assert torch.equal(one.test.x, two.test.x) and torch.equal(one.train.x, two.train.x)


def test_the_cache_is_read_the_second_time_and_a_changed_file_is_read_again(tmp_path):
    path = write(tmp_path / "d" / "data.csv", CSV)
    folder = os.path.dirname(path)
    first = read_dataset(folder, table_schema())
    assert not LAST_READ[os.path.abspath(folder)].cached
    second = read_dataset(folder, table_schema())
    assert LAST_READ[os.path.abspath(folder)].cached and torch.equal(first.x, second.x)
    with open(path, "a") as fh:
        fh.write("5,10,red,0.2,mid\n")
    third = read_dataset(folder, table_schema())
    assert not LAST_READ[os.path.abspath(folder)].cached and len(third) == 5


def test_silos_toml_orders_the_silos_and_must_match_the_run(tmp_path):
    for name in ("b", "a"):
        write(tmp_path / name / "data.csv", CSV)
    write_silos_file(str(tmp_path), ["b", "a"])
    assert silo_folder(str(tmp_path), 0, 2).endswith(os.sep + "b")
    with pytest.raises(DataError, match="lists 2 silos; the run has 3"):
        silo_folder(str(tmp_path), 0, 3)
    assert silo_folder(str(tmp_path / "a"), 1, 3).endswith(os.sep + "a")  # a deployed silo's own folder


# ----- bad input ------------------------------------------------------------------------------------

BAD_TABLES = {
    "missing label": ("id,age,color,score,y\n1,5,red,0.1,\n", r"\(rows are file lines\): row 2 has no label"),
    "label not in the schema": (
        "id,age,color,score,y\n1,5,red,0.1,huge\n",
        r"row 2: label 'huge' is not a class",
    ),
    "wrong type": (
        "id,age,color,score,y\n1,5,red,0.1,lo\n2,old,red,0.1,lo\n",
        r"row 3, column 'age': 'old' is not a number",
    ),
    "too many columns": (
        "id,age,color,score,y\n1,5,red,0.1,lo,extra\n",
        r"Row #2: Expected 5 columns, got 6",
    ),
    "an undeclared column": (
        "id,age,color,score,y,z\n1,5,red,0.1,lo,1\n",
        r"column 'z' is not in the schema",
    ),
    "a declared column missing": ("id,age,score,y\n1,5,0.1,lo\n", r"column 'color' of the schema is missing"),
    "an empty cell with missing = error": (
        "id,age,color,score,y\n1,,red,0.1,lo\n",
        r"row 2, column 'age': the cell is empty",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_tables_name_the_row_and_column(case, tmp_path):
    text, message = BAD_TABLES[case]
    path = write(tmp_path / "d" / "data.csv", text)
    with pytest.raises(DataError, match=message) as err:
        read_dataset(os.path.dirname(path), table_schema())
    assert path in str(err.value)


def test_a_category_not_in_the_schema_is_refused_when_unseen_is_error(tmp_path):
    schema = schema_from_dict(
        {
            **TABLE,
            "feature": [{"column": "color", "type": "categorical", "categories": ["red"]}],
            "drop": ["id", "age", "score"],
        }
    )
    path = write(tmp_path / "d" / "data.csv", CSV)
    with pytest.raises(DataError, match=r"category 'green' is not in the schema"):
        read_dataset(os.path.dirname(path), schema)


def test_bad_image_folders(tmp_path):
    from PIL import Image

    schema = image_schema()  # other-size: refuse
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(str(tmp_path / "nothing"), schema)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        read_dataset(str(tmp_path / "empty"), schema)
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / "a" / "0.png")
    (root / "zebra").mkdir()
    with pytest.raises(DataError, match="class folder 'zebra' is not a class of the schema"):
        read_dataset(str(root), schema)
    shutil.rmtree(root / "zebra")
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(root / "a" / "1.png")
    with pytest.raises(
        DataError, match=r"1.png: 30x30 pixels, the schema wants 28x28 \(other-size = 'refuse'\)"
    ):
        read_dataset(str(root), schema)
    os.remove(root / "a" / "1.png")
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(root / "a" / "2.png")
    with pytest.raises(DataError, match=r"2.png: mode RGB, the schema wants L"):
        read_dataset(str(root), image_schema(**{"other-mode": "refuse"}))
    os.remove(root / "a" / "2.png")
    raw = (root / "a" / "0.png").read_bytes()
    (root / "a" / "3.png").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(DataError, match=r"3.png is corrupt"):
        read_dataset(str(root), schema)
    (root / "a" / "3.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"3.png is corrupt"):
        read_dataset(str(root), schema)
