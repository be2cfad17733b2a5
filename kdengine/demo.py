"""The demo: the paper's training-scheme ablation (LLaVA-KD Table 2) in miniature, on a CPU.

    config -> synthetic data -> train (teacher, then one student per row) -> eval each row -> table

Rows come from the config (configs/demo.yaml): the model ``teacher``, and one model
``student_<recipe>`` per student row, labelled by its stages' kinds ("DPT+SFT+DFT"). Every
student row starts from the same weights and spends the same steps on the same data; only the
recipe differs. Without ``ablation`` only the rows in ``MAIN_ROWS`` are trained.

Outputs in ``out``::

    data/                   the synthetic shapes dataset and tokenizer
    <stage>/model           each stage's checkpoint (kdengine train's layout)
    eval/<row>/             answers.jsonl and metrics.json of each row
    results.json            {"seed", "rows": [{row, label, model_dir, per_type, average, ...}], ...}
    results.md              the table (accuracy in %, one column per question type + average)
    results.png             the table as a grouped bar chart (skipped, with a note, without matplotlib)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

__all__ = ["DEFAULT_CONFIG", "MAIN_ROWS", "Row", "demo_config", "format_markdown", "packaged_config", "plot_results", "run_demo"]

def packaged_config(name: str, package_dir: str = os.path.dirname(os.path.abspath(__file__))) -> str:
    """``configs/<name>``: the installed copy (package data in kdengine/configs) if there is one,
    else the source checkout's (an editable install)."""
    installed = os.path.join(package_dir, "configs", name)
    return installed if os.path.isfile(installed) else os.path.join(os.path.dirname(package_dir), "configs", name)


DEFAULT_CONFIG = packaged_config("demo.yaml")
TEACHER = "teacher"
STUDENT_PREFIX = "student_"
MAIN_ROWS = ("pt_sft", "dpt_sft_dft")  # the baseline and LLaVA-KD; --ablation adds every other student


@dataclass
class Row:
    """One line of the table: a model and the stages that trained it."""

    name: str  # "teacher" or the recipe ("pt_sft")
    label: str  # "teacher" or "student PT+SFT"
    model: str  # model name in the config
    stages: list[str]  # its stage names, in order
    steps: dict[str, int | None]  # optimizer steps per dataset (None: epoch-based, unknown before training)

    def model_dir(self, out: str) -> str:
        return os.path.join(out, self.stages[-1], "model")


