"""LLaVA JSON / JSONL records: loading, validation and the bad-sample summary.

A record, as in LLaVA's ``blip_laion_cc_sbu_558k.json`` and ``llava_v1_5_mix665k.json``::

    {"id": "000001",
     "image": "00000/000001.jpg",            # or a list of paths, or absent (text-only)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Turns alternate human, gpt, human, gpt, ... and end with gpt. The number of ``<image>``
placeholders in the human turns equals the number of images. A ``.json`` file holds a
list of records; a ``.jsonl`` file one record per line (blank lines allowed).

Every problem is a :class:`BadSample` naming the record id, the file and the line
(JSONL) or list index (JSON). With ``on_bad_sample="error"`` it is raised; with
``"skip"`` the record is dropped and counted by reason in a :class:`BadSampleSummary`.
`precheck_records` runs the cheap checks (records, image files present) without decoding an image,
so a training run can check the data of all its stages before the first one trains.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from .tokenizer import IMAGE_TOKEN

ON_BAD_SAMPLE = ("error", "skip")

# Reasons a sample can be rejected; the summary counts by these names.
REASONS = (
    "malformed",  # not a dict, bad/missing id or conversations, bad roles or order
    "not_utf8",  # bytes that are not UTF-8 text (a JSONL line, or a string of a JSON record)
    "empty_answer",  # a gpt turn with an empty or whitespace-only value
    "image_count_mismatch",  # number of <image> placeholders != number of images
    "image_missing",  # image path does not exist
    "image_unreadable",  # the path exists but cannot be opened (permissions, a folder)
    "image_corrupt",  # pillow cannot decode it (truncated or not an image)
    "tokenization_mismatch",  # piecewise tokenization differs from the whole text
    "too_long",  # longer than the length limit and truncation may not (or cannot) cut it
    "no_supervised_tokens",  # nothing left to learn after truncation
)


class BadSample(ValueError):
    """A rejected sample; ``reason`` is one of :data:`REASONS`. ``context``, if given, leads the
    message: what reads the sample (e.g. ``datasets.instruct (stage sft)``)."""

    def __init__(self, reason: str, message: str, sample_id=None, where: str = "", context: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}: expected one of {REASONS}")
        self.reason = reason
        self.message = message
        self.sample_id = sample_id
        self.where = where
        self.context = context
        lead = f"{context}: " if context else ""
        super().__init__(f"{lead}bad sample id={sample_id!r} at {where or '<unknown>'} [{reason}]: {message}")

    def within(self, context: str) -> BadSample:
        """The same bad sample, its message led by ``context``."""
        return BadSample(self.reason, self.message, self.sample_id, self.where, context)

    def __reduce__(self):  # picklable: DataLoader workers send skipped samples to the main process
        return BadSample, (self.reason, self.message, self.sample_id, self.where, self.context)


@dataclass
class BadSampleSummary:
    """What happened to the samples: skipped ones by reason, truncated ones, and the first few
    ids of each.

    ``total`` counts samples seen; ``kept`` those that survived the checks before training;
    ``truncated`` the kept ones cut to the length limit. ``during_training`` counts sample
    reads dropped later (lazily decoded images under ``on_bad_sample="skip"``), by reason;
    the trainer adds them with :meth:`add_during_training` from the collated batches.
    """

    total: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    truncated: int = 0
    truncated_examples: list = field(default_factory=list)
    during_training: Counter = field(default_factory=Counter)
    training_examples: dict = field(default_factory=dict)
    max_examples: int = 5

    def add(self, err: BadSample) -> None:
        self._count(self.counts, self.examples, err)

    def add_during_training(self, err: BadSample) -> None:
        self._count(self.during_training, self.training_examples, err)

    def add_truncated(self, sample_id, where: str) -> None:
        self.truncated += 1
        if len(self.truncated_examples) < self.max_examples:
            self.truncated_examples.append(f"{sample_id!r} at {where}")

    def _count(self, counts: Counter, examples: dict, err: BadSample) -> None:
        counts[err.reason] += 1
        ex = examples.setdefault(err.reason, [])
        if len(ex) < self.max_examples:
            ex.append(f"{err.sample_id!r} at {err.where}")

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    @property
    def kept(self) -> int:
        return self.total - self.skipped

    @property
    def skipped_during_training(self) -> int:
        return sum(self.during_training.values())

    def to_dict(self) -> dict:
        out = {"total": self.total, "kept": self.kept, "skipped": dict(sorted(self.counts.items())),
               "truncated": self.truncated}
        if self.during_training:
            out["skipped_during_training"] = dict(sorted(self.during_training.items()))
        return out

    def format(self) -> str:
        lines = [f"data: {self.kept}/{self.total} samples kept ({self.truncated} truncated), {self.skipped} skipped"]
        if self.truncated:
            lines.append(f"  truncated: {self.truncated} (e.g. {', '.join(self.truncated_examples)})")
        lines += _reason_lines(self.counts, self.examples)
        if self.during_training:
            lines.append(f"skipped during training: {self.skipped_during_training} sample reads")
            lines += _reason_lines(self.during_training, self.training_examples)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _reason_lines(counts: Counter, examples: dict) -> list[str]:
    return [f"  {r}: {counts[r]} (e.g. {', '.join(examples[r])})" for r in REASONS if counts[r]]


@dataclass(frozen=True)
class Turn:
    role: str  # "human" or "gpt"
    value: str


@dataclass(frozen=True)
class Record:
    """One validated sample. ``images`` are absolute (or folder-joined) paths, in order."""

    id: object
    images: tuple[str, ...]
    turns: tuple[Turn, ...]
    where: str  # "file.jsonl:12" or "file.json[index 11]"

    @property
    def has_image(self) -> bool:
        return len(self.images) > 0


def check_on_bad_sample(on_bad_sample: str) -> None:
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ValueError(f"on_bad_sample={on_bad_sample!r}: expected one of {ON_BAD_SAMPLE}")


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _bad_bytes(data: bytes) -> list[int]:
    """Offsets of the bytes of ``data`` that decode as no UTF-8 text (one per surrogate escape)."""
    offsets, start = [], 0
    while True:
        try:
            data[start:].decode("utf-8")
            return offsets
        except UnicodeDecodeError as e:
            offsets += range(start + e.start, start + e.end)
            start += e.end


def _escaped(obj) -> int:
    """Number of surrogate-escaped bytes (undecodable input) in the strings of ``obj``."""
    if isinstance(obj, str):
        return sum(1 for c in obj if "\udc80" <= c <= "\udcff")
    if isinstance(obj, list):
        return sum(_escaped(v) for v in obj)
    if isinstance(obj, dict):
        return sum(_escaped(k) + _escaped(v) for k, v in obj.items())
    return 0


def _raw_id(raw):
    return raw.get("id") if isinstance(raw, dict) else None


def _id_of_line(raw_line: bytes):
    """The record id of a JSONL line that is not UTF-8, if the rest of it parses (else None)."""
    try:
        return _raw_id(json.loads(raw_line.decode("utf-8", errors="surrogateescape")))
    except json.JSONDecodeError:
        return None


def jsonl_lines(path: str):
    """Yield (line number, text, raw bytes, problem) for every non-blank line of a JSONL file.

    ``problem`` is None, or "byte 0x.. at column N" when the line is not UTF-8 (then ``text``
    is None); the caller names the file and decides (a BadSample, an error)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, raw, f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
                continue
            if text.strip():
                yield lineno, text, raw, None


