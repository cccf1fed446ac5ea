"""The VQA scoring rules against hand-computed cases (edgeprune.eval.scorers)."""

from __future__ import annotations

import pytest

from edgeprune.eval import scorers as S


@pytest.mark.parametrize("raw, want", [
    ("Two dogs.", "2 dogs"),              # number word, final period dropped, lower case
    ("the Red bus", "red bus"),           # articles dropped
    ("a, b", "b"),                        # ", " -> punctuation deleted; then the article a dropped
    ("yes!", "yes"),                      # "!" not next to a space: replaced by a space, then split away
    ("3.5", "3.5"),                       # a period before a digit stays
    ("1,000 people", "1000 people"),      # a d,d group: punctuation deleted, not spaced
    ("left-hand", "left hand"),           # hyphen with no space around it: becomes a space
    ("dont\tknow\n", "don't know"),       # tabs/newlines to spaces, contraction restored
    ("none", "0"),
])
def test_normalize_answer(raw, want):
    assert S.normalize_answer(raw) == want


def test_exact_match_uses_normalisation():
    assert S.exact_match("Red.", "red") == 1.0
    assert S.exact_match("two", "2") == 1.0
    assert S.exact_match("blue", "red") == 0.0


@pytest.mark.parametrize("matches, want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_score_leave_one_out(matches, want):
    # m of 10 answers match. Leaving out a matching answer leaves m-1 matches (m such subsets), leaving out another
    # one leaves m (10-m subsets): mean of min(x/3, 1). m=1: (1*0 + 9*1/3)/10 = 0.3; m=3: (3*2/3 + 7*1)/10 = 0.9.
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert S.vqa_soft_score("Cat", answers) == pytest.approx(want)


def test_vqa_soft_score_single_answer_and_empty():
    assert S.vqa_soft_score("the cat", ["cat"]) == 1.0
    with pytest.raises(ValueError):
        S.vqa_soft_score("cat", [])


@pytest.mark.parametrize("text, want", [("Yes", "yes"), ("No, there is not.", "no"), ("There is not a dog", "no"),
                                        ("Yes. No dog is absent", "yes"), ("maybe", "yes"), ("NO", "no")])
def test_parse_yes_no_pope_rule(text, want):
    assert S.parse_yes_no(text) == want


def test_yes_no_metrics_hand_computed():
    # gold: y y y n n ; pred: y n y y n -> tp 2, fp 1, fn 1, tn 1
    m = S.yes_no_metrics(["yes", "no", "Yes.", "yes", "no"], ["yes", "yes", "yes", "no", "no"])
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)


def test_yes_no_metrics_undefined_precision_is_zero():
    m = S.yes_no_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5


@pytest.mark.parametrize("text, want", [("B", "B"), ("(C) a bird", "C"), ("A. cat", "A"), ("b) dog", None),
                                        ("dog", "B"), ("The dog.", "B"), ("E", None), ("Because", None)])
def test_parse_choice(text, want):
    assert S.parse_choice(text, ["cat", "dog", "bird"]) == want


def test_choice_letter_and_prompt():
    assert S.choice_letter("b", ["cat", "dog"]) == "B"
    assert S.choice_letter("Dog", ["cat", "dog"]) == "B"
    with pytest.raises(ValueError):
        S.choice_letter("fish", ["cat", "dog"])
    prompt = S.multiple_choice_prompt("Which pet?", ["cat", "dog"])
    assert prompt.splitlines() == ["Which pet?", "A. cat", "B. dog",
                                   "Answer with the option's letter from the given choices directly."]


def test_score_dispatch():
    assert S.score("exact", "Two", ["2", "two dogs"]) == 1.0
    assert S.score("vqa", "cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)
    assert S.score("yesno", "Not really", ["no"]) == 1.0
    assert S.score("choice", "(B)", ["B"], ["cat", "dog"]) == 1.0
    with pytest.raises(ValueError):
        S.score("bleu", "x", ["x"])
