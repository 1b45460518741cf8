"""Predicted peak memory per GPU of each method's training step under DDP or FSDP2 on N GPUs; validated on CPU.

The prediction is arithmetic on the model's shapes (no model is built):

    peak = max over the passes of the method's step (method_passes) and its optimizer step of
           weights + optimizer state + gradient-sized tensors held + activations + transients (+ DDP's buckets)

- weights: 4 B/param (fp32 master weights; 2 B under bf16-true). LoRA: the frozen base is resident too; only the
  adapters train (4 B each: peft keeps them fp32). FSDP2: every weight / N; during a pass the root unit (embeddings,
  final norm, head: lightning_modules/modeling/sharding.py keeps it gathered from its forward to its backward) is whole, and
  while a layer is differentiated FSDP_GATHERED_LAYERS layers are gathered with two layers' unsharded gradients.
- optimizer: AdamW 2 states of the trainable tensors' dtype (8 B/param in fp32); SGD 0, or 1 state with momentum.
  The optimizer step holds a transient: foreach AdamW on a GPU one more state-sized list (the sqrt of the second
  moments), single-tensor AdamW on a CPU two temporaries of the largest tensor. FSDP2: / N.
- gradients: the one gradient every method has (SFT's p.grad; in a multi-pass step the one its current backward
  forms), 4 B/param, and METHOD_BUFFERS gradient-sized tensors held besides it (g_a, backups, estimates, Panacea's
  eps, Lisa's anchor, ...), counted from the code. FSDP2: all of them / N (they are shards). Lightning frees the
  previous p.grad only just before the backward, so in an automatic-optimization step the old gradient and the
  whole forward's activations coexist; a backward forms its gradient while it frees activations, so it holds
  max(activations + its head part, the whole gradient) (`pass_bytes`).
- activations (no activation checkpointing), `pass_activations`: per graph kept for a backward,
  `layer_activation_bytes` per token and decoder layer (the tensors HF's Llama saves), the final norm, and the
  [rows, vocab] fp32 log-probabilities of the response CE (rows: the supervised positions; under FSDP2 every
  position, as the model's own forward projects them all), plus the logits beside them in the forward and two
  vocabulary-sized gradients in the CE's backward. Method extras: the logit lens, RepNoise's MMD inputs, Vaccine's
  hidden-state eps, TAR's negative entropy over the full logits.
- DDP: the reducer's gradient buckets, one more gradient-sized buffer (Lightning's DDP wraps the module even on one
  device; strategy "single" is one process without it, as in step_cost's measurements).
Every step is taken at steady state: optimizer state exists, and Panacea's previous eps is still held.

Validation (`--validate`): step_cost's own machinery (its `build`, `run_steps`, `StepPeakMemory`: the CPU profiler's
allocation events over the second step, plus the parameter bytes) measures the peak of each method's step on a
small random Llama, in one process and, with `--fsdp`, under FSDP2 on 2 gloo processes (the strategy of
configs/trainer/cpu_fsdp.yaml; the frees of gloo's reduce-scatter temporaries, which the profiler misses, are put
back: `collective_allocation_events`); the prediction for the same shape (fp32, CPU optimizer, the toy configs'
settings) is printed next to it.
Usage: python benchmarks/memory.py --model llama2-7b --methods all --strategies ddp,fsdp --gpus 1,8 --batch 1
       --length 512 [--lora] [--precision bf16-mixed] [--json] [--markdown]
       python benchmarks/memory.py --validate [--fsdp] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import shapes, step_cost  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402
from immunize.errors import UserError, fail  # noqa: E402
from immunize.lightning_modules.modeling.lora import DEFAULTS as LORA_DEFAULTS  # noqa: E402

GIB = 1 << 30
STRATEGIES = ("single", "ddp", "fsdp")
PRECISIONS = ("bf16-mixed", "32-true", "bf16-true")
OPTIMIZERS = ("adamw", "sgd")
GPU_BYTES = {"80 GB": 80e9, "141 GB": 141e9}  # H100/A100 80 GB, H200 141 GB (marketed decimal gigabytes)
FIT_MARGIN = 0.9  # "fits": the prediction within 90% of the memory (CUDA context, NCCL buffers, fragmentation)
FSDP_PRESET = step_cost.REPO / "configs" / "trainer" / "cpu_fsdp.yaml"  # the FSDP2 validation's strategy
FSDP_GATHERED_LAYERS = 2  # in the backward: the layer being differentiated and the next one, prefetched

# method -> (gradient-sized fp32 tensors held at the step's peak besides the one gradient, why), read from the code.
METHOD_BUFFERS: dict[str, tuple[int, str]] = {
    "sft": (0, "only p.grad"),
    "adversarial": (0, "one loss, one backward: only p.grad"),
    "repnoise": (0, "one loss, one backward: only p.grad (its cost is activations: 2 graphs, lens, MMD)"),
    "vaccine": (0, "eps is per hidden state (activation-sized), never parameter-sized; pass 1 forms no weight "
                   "gradient"),
    "t_vaccine": (0, "Vaccine's; the frozen layers' gradients are formed and dropped (same p.grad)"),
    "booster": (2, "pass 2 (g_h' at w'): g_h and the fp32 weight backup held while g_h' is formed"),
    "tar": (4, "inner steps and L_TR passes at w_k: the retain gradient (the update, into which the weighted L_TR "
               "gradients are summed), the weight backup and the attacker's AdamW moments (2) held while the next "
               "gradient is formed"),
    "seam": (4, "estimate pass at theta + eps v_a: the update, g_a, g_b and the fp32 weight backup held while the "
                "estimate is formed (the pass at theta + eps v_b frees g_b and adds into the estimate in place)"),
    "panacea": (5, "its h(w + eps) pass: p.grad, the previous step's eps (self.eps, replaced only after the step), "
                   "grad h(w), the new eps and the weight backup held while grad h(w + eps) is formed"),
    "lisa": (2, "at a phase switch: the new anchor is cloned while the old one is still held (1 otherwise)"),
    "circuit_breakers": (0, "one loss, one backward: only p.grad (the originals' forwards keep no graph)"),
}
# Gradient-sized tensors that outlive the step (present at the optimizer step): Panacea's eps, Lisa's anchor.
PERSISTENT = {"panacea": 1, "lisa": 1, "tar": 1}  # TAR: the frozen original model of its retain term (full weights)
# Methods whose trainer precision check refuses bf16-true (MultiPassDefense: fp32 master weights), and those that
# need fp32 trainable weights (Panacea's setup; LoRA adapters are fp32, so LoRA over a bf16 base is allowed).
NEEDS_FP32_MASTER = ("seam", "booster", "tar")
NEEDS_FP32_TRAINABLE = ("panacea",)
NEEDS_LORA = ("circuit_breakers",)  # its originals are the model with the adapter switched off


@dataclass(frozen=True)
class ModelShape(shapes.ModelShape):
    """shapes.ModelShape with the LoRA adapters' size."""

    def lora_params(self, spec: dict) -> int:
        """Adapter parameters of LoRA rank spec["r"] on spec["target_modules"] of every layer: r * (in + out) each."""
        q = self.heads * self.head_dim
        sizes = {"q_proj": (self.hidden, q), "k_proj": (self.hidden, self.kv), "v_proj": (self.hidden, self.kv),
                 "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                 "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}
        targets = spec.get("target_modules", LORA_DEFAULTS["target_modules"])
        unknown = [m for m in targets if m not in sizes]
        if unknown:
            raise UserError(f"unknown LoRA target {unknown[0]!r}; choose from {sorted(sizes)}")
        r = spec.get("r", LORA_DEFAULTS["r"])
        return self.layers * sum(r * sum(sizes[m]) for m in targets)


