"""What every judge checks of its input, and how it keeps a judged answer from acting on the judge (immunize.judges
and immunize.judges.language_models share these)."""
from __future__ import annotations

import re
import secrets
from typing import Optional, Sequence

from immunize.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "org/name" or "name": what a hub model id looks like


def check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    """One response per prompt, or a UserError saying how many of each came."""
    if len(prompts) != len(responses):
        raise UserError(f"judge: got {len(prompts)} prompts but {len(responses)} responses; pass one of each per item")


def is_blank(response) -> bool:
    """A missing or whitespace-only response: every judge scores it 0 without looking further."""
    return response is None or not str(response).strip()


# ----- answers are data: what a judged model wrote never becomes the judge's control tokens or template ------------
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9 _-]{0,40}>")
_LABEL = re.compile(r"^[ \t]*((?:\d{1,2}[.)][ \t]*)?[A-Za-z][A-Za-z0-9' _-]{0,40}):", re.M)
QUOTE = "> "  # put before a data line that starts with one of the template's labels


def template_delimiters(structure: str) -> tuple[list[str], list[str]]:
    """(tags, labels) that give a judge template its structure: the tags it writes (`<conversation>`,
    `<END CONVERSATION>`) and the labels that open its lines (`User:`, `Rating:`). `structure` is the template's own
    text, without the values filled into it."""
    tags = sorted({m.group(0) for m in _TAG.finditer(structure)}, key=len, reverse=True)
    labels = sorted({m.group(1).strip() for m in _LABEL.finditer(structure)}, key=len, reverse=True)
    return tags, labels


def guard_data(value: str, tags: Sequence[str], labels: Sequence[str], at_line_start: bool = False) -> str:
    """A value as it may appear inside a judge template: each of the template's tags written in it is escaped
    (`<` and `>` as `&lt;` and `&gt;`), and each of its lines that opens with one of the template's labels is quoted
    (QUOTE before it; its first line too when the template puts the value at the start of a line), so the value
    cannot close a section of the template or start a line of its own. A value without those strings is returned
    unchanged."""
    if tags:
        pattern = re.compile("|".join(re.escape(t) for t in tags), re.I)
        value = pattern.sub(lambda m: m.group(0).replace("<", "&lt;").replace(">", "&gt;"), value)
    if labels:
        names = "|".join(re.escape(label) for label in labels)
        start = "^|\n" if at_line_start else "\n"
        value = re.sub(rf"({start})([ \t]*)(?=(?:{names})[ \t]*:)", lambda m: m.group(1) + QUOTE + m.group(2), value,
                       flags=re.I)
    return value


def special_texts(tokenizer) -> list[str]:
    """The texts the tokenizer turns into added or special tokens wherever they occur (`<|im_end|>`, `[SEP]`)."""
    found = {str(t.content) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    found |= {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    return sorted((t for t in found if t), key=len, reverse=True)


def encode_parts(tokenizer, parts: Sequence[tuple[str, bool]], add_special_tokens: bool,
                 max_length: Optional[int] = None) -> list[int]:
    """Token ids of a judge input given as (text, is_data) parts, with special-token text parsed only in the
    template's parts. When no data part holds such text (the usual case), the whole text is tokenized at once, as
    before; when only the data does, the whole text is tokenized with split_special_tokens (the template's own
    token boundaries unchanged); otherwise each part separately, the data with split_special_tokens. max_length:
    truncate to this many tokens (the tokenizer's own begin and end tokens kept)."""
    specials = special_texts(tokenizer)
    has = lambda text: any(s in text for s in specials)  # noqa: E731
    text = "".join(t for t, _ in parts)
    cut = {"truncation": True, "max_length": max_length} if max_length else {}
    if not any(has(t) for t, is_data in parts if is_data):
        return list(tokenizer(text, add_special_tokens=add_special_tokens, **cut).input_ids)
    if not any(has(t) for t, is_data in parts if not is_data):
        return list(tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True, **cut).input_ids)
    ids: list[int] = []
    for part, is_data in parts:
        if part:
            ids += tokenizer(part, add_special_tokens=False, split_special_tokens=is_data).input_ids
    head: list[int] = []
    tail: list[int] = []
    if add_special_tokens:
        bare = list(tokenizer("a", add_special_tokens=False).input_ids)
        full = list(tokenizer("a", add_special_tokens=True).input_ids)
        at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
        head, tail = full[:at], full[at + len(bare):]
    if max_length:
        ids = ids[:max(0, max_length - len(head) - len(tail))]
    return head + ids + tail


def value_marks(*values: str) -> dict[str, str]:
    """{marker: value}: a random marker string per value, to render a template around (see marked_parts)."""
    nonce = secrets.token_hex(8)
    return {f"IMMUNIZEVALUE{i}X{nonce}": value for i, value in enumerate(values)}


def marked_parts(text: str, values: dict[str, str]) -> tuple[list[tuple[str, bool]], str]:
    """(parts, structure): `text` rendered with marker strings in place of the values, split back into template
    parts and the values (each guarded against the template's delimiters); `structure` is the template's own
    text."""
    pattern = re.compile("(" + "|".join(re.escape(m) for m in values) + ")")
    pieces = pattern.split(text)
    structure = "".join(p for p in pieces if p not in values)
    tags, labels = template_delimiters(structure)
    parts: list[tuple[str, bool]] = []
    for i, piece in enumerate(pieces):
        if piece in values:
            line_start = i == 0 or pieces[i - 1].endswith("\n") or (pieces[i - 1] == "" and i == 1)
            parts.append((guard_data(values[piece], tags, labels, line_start), True))
        elif piece:
            parts.append((piece, False))
    return parts, structure
