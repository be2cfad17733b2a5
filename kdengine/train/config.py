"""Typed training config: dataclasses loaded from YAML, ``--set key=value`` overrides, and every
check that can run before a model, a dataset or DeepSpeed is touched.

The dataclass defaults are the embedded tiny pipeline (``configs/tiny.yaml`` spells them out):
synthetic data written into the run directory, a tiny teacher trained with pt then sft, and a
tiny student trained with dpt, sft, dft, on CPU in about half a minute. A YAML file overrides field
by field inside the dataclass sections (``run``, ``engine``, ``synth``) and replaces the
``datasets``, ``models`` and ``stages`` sections whole.

Schema::

    run:       output_dir, seed, log_every, keep_checkpoints
    synth:     null, or the synthetic dataset written to ``out`` when its meta.json is missing
    datasets:  {name: DatasetConfig}        LLaVA JSON/JSONL + image folder + template
    models:    {name: kdengine.model.ModelSpec}   where a model's first weights come from
    engine:    zero_stage, deepspeed_config, activation_checkpointing, liger, shard_teacher, ...
    stages:    [StageConfig]   name, kind (pt|sft|dpt|dft), model, data, teacher, trainable,
                               weights, distill, lr, batch sizes, epochs/max_steps, checkpoint_every

Each stage trains ``model``; it starts from that model's weights after its previous stage (or
from its spec for its first stage). ``teacher`` (dpt/dft only) names another model, used with
its weights as of that point in the pipeline. Any string may contain ``{run_dir}``, replaced by
``run.output_dir``. Numbers such as ``1e-3`` (a string to YAML 1.1) are accepted for floats.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from kdengine.data.synth import QUESTION_SETS
from kdengine.losses.divergences import BETA_DIVERGENCES, DIVERGENCES
from kdengine.losses.gram_cosine import IMPLS, REDUCTIONS
from kdengine.losses.objective import DistillSettings, LossWeights
from kdengine.model.build import TINY_STUDENT, TINY_TEACHER, ModelSpec
from kdengine.model.freeze import COMPONENTS

__all__ = [
    "ConfigError",
    "DatasetConfig",
    "EngineConfig",
    "RunConfig",
    "StageConfig",
    "SynthConfig",
    "TrainConfig",
    "load_config",
]

STAGE_KINDS = ("pt", "sft", "dpt", "dft")
DISTILL_KINDS = ("dpt", "dft")
DEFAULT_TRAINABLE = {
    "pt": ["projector"],
    "sft": ["projector", "language_model"],
    "dpt": ["projector"],
    "dft": ["projector", "language_model"],
}
# Paper defaults (Sec. 4.1): alpha, beta, gamma = 1, 1, 0.5 in DPT and in DFT.
DEFAULT_WEIGHTS = {
    "pt": {"ce": 1.0, "res": 0.0, "vis": 0.0, "rel": 0.0},
    "sft": {"ce": 1.0, "res": 0.0, "vis": 0.0, "rel": 0.0},
    "dpt": {"ce": 1.0, "res": 1.0, "vis": 1.0, "rel": 0.5},
    "dft": {"ce": 1.0, "res": 1.0, "vis": 1.0, "rel": 0.5},
}
# Keys the engine derives from the stage; a DeepSpeed JSON must not set them.
DS_OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "bf16",
    "fp16",
)
RUN_DIR = "{run_dir}"


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or inconsistent."""


# ----------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    output_dir: str = "runs/tiny"
    seed: int = 0
    log_every: int = 1  # optimizer steps between metrics records (and the cross-rank loss reduce)
    keep_checkpoints: int = 2  # resumable checkpoints kept per stage (older ones are deleted)


@dataclass
class SynthConfig:
    """The synthetic shapes dataset (`kdengine.data.synthesize`), written when ``out/meta.json`` is missing."""

    out: str = "{run_dir}/data"
    seed: int = 0
    n_caption: int = 512
    n_instruct: int = 512
    n_eval: int = 32
    image_size: int = 32
    vocab_size: int = 1024
    questions: str = "mixed"  # question set: a key of kdengine.data.synth.QUESTION_SETS


