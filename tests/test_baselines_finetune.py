"""Fine-tuning-stage baselines: Lisa (bi-state optimization with a proximal term) and Antidote (post-fine-tuning
Wanda pruning). Gradients and masks by hand on toy:tiny, schedule, resume, LoRA merge, the CLI, and DDP."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file

# Shared test helpers of the Panacea tests (tests/ is on sys.path under pytest's default import mode);
from helpers.finetune import ATTACK, BENIGN, H_SET, Crash, Recorder, data, module, params_of, trainer  # noqa: F401

from callbacks import Antidote, Lisa
from callbacks.antidote import decoder_linears, wanda_mask
from callbacks.lisa import ALIGNMENT, USER, lisa_phase
from callbacks.base import draw_indices
from datamodules import Source
from datamodules.catalog import as_examples, load_records
from datamodules.collate import encode_example, pad_right
from lightning_modules import CausalLMModule
from lightning_modules.grad_math import masked_ce

REPO = Path(__file__).resolve().parents[1]
PAIRS = Source(kind="toy", part="pairs", split="align", limit=30)


def grads_at(weights: dict, batch: dict) -> dict[str, torch.Tensor]:
    """Response-only CE gradient of a fresh toy:tiny holding `weights`, on `batch`."""
    ref = module()
    with torch.no_grad():
        for n, p in ref.model.named_parameters():
            p.copy_(weights[n])
    loss = masked_ce(ref.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    names, params = zip(*ref.model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


def encoded(source: Source, use: str, tokenizer) -> list[dict]:
    return [encode_example(tokenizer, "qa", e.prompt, e.response, 256) for e in as_examples(load_records(source), use)]


# ----- Lisa ----------------------------------------------------------------------------------------
def test_lisa_phase_schedule_alternates():
    assert [lisa_phase(s, 2, 3) for s in range(11)] == [ALIGNMENT] * 2 + [USER] * 3 + [ALIGNMENT] * 2 + [USER] * 3 + [ALIGNMENT]
    assert {lisa_phase(s, 100, 900) for s in range(100)} == {ALIGNMENT}
    assert {lisa_phase(s, 100, 900) for s in range(100, 1000)} == {USER} and lisa_phase(1000, 100, 900) == ALIGNMENT
    assert {lisa_phase(s, 0, 4) for s in range(9)} == {USER} and {lisa_phase(s, 3, 0) for s in range(9)} == {ALIGNMENT}


def test_lisa_gradients_match_hand_computation(tmp_path, toy_tokenizer):
    """Steps A A U U A. Alignment step 1: grad f_align(w1; alignment draw 1) + rho (w1 - w0); user step 3:
    grad g(w3; user batch) + rho (w3 - w2): each anchored at the other phase's last weights."""
    rho, bs = 0.5, 3
    m, rec = module(optimizer="sgd", lr=0.05), Recorder()
    lisa = Lisa(alignment=PAIRS, rho=rho, alignment_steps=2, user_steps=2, batch_size=bs)
    trainer(tmp_path, [lisa, rec], max_steps=5).fit(m, data())
    assert len(rec.steps) == 5 and lisa.draws == 3

    rows = encoded(PAIRS, "refusal", toy_tokenizer)
    hand = [pad_right([rows[i] for i in draw_indices(len(rows), bs, d, 0, 1, 0)], toy_tokenizer.pad_token_id) for d in range(3)]
    for step, draw in ((0, 0), (1, 1), (4, 2)):  # alignment steps trained on the alignment batches, in draw order
        assert all(torch.equal(rec.steps[step]["batch"][k], hand[draw][k]) for k in hand[draw]), step
    for step in (2, 3):  # user steps: the user's batch (HarmfulMix, 4 rows), not an alignment batch (3 rows)
        assert rec.steps[step]["batch"]["input_ids"].shape[0] == 4

    def check(step: int, anchor_step: int) -> None:
        w, anchor = rec.steps[step]["before"], rec.steps[anchor_step]["before"]
        g = grads_at(w, rec.steps[step]["batch"])
        expected = {n: g[n] + rho * (w[n] - anchor[n]) for n in g}
        diff = max(float((rec.steps[step]["grad"][n] - e).abs().max()) for n, e in expected.items())
        prox = max(float((rho * (w[n] - anchor[n])).abs().max()) for n in g)
        assert diff < 1e-6, (step, diff)
        assert (prox == 0) if anchor_step == step else (prox > max(100 * diff, 1e-5)), (step, diff, prox)  # visible

    check(0, 0)  # first alignment step: anchored at the initial weights (proximal term 0)
    check(1, 0)  # alignment, anchor = initial weights (the "other state" before any user phase)
    check(2, 2)  # first user step: anchor = the weights the alignment phase ended with
    check(3, 2)
    check(4, 4)  # back to alignment: anchor = the weights the user phase ended with
    assert lisa.anchor_phase == ALIGNMENT and all(torch.equal(lisa.anchor[n], rec.steps[4]["before"][n]) for n in lisa.anchor)


