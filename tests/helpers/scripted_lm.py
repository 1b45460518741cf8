"""A tiny local chat model whose outputs are controlled: the judges' tests run real tokenization, chat templates,
left-padded batched `generate` and decoding through it, and know exactly what the judge model wrote.

The tokenizer is byte-level (every text round-trips exactly; the digits are single tokens) with a small chat
template. The model is a real transformers PreTrainedModel (saved and loaded like any other, once `register()` has
run): for each row it finds the first script whose trigger text occurs in the input, counts the tokens written
since the last marker (by default the chat template's "<|assistant|>" tag), and puts all probability on the
script's next token, then on end-of-text. A script may also fix the logits of its first token (`first_logits`), for
judges that read next-token probabilities instead of generating.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerFast)
from transformers.modeling_outputs import CausalLMOutput

SPECIALS = ["<pad>", "<|end|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def byte_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges: one token per byte, plus the chat template's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|end|>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


class ScriptedConfig(PretrainedConfig):
    model_type = "immunize_scripted"

    def __init__(self, vocab_size: int = 260, scripts: Optional[list] = None, default_ids: Optional[list] = None,
                 marker_ids: Optional[list] = None, **kwargs):
        self.vocab_size = vocab_size
        self.scripts = scripts or []  # [{"trigger": ids, "output": ids, "first_logits": {id: logit} | None}]
        self.default_ids = default_ids or []
        self.marker_ids = marker_ids or []  # id sequences; writing starts after the last one found
        kwargs.setdefault("use_cache", False)  # nothing to cache: every step reads the whole sequence
        kwargs.setdefault("num_hidden_layers", 1)
        super().__init__(**kwargs)


def _find(seq: list[int], sub: list[int]) -> int:
    """Index of the last occurrence of sub in seq, or -1."""
    n = len(sub)
    for start in range(len(seq) - n, -1, -1):
        if seq[start:start + n] == sub:
            return start
    return -1


class ScriptedLM(PreTrainedModel, GenerationMixin):
    config_class = ScriptedConfig
    _supports_cache_class = False

    def __init__(self, config: ScriptedConfig):
        super().__init__(config)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device and a dtype
        self.post_init()
        self.generation_config.use_cache = False

    def _init_weights(self, module) -> None:
        pass

    def _next_logits(self, seq: list[int]) -> torch.Tensor:
        cfg = self.config
        written, cut = 0, len(seq)
        for marker in cfg.marker_ids:
            at = _find(seq, marker)
            if at >= 0:
                written, cut = len(seq) - (at + len(marker)), at
                break
        if cfg.pad_token_id in seq[:cut]:  # in the judge's input (generate pads finished rows after it: fine)
            raise AssertionError("padding reached the model: the attention mask does not cover it")
        script = next((s for s in cfg.scripts if _find(seq[:cut], s["trigger"]) >= 0), None)
        output = script["output"] if script else cfg.default_ids
        logits = torch.full((cfg.vocab_size,), -30.0)
        if written == 0 and script and script.get("first_logits"):
            for token, value in script["first_logits"].items():
                logits[int(token)] = float(value)
            return logits
        logits[output[written] if written < len(output) else cfg.eos_token_id] = 30.0
        return logits

    def forward(self, input_ids, attention_mask=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        for b in range(input_ids.shape[0]):
            seq = input_ids[b][mask[b].bool()].tolist()
            if mask[b].numel() and not bool(mask[b, -1]):
                raise AssertionError("right padding: a batched judge must pad on the left to generate")
            logits[b, -1] = self._next_logits(seq)
        return CausalLMOutput(logits=logits.to(self.anchor.device) + self.anchor * 0)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def register() -> None:
    """Let AutoConfig / AutoModelForCausalLM load saved scripted models (idempotent)."""
    try:
        AutoConfig.register(ScriptedConfig.model_type, ScriptedConfig)
        AutoModelForCausalLM.register(ScriptedConfig, ScriptedLM)
    except ValueError:
        pass  # already registered


def scripted_judge_model(tok: PreTrainedTokenizerFast, scripts: dict[str, str], default: str = "",
                         markers: tuple[str, ...] = ("<|assistant|>\n",),
                         first_logits: Optional[dict[str, dict[str, float]]] = None) -> ScriptedLM:
    """A model that answers `scripts[trigger]` to any input containing `trigger` (the first that matches, in
    order), `default` otherwise; first_logits: {trigger: {token text: logit}} for the first written token."""
    ids = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    entries = []
    for trigger, output in scripts.items():
        firsts = None
        if first_logits and trigger in first_logits:
            firsts = {str(ids(t)[0]): v for t, v in first_logits[trigger].items()}
        entries.append({"trigger": ids(trigger), "output": ids(output), "first_logits": firsts})
    config = ScriptedConfig(vocab_size=len(tok), scripts=entries, default_ids=ids(default),
                            marker_ids=[ids(m) for m in markers], eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, bos_token_id=None)
    return ScriptedLM(config).eval()
