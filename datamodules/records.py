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
    """An evaluation prompt. kind is "harmful" or a benign task name; reference is the gold answer.

    response: a gold response (the full worked answer of a benign item, the harmful answer of a harmful one),
    for teacher-forced losses and gradient diagnostics; None when the source has none. group: items that
    share one piece of knowledge (bootstrap intervals resample groups); None: the item is its own group.
    """

    prompt: str
    kind: str
    reference: Optional[str] = None
    category: Optional[str] = None
    response: Optional[str] = None
    group: Optional[str] = None
