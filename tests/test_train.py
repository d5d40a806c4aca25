"""The trainer: every adapter type learns, the pipeline comes back unchanged, resume is exact, bad input is named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from composer.adapters import blora
from composer.adapters.layer import AdaptedModule
from composer.errors import AdapterError, StudioError
from composer.formats import read_lora, write_kohya
from composer.train import TrainConfig, TrainConfigError, Trainer, TrainingDataError, load_images
from composer.train.checkpoint import CheckpointError


def _images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = np.zeros((size, size, 3), np.uint8)
        arr[:] = rng.integers(0, 255, 3)
        x0, y0 = rng.integers(0, size // 2, 2)
        arr[y0 : y0 + size // 2, x0 : x0 + size // 2] = rng.integers(0, 255, 3)
        out.append(Image.fromarray(arr))
    return out


def _unet_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    unet = pipe.unet
    size = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, size, size, generator=g)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=g)
    ids = torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]], dtype=torch.float32)
    with torch.no_grad():
        return unet(x, 10, cond, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_factory):
    backbone, make = tiny_sdxl_factory
    return backbone, make()


def _train(sdxl, tmp_path, **overrides):
    backbone, pipe = sdxl
    settings = dict(kind="lora", prompt="a photo of sks", steps=4, learning_rate=1e-2, batch_size=2, rank=2)
    settings.update(overrides)
    config = TrainConfig(**settings)
    trainer = Trainer(pipe, backbone, config, tmp_path / config.kind)
    return trainer.run(load_images(_images(3), config.prompt, trainer.size), samples=1, sample_steps=2)


@pytest.mark.parametrize(
    "kind, extra",
    [("lora", {}), ("blora", {}), ("kron", {"kron_factors": (2, 4)}), ("tensor", {"learning_rate": 1e-2})],
)
def test_every_kind_learns_and_the_pipeline_comes_back(sdxl, tmp_path, kind, extra):
    backbone, pipe = sdxl
    before = _unet_out(pipe)
    result = _train(sdxl, tmp_path, kind=kind, **extra)
    assert torch.equal(_unet_out(pipe), before), "training left the pipeline changed"
    assert not any(isinstance(m, AdaptedModule) for m in pipe.unet.modules())
    assert len(result.losses) == result.steps == 4 and all(np.isfinite(result.losses))
    assert result.parameters > 0 and len(result.samples) == 1
    # the trained adapter changes the model: its deltas are no longer zero
    from composer.adapters.host import AdapterHost

    host = AdapterHost.for_pipeline(pipe, backbone)
    try:
        host.add("trained", result.lora)
        norms = [a.delta_weight().abs().max().item() for a in host.adapter_modules("trained").values()]
        assert max(norms) > 0
        with host.activate({"trained": 1.0}):
            assert not torch.allclose(_unet_out(pipe), before)
    finally:
        host.detach()
    if kind == "blora":
        paths = {m.path for m in result.lora.modules.values()}
        assert paths and all(
            p.startswith(("up_blocks.0.attentions.0.", "up_blocks.0.attentions.1.")) for p in paths
        )


@pytest.mark.parametrize(
    "kind, extra", [("lora", {}), ("blora", {}), ("kron", {"kron_factors": (2, 4)}), ("tensor", {})]
)
def test_trained_file_round_trips(sdxl, tmp_path, kind, extra):
    result = _train(sdxl, tmp_path, kind=kind, steps=2, **extra)
    path = tmp_path / f"{kind}.safetensors"
    write_kohya(result.lora, path, title=kind)
    back = read_lora(path)
    assert set(back.modules) == set(result.lora.modules)
    for key, m in result.lora.modules.items():
        assert back.modules[key].kind == m.kind
        for name, t in m.tensors.items():
            assert torch.equal(back.modules[key].tensors[name], t), (key, name)
    assert back.metadata["ss_seed"] == "0"
    if kind == "blora":
        content, style = blora.half(back, "content"), blora.half(back, "style")
        assert len(content.modules) + len(style.modules) == len(back.modules)
        assert all(m.path.startswith("up_blocks.0.attentions.1.") for m in style.modules.values())


def test_resume_after_interruption_equals_an_uninterrupted_run(sdxl, tmp_path):
    backbone, pipe = sdxl
    config = TrainConfig(kind="lora", prompt="a photo of sks", steps=6, learning_rate=1e-2, batch_size=2, rank=2,
                         checkpoint_every=3)  # fmt: skip
    images = load_images(_images(3), config.prompt, 32)
    whole = Trainer(pipe, backbone, config, tmp_path / "whole").run(images, samples=0)

    def interrupt(step, total, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(pipe, backbone, config, tmp_path / "cut", progress=interrupt).run(images, samples=0)
    assert not any(isinstance(m, AdaptedModule) for m in pipe.unet.modules()), "interrupted run left adapters"
    with pytest.raises(TrainConfigError, match="resume"):
        Trainer(pipe, backbone, config, tmp_path / "cut").run(images, samples=0)
    resumed = Trainer(pipe, backbone, config, tmp_path / "cut").run(images, resume=True, samples=0)
    assert resumed.losses == whole.losses
    for key, m in whole.lora.modules.items():
        for name, t in m.tensors.items():
            assert torch.equal(resumed.lora.modules[key].tensors[name], t)
    changed = TrainConfig(**{**config.to_json(), "kron_factors": (16, 16), "steps": 9})
    with pytest.raises(CheckpointError, match="steps"):
        Trainer(pipe, backbone, changed, tmp_path / "cut").run(images, resume=True, samples=0)


def test_bad_input_is_named(sdxl, tmp_path):
    backbone, pipe = sdxl
    folder = tmp_path / "imgs"
    folder.mkdir()
    _images(1)[0].save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png at all")
    with pytest.raises(TrainingDataError, match="b.png"):
        load_images(folder, "a photo of sks", 32)
    (folder / "b.png").unlink()
    with pytest.raises(TrainingDataError, match="1 image.*at least 4"):
        load_images(folder, "a photo of sks", 32, min_images=4)
    with pytest.raises(TrainingDataError, match="not a folder"):
        load_images(tmp_path / "missing", "x", 32)
    with pytest.raises(TrainConfigError, match=r"kron adapter on unet\..*does not fit"):
        _train(sdxl, tmp_path, kind="kron", kron_factors=(3, 7))
    with pytest.raises(TrainConfigError, match="rank 4096 exceeds"):
        _train(sdxl, tmp_path, rank=4096)
    with pytest.raises(TrainConfigError, match="prompt is empty"):
        TrainConfig(prompt=" ").validate()
    with pytest.raises(TrainConfigError, match="adapter type 'dora'"):
        TrainConfig(kind="dora", prompt="x").validate()
    with pytest.raises(TrainConfigError, match="class prompt"):
        TrainConfig(prompt="x", prior_weight=1.0).validate()
    with pytest.raises(TrainConfigError, match="needs a GPU"):
        Trainer(pipe, backbone, TrainConfig(prompt="x", mixed_precision="fp16"), tmp_path / "mp")
    with pytest.raises(AdapterError, match="not a B-LoRA"):
        blora.half(_train(sdxl, tmp_path / "plain", steps=1).lora, "style")


def test_prior_preservation_renders_and_reuses_class_images(sdxl, tmp_path):
    result = _train(sdxl, tmp_path, steps=2, class_prompt="a photo", prior_weight=1.0, class_images=2)
    assert result.steps == 2
    folder = tmp_path / "lora" / "class_images"
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png"]
    (folder / "0000.png").write_bytes(
        (folder / "0001.png").read_bytes()
    )  # a resumed run reuses, not re-renders
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    backbone, pipe = sdxl
    config = TrainConfig(kind="lora", prompt="a photo of sks", steps=2, learning_rate=1e-2, batch_size=2, rank=2,
                         class_prompt="a photo", prior_weight=1.0, class_images=2)  # fmt: skip
    Trainer(pipe, backbone, config, tmp_path / "lora").run(
        load_images(_images(3), "x", 32), resume=True, samples=0
    )
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_flux_lora_trains(tiny_flux_factory, tmp_path):
    backbone, make = tiny_flux_factory
    pipe = make()
    config = TrainConfig(kind="lora", prompt="a photo of sks", steps=3, learning_rate=1e-2, rank=2)
    trainer = Trainer(pipe, backbone, config, tmp_path / "flux")
    result = trainer.run(load_images(_images(2), config.prompt, trainer.size), samples=0)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    ups = [m.tensors["up"].abs().max().item() for m in result.lora.modules.values()]
    assert max(ups) > 0, "no gradient reached the FLUX adapters"
    assert result.lora.family == "flux"


def test_parameter_counts_on_the_real_sdxl_unet_match_methods(capsys):
    """Through the trainer's own target selection and adapter creation, on the meta device (METHODS.md table)."""
    from types import SimpleNamespace

    from composer.adapters.host import AdapterHost
    from composer.backbones import get_backbone
    from composer.train import targets

    backbone = get_backbone("sdxl")
    unet = backbone.build_meta_denoiser()
    host = AdapterHost({"unet": unet}, "sdxl")
    g = torch.Generator().manual_seed(0)

    def count(**settings) -> dict[str, int]:
        config = TrainConfig(prompt="x", **settings)
        keys = targets.target_keys(backbone, SimpleNamespace(unet=unet), config)
        built = targets.create_all(host.find, keys, config, g)
        per_key = {k: sum(p.numel() for p in a.parameters()) for k, a in built}
        return {"total": sum(per_key.values()), "layers": len(per_key), **{
            role: sum(n for k, n in per_key.items() if k.startswith(f"unet.{block}."))
            for role, block in backbone.blora_blocks.items()
        }}  # fmt: skip

    assert count(kind="lora", rank=4) == {
        "total": 5_806_080,
        "layers": 560,
        "content": 880_640,
        "style": 880_640,
    }
    b = count(kind="blora", rank=64)
    assert (b["total"], b["layers"], b["content"], b["style"]) == (28_180_480, 160, 14_090_240, 14_090_240)
    assert count(kind="kron", kron_factors=(16, 16))["total"] == 3_874_560
    assert count(kind="kron", kron_factors=(64, 8))["total"] == 2_152_320
    tensor = count(kind="tensor")["total"]
    lora1 = count(kind="lora", rank=1)["total"]
    assert lora1 == 1_451_520 and tensor < lora1
    with capsys.disabled():
        print(f"\nSDXL attention (560 linears): TLoRA rank 1/1 {tensor:,} params vs LoRA r=1 {lora1:,}"
              f" ({tensor / lora1:.1%})")  # fmt: skip


