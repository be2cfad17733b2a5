"""Command line: ``kdengine <command> [<subcommand>] ...``.

Each command is a ``_add_<name>(subparsers)`` function that declares its flags and sets
``func`` to a small ``_run_<name>(args)``; add a command by writing both and listing the
adder in ``COMMANDS``. Heavy imports happen inside the run functions.
"""

from __future__ import annotations

import argparse
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
    )
    for name, path in paths.items():
        print(f"{name:15s} {path}")
    return 0


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="datasets: synthetic data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    synth = data_sub.add_parser("synth", help="write the synthetic shapes dataset and its tokenizer")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--n-caption", type=int, default=600, help="caption (pre-training) records")
    synth.add_argument("--n-instruct", type=int, default=600, help="instruction records")
    synth.add_argument("--n-eval", type=int, default=120, help="held-out evaluation questions")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--noise", type=float, default=0.3, help="fraction of scenes with a noisy background")
    synth.add_argument("--multi-turn", type=float, default=0.3, help="fraction of multi-turn instruction records")
    synth.add_argument("--text-only", type=float, default=0.05, help="fraction of text-only instruction records")
    synth.add_argument("--vocab-size", type=int, default=2048, help="upper bound for the BPE vocabulary")
    synth.set_defaults(func=_run_data_synth)


# One adder per top-level command; train / eval / demo go here.
COMMANDS = (_add_data,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdengine", description="LLaVA-KD distillation engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
