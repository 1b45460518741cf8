"""A tiny sequence classifier saved to disk, whose logits are fixed biases: judges' tests read it as a model."""
from __future__ import annotations

import torch

WORDS = ["how", "do", "i", "make", "a", "cake", "sure", "here", "is", "sorry", "cannot", "help"]


def save_tiny_classifier(path, biases, id2label=None):
    """Save a tiny BERT classifier + WordLevel tokenizer whose logits equal `biases` for every input."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    n = len(biases)
    id2label = id2label or {i: f"LABEL_{i}" for i in range(n)}
    config = BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=64, num_labels=n, id2label=id2label,
                        label2id={v: k for k, v in id2label.items()}, pad_token_id=0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(biases, dtype=torch.float32))
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)
