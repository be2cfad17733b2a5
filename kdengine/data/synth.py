"""Synthetic shape scenes in LLaVA formats, plus a tokenizer trained on them.

``synthesize(out_dir, seed)`` writes::

    out_dir/images/{caption,instruct,eval}/NNNNNN.png   pillow-drawn scenes, 1-4 shapes
    out_dir/pretrain.json          captions, 558k-like: [{id, image, conversations}]
    out_dir/instruct.json          instructions, mix665k-like: colour, count, yes/no presence,
                                   relative position, lettered multiple choice (``questions``
                                   picks a set, see QUESTION_SETS); some multi-turn, a few
                                   text-only records
    out_dir/eval/questions.jsonl   {question_id, image, text, category}   (held-out scenes)
    out_dir/eval/answers.jsonl     {question_id, answer, type}, type in exact | yesno | mc
    out_dir/tokenizer/             byte-level BPE trained on all the text above
    out_dir/meta.json              seed, sizes and file names

``out_dir`` is written whole or not at all: into a temporary sibling, renamed at the end;
a non-empty ``out_dir`` is refused unless ``overwrite=True``, and then replaced whole (no
stale image of the old dataset stays beside the new ones).

Image paths are relative to ``out_dir/images``. Same seed and sizes -> byte-identical
JSON files and identical image pixels; each split has its own random stream, so changing
one split's size leaves the others unchanged.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .templates import VICUNA_SYSTEM
from .tokenizer import train_tokenizer

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 200, 30),
    "purple": (135, 55, 185),
    "orange": (240, 130, 25),
}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SHORT = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is shown in this picture?",
    "Give a short caption for the image.",
    "Summarize the picture in one sentence.",
)
# Text-only instruction turns (mix665k also holds text-only conversations).
TEXT_QA = (
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("How many corners does a diamond have?", "4"),
    ("How many points does a star have?", "5"),
    ("Does a circle have corners?", "No"),
    ("Which has more sides, a square or a triangle?", "square"),
)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    row: int  # 0..2, grid cell of the centre
    col: int  # 0..2
    cx: float
    cy: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def a_name(self) -> str:
        return f"{article(self.color)} {self.name}"

    @property
    def where(self) -> str:
        if self.row == 1 and self.col == 1:
            return "in the center"
        if self.row == 1:
            return f"on the {COLS[self.col]}"
        if self.col == 1:
            return f"at the {ROWS[self.row]}"
        return f"at the {ROWS[self.row]} {COLS[self.col]}"


def make_scene(rng: random.Random, image_size: int) -> list[Shape]:
    """1-4 shapes in distinct cells of a 3x3 grid, random kind, colour, size and jitter."""
    n = rng.randint(1, 4)
    cells = rng.sample(range(9), n)
    cell = image_size / 3
    shapes = []
    for c in cells:
        row, col = divmod(c, 3)
        radius = cell * rng.uniform(0.25, 0.45)
        jitter = cell / 2 - radius
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(sorted(COLORS)), row, col, cx, cy, radius))
    return shapes


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    import math

    pts = []
    for k in range(10):
        rr = r if k % 2 == 0 else 0.45 * r
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_scene(rng: random.Random, shapes: list[Shape], image_size: int, noise: float) -> Image.Image:
    """Light background (noisy with probability ``noise``), shapes drawn on top. RGB, image_size^2."""
    grey = rng.randint(200, 245)
    img = Image.new("RGB", (image_size, image_size), (grey, grey, grey))
    if rng.random() < noise:
        speckle = Image.frombytes("RGB", img.size, rng.randbytes(image_size * image_size * 3))
        img = Image.blend(img, speckle, 0.2)
    draw = ImageDraw.Draw(img)
    for s in shapes:
        fill, (x, y, r) = COLORS[s.color], (s.cx, s.cy, s.radius)
        if s.kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif s.kind == "square":
            h = r * 0.85
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)], fill=fill)
        elif s.kind == "diamond":
            draw.polygon([(x, y - r), (x + r * 0.75, y), (x, y + r), (x - r * 0.75, y)], fill=fill)
        elif s.kind == "star":
            draw.polygon(_star(x, y, r), fill=fill)
    return img


def caption(rng: random.Random, shapes: list[Shape]) -> str:
    parts = [f"{s.a_name} {s.where}" for s in shapes]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(shapes)
    style = rng.randrange(3)
    if style == 0:
        return listing[0].upper() + listing[1:] + "."
    if style == 1:
        return f"{NUMBER_WORDS[n].capitalize()} shape{'s' if n > 1 else ''}: {listing}."
    return f"A light background with {listing}."


# Each question maker returns (question, answer, type) or None when the scene does not allow it.
def q_color(rng, shapes):
    unique = [s for s in shapes if sum(t.kind == s.kind for t in shapes) == 1]
    if not unique:
        return None
    s = rng.choice(unique)
    return f"What color is the {s.kind}? {SHORT}", s.color, "exact"


def _how_many(shapes, color: str | None = None) -> tuple[str, int]:
    """("How many ...?", count) over every shape, or over the shapes of ``color``."""
    if color is None:
        return "How many shapes are in the image?", len(shapes)
    return f"How many {color} shapes are there?", sum(s.color == color for s in shapes)


def _lettered(question: str, options: list, right) -> tuple[str, str, str]:
    """A multiple-choice question: options lettered A, B, ... one per line, in the given order."""
    lines = "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{lines}\n{MC_SUFFIX}", "ABCD"[options.index(right)], "mc"


def q_count(rng, shapes):
    mode = rng.randrange(3)
    if mode == 1:
        kind = rng.choice(SHAPES)
        return f"How many {kind}s are there? {SHORT}", str(sum(s.kind == kind for s in shapes)), "exact"
    question, n = _how_many(shapes, None if mode == 0 else rng.choice(sorted(COLORS)))
    return f"{question} {SHORT}", str(n), "exact"


def q_presence(rng, shapes):
    if rng.random() < 0.5:
        s = rng.choice(shapes)
        kind, color = s.kind, s.color
    else:
        present = {(s.kind, s.color) for s in shapes}
        absent = [(k, c) for k in SHAPES for c in sorted(COLORS) if (k, c) not in present]
        kind, color = rng.choice(absent)
    yes = any(s.kind == kind and s.color == color for s in shapes)
    return f"Is there {article(color)} {color} {kind} in the image? Answer yes or no.", "Yes" if yes else "No", "yesno"


def q_position(rng, shapes):
    named = [s for s in shapes if sum(t.name == s.name for t in shapes) == 1]
    pairs = [(a, b) for a in named for b in named if a is not b and (a.col != b.col or a.row != b.row)]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    if a.col != b.col:
        q = f"Is the {a.name} to the left or to the right of the {b.name}? {SHORT}"
        return q, "left" if a.col < b.col else "right", "exact"
    q = f"Is the {a.name} above or below the {b.name}? {SHORT}"
    return q, "above" if a.row < b.row else "below", "exact"


def q_choice(rng, shapes):
    """Lettered multiple choice: which shape has a colour, or which colour has a shape."""
    if rng.random() < 0.5:
        unique = [s for s in shapes if sum(t.color == s.color for t in shapes) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        others = [k for k in SHAPES if k not in {t.kind for t in shapes if t.color == s.color}]
        options, question = rng.sample(others, 3) + [s.kind], f"Which shape is {s.color}?"
        right = s.kind
    else:
        unique = [s for s in shapes if sum(t.kind == s.kind for t in shapes) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        others = [c for c in sorted(COLORS) if c != s.color]
        options, question = rng.sample(others, 3) + [s.color], f"What color is the {s.kind}?"
        right = s.color
    rng.shuffle(options)
    return _lettered(question, options, right)


def _random_count(rng, shapes) -> tuple[str, int, bool]:
    """Half of the time a count of every shape, else of a random colour's: (question, count, by colour)."""
    color = None if rng.random() < 0.5 else rng.choice(sorted(COLORS))
    return (*_how_many(shapes, color), color is not None)


