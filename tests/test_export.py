"""export(dir) writes a Hugging Face directory (safetensors + tokenizer) that reloads to identical logits."""
import torch

from lightning_modules import CausalLMModule, LoraSpec


def _logits(module, tokenizer):
    ids = tokenizer("question : what is the capital of brinou ? answer :", return_tensors="pt").input_ids
    module.eval()
    with torch.no_grad():
        return module(ids).logits


def test_export_reload_gives_identical_logits(tmp_path, toy_tokenizer):
    module = CausalLMModule(model="toy:tiny", init_seed=1)
    out = module.export(tmp_path / "model")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not list(out.glob("*.bin"))
    reloaded = CausalLMModule(model=str(out))
    assert torch.equal(_logits(module, toy_tokenizer), _logits(reloaded, reloaded.tokenizer))
    assert reloaded.tokenizer.get_vocab() == module.tokenizer.get_vocab()


def test_lora_export_is_merged_and_matches(tmp_path, toy_tokenizer):
    module = CausalLMModule(model="toy:tiny", lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = module.export(tmp_path / "merged")
    reloaded = CausalLMModule(model=str(out))
    assert not any("lora" in n for n, _ in reloaded.model.named_parameters())
    assert torch.allclose(_logits(module, toy_tokenizer), _logits(reloaded, reloaded.tokenizer), atol=1e-5)
