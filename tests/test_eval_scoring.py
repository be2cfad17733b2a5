"""kdengine.eval.scoring on hand-written answers; every expected value is worked out by hand."""

import json

import pytest

from kdengine.eval.generate import Question
from kdengine.eval.scoring import (
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

MC_QUESTION = "What color is the star?\nA. red\nB. blue\nC. green\nD. light blue\nAnswer with the option's letter."
MC_OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "light blue"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Red", "red"),
        ("  The Two red, STARS. ", "2 red stars"),
        ("an apple!", "apple"),
        ("3.5", "3.5"),
        ("It costs 1,000.", "it costs 1000"),
        ("none", "0"),
        ("left-side", "left side"),
        ("...", ""),
    ],
    ids=["case", "article-number-punct", "article-an", "decimal", "thousands", "none-is-zero", "hyphen", "only-punct"],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("Yes, there is no other shape.", "yes"),
        ("I think so, yes", "yes"),
        ("There is a red star: no", "no"),
        ("yes or no", None),
        ("I cannot tell", None),
        ("", None),
        ("eyes", None),
    ],
    ids=["yes", "no-period", "first-word-wins", "single-yes-inside", "single-no-inside", "both", "neither", "empty",
         "substring"],
)
def test_parse_yesno(text, expected):
    assert parse_yesno(text) == expected


def test_parse_options():
    assert parse_options(MC_QUESTION) == MC_OPTIONS
    assert parse_options("Pick one:\n(A) cat\nB) dog") == {"A": "cat", "B": "dog"}
    assert parse_options("What colour is it?") == {}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B) blue", "B"),
        ("B. blue", "B"),
        ("(C) green", "C"),
        ("D: light blue", "D"),
        ("The answer is B", "B"),
        ("The answer is B, not C.", "B"),
        ("Answer: (C)", "C"),
        ("The correct option is D.", "D"),
        ("the answer is option A", "A"),
        ("green", "C"),
        ("Light blue.", "D"),
        ("a red circle", None),
        ("A red circle", None),
        ("I pick B", None),
        ("A or B", None),
        ("The answer is A or the answer is B", None),
        ("E", None),
        ("purple", None),
        ("", None),
    ],
    ids=lambda v: repr(v) if isinstance(v, str) else str(v),
)
def test_extract_choice(text, expected):
    assert extract_choice(text, MC_OPTIONS) == expected


def test_extract_choice_letters_only():
    assert extract_choice("E.", "ABCDE") == "E"
    assert extract_choice("E.") is None  # default letters A-D
    assert extract_choice("blue") is None  # no option texts to match


def test_score_exact_counts_empty_as_unparsable():
    preds = ["Red.", "two", "the left", "", "blue", "3 "]
    golds = ["red", "2", "left", "3", "green", ["three", "3"]]
    s = score_exact(preds, golds, ids=[10, 11, 12, 13, 14, 15])
    # correct: 10 (red), 11 (2), 12 (left), 15 (3 in list); wrong: 13 (empty), 14 (blue != green)
    assert s == {
        "n": 6,
        "correct": 4,
        "accuracy": 4 / 6,
        "unparsable": 1,
        "unparsable_examples": [{"question_id": 13, "answer": ""}],
    }


def test_score_yesno_pope_metrics():
    preds = ["Yes", "No.", "yes, there is", "No, there is not.", "I cannot tell", "Yes", "no", "Yes and no"]
    golds = ["yes", "no", "No", "Yes", "yes", "yes", "no", "no"]
    # parsed:  yes   no    yes    no     None   yes   no    None
    # correct: 1     1     0      0      0      1     1     0      -> 4 / 8
    # TP = #{pred yes, gold yes} = 2 (0, 5); FP = #{pred yes, gold no} = 1 (2)
    # FN = #{pred not yes, gold yes} = 2 (3, 4: the unparsable 4 is a miss)
    s = score_yesno(preds, golds)
    assert (s["n"], s["correct"], s["unparsable"]) == (8, 4, 2)
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(4 / 7)  # 2 * (2/3) * (1/2) / (2/3 + 1/2)
    assert s["yes_ratio"] == pytest.approx(3 / 8)
    assert s["unparsable_examples"] == [{"question_id": 4, "answer": "I cannot tell"},
                                        {"question_id": 7, "answer": "Yes and no"}]


