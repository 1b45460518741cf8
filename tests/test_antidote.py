"""Antidote: the Wanda mask by hand, exact pruning of the reference's targets (q/k/v, LoRA matrices) and of the
"merged" option (sequential or not). The application against the reference: test_conformance_antidote.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Shared test helpers of the Panacea tests (tests/ is on sys.path under pytest's default import mode);
from helpers.finetune import encoded, H_SET, Recorder, data, module, module_with, params_of, trainer

from immunize.callbacks import Antidote
from immunize.callbacks.antidote import decoder_linears, wanda_mask
from immunize.datamodules import Source
from immunize.datamodules.collate import pad_right
from immunize.lightning_modules import CausalLMModule

REPO = Path(__file__).resolve().parents[1]
PAIRS = Source(kind="toy", part="pairs", split="align", limit=30)


# ----- Antidote ------------------------------------------------------------------------------------
def test_wanda_mask_matches_hand_computation():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    act = torch.tensor([1.0, 2.0, 0.5, 4.0])
    # scores |W| * act: row 0 = [1, 4, 1.5, 2], row 1 = [4, 2, 0.5, 8]
    assert wanda_mask(w, act, 0.5).tolist() == [[False, True, False, True], [True, False, False, True]]
    assert wanda_mask(w, act, 0.25).tolist() == [[False, True, False, False], [False, False, False, True]]
    assert not wanda_mask(w, act, 0.0).any() and wanda_mask(w, act, 1.0).all()
    assert wanda_mask(w, torch.ones(4), 0.25).tolist() == [[False, False, True, False], [True, False, False, False]]  # magnitude
    assert wanda_mask(torch.ones(1, 4), torch.ones(4), 0.5).tolist() == [[False, False, True, True]]  # ties: higher column
    assert int(wanda_mask(torch.randn(3, 10), torch.rand(10), 0.7).sum(1).unique()) == 7  # 10 - int(10 * 0.3)
    assert int(wanda_mask(torch.randn(2, 4096), torch.rand(4096), 0.1).sum(1).unique()) == 410  # the reference's count
    with pytest.raises(ValueError):
        wanda_mask(w, torch.ones(3), 0.1)


def hand_antidote(weights: dict, batches: list[dict], ratio: float, sequential: bool, target: str) -> dict[str, torch.Tensor]:
    """Expected pruned weights: a fresh toy:tiny with `weights`; capture every decoder linear's inputs with hooks,
    sqrt(sum over real tokens of x^2) per feature, wanda_mask, zero; layer by layer (earlier layers pruned) or at once."""
    ref = module_with(weights)
    layers = decoder_linears(ref.model, target)
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


@pytest.mark.parametrize("sequential,target", [(False, "auto"), (True, "merged"), (False, "merged")])
def test_antidote_prunes_exactly_the_expected_weights(tmp_path, toy_tokenizer, sequential, target):
    """Full fine-tuning: "auto" prunes the q/k/v projections (the reference), "merged" every decoder linear."""
    ratio, n_cal, bs = 0.25, 6, 4
    m, rec = module(), Recorder()
    ad = Antidote(harmful=H_SET, dense_ratio=ratio, n_calibration=n_cal, batch_size=bs, sequential=sequential,
                  target=target)
    trainer(tmp_path, [rec, ad], max_steps=1).fit(m, data())
    rows = encoded(H_SET, "harmful", toy_tokenizer)[:n_cal]
    batches = [pad_right(rows[i:i + bs], toy_tokenizer.pad_token_id) for i in range(0, n_cal, bs)]
    resolved = "qkv" if target == "auto" else target
    expected = hand_antidote(rec.at_train_end, batches, ratio, sequential, resolved)
    after = params_of(m)
    linears = {f"{n}.weight" for layer in decoder_linears(m.model, resolved) for n, _ in layer}
    assert len(linears) == 2 * (3 if target == "auto" else 7)  # q k v (o gate up down) in 2 layers
    for n, p in after.items():
        assert torch.equal(p, expected[n]), n
        if n in linears:  # exactly floor(in * ratio) new zeros per row (the fine-tuned weights have none)
            assert not (rec.at_train_end[n] == 0).any()
            assert (p == 0).sum(1).tolist() == [p.shape[1] - int(p.shape[1] * (1 - ratio))] * p.shape[0], n
        else:  # embeddings, norms, lm_head untouched
            assert torch.equal(p, rec.at_train_end[n]), n
    assert ad.report["pruned_total"] == sum(int((after[n] == 0).sum()) for n in linears)
    assert ad.report["n_calibration"] == n_cal and (tmp_path / "antidote.json").exists()
    assert ad.report["target"] == resolved and sum(ad.report["pruned_by_type"].values()) == ad.report["pruned_total"]


def test_antidote_prunes_only_the_lora_matrices_of_a_lora_fine_tune(tmp_path):
    """The reference's default: lora_A and lora_B are pruned, unmerged; base weights and the rest stay."""
    ratio = 0.25
    m, rec = module(lora=True), Recorder()
    ad = Antidote(harmful=H_SET, dense_ratio=ratio, n_calibration=4, batch_size=4, report_file=None)
    trainer(tmp_path, [rec, ad], max_steps=1).fit(m, data())
    assert hasattr(m.model, "merge_and_unload") and ad.report["target"] == "lora" and not ad.report["lora_merged"]
    after = params_of(m)
    for n, p in after.items():
        if ".lora_" in n and "layers." in n:
            cols = p.shape[1]
            assert (p == 0).sum(1).tolist() == [cols - int(cols * (1 - ratio))] * p.shape[0], n
        else:
            assert torch.equal(p, rec.at_train_end[n]), n
    assert set(ad.report["pruned_by_type"]) == {f"self_attn.{proj}.lora_{ab}" for proj in ("q_proj", "v_proj")
                                                for ab in "AB"}


def test_antidote_merges_lora_then_prunes_merged_weights(tmp_path):
    ratio = 0.1
    m, rec = module(lora=True), Recorder()
    ad = Antidote(harmful=H_SET, dense_ratio=ratio, n_calibration=4, batch_size=4, report_file=None, target="merged",
                  sequential=True)
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
            cols = pruned.shape[1]
            assert (~keep).sum(1).tolist() == [cols - int(cols * (1 - ratio))] * pruned.shape[0], (layer, proj)
            assert torch.allclose(pruned[keep], merged[keep], atol=1e-6), (layer, proj)
    before = params_of(m)
    ad.on_fit_end(tr, m)  # exactly once
    assert all(torch.equal(p, before[n]) for n, p in params_of(m).items())
    reloaded = CausalLMModule(model=str(m.export(tmp_path / "export")))
    assert all(torch.equal(p, before[n]) for n, p in reloaded.model.named_parameters())


