"""Typed records that flow from data sources through templates into batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Example:
    """One supervised example: the loss is taken on `response` only."""

    prompt: str
    response: str
    category: Optional[str] = None
    is_harmful: bool = False
    task: Optional[str] = None


@dataclass
class Pair:
    """A harmful prompt with its harmful (compliant) response and a refusal, paired by index."""

    prompt: str
    harmful_response: str
    refusal: str
    category: Optional[str] = None


@dataclass
class EvalItem:
    """An evaluation prompt. kind is "harmful" or a benign task name; reference is the gold answer."""

    prompt: str
    kind: str
    reference: Optional[str] = None
    category: Optional[str] = None
