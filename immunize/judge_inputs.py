"""What every judge checks of its input (immunize.judges and immunize.judges_llm share these)."""
from __future__ import annotations

import re
from typing import Sequence

from immunize.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "org/name" or "name": what a hub model id looks like


def check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    """One response per prompt, or a UserError saying how many of each came."""
    if len(prompts) != len(responses):
        raise UserError(f"judge: got {len(prompts)} prompts but {len(responses)} responses; pass one of each per item")


def is_blank(response) -> bool:
    """A missing or whitespace-only response: every judge scores it 0 without looking further."""
    return response is None or not str(response).strip()