def test_score_yesno_no_positive_predictions_gives_zero_not_nan():
    s = score_yesno(["no", "no"], ["yes", "no"])
    assert (s["precision"], s["recall"], s["f1"], s["yes_ratio"], s["accuracy"]) == (0.0, 0.0, 0.0, 0.0, 0.5)


def test_score_mc_unparsable_is_wrong_and_reported():
    preds = ["B", "The answer is (C).", "blue", "I am not sure", "A red one", "D. light blue"]
    golds = ["B", "C", "A", "A", "A", "(D)"]
    options = [MC_OPTIONS] * 5 + [None]
    # parsed: B, C, B (option text), None, None, D -> correct 0, 1, 5 -> 3 / 6
    s = score_mc(preds, golds, options, ids=["q0", "q1", "q2", "q3", "q4", "q5"])
    assert (s["n"], s["correct"], s["unparsable"]) == (6, 3, 2)
    assert s["accuracy"] == pytest.approx(0.5)
    assert [e["question_id"] for e in s["unparsable_examples"]] == ["q3", "q4"]


def test_examples_are_capped():
    s = score_mc(["?"] * 9, ["A"] * 9, max_examples=3)
    assert s["unparsable"] == 9 and len(s["unparsable_examples"]) == 3


def test_bad_gold_answers_are_errors():
    with pytest.raises(ValueError, match=r"question 0: yes/no gold answer 'maybe' is neither yes nor no"):
        score_yesno(["yes"], ["maybe"])
    with pytest.raises(ValueError, match=r"question 'q': multiple-choice gold answer 'blue' is not an option letter"):
        score_mc(["B"], ["blue"], ids=["q"])
    with pytest.raises(ValueError, match=r"2 predictions for 1 answers"):
        score_exact(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no answers to score"):
        score_exact([], [])


def _key_file(tmp_path, rows):
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_answers_by_type_with_average(tmp_path):
    rows = [
        {"question_id": 0, "answer": "red", "type": "exact"},
        {"question_id": 1, "answer": "2", "type": "exact"},
        {"question_id": 2, "answer": "Yes", "type": "yesno"},
        {"question_id": 3, "answer": "No", "type": "yesno"},
        {"question_id": 4, "answer": "B", "type": "mc"},
    ]
    key = load_answer_key(_key_file(tmp_path, rows))
    questions = [Question(i, MC_QUESTION if i == 4 else f"q{i}", None, f"f:{i}") for i in range(5)]
    answers = ["Red", "three", "yes", "Yes", "blue"]
    m = score_answers(questions, answers, key)
    # exact 1/2, yesno 1/2, mc 1/1 ("blue" is option B's text)
    assert set(m["per_type"]) == {"exact", "yesno", "mc"}
    assert [m["per_type"][t]["accuracy"] for t in ("exact", "yesno", "mc")] == [0.5, 0.5, 1.0]
    assert m["average"] == pytest.approx(2 / 3)
    assert m["overall"] == pytest.approx(3 / 5)
    assert (m["n"], m["unparsable"]) == (5, 0)


def test_answer_key_errors(tmp_path):
    with pytest.raises(ValueError, match=r"answers.jsonl:2: type='open'; expected one of \('exact', 'yesno', 'mc'\)"):
        load_answer_key(_key_file(tmp_path, [{"question_id": 0, "answer": "x", "type": "exact"},
                                              {"question_id": 1, "answer": "x", "type": "open"}]))
    with pytest.raises(ValueError, match=r"answers.jsonl:2: question_id 0 repeats .*answers.jsonl:1"):
        load_answer_key(_key_file(tmp_path, [{"question_id": 0, "answer": "x", "type": "exact"}] * 2))
    key = load_answer_key(_key_file(tmp_path, [{"question_id": 0, "answer": "x", "type": "exact"}]))
    with pytest.raises(ValueError, match=r"answer key has no entry for 1 question\(s\), e.g. ids \[7\]"):
        score_answers([Question(7, "q", None, "f:1")], ["x"], key)
