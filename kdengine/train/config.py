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
    stages:    [StageConfig]   name, kind (kdengine.train.kinds), model, data, teacher, trainable,
                               weights, distill, lr, batch sizes, epochs/max_steps, checkpoint_every;
                               teacher_cache (dpt/dft instead of teacher), cache (kdengine.cache.CacheSettings)

Each stage trains ``model``; it starts from that model's weights after its previous stage (or
from its spec for its first stage). ``teacher`` (dpt/dft only) names another model, used with
its weights as of that point in the pipeline. Any string may contain ``{run_dir}``, replaced by
``run.output_dir``. Numbers such as ``1e-3`` (a string to YAML 1.1) are accepted for floats.

Checks: each section checks its own fields in ``__post_init__`` (ValueError ``field = value:
expected ...``; the loader adds the section's key). What spans sections (a stage's model, data
and teacher names, batch divisibility by the world size, the DeepSpeed JSON, paths) is `check`.
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

# Plain-Python modules only: a config loads and is checked before torch, transformers or DeepSpeed is imported.
from kdengine.cache.manifest import MANIFEST, CacheError, load_manifest
from kdengine.cache.settings import CacheSettings
from kdengine.data.synth import QUESTION_SETS
from kdengine.eval.checkpoint_files import check_checkpoint_dir
from kdengine.losses.settings import DistillSettings, LossWeights
from kdengine.model.spec import COMPONENTS, TINY_STUDENT, TINY_TEACHER, ModelSpec
from kdengine.train.kinds import CACHE_KIND, KINDS, stage_seed

__all__ = [
    "ConfigError",
    "DatasetConfig",
    "EngineConfig",
    "RunConfig",
    "StageConfig",
    "SynthConfig",
    "TrainConfig",
    "load_config",
    "stage_seed_of",
]

# Every stage kind, its default weights and trainable parts, its runner: kdengine.train.kinds.KINDS.

