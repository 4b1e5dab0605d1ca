"""WebDataset tar shards as written by img2dataset: imported from a folder and from s3:// (the
real SeaweedFS server) with a brace list; good rows arrive once, bad ones are counted by reason,
and unusable input fails before anything is written."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from dalle2.data import storage
from dalle2.data.importer import import_dataset
from dalle2.data.schema import DatasetError, read_dataset
from dalle2.data.webdataset import expand_braces

SIDE = 24


def encoded(format: str, color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), color).save(buffer, format=format)
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def metadata(index: int) -> bytes:
    return json.dumps({"url": f"https://example.com/{index}.jpg", "similarity": 0.25 + index / 100,
                       "width": SIDE, "tags": ["not", "scalar"]}).encode()  # fmt: skip


def write_shards(folder: str) -> set[str]:
    """Three shards with every kind of trouble; returns the keys that must arrive."""
    first = [
        ("000000001.jpg", encoded("JPEG", (200, 0, 0))), ("000000001.txt", b"a red square"), ("000000001.json", metadata(1)),
        ("000000002.png", encoded("PNG", (0, 200, 0))), ("000000002.txt", b"a green square"), ("000000002.json", metadata(2)),
        ("000000003.webp", encoded("WEBP", (0, 0, 200))), ("000000003.txt", b"a blue square"),  # no .json
        ("000000004.jpg", encoded("JPEG", (9, 9, 9))),  # no caption
        ("000000005.jpg", b"\xff\xd8 not really a jpeg"), ("000000005.txt", b"broken"),
        ("000000006.txt", b"a caption without an image"), ("000000006.json", metadata(6)),
    ]  # fmt: skip
    second = [(f"0000001{i}.{ext}", data) for i in range(4)
              for ext, data in (("jpg", encoded("JPEG", (i * 50, 0, 0))), ("txt", f"shape {i}".encode()))]  # fmt: skip
    third = tar_bytes([("000000020.jpg", encoded("JPEG", (1, 2, 3))), ("000000020.txt", b"kept"),
                       ("000000021.jpg", encoded("PNG", (4, 5, 6)) * 40), ("000000021.txt", b"lost")])  # fmt: skip
    storage.write_bytes(storage.join(folder, "00000.tar"), tar_bytes(first))
    storage.write_bytes(storage.join(folder, "00001.tar"), tar_bytes(second))
    storage.write_bytes(storage.join(folder, "00002.tar"), third[: 512 * 4 + 1024])  # cut inside 000000021.jpg
    good = {"00000/000000001", "00000/000000002", "00000/000000003", "00002/000000020"}
    return good | {f"00001/0000001{i}" for i in range(4)}


EXPECTED_SKIPS = {"missing_caption": 1, "undecodable_image": 1, "missing_image": 1, "truncated_shard": 1}


def check_import(src: str, out: str, good: set[str]) -> None:
    report = import_dataset(src, out, rows_per_file=3)
    assert report.rows == len(good) and dict(report.skipped) == EXPECTED_SKIPS
    table = read_dataset(out)
    assert sorted(table.column("key").to_pylist()) == sorted(good)  # each good row once
    rows = {row["key"]: row for row in table.to_pylist()}
    assert rows["00000/000000001"]["caption"] == "a red square" and rows["00000/000000001"]["width"] == SIDE
    assert rows["00000/000000002"]["url"] == "https://example.com/2.jpg"
    assert rows["00000/000000002"]["similarity"] == pytest.approx(0.27)
    assert rows["00000/000000003"]["url"] is None and "tags" not in rows["00000/000000003"]  # not scalar: not kept
    with Image.open(io.BytesIO(rows["00000/000000003"]["image"])) as image:  # webp re-encoded as PNG
        pixel = image.getpixel((5, 5))
        assert image.format == "PNG" and max(abs(a - b) for a, b in zip(pixel, (0, 0, 200))) <= 4  # WebP is lossy


def test_brace_lists_expand_like_webdataset():
    assert expand_braces("s3://b/{00008..00011}.tar") == [f"s3://b/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("x/{a,b}-{1..2}.tar") == ["x/a-1.tar", "x/a-2.tar", "x/b-1.tar", "x/b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_webdataset_shards_import_from_a_folder(tmp_path):
    folder = str(tmp_path / "shards")
    good = write_shards(folder)
    check_import(folder, str(tmp_path / "out"), good)


def test_webdataset_shards_import_from_s3_with_a_brace_list(s3_server, tmp_path):
    prefix = s3_server.uri("wds")
    good = write_shards(prefix)
    check_import(prefix + "/{00000..00002}.tar", s3_server.uri("wds-out"), good)


def test_unusable_webdataset_input_fails_before_anything_is_written(s3_server, tmp_path):
    prefix = s3_server.uri("wds-bad")
    with pytest.raises(DatasetError, match="none exists"):
        import_dataset(prefix + "/{00000..00003}.tar", str(tmp_path / "a"))
    storage.write_bytes(storage.join(prefix, "00000.tar"), b"this is not a tar file at all" * 40)
    with pytest.raises(DatasetError, match="not a tar file"):
        import_dataset(prefix + "/{00000..00001}.tar", str(tmp_path / "b"))
    assert not storage.exists(str(tmp_path / "a")) and not storage.exists(str(tmp_path / "b"))


def write_shapes_shards(folder: str, shards: int, per_shard: int) -> None:
    """The shapes dataset as img2dataset-style shards (PNG + caption + json per sample)."""
    from dalle2.data.shapes import shapes_table

    for shard in range(shards):
        rows = shapes_table(shard * per_shard, (shard + 1) * per_shard, image_size=32).to_pylist()
        members = []
        for index, row in enumerate(rows):
            members += [(f"{index:09d}.png", row["image"]), (f"{index:09d}.txt", row["caption"].encode()),
                        (f"{index:09d}.json", json.dumps({"key": row["key"]}).encode())]  # fmt: skip
        storage.write_bytes(storage.join(folder, f"{shard:05d}.tar"), tar_bytes(members))


def test_training_reads_webdataset_shards_directly(ray_cluster, tmp_path):
    from dalle2.train.config import load_job_config
    from dalle2.train.launch import run_job

    folder = str(tmp_path / "shards")
    write_shapes_shards(folder, shards=4, per_shard=20)
    storage.write_bytes(storage.join(folder, "00004.tar"), tar_bytes([("000000000.jpg", b"\xff\xd8 no jpeg"), ("000000000.txt", b"x")]))
    job = load_job_config("clip", overrides={
        "data": {"path": folder + "/{00000..00004}.tar", "format": "webdataset", "validation_fraction": 0.1,
                 "shuffle": {"buffer_rows": 16}},
        "run": {"storage": str(tmp_path / "runs"), "name": "wds"},
        "deepspeed": {"zero_stage": 1},
        "loop": {"max_steps": 3, "batch_size": 4, "log_every": 1, "val_every": 0, "val_batches": 1, "checkpoint_every": 0},
        "scaling": {"workers": 1, "cpus_per_worker": 0.5},  # one worker: the shared test machine's memory
    })  # fmt: skip
    result = run_job(job)
    assert result.metrics["step"] == 3 and "val_loss" in result.metrics
    assert set(result.dropped_rows) <= {"undecodable_image"}  # the broken sample, if a worker got to it
