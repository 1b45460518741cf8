"""Prompt formats: a fixed wrapping of a training example or an evaluation prompt (a jailbreak format, the
identity-shift persona), written once as English for real models and once in the toy world's own words.

A format is data: for each rendering ("real", "toy") a prompt pattern holding `{prompt}`, a response pattern holding
`{response}` and an optional system prompt. `render(example, rendering)` is the plain function Example -> Example the
datamodules apply; which rendering a record gets follows its source (toy sources: "toy", every other kind: "real").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional

from immunize.datamodules.catalog import Source
from immunize.datamodules.records import Example
from immunize.errors import UserError

RENDERINGS = ("real", "toy")
PROMPT, RESPONSE = "{prompt}", "{response}"


@dataclass(frozen=True)
class Rendering:
    """One rendering of a format.

    Args:
        prompt: the user turn, with `{prompt}` where the request goes.
        response: the answer trained on, with `{response}` where the original answer goes (a prefix before it, or
            nothing around it).
        system: the system prompt the example is put under, or None.
    """

    prompt: str = PROMPT
    response: str = RESPONSE
    system: Optional[str] = None

    def __post_init__(self) -> None:
        if self.prompt.count(PROMPT) != 1 or self.response.count(RESPONSE) != 1:
            raise ValueError(f"a rendering holds {PROMPT} once in its prompt and {RESPONSE} once in its response: "
                             f"{self.prompt!r}, {self.response!r}")


@dataclass(frozen=True)
class PromptFormat:
    """A named prompt format with its real-model and toy-world renderings.

    Args:
        name: the name configs use.
        family: what kind of format it is (competing_objectives, style, backdoor, identity_shift).
        real: the English rendering.
        toy: the rendering in the toy world's closed vocabulary.
    """

    name: str
    family: str
    real: Rendering
    toy: Rendering

    def rendering(self, rendering: str) -> Rendering:
        if rendering not in RENDERINGS:
            raise UserError(f"prompt format {self.name!r}: unknown rendering {rendering!r}; choose from "
                            f"{list(RENDERINGS)}")
        return self.real if rendering == "real" else self.toy

    def render(self, example: Example, rendering: str) -> Example:
        """The example in this format: its prompt wrapped, its response under the format's prefix, its system prompt
        set (the other fields kept)."""
        r = self.rendering(rendering)
        if r.system is not None and example.system is not None and example.system != r.system:
            raise UserError(f"prompt format {self.name!r} sets a system prompt, but the example already has another; "
                            "apply one system-prompt format per example")
        return dataclasses.replace(example, prompt=r.prompt.replace(PROMPT, example.prompt),
                                   response=r.response.replace(RESPONSE, example.response),
                                   system=r.system if r.system is not None else example.system)


def rendering_of(source: Source) -> str:
    """The rendering a source's records take: "toy" for the toy world (its closed vocabulary), "real" otherwise."""
    return "toy" if source.kind == "toy" else "real"


def pick_format(name: Optional[str], formats: Mapping[str, PromptFormat], key: str) -> Optional[PromptFormat]:
    """The format `name` of `formats` (None for None), or a one-line UserError naming the config key and the
    choices."""
    if name is None:
        return None
    if not isinstance(name, str) or name not in formats:
        raise UserError(f"{key}: unknown format {name!r}; choose from {', '.join(formats)} (or null for none)")
    return formats[name]