# Keys the engine derives from the stage; a DeepSpeed JSON must not set them.
DS_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16")
RUN_DIR = "{run_dir}"


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or inconsistent."""


# ----------------------------------------------------------------------------- sections


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ValueError(f"{key} = {value!r}: expected >= {low}")


def _one_of(key: str, value: Any, choices: typing.Collection) -> None:
    if value not in choices:
        raise ValueError(f"{key} = {value!r}: expected one of {list(choices)}")


@dataclass
class RunConfig:
    output_dir: str = "runs/tiny"
    seed: int = 0
    log_every: int = 1  # optimizer steps between metrics records (and the cross-rank loss reduce)
    keep_checkpoints: int = 2  # resumable checkpoints kept per stage (older ones are deleted)

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("output_dir is empty: expected a directory for checkpoints and metrics")
        _at_least("log_every", self.log_every, 1)
        _at_least("keep_checkpoints", self.keep_checkpoints, 1)


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

    def __post_init__(self):
        for name in ("n_caption", "n_instruct", "n_eval"):
            _at_least(name, getattr(self, name), 0)
        _one_of("questions", self.questions, sorted(QUESTION_SETS))


@dataclass
class DatasetConfig:
    """LLaVA records for a stage (`kdengine.data.build_dataset`)."""

    path: str | list[str] = ""
    image_folder: str | None = None
    template: Literal["plain", "chat", "vicuna"] = "chat"
    max_length: int | None = None  # tokens, image tokens included; null: the model's context (max_position_embeddings)
    # Samples above the limit: truncate (cut the text after the last image, counted), skip (counted), error.
    truncation: Literal["truncate", "skip", "error"] = "truncate"
    check_images: bool = True  # decode every image before training (slow on 558k: false there)
    on_bad_sample: Literal["error", "skip"] = "error"
    pad_to_square: bool = False

    def __post_init__(self):
        for p in self.path if isinstance(self.path, list) else [self.path]:
            if p and not p.endswith((".json", ".jsonl")):
                raise ValueError(f"path = {p!r}: expected a LLaVA .json (a list of records) or .jsonl file")
        if self.max_length is not None:
            _at_least("max_length", self.max_length, 2)


@dataclass
class EngineConfig:
    zero_stage: int | None = None  # None: the DeepSpeed JSON's stage, else 0
    deepspeed_config: str | None = None  # extra DeepSpeed JSON (zero_optimization section, ...)
    activation_checkpointing: bool = False
    liger: bool = True  # Liger-Kernel RMSNorm/SwiGLU/RoPE patches on CUDA when installed
    shard_teacher: bool = False  # ZeRO-3 only: partition the teacher across ranks (ZeRO inference)
    num_workers: int = 0  # DataLoader workers per rank
    # torch intra-op threads per rank when training on CPU: a number; "auto" (the usable cores of this
    # rank minus the 1-minute load average, at least 1); null (torch's default split over local ranks).
    # Tiny models gain nothing from more, and OpenMP threads stall when a core is busy elsewhere
    # (benchmarks/threads_under_load.py measures the choices).
    cpu_threads: int | Literal["auto"] | None = 1
    dist_backend: str | None = None  # None: nccl on CUDA, gloo on CPU

    def __post_init__(self):
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage = {self.zero_stage!r}: expected 0, 1, 2, 3 or null")
        _at_least("num_workers", self.num_workers, 0)
        if self.cpu_threads not in (None, "auto"):
            _at_least("cpu_threads", self.cpu_threads, 1)
        if self.dist_backend is not None and self.dist_backend not in ("gloo", "nccl", "ccl", "mpi"):
            raise ValueError(f"dist_backend = {self.dist_backend!r}: expected gloo, nccl, ccl, mpi or null")


@dataclass
class StageConfig:
    """One training stage. ``weights`` keys not given keep the kind's defaults (KINDS[kind].weights)."""

    name: str
    kind: str  # a key of kdengine.train.kinds.KINDS
    model: str
    data: str
    teacher: str | None = None
    teacher_cache: str | None = None  # dpt/dft: a teacher_cache stage's name or a cache directory, instead of teacher
    cache: CacheSettings | None = None  # teacher_cache: mode, k, temperature, ... (None: CacheSettings())
    trainable: list[str] | None = None  # None: KINDS[kind].trainable
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
    seed_as: str | None = None  # take the RNG seeds (data order) of this other stage, e.g. to rerun it exactly

    def __post_init__(self):
        """The kind's defaults, then every check that needs no other section (see `check` for those)."""
        _one_of("kind", self.kind, KINDS)
        if self.weights is None:
            self.weights = LossWeights(**KINDS[self.kind].weights)
        if self.trainable is None:
            self.trainable = list(KINDS[self.kind].trainable)
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name = {self.name!r}: expected a non-empty directory name")
        self._check_cache_fields()
        if not self.trainable and KINDS[self.kind].trains:
            raise ValueError(f"trainable = {self.trainable!r}: nothing to train; expected some of {list(COMPONENTS)}")
        bad = [c for c in self.trainable if c not in COMPONENTS]
        if bad:
            raise ValueError(f"trainable has unknown components {bad}; expected names from {list(COMPONENTS)}")
        self._check_weights()
        _at_least("epochs", self.epochs, 1)
        if self.max_steps is not None:
            _at_least("max_steps", self.max_steps, 1)
        if not self.lr > 0:
            raise ValueError(f"lr = {self.lr}: expected > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio = {self.warmup_ratio}: expected 0 <= warmup_ratio < 1")
        for name in ("weight_decay", "grad_clip", "checkpoint_every"):
            _at_least(name, getattr(self, name), 0)
        for name in ("micro_batch_size", "batch_size"):
            _at_least(name, getattr(self, name), 1)

    def _check_cache_fields(self) -> None:
        if self.kind == CACHE_KIND and self.cache is None:
            self.cache = CacheSettings()
        if self.kind != CACHE_KIND and self.cache is not None:
            raise ValueError(f"cache = {self.cache}: only a {CACHE_KIND} stage has cache settings")
        if self.teacher_cache is not None and not self.distills:
            raise ValueError(f"teacher_cache = {self.teacher_cache!r}: kind {self.kind!r} reads no teacher; "
                             f"expected kind {_teacher_kinds()}")

    def _check_weights(self) -> None:
        """The weights suit the kind (each weight is checked by LossWeights itself)."""
        w = self.weights
        terms = dataclasses.asdict(w)
        if not any(terms.values()):
            raise ValueError(f"weights are all zero {terms}: expected at least one weight > 0")
        if not self.distills and w.distills:
            raise ValueError(
                f"weights res/vis/rel = {w.res}/{w.vis}/{w.rel}: kind {self.kind!r} has no teacher; "
                f"expected 0 (use kind {_teacher_kinds()} to distill)"
            )
        if self.distills and not w.distills:
            plain = ", ".join(n for n, k in KINDS.items() if k.trains and not k.teacher)
            raise ValueError(
                f"weights res/vis/rel are all zero: kind {self.kind!r} would not distill; "
                f"expected one of them > 0 (or a kind without a teacher: {plain})"
            )

    @property
    def distills(self) -> bool:
        return KINDS[self.kind].teacher


