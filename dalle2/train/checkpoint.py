"""Training checkpoints: what they hold, when they are complete, and fetching parts of them.

A checkpoint is one folder ``<run>/checkpoint-<step>``, merged by Ray Train from what every
rank wrote into its local folder::

    deepspeed/<tag>/...          DeepSpeed's files: every rank its ZeRO shard
    ema/rank-<r>.safetensors     every rank its slice of the EMA (dalle2.train.ema)
    ema/layout.json              rank 0: parameter shapes and world size
    extra.safetensors            rank 0: state beside the weights (the prior's embedding stats)
    train_state.json             rank 0: step, data position (epoch, batches into it), samples seen
    data/rank-<r>.json           every rank its position in its shuffled sequence (dalle2.data.epochs)
    job.json                     rank 0: the job config and the model config (export rebuilds from it)
    manifest.json                rank 0: every file of every rank with its size

A checkpoint is *complete* when every file of its manifest is there with its size: a crash
while saving or uploading leaves no manifest, or files missing from it, and such a folder is
never resumed from or exported (Ray Train only registers a checkpoint once all ranks reported
it; the manifest makes the same check possible for anyone reading the storage).

Export to a model bundle (ZeRO consolidation, the EMA) is dalle2.train.export.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file

from dalle2.data import storage

CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST, TRAIN_STATE, JOB_FILE, EXTRA_FILE = "manifest.json", "train_state.json", "job.json", "extra.safetensors"
DEEPSPEED_DIR, EMA_DIR, EMA_LAYOUT, DATA_DIR = "deepspeed", "ema", "layout.json", "data"
FORMAT = "dalle2-train-checkpoint"
MODEL_PREFIX = "model."  # the engine wraps the model in a loss module (dalle2.train.tasks)


class CheckpointError(ValueError):
    """A run or checkpoint that cannot be resumed or exported."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch being read
    batches_in_epoch: int = 0  # micro-batches of that epoch this worker has consumed
    samples: int = 0  # samples seen by all workers together
    elapsed_s: float = 0.0  # training time of all attempts so far


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def deepspeed_tag(step: int) -> str:
    return f"step-{step:08d}"


def ema_file(rank: int) -> str:
    return f"{EMA_DIR}/rank-{rank:05d}.safetensors"


# ------------------------------------------------------------------------------- writing


def local_files(folder: str) -> dict[str, int]:
    """{path relative to folder: size in bytes} of every file below ``folder``."""
    found = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    return found


def write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as file:
        json.dump(data, file, indent=2)


def write_rank_files(folder: str, rank: int, ema_state: Optional[dict[str, torch.Tensor]]) -> None:
    if ema_state is not None:
        os.makedirs(os.path.join(folder, EMA_DIR), exist_ok=True)
        save_file({k: v.contiguous() for k, v in ema_state.items()}, os.path.join(folder, ema_file(rank)))


def data_position_file(rank: int) -> str:
    return f"{DATA_DIR}/rank-{rank:05d}.json"


def write_data_position(folder: str, rank: int, position) -> None:
    """Rank ``rank``'s :class:`dalle2.data.epochs.DataPosition` (epoch, sequence entries passed)."""
    write_json(os.path.join(folder, data_position_file(rank)), asdict(position))


def read_data_position(folder: str, rank: int):
    """Rank ``rank``'s data position, or None when the checkpoint has none (a Ray-dataset run)."""
    from dalle2.data.epochs import DataPosition

    path = os.path.join(folder, data_position_file(rank))
    return DataPosition(**read_json(folder, data_position_file(rank))) if os.path.exists(path) else None


def write_rank0_files(folder: str, *, state: TrainState, job: dict, model_kind: str, model_config: dict, zero_stage: int, world_size: int, ema_layout: Optional[dict], extra: dict[str, torch.Tensor]) -> None:
    write_json(os.path.join(folder, TRAIN_STATE), asdict(state))
    write_json(
        os.path.join(folder, JOB_FILE),
        {"job": job, "model_kind": model_kind, "model_config": model_config, "zero_stage": zero_stage, "world_size": world_size},
    )
    if ema_layout is not None:
        write_json(os.path.join(folder, EMA_DIR, EMA_LAYOUT), ema_layout)
    if extra:
        save_file({k: v.contiguous() for k, v in extra.items()}, os.path.join(folder, EXTRA_FILE))


def write_manifest(folder: str, files_of_ranks: list[dict[str, int]], step: int) -> None:
    """Rank 0, last: the files every rank wrote (``files_of_ranks[r]``), which must all be present."""
    files: dict[str, int] = {}
    for rank_files in files_of_ranks:
        files.update(rank_files)
    write_json(os.path.join(folder, MANIFEST), {"format": FORMAT, "version": 1, "step": step, "files": files})


# ------------------------------------------------------------------------------- reading


def _sizes(uri: str) -> dict[str, int]:
    return _sizes_at(*storage.resolve(uri), uri)


def _sizes_at(fs: pafs.FileSystem, path: str, uri: str) -> dict[str, int]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as error:
        raise CheckpointError(f"cannot list {uri}: {error}") from error
    return {os.path.relpath(i.path, path).replace(os.sep, "/"): i.size for i in infos if i.type == pafs.FileType.File}


