"""The eval job: answer a question file, score it, run the diagnostics, write metrics.json.

    parse (the CLI) -> check inputs -> load student -> generate -> score -> diagnose -> write

Outputs:
    answers JSONL  {"question_id", "prompt", "text", "model_id"} per question, in file order
                   (LLaVA's answer-file layout; "prompt" is the question text)
    metrics.json   {"model", "questions", "n_questions", "settings", and with an answer key
                   "per_type", "average", "overall", "unparsable"; with held-out data
                   "diagnostics"}; accuracies are fractions in [0, 1]
"""

from __future__ import annotations

import json
import os

__all__ = ["format_table", "run_eval"]


def run_eval(
    model: str | os.PathLike,
    questions: str | os.PathLike,
    out: str | os.PathLike,
    images: str | os.PathLike | None = None,
    answers: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
    heldout: str | os.PathLike | None = None,
    metrics: str | os.PathLike | None = None,
    template: str = "chat",
    batch_size: int = 8,
    max_new_tokens: int = 32,
    pad_to_square: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    """Evaluate a saved LLaVA checkpoint.

    Args:
        model: checkpoint folder (``save_pretrained`` of model and processor).
        questions: LLaVA question JSONL ({question_id, image, text}).
        out: answers JSONL to write.
        images: folder the question (and held-out) image paths are relative to.
        answers: answer key JSONL ({question_id, answer, type}); enables scoring, and the
            diagnostics on the questions with their key answers when ``heldout`` is not given.
        teacher: teacher checkpoint folder; adds the KL terms to the diagnostics.
        heldout: LLaVA conversation file (.json / .jsonl) for the diagnostics instead.
        metrics: metrics JSON path; default ``metrics.json`` beside ``out``.
        template: the training template ("chat", "vicuna" or "plain").
        batch_size, max_new_tokens, pad_to_square: see `generate_answers`.
        verbose: print the table.
    Returns:
        the metrics dict written to ``metrics``.
    """
    from kdengine.data.templates import TEMPLATES
    from kdengine.eval.checkpoint_files import check_checkpoint_dir
    from kdengine.eval.generate import generate_answers, image_path, load_questions, write_jsonl
    from kdengine.eval.scoring import load_answer_key, score_answers

    # Inputs are checked before any model loads.
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r}: expected one of {TEMPLATES}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size}, max_new_tokens={max_new_tokens}: expected both >= 1")
    for what, path in (("model", model), ("teacher", teacher)):
        if path is not None:
            check_checkpoint_dir(path, what)
    if images is not None and not os.path.isdir(images):
        raise FileNotFoundError(f"image folder not found: {images}")
    if teacher is not None and answers is None and heldout is None:
        raise ValueError("teacher given without answers or heldout: the KL diagnostics need held-out answers")
    if heldout is not None and not os.path.isfile(heldout):
        raise FileNotFoundError(f"held-out file not found: {heldout}")
    qs = load_questions(questions)
    for q in qs:
        path = image_path(q, images)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{q.where}: image of question {q.id!r} not found: {path}")
    key = load_answer_key(answers) if answers is not None else None
    if key is not None:
        missing = [q.id for q in qs if q.id not in key]
        if missing:
            raise ValueError(f"answer key {answers} has no entry for {len(missing)} question(s), e.g. {missing[:5]}")
    if metrics is None:
        metrics = os.path.join(os.path.dirname(os.path.abspath(out)), "metrics.json")
    metrics_path = os.fspath(metrics)

    from kdengine.model import load_llava

    student, processor = load_llava(model)
    texts = generate_answers(student, processor, qs, images, template, batch_size, max_new_tokens,
                             pad_to_square, progress)
    model_id = os.path.basename(os.path.normpath(os.fspath(model)))
    write_jsonl(
        [{"question_id": q.id, "prompt": q.text, "text": t, "model_id": model_id} for q, t in zip(qs, texts)], out
    )

    result = {
        "model": os.fspath(model),
        "questions": os.fspath(questions),
        "answers": os.fspath(out),
        "n_questions": len(qs),
        "settings": {"template": template, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                     "pad_to_square": pad_to_square},
    }
    if key is not None:
        result["answer_key"] = os.fspath(answers)
        result.update(score_answers(qs, texts, key))

    if heldout is not None or key is not None:
        from kdengine.data.records import load_records
        from kdengine.eval.diagnostics import distill_diagnostics, heldout_records

        if heldout is not None:
            records, _ = load_records(heldout, images)
        else:
            records = heldout_records(qs, key, images)
        teacher_model = None
        if teacher is not None:
            from kdengine.model import check_compatible

            teacher_model, teacher_processor = load_llava(teacher)
            check_compatible(teacher_model, teacher_processor, student, processor)
        diag = distill_diagnostics(student, processor, records, teacher_model, template, batch_size,
                                   pad_to_square, progress=progress)
        diag["source"] = os.fspath(heldout) if heldout is not None else os.fspath(answers)
        if teacher is not None:
            diag["teacher"] = os.fspath(teacher)
        result["diagnostics"] = diag

    os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
    with open(metrics_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    if verbose:
        print(format_table(result))
        print(f"answers  {out}\nmetrics  {metrics_path}")
    return result


def format_table(metrics: dict) -> str:
    """Plain-text table of a metrics dict: one row per question type, the average, the
    diagnostics, then a few unparsable answers."""
    lines = []
    per_type = metrics.get("per_type")
    if per_type:
        lines.append(f"{'type':8s} {'n':>5s} {'accuracy':>9s} {'unparsable':>11s}")
        for kind, s in per_type.items():
            row = f"{kind:8s} {s['n']:5d} {100 * s['accuracy']:8.1f}% {s['unparsable']:11d}"
            if kind == "yesno":
                row += (f"   P {100 * s['precision']:.1f}  R {100 * s['recall']:.1f}  F1 {100 * s['f1']:.1f}"
                        f"  yes {100 * s['yes_ratio']:.1f}%")
            lines.append(row)
        lines.append(f"{'average':8s} {metrics['n']:5d} {100 * metrics['average']:8.1f}% {metrics['unparsable']:11d}"
                     f"   (overall {100 * metrics['overall']:.1f}%)")
    else:
        lines.append(f"{metrics.get('n_questions', 0)} questions answered (no answer key: not scored)")
    diag = metrics.get("diagnostics")
    if diag:
        lines.append(f"perplexity {diag['perplexity']:.3f} on {diag['response_tokens']} response tokens "
                     f"({diag['samples']} held-out samples)")
        if "kl_response" in diag:
            lines.append(f"KL(teacher || student): response {diag['kl_response']:.4f}, "
                         f"visual {diag['kl_visual']:.4f} ({diag['visual_tokens']} visual tokens)")
    for kind, s in (per_type or {}).items():
        for ex in s["unparsable_examples"]:
            lines.append(f"unparsable {kind} {ex['question_id']!r}: {ex['answer']!r:.80}")
    return "\n".join(lines)
