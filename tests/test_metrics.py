"""match_answer modes, HarmfulScore / TaskAccuracy on known inputs, and exact sum-sync across 2 gloo ranks."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from immunize.errors import UserError
from immunize.metrics import HarmfulScore, TaskAccuracy, match_answer


@pytest.mark.parametrize("mode,pred,ref,expected", [
    ("exact", "  Paris .", "paris", True),
    ("exact", "New   York!</s>", "new york", True),
    ("exact", "paris city", "paris", False),
    ("label", "positive .", "positive", True),
    ("label", "Negative", "positive", False),
    ("label", "this is negative, not positive", "positive", False),
    ("label", "the answer: POSITIVE!", "positive", True),
    ("label", "positively great", "positive", False),
    ("label", "Sci/Tech", "Sci/Tech", True),
    ("label", "sports", "tech", False),
    ("final_number", "3 + 4 = 7 . the final answer is : 7", "7", True),
    ("final_number", "The final answer is: 1,234", "1234", True),
    ("final_number", "The Final Answer Is 8. then 9", "8", True),
    ("final_number", "the final answer is: 5 ... The final answer is: 6", "5", False),
    ("final_number", "we get 10 then 12", "12", True),
    ("final_number", "we get 10 then 12.0", "12", True),
    ("final_number", "no digits here", "3", False),
    ("final_number", "-4", "-4", True),
])
def test_match_answer(mode, pred, ref, expected):
    assert match_answer(mode, pred, ref) is expected


def test_match_answer_unknown_mode():
    with pytest.raises(UserError, match="exact"):
        match_answer("fuzzy", "a", "a")


def test_harmful_score_values():
    m = HarmfulScore(["crime", "weapons", "fraud"])
    m.update(torch.tensor([1.0, 0.0, 1.0]), ["crime", "crime", "weapons"])
    m.update([0.5, 0.0], ["weapons", None])
    out = m.compute()
    assert set(out) == {"harmful_score", "harmful_score/crime", "harmful_score/weapons"}
    assert out["harmful_score"].item() == pytest.approx(100 * 2.5 / 5)
    assert out["harmful_score/crime"].item() == pytest.approx(50.0)
    assert out["harmful_score/weapons"].item() == pytest.approx(75.0)
    with pytest.raises(UserError, match="drugs"):
        m.update([1.0], ["drugs"])
    with pytest.raises(UserError):
        m.update([1.0, 0.0], ["crime"])


def test_task_accuracy_values():
    m = TaskAccuracy({"sentiment": "label", "arithmetic": "final_number", "facts": "exact"})
    m.update(["sentiment", "sentiment", "arithmetic"], ["positive .", "negative", "the final answer is : 7"],
             ["positive", "positive", "7"])
    m.update(["sentiment", "arithmetic"], ["positive", "8"], ["positive", "7"])
    out = m.compute()
    assert set(out) == {"accuracy/sentiment", "accuracy/arithmetic", "capability"}
    assert out["accuracy/sentiment"].item() == pytest.approx(200 / 3)
    assert out["accuracy/arithmetic"].item() == pytest.approx(50.0)
    assert out["capability"].item() == pytest.approx((200 / 3 + 50) / 2)
    with pytest.raises(UserError, match="poetry"):
        m.update(["poetry"], ["x"], ["y"])
    with pytest.raises(UserError, match="fuzzy"):
        TaskAccuracy({"t": "fuzzy"})


CATS = ["crime", "weapons", "fraud"]
TASKS = {"sentiment": "label", "arithmetic": "final_number"}
SHARDS = [
    {"scores": [1.0, 0.0, 0.25], "cats": ["crime", "weapons", "crime"],
     "tasks": ["sentiment", "arithmetic"], "preds": ["positive", "the final answer is: 3"], "refs": ["positive", "4"]},
    {"scores": [1.0, 1.0], "cats": ["fraud", "crime"],
     "tasks": ["sentiment", "sentiment", "arithmetic"], "preds": ["negative", "negative .", "4"],
     "refs": ["positive", "negative", "4"]},
]


def _metrics(shards):
    harm, acc = HarmfulScore(CATS), TaskAccuracy(TASKS)
    for s in shards:
        harm.update(s["scores"], s["cats"])
        acc.update(s["tasks"], s["preds"], s["refs"])
    return {k: float(v) for k, v in {**harm.compute(), **acc.compute()}.items()}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = _metrics([SHARDS[rank]])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_sync_across_two_ranks(tmp_path):
    # fork (where available) lets the ranks reuse the parent's imports: spawning re-imports torchmetrics (slow).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method)
    expected = _metrics(SHARDS)
    assert expected["harmful_score/fraud"] == pytest.approx(100.0)
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        assert got.keys() == expected.keys()
        for k in expected:
            assert got[k] == pytest.approx(expected[k], abs=1e-5), k
