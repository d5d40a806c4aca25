"""A1111-style `<lora:NAME:WEIGHT>` prompt tags: parsing, bad tags, merging with an explicit stack, and a Studio
render that equals the same stack given explicitly, with the parsed tags in the provenance. The CLI, REST and
studio surfaces are tested in test_cli.py, test_api_renders.py and test_ui.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from app.settings import Settings
from app.studio import Studio
from composer.errors import StudioError
from composer.formats import write_kohya
from composer.prompt_tags import PromptTag, parse_prompt_tags
from composer.render import LoraWeight, RenderRequest
from db.errors import AdapterNotFoundError
from tests.helpers import random_lora


@pytest.mark.parametrize(
    "prompt, text, tags",
    [
        ("a red circle", "a red circle", []),
        ("a red circle <lora:ink:0.8>", "a red circle", [("ink", 0.8)]),
        ("<lora:ink> a red circle", "a red circle", [("ink", 1.0)]),  # A1111: no weight means 1
        (
            "a <LoRA:ink:-0.5>red  circle, <lora: pastel : 1.25 >",
            "a red circle,",
            [("ink", -0.5), ("pastel", 1.25)],
        ),
        ("a photo <lora:my style v2:.7>", "a photo", [("my style v2", 0.7)]),
        ("<lora:ink:1e-1>", "", [("ink", 0.1)]),
        ("an <embedding> and <hypernet:x:1> stay", "an <embedding> and <hypernet:x:1> stay", []),
    ],
)
def test_tags_are_parsed_and_stripped(prompt, text, tags):
    parsed = parse_prompt_tags(prompt)
    assert parsed.text == text
    assert [(t.name, t.weight) for t in parsed.tags] == tags


def test_a_tag_keeps_its_text():
    assert parse_prompt_tags("x <lora:ink:0.8>").tags == (PromptTag("ink", 0.8, "<lora:ink:0.8>"),)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a <lora:ink:strong>", "prompt tag '<lora:ink:strong>': weight 'strong' is not a number"),
        ("a <lora:ink:>", "prompt tag '<lora:ink:>': weight '' is not a number"),  # weight missing after ':'
        ("a <lora::0.5>", "prompt tag '<lora::0.5>' names no LoRA"),
        ("a <lora:>", "prompt tag '<lora:>' names no LoRA"),
        ("a <lora:ink:0.5:0.2>", "'<lora:ink:0.5:0.2>' has 2 weights"),
        ("a <lora:ink:nan>", "weight must be finite"),
        ("a <lora:ink:0.5", "prompt tag '<lora:ink:0.5' is not closed"),
        ("a <lora:ink:<lora:pastel:1>>", "prompt tags cannot nest: '<lora:ink:<lora:pastel:1>'"),
        ("<lora:ink:0.5> and <lora:ink:0.9>", "'<lora:ink:0.5>' and '<lora:ink:0.9>' name the same LoRA"),
    ],
)
def test_bad_tags_are_refused_naming_the_tag(prompt, message):
    with pytest.raises(StudioError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_prompt_tags(prompt)
    with pytest.raises(StudioError):  # a request refuses it when it is made (CLI, REST, studio alike)
        RenderRequest(prompt=prompt)


def test_tags_join_the_explicit_stack_and_the_explicit_entry_wins():
    request = RenderRequest(
        prompt="a circle <lora:pastel:0.3> <lora:ink:0.9>", loras=(LoraWeight("ink", 0.5),)
    )
    assert request.prompt == "a circle"
    assert request.loras == (LoraWeight("ink", 0.5), LoraWeight("pastel", 0.3))  # explicit first, its weight
    assert request.prompt_tags == (LoraWeight("pastel", 0.3), LoraWeight("ink", 0.9))  # as parsed
    request.validate()


def test_a_request_of_tags_only_or_tags_in_the_negative_prompt_is_refused():
    with pytest.raises(StudioError, match="prompt is empty once its LoRA tags are taken out"):
        RenderRequest(prompt="<lora:ink:1>").validate()
    with pytest.raises(StudioError, match="from the prompt only, not the negative prompt"):
        RenderRequest(prompt="x", negative_prompt="blurry <lora:ink:1>").validate()


def test_json_requests_read_tags_the_same_way():
    request = RenderRequest.from_json({"prompt": "x <lora:ink:0.5>", "loras": [{"name": "pastel"}]})
    assert request.loras == (LoraWeight("pastel"), LoraWeight("ink", 0.5))
    assert "prompt_tags" not in request.to_json()  # not a wire field: the effective stack is in "loras"
    assert RenderRequest.from_json(request.to_json()).loras == request.loras


@pytest.fixture
def studio(tmp_path, tiny_sdxl_factory):
    studio = Studio.open(Settings(data_dir=tmp_path / "data", backbone="sdxl", model="tiny", bundled=False))
    backbone, make = tiny_sdxl_factory
    pipe = make()
    for i, name in enumerate(["inkwell", "pastel"]):
        path = tmp_path / f"{name}.safetensors"
        write_kohya(random_lora(pipe, backbone, seed=i, rank=4, std=0.2), path)
        studio.library.import_file(path)
    return studio


def test_a_tagged_render_equals_the_explicit_stack_and_records_the_tags(studio, tmp_path):
    small = dict(steps=2, seed=5, height=32, width=32)
    tagged = studio.render_image(
        prompt="a red circle <lora:pastel:0.6>", loras=[("inkwell", 0.8)], out=tmp_path / "t.png", **small
    )
    explicit = studio.render_image(
        prompt="a red circle", loras=[("inkwell", 0.8), ("pastel", 0.6)], out=tmp_path / "e.png", **small
    )
    plain = studio.render_image(prompt="a red circle", loras=[("inkwell", 0.8)], **small)
    np.testing.assert_array_equal(np.asarray(tagged.images[0]), np.asarray(explicit.images[0]))
    assert not np.array_equal(np.asarray(tagged.images[0]), np.asarray(plain.images[0]))
    meta = json.loads(Image.open(tmp_path / "t.png").text["lora_studio"])
    assert meta["prompt"] == "a red circle"
    assert meta["prompt_tags"] == [{"name": "pastel", "weight": 0.6}]
    assert [(x["name"], x["weight"]) for x in meta["loras"]] == [("inkwell", 0.8), ("pastel", 0.6)]
    assert json.loads(Image.open(tmp_path / "e.png").text["lora_studio"])["prompt_tags"] == []
    with studio.sessions() as session:
        from db.repository import RenderRepository

        record = RenderRepository(session).get(tagged.render_id)
        assert record.prompt == "a red circle" and record.params["prompt_tags"] == meta["prompt_tags"]


def test_an_unknown_tag_is_refused_with_close_names_and_nothing_is_recorded(studio):
    with pytest.raises(
        AdapterNotFoundError,
        match=r"prompt tag <lora:inkwel:0.5>: no adapter named 'inkwel'; "
        r"did you mean 'inkwell'",
    ) as caught:
        studio.render_image(prompt="a circle <lora:inkwel:0.5>", steps=1)
    assert caught.value.suggestions == ["inkwell"]
    with pytest.raises(AdapterNotFoundError, match=r"requests\[0\]: prompt tag <lora:pastl:1>: .*'pastel'"):
        studio.check_requests([{"prompt": "a circle <lora:pastl>"}], "sdxl", None)
    with studio.sessions() as session:
        from db.models import Render

        assert session.query(Render).count() == 0
