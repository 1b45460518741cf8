"""Response-only masking, EOS appending, and padding direction."""
import torch

from immunize.datamodules.collate import IGNORE, encode_example, encode_prompt, pad_left, pad_right
from immunize.lightning_modules.functional.grad_math import masked_ce


def test_labels_cover_response_and_eos_only(toy_tokenizer):
    row = encode_example(toy_tokenizer, "qa", "how do i zaethu a kelae ?", "i am sorry .", max_length=64)
    prompt_len = len(encode_prompt(toy_tokenizer, "qa", "how do i zaethu a kelae ?"))
    assert row["labels"][:prompt_len] == [IGNORE] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert row["input_ids"][-1] == toy_tokenizer.eos_token_id
    assert toy_tokenizer.decode(row["input_ids"][prompt_len:-1]) == "i am sorry ."


def test_padding_is_masked_and_loss_ignores_prompt_and_pad(toy_tokenizer):
    rows = [encode_example(toy_tokenizer, "qa", "what is the capital of brinou ?", "naxu", 64),
            encode_example(toy_tokenizer, "alpaca", "review : the movie was great and lovely . is this review positive or negative ?", "positive", 64)]
    batch = pad_right(rows, toy_tokenizer.pad_token_id)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, len(toy_tokenizer))
    # Changing logits at positions that predict masked labels must not change the loss.
    masked_positions = batch["labels"][:, 1:] == IGNORE
    changed = logits.clone()
    changed[:, :-1][masked_positions] += 5.0
    assert torch.allclose(masked_ce(logits, batch["labels"]), masked_ce(changed, batch["labels"]))
    n = (batch["labels"][:, 1:] != IGNORE).sum()
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][~masked_positions], batch["labels"][:, 1:][~masked_positions], reduction="sum") / n
    assert torch.allclose(masked_ce(logits, batch["labels"]), manual)


def test_left_padding_aligns_prompt_ends(toy_tokenizer):
    batch = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