def _teacher_kinds() -> str:
    """"dpt or dft": the kinds that distil, for messages."""
    return " or ".join(name for name, k in KINDS.items() if k.teacher)


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
    sizes = dict(batch_size=8, micro_batch_size=8, checkpoint_every=50)
    return [
        StageConfig(name="teacher_pt", kind="pt", model="teacher", data="pretrain", lr=2e-3, **sizes),
        StageConfig(name="teacher_sft", kind="sft", model="teacher", data="instruct", lr=1e-3, epochs=3, **sizes),
        StageConfig(name="student_dpt", kind="dpt", model="student", teacher="teacher", data="pretrain", lr=2e-3,
                    **sizes),
        StageConfig(name="student_sft", kind="sft", model="student", data="instruct", lr=1e-3, epochs=2, **sizes),
        StageConfig(name="student_dft", kind="dft", model="student", teacher="teacher", data="instruct", lr=1e-3,
                    epochs=2, **sizes),
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

# Sections a YAML file overrides field by field; the other sections it replaces whole.
MERGED_SECTIONS = ("run", "synth", "engine")


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
    tree = TrainConfig().to_dict()  # the defaults as plain YAML data
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        for key, value in _read_mapping(path, path, "YAML", "a mapping of sections").items():
            merge = key in MERGED_SECTIONS and isinstance(value, dict) and isinstance(tree[key], dict)
            tree[key] = {**tree[key], **value} if merge else value
    for item in overrides:
        _apply_override(tree, item)
    cfg = _build(TrainConfig, tree, "")
    _substitute(cfg, RUN_DIR, cfg.run.output_dir)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check(cfg, world_size, check_paths=check_paths)
    return cfg


def _read_mapping(path: str, label: str, fmt: Literal["YAML", "JSON"], expected: str) -> dict:
    """The mapping an existing YAML or JSON file holds, or ConfigError naming ``label`` and what is wrong."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f) if fmt == "JSON" else (yaml.safe_load(f) or {})
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"{label}: invalid {fmt}: {' '.join(str(err).split())}") from None  # one line
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: top level is a {type(data).__name__}; expected {expected}")
    return data


def _apply_override(tree: dict, item: str) -> None:
    """Set one dotted key of the config tree (sections missing on the way start empty)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value (e.g. stages.0.lr=1e-4)")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty part in key {key!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {' '.join(str(e).split())}") from None
    node: Any = tree
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            part = _list_index(node, part, ".".join(parts[: depth + 1]))
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth])} is not a section")
        elif part not in node or node[part] is None:
            node[part] = {}
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]


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


