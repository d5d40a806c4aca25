"""Files written by the peer tools themselves, built here on the tiny SDXL and FLUX: LyCORIS's own network
(LoCon plain and Tucker, DoRA on LoCon per output row and per input column, LoHa, LoKr full / factored /
Tucker, over every Linear and Conv2d of the denoiser, time and added embeddings included), LyCORIS's kohya
network (lora_unet_ / lora_te1_ / lora_te2_ keys), and peft LoRA and DoRA saved by diffusers with text-encoder
keys. Each imports with the right type and rank and renders as the peer's own application of it renders
(max abs pixel difference <= 1/255), or is refused naming what is not supported."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from app.cli import app
from app.library import adapter_type_of
from composer.adapters.host import AdapterHost
from composer.adapters.layer import AdaptedModule
from composer.errors import LoraFileError
from composer.formats import read_lora, write_diffusers
from tests.helpers import render

lycoris = pytest.importorskip("lycoris")  # the dev extra: lycoris-lora
TOL = 1 / 255
WEIGHT = 0.7  # LyCORIS's multiplier and our scale


@dataclass(frozen=True)
class Case:
    id: str
    algo: str
    kind: str  # the type it imports as (catalog adapter type)
    rank: int | None  # the rank it imports with (None: full LoKr factors have none)
    options: dict = field(default_factory=dict)
    std: float = 0.1  # of the random weights, so the file changes the image
    weight: float = WEIGHT  # DoRA: 1, where LyCORIS's multiplier and the UIs' strength agree (see dora.py)


CASES = [
    Case("locon", "locon", "lora", 4),
    Case("locon-tucker", "locon", "lora", 4, {"use_tucker": True}),
    Case("dora", "locon", "dora", 4, {"dora_wd": True}, weight=1.0),
    Case("dora-tucker", "locon", "dora", 4, {"dora_wd": True, "use_tucker": True}, weight=1.0),
    Case("dora-in-columns", "locon", "dora", 4, {"dora_wd": True, "wd_on_out": False}, weight=1.0),
    Case("loha", "loha", "loha", 4, std=0.25),
    Case("loha-tucker", "loha", "loha", 4, {"use_tucker": True}, std=0.25),
    Case("lokr-full", "lokr", "lokr", None, {"full_matrix": True}, std=0.05),
    Case("lokr-factored", "lokr", "lokr", 2, {"factor": 4, "decompose_both": True}, std=0.2),
    Case("lokr-tucker", "lokr", "lokr", 2, {"factor": 4, "use_tucker": True}, std=0.2),
]


MAGNITUDES = ("dora_scale", "lora_magnitude_vector")


def _randomise(net: nn.Module, std: float, seed: int = 0, only: str = "") -> None:
    """Random adapter weights (those whose name holds `only`: "lora_" in a model peft injected into); DoRA
    magnitudes (initialised by the peer to the weights' norms) are kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if only in name and not any(m in name for m in MAGNITUDES):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _dora_magnitudes_near_norms(net: nn.Module, seed: int = 3) -> None:
    """Each DoRA magnitude scaled by 1 + 0.3 * N(0, 1): lengths the file really changes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        found = [p for name, p in net.named_parameters() if any(m in name for m in MAGNITUDES)]
        assert found, "the peer made no DoRA magnitudes"
        for p in found:
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _layers(model: nn.Module) -> set[str]:
    """Every Linear and Conv2d of a model by name (a wrapper is one: its own `base` is not counted again)."""
    return {
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.endswith(".base")
    }


def _ours(pipe, backbone, lora, weight: float = WEIGHT) -> np.ndarray:
    host = AdapterHost.for_pipeline(pipe, backbone)
    host.add("peer", lora)
    try:
        with host.activate({"peer": weight}):
            return render(pipe, steps=2)
    finally:
        host.detach()


@pytest.fixture(scope="module", params=["sdxl", "flux"])
def family(request):
    backbone, make = request.getfixturevalue(f"tiny_{request.param}_factory")
    pipe = make()
    return backbone, make, pipe, render(pipe, steps=2)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lycoris_network_file_renders_as_lycoris_renders_it(family, case, tmp_path):
    backbone, make, pipe, base = family
    if backbone.family == "flux" and "tucker" in case.id:
        pytest.skip("the FLUX transformer has no convolution for Tucker factors")
    peer = make()
    denoiser = getattr(peer, backbone.denoiser)
    net = lycoris.create_lycoris(
        denoiser, case.weight, linear_dim=4 if case.rank != 2 else 2, linear_alpha=2, algo=case.algo,
        preset="full", **case.options,
    )  # fmt: skip
    net.apply_to()
    _randomise(net, case.std)
    if case.kind == "dora":  # a magnitude near the weights' own norms: random DoRA that still draws a picture
        _dora_magnitudes_near_norms(net)
    path = tmp_path / f"{case.id}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    theirs = render(peer, steps=2)

    lora = read_lora(path)
    assert (adapter_type_of(lora), lora.rank, lora.family) == (case.kind, case.rank, backbone.family)
    assert {m.path for m in lora.modules.values()} == _layers(denoiser), "the full preset adapts every layer"
    if "tucker" in case.id:
        assert any({"hada_t1", "lokr_t2", "mid"} & set(m.tensors) for m in lora.modules.values())
    ours = _ours(pipe, backbone, lora, case.weight)
    assert np.abs(theirs - base).max() > 1e-2, "the file must change the image"
    assert np.abs(ours - theirs).max() <= TOL
    assert np.array_equal(render(pipe, steps=2), base), "detached: the base render again"


def test_adapters_on_every_linear_and_conv2d_render(family, tmp_path):
    """Every Linear and Conv2d of the tiny SDXL UNet / FLUX transformer wrapped at once (the SDXL pipeline
    reads add_embedding.linear_1.in_features through the wrapper), equal to LyCORIS's own LoCon."""
    backbone, make, pipe, base = family
    peer = make()
    denoiser = getattr(peer, backbone.denoiser)
    net = lycoris.create_lycoris(denoiser, WEIGHT, linear_dim=4, linear_alpha=2, algo="locon", preset="full")
    net.apply_to()
    _randomise(net, 0.1, seed=1)
    path = tmp_path / "full.safetensors"
    net.save_weights(str(path), torch.float32, {})
    theirs = render(peer, steps=2)
    layers = _layers(getattr(pipe, backbone.denoiser))
    host = AdapterHost.for_pipeline(pipe, backbone)
    host.add("peer", read_lora(path))
    try:
        wrapped = {
            n for n, m in getattr(pipe, backbone.denoiser).named_modules() if isinstance(m, AdaptedModule)
        }
        assert wrapped == layers and len(wrapped) > 40
        with host.activate({"peer": WEIGHT}):
            ours = render(pipe, steps=2)
    finally:
        host.detach()
    assert np.abs(ours - theirs).max() <= TOL and np.abs(ours - base).max() > 1e-2


def test_kohya_file_with_text_encoder_keys_renders_as_lycoris_renders_it(tiny_sdxl_factory, tmp_path):
    """LyCORIS's kohya network over the UNet's transformers and both CLIP text encoders, as LyCORIS renders
    it and as diffusers' kohya converter renders it."""
    from lycoris.kohya import create_network
    from safetensors.torch import load_file, save_file

    backbone, make = tiny_sdxl_factory
    peer, pipe = make(), make()
    encoders = [peer.text_encoder, peer.text_encoder_2]
    net = create_network(WEIGHT, 4, 2, None, encoders, peer.unet, algo="locon", preset="attn-mlp")
    net.apply_to(encoders, peer.unet, True, True)
    _randomise(net, 0.1, seed=2)
    path = tmp_path / "kohya.safetensors"
    net.save_weights(str(path), torch.float32, {})
    theirs = render(peer, steps=2)
    lora = read_lora(path)
    assert (lora.source_format, adapter_type_of(lora), lora.rank) == ("kohya", "lora", 4)
    assert lora.components == {"unet", "text_encoder", "text_encoder_2"}
    ours = _ours(pipe, backbone, lora)
    assert np.abs(ours - theirs).max() <= TOL
    # diffusers' own kohya converter (load_lora_weights), at the same weight. It maps the time and added
    # embeddings wrongly (lora_unet_add_embedding_linear_1 -> "add.embedding.linear": "not found in the base
    # model"), so it gets the file without them, and so do we.
    kept = {k: v for k, v in load_file(path).items() if "_embedding_" not in k}
    assert len(kept) < len(load_file(path))
    save_file(kept, tmp_path / "kept.safetensors")
    converted = make()
    converted.load_lora_weights(tmp_path / "kept.safetensors", adapter_name="peer")
    converted.set_adapters(["peer"], [WEIGHT])
    theirs = render(converted, steps=2)
    assert np.abs(_ours(make(), backbone, read_lora(tmp_path / "kept.safetensors")) - theirs).max() <= TOL


LYCORIS_REFUSED = [
    ("lokr", {"dora_wd": True}, "DoRA weight decomposition on lokr"),
    ("loha", {"dora_wd": True}, "DoRA weight decomposition on loha"),
    ("full", {}, "LyCORIS full"),
    ("ia3", {}, r"\(IA\)\^3"),
    ("diag-oft", {}, "OFT"),
    ("boft", {}, "OFT"),
    ("glora", {}, "GLoRA"),
]


@pytest.mark.parametrize(
    ("algo", "options", "named"), LYCORIS_REFUSED, ids=[f"{a}-{n}" for a, _, n in LYCORIS_REFUSED]
)
def test_unsupported_lycoris_types_are_refused_by_name(tiny_sdxl_factory, tmp_path, algo, options, named):
    _, make = tiny_sdxl_factory
    net = lycoris.create_lycoris(
        make().unet, 1.0, linear_dim=4, linear_alpha=2, algo=algo, preset="full", **options
    )
    net.apply_to()
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    with pytest.raises(LoraFileError, match=named):
        read_lora(path)


def _peft_file(make, tmp_path, dora: bool):
    """A peft LoRA / DoRA on the UNet (attention, projections and resnet convolutions) and both CLIP text
    encoders, saved by diffusers' save_lora_weights. Returns (the file, the writer pipeline: peft in it)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    writer = make()
    unet = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "proj_in", "conv1"], use_dora=dora)
    text = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "out_proj"], use_dora=dora)
    layers: dict = {}
    for name, config in (("unet", unet), ("text_encoder", text), ("text_encoder_2", text)):
        model = getattr(writer, name)
        if name == "unet":
            model.add_adapter(config)  # diffusers' own
        else:  # transformers' add_adapter wants a newer peft than PyPI has: peft's own injection
            inject_adapter_in_model(config, model)
            model.peft_config = {"default": config}
        _randomise(model, 0.1, seed=len(layers) // 2, only="lora_")
        if dora:
            _dora_magnitudes_near_norms(model, seed=len(layers) // 2)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        layers[f"{name}_lora_adapter_metadata"] = config.to_dict()  # lora_alpha: as diffusers' trainers save
    type(writer).save_lora_weights(tmp_path, **layers)
    return tmp_path / "pytorch_lora_weights.safetensors", writer


def test_peft_lora_saved_by_diffusers_renders_as_diffusers_renders_it(tiny_sdxl_factory, tmp_path):
    """The file diffusers writes, loaded back by its own load_lora_weights: the same render, text encoders
    included."""
    backbone, make = tiny_sdxl_factory
    pipe, peer = make(), make()
    base = render(pipe, steps=2)
    path, _ = _peft_file(make, tmp_path, dora=False)
    peer.load_lora_weights(path)
    theirs = render(peer, steps=2)

    lora = read_lora(path)
    assert (adapter_type_of(lora), lora.rank, lora.source_format) == ("lora", 4, "diffusers")
    assert lora.components == {"unet", "text_encoder", "text_encoder_2"}
    assert any(m.tensors["down"].ndim == 4 for m in lora.modules.values()), "convolutions adapted"
    ours = _ours(pipe, backbone, lora, 1.0)
    assert np.abs(theirs - base).max() > 1e-2, "the file must change the image"
    assert np.abs(ours - theirs).max() <= TOL


def test_peft_dora_applies_as_peft_and_renders_as_diffusers_renders_it(tiny_sdxl_factory, tmp_path):
    """A peft DoRA file (lora_magnitude_vector) from diffusers' save_lora_weights. The UNet's part renders
    as diffusers' load_lora_weights renders it. Text encoders: diffusers 0.42 with transformers 5 drops their
    magnitudes at load (its report: `lora_magnitude_vector.default_0` UNEXPECTED, `.default_0.weight`
    MISSING), so there the reference is peft's own layers, in the model that wrote the file."""
    from safetensors.torch import load_file, save_file

    backbone, make = tiny_sdxl_factory
    pipe, peer = make(), make()
    base = render(pipe, steps=2)
    path, writer = _peft_file(make, tmp_path / "w", dora=True)
    lora = read_lora(path)
    assert (adapter_type_of(lora), lora.rank, lora.source_format) == ("dora", 4, "diffusers")
    assert lora.components == {"unet", "text_encoder", "text_encoder_2"}
    kinds = {(m.component, m.tensors["down"].ndim, m.kind) for m in lora.modules.values()}
    assert {("unet", 4, "dora"), ("unet", 2, "dora"), ("text_encoder_2", 2, "dora")} <= kinds

    host = AdapterHost.for_pipeline(pipe, backbone)
    host.add("peer", lora)
    try:
        ids = pipe.tokenizer(["a red circle on the left"], return_tensors="pt").input_ids
        with torch.no_grad(), host.activate({"peer": 1.0}):
            for name in ("text_encoder", "text_encoder_2"):
                ours_h = getattr(pipe, name)(ids, output_hidden_states=True).hidden_states[-2]
                peft_h = getattr(writer, name)(ids, output_hidden_states=True).hidden_states[-2]
                bare_h = getattr(make(), name)(ids, output_hidden_states=True).hidden_states[-2]
                assert (peft_h - bare_h).abs().max() > 1e-2, f"the DoRA must change {name}"
                assert torch.allclose(ours_h, peft_h, atol=1e-5), name
    finally:
        host.detach()

    unet_only = tmp_path / "unet.safetensors"
    save_file({k: v for k, v in load_file(path).items() if k.startswith("unet.")}, unet_only)
    peer.load_lora_weights(unet_only)
    theirs = render(peer, steps=2)
    ours = _ours(pipe, backbone, read_lora(unet_only), 1.0)
    assert np.abs(theirs - base).max() > 1e-2, "the file must change the image"
    assert np.abs(ours - theirs).max() <= TOL
    rewritten = tmp_path / "ours.safetensors"  # our diffusers writer, read back by diffusers
    write_diffusers(read_lora(unet_only), rewritten)
    again = make()
    again.load_lora_weights(rewritten)
    assert np.abs(render(again, steps=2) - theirs).max() <= TOL


def test_cli_shows_loha_and_dora_ranks_and_renders_full_network_files(tiny_sdxl_factory, tmp_path):
    _, make = tiny_sdxl_factory
    files = {"loha": ("loha", {}), "lokr": ("lokr", {}), "dora": ("locon", {"dora_wd": True})}
    for name, (algo, options) in files.items():
        net = lycoris.create_lycoris(
            make().unet, 1.0, linear_dim=4, linear_alpha=2, algo=algo, preset="full", factor=4, **options
        )
        net.apply_to()
        _randomise(net, 0.1)
        net.save_weights(
            str(tmp_path / f"{name}.safetensors"), torch.float32, {"ss_base_model_version": "sdxl_base_v1-0"}
        )
    data = ["--data-dir", str(tmp_path / "data")]
    runner = CliRunner()
    for name in files:
        result = runner.invoke(app, ["import", str(tmp_path / f"{name}.safetensors"), *data])
        assert result.exit_code == 0, result.output
    for name in ("loha", "dora"):
        result = runner.invoke(app, ["show", name, *data])
        assert result.exit_code == 0 and "rank           4" in result.output, result.output
    assert "dora" in runner.invoke(app, ["list", *data]).output
    png = tmp_path / "r.png"
    args = ["render", "--backbone", "sdxl", "--prompt", "circle", "--lora", "loha:0.8", "--lora", "lokr:0.5", "--lora", "dora:0.7"]  # fmt: skip
    result = runner.invoke(
        app, [*args, "--steps", "2", "--width", "32", "--height", "32", "--out", str(png), *data]
    )
    assert result.exit_code == 0 and png.is_file(), result.output