@dataclass(frozen=True)
class Setup:
    """How the step is run: batch, precision, optimizer, LoRA, strategy and device.

    Args:
        batch: rows per batch part per GPU (a triplet step has three parts of this shape).
        length: tokens per row.
        supervised: supervised positions per part (None: every position, an upper bound).
        precision: bf16-mixed (fp32 weights, bf16 autocast), 32-true, or bf16-true (bf16 weights).
        optimizer: adamw or sgd; momentum: SGD's (a state when > 0).
        lora: train LoRA adapters of this spec instead of all weights (None: full fine-tuning).
        strategy: single (one process), ddp or fsdp (FSDP2 as lightning_modules/modeling/sharding.py shards).
        gpus: data-parallel ranks N.
        device: cuda (foreach AdamW) or cpu (single-tensor AdamW), for the optimizer step's transient.
        hparams: the method's settings that change a count (T-Vaccine's active_layers).
    """

    batch: int = 1
    length: int = 512
    supervised: Optional[int] = None
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    momentum: float = 0.0
    lora: Optional[dict] = None  # LoRA settings (peft LoraConfig fields; r and target_modules are read)
    strategy: str = "ddp"
    gpus: int = 1
    device: str = "cuda"
    hparams: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    @property
    def rows(self) -> int:
        """Rows of the response CE's head projection: supervised positions, every position under FSDP2."""
        if self.strategy == "fsdp" or self.supervised is None:
            return self.tokens
        return self.supervised


AUTOMATIC, NO_WEIGHT_GRAD, FORMING, ACCUMULATING, HELD = "automatic", "no_weight_grad", "forming", "accumulating", "held"


@dataclass(frozen=True)
class Pass:
    """One phase of a step and what it holds (see `pass_bytes` for how each kind is summed).

    Args:
        name: what runs.
        buffers: gradient-sized tensors held besides the one gradient (see METHOD_BUFFERS).
        graphs: forward graphs alive together (saved activations of one batch part each).
        kind: "automatic" (Lightning's step: the previous p.grad lives through the forward and is freed just before
            the backward, which forms the new one), "no_weight_grad" (a backward to the hidden states only, p.grad
            untouched), "forming" (a backward forms a gradient from nothing: multi-pass methods, Panacea's passes),
            "accumulating" (a backward adds into a gradient-sized buffer in place: grad_math.accumulate_grads_),
            "held" (no graph: p.grad and the buffers only).
        held_grad: share of the previous gradient alive in an automatic pass's forward (T-Vaccine drops the
            frozen tensors' gradients: only the active layers' remain).
        extras: method activations: "lens", "mmd", "hidden_eps" (Vaccine's eps), "hidden_grads" (pass 1's output).
        head: "ce" (response CE on the head), "entropy" (TAR's negative entropy over the full logits) or "none"
            (no head: Circuit Breakers' losses are on hidden states).
    """

    name: str
    buffers: int
    graphs: int
    kind: str = AUTOMATIC
    held_grad: float = 1.0
    extras: tuple[str, ...] = ()
    head: str = "ce"


def t_vaccine_held_share(shape: Optional[ModelShape], hparams: dict) -> float:
    """Share of the parameters in T-Vaccine's active layers (their gradients survive the optimizer step)."""
    if shape is None:
        return 1.0
    active = min(int(hparams.get("active_layers", 8)), shape.layers)
    return active * shape.layer_params() / shape.params()


