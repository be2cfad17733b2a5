"""Command line: ``kdengine <command> [<subcommand>] ...``.

Each command is a ``_add_<name>(subparsers)`` function that declares its flags and sets
``func`` to a small ``_run_<name>(args)``; add a command by writing both and listing the
adder in ``COMMANDS``. Heavy imports happen inside the run functions.
"""

from __future__ import annotations

import argparse
import os
import sys


def _run_data_synth(args: argparse.Namespace) -> int:
    from kdengine.data.synth import synthesize

    paths = synthesize(
        args.out,
        seed=args.seed,
        n_caption=args.n_caption,
        n_instruct=args.n_instruct,
        n_eval=args.n_eval,
        image_size=args.image_size,
        noise=args.noise,
        multi_turn=args.multi_turn,
        text_only=args.text_only,
        vocab_size=args.vocab_size,
        questions=args.questions,
        overwrite=args.overwrite,
    )
    for name, path in paths.items():
        print(f"{name:15s} {path}")
    return 0


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="datasets: synthetic data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    synth = data_sub.add_parser("synth", help="write the synthetic shapes dataset and its tokenizer")
    synth.add_argument("--out", required=True, help="output folder (new or empty, unless --overwrite)")
    synth.add_argument("--overwrite", action="store_true", help="replace a non-empty --out whole")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--n-caption", type=int, default=600, help="caption (pre-training) records")
    synth.add_argument("--n-instruct", type=int, default=600, help="instruction records")
    synth.add_argument("--n-eval", type=int, default=120, help="held-out evaluation questions")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--noise", type=float, default=0.3, help="fraction of scenes with a noisy background")
    synth.add_argument("--multi-turn", type=float, default=0.3, help="fraction of multi-turn instruction records")
    synth.add_argument("--text-only", type=float, default=0.05, help="fraction of text-only instruction records")
    synth.add_argument("--vocab-size", type=int, default=2048, help="upper bound for the BPE vocabulary")
    synth.add_argument("--questions", default="mixed",
                       help="question set: mixed or basic (kdengine.data.synth.QUESTION_SETS)")
    synth.set_defaults(func=_run_data_synth)


def _run_eval(args: argparse.Namespace) -> int:
    from kdengine.eval.run import run_eval

    run_eval(
        args.model,
        args.questions,
        args.out,
        images=args.images,
        answers=args.answers,
        teacher=args.teacher,
        heldout=args.heldout,
        metrics=args.metrics,
        template=args.template,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        pad_to_square=args.pad_to_square,
    )
    return 0


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="answer a question file with a checkpoint, score it, diagnose distillation")
    ev.add_argument("--model", required=True, help="checkpoint folder (save_pretrained of model + processor)")
    ev.add_argument("--questions", required=True, help="LLaVA question JSONL: {question_id, image, text}")
    ev.add_argument("--out", required=True, help="answers JSONL to write")
    ev.add_argument("--images", default=None, help="folder the image paths are relative to")
    ev.add_argument("--answers", default=None, help="answer key JSONL {question_id, answer, type}: score and diagnose")
    ev.add_argument("--teacher", default=None, help="teacher checkpoint folder: adds KL(teacher || student)")
    ev.add_argument("--heldout", default=None, help="LLaVA conversation .json/.jsonl for the diagnostics")
    ev.add_argument("--metrics", default=None, help="metrics JSON path (default: metrics.json beside --out)")
    ev.add_argument("--template", default="chat", choices=("plain", "chat", "vicuna"), help="the training template")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--pad-to-square", action="store_true", help="pad images to squares, as in LLaVA-1.5 training")
    ev.set_defaults(func=_run_eval)


def _run_train(args: argparse.Namespace) -> int:
    from kdengine.train.config import load_config

    cfg = load_config(args.config, args.set)  # a ConfigError comes before torch, a model, a dataset or DeepSpeed
    from kdengine.train.resume import check_resume

    changes = check_resume(cfg, args.resume)  # the run directory's and --resume's before any model too
    from kdengine.train.run import train

    train(cfg, resume=args.resume, changes=changes)
    return 0