@dataclass
class DatasetConfig:
    """LLaVA records for a stage (`kdengine.data.build_dataset`)."""

    path: str | list[str] = ""
    image_folder: str | None = None
    template: Literal["plain", "chat", "vicuna"] = "chat"
    max_length: int | None = None
    check_images: bool = True  # decode every image before training (slow on 558k: false there)
    on_bad_sample: Literal["error", "skip"] = "error"
    pad_to_square: bool = False


@dataclass
class EngineConfig:
    zero_stage: int | None = None  # None: the DeepSpeed JSON's stage, else 0
    deepspeed_config: str | None = None  # extra DeepSpeed JSON (zero_optimization section, ...)
    activation_checkpointing: bool = False
    liger: bool = True  # Liger-Kernel RMSNorm/SwiGLU/RoPE patches on CUDA when installed
    shard_teacher: bool = False  # ZeRO-3 only: partition the teacher across ranks (ZeRO inference)
    num_workers: int = 0  # DataLoader workers per rank
    # torch intra-op threads per rank when training on CPU (null: torch's default split over local ranks).
    # Tiny models gain nothing from more, and OpenMP threads stall when a core is busy elsewhere.
    cpu_threads: int | None = 1
    dist_backend: str | None = None  # None: nccl on CUDA, gloo on CPU


@dataclass
class StageConfig:
    """One training stage. ``weights`` keys not given keep the kind's defaults (DEFAULT_WEIGHTS)."""

    name: str
    kind: Literal["pt", "sft", "dpt", "dft"]
    model: str
    data: str
    teacher: str | None = None
    trainable: list[str] | None = None  # None: DEFAULT_TRAINABLE[kind]
    weights: LossWeights | None = None
    distill: DistillSettings = field(default_factory=DistillSettings)
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (None: epochs)
    lr: float = 1e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    batch_size: int = 8  # global samples per optimizer step
    micro_batch_size: int = 8  # samples per forward on one rank
    grad_clip: float = 1.0  # 0 disables clipping
    checkpoint_every: int = 0  # optimizer steps between resumable checkpoints (0: none)

    def __post_init__(self):
        if self.kind in STAGE_KINDS:
            if self.weights is None:
                self.weights = LossWeights(**DEFAULT_WEIGHTS[self.kind])
            if self.trainable is None:
                self.trainable = list(DEFAULT_TRAINABLE[self.kind])

    @property
    def distills(self) -> bool:
        return self.kind in DISTILL_KINDS


def _tiny_models() -> dict[str, ModelSpec]:
    tok = "{run_dir}/data/tokenizer"
    small = {"image_size": 32, "max_positions": 512}
    return {
        "teacher": ModelSpec(source="tiny", tokenizer=tok, tiny=dataclasses.replace(TINY_TEACHER, **small)),
        "student": ModelSpec(source="tiny", tokenizer=tok, tiny=dataclasses.replace(TINY_STUDENT, **small)),
    }


def _tiny_datasets() -> dict[str, DatasetConfig]:
    data, images = "{run_dir}/data", "{run_dir}/data/images"
    return {
        "pretrain": DatasetConfig(path=f"{data}/pretrain.json", image_folder=images, template="plain"),
        "instruct": DatasetConfig(path=f"{data}/instruct.json", image_folder=images, template="chat"),
    }


