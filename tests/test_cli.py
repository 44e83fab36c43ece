"""The CLI's contract for bad input: one line naming the file or key, exit code 2, no traceback
unless --debug, and no half-written output directory."""

import json

import pytest
from typer.testing import CliRunner

from edgetune.cli import app
from edgetune.errors import UserError

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("command", ["quickstart", "train", "merge", "export", "infer", "eval", "sweep", "tiny-model"])
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_wrong_recipe_key(write_recipe, tmp_path):
    result = run("train", write_recipe(train={"max_stepz": 3}), "--out", tmp_path / "run")
    assert_user_error(result, "recipe.yaml", "train.max_stepz")
    assert not (tmp_path / "run").exists()


def test_wrong_type_via_set(write_recipe, tmp_path):
    result = run("train", write_recipe(), "--set", "train.lr=fast", "--out", tmp_path / "run")
    assert_user_error(result, "train.lr")
    assert not (tmp_path / "run").exists()


def test_data_file_that_is_not_a_list(write_recipe, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"id": 1}))
    result = run("train", write_recipe(data={"train": str(tmp_path / "bad.json")}), "--out", tmp_path / "run")
    assert_user_error(result, "bad.json", "list")
    assert not (tmp_path / "run").exists()


def test_image_placeholder_count_mismatch(write_recipe, task_dir, tmp_path):
    entries = json.loads((task_dir / "data/train.json").read_text())[:2]
    entries[1]["conversations"][0]["value"] = "What color is the shape?"  # placeholder dropped
    (task_dir / "data/mismatch.json").write_text(json.dumps(entries))
    result = run("train", write_recipe(data={"train": str(task_dir / "data/mismatch.json")}), "--out", tmp_path / "run")
    assert_user_error(result, "mismatch.json", "entry 1", "<image>")


def test_unsupported_model(write_recipe, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=64)).save_pretrained(tmp_path / "llama")
    result = run("train", write_recipe(model={"path": str(tmp_path / "llama")}), "--out", tmp_path / "run")
    assert_user_error(result, "model.path", "llama", "supported families: ", "llava")
    assert not (tmp_path / "run").exists()


def test_missing_model_path(write_recipe, tmp_path):
    assert_user_error(run("train", write_recipe(model={"path": "./nowhere"}), "--out", tmp_path / "run"), "model.path")


def test_not_a_run_directory(tmp_path):
    assert_user_error(run("merge", tmp_path), str(tmp_path), "recipe.yaml")


def test_unknown_tiny_model_family(tmp_path):
    assert_user_error(run("tiny-model", "gpt2", "--out", tmp_path / "m"), "gpt2", "llava")
    assert not (tmp_path / "m").exists()


def test_debug_shows_the_traceback_for_that_invocation_only(write_recipe):
    bad = str(write_recipe(train={"max_stepz": 3}))
    assert isinstance(runner.invoke(app, ["--debug", "train", bad]).exception, UserError)
    assert_user_error(runner.invoke(app, ["train", bad]), "train.max_stepz")


@pytest.mark.parametrize(
    "method, family_attr, value, needle",
    [("adalink", "connector_output", None, "does not end in a linear layer"),
     ("llama_adapter", "rope", "mrope", "mrope rotary positions")],
)
def test_a_method_the_family_cannot_take_is_refused_before_loading(write_recipe, tmp_path, monkeypatch,
                                                                   method, family_attr, value, needle):
    """A family without what the method needs (here: the LLaVA family with that part taken away)
    is refused before the model is even loaded, not after training."""
    from edgetune import train as train_module
    from edgetune.families import FAMILIES

    monkeypatch.setattr(FAMILIES["llava"], family_attr, value)
    monkeypatch.setattr(train_module, "load_backbone", lambda *a, **k: pytest.fail("the model was loaded"))
    result = run("train", write_recipe(method={"name": method}), "--out", tmp_path / "run")
    assert_user_error(result, f"method '{method}'", "'llava'", needle, "choose another method")
    assert not (tmp_path / "run").exists()


def test_a_method_option_that_does_not_apply_names_the_key(write_recipe, tmp_path):
    result = run("train", write_recipe(method={"name": "adalink", "placement": "mlp"}), "--out", tmp_path / "run")
    assert_user_error(result, "method.placement", "does not apply to method 'adalink'", "rank")
    assert not (tmp_path / "run").exists()


def test_method_layers_out_of_range_names_the_key(write_recipe, tmp_path):
    result = run("train", write_recipe(method={"name": "adapter", "layers": [0, 7]}), "--out", tmp_path / "run")
    assert_user_error(result, "method.layers", "0..1")
    assert not (tmp_path / "run").exists()


def test_processor_setting_the_family_lacks_is_named(write_recipe, tmp_path):
    """max_pixels is Qwen2-VL's knob; LLaVA has none, and says so before the model loads."""
    result = run("train", write_recipe(model={"processor": {"max_pixels": 401408}}), "--out", tmp_path / "run")
    assert_user_error(result, "model.processor.max_pixels", "'llava' family has no such setting", "none")
    assert not (tmp_path / "run").exists()
