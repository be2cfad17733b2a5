"""A fresh install, used from the repository root as a newcomer would (issue 20).

The top-level ``kernels/`` folder imports as ``kdengine.kernels`` (through the symlink
``kdengine/kernels``) and has no ``__init__.py``: from the repository root it is at most a namespace
portion, so Hugging Face's regular ``kernels`` package, which transformers >= 5.25 imports, wins
``import kernels``. Each check runs in a fresh interpreter with the repository root as its cwd.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(args, cwd=ROOT, timeout=300, **env):
    full_env = {**os.environ, **env}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_a_regular_kernels_package_wins_over_the_folder(tmp_path):
    """Whatever is installed: a regular ``kernels`` package later on sys.path than the cwd wins."""
    stand_in = tmp_path / "kernels"
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text("STAND_IN = True\n")
    out = run([sys.executable, "-c", "import kernels; print(kernels.__file__, getattr(kernels, 'STAND_IN', False))"],
              PYTHONPATH=str(tmp_path))
    path, flag = out.split()
    assert flag == "True" and pathlib.Path(path).parent == stand_in, f"`import kernels` from the repository root found {path}"


def test_import_kernels_from_the_root_is_not_the_project():
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    origin = run([sys.executable, "-c", code]).strip()
    try:  # Hugging Face's `kernels` distribution (transformers >= 5.25 requires it; the constraints' 5.23 does not)
        importlib.metadata.distribution("kernels")
        hf_kernels = True
    except importlib.metadata.PackageNotFoundError:
        hf_kernels = False
    if hf_kernels:
        assert origin != "None" and "site-packages" in pathlib.Path(origin).parts, origin
    else:  # at most the folder as a namespace portion, which has no origin
        assert origin == "None", origin
    # the project folder is never a module of its own: no __init__.py, so no origin there
    assert ROOT / "kernels" not in pathlib.Path(origin).parents, origin


def test_no_init_in_the_top_level_kernels_folder():
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py makes the folder shadow Hugging Face's `kernels`"


@pytest.mark.parametrize("module", ["kdengine.model", "kdengine.kernels.fused_linear_divergence", "transformers.activations"])
def test_imports_from_the_root(module):
    out = run([sys.executable, "-c", f"import {module} as m; print(m.__file__)"])
    assert out.strip().endswith(".py"), out


def test_a_benchmark_starts_from_the_root():
    out = run([sys.executable, "-m", "benchmarks.train_step", "--help"])
    assert "usage:" in out and "--impls" in out, out


def test_plain_pytest_collects_the_benchmark_tests():
    """`pytest` (not `python -m pytest`) does not put the cwd on sys.path; pyproject's pythonpath does."""
    exe = pathlib.Path(sys.executable).with_name("pytest")
    assert exe.exists(), f"no pytest script beside {sys.executable}"
    out = run([str(exe), "--collect-only", "-q", "tests/test_roofline.py", "tests/test_memory.py",
               "tests/test_compat_trl.py", "tests/test_benchmark_baselines.py"])
    assert "error" not in out.lower().split("\n")[-2], out[-2000:]
    assert " tests collected" in out or " test collected" in out, out[-2000:]


def test_the_wheel_ships_and_imports_the_kernels(tmp_path):
    """A built (non-editable) wheel carries kdengine/kernels/*.py and imports them from elsewhere."""
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(ROOT)], timeout=600)
    wheel = next((tmp_path / "dist").glob("kdengine-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.startswith("kdengine/kernels/")}
    expected = {f"kdengine/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert expected and expected <= shipped, f"missing from the wheel: {sorted(expected - shipped)}"
    assert not any(n.startswith("kernels/") for n in names), "the wheel must not ship a top-level kernels package"
    target = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)], timeout=600)
    code = "import kdengine.kernels.runtime as r, kdengine.losses as l; print(r.__file__); print(l.__file__)"
    out = run([sys.executable, "-c", code], cwd=tmp_path, PYTHONPATH=str(target))
    for line in out.split():
        assert pathlib.Path(line).resolve().is_relative_to(target.resolve()), out
