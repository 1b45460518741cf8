"""Prompt templates: how a bare prompt is wrapped before the response starts."""
from __future__ import annotations

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


def format_prompt(template: str, prompt: str, tokenizer=None) -> str:
    """Wrap `prompt` with a named template; "chat" uses the tokenizer's own chat template."""
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("template 'chat': the tokenizer has no chat_template; use template 'alpaca' or 'qa'")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    if template not in TEMPLATES:
        raise UserError(f"unknown prompt template {template!r}; choose from {list(TEMPLATE_NAMES)}")
    return TEMPLATES[template].format(prompt=prompt)
