"""Stage kinds in one registry (kdengine.train.kinds.KINDS), imports one way (kdengine.cache never imports
kdengine.train), a teacher cache checked against its reading stage at config load, and stage seeds
that come from the stage's name, not its position.

The config tests load configs only (no torch); the last test trains a dft stage three times
(DeepSpeed on CPU, 3 steps each).
"""

import ast
import json
import os
import subprocess
import sys

import pytest
import yaml

from kdengine.cache.manifest import Manifest, save_manifest
from kdengine.train import kinds
from kdengine.train.config import ConfigError, load_config, stage_seed_of
from kdengine.train.kinds import CACHE_KIND, KINDS, StageKind, stage_seed
from test_teacher_cache_stage import MODELS, data_dir  # noqa: F401 (the tiny models and the module fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------- the registry


def test_the_table_holds_every_kind_with_its_defaults():
    assert list(KINDS) == ["pt", "sft", "dpt", "dft", "teacher_cache"] and CACHE_KIND == "teacher_cache"
    ce, kd = {"ce": 1.0, "res": 0.0, "vis": 0.0, "rel": 0.0}, {"ce": 1.0, "res": 1.0, "vis": 1.0, "rel": 0.5}
    expected = {  # weights, trainable, teacher, produces (the paper's defaults, Sec. 4.1)
        "pt": (ce, ("projector",), False, "model"),
        "sft": (ce, ("projector", "language_model"), False, "model"),
        "dpt": (kd, ("projector",), True, "model"),
        "dft": (kd, ("projector", "language_model"), True, "model"),
        "teacher_cache": (ce, (), False, "cache"),
    }
    for name, (weights, trainable, teacher, produces) in expected.items():
        k = KINDS[name]
        assert (k.weights, k.trainable, k.teacher, k.produces) == (weights, trainable, teacher, produces), name
    assert KINDS["dft"].runner == "kdengine.train.stages:train_stage"
    assert KINDS["teacher_cache"].runner == "kdengine.train.cache_stage:run_cache_stage"


def test_a_config_takes_its_defaults_from_the_table(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stages: [{name: a, kind: dft, model: student, teacher: teacher, data: instruct},\n"
                    "         {name: b, kind: pt, model: student, data: pretrain}]\n")
    a, b = load_config(str(path), check_paths=False).stages
    assert (a.weights.ce, a.weights.res, a.weights.vis, a.weights.rel) == (1.0, 1.0, 1.0, 0.5)
    assert a.trainable == ["projector", "language_model"] and a.distills
    assert (b.weights.res, b.weights.vis, b.weights.rel) == (0, 0, 0) and b.trainable == ["projector"]
    assert not b.distills


def test_an_unknown_kind_names_the_table():
    with pytest.raises(ConfigError, match=r"stages\[2\]\.kind = 'distill': expected one of "
                                          r"\['pt', 'sft', 'dpt', 'dft', 'teacher_cache'\]"):
        load_config(overrides=["stages.2.kind=distill"], check_paths=False)


def test_a_bad_table_entry_is_refused():
    with pytest.raises(ValueError, match="produces = 'weights'; expected one of"):
        StageKind("x", produces="weights")
    with pytest.raises(ValueError, match="runner = 'run_x'; expected 'module:function'"):
        StageKind("x", runner="run_x")


PROBE_CALLS = []


def probe_runner(session, index, stage):
    """The runner of the `probe` kind the next test adds."""
    PROBE_CALLS.append((session, index, stage.name))
    return {"stage": stage.name, "kind": stage.kind, "ran": "probe"}


def test_adding_a_kind_is_one_entry_plus_its_runner(monkeypatch, tmp_path):
    """A kind added to the table alone is accepted by the config (with its defaults) and `run_stage`
    calls its runner."""
    probe = StageKind("probe", weights={"ce": 1.0, "res": 0.0, "vis": 0.0, "rel": 0.0}, trainable=("vision_tower",),
                      runner="test_stage_kinds:probe_runner")
    monkeypatch.setitem(kinds.KINDS, "probe", probe)
    path = tmp_path / "c.yaml"
    path.write_text("stages: [{name: a, kind: pt, model: student, data: pretrain},\n"
                    "         {name: p, kind: probe, model: student, data: pretrain, weights: {ce: 2}}]\n")
    stage = load_config(str(path), check_paths=False).stages[1]
    assert stage.kind == "probe" and stage.trainable == ["vision_tower"] and not stage.distills
    assert (stage.weights.ce, stage.weights.res) == (2.0, 0.0)
    from kdengine.train.stages import run_stage

    row = run_stage("session", 1, stage)
    assert row == {"stage": "p", "kind": "probe", "ran": "probe"}
    assert PROBE_CALLS[-1] == ("session", 1, "p")


# ----------------------------------------------------------------------------- imports one way


def imported_modules(path: str) -> list[str]:
    """Every module an ``import`` or ``from ... import`` statement of the file names (at any depth),
    relative imports resolved against the kdengine.cache package."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "kdengine.cache" if node.level == 1 else "kdengine" if node.level == 2 else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return names


def test_no_module_of_kdengine_cache_imports_kdengine_train():
    folder = os.path.join(ROOT, "kdengine", "cache")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    assert "reader.py" in files and "stage.py" not in files and "commands.py" not in files
    upward = {f: [m for m in imported_modules(os.path.join(folder, f)) if m.startswith("kdengine.train")]
              for f in files}
    assert {f: m for f, m in upward.items() if m} == {}


def test_the_import_scan_sees_an_upward_import(tmp_path):
    """The scan above finds a function-level import and a relative one (so an empty result means something)."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from kdengine.train.config import CACHE_KIND\n\nfrom ..train import run\n")
    assert sorted(imported_modules(str(path))) == ["kdengine.train", "kdengine.train.config",
                                                   "kdengine.train.config.CACHE_KIND", "kdengine.train.run"]