def check_complete(uri: str) -> dict:
    """The manifest of the checkpoint at ``uri`` if every file it lists is there with its size;
    else a CheckpointError that says what is missing."""
    return _check_complete_at(*storage.resolve(uri), uri)


def _check_complete_at(fs: pafs.FileSystem, path: str, uri: str) -> dict:
    sizes = _sizes_at(fs, path, uri)
    if MANIFEST not in sizes:
        raise CheckpointError(f"{uri}: no {MANIFEST} (not a checkpoint, or one whose saving did not finish)")
    with fs.open_input_stream(f"{path}/{MANIFEST}") as file:
        manifest = json.loads(file.read())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{uri}: {MANIFEST} is not a dalle2 training checkpoint manifest")
    wrong = [name for name, size in manifest["files"].items() if sizes.get(name) != size]
    if wrong:
        raise CheckpointError(f"{uri}: incomplete checkpoint, {len(wrong)} files missing or truncated (first: {wrong[0]})")
    return manifest


def latest_checkpoint(run_uri: str) -> str:
    """The newest complete checkpoint of a run folder (or ``run_uri`` itself if it is one)."""
    if storage.exists(storage.join(run_uri, MANIFEST)):
        check_complete(run_uri)
        return run_uri
    fs, path = storage.resolve(run_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as error:
        raise CheckpointError(f"cannot list {run_uri}: {error}") from error
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)), reverse=True)
    for name in names:
        uri = storage.join(run_uri, name)
        try:
            check_complete(uri)
        except CheckpointError:
            continue  # a checkpoint whose saving was interrupted: take the one before
        return uri
    raise CheckpointError(f"{run_uri}: no complete checkpoint (looked for {CHECKPOINT_PREFIX}* folders with a manifest)")


@contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local folder with all the checkpoint's files (the folder itself when it is local); an
    export fetches only what it reads instead (dalle2.train.export.export_copy)."""
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="dalle2-checkpoint-") as folder:
        pafs.copy_files(path, folder, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield folder


# A rank's own files: DeepSpeed's ZeRO shards ("[bf16_]zero_pp_rank_<r>_mp_rank_00_{optim,model}_states.pt")
# and ours ("ema/rank-<r>.safetensors", "data/rank-<r>.json"). Everything else is shared.
_RANK_FILE = re.compile(r"^(?:.*zero_pp_rank_(\d+)_.*|rank-(\d+)\..*)$")


def rank_of(name: str) -> Optional[int]:
    """The rank whose own file ``name`` is, or None for a shared file."""
    match = _RANK_FILE.match(os.path.basename(name))
    return None if match is None else int(match.group(1) or match.group(2))


def needed_by_rank(name: str, rank: int) -> bool:
    """Whether rank ``rank`` reads file ``name`` of a checkpoint when it resumes: the shared files
    and its own shards, not the other ranks' (DeepSpeed loads only its own rank's ZeRO files
    unless elastic checkpoints are on, which dalle2 never turns on)."""
    return rank_of(name) in (None, rank)


def fetch_files(fs: pafs.FileSystem, path: str, names: Iterable[str], folder: str) -> None:
    """Copies the files ``names`` (relative to the checkpoint at ``path``) into local ``folder``."""
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        pafs.copy_files(f"{path}/{name}", os.path.join(folder, name), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())  # fmt: skip


def fetched_line(what: str, folder: str, manifest: dict, started: float) -> str:
    """What a partial copy cost, against the whole checkpoint (the point of copying only part)."""
    fetched, total = local_files(folder), sum(manifest["files"].values())
    return (f"{what} fetched {len(fetched)} files, {sum(fetched.values()) / 2**20:.1f} MiB of the checkpoint's "
            f"{total / 2**20:.1f} MiB, in {time.monotonic() - started:.1f} s")  # fmt: skip


@contextmanager
def rank_copy(fs: pafs.FileSystem, path: str, rank: int, log: Callable[[str], None] = print) -> Iterator[str]:
    """A local folder with what rank ``rank`` resumes from: the shared files and its own shards,
    about 1/world_size of the ZeRO state instead of all of it (the paper decoder's optimizer state
    is ~57 GB in all). Completeness is checked on the storage itself first. A local checkpoint
    is used where it lies."""
    manifest = _check_complete_at(fs, path, path)
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    names = [MANIFEST, *(name for name in manifest["files"] if needed_by_rank(name, rank))]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"dalle2-resume-rank{rank}-") as folder:
        fetch_files(fs, path, names, folder)
        log(fetched_line(f"rank {rank}: resume", folder, manifest, started))
        yield folder


def read_json(folder: str, name: str) -> Any:
    with open(os.path.join(folder, name)) as file:
        return json.load(file)


def read_train_state(folder: str) -> TrainState:
    return TrainState(**read_json(folder, TRAIN_STATE))


def read_extra(folder: str) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, EXTRA_FILE)
    return load_file(path) if os.path.exists(path) else {}


def read_ema_shard(folder: str, rank: int) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, ema_file(rank)))