def test_fp16_model_trains_fp32_adapters_and_renders_samples(tiny_sdxl_factory, tmp_path):
    """An fp16 pipeline (a GPU's default) with --mixed-precision no: adapters train in fp32, samples render."""
    backbone, make = tiny_sdxl_factory
    pipe = make().to(torch.float16)
    config = TrainConfig(
        kind="lora", prompt="a photo of sks", steps=3, learning_rate=1e-2, batch_size=2, rank=2
    )
    trainer = Trainer(pipe, backbone, config, tmp_path / "fp16")
    result = trainer.run(load_images(_images(3), config.prompt, trainer.size), samples=1, sample_steps=2)
    assert all(np.isfinite(result.losses)) and len(result.samples) == 1
    ups = [m.tensors["up"] for m in result.lora.modules.values()]
    assert all(u.dtype == torch.float32 for u in ups) and max(u.abs().max().item() for u in ups) > 0


def test_training_on_a_studio_host_keeps_its_resident_loras(sdxl, tmp_path, make_lora):
    from composer.adapters.host import AdapterHost

    backbone, pipe = sdxl
    host = AdapterHost.for_pipeline(pipe, backbone)
    try:
        host.add("resident", make_lora(pipe, backbone, seed=5))
        host.set_active({"resident": 0.7})
        with_resident = _unet_out(pipe)
        config = TrainConfig(kind="lora", prompt="a photo of sks", steps=2, learning_rate=1e-2, rank=2)
        Trainer(pipe, backbone, config, tmp_path / "shared", host=host).run(
            load_images(_images(3), config.prompt, 32), samples=0
        )
        assert host.names == ["resident"] and host.context.active == {"resident": 0.7}
        assert torch.equal(_unet_out(pipe), with_resident)
        with pytest.raises(AdapterError, match="another AdapterHost"):  # a second host on the same pipeline
            Trainer(pipe, backbone, config, tmp_path / "other").run(
                load_images(_images(3), "x", 32), samples=0
            )
        assert host.names == ["resident"] and torch.equal(_unet_out(pipe), with_resident)
    finally:
        host.detach()