# ----------------------------------------------------------------------------- a cache against its reader


def cache_config(tmp_path, cache: dict | None = None, dft: dict | None = None, reads: str = "t_cache") -> str:
    """The tiny default's datasets and models; a teacher_cache stage and a dft stage reading ``reads``."""
    stages = [{"name": "t_cache", "kind": "teacher_cache", "model": "teacher", "data": "instruct",
               "cache": cache or {"mode": "hidden"}},
              {"name": "s_dft", "kind": "dft", "model": "student", "data": "instruct", "teacher_cache": reads,
               **(dft or {})}]
    path = tmp_path / "config.yaml"
    with open(path, "w") as f:
        yaml.safe_dump({"run": {"output_dir": str(tmp_path / "run")}, "stages": stages}, f)
    return str(path)


TOPK = {"mode": "topk", "k": 8, "temperature": 1.0}
CACHE_STAGE_ERRORS = [
    ("temperature", {"distill": {"temperature": 2.0}},
     "stages[1] (s_dft).distill.temperature = 2 but teacher cache 't_cache' holds top-k log-probabilities at "
     "temperature 1; expected equal"),
    ("divergence", {"distill": {"divergence": "reverse_kl"}},
     "stages[1] (s_dft).distill.divergence = 'reverse_kl' but teacher cache 't_cache' is top-k, which gives "
     "forward_kl only; expected forward_kl (or a hidden-mode cache)"),
]


@pytest.mark.parametrize("case, dft, message", CACHE_STAGE_ERRORS, ids=[c[0] for c in CACHE_STAGE_ERRORS])
def test_a_topk_cache_stage_is_checked_against_its_reader_at_load(tmp_path, case, dft, message):
    with pytest.raises(ConfigError) as err:
        load_config(cache_config(tmp_path, TOPK, dft))
    assert str(err.value) == message


def test_a_hidden_cache_stage_serves_any_divergence_and_temperature(tmp_path):
    dft = {"distill": {"temperature": 2.0, "divergence": "reverse_kl"}}
    cfg = load_config(cache_config(tmp_path, {"mode": "hidden"}, dft))
    assert cfg.stages[1].distill.temperature == 2.0
    cfg = load_config(cache_config(tmp_path, {**TOPK, "temperature": 2.0}, {"distill": {"temperature": 2.0}}))
    assert cfg.stages[0].cache.temperature == 2.0  # equal temperatures, forward KL: accepted


def imported_cache(directory: str, **fields) -> str:
    """The manifest of an imported top-k cache (response rows, no Gram matrices), as `import_topk_jsonl` writes it."""
    os.makedirs(directory)
    m = Manifest(mode="topk", dtype="float32", fingerprint={}, teacher={}, num_samples=0, k=4, temperature=1.0,
                 rows="response", has_gram=False, complete=True)
    for k, v in fields.items():
        setattr(m, k, v)
    save_manifest(directory, m)
    return directory


DIRECTORY_ERRORS = [
    ("vis", {}, {"weights": {"rel": 0.0}}, "weights.vis = 1 but teacher cache {d!r} holds response positions only; "
                                           "expected weights.vis = 0"),
    ("rel", {}, {"weights": {"vis": 0.0}}, "weights.rel = 0.5 but teacher cache {d!r} holds no teacher Gram "
                                           "matrices (RDist); expected weights.rel = 0"),
    ("temperature", {"temperature": 4.0}, {"weights": {"vis": 0.0, "rel": 0.0}},
     "distill.temperature = 1 but teacher cache {d!r} holds top-k log-probabilities at temperature 4; "
     "expected equal"),
]


