"""Panacea and random-perturbation callbacks: step math by hand, clamp, fit-end application, LoRA,
post-hoc mode, resume, DDP (2 CPU processes), and the safety-affinity report."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from immunize.callbacks import Panacea, RandomPerturbation
from helpers.finetune import H_SET, Recorder, crash_and_resume, data, module, params_of, run_ddp_finetune, trainer
from immunize.callbacks.panacea import draw_indices, panacea_step
from immunize.datamodules.collate import pad_right
from immunize.lightning_modules import CausalLMModule
from immunize.lightning_modules.functional.grad_math import masked_ce

REPO = Path(__file__).resolve().parents[1]


def flat_grad(loss, params):
    return [g for g in torch.autograd.grad(loss, params)]


# ----- step math -----------------------------------------------------------------------------------
def test_step_eps_and_optimizer_gradient_match_hand_computation(tmp_path):
    rho, lam = 0.7, 0.5
    m, rec = module(optimizer="sgd", lr=1e-2), Recorder()
    pan = Panacea(rho=rho, lam=lam, harmful=H_SET, harmful_batch_size=4, loss_clamp=None)
    trainer(tmp_path, [pan, rec], max_steps=1).fit(m, data())
    step = rec.steps[0]
    assert all(torch.equal(step["before"][n], step["at_hook"][n]) for n in step["before"])  # exact restore

    ref = module()  # same seeded init = the weights at step 0
    assert all(torch.equal(p, step["before"][n]) for n, p in ref.model.named_parameters())
    names = [n for n, _ in ref.model.named_parameters()]
    params = list(ref.model.parameters())
    b = step["batch"]
    g_task = flat_grad(masked_ce(ref.model(b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]), params)
    hb = pad_right([pan.rows[i] for i in draw_indices(len(pan.rows), 4, 0, 0, 1, 0)], 0)
    h = lambda: masked_ce(ref.model(hb["input_ids"], attention_mask=hb["attention_mask"]).logits, hb["labels"])  # noqa: E731
    g0 = flat_grad(h(), params)
    norm = torch.cat([g.reshape(-1) for g in g0]).norm()
    eps = [rho * g / (norm + 1e-7) for g in g0]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    g1 = flat_grad(h(), params)
    for n, e in zip(names, eps):
        assert torch.allclose(pan.eps[n], e, rtol=1e-4, atol=1e-7), n
    expected = [gt - lam * (a - c) for gt, a, c in zip(g_task, g1, g0)]
    diff = max(float((step["grad"][n] - e).abs().max()) for n, e in zip(names, expected))
    assert diff < 1e-6
    moved = max(float((e - gt).abs().max()) for e, gt in zip(expected, g_task))
    assert moved > 100 * diff  # the correction is visible, not lost in the tolerance


def quadratic(w, a):
    return lambda: 0.5 * ((w - a) ** 2).sum()


@pytest.mark.parametrize("clamp,zeroed", [(None, False), (100.0, False), (1.0, True)])
def test_clamp_zeroes_perturbed_gradient_above_threshold(clamp, zeroed):
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |w - a| = 5, h(w) = 12.5, h(w + eps) = 0.5 * (5 + rho)^2
    a, rho, lam = torch.zeros(2), 1.0, 0.1
    eps, corr, stats = panacea_step(quadratic(w, a), [w], rho, lam, clamp)
    assert torch.allclose(eps[0], torch.tensor([0.6, 0.8]), atol=1e-6)
    assert torch.equal(w.detach(), torch.tensor([3.0, 4.0]))
    assert stats["h_perturbed"] == pytest.approx(18.0) and stats["clamped"] == float(zeroed)
    grad_w, grad_pert = torch.tensor([3.0, 4.0]), torch.tensor([3.6, 4.8])
    expected = lam * grad_w if zeroed else -lam * (grad_pert - grad_w)
    assert torch.allclose(corr[0], expected, atol=1e-6)


def test_harmful_draws_cycle_and_split_ranks():
    one = [draw_indices(10, 4, k, 0, 1, 0) for k in range(5)]
    stream = [i for batch in one for i in batch]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    r0, r1 = draw_indices(10, 4, 0, 0, 2, 0), draw_indices(10, 4, 0, 1, 2, 0)
    assert r0 + r1 == stream[:8]  # ranks take consecutive slices of the same stream


# ----- fit end -------------------------------------------------------------------------------------
def test_eps_added_once_at_fit_end_and_exported(tmp_path):
    m, rec = module(), Recorder()
    pan = Panacea(harmful=H_SET, harmful_batch_size=4)
    tr = trainer(tmp_path, [pan, rec])
    tr.fit(m, data())
    for n, p in m.model.named_parameters():
        assert torch.equal(p.detach(), rec.at_train_end[n] + pan.eps[n]), n
    pan.on_fit_end(tr, m)  # a second call must not add it again
    assert all(torch.equal(p.detach(), rec.at_train_end[n] + pan.eps[n]) for n, p in m.model.named_parameters())
    saved = load_file(pan.eps_path)
    assert pan.eps_path == tmp_path / "panacea_eps.safetensors" and set(saved) == set(pan.eps)
    assert all(torch.equal(saved[n], pan.eps[n]) for n in saved)
    norm = torch.cat([e.reshape(-1) for e in saved.values()]).norm()
    assert float(norm) == pytest.approx(1.0, rel=1e-5)
    reloaded = CausalLMModule(model=str(m.export(tmp_path / "export")))
    assert all(torch.equal(p, dict(m.model.named_parameters())[n]) for n, p in reloaded.model.named_parameters())


def test_lora_eps_lives_on_lora_tensors_only(tmp_path):
    m, rec = module(lora=True), Recorder()
    base = {n: p.clone() for n, p in params_of(m).items() if "lora_" not in n}
    pan = Panacea(harmful=H_SET, harmful_batch_size=4)
    trainer(tmp_path, [pan, rec]).fit(m, data())
    assert pan.eps and all("lora_" in n for n in pan.eps)
    assert all(torch.equal(p, base[n]) for n, p in params_of(m).items() if "lora_" not in n)
    with safe_open(str(pan.eps_path), "pt") as f:
        meta, saved = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["space"] == "lora"
    # merged-space deltas: exported (merged) weights minus the merged weights without eps
    exported = CausalLMModule(model=str(m.export(tmp_path / "export")))
    no_eps = copy.deepcopy(m.model)
    with torch.no_grad():
        for n, p in no_eps.named_parameters():
            if n in rec.at_train_end and "lora_" in n:
                p.copy_(rec.at_train_end[n])
    merged0 = dict(no_eps.merge_and_unload().named_parameters())
    merged1 = dict(exported.model.named_parameters())
    deltas = {k: v for k, v in saved.items() if "lora_" not in k}
    assert deltas and set(deltas) <= set(merged1)
    assert len(deltas) == 2 * 2  # q_proj and v_proj in 2 layers
    for k, d in deltas.items():
        assert torch.allclose(merged1[k] - merged0[k], d, atol=1e-6), k


# ----- post-hoc mode -------------------------------------------------------------------------------
@pytest.mark.parametrize("lora,limit", [(False, None), (True, 0)])
def test_post_hoc_respects_rho_and_keeps_other_weights(tmp_path, lora, limit):
    m = module(lora=lora)
    before = params_of(m)
    pan = Panacea(rho=0.5, harmful=H_SET, harmful_batch_size=4, mode="post_hoc", post_hoc_steps=3, loss_clamp=None)
    kw = {"max_steps": 0} if limit is None else {"max_steps": -1, "max_epochs": 1, "limit_train_batches": limit}
    tr = trainer(tmp_path, [pan], **kw)
    tr.fit(m, data())
    assert tr.global_step == 0 and pan.eps is not None  # on_fit_end ran although nothing trained
    norm = float(torch.cat([e.reshape(-1) for e in pan.eps.values()]).norm())
    assert norm <= 0.5 * (1 + 1e-6)
    after = params_of(m)
    for n, p in after.items():
        if n in pan.eps:
            assert torch.equal(p, before[n] + pan.eps[n]), n
        else:
            assert torch.equal(p, before[n]), n
    assert len(pan.last_stats["post_hoc"]) == 3
    assert (tmp_path / "panacea_eps_post_hoc.json").exists()


# ----- random perturbation -------------------------------------------------------------------------
def test_random_perturbation_statistics_and_determinism(tmp_path):
    sigma = 0.02
    m = module()
    before = params_of(m)
    trainer(tmp_path, [RandomPerturbation(sigma=sigma, seed=3)], max_steps=0).fit(m, data())
    noise = torch.cat([(p - before[n]).reshape(-1) for n, p in params_of(m).items()])
    count = noise.numel()
    assert abs(float(noise.mean())) < 4 * sigma / count ** 0.5
    assert float(noise.std()) == pytest.approx(sigma, rel=0.02)

    def noised(seed):
        other = module()
        cb = RandomPerturbation(sigma=sigma, seed=seed)
        cb.on_fit_end(None, other)
        cb.on_fit_end(None, other)  # exactly once
        return params_of(other)

    same, diff = noised(3), noised(4)
    assert all(torch.equal(same[n], p) for n, p in params_of(m).items())
    assert not all(torch.equal(diff[n], p) for n, p in params_of(m).items())


# ----- resume ------------------------------------------------------------------------------------
def test_resumed_fit_matches_uninterrupted(tmp_path):
    """One batch per epoch (n = batch_size = 8) and a checkpoint at the end of epoch 2 (step 2). The datamodule's
    shuffle generator is not checkpointed (a resumed loader replays epoch 1's order), so only epochs of one full
    batch (order affects nothing but summation order) resume exactly; Panacea's own draws are checkpointed."""
    (full, full_pan), (resumed, res_pan) = crash_and_resume(
        tmp_path, lambda: (module(), Panacea(harmful=H_SET, harmful_batch_size=4, lam=0.1)))
    assert res_pan.draws == full_pan.draws == 4
    for n, p in params_of(full).items():
        assert torch.allclose(params_of(resumed)[n], p, atol=1e-5, rtol=0), n
        assert torch.allclose(res_pan.eps[n], full_pan.eps[n], atol=1e-5, rtol=0), n


# ----- DDP -----------------------------------------------------------------------------------------
def test_ddp_ranks_hold_identical_weights_and_eps(tmp_path, cli):
    proc = run_ddp_finetune(cli, tmp_path, [
        {"class_path": "immunize.callbacks.Panacea", "init_args": {"harmful": vars(H_SET), "harmful_batch_size": 4}},
        {"class_path": "tests.helpers.ranks.DumpState", "init_args": {"out_dir": str(tmp_path)}}], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["draws"] == r1["draws"] == 2
    assert all(torch.equal(r0["eps"][n], r1["eps"][n]) for n in r0["eps"])
    assert all(torch.equal(r0["params"][n], r1["params"][n]) for n in r0["params"])
    exported = CausalLMModule(model=str(tmp_path / "export"))
    assert all(torch.equal(p, r0["params"][n]) for n, p in exported.model.named_parameters())
    assert (tmp_path / "root" / "panacea_eps.safetensors").exists()


# ----- safety affinity -----------------------------------------------------------------------------
def test_affinity_report_on_lora_fit(tmp_path):
    from immunize.affinity import _eval_parts, _evaluate, markdown_table, safety_affinity

    m, pan = module(lora=True), Panacea(harmful=H_SET, harmful_batch_size=4)
    trainer(tmp_path, [pan]).fit(m, data())
    export = m.export(tmp_path / "export")
    cfg = {"model": {"init_args": {"judge": "oracle", "max_new_tokens": 4}},
           "data": {"init_args": {"batch_size": 64, "n_harmful_per_category": 1, "n_per_task": 2, "sources": [{"kind": "toy"}]}},
           "trainer": {"accelerator": "cpu"}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    rows = safety_affinity(str(export), str(pan.eps_path), str(tmp_path / "aff"), str(tmp_path / "eval.yaml"))
    assert [r["group"] for r in rows] == ["none", "layer 0", "layer 1", "all"]
    assert sum(r["eps_share"] for r in rows[1:-1]) == pytest.approx(1.0)
    assert all(r["trained_eps_norm"] > 0 for r in rows[1:-1])  # LoRA eps norms reported per layer
    direct = _evaluate(*_eval_parts(tmp_path / "eval.yaml", str(export)), tmp_path / "direct")
    assert rows[-1]["harmful_score"] == direct["harmful_score"] and rows[-1]["capability"] == direct["capability"]
    assert (tmp_path / "aff" / "affinity.png").stat().st_size > 0
    assert (tmp_path / "aff" / "affinity.md").read_text().endswith(markdown_table(rows))


def test_random_perturbation_of_a_given_norm():
    m = module()
    before = params_of(m)
    cb = RandomPerturbation(sigma=0.01, seed=1, norm=0.3)
    cb.on_fit_end(None, m)
    delta = torch.cat([(p - before[n]).reshape(-1) for n, p in params_of(m).items()])
    assert float(delta.norm()) == pytest.approx(0.3, rel=1e-5) and cb.noise_norm == pytest.approx(0.3, rel=1e-5)
