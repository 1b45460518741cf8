"""LightningDataModules and the records, templates and sources they are built from.

The datamodules a config names: SFTData (plain fine-tuning), AlignmentData (refusal pairs, triplets), HarmfulMix (a
user's task with a harmful fraction p), EvalData (what `immunize test` evaluates), IdentityShiftData (the
obedient-agent attack set), RefusalDirectionData (prompts for refusal-direction ablation), on their base
TokenizedData (base.py). Their machinery: records.py (the typed records Example, Pair, EvalItem), catalog.py (Source:
where records come from), sources.py (real datasets from the hub or local files), real_samples.py (the shipped offline
samples), templates.py and collate.py (prompt templates, tokenization, padding), prompt_formats.py and
jailbreak_formats.py (jailbreak-tuning's wrappings of a request), toy/ (the synthetic toy world).
Installed as immunize.datamodules.

May import: torch, Lightning, transformers, datasets, tokenizers and immunize.errors/io only (layer L1): data never
depends on models, judges or the CLI.
"""
from immunize.datamodules.alignment import AlignmentData
from immunize.datamodules.catalog import Source
from immunize.datamodules.evaluation import EvalData
from immunize.datamodules.harmful_mix import HarmfulMix
from immunize.datamodules.identity_shift import IdentityShiftData
from immunize.datamodules.records import EvalItem, Example, Pair
from immunize.datamodules.refusal_prompts import RefusalDirectionData
from immunize.datamodules.sft_data import SFTData

__all__ = ["AlignmentData", "EvalData", "EvalItem", "Example", "HarmfulMix", "IdentityShiftData", "Pair",
           "RefusalDirectionData", "SFTData", "Source"]
