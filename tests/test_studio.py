"""The Studio and its catalog: import, look-up, export, render with provenance; bad input writes nothing."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from PIL import Image

from app.settings import Settings
from app.studio import Studio
from composer.errors import (
    FamilyMismatchError,
    LoraFileError,
    PickleRefusedError,
    StudioError,
    UnknownKeysError,
)
from composer.formats import read_lora, save, write_diffusers, write_kohya
from composer.render import LoraWeight, RenderRequest
from db.errors import AdapterNotFoundError, DuplicateAdapterError
from tests.helpers import random_lora


@pytest.fixture
def studio(tmp_path):
    return Studio.open(Settings(data_dir=tmp_path / "data", backbone="sdxl", model="tiny"))


@pytest.fixture
def lora_files(tmp_path, tiny_sdxl_factory):
    backbone, make = tiny_sdxl_factory
    pipe = make()
    out = {}
    for i, name in enumerate(["inkwell", "pastel"]):
        lora = random_lora(pipe, backbone, seed=i, rank=4, alpha=4.0, std=0.2)
        out[name] = tmp_path / "in" / f"{name}.safetensors"
        out[name].parent.mkdir(exist_ok=True)
        write_kohya(lora, out[name], trigger_words=[f"{name}style"])
    return out


def catalog_state(studio):
    files = (
        sorted(p.name for p in studio.settings.lora_dir.glob("*"))
        if studio.settings.lora_dir.exists()
        else []
    )
    return [a.name for a in studio.library.list()], files


def test_import_list_show_export_round_trip(studio, lora_files, tmp_path):
    outcomes = studio.library.import_paths([lora_files["inkwell"].parent], tags=["test"])
    assert [o.status for o in outcomes] == ["imported", "imported"]
    info = studio.library.get("inkwell")
    assert info.family == "sdxl" and info.rank == 4 and info.source_format == "kohya"
    assert info.trigger_words == ["inkwellstyle"] and info.tags == ["test"]
    assert studio.library.get(info.autov2).name == "inkwell"  # by AutoV2 hash too
    assert [a.name for a in studio.library.list("inkwellstyle")] == ["inkwell"]
    # the same files again: nothing new, each reported as already catalogued
    again = studio.library.import_paths([lora_files["inkwell"].parent])
    assert [o.status for o in again] == ["duplicate", "duplicate"] and again[0].name == "inkwell"
    for fmt in ("kohya", "diffusers"):
        out = studio.library.export("inkwell", fmt, tmp_path / f"out-{fmt}.safetensors")
        exported, original = read_lora(out), read_lora(lora_files["inkwell"])
        assert exported.modules.keys() == original.modules.keys()
        for key, m in original.modules.items():
            e = exported.modules[key]
            torch.testing.assert_close(
                e.scale * e.tensors["up"] @ e.tensors["down"], m.scale * m.tensors["up"] @ m.tensors["down"]
            )
        assert exported.trigger_words == ["inkwellstyle"]


def test_render_two_loras_records_provenance(studio, lora_files, tmp_path):
    studio.library.import_paths(list(lora_files.values()))
    request = RenderRequest(
        prompt="a red circle",
        num_inference_steps=2,
        seed=7,
        loras=(LoraWeight("inkwell", 0.8), LoraWeight("pastel", 0.4)),
    )
    steps = []
    result = studio.render(request, out=tmp_path / "r.png", progress=lambda d, t: steps.append((d, t)))
    assert steps == [(1, 2), (2, 2)]
    base = studio.render(RenderRequest(prompt="a red circle", num_inference_steps=2, seed=7))
    a, b = (
        torch.tensor(list(im.getdata()), dtype=torch.float32) for im in (result.images[0], base.images[0])
    )
    assert (a - b).abs().max() > 0, "the LoRAs change the image"
    png = Image.open(result.paths[0])
    meta = json.loads(png.text["lora_studio"])
    assert [(x["name"], x["weight"]) for x in meta["loras"]] == [("inkwell", 0.8), ("pastel", 0.4)]
    assert meta["loras"][0]["sha256"] == studio.library.get("inkwell").sha256 and meta["seed"] == 7
    assert "<lora:inkwell:0.8>" in png.text["parameters"]
    # the same request again is the same image (LoRAs stay resident; nothing drifts)
    again = studio.render(request)
    assert list(again.images[0].getdata()) == list(result.images[0].getdata())
    with studio.sessions() as session:
        from db.repository import RenderRepository

        record = RenderRepository(session).get(result.render_id)
        assert record.loras[1]["name"] == "pastel" and record.status == "done"


def write_raw(path, tensors, metadata=None):
    save(path, tensors, metadata or {})
    return path


BAD_INPUTS = {
    "truncated": (LoraFileError, "truncated|beyond|short"),
    "corrupt": (LoraFileError, "header"),
    "pickle_ckpt": (PickleRefusedError, "pickle"),
    "pickle_renamed": (PickleRefusedError, "pickle"),
    "nan": (LoraFileError, "non-finite|NaN"),
    "sd15": (StudioError, "sd15"),
    "unknown_keys": (UnknownKeysError, "lora_unet_not_a_block"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_is_written(case, studio, lora_files, tmp_path):
    good = read_lora(lora_files["inkwell"])
    path = tmp_path / f"{case}.safetensors"
    if case == "truncated":
        data = lora_files["inkwell"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    elif case == "pickle_ckpt":
        path = tmp_path / "model.ckpt"
        path.write_bytes(pickle.dumps({"x": 1}))
    elif case == "pickle_renamed":
        path.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": [1.0]}))
    elif case == "nan":
        write_raw(
            path,
            {
                "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.tensor(
                    [[math.nan, 1.0]]
                ),
                "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(
                    2, 1
                ),
            },
        )
    elif case == "sd15":
        write_kohya(
            good,
            path,
            metadata={"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora"},
        )
    elif case == "unknown_keys":
        write_raw(
            path,
            {
                "lora_unet_not_a_block.lora_down.weight": torch.ones(2, 4),
                "lora_unet_not_a_block.lora_up.weight": torch.ones(4, 2),
            },
        )
    before = catalog_state(studio)
    error, pattern = BAD_INPUTS[case]
    with pytest.raises(error, match=pattern) as info:
        studio.library.import_file(path)
    assert path.name in str(info.value) or case in ("nan", "unknown_keys")
    assert catalog_state(studio) == before
    outcome = studio.library.import_paths([path])[0]
    assert outcome.status == "failed" and outcome.message


def test_duplicate_import_names_the_existing_entry(studio, lora_files):
    studio.library.import_file(lora_files["inkwell"])
    before = catalog_state(studio)
    with pytest.raises(DuplicateAdapterError, match="already in the catalog as 'inkwell'"):
        studio.library.import_file(lora_files["inkwell"], name="another")
    # only metadata edited: the tensor hash says it is the same LoRA
    edited = lora_files["inkwell"].with_name("edited.safetensors")
    write_kohya(read_lora(lora_files["inkwell"]), edited, title="renamed")
    with pytest.raises(DuplicateAdapterError, match="inkwell"):
        studio.library.import_file(edited)
    assert catalog_state(studio) == before


def test_unknown_lora_name_suggests_close_names(studio, lora_files):
    studio.library.import_file(lora_files["inkwell"])
    with pytest.raises(AdapterNotFoundError, match="inkwel.*inkwell"):
        studio.render(RenderRequest(prompt="x", num_inference_steps=1, loras=(LoraWeight("inkwel"),)))


def test_render_refuses_a_lora_of_another_family_and_records_nothing(
    studio, lora_files, tmp_path, tiny_flux_factory
):
    backbone, make = tiny_flux_factory
    flux_lora = random_lora(make(), backbone, seed=3, rank=2, alpha=2.0)
    flux_lora.modules = {k: m for k, m in flux_lora.modules.items() if m.component == "transformer"}
    write_diffusers(flux_lora, tmp_path / "fluxy.safetensors")
    studio.library.import_file(tmp_path / "fluxy.safetensors")
    with pytest.raises(FamilyMismatchError, match="fluxy.*flux.*sdxl"):
        studio.render(
            RenderRequest(prompt="x", num_inference_steps=1, loras=(LoraWeight("fluxy"),)), backbone="sdxl"
        )
    with studio.sessions() as session:
        from db.repository import RenderRepository

        assert RenderRepository(session).list() == []


def test_lora_whose_modules_the_model_lacks_is_named_at_render(studio, lora_files, tmp_path):
    lora = read_lora(lora_files["inkwell"])
    extra = dict(lora.modules)
    m = next(iter(extra.values()))
    from composer.formats.model import ModuleDelta

    ghost = ModuleDelta(
        "unet", "up_blocks.1.attentions.7.transformer_blocks.0.attn1.to_q", "lora", dict(m.tensors), m.alpha
    )
    extra[ghost.key] = ghost
    lora.modules = extra
    write_kohya(lora, tmp_path / "ghost.safetensors")
    studio.library.import_file(tmp_path / "ghost.safetensors")
    with pytest.raises(UnknownKeysError, match=r"up_blocks\.1\.attentions\.7"):
        studio.render(RenderRequest(prompt="x", num_inference_steps=1, loras=(LoraWeight("ghost"),)))
    # the failed LoRA left nothing resident: a plain render still equals a fresh studio's
    plain = studio.render(RenderRequest(prompt="x", num_inference_steps=1))
    fresh = Studio.open(Settings(data_dir=tmp_path / "fresh", backbone="sdxl", model="tiny"))
    assert list(plain.images[0].getdata()) == list(
        fresh.render(RenderRequest(prompt="x", num_inference_steps=1)).images[0].getdata()
    )


def test_bad_render_requests(studio):
    with pytest.raises(StudioError, match="prompt is empty"):
        studio.render(RenderRequest(prompt="  "))
    with pytest.raises(StudioError, match="multiples of 8"):
        studio.render(RenderRequest(prompt="x", height=30))
    with pytest.raises(StudioError, match="not a number"):
        LoraWeight.parse("inkwell:strong")
    assert LoraWeight.parse("a:b:0.5") == LoraWeight("a:b", 0.5)


def test_resident_loras_are_evicted_least_recently_used(tmp_path, lora_files):
    studio = Studio.open(
        Settings(data_dir=tmp_path / "lru", backbone="sdxl", model="tiny", max_resident_loras=1)
    )
    studio.library.import_paths(list(lora_files.values()))
    both = (LoraWeight("inkwell"), LoraWeight("pastel"))
    studio.render(RenderRequest(prompt="x", num_inference_steps=1, loras=both))  # needs 2 > limit: both stay
    loaded = studio.pipeline("sdxl", "tiny")
    assert len(loaded.host.names) == 2
    studio.render(RenderRequest(prompt="x", num_inference_steps=1, loras=(LoraWeight("pastel"),)))
    assert loaded.host.names == [studio.library.get("pastel").sha256]


def test_pipeline_users_take_turns_and_a_worker_view_has_its_own_lock(studio, monkeypatch):
    """The pipeline lock is inside the Studio: two threads rendering through one Studio never overlap in the
    pipeline call; a view (what a job worker renders through) shares the catalog, not the lock."""
    import contextlib
    import threading
    import time

    import app.studio as studio_module

    inside, overlaps = [0], []
    guard = threading.Lock()
    meet: list[threading.Barrier] = []  # phase two: both renders must be inside at once

    def fake_render_batch(pipe, backbone, host, requests, **kw):
        with guard:
            inside[0] += 1
            overlaps.append(inside[0])
        if meet:
            with contextlib.suppress(threading.BrokenBarrierError):
                meet[0].wait()
        time.sleep(0.05)
        with guard:
            inside[0] -= 1
        return [Image.new("RGB", (8, 8)) for r in requests for _ in range(r.num_images)]

    monkeypatch.setattr(studio_module, "render_batch", fake_render_batch)
    threads = [threading.Thread(target=studio.render_image, kwargs={"prompt": f"p{i}"}) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1], "renders through one Studio never run at once"
    view = studio.view()
    assert view.library is studio.library and view.sessions is studio.sessions
    assert view._lock is not studio._lock and view._pipelines is not studio._pipelines
    view.pipeline("sdxl", "tiny")
    overlaps.clear()
    meet.append(threading.Barrier(2, timeout=10))
    both = [threading.Thread(target=s.render_image, kwargs={"prompt": "q"}) for s in (studio, view)]
    for t in both:
        t.start()
    for t in both:
        t.join()
    assert max(overlaps) == 2, "a worker's view renders beside the Studio (its own pipeline)"


def test_one_family_check_for_renders_and_jobs(studio, lora_files):
    """A LoRA of another family is refused with the same message when rendered and when queued as a job."""
    studio.library.import_file(lora_files["inkwell"])
    flux = Studio(studio.settings.model_copy(update={"backbone": "flux"}), studio.library, studio.sessions)
    with pytest.raises(FamilyMismatchError) as rendered:
        flux.render(RenderRequest("x", loras=(LoraWeight("inkwell", 1.0),)))
    with pytest.raises(FamilyMismatchError) as queued:
        flux.submit_job([{"prompt": "x", "loras": [{"name": "inkwell"}]}])
    assert str(queued.value) == f"requests[0]: {rendered.value}"
    assert "'inkwell' is for sdxl; the backbone 'flux' is flux" in str(rendered.value)
