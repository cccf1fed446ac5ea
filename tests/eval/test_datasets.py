"""``--data`` parsing: the generated shapes split and the JSONL format, with line-numbered errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgeprune.eval.datasets import EvalDataError, load_data
from edgeprune.eval.shapes import QUESTION_TYPES, make_sample


@pytest.fixture
def data_dir(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    return tmp_path


def write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_shapes_split_is_deterministic_and_balanced():
    items, desc = load_data("shapes:8:5")
    again, _ = load_data("shapes:8:5")
    assert [i.question for i in items] == [i.question for i in again]
    assert desc == {"kind": "shapes", "n": 8, "seed": 5, "spec": "shapes:8:5"}
    assert {i.type for i in items} == set(QUESTION_TYPES)
    assert all(i.scorer == ("yesno" if i.type == "exist" else "exact") for i in items)
    assert load_data("shapes:50", limit=3)[0][2].id == "shapes-1-2"  # default held-out seed 1, limit applies


def test_shapes_answers_follow_the_objects():
    s = make_sample(1, 4)
    for q, a, t in s.questions:
        if t == "color":
            shape = q.split()[-1].rstrip("?")
            assert [o.color for o in s.objects if o.shape == shape] == [a]
        if t == "exist":
            c, sh = q.rstrip("?").split()[-2:]
            assert ((c, sh) in {(o.color, o.shape) for o in s.objects}) == (a == "yes")


def test_shapes_patch_labels_cover_the_objects():
    s = make_sample(0, 0)
    labels = s.patch_labels()
    assert labels.shape == (576,)
    assert set(np.unique(labels)) - {0} == {o.label for o in s.objects}


def test_jsonl_scorers_follow_the_fields(data_dir):
    path = write(data_dir / "d.jsonl", [
        {"image": "a.png", "question": "colour?", "answer": "red", "type": "color"},
        {"image": "a.png", "question": "q", "answers": ["x"] * 10},
        "",
        "# a comment",
        {"image": "a.png", "question": "dog?", "answer": "No"},
        {"image": str(data_dir / "a.png"), "question": "pet?", "choices": ["cat", "dog"], "answer": "dog", "id": "m"},
    ])
    items, desc = load_data(path)
    assert [i.scorer for i in items] == ["exact", "vqa", "yesno", "choice"]
    assert [i.type for i in items] == ["color", "vqa", "yesno", "choice"]
    assert [i.id for i in items] == ["line-1", "line-2", "line-5", "m"]
    assert items[3].answers == ["B"] and "B. dog" in items[3].question
    assert items[0].load_image().size == (8, 8)
    assert desc["n"] == 4


@pytest.mark.parametrize("line, message", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    ("[1, 2]", "d.jsonl:2: expected a JSON object"),
    ('{"image": "a.png"}', "d.jsonl:2: missing or empty 'question'"),
    ('{"image": "b.png", "question": "q", "answer": "x"}', "d.jsonl:2: image"),
    ('{"image": "a.png", "question": "q"}', "d.jsonl:2: needs 'answer'"),
    ('{"image": "a.png", "question": "q", "answers": []}', "d.jsonl:2: 'answers' must be"),
    ('{"image": "a.png", "question": "q", "choices": ["a", "b"], "answer": "Z"}', "d.jsonl:2: answer 'Z'"),
])
def test_jsonl_errors_name_the_line(data_dir, line, message):
    path = write(data_dir / "d.jsonl", [{"image": "a.png", "question": "q", "answer": "x"}, line])
    with pytest.raises(EvalDataError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_data(path)


@pytest.mark.parametrize("spec", ["shapes:x", "shapes:0", "shapes:1:2:3", "data.csv", "missing.jsonl"])
def test_bad_specs(spec):
    with pytest.raises(EvalDataError):
        load_data(spec)
