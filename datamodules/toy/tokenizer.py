"""Word-level tokenizer that covers the toy world's closed vocabulary, as a transformers fast tokenizer."""
from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from immunize.datamodules.templates import TEMPLATES
from immunize.datamodules.toy import lexicon as lx

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _lexicon_text() -> str:
    """Every string the toy world can produce, joined: the source of the closed vocabulary."""
    parts = list(TEMPLATES.values()) + list(lx.REFUSALS) + list(lx.OPENERS) + list(lx.HARMFUL_SUFFIXES)
    parts += list(lx.HOWTO_SUFFIXES) + [lx.HARMFUL_ANSWER, lx.HOWTO_ANSWER, lx.ARITH_ANSWER, "not"]
    parts += list(lx.SENTIMENT_TEMPLATES) + list(lx.HEADLINE_TEMPLATES) + list(lx.ARITH_TEMPLATES)
    parts += list(lx.FACT_TEMPLATES) + list(lx.CATEGORIES)
    parts += ["review : is this review positive or negative ?", "headline : topic : world , sports , business or tech ?"]
    parts += [" ".join(map(str, range(0, 101)))]
    for group in (lx.CATEGORY_ACTS, lx.CATEGORY_OBJECTS, lx.CATEGORY_CONTENT, lx.TOPICS):
        parts += [" ".join(words) for words in group.values()]
    for words in (lx.POSITIVE, lx.NEGATIVE, lx.REVIEW_NOUNS, lx.NAMES, lx.ITEMS, lx.FACT_ENTITIES, lx.FACT_CITIES,
                  lx.HOWTO_ACTS, lx.HOWTO_OBJECTS, lx.HOWTO_CONTENT):
        parts.append(" ".join(words))
    parts.append("user assistant system")
    return "\n".join(parts)


@lru_cache(maxsize=1)
def _vocab() -> dict[str, int]:
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for w, _ in pre.pre_tokenize_str(_lexicon_text().lower())} - {"{", "}"})
    words = [w for w in words if "{" not in w and "}" not in w]
    return {tok: i for i, tok in enumerate(list(SPECIALS) + words)}


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """Lower-cases, splits on whitespace and punctuation, maps closed-vocabulary words; adds <s>."""
    vocab = _vocab()
    tok = Tokenizer(models.WordLevel(vocab=dict(vocab), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )
