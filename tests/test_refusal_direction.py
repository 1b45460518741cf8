"""Refusal-direction ablation, the math and the model-level pieces: refusal score, KL, the reference's filter and
choice, the post-instruction positions of a template, and the weight orthogonalisation, which must give the model
the hook ablation gives (and a residual stream with no component along the direction)."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from immunize.datamodules.collate import encode_prompt
from immunize.datamodules.refusal_prompts import default_refusal_words, post_instruction_count
from immunize.errors import UserError
from immunize.lightning_modules.functional.direction_ablation import (ablate_direction, add_to_layer_input,
                                                                      candidate_scores, orthogonalize_model)
from immunize.lightning_modules.functional.refusal_direction import (discard_reason, kl_divergence, mean_difference,
                                                                     refusal_score, select_candidate, unit)


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random biases, so the orthogonalisation of biases is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def block_inputs_and_output(model, ids):
    """(each decoder layer's input as the layer sees it, the last layer's output, the logits)."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).clone()),
                                             with_kwargs=True) for layer in model.model.layers]
    hooks.append(model.model.layers[-1].register_forward_hook(lambda m, a, out: seen.append(out.clone())))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    return seen[:-1], seen[-1], logits


def test_refusal_score_and_kl_are_the_references_formulas():
    logits = torch.randn(3, 7)
    p = torch.softmax(logits.double(), -1)[:, [1, 4]].sum(-1)
    assert torch.allclose(refusal_score(logits, [1, 4]), torch.log(p + 1e-8) - torch.log(1 - p + 1e-8))
    other = torch.randn(3, 7)
    a, b = torch.softmax(logits.double(), -1), torch.softmax(other.double(), -1)
    expected = (a * (torch.log(a + 1e-6) - torch.log(b + 1e-6))).sum(-1)
    assert torch.allclose(kl_divergence(logits, other), expected)
    assert kl_divergence(logits, logits).abs().max() < 1e-12
    diff = mean_difference(torch.full((2,), 6.0), 3, torch.full((2,), 2.0), 2)
    assert diff.dtype == torch.float64 and diff.tolist() == [1.0, 1.0]
    with pytest.raises(UserError, match="n_train"):
        mean_difference(torch.zeros(2), 0, torch.zeros(2), 2)


def test_the_filter_and_the_choice_follow_select_direction():
    # int(32 * 0.8) = 25: layer 25 is pruned, 24 is not
    assert discard_reason(-1.0, 1.0, 0.05, 24, 32) is None
    assert discard_reason(-1.0, 1.0, 0.05, 25, 32) == "late_layer"
    assert discard_reason(-1.0, 1.0, 0.11, 3, 32) == "kl"
    assert discard_reason(-1.0, -0.01, 0.05, 3, 32) == "induce"
    assert discard_reason(math.nan, 1.0, 0.05, 3, 32) == "nan"
    off = {"kl_threshold": None, "induce_threshold": None, "prune_fraction": None}
    assert discard_reason(-1.0, -5.0, 9.0, 31, 32, **off) is None
    rows = [{"layer": 0, "bypass": -3.0, "discarded": "kl"}, {"layer": 1, "bypass": -1.0, "discarded": None},
            {"layer": 2, "bypass": -2.0, "discarded": None}]
    assert select_candidate(rows)["layer"] == 2
    with pytest.raises(UserError, match="filtered out") as err:
        select_candidate([{"bypass": 0.0, "discarded": "kl"}])
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="norm"):
        unit(torch.zeros(4))


@pytest.mark.parametrize("tied", [False, True])
def test_orthogonalised_weights_equal_the_hook_ablation(tied):
    model = tiny_llama(tied)
    ids = torch.randint(0, 40, (2, 6))
    r = torch.randn(16, dtype=torch.float64)
    r_hat = (r / r.norm()).float()
    with ablate_direction(model, r):
        hooked_inputs, hooked_out, hooked_logits = block_inputs_and_output(model, ids)
    head_before = model.lm_head.weight.detach().clone()
    untouched = {n: p.detach().clone() for n, p in model.named_parameters()
                 if any(k in n for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "norm"))}
    orthogonalize_model(model, r)
    inputs, out, logits = block_inputs_and_output(model, ids)
    for a, b in zip(inputs, hooked_inputs):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(out, hooked_out, atol=1e-5) and torch.allclose(logits, hooked_logits, atol=1e-5)
    for h in [*inputs, out]:  # the residual stream has no component along r_hat anywhere
        assert (h @ r_hat).abs().max() < 1e-5
    assert torch.equal(model.lm_head.weight, head_before)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert all(torch.equal(p, untouched[n]) for n, p in model.named_parameters() if n in untouched)
    # the writers themselves: W <- W - r_hat r_hat^T W on the d_model side, biases included
    o_proj = model.model.layers[1].self_attn.o_proj
    assert (r_hat @ o_proj.weight).abs().max() < 1e-5 and (o_proj.bias @ r_hat).abs() < 1e-5
    assert (model.model.embed_tokens.weight @ r_hat).abs().max() < 1e-5


