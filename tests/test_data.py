import json

import pytest

from edgetune.data import collate, encode_sample, load_samples
from edgetune.errors import UserError
from edgetune.load import load_processor


def write(tmp_path, entries, name="d.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "a.png")
    return "a.png"


def entry(image, *turns):
    return {"id": "x", "image": image, "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_loss_only_on_assistant_tokens_multi_turn(tmp_path, image, tiny_llava_dir):
    path = write(tmp_path, [entry(image, ("human", "<image>\nWhat color is the shape?"), ("gpt", "red"),
                                  ("human", "What shape is this?"), ("gpt", "square"))])
    processor = load_processor(str(tiny_llava_dir))
    encoded = encode_sample(processor, load_samples(path)[0], 256)
    tok = processor.tokenizer
    assert tok.decode(encoded["input_ids"][encoded["labels"] != -100]) == " red</s> square</s>"
    # The prompt the model sees at inference is a prefix of the training sequence, token for token.
    prompt = processor(text=[processor.apply_chat_template(load_samples(path)[0].messages(1), add_generation_prompt=True)],
                       images=[__import__("PIL.Image").Image.open(tmp_path / image)], return_tensors="pt")["input_ids"][0]
    assert encoded["input_ids"][: len(prompt)].tolist() == prompt.tolist()
    assert int((encoded["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == 16
    batch = collate([encoded, encoded], tok.pad_token_id)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("entries, message", [
    ({"not": "a list"}, "non-empty JSON list"),
    ([{"id": "a", "conversations": []}], r"entry 0 \(id a\): no 'image'"),
    ([entry("missing.png", ("human", "<image>\nq"), ("gpt", "a"))], "image .*missing.png does not exist"),
    ([entry("a.png", ("human", "q"), ("gpt", "a"))], r"0 '<image>' placeholder\(s\) .* but 1 image"),
    ([entry("a.png", ("human", "<image>\nq"), ("human", "again"))], "expected turns to alternate"),
])
def test_bad_data_is_one_error_naming_file_and_entry(tmp_path, image, entries, message):
    path = write(tmp_path, entries)
    with pytest.raises(UserError, match=message) as err:
        load_samples(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    path = write(tmp_path, [entry("broken.png", ("human", "<image>\nq"), ("gpt", "a"))])
    with pytest.raises(UserError, match=r"broken\.png cannot be read"):
        load_samples(path)
