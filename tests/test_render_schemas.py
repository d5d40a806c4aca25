"""The REST render request is a union of one variant per registered composition method, generated from the
methods' parameters dataclasses when the app is built: the spec documents every method's knobs (types,
defaults, help), a knob of the wrong type is a 422 naming it, and errors keep the request's own locations."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

import pytest
from fastapi.testclient import TestClient

from app.api import create_app
from app.api.render_schemas import RenderRequestIn, batch_schema
from app.jobs import make_executor
from app.settings import Settings
from app.studio import Studio
from composer.errors import StudioError
from composer.masks import RegionMasks
from composer.methods import METHODS
from composer.render import RenderRequest

API = "/api/v1"


@dataclass(frozen=True)
class DialParams:
    """A made-up method with one knob of every plain type."""

    mode: Literal["soft", "hard"] = field(default="soft", metadata={"help": "how the dial turns"})
    strength: float = field(default=0.5, metadata={"help": "how far"})
    steps: int = 3
    invert: bool = False
    label: str = ""


class MethodsOnly:
    """What the spec needs of a Studio: its composition methods."""

    def __init__(self, methods: dict[str, type]) -> None:
        self.methods = methods

    def composition_methods(self) -> dict[str, type]:
        return dict(self.methods)


def spec_of(methods: dict[str, type]) -> dict:
    return TestClient(create_app(MethodsOnly(methods))).get(f"{API}/openapi.json").json()  # type: ignore[arg-type]


def variants(spec: dict) -> dict[str, dict]:
    """method name -> its request variant's schema, from the spec's RenderRequestIn union."""
    schemas = spec["components"]["schemas"]
    batch = schemas["RenderBatch"]["properties"]["requests"]["items"]["$ref"]
    assert batch == "#/components/schemas/RenderRequestIn"
    out = {}
    for choice in schemas["RenderRequestIn"]["oneOf"]:
        variant = schemas[choice["$ref"].rsplit("/", 1)[1]]
        out[variant["properties"]["method"]["const"]] = variant
    return out


def test_the_spec_documents_every_registered_method_and_its_knobs():
    spec = spec_of(METHODS)
    schemas = spec["components"]["schemas"]
    found = variants(spec)
    assert list(found) == list(METHODS)
    for method, params in METHODS.items():
        variant = found[method]
        fields = [f.name for f in dataclasses.fields(RenderRequest) if f.init]
        assert list(variant["properties"]) == [*fields, "auto_loras"]  # expanded before a job is stored
        assert ("method" in variant["required"]) == (method != "merge")  # only merge may leave it out
        knobs = schemas[variant["properties"]["method_params"]["$ref"].rsplit("/", 1)[1]]
        assert knobs["additionalProperties"] is False
        hints = typing.get_type_hints(params)
        assert list(knobs.get("properties", {})) == [f.name for f in dataclasses.fields(params)]
        for f in dataclasses.fields(params):
            documented = knobs["properties"][f.name]
            assert documented["description"].startswith(f.metadata["help"]), (method, f.name)
            if hints[f.name] is RegionMasks:
                assert documented["type"] == "object" and documented["additionalProperties"] == {
                    "type": "string"
                }
                assert "data URL or base64" in documented["description"] and documented["default"] == {}
            else:
                assert documented["default"] == f.default, (method, f.name)
    clora = schemas["CLoRAParams"]["properties"]
    assert clora["threshold"]["type"] == "number" and schemas["RegionalParams"]["properties"]["feather"][
        "type"
    ] == ("integer")


def test_a_new_method_gets_its_variant_from_its_dataclass_alone():
    spec = spec_of({**METHODS, "dial": DialParams})
    assert list(variants(spec)) == [*METHODS, "dial"]
    dial = spec["components"]["schemas"]["DialParams"]
    assert dial["description"] == DialParams.__doc__
    props = dial["properties"]
    assert props["mode"] == {
        "type": "string",
        "enum": ["soft", "hard"],
        "default": "soft",
        "description": "how the dial turns",
        "title": "Mode",
    }
    assert [props[k]["type"] for k in ("strength", "steps", "invert", "label")] == [
        "number",
        "integer",
        "boolean",
        "string",
    ]
    assert props["strength"]["description"] == "how far" and "description" not in props["steps"]


def test_a_knob_type_without_a_json_form_is_refused_naming_it():
    @dataclass(frozen=True)
    class ListParams:
        sizes: list[int] = field(default_factory=list)

    with pytest.raises(StudioError, match="lists.sizes: knob type"):
        batch_schema({"lists": ListParams})


def test_validation_picks_the_variant_and_keeps_locations():
    batch = batch_schema({**METHODS, "dial": DialParams})

    def errors(request: dict) -> list[tuple]:
        try:
            batch.model_validate({"requests": [request]})
        except Exception as exc:  # pydantic.ValidationError
            return [(e["loc"], e["type"]) for e in exc.errors()]  # type: ignore[attr-defined]
        return []

    assert errors({"prompt": "x", "height": 30}) == [(("requests", 0, "height"), "multiple_of")]
    assert errors({"prompt": "x", "method": "regional", "method_params": {"feather": "4"}}) == [
        (("requests", 0, "method_params", "feather"), "int_type")  # strict: "4" is not 4
    ]
    assert errors({"prompt": "x", "method": "dial", "method_params": {"mode": "loud"}}) == [
        (("requests", 0, "method_params", "mode"), "literal_error")
    ]
    assert errors({"prompt": "x", "method": "dial", "method_params": {"invert": 1}}) == [
        (("requests", 0, "method_params", "invert"), "bool_type")
    ]
    assert errors({"prompt": "x", "method": 5}) == [(("requests", 0, "method"), "string_type")]
    dumped = batch.model_validate(
        {"requests": [{"prompt": "x"}, {"prompt": "y", "method": "dial", "method_params": {"steps": 9}}]}
    ).model_dump(mode="json")["requests"]
    assert dumped[0] == {**RenderRequest("x").to_json(), "auto_loras": 0}
    assert RenderRequestIn(prompt="x").model_dump(exclude={"auto_loras"}) == RenderRequest("x").to_json()
    assert dumped[1]["method_params"] == {
        "mode": "soft",
        "strength": 0.5,
        "steps": 9,
        "invert": False,
        "label": "",
    }
    # an unknown method or knob passes to the Studio, which refuses it naming its choices (400)
    unknown = batch.model_validate({"requests": [{"prompt": "x", "method": "blend"}]}).model_dump()
    assert unknown["requests"][0]["method"] == "blend"


def test_a_bad_knob_type_is_422_naming_it(tmp_path):
    studio = Studio.open(Settings(data_dir=tmp_path / "data", bundled=False))
    _, secret = studio.accounts.create_api_key("ci")
    client = TestClient(
        create_app(studio, make_executor(studio)), headers={"X-API-Key": secret}
    )  # not started
    for params, knob in [({"feather": "wide"}, "feather"), ({"regions": {"a": 1}}, "regions")]:
        request = {"prompt": "x", "method": "regional", "method_params": params}
        r = client.post(f"{API}/renders", json={"requests": [request]})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["type"] == "validation_error" and knob in error["message"]
        assert error["details"][0]["loc"][:5] == ["body", "requests", 0, "method_params", knob]
    r = client.post(f"{API}/renders", json={"requests": [{"prompt": "x", "method": "regional"}]})
    assert r.status_code == 202, r.text  # every knob has a default
    r = client.post(f"{API}/renders", json={"requests": [{"prompt": "x", "method": "clora"}]})
    assert r.status_code == 400 and "clora composes LoRAs" in r.text  # well-typed: the Studio's own checks