def _tiny_stages() -> list[StageConfig]:
    s = dict(batch_size=8, micro_batch_size=8, checkpoint_every=50)
    return [
        StageConfig(name="teacher_pt", kind="pt", model="teacher", data="pretrain", lr=2e-3, **s),
        StageConfig(name="teacher_sft", kind="sft", model="teacher", data="instruct", lr=1e-3, epochs=3, **s),
        StageConfig(name="student_dpt", kind="dpt", model="student", teacher="teacher", data="pretrain", lr=2e-3, **s),
        StageConfig(name="student_sft", kind="sft", model="student", data="instruct", lr=1e-3, epochs=2, **s),
        StageConfig(name="student_dft", kind="dft", model="student", teacher="teacher", data="instruct", lr=1e-3,
                    epochs=2, **s),
    ]


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    synth: SynthConfig | None = field(default_factory=SynthConfig)
    datasets: dict[str, DatasetConfig] = field(default_factory=_tiny_datasets)
    models: dict[str, ModelSpec] = field(default_factory=_tiny_models)
    engine: EngineConfig = field(default_factory=EngineConfig)
    stages: list[StageConfig] = field(default_factory=_tiny_stages)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike | None = None,
    overrides: typing.Sequence[str] = (),
    world_size: int | None = None,
    check_paths: bool = True,
) -> TrainConfig:
    """Read a YAML config (None: the embedded tiny default), apply ``key=value`` overrides, check it.

    Overrides use dotted keys; list items by index or, for stages, by name
    (``stages.student_dft.lr=1e-4``); values are parsed as YAML. ``world_size`` (default: the
    WORLD_SIZE environment variable, else 1) is used to check batch divisibility.
    Raises ConfigError naming the key, the value and what was expected.
    """
    raw: dict = {}
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level is a {type(raw).__name__}; expected a mapping of sections")
    base = TrainConfig()
    for item in overrides:
        _apply_override(raw, base, item)
    cfg = _build(TrainConfig, raw, "", base)
    _substitute(cfg, RUN_DIR, cfg.run.output_dir)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check(cfg, world_size, check_paths=check_paths)
    return cfg


def _apply_override(raw: dict, base: Any, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value (e.g. stages.0.lr=1e-4)")
    key, text = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty part in key {key!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
    node, default = raw, base
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            i = _list_index(node, part, where)
            default = default[i] if isinstance(default, list) and i < len(default) else None
            if last:
                node[i] = value
                return
            if node[i] is None or not isinstance(node[i], (dict, list)):
                node[i] = {}
            node = node[i]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth])} is not a section")
        sub_default = _field_value(default, part)
        if last:
            node[part] = value
            return
        if part not in node or node[part] is None:
            # Materialise the default section so the override edits it instead of replacing it.
            node[part] = _to_raw(sub_default) if sub_default is not None else {}
        node, default = node[part], sub_default


