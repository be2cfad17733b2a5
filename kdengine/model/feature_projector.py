"""The feature projector of hidden-state alignment: maps the student's hidden size Ds to the teacher's Dt.

Kinds:
    linear  Linear(Ds, Dt)
    mlp     Linear(Ds, Dt), GELU, Linear(Dt, Dt)   (hidden width Dt)
    none    identity, only when Ds == Dt

On disk, beside an exported model: ``feature_projector.safetensors`` (the state dict, in the module's
dtype) and ``feature_projector.json`` ({"kind", "ds", "dt"}); each is written under a temporary name and
renamed into place, so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import os

from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["IdentityProjector", "PROJECTOR_FILE", "PROJECTOR_KINDS", "PROJECTOR_SPEC_FILE", "build_feature_projector",
           "load_feature_projector", "save_feature_projector"]

PROJECTOR_KINDS = ("linear", "mlp", "none")
PROJECTOR_FILE = "feature_projector.safetensors"
PROJECTOR_SPEC_FILE = "feature_projector.json"


class IdentityProjector(nn.Identity):
    """Kind none: the identity, remembering its hidden size (Ds == Dt) so it can be saved like the others."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _check_size(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; expected an int >= 1")


def build_feature_projector(kind: str, ds: int, dt: int) -> nn.Module:
    """A freshly initialised projector of ``kind`` from Ds to Dt (fp32, on CPU; move it with ``.to``)."""
    if kind not in PROJECTOR_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {PROJECTOR_KINDS}")
    _check_size("ds", ds)
    _check_size("dt", dt)
    if kind == "linear":
        return nn.Linear(ds, dt)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(ds, dt), nn.GELU(), nn.Linear(dt, dt))
    if ds != dt:
        raise ValueError(f"kind='none' needs the student's hidden size ds={ds} to equal the teacher's dt={dt}; "
                         f"use 'linear' or 'mlp'")
    return IdentityProjector(ds)


def _spec_of(module: nn.Module) -> dict:
    """{"kind", "ds", "dt"} read off a module built by ``build_feature_projector``."""
    if isinstance(module, IdentityProjector):
        return {"kind": "none", "ds": module.size, "dt": module.size}
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "ds": module.in_features, "dt": module.out_features}
    if (isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[0], nn.Linear)
            and isinstance(module[1], nn.GELU) and isinstance(module[2], nn.Linear)):
        return {"kind": "mlp", "ds": module[0].in_features, "dt": module[2].out_features}
    raise ValueError(f"module is a {type(module).__name__}; expected a projector from build_feature_projector")


def save_feature_projector(module: nn.Module, directory: str) -> str:
    """Write ``module``'s weights and spec into ``directory`` (created if missing); returns the weights' path.
    Kind none writes an empty weights file and its size in the spec."""
    spec = _spec_of(module)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PROJECTOR_FILE)
    spec_path = os.path.join(directory, PROJECTOR_SPEC_FILE)
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, path + ".tmp")
    with open(spec_path + ".tmp", "w") as f:
        json.dump(spec, f)
        f.write("\n")
    os.replace(path + ".tmp", path)
    os.replace(spec_path + ".tmp", spec_path)
    return path


def load_feature_projector(directory: str) -> nn.Module:
    """The projector saved in ``directory``, on CPU in the dtype it was saved in, bit for bit."""
    path = os.path.join(directory, PROJECTOR_FILE)
    spec_path = os.path.join(directory, PROJECTOR_SPEC_FILE)
    for p in (path, spec_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found; expected a projector saved by save_feature_projector")
    with open(spec_path) as f:
        spec = json.load(f)
    if not isinstance(spec, dict) or set(spec) != {"kind", "ds", "dt"}:
        raise ValueError(f"{spec_path} holds {spec!r}; expected {{'kind', 'ds', 'dt'}}")
    module = build_feature_projector(spec["kind"], spec["ds"], spec["dt"])
    tensors = load_file(path)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        raise ValueError(f"{path} mixes dtypes {sorted(map(str, dtypes))}; expected one")
    if dtypes:
        module = module.to(dtypes.pop())
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"{path} does not match {spec_path} ({spec}): {' '.join(l.strip() for l in first)}") from None
    return module
