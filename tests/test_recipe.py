import pytest
import yaml

from edgetune.errors import UserError
from edgetune.methods import get_method
from edgetune.recipe import load_recipe


def test_valid_recipe_resolves_relative_paths(tmp_path, task_dir, tiny_llava_dir):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "model": {"path": str(tiny_llava_dir)},
        "data": {"train": str(task_dir / "data/train.json")},
    }))
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.data.train.is_absolute() and recipe.data.train.is_file()
    assert recipe.quantization.mode == "nf4" and recipe.train.gradient_checkpointing


def test_unknown_key_names_its_path_and_the_known_keys(write_recipe):
    path = write_recipe(method={"rnak": 4})
    with pytest.raises(UserError, match=r"unknown key 'method\.rnak'.*rank"):
        load_recipe(path)


def test_wrong_type_names_the_key(write_recipe):
    with pytest.raises(UserError, match=r"train\.max_steps"):
        load_recipe(write_recipe(train={"max_steps": "ten"}))


def test_missing_data_file_names_key_and_file(write_recipe, tmp_path):
    with pytest.raises(UserError, match=r"data\.train: file .*nope\.json does not exist"):
        load_recipe(write_recipe(data={"train": "nope.json"}))


def test_missing_model_dir_is_an_error(write_recipe):
    with pytest.raises(UserError, match=r"model\.path"):
        load_recipe(write_recipe(model={"path": "./no/such/model"}))


def test_set_overrides_any_key_and_rejects_unknown_ones(write_recipe):
    path = write_recipe()
    recipe = load_recipe(path, ["train.lr=0.01", "method.placement=attn", "quantization.mode=none"])
    assert recipe.train.lr == 0.01 and recipe.method.placement == "attn" and recipe.quantization.mode == "none"
    with pytest.raises(UserError, match=r"train\.lrr"):
        load_recipe(path, ["train.lrr=0.01"])
    with pytest.raises(UserError, match="key.path=value"):
        load_recipe(path, ["train.lr"])


def test_not_yaml_and_not_a_mapping(tmp_path):
    (tmp_path / "a.yaml").write_text("model: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="YAML mapping"):
        load_recipe(tmp_path / "b.yaml")


def test_unknown_method_lists_the_known_ones(write_recipe):
    recipe = load_recipe(write_recipe(method={"name": "dora"}))
    with pytest.raises(UserError, match=r"unknown method 'dora'; known: adalink, adapter, ia3, llama_adapter, lora, prefix$"):
        get_method(recipe.method)