def _list_index(node: list, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        i = int(part)
        if not 0 <= i < len(node):
            raise ConfigError(f"--set {where}: index {i} out of range; the list has {len(node)} items")
        return i
    names = [x.get("name") if isinstance(x, dict) else None for x in node]
    if part in names:
        return names.index(part)
    raise ConfigError(f"--set {where}: no item named {part!r}; expected an index or one of {names}")


def _field_value(obj: Any, name: str) -> Any:
    if dataclasses.is_dataclass(obj):
        return getattr(obj, name, None)
    if isinstance(obj, dict):
        return obj.get(name)
    return None


def _to_raw(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_raw(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_raw(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_raw(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + repr(list(typing.get_args(tp)))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of name -> {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} mapping"
    return getattr(tp, "__name__", str(tp))


def _build(cls: type, data: Any, where: str, base: Any = None) -> Any:
    """Instance of dataclass ``cls`` from a mapping; fields absent from ``data`` come from ``base``
    (an instance) or the class defaults. Unknown keys, wrong types and missing fields raise."""
    label = where or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{label} = {data!r}: expected {_type_name(cls)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {key!r}; expected one of {sorted(fields)} in {label}")
    if cls is StageConfig:
        data = _stage_defaults(data, where)
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            sub_base = getattr(base, name, None) if base is not None else None
            kwargs[name] = _parse(hints[name], data[name], key, sub_base)
        elif base is not None:
            kwargs[name] = getattr(base, name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key {key!r} is missing; expected {_type_name(hints[name])}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own __post_init__ check: name the config section
        raise ConfigError(f"{label}.{e}") from None


def _stage_defaults(data: dict, where: str) -> dict:
    """Fill a stage's kind-dependent defaults (trainable components, loss weights) before parsing."""
    data = dict(data)
    kind = data.get("kind")
    if kind not in STAGE_KINDS:
        raise ConfigError(f"{where}.kind = {kind!r}: expected one of {list(STAGE_KINDS)}")
    weights = data.get("weights")
    if weights is None:
        weights = {}
    if not isinstance(weights, dict):
        keys = list(DEFAULT_WEIGHTS[kind])
        raise ConfigError(f"{where}.weights = {weights!r}: expected a mapping with keys from {keys}")
    data["weights"] = {**DEFAULT_WEIGHTS[kind], **weights}
    return data


def _parse(tp: Any, value: Any, where: str, base: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse(arg, value, where, base)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where} = {value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where} = {value!r}: expected {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r}: expected {_type_name(tp)}")
        (item,) = typing.get_args(tp)
        return [_parse(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected {_type_name(tp)}")
        _, item = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where}: key {k!r} is a {type(k).__name__}; expected a string name")
            out[k] = _parse(item, v, f"{where}.{k}")
        return out
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, base)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r} ({type(value).__name__}): expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r} ({type(value).__name__}): expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r} ({type(value).__name__}): expected a string")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")  # a schema bug, not a user error


def _substitute(obj: Any, token: str, value: str) -> Any:
    """Replace ``token`` in every string of a config tree, in place; returns the new leaf for strings."""
    if isinstance(obj, str):
        return obj.replace(token, value)
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _substitute(getattr(obj, f.name), token, value))
    elif isinstance(obj, list):
        obj[:] = [_substitute(v, token, value) for v in obj]
    elif isinstance(obj, dict):
        for k in obj:
            obj[k] = _substitute(obj[k], token, value)
    return obj


# ----------------------------------------------------------------------------- checks


def check(cfg: TrainConfig, world_size: int = 1, check_paths: bool = True) -> None:
    """Raise ConfigError on the first inconsistency; reads nothing but small JSON files and stats paths."""
    run = cfg.run
    if not run.output_dir:
        raise ConfigError("run.output_dir is empty: expected a directory for checkpoints and metrics")
    _at_least("run.log_every", run.log_every, 1)
    _at_least("run.keep_checkpoints", run.keep_checkpoints, 1)
    _check_engine(cfg.engine)
    if not cfg.stages:
        raise ConfigError("stages is empty: expected at least one stage")
    seen: set[str] = set()
    for i, st in enumerate(cfg.stages):
        _check_stage(cfg, st, f"stages[{i}] ({st.name})", world_size)
        if st.name in seen:
            raise ConfigError(f"stages[{i}].name = {st.name!r} is used twice: expected unique stage names")
        seen.add(st.name)
    if cfg.synth is not None:
        for name in ("n_caption", "n_instruct", "n_eval"):
            _at_least(f"synth.{name}", getattr(cfg.synth, name), 0)
        if cfg.synth.questions not in QUESTION_SETS:
            raise ConfigError(f"synth.questions = {cfg.synth.questions!r}: expected one of {sorted(QUESTION_SETS)}")
    if check_paths:
        _check_paths(cfg)


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key} = {value!r}: expected >= {low}")


def _check_engine(e: EngineConfig) -> None:
    if e.zero_stage is not None and e.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage = {e.zero_stage!r}: expected 0, 1, 2, 3 or null")
    _at_least("engine.num_workers", e.num_workers, 0)
    if e.cpu_threads is not None:
        _at_least("engine.cpu_threads", e.cpu_threads, 1)
    if e.dist_backend is not None and e.dist_backend not in ("gloo", "nccl", "ccl", "mpi"):
        raise ConfigError(f"engine.dist_backend = {e.dist_backend!r}: expected gloo, nccl, ccl, mpi or null")
    ds = read_deepspeed_json(e.deepspeed_config) if e.deepspeed_config else {}
    owned = sorted(k for k in ds if k in DS_OWNED_KEYS)
    if owned:
        raise ConfigError(
            f"engine.deepspeed_config {e.deepspeed_config} sets {owned}: these come from the stage config "
            f"(batch_size, micro_batch_size, grad_clip, lr) and the device (bf16 on GPU); remove them from the JSON"
        )
    json_stage = ds.get("zero_optimization", {}).get("stage")
    if e.zero_stage is not None and json_stage is not None and json_stage != e.zero_stage:
        raise ConfigError(
            f"engine.zero_stage = {e.zero_stage} but {e.deepspeed_config} has zero_optimization.stage = {json_stage}: "
            f"expected them equal (or leave engine.zero_stage null)"
        )
    if e.shard_teacher and zero_stage(e) != 3:
        raise ConfigError(f"engine.shard_teacher = true needs ZeRO stage 3; the zero stage is {zero_stage(e)}")


def read_deepspeed_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"engine.deepspeed_config: file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"engine.deepspeed_config {path}: invalid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"engine.deepspeed_config {path}: expected a JSON object")
    return ds


