"""LightningDataModules and the records, templates and sources they are built from."""
from datamodules.alignment import AlignmentData
from datamodules.catalog import Source
from datamodules.evaluation import EvalData
from datamodules.harmful_mix import HarmfulMix
from datamodules.records import EvalItem, Example, Pair
from datamodules.sft_data import SFTData

__all__ = ["AlignmentData", "EvalData", "EvalItem", "Example", "HarmfulMix", "Pair", "SFTData", "Source"]
