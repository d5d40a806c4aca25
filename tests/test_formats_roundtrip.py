"""composer.formats writers: kohya and diffusers layouts, metadata, and exact round trips through read_lora."""

from __future__ import annotations

import json

import pytest
import torch

from composer.errors import LoraFileError, UnknownKeysError
from composer.formats import (
    LoraFile,
    ModuleDelta,
    file_hashes,
    read_header,
    read_lora,
    write_diffusers,
    write_kohya,
)

G = torch.Generator().manual_seed(1)


def delta(
    component: str, path: str, out: int = 6, inp: int = 5, r: int = 2, alpha=None, conv=False
) -> ModuleDelta:
    down = torch.randn(r, inp, 3, 3, generator=G) if conv else torch.randn(r, inp, generator=G)
    up = torch.randn(out, r, 1, 1, generator=G) if conv else torch.randn(out, r, generator=G)
    return ModuleDelta(component, path, "lora", {"down": down, "up": up}, alpha)


def lora_file(family: str | None, *deltas: ModuleDelta, trigger_words=()) -> LoraFile:
    return LoraFile({d.key: d for d in deltas}, "kohya", family, trigger_words=list(trigger_words))


def sdxl() -> LoraFile:
    return lora_file(
        "sdxl",
        delta("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", alpha=1.0),
        delta("unet", "up_blocks.0.attentions.2.transformer_blocks.1.ff.net.0.proj", r=4, alpha=2.0),
        delta("unet", "down_blocks.0.resnets.1.conv1", conv=True, alpha=1.0),
        delta("unet", "mid_block.attentions.0.proj_out"),  # no alpha
        delta("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", alpha=1.0),
        delta("text_encoder_2", "text_model.encoder.layers.1.mlp.fc2", alpha=0.5),
        trigger_words=["ohwx", "red hat"],
    )


def flux() -> LoraFile:
    return lora_file(
        "flux",
        delta("transformer", "transformer_blocks.0.attn.to_q", alpha=8.0),
        delta("transformer", "single_transformer_blocks.3.proj_mlp", out=8, alpha=8.0),  # linear1: 4 * inner
        delta("transformer", "transformer_blocks.1.norm1_context.linear", alpha=8.0),
        delta("text_encoder", "text_model.encoder.layers.0.self_attn.out_proj", alpha=8.0),
    )


def assert_same_modules(a: LoraFile, b: LoraFile) -> None:
    assert set(a.modules) == set(b.modules)
    for key, m in a.modules.items():
        n = b.modules[key]
        assert (n.component, n.path, n.kind, n.alpha) == (m.component, m.path, m.kind, m.alpha), key
        assert torch.equal(n.tensors["down"], m.tensors["down"]) and torch.equal(
            n.tensors["up"], m.tensors["up"]
        ), key


@pytest.mark.parametrize("make", [sdxl, flux])
def test_kohya_round_trip(tmp_path, make):
    src = make()
    p = tmp_path / "out.safetensors"
    write_kohya(src, p, title="My LoRA", tag_frequency={"10_x": {"ohwx": 10, "hat": 4}})
    back = read_lora(p)
    assert_same_modules(src, back)
    assert back.source_format == "kohya" and back.family == src.family
    assert back.trigger_words == (src.trigger_words or ["ohwx", "hat"])  # declared words, else top tags
    meta = back.metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.title"] == "My LoRA" and json.loads(meta["ss_tag_frequency"])["10_x"]["ohwx"] == 10
    assert (
        meta["modelspec.hash_sha256"] == "0x" + file_hashes(p).tensor_sha256 == "0x" + meta["sshs_model_hash"]
    )
    assert "T" in meta["modelspec.date"]


