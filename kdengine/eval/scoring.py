"""Scoring of free-text answers by question type; unparsable answers are wrong and reported.

Answer key (JSONL), one row per question::

    {"question_id": 0, "answer": "red", "type": "exact"}      # or a list of accepted answers
    {"question_id": 1, "answer": "Yes", "type": "yesno"}
    {"question_id": 2, "answer": "B",   "type": "mc"}

Types:
    exact  normalised exact match (`normalize_answer`, VQA-style); an empty answer is unparsable.
    yesno  `parse_yesno`; accuracy plus POPE's precision, recall, F1 ("yes" is the positive
           class) and yes-ratio. An unparsable answer is neither a yes nor a no: it counts
           against accuracy and recall, never as a positive prediction.
    mc     `extract_choice` finds the option letter in free text; nothing is guessed.

Every type reports ``n``, ``correct``, ``accuracy`` (a fraction), ``unparsable`` and up to a
few ``unparsable_examples``; `score_answers` adds the macro ``average`` over the types present
(Table 2 of LLaVA-KD averages benchmarks the same way) and the micro ``overall``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from kdengine.data.records import jsonl_lines

__all__ = [
    "QUESTION_TYPES",
    "KeyEntry",
    "extract_choice",
    "load_answer_key",
    "normalize_answer",
    "parse_options",
    "parse_yesno",
    "score_answers",
    "score_exact",
    "score_mc",
    "score_yesno",
]

QUESTION_TYPES = ("exact", "yesno", "mc")
MAX_EXAMPLES = 5
DEFAULT_LETTERS = "ABCD"

ARTICLES = frozenset(("a", "an", "the"))
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}


# ----------------------------------------------------------------------------- parsers


def normalize_answer(text: str) -> str:
    """VQA-style normal form: lowercase; thousands commas dropped ("1,000" -> "1000"); periods
    kept only as decimal points; other punctuation -> space; number words -> digits
    ("two" -> "2", "none" -> "0"); articles dropped; single spaces.

    >>> normalize_answer("  The Two red, STARS. ")
    '2 red stars'
    """
    s = text.lower()
    s = re.sub(r"(?<=\d),(?=\d)", "", s)
    s = re.sub(r"\.(?!\d)|(?<!\d)\.", " ", s)
    s = re.sub(r"[^\w\s.]|_", " ", s)
    words = [NUMBER_WORDS.get(w, w) for w in s.split()]
    return " ".join(w for w in words if w not in ARTICLES)


def parse_yesno(text: str) -> str | None:
    """"yes", "no", or None when the answer is neither or both.

    A leading yes / no closed by punctuation or the end decides ("Yes, there is no ..." ->
    "yes"); otherwise the answer must contain exactly one of the words yes / no
    ("I think so, yes." -> "yes"; "yes or no", "Yes and no" -> None).
    """
    m = re.match(r"\s*(yes|no)\s*(?:[.,;:!?]|$)", text, flags=re.IGNORECASE)
    if m:
        return m.group(1).lower()
    found = {w for w in normalize_answer(text).split() if w in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.+?)\s*$", re.MULTILINE)


def parse_options(question: str) -> dict[str, str]:
    """Lettered options written one per line in a question ("A. red", "B) blue", "(C) green")."""
    return {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(question)}


def extract_choice(text: str, options: dict[str, str] | str | None = None) -> str | None:
    """The option letter an answer names, or None if it names none or several.

    Args:
        text: the model's answer.
        options: the question's options ({letter: option text}, e.g. from `parse_options`), or
            just the valid letters as a string; None -> "ABCD".

    Accepted, in order (L is a valid letter; only the first two forms accept lower case):
        the whole answer is a letter: "B", "b", "(B)", "B.", "b)"
        the answer starts with a marked letter: "B. red", "B) red", "(B) red", "B: red"
        the letter follows answer / option / choice: "The answer is B", "Answer: (C)",
            "the correct option is D." (all such letters must agree)
        the answer is exactly one option's text, normalised: "red" when an option is "red"
    A bare capital inside a sentence ("A red circle", "I pick B") is not taken.
    """
    if isinstance(options, dict) and options:
        letters, texts = "".join(sorted(options)), options
    else:
        letters, texts = (options or DEFAULT_LETTERS), {}
    L = f"[{re.escape(letters)}]"
    s = text.strip()
    m = re.fullmatch(rf"\(?\s*({L})\s*\)?\s*[.:)]?", s, flags=re.IGNORECASE)
    if m:
        return m.group(1).upper()
    m = re.match(rf"\(({L})\)|({L})[.:)](?:\s|$)", s)
    if m:
        return m.group(1) or m.group(2)
    keyword = r"(?i:\b(?:answer|option|choice)(?:\s+is)?\s*:?\s*(?:(?:option|choice)\s+)?)"
    keyed = {m.group(1) for m in re.finditer(rf"{keyword}\(?({L})\)?(?!\w)", s)}
    if len(keyed) == 1:
        return keyed.pop()
    if keyed:
        return None
    norm = normalize_answer(s)
    hits = [k for k, v in texts.items() if norm and normalize_answer(v) == norm]
    return hits[0] if len(hits) == 1 else None


# ----------------------------------------------------------------------------- scores


def _base(ids, preds, golds, what: str) -> list:
    if len(preds) != len(golds):
        raise ValueError(f"{what}: {len(preds)} predictions for {len(golds)} answers; expected equal lengths")
    if not preds:
        raise ValueError(f"{what}: no answers to score")
    ids = list(range(len(preds))) if ids is None else list(ids)
    if len(ids) != len(preds):
        raise ValueError(f"{what}: {len(ids)} ids for {len(preds)} predictions; expected equal lengths")
    return ids


def _result(ids, preds, correct: list[bool], parsed: list, max_examples: int) -> dict:
    bad = [i for i, p in enumerate(parsed) if p is None]
    return {
        "n": len(preds),
        "correct": sum(correct),
        "accuracy": sum(correct) / len(preds),
        "unparsable": len(bad),
        "unparsable_examples": [{"question_id": ids[i], "answer": preds[i]} for i in bad[:max_examples]],
    }


def score_exact(preds: list[str], golds: list, ids: list | None = None, max_examples: int = MAX_EXAMPLES) -> dict:
    """Normalised exact match; ``golds[i]`` is a string or a list of accepted strings.
    An empty (after normalisation) answer is unparsable."""
    ids = _base(ids, preds, golds, "score_exact")
    parsed = [normalize_answer(p) or None for p in preds]
    correct = []
    for p, g in zip(parsed, golds):
        accepted = {normalize_answer(a) for a in ([g] if isinstance(g, str) else g)}
        correct.append(p is not None and p in accepted)
    return _result(ids, preds, correct, parsed, max_examples)


def score_yesno(preds: list[str], golds: list[str], ids: list | None = None, max_examples: int = MAX_EXAMPLES) -> dict:
    """Yes/no accuracy plus precision, recall, F1 ("yes" positive; 0 when undefined) and
    yes_ratio = answers parsed as yes / n. ``golds`` must each parse as yes or no."""
    ids = _base(ids, preds, golds, "score_yesno")
    gold = []
    for i, g in zip(ids, golds):
        v = parse_yesno(g)
        if v is None:
            raise ValueError(f"question {i!r}: yes/no gold answer {g!r} is neither yes nor no")
        gold.append(v)
    parsed = [parse_yesno(p) for p in preds]
    correct = [p == g for p, g in zip(parsed, gold)]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(parsed, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(parsed, gold))
    fn = sum(p != "yes" and g == "yes" for p, g in zip(parsed, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out = _result(ids, preds, correct, parsed, max_examples)
    out.update(precision=precision, recall=recall, f1=f1, yes_ratio=(tp + fp) / len(preds))
    return out


def score_mc(
    preds: list[str],
    golds: list[str],
    options: list | None = None,
    ids: list | None = None,
    max_examples: int = MAX_EXAMPLES,
) -> dict:
    """Letter accuracy; ``options[i]`` is question i's options (see `extract_choice`) or None.
    ``golds`` are letters ("B"; surrounding spaces, parentheses and a period are allowed)."""
    ids = _base(ids, preds, golds, "score_mc")
    options = [None] * len(preds) if options is None else list(options)
    if len(options) != len(preds):
        raise ValueError(f"score_mc: {len(options)} option sets for {len(preds)} predictions; expected equal lengths")
    gold = []
    for i, g in zip(ids, golds):
        m = re.fullmatch(r"\s*\(?([A-Z])\)?\.?\s*", g)
        if m is None:
            raise ValueError(f"question {i!r}: multiple-choice gold answer {g!r} is not an option letter A-Z")
        gold.append(m.group(1))
    parsed = [extract_choice(p, o) for p, o in zip(preds, options)]
    correct = [p == g for p, g in zip(parsed, gold)]
    return _result(ids, preds, correct, parsed, max_examples)


# ----------------------------------------------------------------------------- answer key


@dataclass(frozen=True)
class KeyEntry:
    answer: str | tuple[str, ...]
    type: str
    where: str


def iter_question_rows(path: str | os.PathLike, what: str):
    """Yield (row dict, question_id, "file:line") from a LLaVA JSONL file of question-keyed objects
    (questions or answer keys); ValueError names the line of the first malformed row."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    for lineno, line, _, bad_byte in jsonl_lines(path):
        where = f"{path}:{lineno}"
        if bad_byte:
            raise ValueError(f"{where}: {bad_byte} is not UTF-8")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        qid = row.get("question_id")
        if qid is None or isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise ValueError(f"{where}: 'question_id' must be a string or int, got {qid!r}")
        yield row, qid, where


