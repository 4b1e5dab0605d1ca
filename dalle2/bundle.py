"""Model bundles: a folder that alone rebuilds a trained model.

    <bundle>/config.json        {"format": "dalle2-bundle", "version": 1, "kind": ..., "config": {...}, "metadata": {...}}
    <bundle>/model.safetensors  the weights
    <bundle>/stats.safetensors  data statistics the model needs (the prior's embedding normalisation)

The folder may be a local path, ``file://`` or ``s3://bucket/prefix`` (standard AWS
configuration, ``AWS_ENDPOINT_URL`` honoured).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from dalle2.config import CONFIG_CLASSES, from_dict, to_dict
from dalle2.data.storage import exists, join, read_bytes, write_bytes
from dalle2.factory import create_model

FORMAT, VERSION = "dalle2-bundle", 1
CONFIG_FILE, WEIGHTS_FILE, STATS_FILE = "config.json", "model.safetensors", "stats.safetensors"


class BundleError(ValueError):
    """A bundle that can't be loaded: the message names the file and the problem."""


@dataclass
class Bundle:
    kind: str
    config: Any
    model: nn.Module
    metadata: dict[str, Any] = field(default_factory=dict)


def _stats_of(model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    stats = getattr(model, "embedding_stats", None)
    return stats() if callable(stats) else None


def _tensors_for_saving(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights): give each its own.
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def save_bundle(model: nn.Module, kind: str, uri: str, metadata: Optional[dict[str, Any]] = None) -> str:
    """Write ``model`` (which has a ``.config``) as a bundle folder at ``uri``; returns ``uri``."""
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(CONFIG_CLASSES)}")
    header = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "config": to_dict(model.config),
        "metadata": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(metadata or {})},
    }
    write_bytes(join(uri, WEIGHTS_FILE), save_safetensors(_tensors_for_saving(model.state_dict())))
    stats = _stats_of(model)
    if stats is not None:
        write_bytes(join(uri, STATS_FILE), save_safetensors(_tensors_for_saving(stats)))
    # The config goes last: a folder with a config.json is a complete bundle.
    write_bytes(join(uri, CONFIG_FILE), json.dumps(header, indent=2).encode())
    return uri


def read_bundle_header(uri: str) -> dict[str, Any]:
    path = join(uri, CONFIG_FILE)
    if not exists(path):
        raise BundleError(f"{path}: missing (not a dalle2 bundle, or an incomplete one)")
    try:
        header = json.loads(read_bytes(path))
    except json.JSONDecodeError as error:
        raise BundleError(f"{path}: not valid JSON ({error})") from None
    if header.get("format") != FORMAT:
        raise BundleError(f"{path}: not a dalle2 bundle config (format={header.get('format')!r})")
    if header.get("kind") not in CONFIG_CLASSES:
        raise BundleError(f"{path}: unknown model kind {header.get('kind')!r}")
    return header


def load_bundle(uri: str, device: torch.device | str = "cpu") -> Bundle:
    """Rebuild the model saved at ``uri`` from its config, weights and stats."""
    header = read_bundle_header(uri)
    kind = header["kind"]
    try:
        config = from_dict(CONFIG_CLASSES[kind], header["config"])
    except (TypeError, ValueError) as error:
        raise BundleError(f"{join(uri, CONFIG_FILE)}: bad {kind} config: {error}") from None
    model = create_model(kind, config)

    weights_path = join(uri, WEIGHTS_FILE)
    if not exists(weights_path):
        raise BundleError(f"{weights_path}: missing")
    state = load_safetensors(read_bytes(weights_path))
    _load_matching(model, state, weights_path)

    stats = _stats_of(model)
    if stats is not None:
        stats_path = join(uri, STATS_FILE)
        if not exists(stats_path):
            raise BundleError(f"{stats_path}: missing (a {kind} needs its embedding statistics)")
        model.load_embedding_stats(load_safetensors(read_bytes(stats_path)))
    return Bundle(kind=kind, config=config, model=model.to(device).eval(), metadata=header.get("metadata", {}))


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """load_state_dict, with a message that says how the weights and the config disagree."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{name}: weights {tuple(state[name].shape)} vs config {tuple(expected[name].shape)}"
        for name in expected.keys() & state.keys()
        if state[name].shape != expected[name].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            parts.append(f"shape mismatch in {len(wrong_shape)} tensors (first: {wrong_shape[0]})")
        if missing:
            parts.append(f"{len(missing)} tensors missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})")
        raise BundleError(f"{path}: weights do not match the bundle's config: " + "; ".join(parts))
    model.load_state_dict(state)