def _build(cls: type, data: Any, where: str) -> Any:
    """Instance of dataclass ``cls`` from a mapping, fields by their type hints; absent fields take
    the class defaults. Unknown keys, wrong types, missing fields and the class's own
    ``__post_init__`` checks raise ConfigError naming the key."""
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
            kwargs[name] = _parse(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key {key!r} is missing; expected {_type_name(hints[name])}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # the dataclass's own check, "field = value: expected ..."
        if isinstance(data.get("name"), str):  # a named item (a stage): say which
            label = f"{label} ({data['name']})"
        raise ConfigError(f"{label}.{e}") from None


def _stage_defaults(data: dict, where: str) -> dict:
    """A stage's ``weights`` given in part keep the kind's defaults for the other terms."""
    kind, weights = data.get("kind"), data.get("weights")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind = {kind!r}: expected one of {list(KINDS)}")
    if weights is None:
        return data
    if not isinstance(weights, dict):
        keys = list(KINDS[kind].weights)
        raise ConfigError(f"{where}.weights = {weights!r}: expected a mapping with keys from {keys}")
    return {**data, "weights": {**KINDS[kind].weights, **weights}}


def _parse(tp: Any, value: Any, where: str) -> Any:
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
                return _parse(arg, value, where)
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
        return _build(tp, value, where)
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
    """The checks that span sections (each section checked its own fields when it was built).
    Raises ConfigError on the first problem; reads nothing but small JSON files and stats paths."""
    _check_deepspeed(cfg.engine)
    if not cfg.stages:
        raise ConfigError("stages is empty: expected at least one stage")
    seen: set[str] = set()
    for i, stage in enumerate(cfg.stages):
        _check_stage(cfg, stage, f"stages[{i}] ({stage.name})", world_size)
        if stage.name in seen:
            raise ConfigError(f"stages[{i}].name = {stage.name!r} is used twice: expected unique stage names")
        seen.add(stage.name)
    if check_paths:
        _check_paths(cfg)


def _check_deepspeed(engine: EngineConfig) -> None:
    ds = read_deepspeed_json(engine.deepspeed_config) if engine.deepspeed_config else {}
    owned = sorted(k for k in ds if k in DS_OWNED_KEYS)
    if owned:
        raise ConfigError(
            f"engine.deepspeed_config {engine.deepspeed_config} sets {owned}: these come from the stage config "
            f"(batch_size, micro_batch_size, grad_clip, lr) and the device (bf16 on GPU); remove them from the JSON"
        )
    json_stage = ds.get("zero_optimization", {}).get("stage")
    if engine.zero_stage is not None and json_stage is not None and json_stage != engine.zero_stage:
        raise ConfigError(
            f"engine.zero_stage = {engine.zero_stage} but {engine.deepspeed_config} has "
            f"zero_optimization.stage = {json_stage}: expected them equal (or leave engine.zero_stage null)"
        )
    if engine.shard_teacher and zero_stage(engine) != 3:
        raise ConfigError(f"engine.shard_teacher = true needs ZeRO stage 3; the zero stage is {zero_stage(engine)}")


def read_deepspeed_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"engine.deepspeed_config: file not found: {path}")
    return _read_mapping(path, f"engine.deepspeed_config {path}", "JSON", "a JSON object")


def zero_stage(engine: EngineConfig) -> int:
    """The effective ZeRO stage: engine.zero_stage, else the JSON's, else 0."""
    if engine.zero_stage is not None:
        return engine.zero_stage
    if engine.deepspeed_config:
        return int(read_deepspeed_json(engine.deepspeed_config).get("zero_optimization", {}).get("stage", 0))
    return 0


