"""A config is loaded and checked before torch, transformers or DeepSpeed is imported.

`kdengine train CONFIG`, `kdengine demo --config CONFIG` and `kdengine teacher-cache CONFIG` with a
bad config (an unknown key, a bad value, a missing file) print one line and exit 2 without importing
any of them, so the error comes in a fraction of the time a torch import takes. Each case runs in a
fresh interpreter (``python -X importtime``, whose report lists every module imported).
"""

import os
import subprocess
import sys
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers", "deepspeed", "triton")
TIMEOUT = 120


def run(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-X", "importtime", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def imported(stderr: str) -> set[str]:
    """Top-level package names of every module the ``-X importtime`` report lists."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def other_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


def write_yaml(path, tree: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(tree, f)
    return str(path)


def bad_configs(tmp_path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra CLI arguments after the config, the expected one-line message after the label)."""
    unknown = write_yaml(tmp_path / "unknown.yaml", {"run": {"output_dir": str(tmp_path / "run"), "bogus": 1}})
    value = write_yaml(tmp_path / "value.yaml", {"run": {"output_dir": str(tmp_path / "run"), "log_every": 0}})
    missing_data = write_yaml(tmp_path / "data.yaml", {
        "run": {"output_dir": str(tmp_path / "run")},
        "datasets": {"pretrain": {"path": str(tmp_path / "nope.json")},
                     "instruct": {"path": str(tmp_path / "nope.json")}},
    })
    return {
        "unknown key": (unknown, "unknown config key 'run.bogus'; expected one of "
                                 "['keep_checkpoints', 'log_every', 'output_dir', 'seed'] in run"),
        "bad value": (value, "run.log_every = 0: expected >= 1"),
        "missing config": (str(tmp_path / "absent.yaml"), f"config file not found: {tmp_path / 'absent.yaml'}"),
        "missing dataset file": (missing_data, f"datasets.pretrain.path = {str(tmp_path / 'nope.json')!r}: "
                                               f"file not found"),
    }


@pytest.mark.parametrize("command", ["train", "demo", "teacher-cache"])
@pytest.mark.parametrize("case", ["unknown key", "bad value", "missing config", "missing dataset file"])
def test_bad_config_errors_without_torch(tmp_path, command, case):
    config, message = bad_configs(tmp_path)[case]
    args = {"train": ["train", config], "demo": ["demo", "--config", config, "--out", str(tmp_path / "run")],
            "teacher-cache": ["teacher-cache", config, "--stage", "cache"]}[command]
    label = "error" if command == "teacher-cache" else "config error"
    proc = run(["-m", "kdengine.cli", *args], cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert other_lines(proc.stderr) == [f"kdengine {command}: {label}: {message}"]
    assert not imported(proc.stderr) & set(HEAVY), f"{command} imported {sorted(imported(proc.stderr) & set(HEAVY))}"


def test_load_config_imports_no_torch(tmp_path):
    """The function the CLI uses, on a bad config and on good ones (the embedded default, configs/tiny.yaml,
    the demo's config): none of them imports torch, transformers or DeepSpeed."""
    config, _ = bad_configs(tmp_path)["unknown key"]
    code = (
        "import sys\n"
        "from kdengine.train.config import ConfigError, load_config\n"
        "from kdengine.demo import DEFAULT_CONFIG, demo_config\n"
        "load_config()\n"
        f"load_config({os.path.join(ROOT, 'configs', 'tiny.yaml')!r}, ['run.output_dir={tmp_path / 'tiny'}'])\n"
        f"demo_config(DEFAULT_CONFIG, out={str(tmp_path / 'demo')!r})\n"
        "try:\n"
        f"    load_config({config!r})\n"
        "except ConfigError as err:\n"
        "    print('ConfigError:', err)\n"
        f"print('heavy:', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = run(["-c", code], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ConfigError: unknown config key 'run.bogus'" in proc.stdout
    assert "heavy: []" in proc.stdout
    assert not imported(proc.stderr) & set(HEAVY)


def test_config_error_is_fast_next_to_a_torch_import(tmp_path):
    """The error's whole process takes less time than a bare `import torch` process (the module checks above
    are the real test; this guards the user-visible effect without a fixed number of seconds)."""
    config, _ = bad_configs(tmp_path)["unknown key"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def seconds(args):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
        return time.perf_counter() - t0, proc

    t_torch, proc = seconds(["-c", "import torch"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    t_error, proc = seconds(["-m", "kdengine.cli", "train", config])
    assert proc.returncode == 2 and "config error: unknown config key 'run.bogus'" in proc.stderr
    assert t_error < t_torch, f"config error took {t_error:.2f} s, a torch import {t_torch:.2f} s"
