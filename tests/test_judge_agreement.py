"""Judge agreement (immunize.judges.agreement) on known inputs, and `immunize judges` end to end: several judges over
the same generations, with a scripted language-model judge, a resumed run and bad input."""
import json
import math

import numpy as np
import pytest

from helpers.scripted_lm import byte_tokenizer, register, scripted_judge_model
from immunize.judges import command as judge_command
from immunize.errors import UserError
from immunize.judges.agreement import agreement, cohen_kappa, flags
from immunize.judges import register_judge
from immunize.metrics import HarmfulScore
from immunize.statistics import interval


def test_flags_and_kappa_on_known_values():
    assert np.array_equal(flags([0.9, 0.5, 0.49, None, float("nan")]), [1, 1, 0, np.nan, np.nan], equal_nan=True)
    a, b = np.array([1.0, 1, 0, 0]), np.array([1.0, 0, 0, 0])
    assert cohen_kappa(a, b) == pytest.approx(0.5)  # observed 0.75, chance 0.5*0.25 + 0.5*0.75 = 0.5
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert cohen_kappa(np.ones(3), np.ones(3)) is None, "undefined when both judges give one constant label"
    assert cohen_kappa(a, 1 - a) == pytest.approx(-1.0)
    assert cohen_kappa(np.array([np.nan]), np.array([1.0])) is None


def test_agreement_counts_unparseable_and_leaves_them_out_of_pairs():
    scores = {"oracle": [1, 1, 0, 0, 1, 0], "keyword": [1, 1, 1, 0, 1, 1], "llm": [1, float("nan"), 0, 0, 1, None]}
    result = agreement(scores)
    assert result["items"] == 6
    assert result["judges"]["llm"]["scored"] == 4 and result["judges"]["llm"]["unparseable"] == 2
    assert result["judges"]["oracle"]["flagged"][0] == pytest.approx(50.0)
    assert result["judges"]["keyword"]["flagged"][0] == pytest.approx(100 * 5 / 6)
    assert result["judges"]["llm"]["flagged"][0] == pytest.approx(50.0)  # 2 of the 4 it could score
    pairs = {(p["a"], p["b"]): p for p in result["pairs"]}
    assert pairs[("oracle", "keyword")]["items"] == 6
    assert pairs[("oracle", "keyword")]["agreement"][0] == pytest.approx(100 * 4 / 6)
    assert pairs[("oracle", "llm")]["items"] == 4 and pairs[("oracle", "llm")]["agreement"][0] == 100.0
    assert pairs[("oracle", "llm")]["kappa"] == 1.0
    low, high = pairs[("oracle", "keyword")]["agreement"][1:]
    assert low <= 100 * 4 / 6 <= high and low < high
    with pytest.raises(ValueError, match="same items"):
        agreement({"a": [1, 0], "b": [1]})


def test_unparseable_scores_leave_the_harmful_score_and_its_interval():
    metric = HarmfulScore(["crime", "fraud"])
    metric.update([1.0, float("nan"), 0.0, 1.0], ["crime", "crime", "fraud", None])
    out = metric.compute()
    assert float(out["harmful_score"]) == pytest.approx(100 * 2 / 3)
    assert float(out["harmful_score/crime"]) == 100.0 and float(out["judge/unparseable"]) == 1.0
    assert float(out["judge/unparseable_share"]) == pytest.approx(25.0)
    with_nan = interval(np.array([1.0, np.nan, 0.0, 1.0]), ["s"] * 4)
    without = interval(np.array([1.0, 0.0, 1.0]), ["s"] * 3)
    assert with_nan.value == pytest.approx(without.value) and 0 <= with_nan.low <= with_nan.high <= 100


def write_generations(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"kind": "harmful", "prompt": "alpha request", "answer": "Sure. Step 1: do it.", "category": "c1", "group": "g1",
     "judge_score": 1.0},
    {"kind": "harmful", "prompt": "bravo request", "answer": "I cannot help with that.", "category": "c1",
     "group": "g2", "judge_score": 0.0},
    {"kind": "harmful", "prompt": "charlie request", "answer": "Here you go: step 1.", "category": "c2",
     "group": "g3", "judge_score": 0.0},
    {"kind": "harmful", "prompt": "delta request", "answer": "Sure.", "category": "c2", "group": "g4",
     "judge_score": None},
    {"kind": "sentiment", "prompt": "good film?", "answer": "positive", "correct": True},
]


def test_judges_command_compares_recorded_keyword_and_a_language_model_judge(tmp_path):
    register()
    tok = byte_tokenizer()
    model = scripted_judge_model(tok, {"alpha": "unsafe\nS2", "bravo": "safe", "charlie": "unsafe", "delta": "hmm"})
    model.save_pretrained(tmp_path / "moderator")
    tok.save_pretrained(tmp_path / "moderator")
    write_generations(tmp_path / "bench" / "cells" / "a" / "generations.jsonl", ROWS[:2] + ROWS[4:])
    write_generations(tmp_path / "bench" / "cells" / "b" / "generations.jsonl", ROWS[2:4])
    spec = "{name: chat_moderator, model: %s, label: guard, max_new_tokens: 16}" % (tmp_path / "moderator")
    result = judge_command.run([str(tmp_path / "bench")], ["recorded", "keyword", spec], out=str(tmp_path / "out"),
                               progress=False)
    assert result["items"] == 4 and len(result["sources"]) == 2
    assert result["judges"]["recorded"]["unparseable"] == 1 and result["judges"]["guard"]["unparseable"] == 1
    assert result["judges"]["keyword"]["flagged"][0] == pytest.approx(75.0)
    assert result["judges"]["guard"]["flagged"][0] == pytest.approx(200 / 3)
    pairs = {(p["a"], p["b"]): p for p in result["pairs"]}
    assert pairs[("recorded", "guard")]["items"] == 3
    assert pairs[("recorded", "guard")]["agreement"][0] == pytest.approx(200 / 3)  # charlie: guard 1, recorded 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "judge_scores.jsonl").read_text().splitlines()]
    assert [r["scores"]["guard"] for r in rows] == [1.0, 0.0, 1.0, None]
    cached = [json.loads(line) for line in judge_command.cache_path(tmp_path / "out", "guard").read_text().splitlines()]
    assert cached[0]["label"] == "guard" and {r["output"] for r in cached[1:]} == {"unsafe\nS2", "safe", "unsafe", "hmm"}
    table = (tmp_path / "out" / "agreement.md").read_text()
    assert "| guard | 3 | 1 |" in table and "| recorded vs guard | 3 |" in table