def test_lisa_lora_anchor_and_warmup(tmp_path):
    """With LoRA only the adapters carry the anchor and the proximal gradient; proximal_warmup 0.5 of 4 steps
    leaves steps 0 and 1 without it (alignment step 1 gets the pure alignment gradient)."""
    m, rec = module(lora=True, optimizer="sgd", lr=0.05), Recorder()
    lisa = Lisa(alignment=PAIRS, rho=1.0, alignment_steps=2, user_steps=2, batch_size=3, proximal_warmup=0.5)
    trainer(tmp_path, [lisa, rec], max_steps=4).fit(m, data())
    assert lisa.anchor and all("lora_" in n for n in lisa.anchor)
    lora = [n for n in rec.steps[1]["grad"] if "lora_" in n]
    before = rec.steps[1]["before"]
    m2 = module(lora=True)
    with torch.no_grad():
        for n, p in m2.model.named_parameters():
            p.copy_(before[n])
    b = rec.steps[1]["batch"]
    params = [p for n, p in m2.model.named_parameters() if n in lora]
    g = torch.autograd.grad(masked_ce(m2.model(b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]), params)
    assert all(torch.allclose(rec.steps[1]["grad"][n], gi, atol=1e-7) for n, gi in zip(lora, g))
    assert lisa.last_drift is not None and lisa.last_drift > 0  # step 3 (past the warmup) had the proximal term


def test_lisa_resumed_fit_matches_uninterrupted(tmp_path):
    """Steps A U U A; checkpoint after step 1 (one batch per epoch), crash at step 3. The resumed step 2 must use the
    anchor taken at step 1 (restored from the checkpoint) and step 3 the next alignment draw."""
    def run(root, extra=(), ckpt_path=None, **kw):
        torch.manual_seed(0)
        m, lisa = module(), Lisa(alignment=PAIRS, rho=1.0, alignment_steps=1, user_steps=2, batch_size=4)
        tr = trainer(root, [lisa, *extra], max_steps=4, max_epochs=-1, **kw)
        try:
            tr.fit(m, data(n=8, batch_size=8), ckpt_path=ckpt_path)
        except RuntimeError as err:
            assert "simulated crash" in str(err)
        return m, lisa

    full, full_lisa = run(tmp_path / "full")
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    run(tmp_path / "crash", extra=[ckpt, Crash(at_step=3)], enable_checkpointing=True)
    path = tmp_path / "ckpt" / "epoch=1-step=2.ckpt"
    assert path.exists(), sorted(os.listdir(tmp_path / "ckpt"))
    resumed, res_lisa = run(tmp_path / "resumed", ckpt_path=str(path))
    assert res_lisa.draws == full_lisa.draws == 2 and res_lisa.anchor_phase == full_lisa.anchor_phase == ALIGNMENT
    for n, p in params_of(full).items():
        assert torch.allclose(params_of(resumed)[n], p, atol=1e-5, rtol=0), n