def q_count_total(rng, shapes):
    """Exact count of every shape, or of the shapes of one colour."""
    question, n, _ = _random_count(rng, shapes)
    return f"{question} {SHORT}", str(n), "exact"


def q_color_presence(rng, shapes):
    """Yes/no on a colour alone, half of the time a colour that is present."""
    present = sorted({s.color for s in shapes})
    absent = [c for c in sorted(COLORS) if c not in present]
    color = rng.choice(present if rng.random() < 0.5 else absent)
    return f"Is there {article(color)} {color} shape in the image? Answer yes or no.", "Yes" if color in present else "No", "yesno"


def q_count_check(rng, shapes):
    """Yes/no on the number of shapes, half of the time the true number."""
    n = len(shapes) if rng.random() < 0.5 else rng.choice([k for k in range(1, 5) if k != len(shapes)])
    noun = "shape" if n == 1 else "shapes"
    verb = "Is" if n == 1 else "Are"
    return f"{verb} there {NUMBER_WORDS[n]} {noun} in the image? Answer yes or no.", "Yes" if n == len(shapes) else "No", "yesno"


def q_count_choice(rng, shapes):
    """Lettered multiple choice on a count; the options are the numbers in ascending order."""
    question, n, by_color = _random_count(rng, shapes)
    options = [0, 1, 2, 3] if by_color else [1, 2, 3, 4]
    return _lettered(question, options, n) if n in options else None


