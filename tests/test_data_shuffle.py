"""Shuffled epochs and exact resume (dalle2.data.epochs, dalle2.data.stream).

The plan is a pure function of (seed, epoch): checked without Ray. The stream is checked on
the session's 2-CPU Ray cluster: two epochs deliver the same rows in other orders, and batches
mix rows of several files.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest
from ray import cloudpickle

from dalle2.config import from_dict
from dalle2.data.epochs import EpochPlan, Piece, ShuffleConfig, ShuffleMode, WindowShuffler, dataset_pieces, piece_order
from dalle2.data.ray_reader import DataConfig, build_training_data
from dalle2.data.preprocess import in_validation, preprocess_batch
from dalle2.data.schema import read_dataset
from dalle2.data.shapes import write_shapes_dataset
from dalle2.data.stream import SEQUENCE_COLUMN, TrainingStream
from dalle2.train.config import ConfigError, load_job_config
from test_ray_data import add_bad_rows

# Worker functions and the decode wrapper travel to Ray by value (workers cannot import tests).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PIECES = [Piece(f"part-{i:05d}.parquet", 0, 10 + i) for i in range(12)]  # 12 files of 10-21 rows


def sequence(plan: EpochPlan) -> list[tuple[str, int]]:
    """(file, row) of each entry of a worker's sequence, before the window shuffle."""
    return [(p.file, row) for p in plan.pieces for row in range(p.start, p.stop)]


def deliver(plan: EpochPlan, position: int = 0, missing: frozenset = frozenset(), block: int = 7):
    """Run the plan's reads through the window shuffle as the stream does (``missing`` sequence
    entries are rows the decoder drops): [(sequence index, position after it)] in delivery order."""
    work, _ = plan.remaining(position)
    shuffler, out = WindowShuffler(plan, position), []
    indices = [i for w in work for i in range(w.first_index, w.first_index + w.stop - w.start) if i not in w.skip]
    indices = np.array([i for i in indices if i not in missing], np.int64)
    for start in range(0, len(indices), block):
        shuffler.add({"sequence_index": indices[start : start + block]})
        out += [(int(i), int(p)) for rows, positions in shuffler.drain() for i, p in zip(rows["sequence_index"], positions)]
    out += [(int(i), int(p)) for rows, positions in shuffler.drain(final=True) for i, p in zip(rows["sequence_index"], positions)]
    return out


def test_an_epochs_plan_is_a_function_of_seed_and_epoch():
    shuffle = ShuffleConfig(seed=3, buffer_rows=32)
    assert list(piece_order(12, shuffle, 0)) == list(piece_order(12, shuffle, 0))
    assert list(piece_order(12, shuffle, 0)) != list(piece_order(12, shuffle, 1))
    assert list(piece_order(12, shuffle, 0)) != list(piece_order(12, ShuffleConfig(seed=4), 0))
    assert list(piece_order(12, ShuffleConfig(mode=ShuffleMode.NONE), 5)) == list(range(12))
    for epoch in (0, 1):
        plans = [EpochPlan.build(PIECES, shuffle, epoch, rank, 3) for rank in range(3)]
        again = [EpochPlan.build(PIECES, shuffle, epoch, rank, 3) for rank in range(3)]
        assert [deliver(p) for p in plans] == [deliver(p) for p in again]  # the same rows per worker, same order
        rows = [entry for plan in plans for entry in sequence(plan)]
        assert sorted(rows) == sorted((p.file, r) for p in PIECES for r in range(p.start, p.stop))  # each row once


def test_windows_mix_pieces_and_every_entry_is_delivered_once():
    plan = EpochPlan.build(PIECES, ShuffleConfig(seed=0, buffer_rows=40), epoch=2, rank=0, world_size=1)
    delivered = deliver(plan)
    assert sorted(i for i, _ in delivered) == list(range(plan.rows))
    assert [i for i, _ in delivered] != list(range(plan.rows))
    files = sequence(plan)
    first_batch = {files[i][0] for i, _ in delivered[:16]}
    assert len(first_batch) >= 2  # a batch mixes rows of several files
    positions = [p for _, p in delivered]
    assert positions == sorted(positions) and positions[-1] == plan.rows


@pytest.mark.parametrize("position", [0, 1, 39, 40, 41, 77, 150])
def test_a_resumed_epoch_delivers_exactly_the_rest(position):
    """Stop after the row whose position is ``position`` (or the nearest before), resume there:
    the rows before and after are the whole epoch, each once, also with dropped rows."""
    plan = EpochPlan.build(PIECES, ShuffleConfig(seed=1, buffer_rows=40), epoch=0, rank=1, world_size=2)
    missing = frozenset({3, 41, 42, 90})  # rows that the decoder drops
    full = deliver(plan, missing=missing)
    before = [(i, p) for i, p in full if p <= position]
    resume_at = before[-1][1] if before else 0
    after = deliver(plan, resume_at, missing=missing)
    assert [i for i, _ in before] + [i for i, _ in after] == [i for i, _ in full]
    work, skipped = plan.remaining(resume_at)
    decoded = sum(w.stop - w.start - len(w.skip) for w in work)
    assert skipped + decoded == plan.rows  # nothing passed is read again


