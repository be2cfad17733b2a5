"""Evaluation: greedy answers from a LLaVA checkpoint, scoring by question type, and
distillation diagnostics (perplexity, KL to the teacher) through the fused losses.

    from kdengine.eval import run_eval
    metrics = run_eval("ckpt/", "eval/questions.jsonl", "out/answers.jsonl",
                       images="images/", answers="eval/answers.jsonl", teacher="teacher/")

Names load on first use (PEP 562), so ``kdengine.eval.checkpoint_files`` imports without torch.
"""

from kdengine.lazy import lazy_getattr

_EXPORTS = {
    "distill_diagnostics": "diagnostics", "heldout_records": "diagnostics",
    "Question": "generate", "generate_answers": "generate", "load_questions": "generate", "prompt_ids": "generate",
    "stop_token_ids": "generate",
    "format_table": "run", "run_eval": "run",
    "QUESTION_TYPES": "scoring", "KeyEntry": "scoring", "extract_choice": "scoring", "load_answer_key": "scoring",
    "normalize_answer": "scoring", "parse_options": "scoring", "parse_yesno": "scoring", "score_answers": "scoring",
    "score_exact": "scoring", "score_mc": "scoring", "score_yesno": "scoring",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
