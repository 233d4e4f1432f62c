"""Config-json + safetensors checkpoints shared by GistNet and LensNet.

A checkpoint is two files, `<stem>.safetensors` (weights) and `<stem>.json` (the config dataclass),
or the same two things as bytes for Redis. The version is a content hash, so it is immutable."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

# Metadata of config fields added after versions were published: written only when set, so every
# earlier version keeps its name (the version hashes this json).
ADDED_LATER = {"added_later": True}


def config_json(config: Any) -> str:
    """Canonical json of a config dataclass (sorted keys, so equal configs hash equally)."""
    raw = dataclasses.asdict(config)
    for f in dataclasses.fields(config):
        if f.metadata.get("added_later") and raw[f.name] == f.default:
            del raw[f.name]
    return json.dumps(raw, sort_keys=True)


def weights_bytes(module: torch.nn.Module) -> bytes:
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    return save_bytes(state)


def content_version(prefix: str, config: Any, weights: bytes) -> str:
    """`<prefix>-<12 hex>`: a hash over config and weights, so a version names exactly one model."""
    digest = hashlib.sha256(config_json(config).encode() + weights).hexdigest()
    return f"{prefix}-{digest[:12]}"


def load_state(module: torch.nn.Module, weights: bytes) -> None:
    """Load weights strictly: a missing, extra or reshaped tensor is an error, never ignored."""
    module.load_state_dict(load_bytes(weights), strict=True)


def write_files(directory: Path, stem: str, config: Any, weights: bytes) -> None:
    """Write weights then config, each through a temp file + os.replace (no torn checkpoints)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in ((f"{stem}.safetensors", weights), (f"{stem}.json", config_json(config))):
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
        os.replace(tmp, directory / name)


def read_files(directory: Path, stem: str) -> tuple[dict[str, Any], bytes]:
    config = json.loads((directory / f"{stem}.json").read_text())
    return config, (directory / f"{stem}.safetensors").read_bytes()


def config_from_dict(cls: type[Any], raw: dict[str, Any]) -> Any:
    """Build a config dataclass from json, refusing unknown keys (a newer format is not guessed)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**raw)
