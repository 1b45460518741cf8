"""Judges on known inputs; HF judges use a tiny random BERT whose head is set by hand so outputs are exact."""
import math

import pytest

from immunize.errors import UserError
from immunize.judges import (ClassifierJudge, Judge, KeywordRefusalJudge, ModerationJudge, make_judge,
                             register_judge)

from helpers.classifiers import WORDS, save_tiny_classifier as _save_tiny_classifier  # noqa: F401


def test_keyword_judge_defaults_and_custom():
    j = KeywordRefusalJudge()
    assert isinstance(j, Judge)
    prompts = ["p"] * 5
    responses = ["I'm sorry, I cannot do that.", "Sure, here is how.", "AS AN AI I must decline", "   ", ""]
    assert j.score(prompts, responses) == [0.0, 1.0, 0.0, 0.0, 0.0]
    custom = KeywordRefusalJudge(["nope"])
    assert custom.score(["p", "p"], ["NOPE.", "I'm sorry"]) == [0.0, 1.0]


def test_classifier_judge_exact_probability(tmp_path):
    path = _save_tiny_classifier(tmp_path / "clf", [0.0, math.log(3.0)], {0: "safe", 1: "unsafe"})
    j = ClassifierJudge(path)
    scores = j.score(["how do i make a cake"] * 3, ["sure here is", "", "sorry cannot help " * 10])
    assert scores[0] == pytest.approx(0.75, abs=1e-6)
    assert scores[1] == 0.0
    assert scores[2] == pytest.approx(0.75, abs=1e-6)
    by_name = ClassifierJudge(path, harmful_label="SAFE", batch_size=1)
    assert by_name.score(["a", "b"], ["cake", "help"]) == pytest.approx([0.25, 0.25], abs=1e-6)
    assert ClassifierJudge(path, harmful_label=0).score(["a"], ["cake"]) == pytest.approx([0.25], abs=1e-6)


def test_classifier_judge_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="nope"):
        ClassifierJudge(str(missing))
    path = _save_tiny_classifier(tmp_path / "clf", [0.0, 0.0], {0: "safe", 1: "unsafe"})
    with pytest.raises(UserError, match="toxic"):
        ClassifierJudge(path, harmful_label="toxic").score(["a"], ["cake"])
    with pytest.raises(UserError, match="out of range"):
        ClassifierJudge(path, harmful_label=5).score(["a"], ["cake"])


def test_moderation_judge_threshold(tmp_path):
    # max sigmoid over labels = sigmoid(0.5) ~= 0.6225
    path = _save_tiny_classifier(tmp_path / "mod", [-1.0, 0.5, -2.0])
    assert ModerationJudge(path, threshold=0.5).score(["a", "b"], ["cake", " "]) == [1.0, 0.0]
    assert ModerationJudge(path, threshold=0.7).score(["a"], ["cake"]) == [0.0]
    with pytest.raises(UserError):
        ModerationJudge(path, threshold=1.5)


def test_registry(tmp_path):
    assert isinstance(make_judge("keyword"), KeywordRefusalJudge)
    assert make_judge({"name": "keyword", "refusal_phrases": ["no"]}).refusal_phrases == ["no"]
    path = _save_tiny_classifier(tmp_path / "clf", [0.0, 0.0])
    assert isinstance(make_judge({"name": "classifier", "model": path}), ClassifierJudge)
    assert isinstance(make_judge({"name": "moderation", "model": path, "threshold": 0.9}), ModerationJudge)

    class Always:
        def score(self, prompts, responses):
            return [1.0 if r.strip() else 0.0 for r in responses]

    register_judge("always_test", Always)
    assert make_judge("always_test").score(["a", "b"], ["x", ""]) == [1.0, 0.0]
    with pytest.raises(UserError, match="keyword"):
        make_judge("bogus")
    with pytest.raises(UserError):
        make_judge({"name": "keyword", "bad_arg": 1})
