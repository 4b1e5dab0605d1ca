"""CLIP embeddings of a dataset, computed once by a pool of actors holding the frozen CLIP.

DALL-E 2 trains its prior and decoder on a CLIP that no longer changes (section 2): the
prior learns text encoding -> image embedding, the decoder is conditioned on the image
embedding. Computing the embeddings once, here, saves running CLIP at every epoch.

The output folder holds Parquet files written by Ray Data, one row per usable dataset
row (bad rows are dropped and counted, as in training)::

    key          string
    caption      string
    tokens       int64   [L]     the BPE ids the text states belong to (0 = padding)
    text_embed   float32 [D]     CLIP text embedding (not normalised)
    text_hidden  float16 [L, W]  per-token states after CLIP's final layer norm: what the
                                 prior attends to (section 2.2); float16 halves the bytes
    image_embed  float32 [D]     CLIP image embedding (not normalised)
    image        binary          the row's encoded image, the original PNG/JPEG bytes
                                 (absent with ``keep_images=False`` / ``--no-images``)

and, written last, ``embed.json`` (:data:`MANIFEST`: the source data, the CLIP bundle, the row
count, the dropped rows): the output is complete when it exists (:func:`is_complete`).

The prior trains from the embedding columns alone; the decoder needs ``image`` too (it learns
to draw the image whose CLIP embedding it is given), so it can train from these rows instead of
the image dataset, decoding the images itself but never running CLIP. The images are kept by
default: encoded images are small beside ``text_hidden`` for real CLIP sizes (a ViT-B CLIP's
[77, 512] float16 states are 79 KB a row, a 256px JPEG 15-25 KB; the 64px shapes PNGs are
0.3 KB), and the prior reads only its own columns, so one embedding folder serves both models.
Drop them (``--no-images``) for a prior-only copy of a dataset of large images.

Tensor columns use Ray Data's tensor type, so ``ray.data.read_parquet`` gives them back
as numpy arrays of these shapes. Rows follow no particular order; join on ``key``, and
:func:`dalle2.data.preprocess.in_validation` of the key gives the same split as training.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from dalle2.bundle import BundleError, load_bundle, read_bundle_header
from dalle2.data import storage
from dalle2.data.ray_reader import DataConfig, check_dataset, dropped_rows_counter, preprocessed_rows
from dalle2.data.preprocess import to_model_images
from dalle2.data.schema import PARQUET_SUFFIX, dataset_files
from dalle2.progress_bars import Bar

Accelerator = Literal["auto", "cpu", "gpu"]
MANIFEST = "embed.json"  # written last: its presence means the output folder is complete
IMAGE_BYTES = "image_bytes"  # the encoded image, carried beside the decoded pixels to the actors


@dataclass(frozen=True)
class EmbedConfig:
    data: str  # image-caption dataset (local, file:// or s3://)
    out: str  # folder for the embedding Parquet files; must hold none yet
    clip: str  # CLIP model bundle (dalle2.bundle)
    actors: int = 1  # CLIP replicas: one per GPU, or a few on CPUs
    batch_size: int = 64
    accelerator: Accelerator = "auto"  # auto: one GPU per actor when the cluster has GPUs or its autoscaler can add them
    cpus_per_task: float = 0.25  # fractional, as in DataConfig: a small machine must schedule everything
    keep_images: bool = True  # write each row's encoded image too (the decoder trains from these rows)


@dataclass(frozen=True)
class EmbedReport:
    rows: int  # rows written
    files: list[str]
    dropped: dict[str, int]  # bad rows by reason


def _writable(array: np.ndarray) -> np.ndarray:
    return np.require(array, requirements=("C", "W"))  # Ray's zero-copy batches may be read-only


class ClipEmbedder:
    """A Ray Data actor: loads the CLIP bundle once, then embeds batches of decoded rows."""

    def __init__(self, clip_uri: str, use_gpu: bool, counter=None):
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.clip = load_bundle(clip_uri, device=self.device).model
        self.counter = counter  # an actor that counts the embedded rows, for the driver's progress bar

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = to_model_images(torch.from_numpy(_writable(batch["image"]))).to(self.device)  # [B, 3, S, S]
        tokens = torch.from_numpy(_writable(batch["tokens"])).to(self.device)  # [B, L]
        with torch.inference_mode():
            text = self.clip.encode_text(tokens)
            image_embed = self.clip.encode_image(images)  # [B, D]
        out = {
            "key": batch["key"],
            "caption": batch["caption"],
            "tokens": batch["tokens"],
            "text_embed": text.embed.float().cpu().numpy(),  # [B, D]
            "text_hidden": text.hidden.half().cpu().numpy(),  # [B, L, W]
            "image_embed": image_embed.float().cpu().numpy(),  # [B, D]
        }
        if IMAGE_BYTES in batch:
            out["image"] = batch[IMAGE_BYTES]  # [B] the source's bytes, not the decoded pixels
        if self.counter is not None:
            self.counter.add.remote({"rows": len(batch["key"])})
        return out


def pick_accelerator(accelerator: Accelerator, live_gpus: float, node_types: Optional[list] = None) -> tuple[bool, str]:
    """(use a GPU per actor, the one line that says why). ``auto`` looks at the GPUs alive now
    and, on a cluster that can grow, at what its autoscaler can add (``node_types``, from
    :func:`dalle2.train.capacity.autoscaler_node_types`): GPU node types with ``min_workers: 0``
    have no node alive until work asks for one, and counting live nodes alone would pick the CPU."""
    if accelerator != "auto":
        return accelerator == "gpu", f"embed: on {accelerator.upper()} (--accelerator {accelerator})"
    if live_gpus >= 1:
        return True, f"embed: on GPU (auto): the cluster has {live_gpus:g} GPU(s) alive"
    gpu_types = [t for t in node_types or [] if t.resources.get("GPU", 0) >= 1]
    if gpu_types:
        adds = ", ".join(f"{t.name} ({t.resources['GPU']:g} GPU, up to {'any' if t.max_count < 0 else t.max_count})" for t in gpu_types)
        return True, f"embed: on GPU (auto): no GPU alive now, the autoscaler can add {adds}"
    undeclared = [t.name for t in node_types or [] if not t.resources]
    if undeclared:
        return False, (
            f"embed: on CPU (auto): no GPU alive, and the autoscaler's node types {', '.join(undeclared)} do not "
            "declare their resources (left for Ray to detect): declare them, or pass --accelerator gpu"
        )
    return False, "embed: on CPU (auto): no GPU on the cluster" + (" nor among its autoscaler's node types" if node_types else "")


def _use_gpu(accelerator: Accelerator) -> bool:
    from dalle2.train.capacity import autoscaler_node_types

    use_gpu, line = pick_accelerator(accelerator, ray.cluster_resources().get("GPU", 0), autoscaler_node_types())
    print(line, file=sys.stderr, flush=True)  # stdout carries the command's JSON summary alone
    return use_gpu


def is_complete(out: str) -> bool:
    """Whether ``out`` holds the finished output of :func:`embed_dataset` (its manifest)."""
    return storage.exists(storage.join(out, MANIFEST))


def _row_count(files: list[str]) -> int:
    """Rows in the source's Parquet files, from their footers."""
    count = 0
    for file_uri in files:
        with storage.open_input(file_uri) as file:
            count += pq.read_metadata(file).num_rows
    return count