def _add_train(sub) -> None:
    train = sub.add_parser(
        "train",
        help="run the stages of a training config (pt, sft, dpt, dft) on DeepSpeed",
        description="Run a pipeline of stages from a YAML config; without CONFIG the embedded tiny default "
        "(synthetic data, tiny teacher and student, CPU). Several GPUs or nodes: "
        "deepspeed --no_local_rank [--hostfile FILE] --module kdengine.cli train CONFIG.",
    )
    train.add_argument("config", nargs="?", default=None, help="YAML config (default: the embedded tiny pipeline)")
    _add_overrides(
        train,
        set_help="override a config value, e.g. --set stages.student_dft.lr=1e-4 --set run.output_dir=runs/x "
        "(repeatable)",
        resume_help="continue the run in run.output_dir: skip finished stages, "
        "restart the unfinished one from its last checkpoint",
    )
    train.set_defaults(func=_run_train)


def _add_overrides(parser: argparse.ArgumentParser, set_help: str, resume_help: str) -> None:
    """``--set KEY=VALUE`` (repeatable) and ``--resume``, shared by the commands that train."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    parser.add_argument("--resume", action="store_true", help=resume_help)


def _run_demo(args: argparse.Namespace) -> int:
    from kdengine.demo import DEFAULT_CONFIG, run_demo

    run_demo(args.config or DEFAULT_CONFIG, out=args.out, seed=args.seed, ablation=args.ablation,
             overrides=args.set, resume=args.resume)
    return 0


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="the paper's Table 2 in miniature: teacher, student PT+SFT, student DPT+SFT+DFT on synthetic data (CPU)",
        description="Generate the synthetic data, train a tiny teacher (pt, sft) and one tiny student per recipe "
        "with the same data and step budget, evaluate them all on the held-out questions, and write "
        "results.md, results.json and results.png into --out.",
    )
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed for the data, the model initialisations and the data order")
    demo.add_argument("--ablation", action="store_true",
                      help="add the rows PT+DFT, DPT+SFT, DPT+DFT and DPT+SFT+DFT from a teacher cache (hidden, top-k k=8)")
    demo.add_argument("--config", default=None, help="demo config (default: configs/demo.yaml)")
    _add_overrides(demo, set_help="override a config value, as in kdengine train (repeatable)",
                   resume_help="continue an interrupted demo in --out")
    demo.set_defaults(func=_run_demo)


TEACHER_CACHE_USAGE = """\
write a stage's teacher cache alone, or import one from a server.

    kdengine teacher-cache CONFIG --stage NAME [--set KEY=VALUE ...]
        run the teacher_cache stage NAME of a training config (the teacher's weights come from
        the earlier stages finished in run.output_dir, else from its model spec); resumes an
        interrupted write.
    kdengine teacher-cache import FILE.jsonl --config CONFIG --stage NAME --teacher-name NAME
        convert per-position top-k log-probabilities (format: kdengine.cache.importer) into the
        cache the dpt/dft stage NAME reads (its ``teacher_cache:`` path, or the cache stage it
        names), with k, temperature and dtype from that cache stage's ``cache:`` settings or --k,
        --temperature, --dtype.
