"""The data layer without servers: storage on local paths, the Parquet schema, the shapes
builder, the importer, the preprocessing, and the ``dalle2 data`` commands."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dalle2.data import shapes, storage
from dalle2.data.importer import import_dataset
from dalle2.data.preprocess import Flip, decode_image, in_validation, preprocess_batch, to_model_images
from dalle2.data.schema import (
    IMAGE_CAPTION_SCHEMA,
    DatasetError,
    ShardWriter,
    check_columns,
    dataset_files,
    read_dataset,
)
from dalle2.eval.shapes_checker import read_attributes

START_OF_TEXT = 49406  # open_clip's BPE <start_of_text>


def png_bytes(color=(200, 30, 30), size=(8, 8), mode="RGB", format="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=format)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------- storage


def test_storage_local_paths_and_file_uris(tmp_path):
    root = f"file://{tmp_path}/store"
    storage.write_bytes(storage.join(root, "a", "one.bin"), b"1")  # parent folders are created
    storage.write_bytes(storage.join(root, "two.BIN"), b"22")
    storage.write_bytes(storage.join(root, "notes.txt"), b"x")

    assert storage.join("s3://bucket/data/", "/part-00000.parquet") == "s3://bucket/data/part-00000.parquet"
    assert storage.read_bytes(f"{tmp_path}/store/a/one.bin") == b"1"  # the same file as a plain path
    assert storage.list_files(root, suffix=".bin") == [f"{root}/a/one.bin", f"{root}/two.BIN"]
    assert storage.list_files(root, suffix=".bin", recursive=False) == [f"{root}/two.BIN"]
    assert storage.list_files(f"{root}/notes.txt") == [f"{root}/notes.txt"]  # a file lists itself
    assert storage.relative_path(root, f"{tmp_path}/store/a/one.bin") == "a/one.bin"
    assert storage.exists(root) and storage.is_file(f"{root}/notes.txt") and not storage.exists(f"{root}/nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.list_files(f"{root}/nope")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{root}/nope.bin")
    with pytest.raises(storage.StorageError, match="unsupported"):
        storage.resolve("ftp://host/file")

    storage.delete(f"{root}/notes.txt")  # a file
    storage.delete(storage.join(root, "a"))  # a folder and what it holds
    storage.delete(f"{root}/nope")  # nothing there: fine
    assert storage.list_files(root) == [f"{root}/two.BIN"]


# ---------------------------------------------------------------- schema


def sample_rows(count: int) -> pa.Table:
    return pa.table(
        {
            "key": [f"row/{i}" for i in range(count)],
            "caption": [f"caption {i}" for i in range(count)],
            "image": [png_bytes((i, 0, 0)) for i in range(count)],
            "width": [8] * count,
            "height": [8] * count,
        },
        schema=IMAGE_CAPTION_SCHEMA,
    )


def test_schema_round_trip_through_shards(tmp_path):
    table = sample_rows(7)
    with ShardWriter(str(tmp_path / "ds"), IMAGE_CAPTION_SCHEMA, rows_per_file=3) as writer:
        writer.write(table.slice(0, 2))  # batches need not line up with files
        writer.write(table.slice(2))
    assert [f.rsplit("/", 1)[1] for f in writer.files] == [f"part-0000{i}.parquet" for i in range(3)]
    assert [pq.read_metadata(f).num_rows for f in writer.files] == [3, 3, 1]

    back = read_dataset(str(tmp_path / "ds"))
    assert back.schema.equals(IMAGE_CAPTION_SCHEMA) and back.equals(table)
    check_columns(back.schema, IMAGE_CAPTION_SCHEMA.names, "round trip")
    with pytest.raises(FileExistsError):  # never mixes a new dataset into an old one
        ShardWriter(str(tmp_path / "ds"), IMAGE_CAPTION_SCHEMA)


def test_schema_errors_name_what_is_missing_and_what_is_there(tmp_path):
    renamed = pa.schema([("key", pa.string()), ("txt", pa.string()), ("jpg", pa.binary()), ("image", pa.string())])
    with pytest.raises(DatasetError) as error:
        check_columns(renamed, ["key", "caption", "image"], "x.parquet")
    message = str(error.value)
    assert "no column 'caption'" in message and "'image' is string" in message and "jpg" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no .parquet files"):
        dataset_files(str(tmp_path / "empty"))


# ---------------------------------------------------------------- shapes


def test_shapes_builder_is_deterministic_for_a_seed(tmp_path):
    first = shapes.write_shapes_dataset(str(tmp_path / "a"), count=12, image_size=32, seed=3, rows_per_file=5)
    second = shapes.write_shapes_dataset(str(tmp_path / "b"), count=12, image_size=32, seed=3, rows_per_file=5)
    shapes.write_shapes_dataset(str(tmp_path / "c"), count=12, image_size=32, seed=4, rows_per_file=5)
    assert len(first) == 3  # sharded: 5 + 5 + 2 rows
    assert [storage.read_bytes(f) for f in first] == [storage.read_bytes(f) for f in second]
    assert read_dataset(str(tmp_path / "a")).column("caption") != read_dataset(str(tmp_path / "c")).column("caption")
    # Row i depends on (seed, i) only: a longer dataset starts with the same rows.
    assert shapes.shapes_table(0, 4, 32, seed=3).equals(read_dataset(str(tmp_path / "a")).slice(0, 4))


def test_shapes_captions_and_pixels_state_the_labels():
    table = shapes.shapes_table(0, 90, image_size=64, seed=0)  # small shapes need 64 px to tell apart
    rows = table.to_pylist()
    assert {r["shape"] for r in rows} == set(shapes.SHAPES)
    assert {r["color"] for r in rows} == set(shapes.COLORS)
    assert len({r["position"] for r in rows}) == len(shapes.POSITIONS)
    for row in rows:
        labels = {name: row[name] for name in shapes.LABEL_COLUMNS}
        caption = row["caption"]
        said = {
            "where": shapes.POSITION_PHRASES[row["position"]][0], "size": shapes.SIZE_WORDS[row["size"]],
            "background": shapes.BACKGROUND_WORDS[row["background"]], "shape": [row["shape"]], "color": [row["color"]],
        }  # fmt: skip
        assert all(any(form in caption for form in forms) for forms in said.values()), caption
        image = decoded(row["image"])
        assert image.shape == (64, 64, 3) and (row["width"], row["height"]) == (64, 64)
        assert read_attributes(image) == labels, caption


def test_shapes_captions_vary_and_the_held_out_phrasings_never_train():
    labels = [{name: row[name] for name in shapes.LABEL_COLUMNS} for row in shapes.shapes_table(0, 2000, 8).to_pylist()]
    trained = [shapes.sample_scene(0, index).caption for index in range(2000)]
    ways = {shapes.caption(labels[0], "seen", np.random.default_rng(i)) for i in range(300)}
    assert len(ways) > 100  # many ways of saying one scene
    assert shapes.caption(labels[0]) == "a {} {} {} {} on a {} background".format(
        labels[0]["size"], labels[0]["color"], labels[0]["shape"], shapes.POSITIONS[labels[0]["position"]][1], labels[0]["background"])
    held_out = [shapes.held_out_caption(l, f"k{i}") for i, l in enumerate(labels)]
    assert held_out == [shapes.held_out_caption(l, f"k{i}") for i, l in enumerate(labels)]  # a function of (seed, key)
    assert not set(held_out) & set(trained)
    # Word orders and phrasings no training caption has, each made of words training captions have.
    words = lambda captions: {word.strip(",") for caption in captions for word in caption.split()}  # noqa: E731
    assert words(held_out) <= words(trained)
    for position, (_, phrase) in shapes.POSITION_PHRASES.items():
        assert not any(phrase in caption for caption in trained), phrase
        assert any(phrase in caption for caption in held_out), phrase
    # The held-out word orders: "<where> there is ...", "<background>, a ...", "..., <color>, <where> ...".
    assert not any(" there is " in c or c.startswith(("on a ", "against a ", "with a ")) for c in trained)
    assert not any(f", {color}, " in c for c in trained for color in shapes.COLORS)
    assert sum(" there is " in c for c in held_out) > len(held_out) / 5


# ---------------------------------------------------------------- importer


def test_import_folder_with_same_stem_txt_captions(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    red_png = png_bytes((255, 0, 0))
    (src / "red.png").write_bytes(red_png)
    (src / "red.txt").write_text("  a red square \n")
    (src / "sub" / "blue.jpg").write_bytes(png_bytes((0, 0, 255), size=(12, 6), format="JPEG"))
    (src / "sub" / "blue.txt").write_text("a blue rectangle")
    (src / "green.webp").write_bytes(png_bytes((0, 255, 0), format="WEBP"))
    (src / "green.txt").write_text("green")
    (src / "nocaption.png").write_bytes(png_bytes())
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    (src / "broken.txt").write_text("broken")
    (src / "blank.png").write_bytes(png_bytes())
    (src / "blank.txt").write_text("   ")

    report = import_dataset(str(src), f"file://{tmp_path}/out", rows_per_file=2)
    assert report.rows == 3 and len(report.files) == 2
    assert report.skipped == {"missing_caption": 1, "undecodable_image": 1, "empty_caption": 1}
    rows = {r["key"]: r for r in read_dataset(str(tmp_path / "out")).to_pylist()}
    assert sorted(rows) == ["green", "red", "sub/blue"]
    assert rows["red"]["caption"] == "a red square" and rows["red"]["image"] == red_png  # PNG kept as is
    assert (rows["sub/blue"]["width"], rows["sub/blue"]["height"]) == (12, 6)
    assert Image.open(io.BytesIO(rows["green"]["image"])).format == "PNG"  # WebP re-encoded


@pytest.mark.parametrize("caption_file", ["captions.jsonl", "captions.csv"])
def test_import_folder_with_a_captions_file(tmp_path, caption_file):
    src = tmp_path / "src"
    (src / "imgs").mkdir(parents=True)
    for name in ("a", "b"):
        (src / "imgs" / f"{name}.png").write_bytes(png_bytes())
    records = [{"file": "imgs/a.png", "text": "first image"}, {"file": "imgs/b.png", "text": "second, with a comma"}]
    if caption_file.endswith(".jsonl"):
        (src / caption_file).write_text("\n".join(json.dumps(r) for r in records))
    else:
        (src / caption_file).write_text('file,text\nimgs/a.png,first image\nimgs/b.png,"second, with a comma"\n')
    report = import_dataset(str(src), str(tmp_path / "out"), caption_column="text")
    assert report.rows == 2 and not report.skipped
    table = read_dataset(str(tmp_path / "out"))
    assert dict(zip(table.column("key").to_pylist(), table.column("caption").to_pylist())) == {
        "imgs/a": "first image",
        "imgs/b": "second, with a comma",
    }


def test_import_parquet_with_renamed_columns(tmp_path):
    # img2dataset-like: jpg/txt columns, its own width/height (of the original), extra columns.
    images = [png_bytes((0, 0, 255), size=(10, 4), format="JPEG"), png_bytes(), None, b"garbage"]
    source = pa.table(
        {
            "key": ["000", "001", "002", "003"],
            "jpg": images,
            "txt": ["a blue bar", "a red square", "no image", "bad bytes"],
            "width": [640, 480, 0, 0],
            "status": ["success"] * 4,
        }
    )
    (tmp_path / "src").mkdir()
    pq.write_table(source, tmp_path / "src" / "00000.parquet")
    with pytest.raises(DatasetError, match="jpg"):  # the error lists the columns that exist
        import_dataset(str(tmp_path / "src"), str(tmp_path / "wrong"))

    report = import_dataset(str(tmp_path / "src"), str(tmp_path / "out"), image_column="jpg", caption_column="txt")
    assert report.rows == 2 and report.skipped == {"missing_image": 1, "undecodable_image": 1}
    table = read_dataset(str(tmp_path / "out"))
    assert table.schema.equals(IMAGE_CAPTION_SCHEMA)
    assert table.select(["key", "caption", "width", "height"]).to_pylist() == [
        {"key": "000", "caption": "a blue bar", "width": 10, "height": 4},
        {"key": "001", "caption": "a red square", "width": 8, "height": 8},
    ]

    # Hugging Face datasets store images as {bytes, path} structs, and may have no key.
    struct = pa.table({"img": pa.array([{"bytes": png_bytes(), "path": "x.png"}]), "text": ["hf row"]})
    (tmp_path / "hf").mkdir()
    pq.write_table(struct, tmp_path / "hf" / "train-0.parquet")
    report = import_dataset(str(tmp_path / "hf"), str(tmp_path / "hf-out"), image_column="img", caption_column="text")
    assert report.rows == 1 and read_dataset(str(tmp_path / "hf-out")).column("key").to_pylist() == ["train-0/0000000"]


# ---------------------------------------------------------------- preprocessing


def test_decode_resizes_short_side_and_center_crops():
    wide = Image.new("RGB", (40, 20), (0, 200, 0))
    wide.paste((255, 0, 0), (0, 0, 10, 20))  # left quarter red, right quarter blue: cropped away
    wide.paste((0, 0, 255), (30, 0, 40, 20))
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    pixels = decode_image(buffer.getvalue(), 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    # Bicubic weights reach one pixel past the crop edge; the rest is the green middle only.
    assert np.abs(pixels[:, 1:-1].astype(int) - [0, 200, 0]).max() <= 2
    transparent = decode_image(png_bytes((255, 0, 0, 0), mode="RGBA"), 8)
    assert (transparent == 255).all()  # transparency composited onto white


def make_batch(rows: list[tuple]) -> dict[str, np.ndarray]:
    keys, captions, images = zip(*rows)
    return {"key": np.array(keys, object), "caption": np.array(captions, object), "image": np.array(images, object)}


def test_preprocess_drops_and_counts_bad_rows():
    good = png_bytes((10, 20, 30), size=(24, 12))
    batch = make_batch(
        [
            ("ok", " a caption ", good),
            ("broken", "a caption", b"\x89PNG truncated"),
            ("no-image", "a caption", None),
            ("empty", "  ", good),
            (None, "a caption", good),
        ]
    )
    out, drops = preprocess_batch(batch, image_size=16, context_length=8)
    assert drops == {"undecodable_image": 1, "missing_image": 1, "empty_caption": 1, "missing_key": 1}
    assert list(out["key"]) == ["ok"] and list(out["caption"]) == ["a caption"]
    assert out["image"].shape == (1, 16, 16, 3) and (out["image"][0] == [10, 20, 30]).all()
    assert out["tokens"].shape == (1, 8) and out["tokens"].dtype == np.int64 and out["tokens"][0, 0] == START_OF_TEXT

    empty, drops = preprocess_batch(make_batch([("x", "", None)]), image_size=16, context_length=8)
    assert empty["image"].shape == (0, 16, 16, 3) and empty["tokens"].shape == (0, 8) and sum(drops.values()) == 1


def test_validation_split_is_stable_and_partitions_the_rows():
    keys = np.array([f"row/{i}" for i in range(2000)], object)
    chosen = in_validation(keys, 0.1)
    assert 140 < chosen.sum() < 260 and (chosen == in_validation(keys, 0.1)).all()
    assert not in_validation(keys, 0.0).any() and in_validation(keys, 1.0).all()

    image = png_bytes()
    batch = make_batch([(k, "caption", image) for k in keys[:60]])
    train, _ = preprocess_batch(batch, image_size=8, context_length=4, split="train", validation_fraction=0.3)
    validation, _ = preprocess_batch(batch, image_size=8, context_length=4, split="validation", validation_fraction=0.3)
    assert set(train["key"]).isdisjoint(validation["key"]) and len(train["key"]) + len(validation["key"]) == 60
    assert list(validation["key"]) == list(keys[:60][in_validation(keys[:60], 0.3)])


def test_carried_columns_follow_the_kept_rows_of_the_split():
    """What the decoder reads from `dalle2 data embed` rows: the same split, the same bad-row drops,
    each precomputed embedding still beside its own image; and the encoded bytes kept for embed."""
    keys = [f"row/{i}" for i in range(40)]
    images = [png_bytes((i, 0, 0)) for i in range(40)]
    images[3] = b"not an image"
    batch = make_batch(list(zip(keys, ["caption"] * 40, images)))
    batch["image_embed"] = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)  # row i holds 4i..4i+3
    carry = {"image_embed": "image_embed", "image": "image_bytes"}
    for split in ("train", "validation"):
        plain, plain_drops = preprocess_batch(batch, image_size=8, context_length=4, split=split, validation_fraction=0.3)
        out, drops = preprocess_batch(batch, image_size=8, context_length=4, split=split, validation_fraction=0.3, carry=carry)
        assert list(out["key"]) == list(plain["key"]) and drops == plain_drops  # the image pipeline's split and drops
        rows = [keys.index(k) for k in out["key"]]
        assert out["image_embed"].shape == (len(rows), 4) and (out["image_embed"][:, 0] == [4 * i for i in rows]).all()
        assert list(out["image_bytes"]) == [images[i] for i in rows]
        assert (out["image"][:, 0, 0, 0] == rows).all()  # decoded pixels, aligned with the carried columns
    assert "image_embed" not in preprocess_batch(batch, image_size=8, context_length=4)[0]


def test_flip_is_off_by_default_and_mirrors_when_asked():
    image = Image.new("RGB", (16, 16), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 4, 16))  # a red band on the left
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    batch = make_batch([(f"k{i}", "a red band on the left", buffer.getvalue()) for i in range(32)])
    plain, _ = preprocess_batch(batch, image_size=16, context_length=4)
    assert (plain["image"] == np.asarray(image)).all()
    flipped, _ = preprocess_batch(
        batch, image_size=16, context_length=4, flip=Flip.HORIZONTAL, rng=np.random.default_rng(0)
    )
    mirrored = (flipped["image"] == np.asarray(image)[:, ::-1]).all(axis=(1, 2, 3))
    unchanged = (flipped["image"] == np.asarray(image)).all(axis=(1, 2, 3))
    assert (mirrored | unchanged).all() and 0 < mirrored.sum() < 32


def test_model_images_are_channels_first_in_minus_one_to_one():
    images = torch.tensor([[[[0, 255, 51]]]], dtype=torch.uint8)  # [1, 1, 1, 3]
    model = to_model_images(images)
    assert model.shape == (1, 3, 1, 1) and model.dtype == torch.float32
    assert torch.allclose(model.flatten(), torch.tensor([-1.0, 1.0, -0.6]))


# ---------------------------------------------------------------- command line


def test_data_commands(tmp_path, capsys):
    from dalle2.cli import main

    out = str(tmp_path / "shapes")
    assert main(["data", "shapes", out, "--count", "6", "--size", "16", "--rows-per-file", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(tmp_path / "shapes"), "rows": 6, "files": 2}
    assert main(["data", "import", f"file://{tmp_path}/shapes", str(tmp_path / "copy"), "--in-process"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 6
    original = read_dataset(str(tmp_path / "shapes"), columns=["key", "caption", "image"])
    assert read_dataset(str(tmp_path / "copy"), columns=["key", "caption", "image"]).equals(original)
