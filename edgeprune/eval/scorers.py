"""Answer scoring rules of the VQA benchmarks (pure Python, no dependencies).

- :func:`normalize_answer`: the official VQA evaluation's answer normalisation (``vqaEval.py``,
  ``processPunctuation`` + ``processDigitArticle``), written from its documented behaviour: newlines and tabs
  to spaces; punctuation removed (deleted next to spaces or when the text has a ``d,d`` digit group,
  else replaced by a space); a period dropped unless a digit follows; lower case; number words zero..ten to
  digits; the articles a/an/the dropped; common contractions given their apostrophe ("dont" -> "don't").
  Unlike the official script, which skips the normalisation when all ten human answers agree, both sides are
  always normalised (as the TextVQA/m4c evaluator that LLaVA uses does).
- :func:`vqa_soft_score`: VQA accuracy over (usually 10) human answers: ``min(#matches / 3, 1)`` averaged
  over the leave-one-out subsets of the answers, as the official script computes it.
- :func:`parse_yes_no` / :func:`yes_no_metrics`: POPE-style yes/no: the answer is "no" when its first
  sentence has the word no or not, else "yes" (LLaVA's POPE rule); precision/recall/F1 with "yes" positive.
- :func:`parse_choice`: multiple choice by letter ("B", "(B)", "B. dog", or the option's text).
"""

from __future__ import annotations

import re
from typing import Sequence

PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "oclock": "o'clock", "shant": "shan't", "shed": "she'd", "shes": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "thatd": "that'd", "thats": "that's", "thered": "there'd", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "wed": "we'd", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_PERIOD = re.compile(r"\.(?!\d)")  # the official pattern "(?!<=\d)(\.)(?!\d)" acts as: a period not before a digit
_DIGIT_COMMA = re.compile(r"\d,\d")


def _punctuation(text: str) -> str:
    out = text
    digit_group = _DIGIT_COMMA.search(text) is not None
    for p in PUNCT:
        if p + " " in text or " " + p in text or digit_group:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The VQA normalisation of one answer (see the module docstring): ``"Two dogs."`` -> ``"2 dogs"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction equals the normalised answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def vqa_soft_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: mean over the leave-one-out subsets of ``min(#answers equal to the prediction / 3, 1)``.

    With 10 answers of which m match: ``m >= 4`` scores 1, and ``m = 1, 2, 3`` score 0.3, 0.6, 0.9.

    Raises:
        ValueError: no answers.
    """
    if not answers:
        raise ValueError("vqa_soft_score needs at least one answer")
    pred = normalize_answer(prediction)
    norm = [normalize_answer(a) for a in answers]
    if len(norm) == 1:
        return float(norm[0] == pred)
    scores = []
    for i in range(len(norm)):
        matches = sum(1 for j, a in enumerate(norm) if j != i and a == pred)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def parse_yes_no(prediction: str) -> str:
    """``"no"`` when the first sentence contains the word no or not (any case), else ``"yes"`` (LLaVA's POPE rule)."""
    text = prediction.split(".")[0].replace(",", "")
    words = {w.lower() for w in text.split()}
    return "no" if words & {"no", "not"} else "yes"


def yes_no_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float | int]:
    """POPE metrics of parsed predictions against yes/no answers ("yes" is the positive class).

    Returns:
        ``{"n", "accuracy", "precision", "recall", "f1", "yes_ratio"}`` (precision/recall/F1 are 0 when undefined).
    """
    pred = [parse_yes_no(p) for p in predictions]
    gold = [normalize_answer(a) for a in answers]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    fp = sum(p == "yes" and g != "yes" for p, g in zip(pred, gold))
    fn = sum(p != "yes" and g == "yes" for p, g in zip(pred, gold))
    n = len(gold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "accuracy": sum(p == g for p, g in zip(pred, gold)) / n if n else 0.0,
            "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p == "yes" for p in pred) / n if n else 0.0}


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTER = re.compile(r"^\s*\(?([A-Z])(?:[\).:,]|\s|$)")


def parse_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The option letter a prediction names: a leading letter ("B", "(B)", "B. dog", "B) dog") within the
    options, else the option whose normalised text equals the normalised prediction, else None."""
    letters = LETTERS[: len(choices)]
    m = _LETTER.match(prediction)
    if m and m.group(1) in letters:
        return m.group(1)
    norm = normalize_answer(prediction)
    for letter, choice in zip(letters, choices):
        if norm and norm == normalize_answer(choice):
            return letter
    return None


def choice_letter(answer: str, choices: Sequence[str]) -> str:
    """The gold letter of a multiple-choice item: ``answer`` is a letter or one of the options' texts.

    Raises:
        ValueError: neither.
    """
    letters = LETTERS[: len(choices)]
    if answer.strip().upper() in letters and len(answer.strip()) == 1:
        return answer.strip().upper()
    for letter, choice in zip(letters, choices):
        if normalize_answer(answer) == normalize_answer(choice):
            return letter
    raise ValueError(f"answer {answer!r} is neither an option letter ({', '.join(letters)}) nor an option's text")


def multiple_choice_prompt(question: str, choices: Sequence[str]) -> str:
    """The question with lettered options and LLaVA's answer instruction (its MMBench/ScienceQA prompt)."""
    lines = [question] + [f"{letter}. {c}" for letter, c in zip(LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer with the option's letter from the given choices directly."


SCORERS = ("exact", "vqa", "yesno", "choice")


def score(scorer: str, prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
    """Score one prediction with ``scorer`` (:data:`SCORERS`).

    Args:
        scorer: ``exact`` (normalised exact match with any of ``answers``), ``vqa`` (soft score over
            ``answers``), ``yesno`` (parsed yes/no against ``answers[0]``), ``choice`` (letter; ``answers[0]`` is
            the gold letter).
        prediction: the model's answer text.
        answers: the reference answer(s).
        choices: the options of a ``choice`` item.
    Returns:
        A score in [0, 1].
    """
    if scorer == "exact":
        return max(exact_match(prediction, a) for a in answers)
    if scorer == "vqa":
        return vqa_soft_score(prediction, answers)
    if scorer == "yesno":
        return float(parse_yes_no(prediction) == normalize_answer(answers[0]))
    if scorer == "choice":
        return float(parse_choice(prediction, choices or ()) == answers[0])
    raise ValueError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")