def test_unsavable_settings_fail_before_training_and_bad_checkpoints_are_named(sdxl, tmp_path):
    backbone, pipe = sdxl
    images = load_images(_images(3), "x", 32)
    # A (16, 16) is larger than B (4, 4) on the tiny model's 64-wide layers: LoKr cannot hold it, found before step 1
    config = TrainConfig(kind="kron", prompt="x", steps=2, kron_factors=(16, 16))
    with pytest.raises(TrainConfigError, match="could not be saved after training.*LoKr"):
        Trainer(pipe, backbone, config, tmp_path / "kr").run(images, samples=0)
    assert not (tmp_path / "kr" / "checkpoints").exists()
    config = TrainConfig(kind="lora", prompt="x", steps=2, rank=2, checkpoint_every=1)
    Trainer(pipe, backbone, config, tmp_path / "ok").run(images, samples=0)
    latest = sorted((tmp_path / "ok" / "checkpoints").iterdir())[-1]
    (latest / "optimizer.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        Trainer(pipe, backbone, config, tmp_path / "ok").run(images, resume=True, samples=0)


def test_recipe_defaults_fill_in_by_kind():
    assert TrainConfig(kind="blora", prompt="x").validate().rank == 64
    assert TrainConfig(kind="blora", prompt="x").validate().steps == 1000
    assert TrainConfig(kind="tensor", prompt="x").validate().steps == 2000
    assert TrainConfig(kind="lora", prompt="x", rank=8, steps=7).validate().rank == 8


def test_transformer_targets_add_projections_and_feed_forward(sdxl):
    from composer.train import targets

    backbone, pipe = sdxl
    attention = targets.target_keys(backbone, pipe, TrainConfig(prompt="x"))
    wide = targets.target_keys(backbone, pipe, TrainConfig(prompt="x", targets="transformer"))
    assert set(attention) < set(wide)
    assert not any(k.endswith(("ff.net.2", "proj_in")) for k in attention)
    assert any(k.endswith("proj_in") for k in wide) and any(k.endswith("ff.net.0.proj") for k in wide)
    with pytest.raises(TrainConfigError, match="targets 'everything'"):
        TrainConfig(prompt="x", targets="everything").validate()


@pytest.mark.parametrize(
    "kind, extra", [("lora", {}), ("kron", {"kron_factors": (2, 2)}), ("tensor", {"learning_rate": 1e-2})]
)
def test_full_targets_adapt_convolutions_and_survive_the_file(sdxl, tmp_path, kind, extra):
    from composer.adapters.host import AdapterHost

    backbone, pipe = sdxl
    result = _train(sdxl, tmp_path, kind=kind, steps=2, targets="full", **extra)
    convs = [k for k in result.lora.modules if ".resnets." in k and k.endswith(("conv1", "conv2"))]
    assert convs and any(".attentions." in k for k in result.lora.modules)
    path = tmp_path / f"{kind}-full.safetensors"
    write_kohya(result.lora, path, title=kind)
    outs = []
    for lora in (result.lora, read_lora(path)):
        host = AdapterHost.for_pipeline(pipe, backbone)
        try:
            host.add("full", lora)
            conv = host.adapter_modules("full")[convs[0]]
            assert conv.delta_weight().ndim == 4 and conv.delta_weight().abs().max() > 0
            with host.activate({"full": 1.0}):
                outs.append(_unet_out(pipe))
        finally:
            host.detach()
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], _unet_out(pipe))
    with pytest.raises(TrainConfigError, match="targets 'full' adapts convolutions.*not 'blora'"):
        TrainConfig(kind="blora", prompt="x", targets="full").validate()


