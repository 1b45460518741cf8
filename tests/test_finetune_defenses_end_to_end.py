"""Lisa and Antidote through the CLI with their configs, and under DDP (ranks identical)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Shared test helpers of the Panacea tests (tests/ is on sys.path under pytest's default import mode);
from helpers.finetune import H_SET, run_ddp_finetune

from immunize.datamodules import Source

REPO = Path(__file__).resolve().parents[1]
PAIRS = Source(kind="toy", part="pairs", split="align", limit=30)


# ----- end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lisa", "antidote"])
def test_finetune_config_runs_end_to_end(tmp_path, cli, name):
    export = tmp_path / "export"
    proc = cli("fit", "--config", str(REPO / "configs" / "finetune" / "toy.yaml"),
               "--config", str(REPO / "configs" / "finetune" / f"{name}.yaml"), "--trainer.max_steps", "3",
               "--export_dir", str(export), "--model.init_args.model", "toy:tiny", "--trainer.log_every_n_steps", "1",
               "--trainer.enable_progress_bar", "false", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = load_file(str(export / "model.safetensors"))
    log_dir = next((tmp_path / "runs" / "toy" / "finetune").glob("version_*"))
    if name == "lisa":  # steps 0, 1 alignment, 2 user (2 / 8 split)
        with open(log_dir / "metrics.csv") as f:
            reader = csv.reader(f)
            columns, rows = next(reader), list(reader)
        phase = [float(r[columns.index("lisa/alignment_phase")]) for r in rows if r[columns.index("lisa/alignment_phase")]]
        assert phase == [1.0, 1.0, 0.0] and "lisa/drift" in columns
    else:
        # the toy config: a full fine-tune, so the q/k/v projections, one weight per row (dense_ratio 1e-5)
        zeros = {k: (v == 0).sum(1) for k, v in weights.items() if ".layers." in k and v.dim() == 2 and (v == 0).any()}
        assert len(zeros) == 2 * 3 and all(k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj") for k in zeros)
        assert all(z.tolist() == [1] * len(z) for z in zeros.values())
        assert (log_dir / "antidote.json").exists()


def test_ddp_lisa_and_antidote_keep_ranks_identical(tmp_path, cli):
    """2 CPU processes: Lisa (A A U U; each rank draws its own alignment batch) then Antidote (calibration split over
    ranks, statistics all-reduced): every rank ends with the same weights, pruned as expected."""
    proc = run_ddp_finetune(cli, tmp_path, [
        {"class_path": "immunize.callbacks.Lisa", "init_args": {"alignment": vars(PAIRS), "alignment_steps": 2,
                                                                "user_steps": 2, "batch_size": 4}},
        {"class_path": "immunize.callbacks.Antidote", "init_args": {"harmful": vars(H_SET), "n_calibration": 6,
                                                                    "batch_size": 2, "dense_ratio": 0.1}},
        {"class_path": "tests.helpers.ranks.DumpParameters", "init_args": {"dirpath": str(tmp_path / "dump")}}], 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / "dump" / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    q = r0["model.model.layers.0.self_attn.q_proj.weight"]
    assert (q == 0).sum(1).tolist() == [q.shape[1] - int(q.shape[1] * 0.9)] * q.shape[0]
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert torch.equal(exported["model.layers.0.self_attn.q_proj.weight"], q)
