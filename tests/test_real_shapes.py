"""benchmarks/real_shapes.py: the published configs give the published parameter counts, and the
streaming writer produces what save_pretrained would (keys, shards, index, loadable, same init).
The real sizes are only instantiated on the meta device; what is written is shrunk."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("real_shapes", ROOT / "benchmarks/real_shapes.py")
real_shapes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real_shapes)

# Small sizes for the written models; each family keeps its real architecture flags.
SHRINK = {
    "idefics3": {"text_config": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "head_dim": 16},
                 "vision_config": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2}},
    "qwen2_vl": {"text_config": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
                 "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2}},
    "paligemma": {"hidden_size": 64, "projection_dim": 64,
                  "text_config": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "num_key_value_heads": 1, "head_dim": 16},
                  "vision_config": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                                    "projection_dim": 64}},
    "llava": {"text_config": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "num_key_value_heads": 4, "head_dim": 16},
              "vision_config": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2}},
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from edgetune.families import FAMILIES

    built = {}

    def tiny(family):
        if family not in built:
            built[family] = tmp_path_factory.mktemp(f"tiny-{family}")
            FAMILIES[family].build_tiny(built[family])
        return built[family]

    return tiny


@pytest.mark.parametrize("name", real_shapes.shape_names())
def test_published_configs_give_the_published_parameter_count(name, tiny_dirs):
    from edgetune.families import FAMILIES

    shape = real_shapes.load_spec(name)
    config = real_shapes.real_config(shape, tiny_dirs(shape["family"]))
    model = real_shapes.meta_model(FAMILIES[shape["family"]], config)
    assert real_shapes.count_parameters(model) == pytest.approx(shape["published_parameters"], rel=0.01)
    assert config.get_text_config().hidden_size == shape["config"]["text_config"]["hidden_size"]


def shrunk(name):
    shape = copy.deepcopy(real_shapes.load_spec(name))
    shape["config"] = real_shapes.deep_merge(shape["config"], SHRINK[shape["family"]])
    return shape


# untied head / tied head and keys renamed on save / tied, Gemma's norms / CLIP's own initialization
@pytest.mark.parametrize("name", ["smolvlm-256m", "qwen2-vl-2b", "paligemma-3b-224", "llava-1.5-7b"])
def test_streamed_weights_are_what_save_pretrained_writes(name, tmp_path):
    from safetensors import safe_open

    from edgetune.families import FAMILIES

    shape = shrunk(name)
    family = FAMILIES[shape["family"]]
    summary = real_shapes.build_from_spec(shape, tmp_path / "built", max_shard_bytes=200_000)
    assert len(summary["files"]) > 1  # sharded, with an index
    index = json.loads((tmp_path / "built/model.safetensors.index.json").read_text())

    loaded, info = family.model_class().from_pretrained(tmp_path / "built", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.manual_seed(0)
    reference = family.model_class()(loaded.config)  # transformers' own construction and init
    reference.save_pretrained(tmp_path / "reference", max_shard_size="200KB")
    reference_keys = json.loads((tmp_path / "reference/model.safetensors.index.json").read_text())["weight_map"]
    assert set(index["weight_map"]) == set(reference_keys)
    for file in summary["files"]:
        with safe_open(str(tmp_path / "built" / file), "pt") as shard:
            assert shard.metadata() == {"format": "pt"}

    # Same initialization scheme: every tensor has the reference's spread (norms at 1, biases at 0).
    expected = reference.state_dict()
    for key, tensor in loaded.state_dict().items():
        if tensor.numel() > 64:
            assert tensor.float().std().item() == pytest.approx(expected[key].float().std().item(), rel=0.25, abs=1e-6), key
        assert tensor.float().mean().item() == pytest.approx(expected[key].float().mean().item(), abs=0.05), key
    assert family.load_processor(str(tmp_path / "built")) is not None


def test_processor_gets_the_checkpoint_settings(tmp_path):
    from edgetune.families import FAMILIES

    shape = shrunk("qwen2-vl-2b")
    real_shapes.build_from_spec(shape, tmp_path)
    image_processor = FAMILIES["qwen2_vl"].load_processor(str(tmp_path)).image_processor
    assert (image_processor.min_pixels, image_processor.max_pixels, image_processor.patch_size) == (3136, 12845056, 14)


def test_config_only_writes_what_plan_reads_and_no_weights(tmp_path):
    """--config-only: the real config, tokenizer and processor files, no weights; the saved config,
    read back and built on the meta device (as edgetune plan does), counts the published parameters."""
    from transformers import AutoConfig

    from edgetune.families import FAMILIES

    summary = real_shapes.build("qwen2-vl-2b", tmp_path, config_only=True)
    assert summary["files"] == [] and not list(tmp_path.glob("*.safetensors"))
    config = AutoConfig.from_pretrained(tmp_path)
    count = real_shapes.count_parameters(real_shapes.meta_model(FAMILIES["qwen2_vl"], config))
    assert count == summary["parameters"] and abs(count / summary["published_parameters"] - 1) < 0.01
    assert FAMILIES["qwen2_vl"].load_processor(str(tmp_path)).image_processor.max_pixels == 12845056