def zero_stage(e: EngineConfig) -> int:
    """The effective ZeRO stage: engine.zero_stage, else the JSON's, else 0."""
    if e.zero_stage is not None:
        return e.zero_stage
    if e.deepspeed_config:
        return int(read_deepspeed_json(e.deepspeed_config).get("zero_optimization", {}).get("stage", 0))
    return 0


def _check_stage(cfg: TrainConfig, st: StageConfig, where: str, world_size: int) -> None:
    if not st.name or "/" in st.name or st.name.startswith("."):
        raise ConfigError(f"{where}.name = {st.name!r}: expected a non-empty directory name")
    if st.model not in cfg.models:
        raise ConfigError(f"{where}.model = {st.model!r}: expected one of the models {sorted(cfg.models)}")
    if st.data not in cfg.datasets:
        raise ConfigError(f"{where}.data = {st.data!r}: expected one of the datasets {sorted(cfg.datasets)}")
    if st.distills:
        others = sorted(m for m in cfg.models if m != st.model)
        if st.teacher is None:
            raise ConfigError(f"{where}: kind {st.kind!r} needs a teacher; expected teacher: one of {others}")
        if st.teacher == st.model:
            raise ConfigError(f"{where}.teacher = {st.teacher!r} is the model being trained; expected one of {others}")
        if st.teacher not in cfg.models:
            raise ConfigError(f"{where}.teacher = {st.teacher!r}: expected one of the models {others}")
    elif st.teacher is not None:
        raise ConfigError(
            f"{where}.teacher = {st.teacher!r}: kind {st.kind!r} is cross-entropy only; "
            f"expected no teacher (use kind dpt or dft to distill)"
        )
    if not st.trainable:
        raise ConfigError(
            f"{where}.trainable = {st.trainable!r}: nothing to train; expected some of {list(COMPONENTS)}"
        )
    bad = [c for c in st.trainable if c not in COMPONENTS]
    if bad:
        raise ConfigError(f"{where}.trainable has unknown components {bad}; expected names from {list(COMPONENTS)}")
    w = st.weights
    terms = {k: getattr(w, k) for k in ("ce", "res", "vis", "rel")}
    neg = {k: v for k, v in terms.items() if v < 0}
    if neg:
        raise ConfigError(f"{where}.weights {neg}: expected weights >= 0")
    if not any(terms.values()):
        raise ConfigError(f"{where}.weights are all zero {terms}: expected at least one weight > 0")
    if not st.distills and w.distills:
        raise ConfigError(
            f"{where}.weights res/vis/rel = {w.res}/{w.vis}/{w.rel}: kind {st.kind!r} has no teacher; "
            f"expected 0 (use kind dpt or dft to distill)"
        )
    if st.distills and not w.distills:
        raise ConfigError(
            f"{where}.weights res/vis/rel are all zero: kind {st.kind!r} would not distill; "
            f"expected one of them > 0 (or kind {'pt' if st.kind == 'dpt' else 'sft'})"
        )
    d = st.distill
    if d.divergence not in DIVERGENCES:
        raise ConfigError(f"{where}.distill.divergence = {d.divergence!r}: expected one of {list(DIVERGENCES)}")
    if d.divergence in BETA_DIVERGENCES and not 0.0 < d.beta < 1.0:
        raise ConfigError(f"{where}.distill.beta = {d.beta} for {d.divergence}: expected 0 < beta < 1")
    if not d.temperature > 0:
        raise ConfigError(f"{where}.distill.temperature = {d.temperature}: expected > 0")
    if d.rdist_reduction not in REDUCTIONS:
        raise ConfigError(
            f"{where}.distill.rdist_reduction = {d.rdist_reduction!r}: expected one of {list(REDUCTIONS)}"
        )
    if d.impl not in IMPLS:
        raise ConfigError(f"{where}.distill.impl = {d.impl!r}: expected one of {list(IMPLS)}")
    _at_least(f"{where}.epochs", st.epochs, 1)
    if st.max_steps is not None:
        _at_least(f"{where}.max_steps", st.max_steps, 1)
    if not st.lr > 0:
        raise ConfigError(f"{where}.lr = {st.lr}: expected > 0")
    if not 0.0 <= st.warmup_ratio < 1.0:
        raise ConfigError(f"{where}.warmup_ratio = {st.warmup_ratio}: expected 0 <= warmup_ratio < 1")
    _at_least(f"{where}.weight_decay", st.weight_decay, 0)
    _at_least(f"{where}.grad_clip", st.grad_clip, 0)
    _at_least(f"{where}.checkpoint_every", st.checkpoint_every, 0)
    _at_least(f"{where}.micro_batch_size", st.micro_batch_size, 1)
    _at_least(f"{where}.batch_size", st.batch_size, 1)
    per_step = st.micro_batch_size * world_size
    if st.batch_size % per_step:
        raise ConfigError(
            f"{where}.batch_size = {st.batch_size} is not a multiple of micro_batch_size {st.micro_batch_size} "
            f"x world size {world_size} = {per_step}: "
            f"expected batch_size = micro_batch_size x ranks x accumulation steps"
        )


