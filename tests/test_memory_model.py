"""The memory model of benchmarks/memory.py: parameter counts against real models, FSDP2 sharding, buffer counts
against the passes, and one prediction against a measured peak (step_cost's profiler, CPU)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import memory  # noqa: E402
from benchmarks.memory import METHOD_BUFFERS, ModelShape, Setup, method_passes, predict  # noqa: E402

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
CONFIGS = {
    "tied": dict(SMALL, num_key_value_heads=4, tie_word_embeddings=True),
    "untied_gqa": dict(SMALL, num_key_value_heads=2, tie_word_embeddings=False),
    "head_dim": dict(SMALL, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False),
}
TOLERANCE = 0.05  # prediction vs the profiler's measured peak, relative


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_is_the_real_models(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = CONFIGS[name]
    model = LlamaForCausalLM(LlamaConfig(**config))
    shape = ModelShape.of(config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert shape.layer_params() == sum(p.numel() for p in model.model.layers[0].parameters())


def test_lora_count_is_peft_trainable_count():
    from transformers import LlamaConfig, LlamaForCausalLM

    from immunize.lightning_modules.modeling.lora import apply_lora

    config = CONFIGS["untied_gqa"]
    spec = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    model = apply_lora(LlamaForCausalLM(LlamaConfig(**config)), spec)
    assert ModelShape.of(config).lora_params(spec) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_real_shapes_have_their_published_sizes():
    """Llama 2 7B has 6.74B parameters, Llama 3 8B 8.03B, Llama 3 70B 70.6B (their model cards)."""
    for name, billions in (("llama2-7b", 6.74), ("llama3-8b", 8.03), ("llama3-70b", 70.55)):
        assert ModelShape.of(memory.SHAPES[name]).params() / 1e9 == pytest.approx(billions, rel=0.005)


def test_buffer_table_matches_the_passes_and_the_registry():
    from benchmarks.step_cost import registry_methods

    assert set(METHOD_BUFFERS) == set(registry_methods())
    for method, (count, reason) in METHOD_BUFFERS.items():
        assert reason
        assert max(p.buffers for p in method_passes(method)) == count, method
    toy_tar = method_passes("tar", {"inner_steps": 4, "tr_every": 2})  # the attacker's moments in every inner pass
    assert max(p.buffers for p in toy_tar) == 4 and toy_tar[1].buffers == 4


def test_fsdp_halves_the_sharded_components():
    shape = ModelShape.of(memory.SHAPES["llama2-7b"])
    for method in ("sft", "seam", "lisa"):
        one = predict(shape, method, Setup(strategy="single"))
        two = predict(shape, method, Setup(strategy="fsdp", gpus=2))
        assert two["peak_pass"] == one["peak_pass"], method
        for part in ("weights", "optimizer", "gradients"):
            assert two["components"][part] == pytest.approx(one["components"][part] / 2, rel=1e-6), (method, part)
        assert two["components"]["activations"] >= one["components"]["activations"]  # every position projected


def test_more_buffers_predict_more():
    shape = ModelShape.of(memory.SHAPES["llama3-8b"])
    for strategy, gpus in (("ddp", 8), ("fsdp", 8)):
        peak = {m: predict(shape, m, Setup(strategy=strategy, gpus=gpus))["peak_bytes"] for m in ("sft", "booster", "seam")}
        assert peak["sft"] < peak["booster"] < peak["seam"], (strategy, peak)


def test_lora_and_bf16_true():
    shape = ModelShape.of(memory.SHAPES["llama2-7b"])
    full = predict(shape, "seam", Setup())
    lora = predict(shape, "seam", Setup(lora=dict(memory.LORA_DEFAULTS)))
    assert lora["peak_bytes"] < full["peak_bytes"] / 3  # the base weights stay, everything gradient-sized is tiny
    assert "refused" in predict(shape, "seam", Setup(precision="bf16-true"))
    assert "refused" in predict(shape, "panacea", Setup(precision="bf16-true"))
    assert "refused" not in predict(shape, "panacea", Setup(precision="bf16-true", lora=dict(memory.LORA_DEFAULTS)))


def test_bad_input_is_one_line_and_exit_code_2(capsys):
    for argv, named in ((["--model", "llama9"], "llama9"), (["--methods", "sft,nope"], "nope"),
                        (["--strategies", "zero3"], "zero3"), (["--gpus", "0"], "--gpus")):
        with pytest.raises(SystemExit) as exit_:
            memory.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err


def test_markdown_says_what_fits_where(capsys):
    assert memory.main(["--model", "llama2-7b", "--strategies", "ddp,fsdp", "--gpus", "8", "--markdown"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith(("| method", "| ---"))]
    assert [r.split("|")[1].strip() for r in rows] == list(METHOD_BUFFERS)
    assert "does not fit" in out and "fits 80 GB" in out  # 7B full fine-tuning: not on one GPU's share under DDP


def test_prediction_is_within_tolerance_of_a_measured_peak():
    """SFT and SEAM (the most buffers) on the validation Llama, second step, profiler allocation events: under 15 s."""
    model, batch_size, length = "llama-tiny", 4, 64
    config, shape = memory.SHAPES[model], ModelShape.of(memory.SHAPES[model])
    batch = memory.validation_batch(model, batch_size, length)
    for method in ("sft", "seam"):
        measured, hparams, supervised = memory.measure_single(method, config, batch)
        setup = Setup(batch_size, length, supervised, "32-true", strategy="single", device="cpu", hparams=hparams)
        assert predict(shape, method, setup)["peak_bytes"] == pytest.approx(measured, rel=TOLERANCE), method


def _reduce_scatter_rank(rank: int, port: int, queue) -> None:
    """One of 2 gloo ranks: 8 reduce-scatters of a 4 MiB input (into 2 MiB), nothing kept; the profile's totals."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    prof.start()
    for _ in range(8):
        full, out = torch.ones(1 << 20), torch.empty(1 << 19)
        dist.reduce_scatter_tensor(out, full)
        del full, out
    prof.stop()
    events = memory.collective_allocation_events(prof)
    queue.put((rank, events[-1][1], max(total for _, total in events)))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_measurement_puts_back_the_frees_gloo_hides():
    """Gloo's reduce-scatter clones its input and often frees the clone on a worker thread the profiler does not
    follow (the raw running total then drifts up by 4 MiB each time): the FSDP2 validation's events end at 0 and
    peak at input + output + clone on both ranks, every time."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_reduce_scatter_rank, args=(port, queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    mib = 1 << 20
    assert [(end, peak) for _, end, peak in results] == [(0, 10 * mib)] * 2
