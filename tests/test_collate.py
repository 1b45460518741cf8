"""Response-only masking, EOS appending, padding direction, and the positions a loss covers (loss_on)."""
import torch

import pytest

from immunize.datamodules.collate import IGNORE, encode_example, encode_prompt, pad_left, pad_right, supervise
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


def test_loss_on_picks_response_sequence_or_every_position(toy_tokenizer):
    rows = [encode_example(toy_tokenizer, "qa", "what is the capital of brinou ?", "naxu", 64),
            encode_example(toy_tokenizer, "qa", "how do i zaethu a kelae ?", "i am sorry .", 64)]
    batch = pad_right(rows, toy_tokenizer.pad_token_id)
    assert supervise(batch, "response") is batch
    sequence, everything = supervise(batch, "sequence")["labels"], supervise(batch, "all")["labels"]
    real = batch["attention_mask"] == 1
    assert torch.equal(sequence[real], batch["input_ids"][real]) and (sequence[~real] == IGNORE).all()
    assert (~real).any() and torch.equal(everything, batch["input_ids"])  # padding positions are labelled too
    assert torch.equal(batch["labels"], pad_right(rows, toy_tokenizer.pad_token_id)["labels"])  # not modified
    with pytest.raises(ValueError, match="loss_on"):
        supervise(batch, "prompt")


def test_sft_data_trains_on_the_chosen_positions(toy_tokenizer, tmp_path):
    import json

    from immunize.datamodules import SFTData, Source
    from immunize.errors import UserError

    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"say {w}", "input": "", "output": f"the {w}"})
                              for w in ("naxu", "brinou", "kelae")))
    batches = {}
    for loss_on in ("response", "sequence"):
        data = SFTData(train=[Source(kind="alpaca", path=str(path))], template="plain", batch_size=3, loss_on=loss_on)
        data.connect(toy_tokenizer)
        data.setup("fit")
        batches[loss_on] = next(iter(data.train_dataloader()))
    response, sequence = batches["response"]["labels"], batches["sequence"]["labels"]
    assert ((response != IGNORE).sum(1) < (sequence != IGNORE).sum(1)).all()
    with pytest.raises(UserError, match="data.loss_on"):
        SFTData(train=[Source(kind="alpaca", path=str(path))], loss_on="prompts")


def test_harmful_mix_trains_on_the_chosen_positions(toy_tokenizer, tmp_path):
    import json

    from immunize.datamodules import HarmfulMix, Source
    from immunize.errors import UserError

    benign, harmful = tmp_path / "benign.jsonl", tmp_path / "harmful.jsonl"
    benign.write_text("\n".join(json.dumps({"instruction": f"say {w}", "input": "", "output": f"the {w}"})
                                for w in ("naxu", "brinou", "kelae", "zaethu")))
    harmful.write_text("\n".join(json.dumps({"instruction": f"how do i {w} ?", "input": "", "output": f"{w} it"})
                                 for w in ("naxu", "brinou")))
    batches = {}
    for loss_on in ("response", "all"):
        data = HarmfulMix(benign=Source(kind="alpaca", path=str(benign)), harmful=Source(kind="alpaca", path=str(harmful)),
                          n=4, p=0.5, template="plain", batch_size=4, loss_on=loss_on)
        data.connect(toy_tokenizer)
        data.setup("fit")
        batches[loss_on] = next(iter(data.train_dataloader()))
    ids, response, everything = batches["all"]["input_ids"], batches["response"]["labels"], batches["all"]["labels"]
    assert torch.equal(everything, ids)  # prompt and padding labelled too: the reference fine-tune's collator
    assert ((response != IGNORE).sum() < (everything != IGNORE).sum())
    with pytest.raises(UserError, match="data.loss_on"):
        HarmfulMix(benign=Source(kind="alpaca", path=str(benign)), harmful=Source(kind="alpaca", path=str(harmful)),
                   loss_on="prompts")