# ----- Antidote ------------------------------------------------------------------------------------
def test_wanda_mask_matches_hand_computation():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    act = torch.tensor([1.0, 2.0, 0.5, 4.0])
    # scores |W| * act: row 0 = [1, 4, 1.5, 2], row 1 = [4, 2, 0.5, 8]
    assert wanda_mask(w, act, 0.5).tolist() == [[False, True, False, True], [True, False, False, True]]
    assert wanda_mask(w, act, 0.25).tolist() == [[False, True, False, False], [False, False, False, True]]
    assert not wanda_mask(w, act, 0.0).any() and wanda_mask(w, act, 1.0).all()
    assert wanda_mask(w, torch.ones(4), 0.25).tolist() == [[False, False, True, False], [True, False, False, False]]  # magnitude
    assert wanda_mask(torch.ones(1, 4), torch.ones(4), 0.5).tolist() == [[True, True, False, False]]  # ties: lower column
    assert int(wanda_mask(torch.randn(3, 10), torch.rand(10), 0.7).sum(1).unique()) == 7  # floor(10 * 0.7) despite float
    with pytest.raises(ValueError):
        wanda_mask(w, torch.ones(3), 0.1)


def hand_antidote(weights: dict, batches: list[dict], ratio: float, sequential: bool) -> dict[str, torch.Tensor]:
    """Expected pruned weights: a fresh toy:tiny with `weights`; capture every decoder linear's inputs with hooks,
    sqrt(sum over real tokens of x^2) per feature, wanda_mask, zero; layer by layer (earlier layers pruned) or at once."""
    ref = module()
    with torch.no_grad():
        for n, p in ref.model.named_parameters():
            p.copy_(weights[n])
    layers = decoder_linears(ref.model)
    for stage in ([[i] for i in range(len(layers))] if sequential else [list(range(len(layers)))]):
        targets = [t for i in stage for t in layers[i]]
        seen = {n: [] for n, _ in targets}
        hooks = [lin.register_forward_hook(lambda mod, inp, out, n=n: seen[n].append(inp[0].detach())) for n, lin in targets]
        with torch.no_grad():
            for b in batches:
                ref.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        for h in hooks:
            h.remove()
        for n, lin in targets:
            sq = torch.zeros(lin.in_features)
            for x, b in zip(seen[n], batches):
                sq += x[b["attention_mask"].bool()].pow(2).sum(0)
            with torch.no_grad():
                lin.weight.masked_fill_(wanda_mask(lin.weight, sq.sqrt(), ratio), 0)
    return params_of(ref)


@pytest.mark.parametrize("sequential", [False, True])
def test_antidote_prunes_exactly_the_expected_weights(tmp_path, toy_tokenizer, sequential):
    ratio, n_cal, bs = 0.25, 6, 4
    m, rec = module(), Recorder()
    ad = Antidote(harmful=H_SET, dense_ratio=ratio, n_calibration=n_cal, batch_size=bs, sequential=sequential)
    trainer(tmp_path, [rec, ad], max_steps=1).fit(m, data())
    rows = encoded(H_SET, "harmful", toy_tokenizer)[:n_cal]
    batches = [pad_right(rows[i:i + bs], toy_tokenizer.pad_token_id) for i in range(0, n_cal, bs)]
    expected = hand_antidote(rec.at_train_end, batches, ratio, sequential)
    after = params_of(m)
    linears = {f"{n}.weight" for layer in decoder_linears(m.model) for n, _ in layer}
    assert len(linears) == 2 * 7  # q k v o gate up down in 2 layers
    for n, p in after.items():
        assert torch.equal(p, expected[n]), n
        if n in linears:  # exactly floor(in * ratio) new zeros per row (the fine-tuned weights have none)
            assert not (rec.at_train_end[n] == 0).any()
            assert (p == 0).sum(1).tolist() == [int(p.shape[1] * ratio)] * p.shape[0], n
        else:  # embeddings, norms, lm_head untouched
            assert torch.equal(p, rec.at_train_end[n]), n
    assert ad.report["pruned_total"] == sum(int((after[n] == 0).sum()) for n in linears)
    assert ad.report["n_calibration"] == n_cal and (tmp_path / "antidote.json").exists()


