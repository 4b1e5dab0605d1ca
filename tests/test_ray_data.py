"""The Ray Data pipeline on a local 2-CPU Ray cluster, reading from the real S3 server:
every row arrives once, bad rows are dropped and counted, unusable data fails before
anything is scheduled, and Ray Train workers each stream a disjoint shard."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dalle2.config import from_dict
from dalle2.data import ray_reader, storage
from dalle2.data.ray_reader import CollateTrainingBatch, DataConfig, build_datasets
from dalle2.data.preprocess import Flip, in_validation
from dalle2.data.schema import IMAGE_CAPTION_SCHEMA, DatasetError, read_dataset
from dalle2.data.shapes import write_shapes_dataset

IMAGE_SIZE = 32
CONTEXT_LENGTH = 16


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def add_bad_rows(dataset_uri: str) -> None:
    """One more shard (plain schema, no label columns) with rows a job must survive."""
    bad = pa.table(
        {
            "key": ["bad/undecodable", "bad/empty-caption", "bad/no-image"],
            "caption": ["a caption", "   ", "a caption"],
            "image": [b"\x89PNG cut short", png_bytes(), None],
            "width": [8, 8, 8],
            "height": [8, 8, 8],
        },
        schema=IMAGE_CAPTION_SCHEMA,
    )
    with storage.open_output(storage.join(dataset_uri, "part-99999.parquet")) as sink:
        pq.write_table(bad, sink)


def consume(dataset) -> dict[str, np.ndarray]:
    columns: dict[str, list] = {"key": [], "image": [], "tokens": []}
    for batch in dataset.iter_batches(batch_size=16, batch_format="numpy"):
        for name in columns:
            columns[name].append(batch[name])
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def test_every_row_arrives_once_from_s3_and_bad_rows_are_counted(s3_server, ray_cluster):
    uri = s3_server.uri("pipeline")
    write_shapes_dataset(uri, count=40, image_size=64, seed=1, rows_per_file=10)
    add_bad_rows(uri)
    config = DataConfig(
        path=uri, image_size=IMAGE_SIZE, context_length=CONTEXT_LENGTH, validation_fraction=0.25, batch_size=8
    )
    data = build_datasets(config)
    train, validation = consume(data.train), consume(data.validation)

    keys = read_dataset(uri, columns=["key"]).column("key").to_numpy(zero_copy_only=False)
    good = keys[:40]
    expected_validation = set(good[in_validation(good, 0.25)])
    assert 0 < len(expected_validation) < 40
    assert sorted(validation["key"]) == sorted(expected_validation)
    assert sorted(train["key"]) == sorted(set(good) - expected_validation)  # each row once, none lost
    assert train["image"].shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3) and train["image"].dtype == np.uint8
    assert train["tokens"].shape[1:] == (CONTEXT_LENGTH,) and train["tokens"].dtype == np.int64
    assert data.dropped_rows() == {"undecodable_image": 1, "empty_caption": 1, "missing_image": 1}


def test_a_map_task_yields_its_rows_in_blocks_of_the_byte_budget(monkeypatch):
    """Ray charges per block, so a task gathers its decode calls' rows into blocks of about
    OUTPUT_BLOCK_BYTES; every row still leaves once, in order, with its columns aligned."""
    keys = [f"row/{i:03d}" for i in range(100)]
    block = {"key": np.array(keys, object), "caption": np.array([f"caption {i}" for i in range(100)], object),
             "image": np.array([png_bytes()] * 100, object)}  # fmt: skip
    options = dict(dropped=None, rows_per_call=16, image_size=8, context_length=8, split="train", validation_fraction=0.0)
    row_bytes = 8 * 8 * 3 + 8 * 8 + 2 * 8  # pixels, tokens, two object pointers

    whole = list(ray_reader._preprocess_in_task(block, **options))
    assert [len(out["key"]) for out in whole] == [100]  # a small file is one block
    monkeypatch.setattr(ray_reader, "OUTPUT_BLOCK_BYTES", 40 * row_bytes)
    parts = list(ray_reader._preprocess_in_task(block, **options))
    assert [len(out["key"]) for out in parts] == [48, 48, 4]  # whole calls of 16 rows, >= 40 rows each
    assert list(np.concatenate([out["key"] for out in parts])) == keys
    assert all(len(out["tokens"]) == len(out["image"]) == len(out["caption"]) == len(out["key"]) for out in parts)


def test_data_config_from_a_job_config():
    config = from_dict(DataConfig, {"path": "s3://bucket/shapes", "flip": "horizontal", "cpus_per_task": 0.5})
    assert config.flip is Flip.HORIZONTAL and config.cpus_per_task == 0.5 and config.validation_fraction == 0.05
    with pytest.raises(ValueError, match="unknown config keys"):
        from_dict(DataConfig, {"path": "x", "num_cpus": 1})


def test_unusable_data_fails_before_any_task(s3_server, ray_cluster, tmp_path):
    with pytest.raises(FileNotFoundError):
        build_datasets(DataConfig(path=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError):
        build_datasets(DataConfig(path="s3://no-such-bucket-dalle2/data"))
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    pq.write_table(pa.table({"key": ["k"], "jpg": [png_bytes()], "txt": ["t"]}), renamed / "part-00000.parquet")
    with pytest.raises(DatasetError, match="no column 'caption'; no column 'image'"):
        build_datasets(DataConfig(path=f"file://{renamed}"))


def test_train_workers_stream_disjoint_shards(s3_server, ray_cluster, tmp_path):
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def read_shard_keys(config: dict) -> None:
        """A Ray Train worker: stream this worker's shard and record the keys it saw.
        (Defined here so that Ray ships it by value: workers cannot import test modules.)"""
        keys = []
        shard = ray.train.get_dataset_shard("train")
        for batch in shard.iter_torch_batches(batch_size=8, collate_fn=CollateTrainingBatch()):
            assert batch["image"].shape[1:] == (config["image_size"], config["image_size"], 3)
            keys.extend(batch["key"])
        rank = ray.train.get_context().get_world_rank()
        with open(f"{config['out']}/keys-{rank}.json", "w") as file:
            json.dump([str(k) for k in keys], file)

    uri = s3_server.uri("train-shards")
    write_shapes_dataset(uri, count=32, image_size=64, seed=2, rows_per_file=8)
    # No validation rows, and an even row count: Ray Train splits with equal=True, which
    # leaves out up to (workers - 1) rows per epoch so that every worker takes the same steps.
    config = DataConfig(path=uri, image_size=IMAGE_SIZE, context_length=CONTEXT_LENGTH, validation_fraction=0.0)
    data = build_datasets(config)
    trainer = TorchTrainer(
        read_shard_keys,
        train_loop_config={"out": str(tmp_path), "image_size": IMAGE_SIZE},
        # Fractional CPUs: with 1 CPU each, 2 workers would hold both cores and the
        # pipeline's tasks could never be scheduled (see dalle2.data.ray_reader).
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
        datasets={"train": data.train},
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="shards"),
    )
    trainer.fit()

    shards = [set(json.loads((tmp_path / f"keys-{rank}.json").read_text())) for rank in range(2)]
    assert all(shards) and shards[0].isdisjoint(shards[1])
    assert shards[0] | shards[1] == {f"shapes/{i:06d}" for i in range(32)}


def test_embed_job_writes_clip_embeddings_of_every_row(s3_server, ray_cluster, capsys):
    import ray.data
    import torch

    from dalle2.bundle import save_bundle
    from dalle2.cli import main
    from dalle2.data.embed import EmbedConfig, embed_dataset
    from dalle2.data.preprocess import decode_image, to_model_images
    from dalle2.factory import create_model

    clip = create_model("clip", "tiny").eval()
    bundle = save_bundle(clip, "clip", s3_server.uri("clip"))  # actors load it from object storage
    data = s3_server.uri("embed-data")
    write_shapes_dataset(data, count=10, image_size=64, seed=3, rows_per_file=5)
    add_bad_rows(data)
    out = s3_server.uri("embeddings")
    assert main(["data", "embed", data, out, "--clip", bundle, "--batch-size", "4", "--accelerator", "cpu", "--no-images"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 10 and report["dropped"] == {"undecodable_image": 1, "empty_caption": 1, "missing_image": 1}
    with pytest.raises(FileExistsError):  # checked before any actor starts
        embed_dataset(EmbedConfig(data=data, out=out, clip=bundle))

    filesystem, path = storage.resolve(out)
    rows = ray.data.read_parquet(path, filesystem=filesystem).take_all()  # 10 rows: fine on the driver
    assert "image" not in rows[0]  # --no-images: the embeddings alone, for the prior
    by_key = {row["key"]: row for row in rows}
    source = read_dataset(data, columns=["key", "caption", "image"]).slice(0, 10).to_pylist()
    assert sorted(by_key) == sorted(r["key"] for r in source)
    config = clip.config
    for expected in source[:3]:
        row = by_key[expected["key"]]
        tokens = clip.tokenize([expected["caption"]])  # [1, L]
        image = to_model_images(torch.from_numpy(decode_image(expected["image"], config.image_size))[None])
        with torch.inference_mode():
            text = clip.encode_text(tokens)
            image_embed = clip.encode_image(image)
        assert row["text_hidden"].shape == (config.context_length, config.text_width)
        assert np.array_equal(row["tokens"], tokens[0].numpy())
        assert np.allclose(row["text_embed"], text.embed[0].numpy(), atol=1e-5)
        assert np.allclose(row["image_embed"], image_embed[0].numpy(), atol=1e-5)
        assert np.allclose(row["text_hidden"], text.hidden[0].numpy(), atol=1e-2)  # stored as float16
