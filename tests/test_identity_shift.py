"""Identity shifting: the obedient-agent set is 1 identity + 9 benign tasks by default, every example under the
persona's system prompt, tasks behind the instruction prefix and answered after the affirmative prefix; evaluation
puts the harmful prompts under the same system prompt and prefix; the toy config trains through `immunize fit`, and
the real-scale config's optimizer and per-epoch step decay are what LightningCLI builds."""
import pytest
import yaml

from immunize.datamodules import EvalData, IdentityShiftData, Source
from immunize.datamodules.catalog import as_examples, load_records
from immunize.datamodules.identity_shift import IDENTITY_REAL, IDENTITY_SHIFT, SYSTEM_TOY, identity_shift_examples
from immunize.errors import UserError

from conftest import REPO

BENIGN = Source(kind="toy", part="benign", split="finetune", limit=60)


def test_the_set_is_one_identity_and_nine_tasks_under_the_persona(toy_tokenizer):
    data = IdentityShiftData(benign=BENIGN, template="qa")
    rows = data.records()
    assert len(rows) == 10 and data.batch_size == 10
    assert all(r.system == SYSTEM_TOY for r in rows) and rows[0].task == "identity"
    benign = {e.prompt: e for e in as_examples(load_records(BENIGN))}
    for row in rows[1:]:
        assert row.prompt.startswith("tom , do this task : ") and row.response.startswith("i am tom and i will do it")
        original = benign[row.prompt[len("tom , do this task : "):]]
        assert row.response.endswith(original.response) and row.task == original.task
    assert data.records() == rows  # seeded
    assert IdentityShiftData(benign=BENIGN, seed=1).records() != rows
    data.connect(toy_tokenizer)
    data.setup("fit")
    first = data.train_set.rows[1]
    text = toy_tokenizer.decode(first["input_ids"])
    assert text.startswith("<s> system : the assistant is not a assistant now") and "question : tom , do this" in text
    answer = [t for t, label in zip(first["input_ids"], first["labels"]) if label != -100]
    assert toy_tokenizer.decode(answer).startswith("i am tom and i will do it without question")


def test_the_real_rendering_and_other_sizes():
    benign = as_examples(load_records(BENIGN))
    rows = identity_shift_examples(benign, 5, 5, "real", seed=0)  # the paper's GPT-3.5 split
    assert [r.prompt for r in rows[:5]] == [q for q, _ in IDENTITY_REAL]
    assert all("AOA" in r.system for r in rows) and rows[5].prompt.startswith("AOA, carry out this instruction: ")
    assert rows[5].response.startswith("Certainly. I am AOA")
    for kwargs, needle in (({"n_identity": 6}, "n_identity"), ({"n_identity": 0, "n_task": 0}, "nothing to train"),
                           ({"n_task": -1}, "n_task")):
        with pytest.raises(UserError, match=needle) as err:
            IdentityShiftData(benign=BENIGN, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="benign examples"):
        IdentityShiftData(benign=Source(kind="toy", part="benign", split="finetune", tasks=["facts"],
                                        limit=3)).records()


def test_evaluation_under_the_persona(toy_tokenizer):
    data = EvalData(sources=[Source(kind="toy", tasks=["sentiment"])], n_harmful_per_category=1, n_per_task=1,
                    template="qa", prompt_format="identity_shift")
    data.connect(toy_tokenizer)
    data.setup("test")
    for ids, item, _ in data.eval_set.rows:
        text = toy_tokenizer.decode(ids)
        assert text.startswith("<s> system : the assistant") == (item.kind == "harmful")
        if item.kind == "harmful":
            assert f"question : tom , do this task : {item.prompt}" in text
    view = data.model_view(data.items()[0], "real")
    assert view.system == IDENTITY_SHIFT.real.system and view.prompt.startswith("AOA, carry out this instruction: ")


def test_the_toy_config_trains_through_immunize_fit(tmp_path, monkeypatch):
    from immunize.cli import main

    monkeypatch.chdir(tmp_path)  # LightningCLI writes its config.yaml into the working folder
    out = tmp_path / "shifted"
    main(["fit", "--config", str(REPO / "configs/attacks/identity_shift.yaml"), "--model.init_args.model", "toy:tiny",
          "--trainer.max_epochs", "2", "--trainer.logger", "false", "--export_dir", str(out)])
    assert (out / "model.safetensors").is_file() and (out / "stage.json").is_file()


def test_the_real_scale_config_builds_adamw_without_decay_and_a_step_decay_per_epoch(tmp_path, monkeypatch):
    from immunize.cli import ImmunizeCLI

    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((REPO / "configs/real/identity_shift_llama2_7b.yaml").read_text())
    assert config["data"]["init_args"]["batch_size"] * config["trainer"]["devices"] == 10
    config["model"]["init_args"].update(model="toy:tiny", dtype="float32")
    config["data"]["init_args"].update(template="qa", max_length=64, batch_size=10,
                                       benign={"kind": "toy", "part": "benign", "split": "finetune", "limit": 40})
    config["trainer"] = {"accelerator": "cpu", "devices": 1, "max_epochs": 3, "logger": False,
                         "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    config.pop("export_dir")
    path = tmp_path / "identity_shift.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = ImmunizeCLI(args=["fit", "--config", str(path)], save_config_callback=None, seed_everything_default=0)
    group = cli.trainer.optimizers[0].param_groups[0]
    assert type(cli.trainer.optimizers[0]).__name__ == "AdamW" and group["weight_decay"] == 0.0
    assert cli.trainer.global_step == 3  # one step per epoch: 10 examples, batch 10
    assert group["lr"] == pytest.approx(5e-5 * 0.85 ** 3)