def method_passes(method: str, hparams: Optional[dict] = None, shape: Optional[ModelShape] = None) -> list[Pass]:
    """The passes of one step of `method` (toy and paper defaults: every loss term on), read from its code."""
    hp = dict(hparams or {})
    if method == "sft":
        return [Pass("task pass", 0, 1)]
    if method == "adversarial":
        return [Pass("refusal and harmful forwards, one backward", 0, 2)]
    if method == "repnoise":
        return [Pass("refusal and harmful forwards (hidden states, MLP outputs, lens), one backward", 0, 2,
                     extras=("lens", "mmd"))]
    if method in ("vaccine", "t_vaccine"):
        held = 1.0 if method == "vaccine" else t_vaccine_held_share(shape, hp)
        first = "pass 1 (and T-Vaccine's layer probabilities)" if method == "t_vaccine" else "pass 1"
        return [Pass(f"{first}: backward to the hidden states", 0, 1, NO_WEIGHT_GRAD, held, ("hidden_grads",)),
                Pass("pass 2 under eps", 0, 1, AUTOMATIC, held, ("hidden_eps",))]
    if method == "booster":
        return [Pass("g_h at w", 0, 1, FORMING), Pass("g_h' at w' (g_h, backup)", 2, 1, FORMING),
                Pass("L_align (g_h - g_h')", 1, 1, FORMING)]
    if method == "tar":
        return [Pass("retain: benign and refusal", 0, 2, FORMING),
                Pass("inner step (retain grad, backup, attacker's AdamW moments)", 4, 1, FORMING),
                Pass("L_TR at w_k (retain grad, backup, attacker's AdamW moments)", 4, 1, FORMING, head="entropy")]
    if method == "seam":
        return [Pass("harmful: g_a", 0, 1, FORMING),
                Pass("harmful: L_ul through the lens (g_a)", 1, 1, FORMING, extras=("lens",)),
                Pass("refusal: L_up (update, g_a)", 2, 1, FORMING), Pass("benign: g_b (update, g_a)", 2, 1, FORMING),
                Pass("estimate at theta + eps v_a (update, g_a, g_b, backup)", 4, 1, FORMING),
                Pass("g_b at theta + eps v_b added into the estimate (update, g_a, backup)", 3, 1, ACCUMULATING)]
    if method == "panacea":
        return [Pass("task pass (previous eps)", 1, 1), Pass("h at w (p.grad, previous eps)", 2, 1, FORMING),
                Pass("h at w + eps (p.grad, previous eps, grad h, eps, backup)", 5, 1, FORMING)]
    if method == "circuit_breakers":
        return [Pass("harmful, benign and refusal forwards with the adapter on (the originals without a graph), one "
                     "backward", 0, 3, head="none", extras=("hidden_stack",))]
    if method == "lisa":
        return [Pass("task pass (anchor)", 1, 1), Pass("phase switch: new anchor beside the old", 2, 0, HELD)]
    raise UserError(f"unknown method {method!r}; choose from {sorted(METHOD_BUFFERS)}")


def layer_activation_bytes(shape: ModelShape, precision: str) -> int:
    """Bytes one token leaves saved for the backward in one Llama decoder layer (HF LlamaDecoderLayer, SDPA with
    is_causal, no padding mask, no activation checkpointing, no dropout).

    Saved per layer: each RMSNorm's input and normalised output (fp32: the residual stream is fp32 under fp32
    weights; bf16-true saves its fp32 upcast and the bf16 normalised output); the projections' inputs (under
    autocast one bf16 cast per projection: 3 for q, k, v and 2 for gate, up; else one shared tensor); the rotated
    q and k, v, SDPA's output and its contiguous copy (o_proj's input); gate, silu(gate), up and their product
    (down_proj's input). Element sizes: bf16-mixed 2 B for matmul outputs, 32-true 4 B, bf16-true 2 B.
    """
    h, kv, inter = shape.hidden, shape.kv, shape.intermediate
    act = 4 if precision == "32-true" else 2
    norms = 2 * (6 if precision == "bf16-true" else 8) * h
    autocast = precision == "bf16-mixed"
    inputs = ((3 if autocast else 1) + (2 if autocast else 1)) * h * act
    attention = (3 * shape.heads * shape.head_dim + 2 * kv) * act
    return norms + inputs + attention + 4 * inter * act


@dataclass(frozen=True)
class Activations:
    """A pass's activation bytes: saved for its backward, and the transients on top at the end of its forward and
    during its backward's first (head) part."""

    saved: int
    forward: int
    backward: int