# Question sets: each maker is drawn with equal probability.
# "mixed": colour, count, presence, relative position and lettered choice with shuffled options.
# "basic": counts and colours (exact, yes/no, and choices in ascending order), for a tiny language
#   model trained from scratch in minutes of CPU time. Measured on the demo's teacher: counts are
#   learned (100% on "How many shapes are in the image?"), colours partly; shape identity, relative
#   position and shuffled options stayed at chance level after 5000 steps.
QUESTION_SETS = {
    "mixed": (q_color, q_count, q_presence, q_position, q_choice),
    "basic": (q_color, q_count_total, q_color_presence, q_count_check, q_count_choice),
}
QUESTION_MAKERS = QUESTION_SETS["mixed"]


def ask(rng: random.Random, shapes: list[Shape], avoid: set[str] = frozenset(), makers=QUESTION_MAKERS):
    """One (question, answer, type) for the scene from ``makers``, not repeating a question in ``avoid``."""
    for _ in range(50):
        qa = rng.choice(makers)(rng, shapes)
        if qa is not None and qa[0] not in avoid:
            return qa
    return q_count(rng, shapes)  # always possible


def _write_image(img: Image.Image, root: str, rel: str) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format="PNG")


def _dump_json(obj, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def _dump_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def synthesize(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_caption: int = 600,
    n_instruct: int = 600,
    n_eval: int = 120,
    image_size: int = 64,
    noise: float = 0.3,
    multi_turn: float = 0.3,
    text_only: float = 0.05,
    vocab_size: int = 2048,
    questions: str = "mixed",
    overwrite: bool = False,
) -> dict:
    """Write the synthetic dataset and tokenizer to ``out_dir`` (see the module docstring).

    Args:
        out_dir: output folder; it must not exist or be empty, unless ``overwrite``.
        seed: random seed; the whole output is a function of the arguments.
        n_caption, n_instruct, n_eval: number of caption records, instruction records and
            evaluation questions (each with its own scene).
        image_size: side of the square PNGs in pixels.
        noise: fraction of scenes with a speckled background.
        multi_turn: fraction of instruction records with 2-3 question turns.
        text_only: fraction of instruction records without an image.
        vocab_size: upper bound for the BPE tokenizer.
        questions: question set of the instruction and evaluation records, a key of
            ``QUESTION_SETS`` ("mixed" or "basic").
        overwrite: replace a non-empty ``out_dir`` whole.

    Returns:
        dict of paths: images, pretrain, instruct, eval_questions, eval_answers, tokenizer, meta.
    """
    for name, v in (("n_caption", n_caption), ("n_instruct", n_instruct), ("n_eval", n_eval)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}={v!r}: expected an int >= 0")
    if image_size < 24:
        raise ValueError(f"image_size={image_size}: expected >= 24 pixels so shapes stay recognisable")
    for name, v in (("noise", noise), ("multi_turn", multi_turn), ("text_only", text_only)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}={v}: expected a fraction in [0, 1]")
    if questions not in QUESTION_SETS:
        raise ValueError(f"questions={questions!r}: expected one of {sorted(QUESTION_SETS)}")
    makers = QUESTION_SETS[questions]
    final = os.path.normpath(os.fspath(out_dir))
    _check_out_dir(final, overwrite)
    out = _sibling(final, "synth-tmp")
    if os.path.exists(out):
        print(f"removing {out}, left by an interrupted synth write", flush=True)
        shutil.rmtree(out)
    img_root = os.path.join(out, "images")
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)

    def scene(rng: random.Random, rel: str) -> list[Shape]:
        shapes = make_scene(rng, image_size)
        _write_image(draw_scene(rng, shapes, image_size, noise), img_root, rel)
        return shapes

    rng = random.Random(f"kdengine-synth-{seed}-caption")
    pretrain = []
    for i in range(n_caption):
        rel = f"caption/{i:06d}.png"
        shapes = scene(rng, rel)
        prompt = rng.choice(CAPTION_PROMPTS)
        human = f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"
        pretrain.append(
            {
                "id": f"cap-{i:06d}",
                "image": rel,
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption(rng, shapes)}],
            }
        )

    rng = random.Random(f"kdengine-synth-{seed}-instruct")
    instruct = []
    for i in range(n_instruct):
        if rng.random() < text_only:
            q, a = rng.choice(TEXT_QA)
            conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            instruct.append({"id": f"ins-{i:06d}", "conversations": conv})
            continue
        rel = f"instruct/{i:06d}.png"
        shapes = scene(rng, rel)
        n_turns = rng.randint(2, 3) if rng.random() < multi_turn else 1
        conv, asked = [], set()
        for t in range(n_turns):
            q, a, _ = ask(rng, shapes, asked, makers)
            asked.add(q)
            conv += [{"from": "human", "value": f"<image>\n{q}" if t == 0 else q}, {"from": "gpt", "value": a}]
        instruct.append({"id": f"ins-{i:06d}", "image": rel, "conversations": conv})

    rng = random.Random(f"kdengine-synth-{seed}-eval")
    eval_questions, eval_answers = [], []
    for i in range(n_eval):
        rel = f"eval/{i:06d}.png"
        shapes = scene(rng, rel)
        q, a, kind = ask(rng, shapes, makers=makers)
        eval_questions.append({"question_id": i, "image": rel, "text": q, "category": kind})
        eval_answers.append({"question_id": i, "answer": a, "type": kind})

    paths = {
        "images": img_root,
        "pretrain": os.path.join(out, "pretrain.json"),
        "instruct": os.path.join(out, "instruct.json"),
        "eval_questions": os.path.join(out, "eval", "questions.jsonl"),
        "eval_answers": os.path.join(out, "eval", "answers.jsonl"),
        "tokenizer": os.path.join(out, "tokenizer"),
        "meta": os.path.join(out, "meta.json"),
    }
    _dump_json(pretrain, paths["pretrain"])
    _dump_json(instruct, paths["instruct"])
    _dump_jsonl(eval_questions, paths["eval_questions"])
    _dump_jsonl(eval_answers, paths["eval_answers"])

    corpus = [VICUNA_SYSTEM, "USER: ASSISTANT:", "system user assistant"]
    for rec in pretrain + instruct:
        corpus += [turn["value"] for turn in rec["conversations"]]
    corpus += [q["text"] for q in eval_questions] + [a["answer"] for a in eval_answers]
    tok = train_tokenizer(corpus, paths["tokenizer"], vocab_size=vocab_size)

    meta = {
        "seed": seed,
        "n_caption": n_caption,
        "n_instruct": n_instruct,
        "n_eval": n_eval,
        "image_size": image_size,
        "noise": noise,
        "multi_turn": multi_turn,
        "text_only": text_only,
        "questions": questions,
        "vocab_size": len(tok),
        "files": {k: os.path.relpath(v, out) for k, v in paths.items()},
    }
    _dump_json(meta, paths["meta"])
    _replace_dir(out, final)
    return {k: os.path.join(final, os.path.relpath(v, out)) for k, v in paths.items()}


def _sibling(path: str, tag: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{tag}")


def _check_out_dir(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out_dir {out}: is a file, expected a folder (or a path that does not exist)")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"out_dir {out}: not empty ({len(os.listdir(out))} entries); expected a new or empty "
                         f"folder, or overwrite=True (--overwrite) to replace it whole")


def _replace_dir(tmp: str, out: str) -> None:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` is set aside first, then removed."""
    old = None
    if os.path.isdir(out) and os.listdir(out):
        old = _sibling(out, "synth-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)  # onto a missing or empty folder
    if old is not None:
        shutil.rmtree(old)
