"""``dalle2 export``: the latest complete checkpoint of a run -> a model bundle (dalle2.bundle).

A checkpoint in object storage is mostly optimizer state: every rank's ZeRO shard of the fp32
master weights and Adam's two moments (~57 GB for the paper decoder), while the EMA, what
diffusion models sample with, is a few GB. So an export copies only the files it reads:

    weights="ema"  the shared small files, every rank's EMA slice and rank 0's model states
                   (the buffers; zero_to_fp32 takes them from there too). Only where the EMA
                   does not cover every parameter (or the run kept none) does it fetch the fp32
                   master weights as well, and says so.
    weights="raw"  the shared small files and what zero_to_fp32 reads: every rank's model and
                   optimizer states, not the EMA slices or data positions.

Either way the bundle's weights are those of consolidating the whole checkpoint: buffers as
zero_to_fp32 restores them, parameters from the EMA or the fp32 master weights.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional

import pyarrow.fs as pafs
import torch

from dalle2.config import CONFIG_CLASSES, from_dict
from dalle2.data import storage
from dalle2.train.checkpoint import (
    DEEPSPEED_DIR,
    EMA_DIR,
    EMA_LAYOUT,
    JOB_FILE,
    MANIFEST,
    MODEL_PREFIX,
    CheckpointError,
    _check_complete_at,
    deepspeed_tag,
    fetch_files,
    fetched_line,
    latest_checkpoint,
    rank_of,
    read_ema_shard,
    read_extra,
    read_json,
    read_train_state,
)
from dalle2.train.ema import consolidate

WEIGHTS = ("ema", "raw")


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name[len(MODEL_PREFIX) :]: tensor for name, tensor in state.items() if name.startswith(MODEL_PREFIX)}


def _deepspeed_folder(folder: str) -> str:
    return os.path.join(folder, DEEPSPEED_DIR, deepspeed_tag(read_train_state(folder).step))


def _model_states(folder: str) -> dict:
    """The model states zero_to_fp32 takes buffers and parameter names from: rank 0's at ZeRO-3,
    the only one at stages 0-2 (where it also holds the module's own weights)."""
    from deepspeed.utils.zero_to_fp32 import get_model_state_file

    file = get_model_state_file(_deepspeed_folder(folder), read_json(folder, JOB_FILE)["zero_stage"])
    return torch.load(file, map_location="cpu", weights_only=False)


def consolidated_weights(folder: str) -> dict[str, torch.Tensor]:
    """The whole model's trained weights (float32) from the DeepSpeed files of every rank:
    the fp32 master weights of ZeRO 1-3 (``zero_to_fp32``), the module itself at stage 0."""
    if read_json(folder, JOB_FILE)["zero_stage"] == 0:
        states = _model_states(folder)
        state = {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in states["module"].items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(os.path.join(folder, DEEPSPEED_DIR), tag=deepspeed_tag(read_train_state(folder).step))
    return _strip_prefix(state)


def model_buffers(states: dict) -> dict[str, torch.Tensor]:
    """The model's buffers from its model states (:func:`_model_states`) as zero_to_fp32 restores
    them (float32 where floating; stage 0 floats the whole module the same way)."""
    names = set(states["buffer_names"])
    return _strip_prefix({n: t.float() if t.is_floating_point() else t for n, t in states["module"].items() if n in names})


def ema_layout(folder: str) -> Optional[dict]:
    """The EMA's layout (parameter shapes, world size), or None when the run kept no EMA."""
    exists = os.path.exists(os.path.join(folder, EMA_DIR, EMA_LAYOUT))
    return read_json(folder, f"{EMA_DIR}/{EMA_LAYOUT}") if exists else None


def ema_weights(folder: str) -> Optional[dict[str, torch.Tensor]]:
    """The whole EMA parameters from the slices of every rank, or None when the run kept no EMA."""
    layout = ema_layout(folder)
    return None if layout is None else consolidate([read_ema_shard(folder, r) for r in range(layout["world_size"])], layout)


def missing_from_ema(states: dict, averaged: Iterable[str]) -> list[str]:
    """The model's weights, not buffers, that the EMA (parameter names ``averaged``) has no
    average of: the names zero_to_fp32 would restore from the model states (the module's state,
    the ZeRO parameter shapes, frozen and tied parameters) less the buffers and ``averaged``.
    Empty when the EMA and the buffers alone give every weight."""
    names = set(states["module"])
    for shapes in states.get("param_shapes") or []:
        names.update(shapes)
    names.update(states.get("frozen_param_shapes") or {})
    names.update(dict(states.get("shared_params") or {}))
    names -= set(states["buffer_names"])
    return sorted(set(_strip_prefix(dict.fromkeys(names))) - set(averaged))


def trained_state(folder: str, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The model's state dict (float32, before :func:`_model_shapes`) from a local checkpoint folder."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights must be 'ema' or 'raw', got {weights!r}")
    average = ema_weights(folder) if weights == "ema" else None
    if average is not None:
        states = _model_states(folder)
        if not missing_from_ema(states, average):
            return {**model_buffers(states), **average}  # the master weights would all be overwritten: not read
    state = consolidated_weights(folder)
    if average is not None:
        state.update(average)  # parameters from the EMA where it has them; the rest from the optimizer
    return state


def _model_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors reshaped to the model's shapes where only the shape differs: the loop trains
    0-dim parameters as [1] tensors (dalle2.train.loop.promote_scalar_parameters)."""
    return {
        name: tensor.reshape(expected[name].shape)
        if name in expected and tensor.shape != expected[name].shape and tensor.numel() == expected[name].numel()
        else tensor
        for name, tensor in state.items()
    }


def load_trained_model(folder: str, weights: str = "ema"):
    """(kind, model) rebuilt from a local checkpoint folder; ``weights`` is ``ema`` (the
    average, what diffusion models sample with; the trained weights when the run kept none)
    or ``raw`` (the optimizer's weights)."""
    from dalle2.factory import create_model

    state = trained_state(folder, weights)
    info = read_json(folder, JOB_FILE)
    kind = info["model_kind"]
    model = create_model(kind, from_dict(CONFIG_CLASSES[kind], info["model_config"]))
    model.load_state_dict(_model_shapes(state, model.state_dict()))
    extra = read_extra(folder)
    if extra and hasattr(model, "load_embedding_stats"):
        model.load_embedding_stats(extra)
    return kind, model.eval()


def _shared(name: str) -> bool:
    """The small files every export reads: manifest, job, train state, extra tensors, EMA layout."""
    return rank_of(name) is None and not name.startswith(f"{DEEPSPEED_DIR}/")


def _for_ema(name: str) -> bool:
    """Every rank's EMA slice and rank 0's model states (the buffers: :func:`model_buffers`)."""
    return name.startswith(f"{EMA_DIR}/") or (name.endswith("_model_states.pt") and rank_of(name) in (None, 0))


def _for_raw(name: str) -> bool:
    """What zero_to_fp32 globs: every rank's model and optimizer states."""
    return name.startswith(f"{DEEPSPEED_DIR}/") and name.endswith(("_model_states.pt", "_optim_states.pt"))


@contextmanager
def export_copy(checkpoint: str, weights: str = "ema", log: Callable[[str], None] = print) -> Iterator[str]:
    """A local folder with what exporting ``weights`` of the complete checkpoint at ``checkpoint``
    reads (see the module's docstring); a local checkpoint is used where it lies."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights must be 'ema' or 'raw', got {weights!r}")
    fs, path = storage.resolve(checkpoint)
    manifest = _check_complete_at(fs, path, checkpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    files, started = manifest["files"], time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dalle2-export-") as folder:
        wanted = _for_ema if weights == "ema" else _for_raw
        fetch_files(fs, path, [MANIFEST, *(name for name in files if _shared(name) or wanted(name))], folder)
        if weights == "ema":
            layout = ema_layout(folder)
            missing = missing_from_ema(_model_states(folder), layout["shapes"] if layout else [])
            if missing:
                # Exporting the EMA bare would leave these at their initial values: take them from
                # the fp32 master weights, as consolidating the whole checkpoint does.
                if layout is None:
                    log("export: the run kept no EMA: fetching its fp32 master weights (the trained weights) instead")
                else:
                    log(f"export: the EMA has no average of {len(missing)} weights (first: {missing[0]}): fetching the fp32 master weights for them")
                fetch_files(fs, path, [name for name in files if _for_raw(name) and not os.path.exists(os.path.join(folder, name))], folder)
        log(fetched_line(f"export ({weights})", folder, manifest, started))
        yield folder


def export_run(run_uri: str, out_uri: str, weights: str = "ema", log: Callable[[str], None] = print) -> str:
    """Consolidate the latest complete checkpoint of ``run_uri`` (every ZeRO stage) into a model
    bundle at ``out_uri`` (dalle2.bundle); returns ``out_uri``."""
    from dalle2.bundle import save_bundle

    checkpoint = latest_checkpoint(run_uri)
    with export_copy(checkpoint, weights, log) as folder:
        kind, model = load_trained_model(folder, weights)
        step = read_train_state(folder).step
    return save_bundle(model, kind, out_uri, metadata={"checkpoint": checkpoint, "step": step, "weights": weights})