def load_answer_key(path: str | os.PathLike) -> dict:
    """{question_id: KeyEntry} from an answer-key JSONL file; ValueError names the bad line."""
    path = os.fspath(path)
    key = {}
    for row, qid, where in iter_question_rows(path, "answer key"):
        answer, kind = row.get("answer"), row.get("type")
        if qid in key:
            raise ValueError(f"{where}: question_id {qid!r} repeats {key[qid].where}")
        if kind not in QUESTION_TYPES:
            raise ValueError(f"{where}: type={kind!r}; expected one of {QUESTION_TYPES}")
        if isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer) and kind == "exact":
            answer = tuple(answer)
        elif not isinstance(answer, str):
            raise ValueError(f"{where}: 'answer' must be a string (or a list of strings for type 'exact'), "
                             f"got {answer!r}")
        key[qid] = KeyEntry(answer, kind, where)
    if not key:
        raise ValueError(f"{path}: empty answer key")
    return key


def score_answers(questions: list, answers: list[str], key: dict, max_examples: int = MAX_EXAMPLES) -> dict:
    """Score answers to questions against a key, by type.

    Args:
        questions: `kdengine.eval.generate.Question` list (ids, and the mc options in the text).
        answers: one answer string per question, same order.
        key: from `load_answer_key`; must hold every question id.
    Returns:
        {"per_type": {type: scores}, "average": macro mean of the types' accuracies,
         "overall": correct / n, "n": n, "unparsable": total unparsable}
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions; expected one each")
    missing = [q.id for q in questions if q.id not in key]
    if missing:
        raise ValueError(f"answer key has no entry for {len(missing)} question(s), e.g. ids {missing[:5]}")
    per_type = {}
    for kind in QUESTION_TYPES:
        idx = [i for i, q in enumerate(questions) if key[q.id].type == kind]
        if not idx:
            continue
        ids = [questions[i].id for i in idx]
        preds = [answers[i] for i in idx]
        golds = [key[questions[i].id].answer for i in idx]
        if kind == "exact":
            per_type[kind] = score_exact(preds, golds, ids, max_examples)
        elif kind == "yesno":
            per_type[kind] = score_yesno(preds, golds, ids, max_examples)
        else:
            options = [parse_options(questions[i].text) or None for i in idx]
            per_type[kind] = score_mc(preds, golds, options, ids, max_examples)
    n = sum(s["n"] for s in per_type.values())
    return {
        "per_type": per_type,
        "average": sum(s["accuracy"] for s in per_type.values()) / len(per_type),
        "overall": sum(s["correct"] for s in per_type.values()) / n,
        "n": n,
        "unparsable": sum(s["unparsable"] for s in per_type.values()),
    }
