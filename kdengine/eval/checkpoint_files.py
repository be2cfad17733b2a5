"""Checks that a folder is a loadable ``save_pretrained`` checkpoint, before any model loads.

A bad folder is one ``FileNotFoundError`` / ``ValueError`` line naming the file: no
``config.json``, a ``config.json`` without ``model_type``, no weights file, or a
``.safetensors`` file whose size disagrees with its own header (truncated by a kill or
a full disk). Only headers are read, so the check costs milliseconds on any model size.
"""

from __future__ import annotations

import json
import os

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
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{what} checkpoint {path}: no config.json (expected a save_pretrained folder)")
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


def _check_weights(path: str, what: str) -> None:
    try:
        check_safetensors(path)
    except ValueError as err:
        raise ValueError(f"{what} checkpoint {err}") from None
