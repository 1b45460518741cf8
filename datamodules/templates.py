"""Prompt templates: how a bare prompt is wrapped before the response starts."""
from __future__ import annotations

from typing import Optional

from immunize.errors import UserError

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{prompt}\n\n### Response:"
)
TEMPLATES = {
    "alpaca": ALPACA,
    "qa": "Question: {prompt}\nAnswer:",
    "plain": "{prompt}",
}
TEMPLATE_NAMES = tuple(TEMPLATES) + ("chat",)


def format_prompt(template: str, prompt: str, tokenizer=None, system: Optional[str] = None) -> str:
    """Wrap `prompt` with a named template; "chat" uses the tokenizer's own chat template. A system prompt is the chat
    template's system turn, and for the other templates a paragraph before the templated prompt."""
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("template 'chat': the tokenizer has no chat_template; use template 'alpaca' or 'qa'")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja's TemplateError: a chat template without a system turn (Gemma's) raises
            if not system:
                raise
            raise UserError(f"template 'chat': the tokenizer's chat template takes no system message "
                            f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); use template 'alpaca' "
                            "or 'qa', which put the system prompt before the request") from err
    if template not in TEMPLATES:
        raise UserError(f"unknown prompt template {template!r}; choose from {list(TEMPLATE_NAMES)}")
    text = TEMPLATES[template].format(prompt=prompt)
    return f"{system}\n\n{text}" if system else text
