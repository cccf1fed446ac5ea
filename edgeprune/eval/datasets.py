"""Evaluation data for ``edgeprune eval``: the generated shapes split or a user's JSONL (numpy + Pillow only).

``--data`` takes:

- ``shapes:N[:SEED]``: N held-out questions of the synthetic shapes VQA (:mod:`edgeprune.eval.shapes`), one per
  image, question types in rotation (colour, shape, exist, position); seed 1 by default (training used 0).
- a ``.jsonl`` file, one JSON object per line (blank lines and lines starting with ``#`` are skipped)::

      {"image": "imgs/1.jpg", "question": "What colour is the bus?", "answer": "red", "type": "color"}
      {"image": "...", "question": "...", "answers": ["red", "red", "dark red", ...]}        # VQA soft score
      {"image": "...", "question": "Is there a dog?", "answer": "no"}                       # yes/no (POPE)
      {"image": "...", "question": "...", "choices": ["cat", "dog"], "answer": "B"}          # multiple choice

  ``image`` paths are relative to the JSONL file's directory (or absolute). The scorer follows from the fields:
  ``choices`` -> by letter; ``answers`` with several entries -> the VQA soft score; an ``answer`` of yes or no ->
  POPE yes/no; anything else -> exact match after the VQA normalisation. ``type`` groups the per-type
  accuracy (default: the scorer's name); an optional ``id`` names the item in the results (default: the line).

Every malformed line is an :class:`EvalDataError` naming the file and line, raised before any model loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import EdgepruneError
from . import scorers


class EvalDataError(EdgepruneError):
    """``--data`` cannot be read: a bad spec, a missing file, or a malformed JSONL line (with its number)."""


@dataclass
class EvalItem:
    """One question to evaluate.

    Attributes:
        id: stable identifier (``shapes-1-17``, or the JSONL ``id`` / ``line-N``).
        question: the prompt sent to the model (multiple-choice items carry their lettered options).
        answers: reference answer(s); for ``choice`` items the gold letter.
        scorer: one of :data:`~edgeprune.eval.scorers.SCORERS`.
        type: the question type used for per-type accuracy.
        load_image: returns the PIL image (loaded lazily, so reading the data stays cheap).
        choices: the options of a multiple-choice item.
    """

    id: str
    question: str
    answers: list[str]
    scorer: str
    type: str
    load_image: Callable[[], Any]
    choices: list[str] | None = None

    def score(self, prediction: str) -> float:
        return scorers.score(self.scorer, prediction, self.answers, self.choices)


def load_data(spec: str, limit: int | None = None) -> tuple[list[EvalItem], dict[str, Any]]:
    """Resolve ``--data`` into items (the first ``limit``) and a description for the results file.

    Raises:
        EvalDataError: see the module docstring.
    """
    if limit is not None and limit <= 0:
        raise EvalDataError(f"--limit must be a positive integer; got {limit}")
    if spec.startswith("shapes:") or spec == "shapes":
        n, seed = _shapes_spec(spec)
        n = n if limit is None else min(n, limit)
        return shapes_items(n, seed), {"kind": "shapes", "n": n, "seed": seed, "spec": spec}
    path = Path(spec)
    if path.suffix.lower() != ".jsonl":
        raise EvalDataError(f"--data {spec!r}: expected shapes:N[:SEED] or a .jsonl file")
    if not path.is_file():
        raise EvalDataError(f"--data {spec!r}: no such file")
    items = read_jsonl(path, limit)
    return items, {"kind": "jsonl", "path": str(path), "n": len(items), "spec": spec}


def _shapes_spec(spec: str) -> tuple[int, int]:
    from .shapes import EVAL_SEED

    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        n = int(parts[1])
        seed = int(parts[2]) if len(parts) == 3 else EVAL_SEED
    except ValueError:
        raise EvalDataError(f"--data {spec!r}: expected shapes:N or shapes:N:SEED with integers "
                            "(e.g. shapes:200)") from None
    if n <= 0 or seed < 0:
        raise EvalDataError(f"--data {spec!r}: N must be positive and SEED non-negative")
    return n, seed


def shapes_items(n: int, seed: int) -> list[EvalItem]:
    """N generated questions (image i of split ``seed``; types in rotation, the first answerable one)."""
    from .shapes import QUESTION_TYPES, make_sample

    items = []
    for i in range(n):
        sample = make_sample(seed, i)
        by_type = {t: (q, a) for q, a, t in sample.questions}
        wanted = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        qtype = wanted if wanted in by_type else next(t for t in QUESTION_TYPES if t in by_type)
        q, a = by_type[qtype]
        items.append(EvalItem(id=f"shapes-{seed}-{i}", question=q, answers=[a],
                              scorer="yesno" if a in ("yes", "no") else "exact", type=qtype,
                              load_image=lambda s=seed, j=i: make_sample(s, j).pil()))
    return items


def read_jsonl(path: Path, limit: int | None = None) -> list[EvalItem]:
    """Parse a JSONL evaluation file (see the module docstring); images are checked to exist, not opened.

    Raises:
        EvalDataError: the first malformed line, with its number.
    """
    items: list[EvalItem] = []
    seen: dict[str, int] = {}
    root = path.absolute().parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalDataError(f"--data {str(path)!r} cannot be read: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        item = _item(json_line(line, path, number), root, f"{path}:{number}", number)
        if item.id in seen:
            raise EvalDataError(f"{path}:{number}: id {item.id!r} repeats line {seen[item.id]}; ids must be unique")
        seen[item.id] = number
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise EvalDataError(f"--data {str(path)!r} has no items")
    return items


def json_line(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(rec, dict):
        raise EvalDataError(f"{path}:{number}: expected a JSON object, got {type(rec).__name__}")
    return rec


def _strings(value: Any, field: str, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise EvalDataError(f"{where}: {field!r} must be a non-empty list of non-empty strings")
    return list(value)


def _item(rec: dict[str, Any], root: Path, where: str, number: int) -> EvalItem:
    for key in ("image", "question"):
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            raise EvalDataError(f"{where}: missing or empty {key!r} (a string)")
    image = Path(rec["image"]) if os.path.isabs(rec["image"]) else root / rec["image"]
    if not image.is_file():
        raise EvalDataError(f"{where}: image {str(image)!r} does not exist (paths are relative to the JSONL file)")
    choices = None
    if "choices" in rec:
        choices = _strings(rec["choices"], "choices", where)
        if len(choices) > len(scorers.LETTERS):
            raise EvalDataError(f"{where}: at most {len(scorers.LETTERS)} choices")
        if not isinstance(rec.get("answer"), str):
            raise EvalDataError(f"{where}: a multiple-choice item needs 'answer' (a letter or an option's text)")
        try:
            answers = [scorers.choice_letter(rec["answer"], choices)]
        except ValueError as exc:
            raise EvalDataError(f"{where}: {exc}") from None
        scorer, question = "choice", scorers.multiple_choice_prompt(rec["question"], choices)
    elif "answers" in rec:
        answers = _strings(rec["answers"], "answers", where)
        scorer, question = ("vqa" if len(answers) > 1 else "exact"), rec["question"]
    elif isinstance(rec.get("answer"), str) and rec["answer"].strip():
        answers, question = [rec["answer"]], rec["question"]
        scorer = "yesno" if scorers.normalize_answer(rec["answer"]) in ("yes", "no") else "exact"
    else:
        raise EvalDataError(f"{where}: needs 'answer' (a string), 'answers' (a list) or 'choices' + 'answer'")
    qtype = rec.get("type", scorer)
    if not isinstance(qtype, str) or not qtype:
        raise EvalDataError(f"{where}: 'type' must be a non-empty string")
    item_id = str(rec.get("id", f"line-{number}"))
    return EvalItem(id=item_id, question=question, answers=answers, scorer=scorer, type=qtype,
                    load_image=lambda p=image: _open(p, where), choices=choices)


def _open(path: Path, where: str) -> Any:
    from ..runtime.preprocess import load_image

    return load_image(str(path))
