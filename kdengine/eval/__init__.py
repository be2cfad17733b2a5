"""Evaluation: greedy answers from a LLaVA checkpoint, scoring by question type, and
distillation diagnostics (perplexity, KL to the teacher) through the fused losses.

    from kdengine.eval import run_eval
    metrics = run_eval("ckpt/", "eval/questions.jsonl", "out/answers.jsonl",
                       images="images/", answers="eval/answers.jsonl", teacher="teacher/")
"""

from kdengine.eval.diagnostics import distill_diagnostics, heldout_records
from kdengine.eval.generate import Question, generate_answers, load_questions, prompt_ids, stop_token_ids
from kdengine.eval.run import format_table, run_eval
from kdengine.eval.scoring import (
    QUESTION_TYPES,
    KeyEntry,
    extract_choice,
    load_answer_key,
    normalize_answer,
    parse_options,
    parse_yesno,
    score_answers,
    score_exact,
    score_mc,
    score_yesno,
)

__all__ = [
    "QUESTION_TYPES",
    "KeyEntry",
    "Question",
    "distill_diagnostics",
    "extract_choice",
    "format_table",
    "generate_answers",
    "heldout_records",
    "load_answer_key",
    "load_questions",
    "normalize_answer",
    "parse_options",
    "parse_yesno",
    "prompt_ids",
    "run_eval",
    "score_answers",
    "score_exact",
    "score_mc",
    "score_yesno",
    "stop_token_ids",
]
