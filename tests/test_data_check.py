"""`edgetune data check` and edgetune.data_check: every data problem is one line naming the file, the
entry's index and id, and the fix (exit 2), found with the model's processor and no weights; a clean
file prints its statistics; training cuts at data.max_length exactly as the check counts."""

import json
import shutil

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from edgetune.cli import app
from edgetune.data import image_size, load_samples, open_image
from edgetune.data_check import inspect_data
from edgetune.errors import UserError
from edgetune.families import FAMILIES
from edgetune.recipe import load_recipe

runner = CliRunner()

# The tiny Qwen2-VL: patches of 8 px merged 2x2, so a 48x48 image is 6x6 patches = 9 image tokens.
QWEN_48_TOKENS = 9


def entry(id_, image="a.png", question="What color is the shape?", answer="red", first="human"):
    second = "gpt" if first == "human" else "human"
    return {"id": id_, "image": image, "conversations": [{"from": first, "value": f"<image>\n{question}"}, {"from": second, "value": answer}]}


def write_case(tmp_path, model_dir, entries, max_length=256, images=None, **model):
    """data.json, its images and recipe.yaml in tmp_path; returns (data path, recipe path)."""
    for name, size in {"a.png": (48, 48), **(images or {})}.items():
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / name)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(model_dir), **model}, "data": {"train": "data.json", "max_length": max_length}}))
    return data, recipe


def check(data, recipe, *extra):
    return runner.invoke(app, ["data", "check", str(data), "--recipe", str(recipe), *extra])


