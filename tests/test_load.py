import bitsandbytes as bnb
import pytest
import torch

from edgetune.errors import UserError
from edgetune.families.base import get_module
from edgetune.load import load_backbone
from edgetune.recipe import ModelSection, QuantizationSection

CPU = torch.device("cpu")


def linears(module):
    return {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def test_nf4_quantizes_the_llm_linears_only(tiny_llava_dir):
    backbone = load_backbone(ModelSection(path=str(tiny_llava_dir)), QuantizationSection(mode="nf4"), CPU, torch.float32)
    model, family = backbone.model, backbone.family
    llm = linears(get_module(model, family.language_model))
    assert llm and all(isinstance(m, bnb.nn.Linear4bit) for m in llm.values())
    assert {m.weight.quant_state.quant_type for m in llm.values()} == {"nf4"}
    assert all(m.weight.quant_state.nested for m in llm.values())  # double quantization
    for precise in (family.vision_tower, family.connector):
        kept = linears(get_module(model, precise))
        assert kept and not any(isinstance(m, bnb.nn.Linear4bit) for m in kept.values())
        assert all(m.weight.dtype == torch.float32 for m in kept.values())
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit) and model.lm_head.weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())


def test_nf4_logits_stay_close_to_full_precision(tiny_llava_dir):
    """NF4 changes the function (that is why merge dequantizes) but only by quantization noise."""
    full = load_backbone(ModelSection(path=str(tiny_llava_dir)), QuantizationSection(mode="none"), CPU, torch.float32).model
    nf4 = load_backbone(ModelSection(path=str(tiny_llava_dir)), QuantizationSection(mode="nf4"), CPU, torch.float32).model
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in full.modules())
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        a, b = full(input_ids=ids).logits, nf4(input_ids=ids).logits
    rel = float((a - b).norm() / a.norm())
    assert 1e-4 < rel < 0.5


def test_unsupported_family_names_the_supported_ones(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"'llama' model, which edgetune does not support; supported families: (\w+, )*llava\b"):
        load_backbone(ModelSection(path=str(tmp_path)), QuantizationSection(), CPU, torch.float32)


def test_remote_code_models_are_refused_without_opt_in(tmp_path, tiny_llava_dir):
    import json
    import shutil

    shutil.copytree(tiny_llava_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.MyConfig"}
    config["model_type"] = "my_custom_vlm"
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="trust_remote_code"):
        load_backbone(ModelSection(path=str(tmp_path / "m")), QuantizationSection(), CPU, torch.float32)


@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_loaded_weights_live_in_process_memory_not_in_the_checkpoint_mapping(family, tiny_model_dir):
    """transformers leaves the precise weights as views of the mmapped safetensors file; after
    loading none is (so anonymous memory counts them) and tied tensors stay tied (PaliGemma)."""
    from edgetune.load import file_mapped_ranges

    backbone = load_backbone(ModelSection(path=str(tiny_model_dir(family))), QuantizationSection(), CPU, torch.float32)
    assert not [r for r in file_mapped_ranges()], "a checkpoint file is still mapped"
    model = backbone.model
    plain = backbone.family.model_class().from_pretrained(str(tiny_model_dir(family)))  # transformers' own tying

    def tied(m):
        return m.lm_head.weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()

    assert tied(model) == tied(plain) == (family == "paligemma")
    # the weights are intact: the logits of a fresh load match
    ids = torch.tensor([[1, 2, 3, 4]])
    again = load_backbone(ModelSection(path=str(tiny_model_dir(family))), QuantizationSection(), CPU, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model.language_model(input_ids=ids).last_hidden_state,
                                   again.model.language_model(input_ids=ids).last_hidden_state)


def test_freed_tensors_go_back_to_the_system_on_cpu():
    """With glibc's default, once a large block has been freed, 2 MiB tensors come from its heap and
    stay resident after they are freed (here: while a later tensor pins the top of the heap); with
    return_freed_memory_promptly they are mmapped and returned."""
    import sys

    from edgetune.load import return_freed_memory_promptly
    from edgetune.progress import current_anon_bytes

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert return_freed_memory_promptly()
    torch.empty(16 * 2**20, dtype=torch.uint8).fill_(1)  # freed at once: would raise the dynamic threshold
    before = current_anon_bytes()
    chunks = [torch.empty(2 * 2**20, dtype=torch.uint8).fill_(1) for _ in range(64)]
    pin = torch.empty(2 * 2**20, dtype=torch.uint8).fill_(1)
    assert current_anon_bytes() - before > 100 * 2**20
    del chunks
    assert current_anon_bytes() - before < 32 * 2**20
    del pin