def _check_stage(cfg: TrainConfig, stage: StageConfig, where: str, world_size: int) -> None:
    """The stage's model, data and teacher name entries of their sections; its batch splits over the ranks."""
    if stage.model not in cfg.models:
        raise ConfigError(f"{where}.model = {stage.model!r}: expected one of the models {sorted(cfg.models)}")
    if stage.data not in cfg.datasets:
        raise ConfigError(f"{where}.data = {stage.data!r}: expected one of the datasets {sorted(cfg.datasets)}")
    teacher = stage.teacher
    if stage.teacher_cache is not None:
        _check_teacher_cache(cfg, stage, where)
    elif stage.distills:
        others = sorted(m for m in cfg.models if m != stage.model)
        if teacher is None:
            raise ConfigError(f"{where}: kind {stage.kind!r} needs a teacher; expected teacher: one of {others}")
        if teacher == stage.model:
            raise ConfigError(f"{where}.teacher = {teacher!r} is the model being trained; expected one of {others}")
        if teacher not in cfg.models:
            raise ConfigError(f"{where}.teacher = {teacher!r}: expected one of the models {others}")
    elif teacher is not None:
        raise ConfigError(
            f"{where}.teacher = {teacher!r}: kind {stage.kind!r} is cross-entropy only; "
            f"expected no teacher (use kind {_teacher_kinds()} to distill)"
        )
    if stage.seed_as is not None:
        same = [st for st in cfg.stages if st.name == stage.seed_as and st.name != stage.name]
        if not same or same[0].data != stage.data:
            others = sorted(st.name for st in cfg.stages if st.data == stage.data and st.name != stage.name)
            raise ConfigError(f"{where}.seed_as = {stage.seed_as!r}: expected another stage on data "
                              f"{stage.data!r}, one of {others}")
    per_step = stage.micro_batch_size * world_size
    if stage.batch_size % per_step:
        raise ConfigError(
            f"{where}.batch_size = {stage.batch_size} is not a multiple of micro_batch_size {stage.micro_batch_size} "
            f"x world size {world_size} = {per_step}: "
            f"expected batch_size = micro_batch_size x ranks x accumulation steps"
        )


def _check_teacher_cache(cfg: TrainConfig, stage: StageConfig, where: str) -> None:
    """A dpt/dft stage reading a cache has no teacher; a cache named like a stage is an earlier teacher_cache
    stage whose settings can give the reading stage's loss (any other name is a cache directory: its
    manifest, if written, is checked by `_check_paths`; the whole cache when the stage opens it)."""
    if stage.teacher is not None:
        raise ConfigError(f"{where}: teacher = {stage.teacher!r} and teacher_cache = {stage.teacher_cache!r}; "
                          f"expected one of them (the cache replaces the teacher)")
    names = [st.name for st in cfg.stages]
    if stage.teacher_cache in names:
        source = cfg.stages[names.index(stage.teacher_cache)]
        if source.kind != CACHE_KIND or names.index(source.name) > names.index(stage.name):
            raise ConfigError(f"{where}.teacher_cache = {stage.teacher_cache!r} is the {source.kind} stage "
                              f"{names.index(source.name)}; expected an earlier {CACHE_KIND} stage or a cache directory")
        c = source.cache  # a cache stage writes every distilled row, and in topk mode each image's Gram matrix
        problem = cache_mismatch(stage, repr(source.name), c.mode, c.temperature,
                                 rows="response+visual", has_gram=True)
        if problem:
            raise ConfigError(f"{where}.{problem}")


def cache_mismatch(stage: StageConfig, cache: str, mode: str, temperature: float | None, rows: str,
                   has_gram: bool) -> str | None:
    """What a teacher cache (described by ``cache``) cannot give the loss of ``stage`` that reads it, as
    "key = value but ...; expected ..."; None when it gives all. A hidden-mode cache gives every loss; a
    top-k one gives forward KL only, at the temperature it was written with, visual rows only if
    ``rows`` has them, RDist only with its Gram matrices. Checked at config load and again when the
    stage opens the cache (`kdengine.train.cache_stage.check_stage_terms`)."""
    if mode != "topk":
        return None
    d, w = stage.distill, stage.weights
    if d.divergence != "forward_kl":
        return (f"distill.divergence = {d.divergence!r} but teacher cache {cache} is top-k, which gives "
                f"forward_kl only; expected forward_kl (or a hidden-mode cache)")
    if abs(d.temperature - temperature) > 1e-12 * max(1.0, abs(temperature)):
        return (f"distill.temperature = {d.temperature:g} but teacher cache {cache} holds top-k log-probabilities "
                f"at temperature {temperature:g}; expected equal")
    if w.vis != 0 and rows == "response":
        return (f"weights.vis = {w.vis:g} but teacher cache {cache} holds response positions only; "
                f"expected weights.vis = 0")
    if w.rel != 0 and not has_gram:
        return (f"weights.rel = {w.rel:g} but teacher cache {cache} holds no teacher Gram matrices (RDist); "
                f"expected weights.rel = 0")
    return None