def error_lines(result):
    return [line for line in result.output.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def qwen_dir(tiny_model_dir):
    return tiny_model_dir("qwen2_vl")


PROBLEMS = {  # name -> (entry at index 1 with id "bad", extra images, max_length, what its line says)
    "aspect ratio": (entry("bad", image="wide.png"), {"wide.png": (600, 2)}, 256,
                     "image wide.png (600x2): the qwen2_vl image processor refuses it (absolute aspect ratio must be smaller than 200"),
    "vision token in a question": (entry("bad", question="What is <|vision_start|> here?"), {}, 256,
                                   "conversations[0] contains '<|vision_start|>', the model's own special token"),
    "image token in an answer": (entry("bad", answer="red <|image_pad|>"), {}, 256, "conversations[1] contains '<|image_pad|>'"),
    "empty answer": (entry("bad", answer="  "), {}, 256, "conversations[1] is an empty answer"),
    "first turn not the human's": (entry("bad", first="gpt"), {}, 256, "the first turn must be the human's question"),
    "answer cut entirely": (entry("bad", question="What color is the shape? " * 12), {}, 60,
                            "exceed data.max_length=60, which cuts its answer entirely; raise data.max_length to"),
}


@pytest.mark.parametrize("name", PROBLEMS)
def test_each_problem_is_one_line_naming_file_entry_and_id(name, qwen_dir, tmp_path):
    bad, images, max_length, says = PROBLEMS[name]
    data, recipe = write_case(tmp_path, qwen_dir, [entry("good"), bad], max_length, images)
    result = check(data, recipe)
    assert result.exit_code == 2, result.output
    assert error_lines(result) == [f"error: {data}: entry 1 (id bad): " + error_lines(result)[0].split("(id bad): ", 1)[1]]
    assert says in error_lines(result)[0], result.output
    assert "Traceback" not in result.output
    # training reads the same file through the same check: it stops at that line, before loading weights
    with pytest.raises(UserError, match="entry 1 \\(id bad\\)"):
        inspect_data(load_recipe(recipe)).raise_if_problems()


def test_repeated_ids_name_both_entries(qwen_dir, tmp_path):
    data, recipe = write_case(tmp_path, qwen_dir, [entry("x"), entry("y"), entry("x")])
    result = check(data, recipe)
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {data}: entry 2 (id x): entry 0 has the same id; give every entry its own id"]
    with pytest.raises(UserError, match="entry 2 \\(id x\\): entry 0 has the same id"):
        load_samples(data)


def test_every_problem_is_listed_and_training_names_the_first(qwen_dir, tmp_path):
    entries = [entry("good"), entry("e1", answer=""), entry("e2", question="<|im_start|>hi"), entry("e3", image="wide.png")]
    data, recipe = write_case(tmp_path, qwen_dir, entries, images={"wide.png": (2, 600)})
    result = check(data, recipe)
    assert [line.split(": ")[2] for line in error_lines(result)] == ["entry 1 (id e1)", "entry 2 (id e2)", "entry 3 (id e3)"]
    report = inspect_data(load_recipe(recipe))
    assert len(report.problems) == 3 and len(report.shapes) == 1
    with pytest.raises(UserError) as err:
        report.raise_if_problems()
    assert str(err.value).startswith(f"{data}: entry 1 (id e1): conversations[1] is an empty answer")
    assert str(err.value).endswith(f"(and 2 more; run `edgetune data check {data} --recipe RECIPE` for all)")


def test_a_clean_file_passes_with_its_statistics(qwen_dir, tmp_path):
    entries = [entry("a"), entry("b", image="wide.png", answer="a red square"), entry("c", question="What shape is this?")]
    data, recipe = write_case(tmp_path, qwen_dir, entries, images={"wide.png": (80, 40)})
    result = check(data, recipe)
    assert result.exit_code == 0, result.output
    assert not error_lines(result) and "warning:" not in result.output
    # the first entry's tokens, encoded the way training encodes it (its real image, no cut)
    family, processor = FAMILIES["qwen2_vl"], FAMILIES["qwen2_vl"].load_processor(str(qwen_dir))
    encoded = family.encode_sample(processor, load_samples(data)[0], 256)
    image_tokens = int((encoded["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert image_tokens == QWEN_48_TOKENS
    report = inspect_data(load_recipe(recipe))
    first = report.shapes[0]
    labels = encoded["labels"]
    assert processor.tokenizer.decode(labels[labels != -100]) == "red<|im_end|>\n"
    assert (first.tokens, first.image_tokens, first.answer_tokens) == (len(encoded["input_ids"]), QWEN_48_TOKENS, int((labels != -100).sum()))
    stats = report.statistics(data)
    assert stats["entries"] == 3 and stats["images"] == 3
    assert stats["image_size"] == ((48, 48), (48, 48), (80, 40))
    assert stats["image_tokens"] == (QWEN_48_TOKENS, QWEN_48_TOKENS, 10)  # 80x40 -> 80x32 (sides rounded to 16 px): 10x4 patches / 4
    assert stats["over_max_length"] == 0
    # the table shows the same numbers
    assert "│ entries" in result.output and "48x48 / 48x48 / 80x40" in result.output
    assert f"{stats['tokens'][0]} / {stats['tokens'][1]:g} / {stats['tokens'][2]}" in result.output
    assert "3 entries encoded, 0 problems, 0 warnings" in result.output


def test_answers_cut_partly_are_a_warning_and_training_cuts_the_same(qwen_dir, tmp_path):
    long_answer = "the shape is a red square on a plain background " * 3
    data, recipe = write_case(tmp_path, qwen_dir, [entry("a"), entry("long", answer=long_answer)], max_length=256)
    full = inspect_data(load_recipe(recipe)).shapes[1]
    max_length = full.tokens - 5  # five answer tokens past the cut
    result = check(data, recipe, "--set", f"data.max_length={max_length}")
    assert result.exit_code == 0, result.output
    assert f"warning: {data}: 1 entries (ids long) are longer than data.max_length={max_length}: training cuts 5 of their " \
           f"{full.answer_tokens} answer tokens; raise data.max_length to {full.tokens} to keep them whole" in result.output
    encoded = FAMILIES["qwen2_vl"].encode_sample(FAMILIES["qwen2_vl"].load_processor(str(qwen_dir)), load_samples(data)[1], max_length)
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == max_length
    assert int((encoded["labels"][1:] != -100).sum()) == full.answer_tokens - 5


def test_the_check_loads_no_weights(qwen_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(qwen_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    data, recipe = write_case(tmp_path, model, [entry("a")])
    result = check(data, recipe)
    assert result.exit_code == 0, result.output
    assert "1 entries encoded, 0 problems" in result.output


def test_eval_file_is_checked_too(qwen_dir, tmp_path):
    data, recipe = write_case(tmp_path, qwen_dir, [entry("a")])
    (tmp_path / "eval.json").write_text(json.dumps([entry("e", answer="")]))
    raw = yaml.safe_load(recipe.read_text())
    raw["data"]["eval"] = "eval.json"
    recipe.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["data", "check", "--recipe", str(recipe)])
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {tmp_path / 'eval.json'}: entry 0 (id e): conversations[1] is an empty answer; write the answer or drop the turn"]


def test_llava_refuses_what_its_center_crop_would_blow_up(tiny_model_dir, tmp_path):
    data, recipe = write_case(tmp_path, tiny_model_dir("llava"), [entry("good"), entry("bad", image="tall.png")],
                              images={"tall.png": (2, 600)})
    result = check(data, recipe)
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"error: {data}: entry 1 (id bad): image tall.png (2x600): aspect ratio 300:1 is above 200:1: the processor would resize it "
        "to 32x9,600 pixels and keep the middle 32 of them; crop or pad it to a less elongated shape"
    ]


def test_families_that_take_any_aspect_ratio(tiny_model_dir):
    """LLaVA-NeXT tiles and pads, PaliGemma squashes, Idefics3 resizes the longest edge: 2x600 is fine;
    only an image without pixels is refused."""
    for name in ("llava_next", "paligemma", "idefics3"):
        family = FAMILIES[name]
        processor = family.load_processor(str(tiny_model_dir(name)))
        assert family.image_problem(processor, 2, 600) is None, name
        assert "0x5 pixels" in family.image_problem(processor, 0, 5), name


def test_paligemma_multi_turn_entry_is_a_problem(tiny_model_dir, tmp_path):
    multi = entry("multi")
    multi["conversations"] += [{"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "square"}]
    data, recipe = write_case(tmp_path, tiny_model_dir("paligemma"), [entry("good"), multi])
    result = check(data, recipe)
    assert result.exit_code == 2
    assert error_lines(result)[0].startswith(f"error: {data}: entry 1 (id multi): PaliGemma answers one question per image")


def test_llava_image_token_beyond_the_placeholder(tiny_model_dir, tmp_path):
    """<image> in an answer: no placeholder there, and one of the model's special tokens."""
    data, recipe = write_case(tmp_path, tiny_model_dir("llava"), [entry("good"), entry("bad", answer="an <image> of red")])
    result = check(data, recipe)
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {data}: entry 1 (id bad): conversations[1] (an answer) contains '<image>'; images go in the first human turn"]


@pytest.mark.parametrize("orientation, expected", [(1, (60, 20)), (3, (60, 20)), (6, (20, 60)), (8, (20, 60))])
def test_image_size_applies_exif_orientation_from_the_header(tmp_path, orientation, expected):
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (60, 20), (10, 200, 10)).save(path, exif=exif)
    assert image_size(path) == expected == open_image(path).size
