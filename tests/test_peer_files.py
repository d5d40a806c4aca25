"""Files written by the peer tools themselves, built here on the tiny SDXL and FLUX: LyCORIS's own network
(LoCon, LoHa, LoKr full / factored / Tucker, over every Linear and Conv2d of the denoiser, time and added
embeddings included), LyCORIS's kohya network (lora_unet_ / lora_te1_ / lora_te2_ keys) and peft. Each
imports with the right type and rank and renders as the peer's own application of it renders (max abs
pixel difference <= 1/255), or is refused naming what is not supported."""

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
from composer.formats import read_lora
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


CASES = [
    Case("locon", "locon", "lora", 4),
    Case("loha", "loha", "loha", 4, std=0.25),
    Case("loha-tucker", "loha", "loha", 4, {"use_tucker": True}, std=0.25),
    Case("lokr-full", "lokr", "lokr", None, {"full_matrix": True}, std=0.05),
    Case("lokr-factored", "lokr", "lokr", 2, {"factor": 4, "decompose_both": True}, std=0.2),
    Case("lokr-tucker", "lokr", "lokr", 2, {"factor": 4, "use_tucker": True}, std=0.2),
]


def _randomise(net: nn.Module, std: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _layers(model: nn.Module) -> set[str]:
    """Every Linear and Conv2d of a model by name (a wrapper is one: its own `base` is not counted again)."""
    return {
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.endswith(".base")
    }


def _ours(pipe, backbone, lora) -> np.ndarray:
    host = AdapterHost.for_pipeline(pipe, backbone)
    host.add("peer", lora)
    try:
        with host.activate({"peer": WEIGHT}):
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
        denoiser, WEIGHT, linear_dim=4 if case.rank != 2 else 2, linear_alpha=2, algo=case.algo,
        preset="full", **case.options,
    )  # fmt: skip
    net.apply_to()
    _randomise(net, case.std)
    path = tmp_path / f"{case.id}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    theirs = render(peer, steps=2)

    lora = read_lora(path)
    assert (adapter_type_of(lora), lora.rank, lora.family) == (case.kind, case.rank, backbone.family)
    assert {m.path for m in lora.modules.values()} == _layers(denoiser), "the full preset adapts every layer"
    if "tucker" in case.id:
        assert any({"hada_t1", "lokr_t2"} & set(m.tensors) for m in lora.modules.values())
    ours = _ours(pipe, backbone, lora)
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
    """LyCORIS's kohya network over the UNet's transformers and both CLIP text encoders."""
    from lycoris.kohya import create_network

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
    assert np.abs(_ours(pipe, backbone, lora) - theirs).max() <= TOL


LYCORIS_REFUSED = [
    ("locon", {"dora_wd": True}, "DoRA"),
    ("lokr", {"dora_wd": True}, "DoRA"),
    ("locon", {"use_tucker": True}, "LoCon Tucker"),
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


def test_peft_dora_file_is_refused_by_name(tiny_sdxl_factory, tmp_path):
    """diffusers reads peft DoRA (lora_magnitude_vector); we do not apply it yet and say so at import."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    _, make = tiny_sdxl_factory
    pipe = make()
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], use_dora=True))
    layers = get_peft_model_state_dict(pipe.unet)
    type(pipe).save_lora_weights(tmp_path, unet_lora_layers=layers)
    with pytest.raises(LoraFileError, match="DoRA"):
        read_lora(tmp_path / "pytorch_lora_weights.safetensors")


def test_cli_shows_a_loha_rank_and_renders_a_full_network_file(tiny_sdxl_factory, tmp_path):
    _, make = tiny_sdxl_factory
    for algo in ("loha", "lokr"):
        net = lycoris.create_lycoris(
            make().unet, 1.0, linear_dim=4, linear_alpha=2, algo=algo, preset="full", factor=4
        )
        net.apply_to()
        _randomise(net, 0.1)
        net.save_weights(
            str(tmp_path / f"{algo}.safetensors"), torch.float32, {"ss_base_model_version": "sdxl_base_v1-0"}
        )
    data = ["--data-dir", str(tmp_path / "data")]
    runner = CliRunner()
    for algo in ("loha", "lokr"):
        result = runner.invoke(app, ["import", str(tmp_path / f"{algo}.safetensors"), *data])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["show", "loha", *data])
    assert result.exit_code == 0 and "rank           4" in result.output, result.output
    png = tmp_path / "r.png"
    args = ["render", "--backbone", "sdxl", "--prompt", "circle", "--lora", "loha:0.8", "--lora", "lokr:0.5"]  # fmt: skip
    result = runner.invoke(
        app, [*args, "--steps", "2", "--width", "32", "--height", "32", "--out", str(png), *data]
    )
    assert result.exit_code == 0 and png.is_file(), result.output
