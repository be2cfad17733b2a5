"""Checks that a folder is a loadable ``save_pretrained`` checkpoint, before any model loads.

A bad folder is one ``FileNotFoundError`` / ``ValueError`` line naming the file: no such
folder, no ``config.json``, a ``config.json`` without ``model_type``, no weights file, or a
``.safetensors`` file whose size disagrees with its own header (truncated by a kill or
a full disk). Only headers are read, so the check costs milliseconds on any model size.

A training stage folder (``<run>/<stage>``, holding ``model/`` and ``checkpoints/``) or a run
folder (``<run>``) given instead of a model folder gets the model folder to use in its line.
"""

from __future__ import annotations

import json
import os

import yaml

__all__ = ["check_checkpoint_dir", "check_safetensors"]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"


def check_safetensors(path: str) -> None:
    """Raise ValueError naming ``path`` unless its size is exactly what its header describes.

    Layout: 8 bytes little-endian header length n, n bytes of JSON header
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes: truncated (expected a safetensors file, 8-byte header length first)")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise ValueError(f"{path}: truncated: {size} bytes, but its header alone claims {n} bytes")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(f"{path}: corrupt safetensors header (expected JSON with data_offsets per tensor)") from None
    if 8 + n + end != size:
        state = "truncated" if 8 + n + end > size else "corrupt"
        raise ValueError(f"{path}: {state}: {size} bytes, expected {8 + n + end} from its header")


def check_checkpoint_dir(path: str | os.PathLike, what: str = "model") -> None:
    """Raise one line naming ``what`` and the file unless ``path`` holds a model config and whole weights."""
    path = os.fspath(path)
    config = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} checkpoint {path}: not a folder (expected a save_pretrained folder)")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{what} checkpoint {path}: no config.json ({_what_to_use(path)})")
    try:
        with open(config, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (ValueError, AttributeError):
        raise ValueError(f"{what} checkpoint {config}: not a JSON object (expected a model config)") from None
    if not model_type:
        raise ValueError(f"{what} checkpoint {config}: no 'model_type' (expected the config.json of a saved model)")
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        for shard in shards:
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{what} checkpoint {shard_path}: missing (listed in {INDEX})")
            _check_weights(shard_path, what)
    elif os.path.isfile(os.path.join(path, WEIGHTS)):
        _check_weights(os.path.join(path, WEIGHTS), what)
    elif not os.path.isfile(os.path.join(path, TORCH_WEIGHTS)):
        raise FileNotFoundError(f"{what} checkpoint {os.path.join(path, WEIGHTS)}: missing "
                                f"(expected the weights save_pretrained writes, or {INDEX} / {TORCH_WEIGHTS})")


def _has_model(stage_dir: str) -> bool:
    return os.path.isfile(os.path.join(stage_dir, "model", "config.json"))


def _what_to_use(path: str) -> str:
    """What to pass instead of ``path``, a folder without config.json: a stage's or a run's model folder."""
    model = os.path.join(path, "model")
    if _has_model(path):
        return f"a training stage folder: use {model}"
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return (f"a training stage folder without a finished model: {model} is written when the stage ends; "
                f"its checkpoints/ are for `kdengine train --resume`")
    stages = _run_stages(path)
    if stages:
        last = os.path.join(path, stages[-1], "model")
        others = f"; stages with a model, in order: {', '.join(stages)}" if len(stages) > 1 else ""
        return f"a training run folder: use {last}, the last stage's model{others}"
    return "expected a save_pretrained folder"


def _run_stages(run_dir: str) -> list[str]:
    """Names of the stages of a run folder that have a model, in the run's stage order (its
    config.yaml; without one, by the time each model was written)."""
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        return []
    stages = [n for n in names if _has_model(os.path.join(run_dir, n))]
    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
            order = [s["name"] for s in yaml.safe_load(f)["stages"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        order = []
    if set(stages) <= set(order):
        return [n for n in order if n in stages]
    return sorted(stages, key=lambda n: os.path.getmtime(os.path.join(run_dir, n, "model", "config.json")))


def _check_weights(path: str, what: str) -> None:
    try:
        check_safetensors(path)
    except ValueError as err:
        raise ValueError(f"{what} checkpoint {err}") from None