def test_kohya_key_style_and_metadata_per_family(tmp_path):
    p = tmp_path / "k.safetensors"
    write_kohya(sdxl(), p)
    header, meta, _ = read_header(p)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in header
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in header
    assert header["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]["shape"] == []
    assert "lora_unet_mid_block_attentions_0_proj_out.alpha" not in header  # alpha None stays absent
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in header
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in header
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1"
    assert meta["modelspec.trigger_phrase"] == "ohwx, red hat"
    write_kohya(flux(), p)
    header, meta, _ = read_header(p)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in header  # BFL names, fused
    assert header["lora_unet_single_blocks_3_linear1.lora_up.weight"]["shape"] == [14, 2]  # q, k, v, mlp rows
    assert "lora_unet_double_blocks_1_txt_mod_lin.alpha" in header
    assert not any(k.startswith("lora_transformer_") for k in header)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_out_proj.alpha" in header
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("flux1", "flux-1-dev/lora")
    sd15 = lora_file("sd15", delta("text_encoder", "text_model.encoder.layers.0.mlp.fc1"))
    write_kohya(sd15, p, metadata={"ss_output_name": "x"})
    header, meta, _ = read_header(p)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in header
    assert (meta["ss_base_model_version"], meta["ss_output_name"]) == ("sd_v1", "x")


def test_tensor_hash_survives_metadata_edits(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    src = sdxl()
    write_kohya(src, a, title="one")
    write_kohya(src, b, title="another title entirely")
    ha, hb = file_hashes(a), file_hashes(b)
    assert ha.sha256 != hb.sha256 and ha.tensor_sha256 == hb.tensor_sha256


def test_diffusers_round_trip_with_alpha_patterns(tmp_path):
    src = sdxl()
    p = tmp_path / "pytorch_lora_weights.safetensors"
    write_diffusers(src, p)
    header, meta, _ = read_header(p)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in header
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_B.weight" in header
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.r"] == 2 and config["unet.lora_alpha"] == 1
    assert config["unet.rank_pattern"] == {"^up_blocks.0.attentions.2.transformer_blocks.1.ff.net.0.proj": 4}
    assert config["unet.alpha_pattern"] == {
        "^up_blocks.0.attentions.2.transformer_blocks.1.ff.net.0.proj": 2,
        "^mid_block.attentions.0.proj_out": 2,  # alpha None written as alpha = rank
    }
    back = read_lora(p)
    assert back.source_format == "diffusers" and back.trigger_words == ["ohwx", "red hat"]
    write_diffusers(src, tmp_path / "t.safetensors", title="Hat", trigger_words=["sks hat"])
    titled = read_lora(tmp_path / "t.safetensors")
    assert titled.trigger_words == ["sks hat"] and titled.metadata["modelspec.title"] == "Hat"
    src.modules["unet.mid_block.attentions.0.proj_out"].alpha = 2.0  # None reads back as alpha = rank
    assert_same_modules(src, back)
    assert back.modules["unet.mid_block.attentions.0.proj_out"].scale == 1.0


def test_diffusers_without_alphas_writes_no_config(tmp_path):
    src = lora_file(
        None, delta("unet", "conv_in", conv=True), delta("unet", "down_blocks.0.attentions.0.proj_in")
    )
    p = tmp_path / "plain.safetensors"
    write_diffusers(src, p)
    assert "lora_adapter_metadata" not in read_header(p)[1]
    assert_same_modules(src, read_lora(p))


def test_flux_bfl_file_converts_to_diffusers_names(tmp_path):
    from composer.formats import save

    sd = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 4, generator=G),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(12, 2, generator=G),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0),
    }
    save(tmp_path / "bfl.safetensors", sd, {"ss_base_model_version": "flux1"})
    bfl = read_lora(tmp_path / "bfl.safetensors")
    write_diffusers(bfl, tmp_path / "d.safetensors")
    write_kohya(bfl, tmp_path / "k.safetensors")
    for name in ("d", "k"):
        back = read_lora(tmp_path / f"{name}.safetensors")
        assert_same_modules(bfl, back)
        assert back.family == "flux"


def test_writers_refuse_what_they_cannot_express(tmp_path):
    loha = ModuleDelta("unet", "conv_in", "loha", {"hada_w1_a": torch.ones(2, 2)})
    with pytest.raises(LoraFileError, match="unet.conv_in is loha"):
        write_kohya(lora_file("sdxl", loha), tmp_path / "x.safetensors")
    with pytest.raises(LoraFileError, match="loha"):
        write_diffusers(lora_file("sdxl", loha), tmp_path / "x.safetensors")
    odd = delta("unet", "down_blocks.0.custom_adapter.to_q")
    with pytest.raises(UnknownKeysError, match="unet.down_blocks.0.custom_adapter.to_q"):
        write_kohya(lora_file("sdxl", odd), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())