def demo_config(config: str | os.PathLike = DEFAULT_CONFIG, out: str | None = None, seed: int = 0,
                ablation: bool = False, overrides: list[str] | tuple = ()):
    """Load the demo config with ``out`` and ``seed`` applied; keep the teacher's stages and those of
    the selected student rows. Returns (TrainConfig, rows), the teacher row first."""
    from kdengine.train.config import ConfigError, check, load_config
    from kdengine.train.kinds import KINDS

    sets = list(overrides) + ([f"run.output_dir={out}"] if out is not None else [])
    cfg = load_config(config, sets)
    if TEACHER not in cfg.models:
        raise ConfigError(f"{config}: models has no {TEACHER!r}; expected the teacher model of the demo")
    students = [m[len(STUDENT_PREFIX):] for m in cfg.models if m.startswith(STUDENT_PREFIX)]
    missing = [r for r in MAIN_ROWS if r not in students]
    if missing:
        raise ConfigError(f"{config}: no models {[STUDENT_PREFIX + r for r in missing]}; "
                          f"expected the demo's main rows {list(MAIN_ROWS)}")
    chosen = students if ablation else [r for r in students if r in MAIN_ROWS]
    keep = {TEACHER} | {STUDENT_PREFIX + r for r in chosen}
    read = {st.teacher_cache for st in cfg.stages if st.model in keep}  # teacher caches the kept rows read
    cfg.stages = [st for st in cfg.stages if (st.model in keep if KINDS[st.kind].trains else st.name in read)]

    # One seed moves everything random: the data, the model initialisations and the data order.
    cfg.run.seed = seed
    if cfg.synth is not None:
        cfg.synth.seed = seed
    for spec in cfg.models.values():
        if spec.tiny is not None:
            spec.tiny = dataclasses.replace(spec.tiny, seed=spec.tiny.seed + seed,
                                            vision_seed=spec.tiny.vision_seed + seed)
    check(cfg)

    rows = []
    for name in [TEACHER] + [r for r in students if r in chosen]:
        model = name if name == TEACHER else STUDENT_PREFIX + name
        stages = [st for st in cfg.stages if st.model == model and KINDS[st.kind].trains]  # caches train nothing
        if not stages:
            raise ConfigError(f"{config}: model {model!r} has no stages; expected at least one to train it")
        steps: dict[str, int | None] = {}
        for st in stages:  # None: epoch-based, its step count is only known once the data is loaded
            before = steps.get(st.data, 0)
            steps[st.data] = None if before is None or st.max_steps is None else before + st.max_steps
        label = TEACHER if name == TEACHER else "student " + "+".join(st.kind.upper() for st in stages)
        label += _cache_note(cfg, stages)
        rows.append(Row(name, label, model, [st.name for st in stages], steps))
    budgets = {json.dumps(r.steps, sort_keys=True) for r in rows[1:]}
    if len(budgets) > 1:
        raise ConfigError(f"{config}: the student rows spend different step budgets "
                          f"{ {r.name: r.steps for r in rows[1:]} }; expected the same steps on the same data")
    return cfg, rows


def _cache_note(cfg, stages) -> str:
    """" (cached hidden)" or " (cached top-k, k=8)" for a row whose distilling stages read a teacher cache."""
    from kdengine.train.config import CACHE_KIND

    caches = {st.name: st.cache for st in cfg.stages if st.kind == CACHE_KIND}
    used = [caches[st.teacher_cache] for st in stages if st.teacher_cache in caches]
    if not used:
        return ""
    c = used[0]
    return " (cached hidden)" if c.mode == "hidden" else f" (cached top-k, k={c.k})"


def run_demo(config: str | os.PathLike = DEFAULT_CONFIG, out: str = "runs/demo", seed: int = 0,
             ablation: bool = False, overrides: list[str] | tuple = (), resume: bool = False,
             eval_batch_size: int = 32, max_new_tokens: int = 8, verbose: bool = True) -> dict:
    """Train and evaluate every row, write results.{json,md,png} into ``out``; returns the results dict."""
    t0 = time.time()
    cfg, rows = demo_config(config, out, seed, ablation, overrides)  # a config error comes before torch
    out = cfg.run.output_dir
    if cfg.synth is None:
        raise ValueError(f"{config}: synth is null; the demo evaluates on the synthetic held-out questions")
    from kdengine.eval.run import run_eval
    from kdengine.train.resume import check_resume
    from kdengine.train.run import train

    stage_rows = train(cfg, resume=resume, changes=check_resume(cfg, resume))
    t_train = time.time() - t0

    data = cfg.synth.out
    questions = os.path.join(data, "eval", "questions.jsonl")
    key = os.path.join(data, "eval", "answers.jsonl")
    teacher_dir = rows[0].model_dir(out)
    results = {"seed": seed, "config": os.fspath(config), "out": out, "n_questions": None, "rows": []}
    for row in rows:
        ev = os.path.join(out, "eval", row.name)
        scores = run_eval(row.model_dir(out), questions, os.path.join(ev, "answers.jsonl"),
                          images=os.path.join(data, "images"), answers=key,
                          teacher=None if row.name == TEACHER else teacher_dir,
                          metrics=os.path.join(ev, "metrics.json"),
                          template=cfg.datasets[_instruct(cfg, row)].template, batch_size=eval_batch_size,
                          max_new_tokens=max_new_tokens, progress=False, verbose=False)
        results["n_questions"] = scores["n"]
        diag = scores.get("diagnostics", {})
        results["rows"].append({
            "row": row.name, "label": row.label, "model_dir": row.model_dir(out), "stages": row.stages,
            "steps": row.steps, "per_type": {k: v["accuracy"] for k, v in scores["per_type"].items()},
            "n_per_type": {k: v["n"] for k, v in scores["per_type"].items()}, "average": scores["average"],
            "unparsable": scores["unparsable"], "perplexity": diag.get("perplexity"),
            "kl_response": diag.get("kl_response"),
        })
    # the stages' own seconds survive --resume (a resumed invocation's wall time counts only what it ran)
    results["seconds"] = {"stages": round(sum(r.get("seconds") or 0.0 for r in stage_rows), 1),
                          "train": round(t_train, 1), "total": round(time.time() - t0, 1), "resumed": resume}
    results["measured"] = machine()

    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    table = format_markdown(results)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    note = plot_results(results, os.path.join(out, "results.png"))
    if verbose:
        print("\n" + table)
        print(note or f"chart    {os.path.join(out, 'results.png')}")
        print(f"table    {os.path.join(out, 'results.md')}\nresults  {os.path.join(out, 'results.json')}")
    return results