def pass_activations(shape: ModelShape, setup: Setup, p: Pass, head_trainable: bool) -> Activations:
    """Activations of a pass: its graphs, the head's loss tensors and the method's extras.

    Head (response CE): each graph saves the [rows, vocab] fp32 log-probabilities; the forward holds the fp32 logits
    beside them (under FSDP2 the model's own logits and the fp32 copy of their [:, :-1] slice), the backward their
    gradient and the logits' gradient (the slice's full-size gradient comes after the log-probabilities are freed). TAR's negative entropy over
    all positions saves log p and p, holds the logits and p log p in the forward and about three [tokens, vocab]
    gradients in the backward. Lens: the stacked hidden-state rows, their norm and the chunked head's input gradient
    (fp32), the head's weight gradient (formed in the forward; full fine-tuning only), and in its forward one
    [chunk, vocab] logits chunk with logsumexp's temporary of the same size. MMD: per layer the MLP output, its
    masked fp32 copy and the noise. Hidden stack (Circuit Breakers' retain loss): the fp32 stacks of the current and
    original hidden states and their difference (every layer: an upper bound, the model is cut after the last target
    layer). Vaccine: an fp32 eps per layer output (every layer: an upper bound for
    T-Vaccine), and pass 1's hidden-state gradients.
    """
    from immunize.lightning_modules.functional.supervised_ce import CHUNK_ELEMENTS

    tokens, rows, L, h, v = setup.tokens, setup.rows, shape.layers, shape.hidden, shape.vocab
    act = 4 if setup.precision == "32-true" else 2
    fsdp = setup.strategy == "fsdp"
    final_norm = (6 if setup.precision == "bf16-true" else 8) * h
    graph = tokens * (L * layer_activation_bytes(shape, setup.precision) + final_norm) + rows * h * act
    saved, forward, backward = p.graphs * graph, 0, 0
    if p.graphs and p.head == "entropy":
        saved += 2 * tokens * v * 4
        forward, backward = tokens * v * (act + 4), 3 * tokens * v * 4
    elif p.graphs and p.head == "ce":
        saved += p.graphs * rows * v * 4
        forward, backward = rows * v * ((act + 4) if fsdp else 4), rows * v * 4 * 2
    hidden_rows = L * tokens * h * 4
    if "lens" in p.extras:
        lens_rows = L * (setup.supervised if setup.supervised is not None else tokens)
        saved += 3 * lens_rows * h * 4 + (v * h * 4 if head_trainable else 0)
        forward = max(forward, 2 * min(lens_rows, max(1, CHUNK_ELEMENTS // v)) * v * 4 + lens_rows * h * 4)
    if "mmd" in p.extras:
        saved += L * tokens * h * (act + 8)
    if "hidden_stack" in p.extras:
        saved += 3 * hidden_rows
    if "hidden_eps" in p.extras:
        saved += hidden_rows
    if "hidden_grads" in p.extras:
        backward += hidden_rows
    return Activations(int(saved), int(forward), int(backward))


@dataclass(frozen=True)
class Transients:
    """Per-GPU bytes that come and go inside a backward, besides the activations.

    Args:
        head_grad: the head's gradient, formed first in the backward (a piece of the new gradient; under FSDP2 the
            root unit's unsharded one).
        layers: FSDP2: the gathered decoder layers and their unsharded gradients while a layer is differentiated.
        root_grad: FSDP2: the root unit's unsharded gradients (embeddings and head), held to the backward's end.
        root_weights: FSDP2: the root unit's gathered weights, held from its forward to its backward.
    """

    head_grad: float = 0
    layers: float = 0
    root_grad: float = 0
    root_weights: float = 0


def pass_bytes(p: Pass, grad: float, acts: Activations, tr: Transients) -> dict:
    """{"gradients", "activations", "transients"} per GPU at the pass's peak: the largest of the end of its forward,
    the start of its backward (head part) and the end of its backward (gradient `grad` per copy).

    automatic: (held_grad + buffers) gradient copies through the forward; Lightning frees the previous gradient
    just before the backward, which forms the new one while the activations are freed: at its start the buffers,
    the activations and the largest of the CE backward's transients, the head's gradient (autograd frees the saved
    log-probabilities once their node has run, before the head's weight gradient forms) and FSDP2's gathered
    layers; at its end buffers + 1 copies (and FSDP2's unsharded root gradients). forming: the same without a
    previous gradient. no_weight_grad: the held copies and all activations plus the larger of the forward's and
    the backward's transients. accumulating: the buffers and the buffer added into (1 + buffers copies) throughout,
    with all activations and the larger of the transients and the head's gradient (autograd adds each
    parameter's gradient into its buffer from a temporary). held: 1 + buffers copies, no activations.
    FSDP2's gathered root weights are added to every pass with a graph.
    """
    root = tr.root_weights if p.graphs else 0
    if p.kind == HELD:
        return {"gradients": (1 + p.buffers) * grad, "activations": 0, "transients": 0}
    if p.kind == ACCUMULATING:
        return {"gradients": (1 + p.buffers) * grad, "activations": acts.saved,
                "transients": max(acts.forward, acts.backward, tr.head_grad, tr.layers) + root}
    held = p.buffers + (p.held_grad if p.kind in (AUTOMATIC, NO_WEIGHT_GRAD) else 0)
    if p.kind == NO_WEIGHT_GRAD:
        return {"gradients": held * grad, "activations": acts.saved,
                "transients": max(acts.forward, acts.backward, tr.layers) + root}
    phases = [
        {"gradients": held * grad, "activations": acts.saved, "transients": acts.forward + root},
        {"gradients": p.buffers * grad, "activations": acts.saved,
         "transients": max(acts.backward, tr.head_grad, tr.layers) + root},
        {"gradients": (p.buffers + 1) * grad, "activations": 0, "transients": tr.root_grad + root},
    ]
    return max(phases, key=lambda parts: sum(parts.values()))


def check_supported(method: str, setup: Setup) -> Optional[str]:
    """Why the method refuses this setup (None: it runs)."""
    if setup.precision == "bf16-true":
        if method in NEEDS_FP32_MASTER:
            return "refused: needs fp32 master weights (bf16-mixed)"
        if method in NEEDS_FP32_TRAINABLE and setup.lora is None:
            return "refused: needs fp32 trainable weights (bf16-mixed, or LoRA)"
    if method in NEEDS_LORA and setup.lora is None:
        return "refused: trains LoRA adapters only (--lora)"
    return None


def _validate(method: str, setup: Setup) -> None:
    if method not in METHOD_BUFFERS:
        raise UserError(f"unknown method {method!r}; choose from {sorted(METHOD_BUFFERS)}")
    for what, value, choices in (("strategy", setup.strategy, STRATEGIES), ("precision", setup.precision, PRECISIONS),
                                 ("optimizer", setup.optimizer, OPTIMIZERS), ("device", setup.device, ("cuda", "cpu"))):
        if value not in choices:
            raise UserError(f"unknown {what} {value!r}; choose from {list(choices)}")
    if setup.gpus < 1 or setup.batch < 1 or setup.length < 1:
        raise UserError(f"gpus, batch and length must be >= 1, got {setup.gpus}, {setup.batch}, {setup.length}")
    if setup.strategy == "single" and setup.gpus != 1:
        raise UserError(f"strategy single is one process; got {setup.gpus} GPUs (use ddp or fsdp)")


def _fixed_bytes(shape: ModelShape, method: str, setup: Setup) -> tuple[dict, float, float]:
    """({weights, optimizer, ddp_buckets} per GPU, bytes of one gradient copy, of the trainable tensors with
    optimizer state)."""
    shard = setup.gpus if setup.strategy == "fsdp" else 1
    weight_b = 2 if setup.precision == "bf16-true" else 4
    full = setup.lora is None
    trainable = shape.params() if full else shape.lora_params(setup.lora)
    train_b = weight_b if full else 4  # peft keeps the adapters in fp32
    # T-Vaccine never steps the embeddings, final norm and head (their gradients are always dropped): no state
    with_state = shape.layers * shape.layer_params() if (method == "t_vaccine" and full) else trainable
    states = 2 if setup.optimizer == "adamw" else (1 if setup.momentum > 0 else 0)
    fixed = {"weights": (shape.params() * weight_b + (0 if full else trainable * 4)) / shard,
             "optimizer": states * with_state * train_b / shard,
             "ddp_buckets": trainable * train_b if setup.strategy == "ddp" else 0}
    return fixed, trainable * train_b / shard, with_state * train_b / shard


def transients(shape: ModelShape, setup: Setup) -> Transients:
    """The backward's transients (see Transients): the head's gradient (full fine-tuning), and under FSDP2 the root
    unit gathered, FSDP_GATHERED_LAYERS layers gathered with two layers' unsharded gradients (the one formed and
    its reduce-scatter input), and the root's unsharded gradients."""
    weight_b = 2 if setup.precision == "bf16-true" else 4
    full = setup.lora is None
    train_b = weight_b if full else 4
    head_grad = shape.vocab * shape.hidden * train_b if full else 0
    if setup.strategy != "fsdp":
        return Transients(head_grad=head_grad)
    layer_grad = (shape.layer_params() if full else shape.lora_params(setup.lora) // shape.layers) * train_b
    return Transients(head_grad=head_grad,
                      layers=FSDP_GATHERED_LAYERS * shape.layer_params() * weight_b + 2 * layer_grad,
                      root_grad=shape.root_params() * train_b if full else 0,
                      root_weights=shape.root_params() * weight_b)


def predict(shape: ModelShape, method: str, setup: Setup) -> dict:
    """Peak bytes per GPU of one step of `method`, with the components at the peak pass.

    Returns {"peak_bytes", "peak_pass", "components": {name: bytes}} or {"refused": reason}.
    """
    _validate(method, setup)
    refused = check_supported(method, setup)
    if refused:
        return {"refused": refused}
    fixed, grad, state_bytes = _fixed_bytes(shape, method, setup)
    tr = transients(shape, setup)
    passes = method_passes(method, setup.hparams, shape)
    held = passes[0].held_grad if passes[0].kind == AUTOMATIC else 1.0
    best = None
    for p in passes:
        parts = pass_bytes(p, grad, pass_activations(shape, setup, p, setup.lora is None), tr)
        best = _larger(best, p.name, {**fixed, **parts})
    step = dict(fixed, gradients=(held + PERSISTENT.get(method, 0)) * grad, activations=0)
    if setup.optimizer == "adamw":  # foreach AdamW (GPU): sqrt of the second moments; CPU: 2 temporaries per tensor
        largest = shape.largest_tensor() if setup.lora is None else 0  # adapters: negligible
        step["transients"] = (state_bytes if setup.device == "cuda" else
                              2 * largest * (2 if setup.precision == "bf16-true" else 4))
    return _larger(best, "optimizer step", step)


def _larger(best: Optional[dict], name: str, parts: dict) -> dict:
    total = sum(parts.values())
    if best is not None and best["peak_bytes"] >= total:
        return best
    return {"peak_bytes": int(total), "peak_pass": name, "components": {k: int(v) for k, v in parts.items()}}


# ----- the prediction table ------------------------------------------------------------------------
def _split(text: str, choices, what: str) -> list[str]:
    names = list(choices) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in choices]
    if unknown or not names:
        raise UserError(f"unknown {what} {unknown[0] if unknown else text!r}; choose from {sorted(choices)}")
    return names


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{what} must be comma-separated integers >= 1, got {text!r}")
    return values


def prediction_table(args) -> dict:
    """{(method, strategy, gpus) as 'method/strategy/N': prediction} for the CLI's arguments."""
    if args.model not in SHAPES:
        raise UserError(f"unknown model {args.model!r}; choose from {sorted(SHAPES)}")
    shape = ModelShape.of(SHAPES[args.model])
    methods = _split(args.methods, METHOD_BUFFERS, "method")
    strategies = _split(args.strategies, STRATEGIES, "strategy")
    lora = {"r": args.lora_r, "target_modules": args.lora_targets.split(",")} if args.lora else None
    supervised = None if args.supervised >= 1 else int(args.supervised * args.batch * args.length)
    out = {}
    for method in methods:
        for strategy in strategies:
            for n in _ints(args.gpus, "--gpus"):
                if strategy == "single" and n != 1:
                    continue
                setup = Setup(args.batch, args.length, supervised, args.precision, args.optimizer, args.momentum,
                              lora, strategy, n)
                out[f"{method}/{strategy}/{n}"] = predict(shape, method, setup)
    return out


def _columns(table: dict) -> list[str]:
    return list(dict.fromkeys(key.split("/", 1)[1] for key in table))


def _gib(pred: dict) -> str:
    return "refused" if "refused" in pred else f"{pred['peak_bytes'] / GIB:.1f}"


def format_table(table: dict) -> str:
    """Plain text: methods x (strategy, N), GiB per GPU."""
    cols = _columns(table)
    methods = list(dict.fromkeys(key.split("/", 1)[0] for key in table))
    lines = [f"{'GiB per GPU':<12}" + "".join(f"{c.replace('/', ' N='):>14}" for c in cols)]
    for m in methods:
        lines.append(f"{m:<12}" + "".join(f"{_gib(table[f'{m}/{c}']):>14}" for c in cols))
    return "\n".join(lines)


def fits(peak_bytes: float) -> list[str]:
    """The GPU sizes the prediction fits in (within FIT_MARGIN of their memory)."""
    return [name for name, size in GPU_BYTES.items() if peak_bytes <= FIT_MARGIN * size]


def format_markdown(table: dict, title: str) -> str:
    """Markdown: what fits where (80 GB and 141 GB GPUs), GiB per GPU in each cell."""
    cols = _columns(table)
    methods = list(dict.fromkeys(key.split("/", 1)[0] for key in table))
    head = "| method | " + " | ".join(c.replace("fsdp", "FSDP2").replace("ddp", "DDP").replace("/", " x ")
                                      for c in cols) + " |"
    lines = [f"**{title}** (GiB per GPU; fits: within {FIT_MARGIN:.0%} of the GPU's memory)", "", head,
             "| --- |" + " --- |" * len(cols)]
    for m in methods:
        cells = []
        for c in cols:
            pred = table[f"{m}/{c}"]
            if "refused" in pred:
                cells.append(pred["refused"])
                continue
            where = fits(pred["peak_bytes"])
            verdict = ("fits 80 GB" if "80 GB" in where else "fits 141 GB only" if where else "does not fit")
            cells.append(f"{pred['peak_bytes'] / GIB:.1f}: {verdict}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----- validation: measured on CPU with step_cost's machinery ----------------------------------------
def _prepare_measurement(threads: int) -> None:
    """One torch thread, Lightning quiet, and step_cost's method table filled from the registry."""
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if not step_cost.METHODS:
        step_cost.METHODS.update(step_cost.registry_methods())


def measure_single(method: str, config: dict, batch: dict) -> tuple[int, dict, int]:
    """(peak bytes of the second step, the module's hparams, supervised positions per part): one process."""
    _prepare_measurement(1)
    spec = step_cost.METHODS[method]
    module = step_cost.build(method, step_cost.SHAPE_TOKENIZER, config, seed=0)
    memory = step_cost.StepPeakMemory()
    part = batch if spec.part is None else batch[spec.part]
    step_cost.run_steps(module, part, 2, [memory, *spec.callbacks()], "32-true")
    return memory.peaks[-1], dict(module.hparams), step_cost.step_shape(module, batch).supervised


def fsdp_child(method: str, config: dict, batch: dict, out_dir: str) -> None:
    """One rank of a 2-process FSDP2 fit on CPU (gloo; Lightning launches the other rank by re-running this
    script): two steps of `method` under ModelParallelStrategy, this rank's step peak written to out_dir."""
    import lightning as L
    from torch.utils.data import DataLoader

    _prepare_measurement(1)
    spec = step_cost.METHODS[method]
    module = step_cost.build(method, step_cost.SHAPE_TOKENIZER, config, seed=0)
    memory = ShardedStepPeakMemory()
    part = batch if spec.part is None else batch[spec.part]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=2, precision="32-true", logger=False,
                        strategy=fsdp_preset_strategy(),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[memory, *spec.callbacks()])
    trainer.fit(module, train_dataloaders=DataLoader(step_cost.FixedBatch(part, 2), batch_size=None))
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps({"peak": memory.peaks[-1]}))


def fsdp_preset_strategy():
    """The strategy of configs/trainer/cpu_fsdp.yaml (FSDP2 over the 2 CPU processes), built from the file."""
    from immunize.bench.stages import read_yaml
    from immunize.bench.validate import import_class

    spec = read_yaml(FSDP_PRESET, "FSDP2 trainer preset")["trainer"]["strategy"]
    return import_class(spec["class_path"], "FSDP2 strategy")(**(spec.get("init_args") or {}))


class ShardedStepPeakMemory(step_cost.StepPeakMemory):
    """step_cost's StepPeakMemory whose parameter bytes are this rank's shards (FSDP2 parameters are DTensors), with
    the frees of the collectives' temporaries that the profiler misses put back (`collective_allocation_events`)."""

    def on_train_start(self, trainer, pl_module):
        from immunize.lightning_modules.modeling.sharding import local

        super().on_train_start(trainer, pl_module)
        self._base = sum(local(p).untyped_storage().nbytes() for p in pl_module.parameters())

    def on_train_end(self, trainer, pl_module):
        self._prof.stop()
        self.peaks += step_cost.window_peaks(collective_allocation_events(self._prof), self._windows, self._base)


def collective_allocation_events(prof) -> list[tuple[int, int]]:
    """step_cost._allocation_events (time in ns, CPU bytes allocated since the profiler started), with the frees the
    profiler never sees of blocks allocated inside a c10d collective put back.

    The CPU allocator tells the profiler about a free only on a thread the profiler follows, and only then subtracts
    it from its running total. Gloo's reduce-scatter (FSDP2's gradient reduction on CPU) clones its input inside the
    c10d op, and the clone is often released by a gloo worker thread when the collective finishes: its free is lost
    and the running total stays higher by a whole unsharded gradient bucket for the rest of the fit (by chance, on
    some ranks and reductions and not others; up to ~100 MiB per rank by SEAM's second step on llama-tiny, about as
    many bytes as its passes' reduce-scatters moved; FSDP2's own all-gather buffer of a prefetch can be lost the same
    way). Here allocations are paired with frees by address. A block allocated inside a c10d op whose free went
    unseen (its address was allocated again, or it outlived the profile) is taken as freed when that op returns: the
    collectives are synchronous, the process waits on them right after (allocating nothing meanwhile) and the
    worker releases the clone as the collective ends. Any other block whose address was allocated again without a
    free is taken as freed at that new allocation (the latest it can have been freed: never below the true peak).
    """
    from torch._C._profiler import _EventType

    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and str(event.extra_fields.device) == "cpu":
            allocs.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size, event))
        stack.extend(event.children)
    allocs.sort(key=lambda a: a[0])
    deltas, live = [(t, size) for t, _, size, _ in allocs], {}
    for t, ptr, size, event in allocs:
        if size > 0:
            if ptr in live:  # allocated again: the previous block's free was not seen (it came before t)
                old, old_event = live[ptr]
                end = _collective_end(old_event)
                deltas.append((t if end is None else end, -old))
            live[ptr] = (size, event)
        else:
            live.pop(ptr, None)
    for size, event in live.values():  # never freed in the profile: only a collective's temporary is known freed
        end = _collective_end(event)
        if end is not None:
            deltas.append((end, -size))
    deltas.sort()
    events, total = [], 0
    for t, size in deltas:
        total += size
        events.append((t, total))
    return events


