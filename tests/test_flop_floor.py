"""The FLOP floors of benchmarks/flop_floor.py against the matmul FLOPs our steps really run (FlopCounterMode)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import step_cost  # noqa: E402
from benchmarks.flop_floor import RECIPES, StepShape, floor_in_sft_steps  # noqa: E402

# A small Llama with a vocabulary large against its width, so the head and the logit lens carry real weight in the
# count (as on SmolLM2: vocab 49152 at width 576); eager attention, whose matmuls the counter sees on CPU.
SHAPE = dict(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, attn_implementation="eager")


@pytest.fixture(scope="module")
def counted():
    step_cost.METHODS.clear()
    step_cost.METHODS.update({k: v for k, v in step_cost.registry_methods().items() if k in ("sft", "seam", "repnoise", "booster")})
    batch = step_cost.make_batch(SHAPE["vocab_size"], batch_size=4, length=32, prompt=8)
    out = {}
    for name, method in step_cost.METHODS.items():
        module = step_cost.build(name, "toy:tiny", SHAPE, seed=0)
        flops = step_cost.StepFlops()
        part = batch if method.part is None else batch[method.part]
        step_cost.run_steps(module, part, 1, [flops, *method.callbacks()])
        out[name] = (flops.flops[-1], step_cost.step_shape(module, batch), dict(module.hparams))
    return out


def test_sft_floor_is_the_counted_matmuls(counted):
    flops, shape, _ = counted["sft"]
    assert shape.supervised == 4 * 24  # 32 - 8 prompt positions per row, the last has no next label
    assert flops == pytest.approx(RECIPES["sft"](shape, {}), rel=0.01)


@pytest.mark.parametrize("method", ["seam", "repnoise", "booster"])
def test_multi_pass_steps_run_no_matmul_their_floor_does_not_count(method, counted):
    """Counted / floor near 1: the step projects only supervised positions (a full-position head or lens would be
    ~25% more head FLOPs here) and runs the passes its recipe names."""
    flops, shape, hparams = counted[method]
    ratio = flops / counted["sft"][0]
    floor = floor_in_sft_steps(method, shape, hparams)
    assert floor == pytest.approx(ratio, rel=0.03)


def test_seam_floor_grows_with_the_lens_share():
    """SEAM's floor is 17 forwards over SFT's 3 plus 3 head projections per layer: larger vocabularies cost more."""
    sizes = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64, tied=True, batch=4,
                 length=128, supervised=4 * 96)
    small, real = StepShape(vocab=49152 // 16, **sizes), StepShape(vocab=49152, **sizes)
    assert 17 / 3 < floor_in_sft_steps("seam", small) < floor_in_sft_steps("seam", real)
    assert floor_in_sft_steps("seam", real, {"beta": 0.0, "use_unlearning": False}) == pytest.approx(1.0)
