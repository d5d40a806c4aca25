"""Batching in render jobs: consecutive compatible single-image requests of a job render in one pipeline call
(up to `max_batch`), each image as `Studio.render` draws that request alone; incompatible requests, and
requests of several images, stay in calls of their own; each request is recorded in its own transaction."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from PIL import Image

from app.jobs import make_executor
from app.jobs.runner import batches
from app.settings import Settings
from app.studio import Studio
from composer.formats import write_kohya
from composer.render import LoraWeight, RenderRequest
from tests.helpers import random_lora
from tests.test_jobs import SMALL, pixels, renders, wait_for

INK = [{"name": "ink", "weight": 0.8}]


def open_studio(tmp_path, tiny_sdxl_factory, **settings) -> Studio:
    studio = Studio.open(
        Settings(
            data_dir=tmp_path / "data",
            bundled=False,
            backbone="sdxl",
            model="tiny",
            job_heartbeat_s=0.1,
            **settings,
        )
    )
    backbone, make = tiny_sdxl_factory
    write_kohya(random_lora(make(), backbone, seed=3, rank=4, std=0.2), tmp_path / "ink.safetensors")
    studio.library.import_file(tmp_path / "ink.safetensors")
    return studio


def count_calls(studio: Studio, monkeypatch) -> list[dict]:
    """Every pipeline call from now on (any pipeline of the tiny model's class), as its keyword arguments."""
    cls = type(studio.pipeline("sdxl", "tiny").pipe)
    original = cls.__call__
    seen: list[dict] = []

    @functools.wraps(original)
    def counted(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counted)
    return seen


def run(studio: Studio, requests: list[dict]):
    executor = make_executor(studio)
    executor.start()
    try:
        job, _ = studio.submit_job(requests)
        job = wait_for(studio.sessions, job.id)
    finally:
        executor.stop()
    assert job.status == "done", job.error
    return job, sorted(job.results, key=lambda r: r["index"])


def as_request(data: dict) -> RenderRequest:
    loras = tuple(LoraWeight(**x) for x in data.get("loras", ()))
    return RenderRequest(**{**data, "loras": loras})


def test_four_compatible_requests_render_in_one_call_as_each_alone(tmp_path, tiny_sdxl_factory, monkeypatch):
    studio = open_studio(tmp_path, tiny_sdxl_factory)
    assert studio.settings.max_batch == 4
    calls = count_calls(studio, monkeypatch)
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    requests = [
        {"prompt": p, "seed": seed, "negative_prompt": "blurry", "loras": INK, **SMALL}
        for p, seed in zip(prompts, (7, 1, 99, 12345), strict=True)
    ]
    job, results = run(studio, requests)
    assert len(calls) == 1, "four compatible requests, one pipeline call"
    assert calls[0]["prompt"] == prompts and calls[0]["negative_prompt"] == ["blurry"] * 4
    assert len(calls[0]["generator"]) == 4
    assert (job.completed, job.total, job.progress) == (4, 4, 1.0)
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert len({r["render_id"] for r in results}) == 4, "one render record per request"

    calls.clear()
    alone = [studio.render(as_request(data)) for data in requests]
    assert len(calls) == 4
    batched = [pixels(studio.settings.root / r["images"][0]).astype(int) for r in results]
    for result, image, reference in zip(results, batched, alone, strict=True):
        assert len(result["images"]) == 1
        difference = np.abs(image - np.asarray(reference.images[0].convert("RGB")).astype(int))
        assert difference.max() <= 2, f"request {result['index']}: off by {difference.max()}/255"
        provenance = json.loads(Image.open(studio.settings.root / result["images"][0]).text["lora_studio"])
        assert provenance == result["provenance"] == reference.provenance
    for i in range(4):  # each request got its own prompt and its own seed's noise
        for j in range(i + 1, 4):
            assert np.abs(batched[i] - batched[j]).max() > 10
    assert renders(studio) == 4 + 4


def test_images_with_their_own_loras_render_in_one_call_as_each_alone(
    tmp_path, tiny_sdxl_factory, monkeypatch
):
    """A merge batch whose requests each have their own LoRA stack and weights: one pipeline call (per-sample
    scales in the denoiser and the text encoders), every image as that request alone."""
    studio = open_studio(tmp_path, tiny_sdxl_factory)
    backbone, make = tiny_sdxl_factory
    write_kohya(random_lora(make(), backbone, seed=4, rank=4, std=0.2), tmp_path / "ash.safetensors")
    write_kohya(
        random_lora(make(), backbone, seed=6, std=0.2, text_encoders=True), tmp_path / "quill.safetensors"
    )
    studio.library.import_file(tmp_path / "ash.safetensors")
    studio.library.import_file(tmp_path / "quill.safetensors")
    calls = count_calls(studio, monkeypatch)
    stacks = [[], INK, [{"name": "ash", "weight": 1.0}], [{"name": "ash", "weight": 0.5}, *INK]]
    requests = [
        {"prompt": p, "seed": i, "loras": stack, **SMALL}
        for i, (p, stack) in enumerate(
            zip(["a red circle", "a blue square", "a star", "a ring"], stacks, strict=True)
        )
    ]
    _, results = run(studio, requests)
    assert [c["prompt"] for c in calls] == [[r["prompt"] for r in requests]], "one call for four stacks"
    calls.clear()
    alone = [studio.render(as_request(data)) for data in requests]
    batched = [pixels(studio.settings.root / r["images"][0]).astype(int) for r in results]
    for result, image, reference in zip(results, batched, alone, strict=True):
        difference = np.abs(image - np.asarray(reference.images[0].convert("RGB")).astype(int))
        assert difference.max() <= 2, f"request {result['index']}: off by {difference.max()}/255"
        assert result["provenance"] == reference.provenance
    assert np.abs(batched[2] - batched[3]).max() > 10
    # quill adapts the text encoders too: each prompt is encoded under its own image's LoRAs, in the same call
    calls.clear()
    mixed = [{**requests[0], "loras": [{"name": "quill", "weight": 1.0}]}, requests[1], requests[2]]
    _, results = run(studio, mixed)
    assert [c["prompt"] for c in calls] == [[r["prompt"] for r in mixed]]
    for result, data in zip(results, mixed, strict=True):
        image = pixels(studio.settings.root / result["images"][0]).astype(int)
        reference = studio.render(as_request(data)).images[0].convert("RGB")
        assert np.abs(image - np.asarray(reference).astype(int)).max() <= 2


def test_incompatible_requests_are_not_merged(tmp_path, tiny_sdxl_factory, monkeypatch):
    studio = open_studio(tmp_path, tiny_sdxl_factory)
    calls = count_calls(studio, monkeypatch)
    requests = [
        {"prompt": "a", "seed": 1, **SMALL},
        {"prompt": "b", "seed": 2, **SMALL},  # joins the first
        {"prompt": "c", "seed": 3, **{**SMALL, "num_inference_steps": 3}},
        {"prompt": "d", "seed": 4, "loras": INK, **SMALL},
        {"prompt": "e", "seed": 5, "loras": [{"name": "ink", "weight": 0.5}], **SMALL},
        {"prompt": "f", "seed": 6, "num_images": 2, **SMALL},
        {"prompt": "g", "seed": 7, "num_images": 2, **SMALL},
    ]
    job, results = run(studio, requests)
    assert [c["prompt"] for c in calls] == [["a", "b"], "c", ["d", "e"], "f", "g"]  # d, e: LoRAs differ only
    assert [c["num_images_per_prompt"] for c in calls] == [1, 1, 1, 2, 2]
    assert (job.completed, job.total) == (9, 9)
    assert [len(r["images"]) for r in results] == [1, 1, 1, 1, 1, 2, 2]
    assert [r["provenance"]["prompt"] for r in results] == list("abcdefg")
    assert [r["provenance"]["seed"] for r in results] == [1, 2, 3, 4, 5, 6, 7]


def test_max_batch_one_renders_each_request_alone(tmp_path, tiny_sdxl_factory, monkeypatch):
    studio = open_studio(tmp_path, tiny_sdxl_factory, max_batch=1)
    calls = count_calls(studio, monkeypatch)
    requests = [{"prompt": p, "seed": s, **SMALL} for p, s in (("x", 1), ("y", 2), ("z", 3))]
    _, results = run(studio, requests)
    assert [c["prompt"] for c in calls] == ["x", "y", "z"]
    for result, data in zip(results, requests, strict=True):  # the very same call as Studio.render's
        np.testing.assert_array_equal(
            pixels(studio.settings.root / result["images"][0]),
            np.asarray(studio.render(as_request(data)).images[0].convert("RGB")),
        )


def test_groups_are_consecutive_compatible_and_capped():
    def req(prompt: str, **kw) -> RenderRequest:
        return RenderRequest(prompt, **{**SMALL, **kw})

    pending = [(i, req(f"p{i}", seed=i)) for i in range(6)]
    assert [[i for i, _ in g] for g in batches(pending, 4)] == [[0, 1, 2, 3], [4, 5]]
    assert [[i for i, _ in g] for g in batches(pending, 1)] == [[i] for i in range(6)]
    mixed = [
        (0, req("a")),
        (2, req("b")),  # index 1 was recorded before: the pending ones still group
        (3, req("c", negative_prompt="blurry")),
        (4, req("d", guidance_scale=3.0)),
        (5, req("e", height=40)),
        (6, req("f", width=40)),
        (7, req("g", loras=(LoraWeight("ink", 1.0),))),
        (8, req("h", loras=(LoraWeight("ink", 1.0), LoraWeight("ash", 0.5)))),
        (9, req("i", loras=(LoraWeight("ash", 0.5), LoraWeight("ink", 1.0)))),
        (10, req("j", num_images=2)),
        (11, req("k", num_images=2)),
        (12, req("l")),
        (13, req("m")),
    ]
    groups = [[i for i, _ in g] for g in batches(mixed, 4)]
    assert groups == [[0, 2], [3], [4], [5], [6], [7, 8, 9], [10], [11], [12, 13]]  # a merge mixes LoRAs
    clora = [
        (i, req(p, loras=(LoraWeight(n),), method="clora"))
        for i, (p, n) in enumerate((("x", "a"), ("y", "b")))
    ]
    assert [[i for i, _ in g] for g in batches(clora, 4)] == [[0], [1]]  # other methods need one stack a call


def test_each_request_of_a_batch_is_recorded_in_its_own_transaction(tmp_path, tiny_sdxl_factory):
    studio = open_studio(tmp_path, tiny_sdxl_factory)
    requests = [RenderRequest(p, seed=s, **SMALL) for p, s in (("one", 1), ("two", 2), ("three", 3))]
    recorded: list[int] = []

    def on_record(_session, position: int, result) -> None:
        if position == 1:
            raise RuntimeError("the worker dies while recording the second request")
        recorded.append(result.render_id)

    with pytest.raises(RuntimeError, match="second request"):
        studio.render_batch(requests, outs=[tmp_path / f"{i}.png" for i in range(3)], on_record=on_record)
    assert len(recorded) == 1 and renders(studio) == 1, "the first is recorded, the second rolled back"
    with pytest.raises(Exception, match="share LoRAs"):
        studio.render_batch([requests[0], RenderRequest("x", **{**SMALL, "num_inference_steps": 3})])