@pytest.mark.parametrize("case, fields, dft, message", DIRECTORY_ERRORS, ids=[c[0] for c in DIRECTORY_ERRORS])
def test_a_written_cache_directory_is_checked_against_its_reader_at_load(tmp_path, case, fields, dft, message):
    d = imported_cache(str(tmp_path / "imported"), **fields)
    with pytest.raises(ConfigError) as err:
        load_config(cache_config(tmp_path, dft=dft, reads=d))
    assert str(err.value) == "stages[1] (s_dft)." + message.format(d=d)


def test_a_cache_directory_that_fits_or_is_not_written_yet_loads(tmp_path):
    d = imported_cache(str(tmp_path / "imported"))
    cfg = load_config(cache_config(tmp_path, dft={"weights": {"vis": 0.0, "rel": 0.0}}, reads=d))
    assert cfg.stages[1].teacher_cache == d
    later = str(tmp_path / "not_imported_yet")  # teacher-cache import loads the config, then writes it
    cfg = load_config(cache_config(tmp_path, reads=later))
    assert cfg.stages[1].teacher_cache == later


def test_the_mismatch_stops_kdengine_train_before_the_cache_stage_runs(tmp_path):
    config = cache_config(tmp_path, TOPK, {"distill": {"temperature": 2.0}})
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "kdengine.cli", "train", config], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [f"kdengine train: config error: {CACHE_STAGE_ERRORS[0][2]}"]
    assert not os.path.exists(tmp_path / "run")  # nothing written: no data, no cache


# ----------------------------------------------------------------------------- seeds by name


def test_stage_seeds_are_a_stable_function_of_the_name():
    # pinned: a changed function would change every run's data order and initialisation
    assert stage_seed(0, "student_dft") == 1282124323
    assert stage_seed(5, "student_dft") == 1282124328
    assert stage_seed(0, "student_sft") != stage_seed(0, "student_dft")
    assert 0 <= stage_seed(2**40, "x") < 2**31
    cfg = load_config(check_paths=False)
    seeds = {st.name: stage_seed_of(cfg, st) for st in cfg.stages}
    assert seeds["student_dft"] == 1282124323
    moved = load_config(overrides=["stages.student_dft.seed_as=student_sft"], check_paths=False)
    assert stage_seed_of(moved, moved.stages[4]) == seeds["student_sft"]  # seed_as: the other stage's draws


STEPS = 3


def train_dft(data_dir: str, run_dir: str, cache_first: bool, name: str = "s_dft") -> list[dict]:
    """Train [teacher_cache t_cache (if cache_first), dft NAME] and return the dft stage's metrics."""
    tok = os.path.join(data_dir, "tokenizer")
    stages = [{"name": name, "kind": "dft", "model": "student", "data": "instruct", "teacher": "teacher",
               "lr": 1e-3, "batch_size": 4, "micro_batch_size": 2, "max_steps": STEPS}]
    if cache_first:
        stages.insert(0, {"name": "t_cache", "kind": "teacher_cache", "model": "teacher", "data": "instruct",
                          "cache": {"mode": "hidden", "batch_size": 8, "shard_samples": 24}})
    cfg = {"run": {"output_dir": run_dir, "seed": 0}, "synth": None,
           "datasets": {"instruct": {"path": os.path.join(data_dir, "instruct.json"),
                                     "image_folder": os.path.join(data_dir, "images")}},
           "models": {m: {"source": "tiny", "tokenizer": tok, "tiny": tiny} for m, tiny in MODELS.items()},
           "stages": stages}
    config = os.path.join(os.path.dirname(run_dir), "config.yaml")
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "kdengine.cli", "train", config], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("stage") == name]


def test_a_cache_stage_inserted_before_a_dft_stage_leaves_it_unchanged(data_dir, tmp_path):
    """Same dft stage, alone or after a teacher_cache stage: the same data order and initialisation, so
    the same per-step losses, term by term. Renamed, the same stage draws other seeds (the losses move),
    so the comparison can tell seeds apart."""
    terms = ("loss", "ce", "res", "vis", "rel", "grad_norm", "tokens")
    alone = train_dft(data_dir, str(tmp_path / "a" / "run"), cache_first=False)
    after = train_dft(data_dir, str(tmp_path / "b" / "run"), cache_first=True)
    renamed = train_dft(data_dir, str(tmp_path / "c" / "run"), cache_first=False, name="s_dft_b")
    assert [r["step"] for r in alone] == [r["step"] for r in after] == list(range(1, STEPS + 1))
    assert [[r[k] for k in terms] for r in after] == [[r[k] for k in terms] for r in alone]
    assert [r["loss"] for r in renamed] != [r["loss"] for r in alone]