@contextlib.contextmanager
def _progress(counter, total: int, desc: str):
    """A driver thread that moves a progress bar to ``counter``'s total while the block runs."""
    done = threading.Event()

    def follow() -> None:
        with Bar(total, desc, "img") as bar:
            while True:
                finished = done.wait(1.0)
                bar.update(ray.get(counter.totals.remote()).get("rows", 0) - bar.done)
                if finished:
                    return

    thread = threading.Thread(target=follow, name="embed-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def embed_dataset(config: EmbedConfig) -> EmbedReport:
    """Embed every usable row of ``config.data`` with the CLIP bundle; write Parquet to
    ``config.out``, then the manifest. The bundle, the data and the output folder are checked
    before any task or actor starts."""
    header = read_bundle_header(config.clip)
    if header["kind"] != "clip":
        raise BundleError(f"{config.clip}: a {header['kind']} bundle, not a CLIP one")
    clip_config = header["config"]
    filesystem, files = check_dataset(config.data)
    if storage.exists(config.out) and storage.list_files(config.out, suffix=PARQUET_SUFFIX):
        raise FileExistsError(f"{config.out} already holds Parquet files; choose an empty location")

    use_gpu = _use_gpu(config.accelerator)
    dropped = dropped_rows_counter()
    # Decode straight to CLIP's resolution; every row, with no train/validation split.
    data_config = DataConfig(
        path=config.data,
        image_size=clip_config["image_size"],
        context_length=clip_config["context_length"],
        validation_fraction=0.0,
        batch_size=config.batch_size,
        cpus_per_task=config.cpus_per_task,
    )
    carry = {"image": IMAGE_BYTES} if config.keep_images else None
    rows = preprocessed_rows(data_config, filesystem, files, "train", dropped, carry)
    embedded = dropped_rows_counter()  # the same counting actor, here counting the rows embedded
    embeddings = rows.map_batches(
        ClipEmbedder,
        fn_constructor_kwargs={"clip_uri": config.clip, "use_gpu": use_gpu, "counter": embedded},
        batch_format="numpy",
        batch_size=config.batch_size,
        concurrency=config.actors,  # a fixed pool of actors, each holding one CLIP
        num_gpus=1 if use_gpu else 0,
        num_cpus=config.cpus_per_task,
    )
    out_filesystem, out_path = storage.resolve(config.out)
    with _progress(embedded, _row_count(dataset_files(config.data)), "embed: CLIP"):
        embeddings.write_parquet(out_path, filesystem=out_filesystem, ray_remote_args={"num_cpus": config.cpus_per_task})

    written = storage.list_files(config.out, suffix=PARQUET_SUFFIX)
    report = EmbedReport(rows=_row_count(written), files=written, dropped=ray.get(dropped.totals.remote()))
    manifest = {
        "data": config.data, "clip": config.clip, "rows": report.rows, "files": len(written),
        "dropped": report.dropped, "images": config.keep_images,
    }  # fmt: skip
    storage.write_bytes(storage.join(config.out, MANIFEST), json.dumps(manifest, indent=2).encode())
    return report
