"""Every example in README.md runs (issue 20): a README that its own code refuses is a newcomer's first error.

Each fenced or indented block is taken from the README as it is and run in the way it is meant:
- ```python blocks run with small tensors bound to the names they use; their results are checked
  against plain PyTorch written here (full logits, ``F.cross_entropy``, Gram matrices);
- ```yaml blocks are put in place of configs/tiny.yaml's stages and go through the config checks;
- ```json blocks (the top-k import format) go through the importer's record checks;
- ```bash lines and indented command lines: ``pip install`` names existing extras and files, every
  ``kdengine ...`` parses with the real command line, every ``python -m benchmarks.X`` starts
  (``--help``), every ``python -m pytest FILE`` names files that exist, every config file exists.
A block this test does not know how to run fails it, so a new example needs a runner here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _blocks() -> list[tuple[str, str, int]]:
    """(language, text, line) of every fenced block, and ("indented", text, line) of indented command lines."""
    out, lines, i = [], open(README, encoding="utf-8").read().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
            out.append((m.group(1), "\n".join(lines[i + 1:j]), i + 1))
            i = j + 1
            continue
        if lines[i].startswith("    kdengine ") and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and lines[j].startswith("    "):
                j += 1
            out.append(("indented", "\n".join(ln.strip() for ln in lines[i:j]), i + 1))
            i = j
            continue
        i += 1
    return out


BLOCKS = _blocks()


def _ids(kind: str) -> list:
    return [pytest.param(text, id=f"line{line}") for lang, text, line in BLOCKS if lang == kind]


def test_every_block_has_a_runner():
    langs = {lang for lang, _, _ in BLOCKS}
    assert langs <= {"python", "yaml", "json", "bash", "indented"}, langs
    assert len(BLOCKS) >= 10, BLOCKS  # the parser found the README's examples


# --- python ---------------------------------------------------------------------------------------

def _python_names() -> dict:
    g = torch.Generator().manual_seed(0)
    n, ds, dt, v, vt, b, p, k = 12, 16, 24, 50, 53, 2, 5, 4
    student_lm_head = torch.nn.Linear(ds, v, bias=True)
    teacher_lm_head = torch.nn.Linear(dt, vt, bias=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[:3] = -100
    return dict(
        student_hidden=torch.randn(n, ds, generator=g, requires_grad=True),
        student_weight=torch.randn(v, ds, generator=g, requires_grad=True),
        teacher_hidden=torch.randn(n, dt, generator=g), teacher_weight=torch.randn(vt, dt, generator=g),
        labels=labels,
        hs_vis=torch.randn(b, p, ds, generator=g), ht_vis=torch.randn(b, p, dt, generator=g),
        teacher_ids=torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]),
        teacher_logprobs=torch.log_softmax(torch.randn(n, k, generator=g), -1).sort(-1, descending=True).values,
        student_input=torch.randn(n, ds, generator=g, requires_grad=True), student_lm_head=student_lm_head,
        teacher_input=torch.randn(n, dt, generator=g), teacher_lm_head=teacher_lm_head,
    )


def _gram_cosine_plain(h_s, w_s, h_t, w_t):
    """1 - cos(R_s, R_t) over all images' Gram matrices R = Z Z^T of the visual-token logits Z over the
    shared vocabulary, flattened together (reduction="batch", as LLaVA-KD's code does)."""
    vc = min(len(w_s), len(w_t))
    zs, zt = h_s @ w_s[:vc].T, h_t @ w_t[:vc].T
    return 1 - F.cosine_similarity((zs @ zs.transpose(1, 2)).flatten(), (zt @ zt.transpose(1, 2)).flatten(), dim=0)


@pytest.mark.parametrize("code", _ids("python"))
def test_python_block_runs(code):
    names = _python_names()
    scope = dict(names)
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    if "fused_linear_divergence" in code:
        # the student CE of the fused call equals plain cross-entropy on the full logits
        z_s = (names["student_hidden"] @ names["student_weight"].T).detach().double()
        want_ce = F.cross_entropy(z_s, names["labels"], ignore_index=-100)
        torch.testing.assert_close(scope["ce"].double(), want_ce, rtol=1e-5, atol=1e-6)
        want_rel = _gram_cosine_plain(names["hs_vis"].double(), names["student_weight"].detach().double(),
                                      names["ht_vis"].double(), names["teacher_weight"].double())
        torch.testing.assert_close(scope["rel"].double(), want_rel, rtol=1e-4, atol=1e-6)
        assert scope["div"].ndim == 0 and torch.isfinite(scope["div"]) and scope["div"] >= 0
    elif "LigerFusedLinearJSDLoss(" in code:
        loss = scope["loss"]
        assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
        loss.backward()
        assert names["student_input"].grad is not None and torch.isfinite(names["student_input"].grad).all()
    elif "GKDTrainer" in code:
        from trl.experimental.gkd import GKDTrainer

        assert issubclass(scope["GKDTrainer"], GKDTrainer)
    else:
        pytest.fail(f"no check for this README python block:\n{code}")


# --- yaml -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", _ids("yaml"))
def test_yaml_block_is_a_valid_config(text, tmp_path):
    import yaml

    from kdengine.train.config import load_config

    tree = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml"), encoding="utf-8"))
    tree.update(yaml.safe_load(text))
    tree["run"]["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "readme.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(str(path), check_paths=False)
    assert [s.name for s in cfg.stages] == [s["name"] for s in yaml.safe_load(text)["stages"]]


# --- json: the top-k import format ---------------------------------------------------------------

@pytest.mark.parametrize("text", _ids("json"))
def test_json_block_passes_the_importer_checks(text):
    from kdengine.cache.importer import FIELDS, _check_topk, _parse

    rec = _parse(" ".join(text.split()), "README.md")
    assert set(FIELDS) <= set(rec)
    ids, lps = _check_topk(rec, len(rec["positions"]), k=3, vocab=100, where="README.md")
    assert ids.tolist() == rec["top_ids"]
    # the checks above must be able to refuse: the first version of this example summed to 1.037
    bad = {**rec, "top_logprobs": [[-0.1, -2.5, -3.0]] + rec["top_logprobs"][1:]}
    from kdengine.cache.format import CacheError

    with pytest.raises(CacheError, match="probabilities sum to 1.03"):
        _check_topk(bad, len(bad["positions"]), k=3, vocab=100, where="README.md")


# --- commands -------------------------------------------------------------------------------------

def _commands() -> list:
    out = []
    for lang, text, line in BLOCKS:
        if lang not in ("bash", "indented"):
            continue
        joined = re.sub(r"\\\n\s*", " ", text)
        for cmd in joined.splitlines():
            cmd = cmd.split(" #")[0].strip()
            if cmd and not cmd.startswith("#"):
                for part in cmd.split(" && "):
                    out.append(pytest.param(part.strip(), id=f"line{line}:{part.strip()[:40]}"))
    return out


def _run_command(words: list[str]) -> None:
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[:2] == ["pip", "install"]:
        import tomllib

        extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
        for w in words[2:]:
            m = re.search(r"\[([\w,]+)\]", w)
            if m:
                assert set(m.group(1).split(",")) <= set(extras), (w, sorted(extras))
        for flag, value in zip(words, words[1:]):
            if flag == "-c":
                assert os.path.isfile(os.path.join(ROOT, value)), value
        return
    if words[0] == "deepspeed":
        words = ["kdengine"] + words[words.index("kdengine.cli") + 1:]
    if words[0] == "kdengine":
        from kdengine.cli import build_parser

        args = build_parser().parse_args(words[1:])
        for w in words[1:]:
            if w.startswith("configs/") and not w.startswith("configs/x."):  # configs/x.yaml: "your config"
                assert os.path.isfile(os.path.join(ROOT, w)), w
        assert callable(args.func)
        return
    if words[:3] == ["python", "-m", "pytest"]:
        files = [w for w in words[3:] if w.startswith("tests/")]
        assert all(os.path.isfile(os.path.join(ROOT, f)) for f in files), files
        return
    if words[:2] == ["python", "-m"] and words[2].startswith("benchmarks."):
        assert words[2] in BENCHMARKS  # test_named_benchmark_starts runs it
        return
    pytest.fail(f"no runner for the README command {' '.join(words)!r}")


@pytest.mark.parametrize("cmd", _commands())
def test_command_runs_or_parses(cmd):
    _run_command(shlex.split(cmd))


BENCHMARKS = sorted(set(re.findall(r"python -m (benchmarks\.\w+)", open(README, encoding="utf-8").read())))


@pytest.mark.parametrize("module", BENCHMARKS)
def test_named_benchmark_starts(module):
    """Every ``python -m benchmarks.X`` the README names, in a block or in the text, starts (its --help)."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr[-2000:]