def test_checkpoints_carry_the_fp16_loss_scale(tmp_path):
    from composer.train import checkpoint

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    params = [torch.nn.Parameter(torch.ones(2))]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for value in (1.0, float("inf"), 1.0):  # an overflow halves the scale; good steps count towards growth
        optimizer.zero_grad()
        scaler.scale(params[0].sum() * value).backward()
        scaler.step(optimizer)
        scaler.update()
    saved = scaler.state_dict()
    assert saved["scale"] == 2.0**11 and saved["_growth_tracker"] == 1
    ckpt = checkpoint.Checkpoint(
        1, {"p": params[0]}, optimizer.state_dict(), torch.Generator().get_state(), [0.1], {}, saved
    )
    back = checkpoint.load(checkpoint.save(tmp_path, ckpt))
    resumed = torch.amp.GradScaler("cpu")
    resumed.load_state_dict(back.scaler)
    assert resumed.state_dict() == saved


def test_min_snr_gamma_weights_each_sample_by_its_timestep(sdxl):
    from composer.backbones import get_backbone
    from composer.train.objectives import Objective

    backbone, pipe = sdxl
    size = pipe.unet.config.sample_size * 8
    plain = Objective(pipe, backbone, size)
    weighted = Objective(pipe, backbone, size, snr_gamma=5.0)
    alphas = weighted.noise.alphas_cumprod.double()
    snr = alphas / (1 - alphas)
    t = torch.arange(len(alphas))
    expected = torch.clamp(snr, max=5.0) / snr
    assert torch.allclose(weighted.snr_weights(t).double(), expected, rtol=1e-6)
    assert weighted.snr_weights(torch.tensor([999])).item() == pytest.approx(1.0)  # noisy: full weight
    assert weighted.snr_weights(torch.tensor([0])).item() < 0.01  # nearly clean: damped
    cond = [plain.encode_caption("a photo of sks", "cpu")]
    x0 = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(3))
    for seed in range(3):  # batch of one: the weighted loss is the plain loss times w(t) of the drawn t
        with torch.no_grad():
            a = plain.loss(x0, cond, torch.Generator().manual_seed(seed), torch.float32)
            b = weighted.loss(x0, cond, torch.Generator().manual_seed(seed), torch.float32)
        g = torch.Generator().manual_seed(seed)
        torch.randn(x0.shape, generator=g)  # the noise, drawn first
        drawn = torch.randint(0, len(alphas), (1,), generator=g)
        assert b.item() == pytest.approx(a.item() * expected[drawn].item(), rel=1e-5)
    with pytest.raises(TrainConfigError, match="snr_gamma must be"):
        TrainConfig(prompt="x", snr_gamma=0.0).validate()
    with pytest.raises(StudioError, match="rectified flow"):
        Objective(pipe, get_backbone("flux"), size, snr_gamma=5.0)


