"""Stage kinds: one table, `KINDS`, holds every kind a training config's ``kind:`` may name.

    kind           weights ce/res/vis/rel   trainable                  teacher   produces  runner
    pt             1 / 0 / 0 / 0            projector                  no        model     train_stage
    sft            1 / 0 / 0 / 0            projector, language_model  no        model     train_stage
    dpt            1 / 1 / 1 / 0.5          projector                  yes       model     train_stage
    dft            1 / 1 / 1 / 0.5          projector, language_model  yes       model     train_stage
    teacher_cache  (none: trains nothing)   (none)                     no        cache     run_cache_stage

``teacher``: the stage distils, from a live ``teacher:`` model or a ``teacher_cache:``.
``produces``: what the stage leaves in ``{run_dir}/<stage>``: a model (``model/``, the next
stage of that model starts from it), a teacher cache (``cache/``), or a dataset (``data``).
``runner``: ``module:function``, called as ``runner(session, index, stage)`` and returning the
stage's summary row; imported only when a stage of the kind runs, so this table (and a config)
loads without torch. Adding a kind is one entry here plus its runner (and, if it has settings of
its own, their field in `kdengine.train.config.StageConfig`).

Plain Python: `kdengine.train.config` reads this table while a config loads.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field

__all__ = ["CACHE_KIND", "KINDS", "PRODUCTS", "StageKind", "stage_seed"]

PRODUCTS = ("model", "cache", "data")
# Paper defaults (Sec. 4.1): alpha, beta, gamma = 1, 1, 0.5 in DPT and in DFT.
_CE_ONLY = {"ce": 1.0, "res": 0.0, "vis": 0.0, "rel": 0.0}
_DISTILL = {"ce": 1.0, "res": 1.0, "vis": 1.0, "rel": 0.5}
_TRAIN = "kdengine.train.stages:train_stage"


@dataclass(frozen=True)
class StageKind:
    name: str
    weights: dict[str, float] = field(default_factory=lambda: dict(_CE_ONLY))  # default loss weights
    trainable: tuple[str, ...] = ()  # default trainable components (kdengine.model.spec.COMPONENTS)
    teacher: bool = False  # distils: needs ``teacher:`` or ``teacher_cache:``
    produces: str = "model"  # one of PRODUCTS
    runner: str = _TRAIN  # "module:function(session, index, stage) -> summary row"

    def __post_init__(self):
        if self.produces not in PRODUCTS:
            raise ValueError(f"stage kind {self.name!r}: produces = {self.produces!r}; expected one of {PRODUCTS}")
        if ":" not in self.runner:
            raise ValueError(f"stage kind {self.name!r}: runner = {self.runner!r}; expected 'module:function'")

    @property
    def trains(self) -> bool:
        """The stage updates its model's weights (and leaves them in ``{run_dir}/<stage>/model``)."""
        return self.produces == "model"

    def run(self, session, index: int, stage) -> dict:
        """Import the runner and run ``stage``; returns its summary row."""
        module, name = self.runner.split(":")
        return getattr(importlib.import_module(module), name)(session, index, stage)


CACHE_KIND = "teacher_cache"  # runs `model` as a frozen teacher and writes its cache (kdengine.cache); trains nothing

KINDS: dict[str, StageKind] = {k.name: k for k in (
    StageKind("pt", trainable=("projector",)),
    StageKind("sft", trainable=("projector", "language_model")),
    StageKind("dpt", weights=dict(_DISTILL), trainable=("projector",), teacher=True),
    StageKind("dft", weights=dict(_DISTILL), trainable=("projector", "language_model"), teacher=True),
    StageKind(CACHE_KIND, produces="cache", runner="kdengine.train.cache_stage:run_cache_stage"),
)}


def stage_seed(run_seed: int, name: str) -> int:
    """The RNG seed of the stage called ``name`` (its initialisation and its data order): a function of
    the run's seed and the name, not of the stage's position, so inserting a stage before another
    leaves that one's run unchanged. ``seed_as: other`` passes the other stage's name here."""
    return (run_seed + int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big")) % 2**31
