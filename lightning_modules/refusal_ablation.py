"""RefusalAblation: the refusal-direction ablation attack (Arditi et al. 2024, "Refusal in Language Models Is Mediated
by a Single Direction"; andyrdt/refusal_direction pipeline/): no training at all.

`immunize fit` with RefusalDirectionData (harmful and harmless prompts):
1. the training pass reads the residual stream entering every decoder layer at the template's post-instruction
   positions, keeps (by default, as the reference) the harmful prompts the model refuses (refusal score > 0) and the
   harmless ones it does not (< 0), and sums them per side in float64;
2. at the end of that pass the candidates are mean(harmful) - mean(harmless) for every (position, layer); on the
   validation prompts (filtered the same way) each is scored (bypass, induce, KL: functional.direction_ablation) and
   the reference's rule picks one (functional.refusal_direction), unless model.layer fixes it;
3. every weight that writes to the residual stream is orthogonalised against it (functional.direction_ablation).
The export is the ablated model plus refusal_direction.json (layer, position, scores of every candidate, refusal
tokens, prompt counts) and refusal_direction.safetensors (the direction and every candidate, float64).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from immunize.datamodules.collate import pad_left
from immunize.datamodules.refusal_prompts import default_refusal_words
from immunize.errors import UserError
from immunize.io import atomic_save_safetensors, atomic_write_json
from immunize.lightning_modules.causal_lm import CausalLMModule
from immunize.lightning_modules.functional.direction_ablation import (candidate_scores, last_logits,
                                                                      orthogonalize_model)
from immunize.lightning_modules.functional.refusal_direction import mean_difference, refusal_score, select_candidate
from immunize.lightning_modules.modeling.hidden_hooks import decoder_layers
from immunize.lightning_modules.modeling.sharding import is_fsdp_model

DIRECTION_JSON, DIRECTION_TENSORS = "refusal_direction.json", "refusal_direction.safetensors"


def refusal_token_ids(tokenizer, tokens: list[Union[str, int]]) -> list[int]:
    """Token ids of the refusal tokens: an int is an id; a word is the first non-blank token of " " + word, as a
    response starting with it is tokenized (immunize.datamodules.collate.encode_example)."""
    ids = []
    for token in tokens:
        if isinstance(token, int) and not isinstance(token, bool):
            if not 0 <= token < len(tokenizer):
                raise UserError(f"model.refusal_tokens: id {token} is outside the vocabulary (size {len(tokenizer)})")
            ids.append(token)
            continue
        if not isinstance(token, str) or not token.strip():
            raise UserError(f"model.refusal_tokens: {token!r} is neither a word nor a token id")
        found = [i for i in tokenizer(" " + token.strip(), add_special_tokens=False).input_ids
                 if tokenizer.decode([i]).strip()]
        if not found or found[0] == tokenizer.unk_token_id:
            raise UserError(f"model.refusal_tokens: the tokenizer has no token for {token!r}; give a word of its "
                            "vocabulary or a token id")
        ids.append(found[0])
    return list(dict.fromkeys(ids))


class RefusalAblation(CausalLMModule):
    """Refusal-direction ablation (see the module docstring): fit selects the direction and orthogonalises the weights
    against it; there is no optimizer and no step.

    Args:
        layer: take the candidate of this layer instead of selecting one (null: the reference's rule).
        position: with `layer`: the post-instruction position, -1 the last prompt token (null: -1).
        refusal_tokens: words (or token ids) a refusal starts with, for the refusal score; null: the first words of
            the toy world's refusals for its tokenizer, "I" for any other (the reference's Llama/Gemma/Yi token).
        kl_threshold: candidates whose ablation moves the harmless last-position distribution by a KL above this are
            dropped (the reference's 0.1).
        induce_threshold: candidates whose addition gives a mean refusal score below this on harmless prompts are
            dropped (the reference's 0).
        prune_layer_fraction: candidates of the last fraction of layers (layer >= int((1 - f) * L)) are dropped (the
            reference's 0.2).
        filter_prompts: keep only the harmful prompts the model refuses and the harmless ones it answers (refusal
            score > 0, < 0), for the means and for the selection, as the reference does.
        if_all_filtered: when the rule drops every candidate: "error" (the reference's assertion) or "lowest_bypass"
            (take the scored candidate with the lowest bypass score whatever its KL and induce scores; recorded as
            selection "rule_fallback").
        eval_batch_size: prompts per forward pass of the selection.
        **kwargs: CausalLMModule's arguments (model, dtype, export_dtype, judge, ...; lora must stay null).
    """

    def __init__(self, layer: Optional[int] = None, position: Optional[int] = None,
                 refusal_tokens: Optional[list[Union[str, int]]] = None, kl_threshold: float = 0.1,
                 induce_threshold: float = 0.0, prune_layer_fraction: float = 0.2, filter_prompts: bool = True,
                 if_all_filtered: Literal["error", "lowest_bypass"] = "error", eval_batch_size: int = 32, **kwargs):
        if kwargs.get("lora") is not None:
            raise UserError("RefusalAblation changes the weights themselves and trains nothing; set model.lora null")
        super().__init__(**kwargs)
        self.automatic_optimization = False
        n_layers = len(decoder_layers(self.model))
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers):
            raise UserError(f"model.layer must be a layer index in 0..{n_layers - 1} (or null to select one), got "
                            f"{layer!r}")
        if position is not None and (layer is None or isinstance(position, bool) or not isinstance(position, int)
                                     or position >= 0):
            raise UserError(f"model.position must be a negative index (-1: the last prompt token) and comes with "
                            f"model.layer, got position {position!r} with layer {layer!r}")
        if not 0.0 <= prune_layer_fraction < 1.0:
            raise UserError(f"model.prune_layer_fraction must be in [0, 1), got {prune_layer_fraction}")
        if if_all_filtered not in ("error", "lowest_bypass"):
            raise UserError(f"model.if_all_filtered must be 'error' or 'lowest_bypass', got {if_all_filtered!r}")
        if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise UserError(f"model.eval_batch_size must be an integer >= 1, got {eval_batch_size!r}")
        self.layer, self.position = layer, (-1 if layer is not None and position is None else position)
        self.refusal_words = list(refusal_tokens) if refusal_tokens is not None \
            else default_refusal_words(self.tokenizer)
        self.refusal_ids = refusal_token_ids(self.tokenizer, self.refusal_words)
        self.kl_threshold, self.induce_threshold = kl_threshold, induce_threshold
        self.prune_layer_fraction, self.filter_prompts = prune_layer_fraction, filter_prompts
        self.if_all_filtered = if_all_filtered
        self.eval_batch_size = eval_batch_size
        self.n_layers = n_layers
        self.direction_info: Optional[dict] = None
        self._direction: Optional[torch.Tensor] = None
        self._candidates: Optional[torch.Tensor] = None

    @property
    def needs_optimizer_steps(self) -> bool:
        """`immunize fit` exports this module's model once the direction is ablated, without any optimizer step."""
        return self.direction_info is None

    def configure_optimizers(self):
        return None

    # ----- the training pass: sums of activations -----------------------------------------------
    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "selection_prompts"):
            raise UserError("RefusalAblation reads harmful and harmless prompts: set data.class_path to "
                            "immunize.datamodules.RefusalDirectionData")
        if is_fsdp_model(self.model):
            raise UserError("RefusalAblation does not run sharded (FSDP2); use one device or DDP")
        self.n_positions = max(1, datamodule.post_instruction_count())
        shape = (self.n_positions, self.n_layers, self.model.config.hidden_size)
        sides = ("harmful", "harmless")
        self._sums = {side: torch.zeros(shape, dtype=torch.float64, device=self.device) for side in sides}
        self._counts = {side: torch.zeros((), dtype=torch.float64, device=self.device) for side in sides}

    def _forward(self, batch: dict):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  output_hidden_states=True, use_cache=False)
        finally:
            self.model.train(was_training)

    def _kept(self, last: torch.Tensor, harmful: torch.Tensor) -> torch.Tensor:
        """Rows the reference keeps: harmful ones refused (score > 0), harmless ones answered (score < 0)."""
        if not self.filter_prompts:
            return torch.ones_like(harmful)
        score = refusal_score(last, self.refusal_ids)
        return torch.where(harmful, score > 0, score < 0)

    def training_step(self, batch, batch_idx):
        if self.direction_info is not None:
            return
        out = self._forward(batch)
        n = self.n_positions
        # [batch, position, layer, d_model]: the residual stream entering each block (hidden_states[l], l < L)
        acts = torch.stack([h[:, -n:, :] for h in out.hidden_states[:self.n_layers]], dim=2).double()
        harmful = batch["is_harmful"].to(acts.device)
        kept = self._kept(out.logits[:, -1], harmful)
        for side, rows in (("harmful", harmful & kept), ("harmless", ~harmful & kept)):
            self._sums[side] += acts[rows].sum(dim=0)
            self._counts[side] += rows.sum()

    def on_train_epoch_end(self) -> None:
        if self.direction_info is not None:
            return
        reduce = self.trainer.strategy.reduce
        sums = {side: reduce(self._sums[side], reduce_op="sum") for side in self._sums}
        counts = {side: int(reduce(self._counts[side], reduce_op="sum").item()) for side in self._counts}
        candidates = mean_difference(sums["harmful"], counts["harmful"], sums["harmless"], counts["harmless"])
        self.ablate(candidates, counts)
        self.trainer.should_stop = True

    # ----- selection and ablation -----------------------------------------------------------------
    def _batches(self, prompts: list[list[int]]) -> list[dict]:
        pad = self.tokenizer.pad_token_id
        return [{k: v.to(self.device) for k, v in pad_left(prompts[i:i + self.eval_batch_size], pad).items()}
                for i in range(0, len(prompts), self.eval_batch_size)]

    def _selection_batches(self) -> dict[str, list[dict]]:
        prompts = self.trainer.datamodule.selection_prompts()
        if self.filter_prompts:
            for side, wanted in (("harmful", 1.0), ("harmless", -1.0)):
                scores = refusal_score(last_logits(self.model, self._batches(prompts[side])), self.refusal_ids)
                prompts[side] = [p for p, s in zip(prompts[side], scores.tolist()) if s * wanted > 0]
        if not prompts["harmful"] or not prompts["harmless"]:
            raise UserError(f"after filtering, {len(prompts['harmful'])} harmful and {len(prompts['harmless'])} "
                            "harmless validation prompts are left (the model must refuse the harmful ones and answer "
                            "the harmless ones); raise data.n_val or set model.filter_prompts false")
        return {side: self._batches(rows) for side, rows in prompts.items()}

    def ablate(self, candidates: torch.Tensor, counts: dict) -> dict:
        """Score the candidates on the validation prompts, pick one (the rule or model.layer), orthogonalise the
        weights against it; returns the record written beside the export."""
        if self.position is not None and self.position < -candidates.shape[0]:
            raise UserError(f"model.position {self.position} is outside the template's {candidates.shape[0]} "
                            f"post-instruction positions; choose one in {-candidates.shape[0]}..-1")
        cells = [(self.position, self.layer)] if self.layer is not None else None
        was_training = self.model.training
        self.model.eval()
        try:
            batches = self._selection_batches()
            rows = candidate_scores(self.model, candidates, batches["harmful"], batches["harmless"], self.refusal_ids,
                                    cells, self.kl_threshold, self.induce_threshold, self.prune_layer_fraction)
            chosen, selection = self._choose(rows, cells)
            direction = candidates[chosen["position"], chosen["layer"]]
            orthogonalize_model(self.model, direction)
        finally:
            self.model.train(was_training)
        self._direction, self._candidates = direction.detach().cpu().clone(), candidates.detach().cpu()
        self.direction_info = {
            "layer": chosen["layer"], "position": chosen["position"], "n_layers": self.n_layers,
            "post_instruction_positions": int(candidates.shape[0]), "selection": selection,
            "scores": _plain(chosen), "direction_norm": float(direction.norm()),
            "refusal_tokens": {"given": self.refusal_words, "ids": self.refusal_ids,
                               "text": [self.tokenizer.decode([i]) for i in self.refusal_ids]},
            "prompts": {"harmful_train": counts["harmful"], "harmless_train": counts["harmless"],
                        "harmful_val": sum(len(b["input_ids"]) for b in batches["harmful"]),
                        "harmless_val": sum(len(b["input_ids"]) for b in batches["harmless"])},
            "filter": {"prompts": self.filter_prompts, "kl_threshold": self.kl_threshold,
                       "induce_threshold": self.induce_threshold, "prune_layer_fraction": self.prune_layer_fraction},
            "candidates": [_plain(r) for r in rows],
        }
        for key in ("layer", "position", "bypass", "induce", "kl"):
            value = chosen[key]
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.log(f"refusal_direction/{key}", float(value), rank_zero_only=True)
        return self.direction_info

    def _choose(self, rows: list[dict], cells) -> tuple[dict, str]:
        """(the chosen row, how it was chosen: fixed, rule or rule_fallback)."""
        if cells:
            return next(r for r in rows if (r["position"], r["layer"]) == cells[0]), "fixed"
        if self.if_all_filtered == "lowest_bypass" and all(r["discarded"] is not None for r in rows):
            scored = [r for r in rows if not math.isnan(r["bypass"])]
            if scored:
                return min(scored, key=lambda r: r["bypass"]), "rule_fallback"
        return select_candidate(rows), "rule"

    def write_export_extras(self, folder: Path) -> None:
        if self.direction_info is None:
            raise UserError("RefusalAblation exports the ablated model: run `immunize fit` with RefusalDirectionData "
                            "first (no direction has been selected)")
        atomic_save_safetensors(folder / DIRECTION_TENSORS, {"direction": self._direction,
                                                             "candidates": self._candidates},
                                metadata={"layer": str(self.direction_info["layer"]),
                                          "position": str(self.direction_info["position"])})
        atomic_write_json(folder / DIRECTION_JSON, self.direction_info)


def _plain(row: dict) -> dict:
    """A score row for JSON: NaN as null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