def stage_seed_of(cfg: TrainConfig, stage: StageConfig) -> int:
    """The seed of ``stage``'s random draws (initialisation, data order): `kdengine.train.kinds.stage_seed`
    of its name, or of the name its ``seed_as`` gives."""
    return stage_seed(cfg.run.seed, stage.seed_as or stage.name)


def _check_paths(cfg: TrainConfig) -> None:
    """Every path the stages need exists, or lies under synth.out (written before training)."""
    pending = os.path.abspath(cfg.synth.out) if cfg.synth is not None else None

    def under_synth(path: str) -> bool:
        return bool(pending) and os.path.abspath(path).startswith(pending + os.sep)

    def need(key: str, path: str | None, kind: str) -> None:
        if not path or under_synth(path):
            return
        ok = os.path.isdir(path) if kind == "dir" else os.path.exists(path)
        if not ok:
            raise ConfigError(f"{key} = {path!r}: {'directory' if kind == 'dir' else 'file'} not found")

    trained_before: set[str] = set()
    for stage in cfg.stages:
        for name in (stage.model, stage.teacher):
            if name is None or name in trained_before:
                continue  # weights come from an earlier stage of this run
            spec = cfg.models[name]
            try:
                spec.validate()
            except ValueError as err:
                raise ConfigError(f"models.{name}: {err}") from None
            for attr in ("path", "vision_tower", "language_model", "tokenizer"):
                need(f"models.{name}.{attr}", getattr(spec, attr), "dir")
                if attr != "tokenizer" and getattr(spec, attr) and not under_synth(getattr(spec, attr)):
                    try:
                        check_checkpoint_dir(getattr(spec, attr), "model")
                    except (ValueError, FileNotFoundError) as err:
                        raise ConfigError(f"models.{name}.{attr} = {getattr(spec, attr)!r}: {err}") from None
        trained_before.add(stage.model)
        ds = cfg.datasets[stage.data]
        paths = ds.path if isinstance(ds.path, list) else [ds.path]
        if not any(paths):
            raise ConfigError(f"datasets.{stage.data}.path is empty: expected a LLaVA .json/.jsonl file")
        for p in paths:
            need(f"datasets.{stage.data}.path", p, "file")
        need(f"datasets.{stage.data}.image_folder", ds.image_folder, "dir")
        if stage.teacher_cache is not None and stage.teacher_cache not in {st.name for st in cfg.stages}:
            _check_cache_manifest(stage, f"stages[{cfg.stages.index(stage)}] ({stage.name})")


def _check_cache_manifest(stage: StageConfig, where: str) -> None:
    """A cache directory's manifest, when written (``teacher-cache import`` may write it after this
    check), gives the stage's loss terms; the shards are verified when the stage opens it."""
    if not os.path.isfile(os.path.join(stage.teacher_cache, MANIFEST)):
        return
    try:
        m = load_manifest(stage.teacher_cache)
    except CacheError as err:
        raise ConfigError(f"{where}.teacher_cache: {err}") from None
    problem = cache_mismatch(stage, repr(stage.teacher_cache), m.mode, m.temperature, m.rows, m.has_gram)
    if problem:
        raise ConfigError(f"{where}.{problem}")