def test_text_encoder_adapters_train_and_change_the_prompt_embedding(sdxl, tmp_path):
    from composer.adapters.host import AdapterHost

    backbone, pipe = sdxl
    result = _train(sdxl, tmp_path, steps=3, text_encoder=True)
    components = {m.component for m in result.lora.modules.values()}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    te_keys = [k for k, m in result.lora.modules.items() if m.component.startswith("text_encoder")]
    assert all(k.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) for k in te_keys)
    path = tmp_path / "te.safetensors"
    write_kohya(result.lora, path, title="te")

    def embeds():
        with torch.no_grad():
            return pipe.encode_prompt("a photo of sks", device="cpu", do_classifier_free_guidance=False)[0]

    base = embeds()
    outs = []
    for lora in (result.lora, read_lora(path)):  # the text-encoder parts survive the kohya file
        host = AdapterHost.for_pipeline(pipe, backbone)
        try:
            host.add("te", lora)
            with host.activate({"te": 1.0}):
                outs.append(embeds())
        finally:
            host.detach()
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], base)
    assert torch.equal(embeds(), base)  # the encoders come back unadapted
    with pytest.raises(TrainConfigError, match="'blora' adapts the denoiser only"):
        TrainConfig(kind="blora", prompt="x", text_encoder=True).validate()
