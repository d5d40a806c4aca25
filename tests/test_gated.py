"""Gated fusion (AutoLoRA): the adapter layer's combiner seam is exact, untrained gates are a merge, training
lowers the loss on its images and touches nothing but the gates, trained gates read the timestep, and gates are
stored per LoRA set (order-insensitive, invalidated by a changed file), reused by the Studio and trained from
the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from composer.adapters.host import AdapterHost
from composer.adapters.layer import AdaptedModule
from composer.adapters.lora import LoraAdapter
from composer.adapters.registry import build_adapter
from composer.formats.model import ModuleDelta
from composer.gates import (
    GateBank,
    GateError,
    StoredGates,
    gate_set_key,
    gated_denoiser,
    gates_from_bytes,
    gates_to_bytes,
    time_features,
)
from composer.methods import GatedParams
from composer.render import LoraWeight, RenderRequest, render_batch
from composer.train.data import TrainingImage, to_pixels
from composer.train.gates import eval_loss, train_gates
from composer.train.objectives import Objective
from tests.conftest_pg import BACKENDS, migrated_engine
from tests.helpers import denoiser_inputs, random_lora

SIZE = 32
runner = CliRunner()


def _layer_adapters(base: nn.Module, g: torch.Generator) -> list[nn.Module]:
    """Two plain LoRAs (the stacked path) and a LoHa (adapter by adapter) on a Linear or a Conv2d."""
    conv = isinstance(base, nn.Conv2d)
    d_in, d_out = (base.in_channels, base.out_channels) if conv else (base.in_features, base.out_features)
    k = (3, 3) if conv else ()
    loras = [
        LoraAdapter(
            base,
            torch.randn(2, d_in, *k, generator=g),
            torch.randn(d_out, 2, *([1] * len(k)), generator=g),
            a,
        )
        for a in (1.0, None)
    ]
    kk = 9 if conv else 1
    hada = {
        "hada_w1_a": torch.randn(d_out, 2, generator=g),
        "hada_w1_b": torch.randn(2, d_in * kk, generator=g) / 2,
        "hada_w2_a": torch.randn(d_out, 3, generator=g),
        "hada_w2_b": torch.randn(3, d_in * kk, generator=g) / 2,
    }
    return [*loras, build_adapter(base, ModuleDelta("unet", "x", "loha", hada, 3.0))]


def test_a_summing_combiner_gives_the_layers_own_output():
    """Linear and Conv2d, plain LoRAs (stacked) and a LoHa, numeric and per-sample scales: a combiner that adds
    y0 and every y_i equals the layer without one; without a combiner the outputs are never computed apart."""
    g = torch.Generator().manual_seed(0)
    for base, x in (
        (nn.Linear(6, 10), torch.randn(3, 5, 6)),
        (nn.Conv2d(6, 10, 3, padding=1), torch.randn(3, 6, 8, 8)),
    ):
        context = AdapterHost({}).context
        layer = AdaptedModule(base, context, "unet.x")
        adapters = _layer_adapters(base, g)
        for i, adapter in enumerate(adapters):
            layer.add(f"l{i}", adapter)
        seen: list[list[str]] = []

        def summing(module, y0, outputs, seen=seen):
            seen.append([name for name, _ in outputs])
            return y0 + sum(y for _, y in outputs)

        for active in (
            {"l0": 0.7, "l1": -1.2},  # stacked
            {"l0": torch.tensor([1.0, 0.0, 0.5]), "l1": torch.tensor([0.0, 2.0, 0.5])},  # per sample
            {"l0": 0.5, "l1": 1.0, "l2": 0.8},  # a LoHa: adapter by adapter
        ):
            context.active = active
            layer.outputs = lambda *a: pytest.fail("outputs computed apart without a combiner")
            plain = layer(x)
            del layer.outputs
            context.combiner = summing
            try:
                combined = layer(x)
            finally:
                context.combiner = None
            torch.testing.assert_close(combined, plain, atol=1e-5, rtol=1e-5)
            assert seen[-1] == list(active)


@pytest.fixture(scope="module", params=["sdxl", "flux"])
def rig(request, tiny_sdxl_factory, tiny_flux_factory):
    """A tiny pipeline with two resident random LoRAs, "a" (denoiser and text encoders) and "b"."""
    backbone, make = tiny_sdxl_factory if request.param == "sdxl" else tiny_flux_factory
    pipe = make()
    host = AdapterHost.for_pipeline(pipe, backbone)
    host.add("a", random_lora(pipe, backbone, seed=1, text_encoders=True))
    host.add("b", random_lora(pipe, backbone, seed=2))
    yield backbone, pipe, host
    host.detach()


def render(rig, method="merge", params=None, gates=None, report=None, loras=(("a", 1.0), ("b", 0.6))):
    backbone, pipe, host = rig
    request = RenderRequest(
        "a red circle on the left",
        num_inference_steps=3,
        height=SIZE,
        width=SIZE,
        loras=tuple(LoraWeight(n, w) for n, w in loras),
        method=method,
        method_params=params,
    )
    image = render_batch(pipe, backbone, host, [request], gates=gates, report=report)[0]
    return np.asarray(image, dtype=np.float32) / 255.0


def test_untrained_gates_are_a_merge(rig):
    """At initialisation (w_o = 2, the rest 0) every denoiser output and every render equals a merge's; the
    render says its gates were untrained; the pipeline comes back as it was."""
    backbone, pipe, host = rig
    denoiser = getattr(pipe, backbone.denoiser)
    args, kwargs, _ = denoiser_inputs(backbone, pipe, SIZE)
    scales = {"a": 1.0, "b": 0.6}
    with torch.no_grad(), host.activate(scales):
        merged = denoiser(*args, **kwargs)[0]
        bank = GateBank.for_stack(host, backbone.denoiser, scales)
        with gated_denoiser(denoiser, backbone, host, bank):
            gated = denoiser(*args, **kwargs)[0]
    torch.testing.assert_close(gated, merged, atol=1e-5, rtol=1e-5)
    assert host.context.combiner is None and "forward" not in vars(denoiser)
    report: dict = {}
    assert np.abs(render(rig, "gated", GatedParams(), report=report) - render(rig)).max() <= 1 / 255
    assert report["gates"].startswith("untrained") and report["gate_parameters"] == bank.parameter_count()
    assert host.context.active == {} and host.context.combiner is None


def _images(n: int = 4, seed: int = 0) -> list[TrainingImage]:
    rng = np.random.default_rng(seed)
    pictures = [Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]
    return [
        TrainingImage(None, to_pixels(p, SIZE), f"a red circle, picture {i}") for i, p in enumerate(pictures)
    ]


@pytest.fixture(scope="module")
def trained(tiny_sdxl_factory):
    """Gates trained on the tiny SDXL for LoRAs a and b, with the weights before and after."""
    backbone, make = tiny_sdxl_factory
    pipe = make()
    host = AdapterHost.for_pipeline(pipe, backbone)
    host.add("a", random_lora(pipe, backbone, seed=1, text_encoders=True))
    host.add("b", random_lora(pipe, backbone, seed=2))
    models = [getattr(pipe, c) for c in (backbone.denoiser, *backbone.text_encoders)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    grads = [[p.requires_grad for p in m.parameters()] for m in models]
    result = train_gates(pipe, backbone, host, {"a": 1.0, "b": 1.0}, _images(), steps=20, lr=2e-2, seed=0)
    yield backbone, pipe, host, result, models, before, grads
    host.detach()


def test_training_lowers_the_loss_and_changes_only_the_gates(trained):
    backbone, pipe, host, result, models, before, grads = trained
    record = result.record
    assert record["steps"] == 20 == len(result.losses) and record["seconds"] > 0
    assert record["loss_trained"] < record["loss_untrained"]  # same images, same noise and timesteps
    for model, saved, flags in zip(models, before, grads, strict=True):  # base and LoRAs untouched
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
        assert [p.requires_grad for p in model.parameters()] == flags
    assert host.context.active == {} and "forward" not in vars(pipe.unet)
    tensors = result.gates.tensors
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in tensors.items() if k.endswith(".w_t"))
    # the stored tensors are the gates that were measured: the same loss again from a fresh bank
    bank = GateBank.for_stack(host, backbone.denoiser, ["a", "b"])
    bank.load(tensors)
    objective = Objective(pipe, backbone, SIZE)
    images = _images()
    with host.activate({"a": 1.0, "b": 1.0}):
        mean, std = objective.encode_images(torch.stack([i.pixels for i in images]))
        cond = [objective.encode_caption(i.caption, "cpu") for i in images]
        with gated_denoiser(pipe.unet, backbone, host, bank):
            again = eval_loss(objective, mean, std, cond, seed=1, dtype=torch.float32)
    assert again == pytest.approx(record["loss_trained"], abs=1e-5)


def test_trained_gates_read_the_timestep(trained):
    """Untrained gates give the same output at every timestep; trained ones (their w_t learned) do not."""
    backbone, _, host, result, *_ = trained
    key = next(k for k in host.layers("b") if k.startswith("unet."))
    layer = host.layers("b")[key]
    torch.manual_seed(3)
    y0 = torch.randn(2, 16, layer.out_features)
    outputs = [("a", torch.randn_like(y0)), ("b", torch.randn_like(y0))]
    fresh, learned = (GateBank.for_stack(host, backbone.denoiser, ["a", "b"]) for _ in range(2))
    learned.load(result.gates.tensors)
    for bank, differs in ((fresh, False), (learned, True)):
        at = []
        for t in (0.1, 0.9):
            bank.set_time(torch.tensor(t))
            at.append(bank.combine(layer, y0, outputs))
        assert (not torch.allclose(at[0], at[1], atol=1e-6)) is differs
    assert time_features(torch.tensor([0.0, 1.0])).shape == (2, 8)


def test_stored_gates_round_trip_and_refuse_other_layers(trained):
    backbone, _, host, result, *_ = trained
    blob = gates_to_bytes(result.gates.tensors)
    back = gates_from_bytes(blob)
    assert back.keys() == result.gates.tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in result.gates.tensors.items())
    only_a = GateBank.for_stack(host, backbone.denoiser, ["a"])
    with pytest.raises(GateError, match="do not fit"):  # a's layers are a subset: b's own are unexpected
        only_a.load({**back, "unet.nowhere.w_b": torch.zeros(3)})
    with pytest.raises(GateError, match="not readable"):
        gates_from_bytes(b"not safetensors")
    assert gate_set_key([("a", "1" * 64), ("b", "2" * 64)]) == gate_set_key(
        [("b", "2" * 64), ("a", "1" * 64)]
    )
    assert gate_set_key([("a", "1" * 64), ("b", "2" * 64)]) != gate_set_key(
        [("a", "1" * 64), ("b", "3" * 64)]
    )


def test_gates_refuse_a_compiled_denoiser_and_need_a_timestep():
    """A compiled denoiser's fixed-shape slots would bypass the combiner: refused, naming --compile. A combine
    outside a denoiser call (no timestep seen) is refused too."""
    model = nn.Sequential(nn.Linear(4, 6))
    host = AdapterHost({"unet": model})
    host.attach("a", [("unet.0", LoraAdapter(model[0], torch.randn(2, 4), torch.randn(6, 2), 1.0))])
    bank = GateBank.for_stack(host, "unet", ["a"])
    with pytest.raises(GateError, match="without a timestep"):
        bank.combine(model[0], torch.zeros(1, 6), [("a", torch.zeros(1, 6))])
    with pytest.raises(GateError, match="nothing to gate"):
        GateBank.for_stack(host, "transformer", ["a"])
    host.make_static("unet", 4)
    with pytest.raises(GateError, match="--compile"):
        GateBank.for_stack(host, "unet", ["a"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_sets_are_stored_and_replaced_per_set_and_model(backend, tmp_path):
    from app.gates import GateStore
    from db.session import make_session_factory

    with migrated_engine(backend, tmp_path) as engine:
        store = GateStore(make_session_factory(engine))
        entries = [("star", "a" * 64), ("heart", "b" * 64)]
        tensors = {"unet.x.w_o": torch.full((4,), 2.0), "unet.x.b": torch.arange(4.0)}
        store.store("toy", "/m", entries, StoredGates(tensors, {"steps": 3}))
        found = store.find("toy", "/m", entries[::-1])  # any order
        assert found is not None and found.record["steps"] == 3
        assert all(torch.equal(found.tensors[k], v) for k, v in tensors.items())
        assert store.find("toy", "/other", entries) is None
        assert store.find("toy", "/m", [("star", "a" * 64), ("heart", "c" * 64)]) is None  # a changed file
        store.store("toy", "/m", entries, StoredGates({"unet.x.b": torch.ones(4)}, {"steps": 9}))
        assert store.find("toy", "/m", entries).record["steps"] == 9
        assert [s.record["steps"] for s in store.list()] == [9]


def _catalog(tmp_path, tiny_sdxl_factory):
    """A Studio on the tiny SDXL with two random LoRAs, inkwell and pastel, and a folder of 4 captioned images."""
    from app.settings import Settings
    from app.studio import Studio
    from composer.formats import write_kohya

    backbone, make = tiny_sdxl_factory
    pipe = make()
    studio = Studio.open(Settings(data_dir=tmp_path / "data", backbone="sdxl", model="tiny"))
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(["inkwell", "pastel"]):
        lora = random_lora(pipe, backbone, seed=i, rank=4, alpha=4.0, std=0.3)
        write_kohya(lora, folder / f"{name}.safetensors", trigger_words=[f"{name}style"])
    studio.library.import_paths([folder])
    images = tmp_path / "images"
    images.mkdir()
    for i, item in enumerate(_images()):
        Image.fromarray(((item.pixels.permute(1, 2, 0) + 1) * 127.5).byte().numpy()).save(images / f"{i}.png")
    (images / "0.txt").write_text("inkwellstyle and pastelstyle")
    return studio, images


def test_the_studio_stores_gates_per_set_and_reuses_them(tmp_path, tiny_sdxl_factory):
    from db.repository import AdapterRepository
    from db.session import unit_of_work

    studio, images = _catalog(tmp_path, tiny_sdxl_factory)
    request = RenderRequest(
        "inkwellstyle pastelstyle",
        num_inference_steps=3,
        height=SIZE,
        width=SIZE,
        loras=(LoraWeight("inkwell"), LoraWeight("pastel", 0.8)),
        method="gated",
    )
    untrained = studio.render(request)
    assert untrained.provenance["method_report"]["gates"].startswith("untrained")
    info = studio.train_gates(["pastel", "inkwell"], images, steps=15, lr=5e-2)
    assert {a["name"] for a in info.adapters} == {"inkwell", "pastel"} and info.record["steps"] == 15
    assert info.record["weights"] == {"pastel": 1.0, "inkwell": 1.0}
    trained = studio.render(request)  # the stack in the other order finds the same set
    report = trained.provenance["method_report"]
    assert report["gates"] == "trained" and report["gate_training"]["steps"] == 15
    changed = np.abs(np.asarray(trained.images[0], np.float32) - np.asarray(untrained.images[0], np.float32))
    assert changed.max() > 0
    # asked for untrained gates, the same stack renders as before training
    plain = studio.render(dataclasses.replace(request, method_params=GatedParams(gates="untrained")))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(untrained.images[0]))
    with unit_of_work(studio.sessions) as session:  # inkwell's entry now points at another file
        AdapterRepository(session).update("inkwell", sha256="f" * 64)
    assert studio.render(request).provenance["method_report"]["gates"].startswith("untrained")


def test_cli_train_gates_stores_them_and_refuses_bad_input(tmp_path, tiny_sdxl_factory):
    from app.cli import app

    studio, images = _catalog(tmp_path, tiny_sdxl_factory)
    common = ["--backbone", "sdxl", "--model", "tiny", "--data-dir", str(tmp_path / "data")]
    ok = runner.invoke(
        app, ["train-gates", "--loras", "inkwell,pastel", "--images", str(images), "--steps", "3", *common]
    )
    assert ok.exit_code == 0, ok.output
    assert "gates for inkwell, pastel" in ok.output and "3 steps" in ok.output
    (stored,) = studio.gates.list()
    assert stored.record["images"] == 4 and stored.model == "tiny"
    empty = tmp_path / "empty"
    empty.mkdir()
    for loras, folder, expected in (
        ("inkwell,nosuch", images, "nosuch"),
        ("inkwell", images, "two or more LoRAs"),
        ("inkwell,inkwell", images, "more than once"),
        ("inkwell,,pastel", images, "separated by commas"),
        ("inkwell,pastel", empty, "0 image(s)"),
        ("inkwell,pastel", tmp_path / "missing", "not a folder"),
    ):
        bad = runner.invoke(
            app, ["train-gates", "--loras", loras, "--images", str(folder), "--steps", "2", *common]
        )
        assert bad.exit_code == 1 and expected in bad.output, (loras, bad.output)
    assert len(studio.gates.list()) == 1
    assert json.dumps(stored.record)  # the record is plain JSON
