import torch

from edgetune.families import FAMILIES


def test_llava_image_features_equal_transformers_own(tiny_llava_dir):
    """The family's traceable image_features is the model's get_image_features, batched."""
    family = FAMILIES["llava"]
    model = family.model_class().from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = family.image_features(model, pixels)
        theirs = torch.stack(list(model.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )))
    assert ours.shape == (3, 16, model.config.text_config.hidden_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_lora_target_regex_matches_llm_linears_only(tiny_llava_dir):
    import re

    family = FAMILIES["llava"]
    model = family.model_class().from_pretrained(tiny_llava_dir, dtype=torch.float32)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    both = [n for n in names if re.fullmatch(family.linear_regex("both"), n)]
    assert len(both) == 2 * 7 and all(n.startswith("model.language_model.layers.") for n in both)
    assert {n.split(".")[-1] for n in (x for x in names if re.fullmatch(family.linear_regex("mlp", [1]), x))} == {
        "gate_proj", "up_proj", "down_proj"}
    assert all(".layers.1." in n for n in names if re.fullmatch(family.linear_regex("attn", [1]), n))