def _instruct(cfg, row: Row) -> str:
    """The dataset of a row's last stage (its template is the one to answer with)."""
    return next(st.data for st in cfg.stages if st.name == row.stages[-1])


def _types(results: dict) -> list[str]:
    types: list[str] = []
    for r in results["rows"]:
        types += [t for t in r["per_type"] if t not in types]
    return types


def format_markdown(results: dict) -> str:
    """Markdown table: one row per model, accuracy (%) per question type and their average,
    then the answer perplexity and KL(teacher || student) on the held-out answers."""
    types = _types(results)
    n = results["rows"][0]["n_per_type"] if results["rows"] else {}
    head = ["model"] + [f"{t} (n={n.get(t, 0)})" for t in types] + ["average", "answer ppl", "KL to teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in results["rows"]:
        cells = [r["label"]] + [_pct(r["per_type"].get(t)) for t in types] + [f"**{_pct(r['average'])}**"]
        cells += [_num(r.get("perplexity"), 3), _num(r.get("kl_response"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    budget = results["rows"][1]["steps"] if len(results["rows"]) > 1 else {}
    lines.append("")
    sec, where = results.get("seconds", {}), results.get("measured", {})
    time_note = (f"training {sec['stages']} s summed over its stages, this invocation {sec['total']} s"
                 f"{' (resumed: it ran only what was left)' if sec.get('resumed') else ''}"
                 if "stages" in sec else f"wall time {sec.get('total', '?')} s")
    lines.append(f"Seed {results['seed']}; {results.get('n_questions')} held-out questions; "
                 f"every student: {', '.join(f'{v} steps on {k}' for k, v in budget.items())}; {time_note}"
                 + (f"; measured {where['date']} on {where['cpu']}, {where['cores']} cores, "
                    f"{where['torch_threads']} torch thread(s), torch {where['torch']}" if where else "") + ".")
    lines.append("Float results differ across CPU types: the same seed on another machine gives other numbers.")
    return "\n".join(lines)


def machine() -> dict:
    """Where and when a result was measured: date, CPU model, cores, torch threads and version."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def plot_results(results: dict, out_png: str) -> str | None:
    """Grouped bars (question types + average) per row into ``out_png``; returns a note instead
    (and writes nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'kdengine[plot]'): bar chart skipped"
    groups = _types(results) + ["average"]
    rows = results["rows"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 3, 4))
    for i, r in enumerate(rows):
        vals = [100 * (r["per_type"].get(g, 0.0) if g != "average" else r["average"]) for g in groups]
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, vals, width, label=r["label"])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"kdengine demo: training schemes (seed {results['seed']}, {results.get('n_questions')} questions)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return None