def _check_paths(cfg: TrainConfig) -> None:
    """Every path the stages need exists, or lies under synth.out (written before training)."""
    pending = os.path.abspath(cfg.synth.out) if cfg.synth is not None else None

    def need(key: str, path: str | None, kind: str) -> None:
        if not path:
            return
        if pending and os.path.abspath(path).startswith(pending + os.sep):
            return
        ok = os.path.isdir(path) if kind == "dir" else os.path.exists(path)
        if not ok:
            raise ConfigError(f"{key} = {path!r}: {'directory' if kind == 'dir' else 'file'} not found")

    trained_before: set[str] = set()
    for st in cfg.stages:
        for role, name in (("model", st.model), ("teacher", st.teacher)):
            if name is None or name in trained_before:
                continue  # weights come from an earlier stage of this run
            spec = cfg.models[name]
            try:
                spec.validate()
            except ValueError as err:
                raise ConfigError(f"models.{name}: {err}") from None
            for attr in ("path", "vision_tower", "language_model", "tokenizer"):
                need(f"models.{name}.{attr}", getattr(spec, attr), "dir")
        trained_before.add(st.model)
        ds = cfg.datasets[st.data]
        paths = ds.path if isinstance(ds.path, list) else [ds.path]
        if not any(paths):
            raise ConfigError(f"datasets.{st.data}.path is empty: expected a LLaVA .json/.jsonl file")
        for p in paths:
            need(f"datasets.{st.data}.path", p, "file")
        need(f"datasets.{st.data}.image_folder", ds.image_folder, "dir")