"""


def _run_teacher_cache(args: argparse.Namespace) -> int:
    from kdengine.train.cache_commands import run_teacher_cache

    return run_teacher_cache(args)


def _add_teacher_cache(sub) -> None:
    p = sub.add_parser("teacher-cache", help="write a teacher cache (hidden states or top-k) or import one",
                       description=TEACHER_CACHE_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="a training config (YAML), or 'import'")
    p.add_argument("file", nargs="?", default=None, help="with import: the JSONL of top-k log-probabilities")
    p.add_argument("--stage", required=True, help="the teacher_cache stage to run (import: the stage reading it)")
    p.add_argument("--config", default=None, help="with import: the training config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--teacher-name", default=None, help="with import: what produced the log-probabilities")
    p.add_argument("--k", type=int, default=None, help="with import: entries per position (default: cache settings)")
    p.add_argument("--temperature", type=float, default=None, help="with import: their softmax temperature")
    p.add_argument("--dtype", default=None, choices=("float16", "float32"), help="with import: stored dtype")
    p.set_defaults(func=_run_teacher_cache)


def _run_plan(args: argparse.Namespace) -> int:
    from kdengine.plan.gpus import parse_gpu
    from kdengine.train.config import load_config, read_deepspeed_json, zero_stage

    gpu = parse_gpu(args.gpu) if args.gpu else None  # a bad --gpu and a bad config say so before torch
    if args.world_size < 1:
        raise ValueError(f"--world-size {args.world_size}: expected an integer >= 1")
    cfg = load_config(args.config, args.set, world_size=args.world_size, check_paths=False)
    import json

    from kdengine.plan.estimate import Setup
    from kdengine.plan.report import format_plan, plan_config

    engine = cfg.engine
    ds = read_deepspeed_json(engine.deepspeed_config).get("zero_optimization", {}) if engine.deepspeed_config else {}
    setup = Setup(device=args.device, world_size=args.world_size, zero=zero_stage(engine), ds=ds,
                  checkpointing=engine.activation_checkpointing, shard_teacher=engine.shard_teacher)
    rows = plan_config(cfg, setup, gpu[1] if gpu else None)
    if args.json:
        print(json.dumps({"device": setup.device, "world_size": setup.world_size, "zero_stage": setup.zero,
                          "gpu": gpu[0] if gpu else None, "gpu_bytes": gpu[1] if gpu else None,
                          "predicted": True, "stages": rows}, indent=1))
    else:
        print(format_plan(rows, setup, gpu))
    return 0


def _add_plan(sub) -> None:
    plan = sub.add_parser(
        "plan",
        help="will it fit? per-stage predicted peak memory of a training config on a GPU (no weights loaded)",
        description="Predict each stage's peak memory per rank: parameters, gradients and optimizer states under "
        "the configured ZeRO stage, the teacher, and one training step run on the meta device (activations, "
        "losses) with and without activation checkpointing; then a verdict against --gpu.",
    )
    plan.add_argument("config", nargs="?", default=None, help="YAML config (default: the embedded tiny pipeline)")
    plan.add_argument("--gpu", default=None, help="a GPU name (A100-40GB, A100-80GB, H100-80GB, H200-141GB, L4-24GB, "
                      "RTX4090-24GB, MI300X-192GB) or a size such as 24GB")
    plan.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (ZeRO shards over them)")
    plan.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                      help="cuda: bf16 on GPUs with DeepSpeed (default); cpu: fp32, as kdengine train on a CPU")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value as in kdengine train, e.g. "
                      "--set models.teacher.language_model=configs/models/Qwen1.5-4B (repeatable)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_run_plan)


# One adder per top-level command; train / eval / demo go here.
COMMANDS = (_add_data, _add_eval, _add_train, _add_demo, _add_plan, _add_teacher_cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdengine", description="LLaVA-KD distillation engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _user_errors(command: str) -> dict[type[Exception], str]:
    """{exception type: label} of the bad input to ``command`` (a value, a file, a line, a sample) that
    `main` reports in one line with exit code 2; the messages name the value and what was expected."""
    if command in ("train", "demo"):
        # Only the modules already imported: an error of another cannot have been raised, and importing
        # kdengine.train.batches (torch) would make a config error wait seconds for its one line.
        errors = {("kdengine.train.config", "ConfigError"): "config error",
                  ("kdengine.data.records", "BadSample"): "error",
                  ("kdengine.train.batches", "TrainInputError"): "error",
                  ("kdengine.cache.manifest", "CacheError"): "error"}
        return {getattr(sys.modules[module], name): label for (module, name), label in errors.items()
                if module in sys.modules}
    if command == "plan":
        from kdengine.train.config import ConfigError

        return {ConfigError: "config error", ValueError: "error"}
    if command in ("data", "eval"):
        return {ValueError: "error", FileNotFoundError: "error"}
    return {}


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside a stage's step loop (loading, evaluating): one line, no traceback
        if _is_main_rank():
            print(f"kdengine {args.command}: interrupted (Ctrl-C); a training run continues with --resume "
                  "from its last checkpoint", file=sys.stderr)
        return 130
    except Exception as err:
        stop = sys.modules.get("kdengine.train.stop")  # not imported (torch): nothing was preempted
        if args.command in ("train", "demo") and stop is not None:
            if isinstance(err, stop.Preempted):  # the checkpoint is written, --resume loses nothing
                if _is_main_rank():
                    print(f"kdengine {args.command}: {err}", file=sys.stderr)
                return err.exit_code
        label = next((lab for t, lab in _user_errors(args.command).items() if isinstance(err, t)), None)
        if label is None:
            raise
        # Every rank meets the same bad config or data file: rank 0 says it. A sample that fails while
        # training (a lazily decoded image) is met by one rank only: that rank says it.
        if _is_main_rank() or getattr(err, "rank_local", False):
            print(f"kdengine {args.command}: {label}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
