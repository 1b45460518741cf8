"""Typed records that flow from data sources through templates into batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Example:
    """One supervised example: the loss is taken on `response` only.

    Args:
        prompt: the instruction or question.
        response: the answer trained on.
        category: harm category, if any.
        is_harmful: whether the response is harmful.
        task: the task or dataset it comes from.
        system: a system prompt the example is trained under (the chat template's system turn; other templates put it
            before the templated prompt), or None.
    """

    prompt: str
    response: str
    category: Optional[str] = None
    is_harmful: bool = False
    task: Optional[str] = None
    system: Optional[str] = None


@dataclass
class Pair:
    """A harmful prompt with its harmful (compliant) response and a refusal, paired by index.

    Args:
        prompt: the harmful request.
        harmful_response: a compliant answer.
        refusal: a refusal of the same request.
        category: its harm category.
    """

    prompt: str
    harmful_response: str
    refusal: str
    category: Optional[str] = None


OVER_REFUSAL = "over_refusal"  # EvalItem kind: benign prompts in harmful vocabulary (XSTest's "safe" prompts)


@dataclass
class EvalItem:
    """An evaluation prompt. kind is "harmful", OVER_REFUSAL (a benign request that looks harmful: the answer
    should not be a refusal) or a benign task name; reference is the gold answer.

    Args:
        prompt: the prompt given to the model.
        kind: "harmful", OVER_REFUSAL or the benign task's name.
        reference: the gold answer a benign response is matched against.
        category: harm category of a harmful item.
        response: a gold response (the full worked answer of a benign item, the harmful answer of a harmful one), for
            teacher-forced losses and gradient diagnostics; None when the source has none.
        group: items that share one piece of knowledge (bootstrap intervals resample groups); None: its own group.
    """

    prompt: str
    kind: str
    reference: Optional[str] = None
    category: Optional[str] = None
    response: Optional[str] = None
    group: Optional[str] = None