def _iter_raw(path: str):
    """Yield (raw_record_or_BadSample, where) from a .json list or .jsonl file.

    Bytes that are not UTF-8 make a ``not_utf8`` BadSample of the record holding them (the
    line of a JSONL file; the list index, and the line of the first bad byte, of a JSON
    file); outside any string of a JSON list they are a broken file (ValueError).
    """
    name = os.path.basename(path)
    if path.endswith(".jsonl"):
        for lineno, line, raw_line, bad_byte in jsonl_lines(path):
            where = f"{path}:{lineno}"
            if bad_byte:
                msg = f"{bad_byte} of {name} line {lineno} is not UTF-8"
                yield BadSample("not_utf8", msg, _id_of_line(raw_line), where), where
                continue
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as e:
                yield BadSample("malformed", f"invalid JSON in {name} line {lineno}: {e.msg}", None, where), where
    elif path.endswith(".json"):
        with open(path, "rb") as f:
            data = f.read()
        bad = _bad_bytes(data)
        try:
            records = json.loads(data.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as e:
            # A broken JSON list cannot be resynchronised: always an error.
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        seen = 0  # bad bytes of the records before this one, in file order
        for i, raw in enumerate(records):
            where = f"{path}[index {i}]"
            n = _escaped(raw)
            if n:
                off = bad[min(seen, len(bad) - 1)]
                msg = f"byte 0x{data[off]:02x} at {name} line {_line_of(data, off)} is not UTF-8 ({n} such byte(s))"
                seen += n
                yield BadSample("not_utf8", msg, _raw_id(raw), where), where
            else:
                yield raw, where
    else:
        raise ValueError(f"data file {path!r}: expected a .json (list) or .jsonl file")


def parse_record(raw, where: str, image_folder: str | None) -> Record:
    """Validate one raw record (no image I/O). Raises :class:`BadSample`."""
    if not isinstance(raw, dict):
        raise BadSample("malformed", f"expected a JSON object, got {type(raw).__name__}", None, where)
    sid = raw.get("id")
    if sid is None or not isinstance(sid, (str, int)) or isinstance(sid, bool):
        raise BadSample("malformed", f"'id' must be a string or int, got {sid!r}", sid, where)

    def bad(reason: str, msg: str) -> BadSample:
        return BadSample(reason, msg, sid, where)

    img = raw.get("image")
    if img is None:
        paths: list = []
    elif isinstance(img, str):
        paths = [img]
    elif isinstance(img, list) and all(isinstance(p, str) for p in img):
        paths = list(img)
    else:
        raise bad("malformed", f"'image' must be a path or a list of paths, got {img!r}")
    if any(not p for p in paths):
        raise bad("malformed", f"'image' has an empty path: {img!r}")
    if paths and image_folder is None:
        raise bad("malformed", "record has images but no image_folder was given")

    conv = raw.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise bad("malformed", f"'conversations' must be a non-empty list, got {conv!r:.80}")
    turns = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise bad("malformed", f"turn {t} must be {{'from': ..., 'value': str}}, got {turn!r:.80}")
        expected = "human" if t % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise bad("malformed", f"turn {t} is from {turn.get('from')!r}, expected {expected!r} (human/gpt alternate)")
        turns.append(Turn(expected, turn["value"]))
    if turns[-1].role != "gpt":
        raise bad("malformed", f"{len(turns)} turns: expected the last turn to be from 'gpt'")
    for t, turn in enumerate(turns):
        if turn.role == "gpt" and not turn.value.strip():
            raise bad("empty_answer", f"turn {t} (gpt) has an empty answer {turn.value!r}")
        if turn.role == "gpt" and IMAGE_TOKEN in turn.value:
            raise bad("malformed", f"turn {t} (gpt) contains {IMAGE_TOKEN!r}: images belong in human turns")

    n_tok = sum(turn.value.count(IMAGE_TOKEN) for turn in turns)
    if n_tok != len(paths):
        raise bad("image_count_mismatch", f"{n_tok} {IMAGE_TOKEN} placeholder(s) but {len(paths)} image(s) {paths}")

    images = tuple(os.path.join(image_folder, p) for p in paths) if paths else ()
    return Record(sid, images, tuple(turns), where)


def open_image(path: str, sample_id=None, where: str = "") -> Image.Image:
    """Open and fully decode ``path`` as RGB. Raises :class:`BadSample` on failure."""
    if not os.path.exists(path):
        raise BadSample("image_missing", f"image file not found: {path}", sample_id, where)
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # decode every byte: a truncated file fails here, not later
            return img.convert("RGB")
    except (PermissionError, IsADirectoryError) as e:
        raise BadSample("image_unreadable", f"cannot read image {path}: {e}", sample_id, where) from None
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise BadSample("image_corrupt", f"cannot decode image {path}: {e}", sample_id, where) from None


def check_image_file(path: str, sample_id=None, where: str = "") -> None:
    """The cheap image check, no decode (one ``stat``): ``path`` is a non-empty file. Raises
    :class:`BadSample`: ``image_missing``, ``image_unreadable`` (not a file, or no access to it),
    ``image_corrupt`` (0 bytes)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadSample("image_missing", f"image file not found: {path}", sample_id, where) from None
    except OSError as e:
        raise BadSample("image_unreadable", f"cannot read image {path}: {e}", sample_id, where) from None
    if not stat.S_ISREG(st.st_mode):
        raise BadSample("image_unreadable", f"cannot read image {path}: not a file", sample_id, where)
    if st.st_size == 0:
        raise BadSample("image_corrupt", f"image file is empty (0 bytes): {path}", sample_id, where)


def _decode_image(path: str, sample_id=None, where: str = "") -> None:
    open_image(path, sample_id, where).close()


def load_records(
    paths: str | os.PathLike | list,
    image_folder: str | os.PathLike | None = None,
    on_bad_sample: str = "error",
    check_images: bool = True,
    summary: BadSampleSummary | None = None,
) -> tuple[list[Record], BadSampleSummary]:
    """Load and validate LLaVA records from one or more .json/.jsonl files.

    Args:
        paths: a data file or a list of them, read in order.
        image_folder: folder the records' ``image`` paths are relative to.
        on_bad_sample: "error" raises the first :class:`BadSample` (id, file, line);
            "skip" drops bad records and counts them in the summary.
        check_images: open and fully decode every image now (catches missing,
            unreadable and truncated files before training starts).
        summary: an existing summary to add to (else a new one).

    Returns:
        (records, summary).
    """
    return _load(paths, image_folder, on_bad_sample, _decode_image if check_images else None, summary)


def precheck_records(
    paths: str | os.PathLike | list,
    image_folder: str | os.PathLike | None = None,
    on_bad_sample: str = "error",
) -> BadSampleSummary:
    """What can be checked cheaply before any training: every record parses and validates (as in
    `load_records`) and every image file it names is present and not empty (`check_image_file`; no
    decode). Under ``on_bad_sample="error"`` the first bad record raises; under "skip" it is counted
    in the returned summary."""
    return _load(paths, image_folder, on_bad_sample, check_image_file, None)[1]


def _load(paths, image_folder, on_bad_sample: str, check_image, summary: BadSampleSummary | None):
    """`load_records` with ``check_image(path, id, where)`` run on every image path (None: no image I/O)."""
    check_on_bad_sample(on_bad_sample)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"data file not found: {p}")
    folder = os.fspath(image_folder) if image_folder is not None else None
    if folder is not None and not os.path.isdir(folder):
        raise FileNotFoundError(f"image_folder not found: {folder}")
    summary = summary if summary is not None else BadSampleSummary()

    records: list[Record] = []
    for path in paths:
        for raw, where in _iter_raw(path):
            summary.total += 1
            try:
                if isinstance(raw, BadSample):
                    raise raw
                rec = parse_record(raw, where, folder)
                if check_image is not None:
                    for p in rec.images:
                        check_image(p, rec.id, where)
            except BadSample as err:
                if on_bad_sample == "error":
                    raise
                summary.add(err)
                continue
            records.append(rec)
    return records, summary