def test_pieces_cut_files_so_that_every_worker_reads(tmp_path):
    write_shapes_dataset(str(tmp_path / "d"), count=50, image_size=16, rows_per_file=25)
    pieces = dataset_pieces(str(tmp_path / "d"), workers=2)
    assert len(pieces) == 4 and sum(p.rows for p in pieces) == 50
    assert len(dataset_pieces(str(tmp_path / "d"), workers=1)) == 2


def test_shuffle_config_errors():
    for bad in (0, -5):
        with pytest.raises(ConfigError, match="buffer_rows must be an integer >= 1"):
            load_job_config("clip", overrides={"data": {"shuffle": {"buffer_rows": bad}}})
    with pytest.raises(ConfigError, match="not one of"):
        load_job_config("clip", overrides={"data": {"shuffle": {"mode": "sometimes"}}})
    job = load_job_config("clip", overrides={"data": {"shuffle": {"seed": 7}}})
    assert job.data.shuffle.shuffles and job.data.shuffle.seed == 7
    assert from_dict(ShuffleConfig, {"mode": "none"}).mode is ShuffleMode.NONE


def test_two_epochs_deliver_the_same_rows_in_other_orders(ray_cluster, tmp_path):
    path = str(tmp_path / "shapes")
    write_shapes_dataset(path, count=72, image_size=16, rows_per_file=18)  # 4 files
    add_bad_rows(path)  # and a fifth with 3 bad rows
    config = DataConfig(path=path, image_size=16, context_length=8, validation_fraction=0.1, cpus_per_task=0.25)
    data = build_training_data(config, ShuffleConfig(seed=0, buffer_rows=40), workers=1)
    keys = read_dataset(path, columns=["key"]).column("key").to_numpy(zero_copy_only=False)[:72]
    train_keys = sorted(keys[~in_validation(keys, 0.1)])
    stream = TrainingStream(data.train, rank=0, world_size=1, batch_size=4)
    by_epoch: dict[int, list[str]] = {}
    batches = []
    while stream.position.epoch < 2:
        batch = stream.next()  # the position is the batch's own epoch
        by_epoch.setdefault(stream.position.epoch, []).extend(batch["key"])
        batches.append(batch)
        assert batch["image"].shape == (4, 16, 16, 3)
    epochs = [by_epoch[0], by_epoch[1]]
    assert len(epochs) >= 2
    full = len(train_keys) // 4 * 4  # drop_last
    assert len(epochs[0]) == len(epochs[1]) == full
    assert set(epochs[0]) <= set(train_keys) and len(set(epochs[0])) == full
    remainder = len(train_keys) - full
    assert len(set(epochs[0]) & set(epochs[1])) >= full - remainder  # the same rows, less the partial batch
    assert epochs[0] != epochs[1]
    files = [{int(k.split("/")[1]) // 18 for k in b["key"]} for b in batches]
    assert np.mean([len(f) > 1 for f in files]) > 0.5  # batches mix rows of several files
    stream.close()

    # Dropped rows count once per distinct row, however many epochs and validation passes read them.
    bad = np.array(["bad/undecodable", "bad/empty-caption", "bad/no-image"], dtype=object)
    reasons = np.array(["undecodable_image", "empty_caption", "missing_image"])
    train_drops = {str(r): 1 for r in reasons[~in_validation(bad, 0.1)]}
    assert data.dropped_rows() == train_drops
    for _ in range(2):
        list(data.validation.iter_batches(batch_size=16))
    assert data.dropped_rows() == {str(r): 1 for r in reasons}


def test_a_training_decode_task_imports_neither_torch_nor_open_clip(tmp_path):
    """Each epoch starts new decode worker processes (idle ones are stopped): a training job's
    captions come untokenized (context_length=None), so a decode task loads no torch and no
    tokenizer. A fresh interpreter unpickles and runs one task as a Ray worker does."""
    import subprocess

    from dalle2.data import stream as stream_module
    from dalle2.data.schema import TRAINING_COLUMNS

    path = str(tmp_path / "shapes")
    write_shapes_dataset(path, count=12, image_size=16, rows_per_file=12)
    config = DataConfig(path=path, image_size=16, context_length=None, validation_fraction=0.0)
    source = stream_module.training_source(config, ShuffleConfig(seed=0), workers=1, columns=TRAINING_COLUMNS)
    piece = source.pieces[0]
    items = {"file": np.array([piece.file]), "start": np.array([piece.start]), "stop": np.array([piece.stop]),
             "first_index": np.array([0]), "skip": np.array([[]], dtype=object), "piece_start": np.array([piece.start])}  # fmt: skip
    task = cloudpickle.dumps((stream_module._decode_work, items, source))  # the function by reference, as Ray sends it
    script = (
        "import json, sys\nfrom ray import cloudpickle\n"
        "decode, items, source = cloudpickle.loads(sys.stdin.buffer.read())\n"
        "out = [block for block in decode(items, source=source)]\n"
        "print(json.dumps({'rows': sum(len(b['key']) for b in out), 'columns': sorted(out[0]),"
        " 'loaded': [m for m in ('torch', 'open_clip') if m in sys.modules]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], input=task, capture_output=True, timeout=120, check=True)
    report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    rows = piece.stop - piece.start
    assert rows > 0 and report == {"rows": rows, "columns": ["caption", "image", "key", SEQUENCE_COLUMN], "loaded": []}


def counting_preprocess(batch, *, log_path: str, **options):
    """The pipeline's decoder, logging the keys it is given (one JSON line per call)."""
    with open(log_path, "a") as log:
        log.write(json.dumps([str(k) for k in batch["key"]]) + "\n")
    return preprocess_batch(batch, **options)


def read_one_epoch(config: dict) -> None:
    """A Ray Train worker: read this rank's epoch 0 in batches of 4, checkpoint the position every
    4 batches, and (rank 1, first attempt) fail after batch 6."""
    import dataclasses
    import functools
    import tempfile

    import ray.train

    from dalle2.data.epochs import DataPosition
    from dalle2.train.checkpoint import read_data_position, write_data_position

    rank = ray.train.get_context().get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    attempt = 1 if checkpoint else 0
    position = DataPosition()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            position = read_data_position(folder, rank)
    out = config["out"]
    source = dataclasses.replace(
        config["source"], preprocess=functools.partial(counting_preprocess, log_path=f"{out}/decoded-{attempt}-{rank}.jsonl")
    )
    stream = TrainingStream(source, rank, 2, batch_size=4, position=position)
    batches = stream.plan(0).rows // 4
    done = position.position // 4
    while done < batches:
        batch = stream.next()
        done += 1
        with open(f"{out}/delivered-{attempt}-{rank}.jsonl", "a") as log:
            log.write(json.dumps({"batch": done, "keys": [str(k) for k in batch["key"]]}) + "\n")
        if rank == 1 and done == 6 and not os.path.exists(f"{out}/failed"):
            open(f"{out}/failed", "w").close()
            # Ray Train registers the checkpoint of batch 4 asynchronously: give its controller
            # time to record it, so that the restarted workers get it (on a loaded machine too).
            time.sleep(10)
            raise RuntimeError("injected worker failure after batch 6")
        if done % 4 == 0:
            with tempfile.TemporaryDirectory() as folder:
                write_data_position(folder, rank, stream.position)
                ray.train.report({"batches": done}, checkpoint=ray.train.Checkpoint.from_directory(folder))
    stream.close()


def read_lines(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as file:
        return [json.loads(line) for line in file]


def test_an_interrupted_two_worker_epoch_delivers_each_row_once_and_skips_without_decoding(ray_cluster, tmp_path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    path = str(tmp_path / "shapes")
    write_shapes_dataset(path, count=96, image_size=16, rows_per_file=12)  # 8 files: 48 rows per worker
    config = DataConfig(path=path, image_size=16, context_length=8, validation_fraction=0.0, cpus_per_task=0.25)
    data = build_training_data(config, ShuffleConfig(seed=5, buffer_rows=20), workers=2)
    out = tmp_path / "out"
    out.mkdir()
    trainer = TorchTrainer(
        read_one_epoch,
        train_loop_config={"out": str(out), "source": data.train},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="resume", failure_config=FailureConfig(max_failures=1)),
    )
    trainer.fit()

    everything = {f"shapes/{i:06d}" for i in range(96)}
    delivered, consumed_before = [], set()
    for rank in range(2):
        first, second = read_lines(f"{out}/delivered-0-{rank}.jsonl"), read_lines(f"{out}/delivered-1-{rank}.jsonl")
        assert second and second[0]["batch"] == 5  # resumed after the checkpoint of batch 4
        kept = [k for line in first if line["batch"] <= 4 for k in line["keys"]]
        consumed_before |= set(kept)
        delivered += kept + [k for line in second for k in line["keys"]]
    assert sorted(delivered) == sorted(everything)  # every row of the epoch exactly once

    decoded_after = [k for rank in range(2) for line in read_lines(f"{out}/decoded-1-{rank}.jsonl") for k in line]
    assert not consumed_before & set(decoded_after)  # the skipped part was not decoded
    assert sorted(decoded_after) == sorted(everything - consumed_before)  # and the rest once


def test_the_progress_line_shows_dropped_rows_when_there_are_some():
    from dalle2.train.progress import progress_line

    metrics = {"step": 4, "max_steps": 8, "loss": 0.5, "steps_per_s": 1.0, "samples_per_s": 16.0, "lr": 1e-3, "eta_s": 4}
    assert "dropped" not in progress_line("clip", {**metrics, "dropped_rows": 0})
    assert progress_line("clip", {**metrics, "dropped_rows": 3}).endswith("| dropped 3 rows")