class CountingJudge:
    """Scores 1.0 when the answer says 'Sure'; counts the items it was asked about; can stop mid-run."""

    calls: list = []
    stop_after: float = math.inf

    def score(self, prompts, responses):
        if len(CountingJudge.calls) >= CountingJudge.stop_after:
            raise KeyboardInterrupt("killed")
        CountingJudge.calls.append(len(prompts))
        return [float("Sure" in r) for r in responses]


def test_a_killed_judges_run_resumes_without_rescoring(tmp_path, monkeypatch):
    register_judge("counting", lambda **kw: CountingJudge())
    monkeypatch.setattr(judge_command, "CHUNK", 2)
    rows = [dict(ROWS[0], prompt=f"p{i}", answer="Sure" if i % 2 else "No") for i in range(7)]
    source = write_generations(tmp_path / "generations.jsonl", rows)
    CountingJudge.calls, CountingJudge.stop_after = [], 2
    with pytest.raises(KeyboardInterrupt):
        judge_command.run([str(source)], ["counting", "keyword"], out=str(tmp_path / "out"), progress=False)
    assert CountingJudge.calls == [2, 2]
    CountingJudge.calls, CountingJudge.stop_after = [], math.inf
    result = judge_command.run([str(source)], ["counting", "keyword"], out=str(tmp_path / "out"), progress=False)
    assert CountingJudge.calls == [2, 1], "only the 3 items the killed run had not scored"
    assert result["judges"]["counting"]["flagged"][0] == pytest.approx(100 * 3 / 7)
    changed = "{name: counting, label: counting, note: another spec}"
    CountingJudge.calls = []
    judge_command.run([str(source)], [changed], out=str(tmp_path / "out"), progress=False)
    assert sum(CountingJudge.calls) == 7, "a changed spec under the same label starts over"
    CountingJudge.calls = []
    judge_command.run([str(source), str(tmp_path)], [changed], out=str(tmp_path / "out"), progress=False)
    assert CountingJudge.calls == [], "the same file named twice (a folder and a file in it) is read once"


def test_a_changed_judge_model_or_a_damaged_cache(tmp_path):
    register_judge("counting", lambda **kw: CountingJudge())
    source = write_generations(tmp_path / "generations.jsonl", ROWS[:3])
    model = tmp_path / "judge_model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"1")
    spec = "{name: counting, model: %s, label: a/../b}" % model  # a label is a name, never a path
    CountingJudge.calls, CountingJudge.stop_after = [], math.inf
    judge_command.run([str(source)], [spec], out=str(tmp_path / "out"), progress=False)
    cache = judge_command.cache_path(tmp_path / "out", "a/../b")
    assert cache.parent == tmp_path / "out" / "scores" and cache.is_file() and CountingJudge.calls == [3]
    judge_command.run([str(source)], [spec], out=str(tmp_path / "out"), progress=False)
    assert CountingJudge.calls == [3], "same model files: cached"
    (model / "weights.bin").write_bytes(b"22")  # retrained
    judge_command.run([str(source)], [spec], out=str(tmp_path / "out"), progress=False)
    assert CountingJudge.calls == [3, 3], "changed model files: scored again"
    cache.write_text("{not json\n")
    with pytest.raises(UserError, match="damaged.*delete it"):
        judge_command.run([str(source)], [spec], out=str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("args,needle", [
    (["missing_dir", "--judge", "keyword"], "does not exist"),
    (["empty", "--judge", "keyword"], "no generations.jsonl"),
    (["benign.jsonl", "--judge", "keyword"], "no harmful rows"),
    (["g.jsonl"], "at least one --judge"),
    (["g.jsonl", "--judge", "nope"], "unknown judge 'nope'"),
    (["g.jsonl", "--judge", "{model: x}"], "needs a 'name' key"),
    (["g.jsonl", "--judge", "keyword", "--judge", "keyword"], "share a label"),
    (["g.jsonl", "--judge", "keyword", "--limit", "0"], "--limit must be >= 1"),
    (["g.jsonl", "--judge", "keyword", "--threshold", "1.5"], "--threshold must be in"),
])
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    write_generations(tmp_path / "benign.jsonl", ROWS[4:])
    write_generations(tmp_path / "g.jsonl", ROWS)
    proc = cli("judges", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_cli_prints_the_tables(cli, tmp_path):
    write_generations(tmp_path / "g.jsonl", ROWS)
    proc = cli("judges", "g.jsonl", "--judge", "recorded", "--judge", "keyword", "--out", "o")
    assert proc.returncode == 0, proc.stderr
    assert "| recorded vs keyword | 3 |" in proc.stdout and (tmp_path / "o" / "agreement.json").is_file()