def _collective_end(event) -> Optional[int]:
    """End time (ns) of the outermost c10d op the allocation `event` happened in (None: not in a collective)."""
    from torch._C._profiler import _EventType

    end, parent = None, event.parent
    while parent is not None:
        if parent.tag == _EventType.TorchOp and parent.name.startswith("c10d::"):
            end = parent.end_time_ns
        parent = parent.parent
    return end


def measure_fsdp(method: str, model: str, batch_size: int, length: int, timeout: int = 600) -> int:
    """The larger of the 2 ranks' step peaks of `method` under FSDP2 (a subprocess running fsdp_child)."""
    import subprocess

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.abspath(__file__), "--fsdp-child", method, "--validate-model", model,
               "--validate-batch", str(batch_size), "--validate-length", str(length), "--out", out]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        peaks = [json.loads(p.read_text())["peak"] for p in sorted(Path(out).glob("rank*.json"))]
        if result.returncode != 0 or len(peaks) != 2:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"FSDP2 measurement of {method} failed (exit {result.returncode}): {' | '.join(tail)}")
    return max(peaks)


def validation_batch(model: str, batch_size: int, length: int) -> dict:
    return step_cost.make_batch(SHAPES[model]["vocab_size"], batch_size, length, prompt=length // 4)


def validate(model: str, methods: list[str], batch_size: int, length: int, fsdp: bool) -> dict:
    """Predicted vs measured peak bytes per method on `model` (random weights), fp32, CPU optimizer."""
    if model not in SHAPES:
        raise UserError(f"unknown model {model!r}; choose from {sorted(SHAPES)}")
    config = dict(SHAPES[model], max_position_embeddings=max(length, SHAPES[model].get("max_position_embeddings", 0)))
    shape, batch = ModelShape.of(config), validation_batch(model, batch_size, length)
    rows = {}
    for method in methods:
        measured, hparams, supervised = measure_single(method, config, batch)
        setup = Setup(batch_size, length, supervised, "32-true", strategy="single", device="cpu", hparams=hparams)
        pred = predict(shape, method, setup)
        row = {"predicted": pred["peak_bytes"], "measured": measured, "ratio": round(pred["peak_bytes"] / measured, 3),
               "peak_pass": pred["peak_pass"]}
        if fsdp:
            measured2 = measure_fsdp(method, model, batch_size, length)
            pred2 = predict(shape, method, Setup(batch_size, length, supervised, "32-true", strategy="fsdp", gpus=2,
                                                 device="cpu", hparams=hparams))
            row.update({"fsdp2_predicted": pred2["peak_bytes"], "fsdp2_measured": measured2,
                        "fsdp2_ratio": round(pred2["peak_bytes"] / measured2, 3)})
        rows[method] = row
        print(json.dumps({method: row}), file=sys.stderr, flush=True)
    return {"model": model, "params": shape.params(), "batch": [batch_size, length], "precision": "32-true",
            "measured_by": "step_cost.StepPeakMemory (CPU profiler allocation events, second step, + parameter bytes)",
            "methods": rows}


def format_validation(result: dict) -> str:
    mib = 1 << 20
    fsdp = any("fsdp2_measured" in r for r in result["methods"].values())
    head = f"{'method':<12}{'predicted MiB':>15}{'measured MiB':>14}{'ratio':>8}"
    head += f"{'FSDP2 N=2 pred':>16}{'measured':>10}{'ratio':>8}" if fsdp else ""
    lines = [f"{result['model']} ({result['params'] / 1e6:.1f}M params), batch {result['batch'][0]} x "
             f"{result['batch'][1]}, fp32, one process" + (" and FSDP2 on 2 gloo processes" if fsdp else ""), head]
    for m, r in result["methods"].items():
        line = f"{m:<12}{r['predicted'] / mib:>15.1f}{r['measured'] / mib:>14.1f}{r['ratio']:>8.2f}"
        if fsdp:
            line += f"{r['fsdp2_predicted'] / mib:>16.1f}{r['fsdp2_measured'] / mib:>10.1f}{r['fsdp2_ratio']:>8.2f}"
        lines.append(line + f"   peak: {r['peak_pass']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", default="llama2-7b", help=f"model shape, or several comma-separated with --markdown: {sorted(SHAPES)}")
    add("--methods", default="all", help=f"comma-separated, or all: {sorted(METHOD_BUFFERS)}")
    add("--strategies", default="ddp,fsdp", help=f"comma-separated: {list(STRATEGIES)}")
    add("--gpus", default="1,8", help="comma-separated numbers of GPUs")
    add("--batch", type=int, default=1, help="rows per batch part per GPU")
    add("--length", type=int, default=512, help="tokens per row")
    add("--supervised", type=float, default=1.0, help="fraction of positions with a label (1: all, an upper bound)")
    add("--precision", default="bf16-mixed", help=f"{list(PRECISIONS)}")
    add("--optimizer", default="adamw", help=f"{list(OPTIMIZERS)}")
    add("--momentum", type=float, default=0.0, help="SGD momentum (> 0: one state per parameter)")
    add("--lora", action="store_true", help="train LoRA adapters (frozen base weights stay resident)")
    add("--lora-r", type=int, default=LORA_DEFAULTS["r"], help="LoRA rank")
    add("--lora-targets", default=",".join(LORA_DEFAULTS["target_modules"]), help="comma-separated LoRA target modules")
    add("--json", action="store_true", help="print one JSON object")
    add("--markdown", action="store_true", help="print the markdown table of what fits where (80 GB, 141 GB)")
    add("--readme", default=None, help="with --markdown: paste the tables into this file's --block (several --model)")
    add("--block", default="memory", help="the README block (<!-- BEGIN name --> ... <!-- END name -->)")
    add("--validate", action="store_true", help="measure on CPU and print predicted vs measured per method")
    add("--fsdp", action="store_true", help="with --validate: also FSDP2 on 2 gloo processes")
    add("--validate-model", default="llama-tiny", help="the validation model's shape (random weights)")
    add("--validate-batch", type=int, default=4)
    add("--validate-length", type=int, default=64)
    add("--fsdp-child", default=None, help=argparse.SUPPRESS)
    add("--out", default=None, help=argparse.SUPPRESS)
    return parser


def run(args) -> int:
    if args.fsdp_child:
        config = dict(SHAPES[args.validate_model])
        config["max_position_embeddings"] = max(args.validate_length, config.get("max_position_embeddings", 0))
        fsdp_child(args.fsdp_child, config, validation_batch(args.validate_model, args.validate_batch,
                                                             args.validate_length), args.out)
        return 0
    if args.validate:
        methods = _split(args.methods, METHOD_BUFFERS, "method")
        result = validate(args.validate_model, methods, args.validate_batch, args.validate_length, args.fsdp)
        print(json.dumps(result) if args.json else format_validation(result))
        return 0
    if args.markdown:
        text = markdown_tables(args)
        if args.readme:
            from immunize.io import atomic_write_text
            from immunize.readme import paste

            command = "python benchmarks/memory.py " + " ".join(sys.argv[1:])
            atomic_write_text(Path(args.readme), paste(Path(args.readme), args.block,
                                                       f"Pasted by `{command}`.\n\n{text}\n"))
            print(f"memory.py: pasted {len(text.splitlines())} lines into {args.readme} block {args.block}")
        else:
            print(text)
        return 0
    table = prediction_table(args)
    if args.json:
        print(json.dumps({"model": args.model, "params": ModelShape.of(SHAPES[args.model]).params(),
                          "batch": [args.batch, args.length], "precision": args.precision, "lora": args.lora,
                          "predictions": table}))
    else:
        print(format_table(table))
    return 0


def markdown_tables(args) -> str:
    """One markdown table per model in --model (comma-separated)."""
    parts = []
    for model in _split(args.model, SHAPES, "model"):
        one = argparse.Namespace(**{**vars(args), "model": model})
        lora = f", LoRA r={args.lora_r}" if args.lora else ""
        parts.append(format_markdown(prediction_table(one), f"{model}, {args.batch} x {args.length} tokens per part "
                                                            f"and GPU, {args.precision}{lora}"))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        fail(str(err), "memory.py")


if __name__ == "__main__":
    sys.exit(main())
