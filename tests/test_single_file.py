"""Single-file checkpoints, offline: the toy model written as one SDXL checkpoint loads with configs only (no
weights beside it) and renders as the folder does; the real SDXL base and FLUX.1-dev key layouts (meta device)
are what diffusers' converters turn into the models our shipped configs build; other families, LoRAs and
incomplete files are refused naming what they are."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import toyworld
from composer.backbones import BACKBONES, FAMILIES, load_pipeline
from composer.backbones.single_file import checkpoint_keys, layout_of, load_single_file, shipped_configs
from composer.errors import BackboneError
from tests.single_file_layout import bfl_transformer, ldm_vae, sdxl_checkpoint

SDXL, FLUX = BACKBONES["sdxl"], BACKBONES["flux"]


def configs_only(src, dst):
    """A copy of a diffusers folder without its weights: the configs and tokenizers a single file lacks."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dst


def tiny_sdxl(tmp_path):
    """A tiny SDXL pipeline whose two text encoders differ in width, as SDXL's do (768 and 1280): diffusers'
    single-file reader tells them apart by width (the toy model's are both 32 wide, so it cannot)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from composer.backbones.sdxl import TINY_MERGES, TINY_UNET, TINY_VAE, clip_text_config
    from composer.backbones.tokenizers import clip_tokenizer

    tokenizer = clip_tokenizer(TINY_MERGES)
    torch.manual_seed(0)
    te1 = CLIPTextModel(clip_text_config(tokenizer, 32))
    te2 = CLIPTextModelWithProjection(clip_text_config(tokenizer, 48))
    unet = UNet2DConditionModel(
        **{**TINY_UNET, "cross_attention_dim": 32 + 48, "projection_class_embeddings_input_dim": 6 * 8 + 48}
    )
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_VAE),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_pretrained(toyworld.model_dir(), subfolder="scheduler"),
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.save_pretrained(tmp_path / "folder")
    return load_pipeline(SDXL, tmp_path / "folder")


def test_a_tiny_sdxl_as_one_file_loads_offline_and_renders_as_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tiny_sdxl(tmp_path)
    original = sdxl_checkpoint(
        folder.unet.state_dict(),
        folder.unet.config,
        folder.vae.state_dict(),
        folder.vae.config,
        folder.text_encoder.state_dict(),
        folder.text_encoder_2.state_dict(),
    )
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, path)
    assert layout_of(checkpoint_keys(path), FAMILIES)[0] is SDXL

    configs = configs_only(tmp_path / "folder", tmp_path / "configs")  # no weights: they come from the file
    pipe = load_single_file(SDXL, path, dtype=torch.float32, configs=configs)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(folder, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        for key, value in theirs.items():
            assert torch.equal(mine[key], value), f"{name}.{key}"
    pipe.set_progress_bar_config(disable=True)
    images = [
        p(
            "a red circle",
            num_inference_steps=3,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(1),
        ).images[0]
        for p in (pipe, folder)
    ]
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_sdxl_tokenizers_are_built_offline_when_the_configs_have_none(tmp_path):
    tokenizers = SDXL.checkpoint_tokenizers(shipped_configs("sdxl"), tmp_path / "x.safetensors")
    first, second = tokenizers["tokenizer"], tokenizers["tokenizer_2"]
    assert len(first) == len(second) == 49408  # CLIP's full vocabulary (ids equal OpenAI's: test_backbones)
    assert (first.pad_token, second.pad_token) == ("<|endoftext|>", "!")  # as SDXL base's two tokenizers


def on_meta(family: str, component: str, cls):
    config = cls.load_config(shipped_configs(family) / component)
    with torch.device("meta"):
        return cls.from_config(config)


def meta_text(family: str, component: str, cls_name: str):
    import transformers

    cls = getattr(transformers, cls_name)
    config = cls.config_class.from_pretrained(shipped_configs(family) / component)
    with torch.device("meta"):
        return cls(config)


def shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_the_real_sdxl_layout_converts_to_the_models_of_the_shipped_configs():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )

    unet = SDXL.build_meta_denoiser()
    vae = on_meta("sdxl", "vae", AutoencoderKL)
    te1 = meta_text("sdxl", "text_encoder", "CLIPTextModel")
    te2 = meta_text("sdxl", "text_encoder_2", "CLIPTextModelWithProjection")
    original = sdxl_checkpoint(
        unet.state_dict(), unet.config, vae.state_dict(), vae.config, te1.state_dict(), te2.state_dict()
    )
    assert layout_of(list(original), FAMILIES)[0] is SDXL
    assert infer_diffusers_model_type(original) == "xl_base"  # diffusers' own reading of the layout agrees
    known = {  # as sd_xl_base_1.0.safetensors names and shapes them
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (640, 640),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
    }
    assert {k: tuple(original[k].shape) for k in known} == known
    assert shapes(convert_ldm_unet_checkpoint(dict(original), dict(unet.config))) == shapes(unet.state_dict())
    assert shapes(convert_ldm_vae_checkpoint(dict(original), dict(vae.config))) == shapes(vae.state_dict())
    converted = convert_open_clip_checkpoint(te2, dict(original), prefix="conditioner.embedders.1.model.")
    assert shapes(converted) == {k: v for k, v in shapes(te2.state_dict()).items() if "position_ids" not in k}


def test_the_real_flux_layout_converts_to_the_models_of_the_shipped_configs():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    transformer = FLUX.build_meta_denoiser()
    original = bfl_transformer(transformer.state_dict())
    assert layout_of(list(original), FAMILIES)[0] is FLUX
    assert infer_diffusers_model_type(original) == "flux-dev"
    known = {  # as flux1-dev.safetensors names and shapes them
        "double_blocks.18.img_attn.qkv.weight": (9216, 3072),
        "double_blocks.0.txt_attn.norm.key_norm.scale": (128,),
        "single_blocks.37.linear1.weight": (21504, 3072),
        "single_blocks.37.linear2.weight": (3072, 15360),
        "guidance_in.in_layer.weight": (3072, 256),
        "final_layer.adaLN_modulation.1.weight": (6144, 3072),
        "img_in.weight": (3072, 64),
        "txt_in.weight": (3072, 4096),
    }
    assert {k: tuple(original[k].shape) for k in known} == known
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert shapes(converted) == shapes(transformer.state_dict())
    vae = on_meta("flux", "vae", AutoencoderKL)
    layout = {"vae." + k: v for k, v in ldm_vae(vae.state_dict(), 4).items()}
    assert shapes(convert_ldm_vae_checkpoint(layout, dict(vae.config))) == shapes(vae.state_dict())
    assert tuple(layout["vae.decoder.conv_in.weight"].shape) == (512, 16, 3, 3)  # 16 latent channels


def header_only(path, keys):
    save_file({k: torch.zeros(1) for k in keys}, path)
    return path


SD15 = [
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
]
SDXL_KEYS = [
    "model.diffusion_model.label_emb.0.0.weight",
    "first_stage_model.decoder.conv_in.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.1.model.token_embedding.weight",
]
FLUX_TRANSFORMER = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"]
FLUX_ALL_IN_ONE = [
    *("model.diffusion_model." + k for k in FLUX_TRANSFORMER),
    "vae.decoder.conv_in.weight",
    "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight",
    "text_encoders.t5xxl.transformer.shared.weight",
]


@pytest.mark.parametrize(
    "backbone, keys, message",
    [
        ("sdxl", SD15, "sd15.safetensors is an SD 1.x checkpoint, not one of the sdxl family"),
        (
            "sdxl",
            ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"],
            "is an SD 3 / 3.5 checkpoint",
        ),
        (
            "sdxl",
            ["model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.0.model.ln_final.weight"],
            "an SDXL refiner",
        ),
        ("sdxl", ["cond_stage_model.model.token_embedding.weight"], "an SD 2.x checkpoint"),
        ("sdxl", FLUX_TRANSFORMER, "is a checkpoint of the flux family, not one of the sdxl family"),
        ("flux", SDXL_KEYS, "is a checkpoint of the sdxl family, not one of the flux family"),
        ("sdxl", ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "a LoRA/LyCORIS adapter"),
        ("flux", ["transformer.x.lora_A.weight"], "a LoRA/LyCORIS adapter"),
        ("flux", ["distilled_guidance_layer.in_proj.bias", *FLUX_TRANSFORMER], "a Chroma checkpoint"),
        ("sdxl", ["something.else"], "a file of no layout we know"),
        (
            "flux",
            FLUX_TRANSFORMER,
            "holds the flux transformer but not its vae, text_encoder, text_encoder_2",
        ),
        ("sdxl", SDXL_KEYS[:1], "holds the sdxl unet but not its vae, text_encoder, text_encoder_2"),
        ("flux", FLUX_ALL_IN_ONE, "FLUX needs T5's tokenizer.*put the tokenizer_2 folder"),
    ],
)
def test_other_families_and_incomplete_files_are_refused_naming_what_they_are(
    tmp_path, backbone, keys, message
):
    path = header_only(tmp_path / "sd15.safetensors", keys)
    with pytest.raises(BackboneError, match=message):
        load_pipeline(BACKBONES[backbone], path)


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BackboneError, match="not a readable safetensors checkpoint"):
        load_pipeline(SDXL, path)


def test_shipped_configs_ship_with_the_package():
    for family in ("sdxl", "flux"):
        root = shipped_configs(family)
        assert not list(root.rglob("*.safetensors"))
        for component in BACKBONES[family].checkpoint_components:
            assert (root / component / "config.json").is_file(), (family, component)
