"""The data layer against a real S3 server (SeaweedFS on 127.0.0.1, see conftest.s3_server):
storage, the AWS configuration (environment and profiles), the builders writing and
reading s3://, and the start-up errors of an unusable dataset."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from dalle2.data import storage
from dalle2.data.importer import import_dataset
from dalle2.data.schema import DatasetError, ShardWriter, read_dataset
from dalle2.data.shapes import write_shapes_dataset


def png_bytes(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_storage_round_trip_on_s3(s3_server):
    root = s3_server.uri("storage")
    storage.write_bytes(storage.join(root, "a", "one.bin"), b"1")
    storage.write_bytes(storage.join(root, "two.bin"), b"22")
    storage.write_bytes(storage.join(root, "notes.txt"), b"x")

    assert storage.read_bytes(f"{root}/a/one.bin") == b"1"
    with storage.open_input(f"{root}/two.bin") as file:  # seekable, as Parquet readers need
        file.seek(1)
        assert file.read() == b"2"
    assert storage.list_files(root, suffix=".bin") == [f"{root}/a/one.bin", f"{root}/two.bin"]
    assert storage.relative_path(root, f"{root}/a/one.bin") == "a/one.bin"
    assert storage.exists(root) and storage.is_file(f"{root}/notes.txt")
    assert not storage.exists(f"{root}/missing") and not storage.exists("s3://no-such-bucket-dalle2/x")
    with pytest.raises(FileNotFoundError, match="missing"):
        storage.list_files(f"{root}/missing")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{root}/missing.bin")


def test_wrong_credentials_are_one_clear_error(s3_server, monkeypatch):
    from dalle2.data.ray_reader import check_dataset  # the check runs before Ray is asked for anything

    root = s3_server.uri("locked")
    write_shapes_dataset(root, count=2, image_size=16)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(storage.StorageError, match=f"cannot list {root}: .*(ACCESS_DENIED|SIGNATURE)"):
        storage.list_files(root)
    with pytest.raises(storage.StorageError, match="cannot list"):
        check_dataset(root)


def test_aws_profile_configures_endpoint_and_keys(s3_server, monkeypatch, tmp_path):
    """The same server reached through a named profile (~/.aws/config + credentials),
    with no AWS_* endpoint or key variables at all."""
    (tmp_path / "config").write_text(f"[profile seaweed]\nregion = us-east-1\nendpoint_url = {s3_server.endpoint}\n")
    (tmp_path / "credentials").write_text(
        "[seaweed]\n"
        f"aws_access_key_id = {s3_server.env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {s3_server.env['AWS_SECRET_ACCESS_KEY']}\n"
    )
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "seaweed")

    assert storage.configured_s3_endpoint() == s3_server.endpoint
    uri = storage.join(s3_server.uri("profile"), "hello.txt")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"


def test_shapes_to_s3_match_a_local_build(s3_server, tmp_path):
    from dalle2.cli import main

    remote = s3_server.uri("shapes")
    assert main(["data", "shapes", remote, "--count", "10", "--size", "16", "--seed", "5", "--rows-per-file", "4"]) == 0
    local = write_shapes_dataset(str(tmp_path / "shapes"), count=10, image_size=16, seed=5, rows_per_file=4)
    remote_files = storage.list_files(remote, suffix=".parquet")
    assert len(remote_files) == 3
    assert [storage.read_bytes(f) for f in remote_files] == [storage.read_bytes(f) for f in local]
    assert read_dataset(remote).num_rows == 10
    with pytest.raises(FileExistsError):
        write_shapes_dataset(remote, count=2)


def test_import_from_s3_folder_and_parquet_to_s3(s3_server, capsys):
    from dalle2.cli import main

    src = s3_server.uri("import-src")
    storage.write_bytes(f"{src}/cats/1.png", png_bytes((1, 2, 3)))
    storage.write_bytes(f"{src}/cats/2.png", png_bytes((4, 5, 6)))
    storage.write_bytes(
        f"{src}/captions.jsonl", b'{"file": "cats/1.png", "caption": "one"}\n{"file": "cats/2.png", "caption": ""}\n'
    )
    out = s3_server.uri("import-out")
    assert main(["data", "import", src, out, "--in-process"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == {"empty_caption": 1}
    imported = read_dataset(out)
    assert imported.column("key").to_pylist() == ["cats/1"] and imported.column("caption").to_pylist() == ["one"]

    renamed = s3_server.uri("import-renamed")
    with ShardWriter(renamed, pa.schema([("jpg", pa.binary()), ("txt", pa.string())])) as writer:
        writer.write(pa.table({"jpg": [png_bytes()], "txt": ["from parquet"]}))
    report = import_dataset(renamed, s3_server.uri("import-out"), image_column="jpg", caption_column="txt")
    assert report.rows == 1 and not report.skipped


def test_unusable_datasets_fail_at_the_check(s3_server):
    from dalle2.data.ray_reader import check_dataset

    with pytest.raises(FileNotFoundError):
        check_dataset(s3_server.uri("nothing-here"))
    with pytest.raises(FileNotFoundError):
        check_dataset("s3://no-such-bucket-dalle2/data")
    not_parquet = s3_server.uri("not-parquet")
    storage.write_bytes(f"{not_parquet}/a.png", png_bytes())
    with pytest.raises(DatasetError, match="no .parquet files"):
        check_dataset(not_parquet)
    renamed = s3_server.uri("renamed")
    with ShardWriter(renamed, pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("txt", pa.string())])) as w:
        w.write(pa.table({"key": ["k"], "jpg": [png_bytes()], "txt": ["t"]}))
    with pytest.raises(DatasetError, match="no column 'caption'; no column 'image'.*jpg, txt"):
        check_dataset(renamed)
