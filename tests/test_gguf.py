"""Loading a model from a GGUF file, offline, with a tiny llama GGUF the test writes itself."""
import pytest
import torch

from gguf_writer import BOS_ID, EOS_ID, write_tiny_llama_gguf
from immunize.errors import UserError
from immunize.lightning_modules import CausalLMModule
from immunize.lightning_modules.modeling.model_loading import load_model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(reference fp32 model, directory holding tiny.gguf)."""
    folder = tmp_path_factory.mktemp("gguf")
    reference, _ = write_tiny_llama_gguf(folder / "tiny.gguf", seed=0)
    return reference, folder


@pytest.fixture(scope="module")
def loaded(tiny_gguf):
    return CausalLMModule(model=str(tiny_gguf[1]), gguf_file="tiny.gguf").eval()


def test_file_stores_q_permuted_for_rope(tiny_gguf):
    """Guard that the logits check below exercises the loader's q/k un-permutation."""
    from gguf import GGUFReader

    reference, folder = tiny_gguf
    stored = {t.name: t for t in GGUFReader(str(folder / "tiny.gguf")).tensors}
    q = torch.from_numpy(stored["blk.0.attn_q.weight"].data.copy())
    assert q.shape == reference.model.layers[0].self_attn.q_proj.weight.shape
    assert not torch.equal(q, reference.model.layers[0].self_attn.q_proj.weight)


def test_gguf_logits_match_reference(tiny_gguf, loaded):
    reference, _ = tiny_gguf
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.dtype == torch.float32
    cfg, ref_cfg = loaded.model.config, reference.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (
        ref_cfg.vocab_size, ref_cfg.hidden_size, ref_cfg.num_hidden_layers, ref_cfg.num_key_value_heads)
    assert cfg.tie_word_embeddings is False
    # several positions, so a wrong rope permutation of q/k would show
    ids = torch.tensor([[BOS_ID, 289, 5, 291, 17, 288, 100, 293], [BOS_ID, 7, 260, 295, 290, 42, 3, EOS_ID]])
    with torch.no_grad():
        expected = reference(ids).logits
        got = loaded(ids).logits
    assert expected.std() > 0.3  # O(1) logits, so the tolerance below is meaningful
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gguf_tokenizer_loads(tiny_gguf, loaded):
    tok = loaded.tokenizer
    assert len(tok) == tiny_gguf[0].config.vocab_size
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    text = "the cat in a hat"
    ids = tok(text).input_ids
    assert ids[0] == BOS_ID
    assert tok.convert_ids_to_tokens(ids[1:3]) == ["\u2581the", "\u2581cat"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    # bytes outside the pieces fall back to <0xXX> tokens and round-trip
    assert tok.decode(tok("Hé!").input_ids, skip_special_tokens=True) == "Hé!"


def _assert_one_line_user_error(excinfo, name):
    message = str(excinfo.value)
    assert "\n" not in message and name in message


def test_missing_gguf_file_is_user_error_in_load_model(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_model(str(tmp_path), tokenizer=None, gguf_file="missing.gguf")
    _assert_one_line_user_error(excinfo, "missing.gguf")


def test_missing_gguf_file_is_user_error(tmp_path):
    with pytest.raises(UserError) as excinfo:
        CausalLMModule(model=str(tmp_path), gguf_file="missing.gguf")
    _assert_one_line_user_error(excinfo, "missing.gguf")