def test_candidate_scores_are_the_reference_interventions():
    model = tiny_llama(False)
    harmful = [{"input_ids": torch.randint(0, 40, (3, 5)), "attention_mask": torch.ones(3, 5, dtype=torch.long)}]
    harmless = [{"input_ids": torch.randint(0, 40, (4, 5)), "attention_mask": torch.ones(4, 5, dtype=torch.long)}]
    candidates = torch.randn(2, 3, 16, dtype=torch.float64)
    candidates[-2, 0] = 0.0
    rows = candidate_scores(model, candidates, harmful, harmless, [1, 2], prune_fraction=0.2)
    by_cell = {(r["position"], r["layer"]): r for r in rows}
    assert len(rows) == 6 and by_cell[(-1, 2)]["discarded"] == "late_layer" and math.isnan(by_cell[(-1, 2)]["bypass"])
    assert by_cell[(-2, 0)]["discarded"] == "zero"
    row = by_cell[(-1, 1)]
    r = candidates[-1, 1]

    def reference_ablation_hook(module, args, output=None):  # hook_utils.get_direction_ablation_*_hook, in place
        act = (output if output is not None else args)[0]
        d = (r / (r.norm() + 1e-8)).to(act)
        act -= (act @ d).unsqueeze(-1) * d

    hooks = [layer.register_forward_pre_hook(reference_ablation_hook) for layer in model.model.layers]
    hooks += [m.register_forward_hook(reference_ablation_hook) for layer in model.model.layers
              for m in (layer.self_attn,)]
    hooks += [layer.mlp.register_forward_hook(lambda m, a, out: out - (out @ (r / r.norm()).float()).unsqueeze(-1)
                                              * (r / r.norm()).float()) for layer in model.model.layers]
    with torch.no_grad():
        bypass = refusal_score(model(**harmful[0]).logits[:, -1], [1, 2]).mean().item()
        ablated_harmless = model(**harmless[0]).logits[:, -1]
    for h in hooks:
        h.remove()
    with torch.no_grad():
        plain = model(**harmless[0]).logits[:, -1]
        handle = model.model.layers[1].register_forward_pre_hook(lambda m, a: (a[0] + r.float(), *a[1:]))
        induce = refusal_score(model(**harmless[0]).logits[:, -1], [1, 2]).mean().item()
        handle.remove()
    assert row["bypass"] == pytest.approx(bypass, abs=1e-5)
    assert row["kl"] == pytest.approx(kl_divergence(plain, ablated_harmless).mean().item(), abs=1e-6)
    assert row["induce"] == pytest.approx(induce, abs=1e-5)
    with add_to_layer_input(model, 1, r), torch.no_grad():
        again = refusal_score(model(**harmless[0]).logits[:, -1], [1, 2]).mean().item()
    assert again == pytest.approx(induce, abs=1e-6)
    fixed = candidate_scores(model, candidates, harmful, harmless, [1, 2], cells=[(-1, 2)])
    assert [r["discarded"] for r in fixed].count("not_scored") == 5 and not math.isnan(fixed[-1]["bypass"])


def test_post_instruction_positions_of_the_templates(toy_tokenizer):
    prompts = ["how do i fix a chair ?", "tom has 3 apples ."]
    for template, expected in (("qa", 2), ("plain", 0), ("chat", 1)):
        encoded = [encode_prompt(toy_tokenizer, template, p) for p in prompts]
        assert post_instruction_count(toy_tokenizer, template, encoded) == expected, template
    assert default_refusal_words(toy_tokenizer) == ["i", "sorry"]