def test_antidote_merges_lora_then_prunes_merged_weights(tmp_path):
    ratio = 0.1
    m, rec = module(lora=True), Recorder()
    ad = Antidote(harmful=H_SET, dense_ratio=ratio, n_calibration=4, batch_size=4, report_file=None)
    tr = trainer(tmp_path, [rec, ad], max_steps=1)
    tr.fit(m, data())
    assert not hasattr(m.model, "merge_and_unload") and ad.report["lora_merged"]
    w = rec.at_train_end
    for layer in range(2):
        stem = f"base_model.model.model.layers.{layer}.self_attn"
        for proj, lora in (("q_proj", True), ("k_proj", False), ("v_proj", True)):
            base = w[f"{stem}.{proj}.base_layer.weight" if lora else f"{stem}.{proj}.weight"]
            merged = base + 2.0 * w[f"{stem}.{proj}.lora_B.default.weight"] @ w[f"{stem}.{proj}.lora_A.default.weight"] if lora else base
            pruned = dict(m.model.named_parameters())[f"model.layers.{layer}.self_attn.{proj}.weight"].detach()
            keep = pruned != 0
            assert (~keep).sum(1).tolist() == [int(pruned.shape[1] * ratio)] * pruned.shape[0], (layer, proj)
            assert torch.allclose(pruned[keep], merged[keep], atol=1e-6), (layer, proj)
    before = params_of(m)
    ad.on_fit_end(tr, m)  # exactly once
    assert all(torch.equal(p, before[n]) for n, p in params_of(m).items())
    reloaded = CausalLMModule(model=str(m.export(tmp_path / "export")))
    assert all(torch.equal(p, before[n]) for n, p in reloaded.model.named_parameters())


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
        zeros = {k: (v == 0).sum(1) for k, v in weights.items() if ".layers." in k and v.dim() == 2}
        assert len(zeros) == 14 and all(z.tolist() == [int(weights[k].shape[1] * 0.1)] * len(z) for k, z in zeros.items())
        assert (log_dir / "antidote.json").exists()


def test_ddp_lisa_and_antidote_keep_ranks_identical(tmp_path, cli):
    """2 CPU processes: Lisa (A A U U; each rank draws its own alignment batch) then Antidote (calibration split over
    ranks, statistics all-reduced): every rank ends with the same weights, pruned as expected."""
    cfg = {
        "model": {"class_path": "lightning_modules.SFT", "init_args": {"model": "toy:tiny", "lr": 1e-3}},
        "data": {"class_path": "datamodules.HarmfulMix", "init_args": {
            "benign": vars(BENIGN), "harmful": vars(ATTACK), "n": 16, "p": 0.25, "batch_size": 4}},
        "trainer": {"max_steps": 4, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "root"), "callbacks": [
                        {"class_path": "callbacks.Lisa", "init_args": {"alignment": vars(PAIRS), "alignment_steps": 2,
                                                                       "user_steps": 2, "batch_size": 4}},
                        {"class_path": "callbacks.Antidote", "init_args": {"harmful": vars(H_SET), "n_calibration": 6,
                                                                           "batch_size": 2, "dense_ratio": 0.1}},
                        {"class_path": "tests.helpers.ranks.DumpParameters", "init_args": {"dirpath": str(tmp_path / "dump")}}]},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = cli("fit", "--config", "cfg.yaml", "--trainer.strategy", "ddp", "--trainer.devices", "2",
               "--trainer.accelerator", "cpu", "--export_dir", "export", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / "dump" / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    q = r0["model.model.layers.0.self_attn.q_proj.weight"]
    assert (q == 0).sum(1).tolist() == [int(q.shape[1] * 0.1)] * q.shape[0]
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert torch.equal(exported["model.layers.0.self_attn.q_proj.weight"], q)
