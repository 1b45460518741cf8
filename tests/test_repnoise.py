"""RepNoise: its terms against the plain functions."""
from __future__ import annotations


import pytest
import torch

from immunize.lightning_modules import RepNoise
from immunize.lightning_modules.functional.mmd import mmd2
from helpers.alignment import ce, first_batch, run
from helpers.math import naive_logit_lens


# ----- RepNoise ----------------------------------------------------------------------------------------
def test_repnoise_terms_match_the_plain_functions():
    """CE on refusals, mean over layers of MMD^2(masked MLP outputs, noise), and H from the shared logit lens."""
    module = RepNoise(model="toy:tiny", alpha=1.0, beta=1e-3)
    batch = first_batch(module)
    harmful, model = batch["harmful"], module.model
    torch.manual_seed(7)
    ce_refusal, l_noise, h = module.repnoise_terms(batch)

    mlp_out = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, out: mlp_out.append(out)) for layer in model.model.layers]
    out = run(model, harmful, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    mask = (harmful["labels"] != -100).unsqueeze(-1).float()
    torch.manual_seed(7)
    noise = [mmd2((a * mask).flatten(1), (torch.randn(a.shape) * mask).flatten(1)) for a in mlp_out]
    assert len(noise) == 2
    assert float(l_noise) == pytest.approx(float(torch.stack(noise).mean()), rel=1e-5)
    lens = naive_logit_lens(out.hidden_states, out.logits, harmful["labels"], model.lm_head, model.model.norm)
    assert float(h) == pytest.approx(float(lens), rel=1e-6)
    assert float(ce_refusal) == pytest.approx(float(ce(model, batch["refusal"])), rel=1e-6)


