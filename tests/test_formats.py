"""composer.formats: safetensors I/O, pickle refusal, hashes, key conventions, family and trigger words."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from composer.errors import LoraFileError, PickleRefusedError, UnknownKeysError
from composer.formats import (
    ModuleDelta,
    convert_state_dict,
    detect_family,
    family_from_string,
    file_hashes,
    load_tensors,
    read_header,
    read_lora,
    refuse_pickle,
    save,
)
from composer.formats.names import SD15_LAYOUT, UNetLayout, sgm_to_path, underscore_to_path

G = torch.Generator().manual_seed(0)


def lora_pair(out: int, inp: int, r: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (r, in), up (out, r)), non-zero."""
    return torch.randn(r, inp, generator=G), torch.randn(out, r, generator=G)


def kohya(name: str, out: int = 6, inp: int = 5, r: int = 2, alpha: float | None = None) -> dict:
    down, up = lora_pair(out, inp, r)
    sd = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


# --- safetensors I/O ---------------------------------------------------------------------------------------


def test_read_header_reports_entries_metadata_and_offset(tmp_path):
    p = write(
        tmp_path / "a.safetensors",
        {"x": torch.zeros(2, 3), "y": torch.ones(4, dtype=torch.float16)},
        {"k": "v"},
    )
    header, metadata, offset = read_header(p)
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    assert offset == 8 + n
    assert metadata == {"k": "v"}
    assert header["x"]["dtype"] == "F32" and header["x"]["shape"] == [2, 3]
    assert header["y"]["dtype"] == "F16" and "__metadata__" not in header


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[:5], "too short"),
        (lambda b: struct.pack("<Q", len(b)) + b[8:], "beyond file size"),
        (lambda b: b[:-4], "truncated"),
        (lambda b: b + b"xx", "unexpected bytes"),
        (lambda b: b[:8] + b"[" + b[9:], "invalid JSON"),
        (lambda b: b.replace(b'"F32"', b'"F16"', 1), "needs"),
        (lambda b: b.replace(b'"F32"', b'"Q99"', 1), "unknown dtype"),
    ],
)
def test_read_header_rejects_broken_files_naming_the_path(tmp_path, mangle, message):
    good = write(tmp_path / "good.safetensors", {"lora_unet_a.lora_down.weight": torch.ones(2, 4)})
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(mangle(good.read_bytes()))
    with pytest.raises(LoraFileError, match=message) as e:
        read_header(bad)
    assert "broken.safetensors" in str(e.value)
    with pytest.raises(LoraFileError):
        read_lora(bad)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl"])
def test_pickle_suffixes_are_refused(tmp_path, suffix):
    p = write(tmp_path / f"model{suffix}", {"a": torch.ones(1)})  # even valid safetensors content
    with pytest.raises(PickleRefusedError, match=f"model\\{suffix}"):
        read_lora(p)


class _Touch:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_renamed_pickles_and_zips_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    for proto in (2, 4, 5):
        p = tmp_path / f"renamed{proto}.safetensors"
        p.write_bytes(pickle.dumps(_Touch(marker), protocol=proto))
        with pytest.raises(PickleRefusedError, match=f"renamed{proto}.safetensors"):
            read_lora(p)
    z = tmp_path / "torchsave.safetensors"
    torch.save({"a": torch.ones(1)}, z)
    assert zipfile.is_zipfile(z)
    with pytest.raises(PickleRefusedError, match="zip"):
        read_lora(z)
    assert not marker.exists()


def test_safetensors_whose_length_byte_looks_like_a_pickle_opcode_is_accepted(tmp_path):
    # header length 0x280 starts the file with b"\x80\x02", the pickle protocol-2 opening
    for pad in range(0, 700):
        p = write(tmp_path / "x.safetensors", kohya("lora_unet_conv_in"), {"pad": "p" * pad})
        if p.read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.fail("could not build the colliding header")
    refuse_pickle(p)
    assert "unet.conv_in" in read_lora(p).modules


def test_non_finite_tensors_are_named(tmp_path):
    sd = kohya("lora_unet_conv_in") | kohya("lora_unet_conv_out")
    sd["lora_unet_conv_in.lora_up.weight"][0, 0] = float("nan")
    sd["lora_unet_conv_out.lora_down.weight"][1, 1] = float("inf")
    p = write(tmp_path / "nan.safetensors", sd)
    with pytest.raises(LoraFileError) as e:
        load_tensors(p)
    assert "lora_unet_conv_in.lora_up.weight" in str(e.value)
    assert "lora_unet_conv_out.lora_down.weight" in str(e.value)
    assert "lora_unet_conv_in.lora_down.weight" not in str(e.value)


def test_hashes_full_autov2_and_tensor_only(tmp_path):
    sd = kohya("lora_unet_conv_in")
    a = write(tmp_path / "a.safetensors", sd, {"note": "one"})
    b = write(tmp_path / "b.safetensors", sd, {"note": "a different and longer note"})
    ha, hb = file_hashes(a), file_hashes(b)
    raw = a.read_bytes()
    assert ha.sha256 == hashlib.sha256(raw).hexdigest()
    assert ha.autov2 == ha.sha256[:10]
    (n,) = struct.unpack("<Q", raw[:8])
    assert ha.tensor_sha256 == hashlib.sha256(raw[8 + n :]).hexdigest()
    assert ha.sha256 != hb.sha256 and ha.tensor_sha256 == hb.tensor_sha256
    sd["lora_unet_conv_in.lora_up.weight"][0, 0] += 1
    assert file_hashes(write(tmp_path / "c.safetensors", sd)).tensor_sha256 != ha.tensor_sha256


def test_save_is_atomic_checks_metadata_and_handles_shared_tensors(tmp_path):
    p = tmp_path / "s.safetensors"
    p.write_bytes(b"old")
    shared = torch.ones(3, 4)
    save(p, {"a": shared, "b": shared, "c": shared[1]}, {"k": "v"})
    tensors, meta = load_tensors(p)
    assert meta == {"k": "v"} and torch.equal(tensors["b"], shared) and torch.equal(tensors["c"], shared[1])
    with pytest.raises(LoraFileError, match="rank"):
        save(p, {"a": shared}, {"rank": 4})
    assert load_tensors(p)[1] == {"k": "v"}  # the failed save left the file alone
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.safetensors"]


# --- names -------------------------------------------------------------------------------------------------


def test_sgm_mapping_sdxl_and_sd15():
    sdxl = {
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_2_0_in_layers_2": "down_blocks.0.resnets.1.conv1",
        "input_blocks_7_0_skip_connection": "down_blocks.2.resnets.0.conv_shortcut",
        "middle_block_1_transformer_blocks_3_attn2_to_k": "mid_block.attentions.0.transformer_blocks.3.attn2.to_k",
        "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
        "output_blocks_0_1_proj_in": "up_blocks.0.attentions.0.proj_in",
        "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_5_1_transformer_blocks_1_ff_net_0_proj": "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.0.proj",
        "output_blocks_8_0_out_layers_3": "up_blocks.2.resnets.2.conv2",
        "time_embed_2": "time_embedding.linear_2",
        "label_emb_0_0": "add_embedding.linear_1",
    }
    for sgm, path in sdxl.items():
        assert sgm_to_path(sgm) == path, sgm
    sd15 = {
        "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
        "input_blocks_11_0_in_layers_2": "down_blocks.3.resnets.1.conv1",
        "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_8_2_conv": "up_blocks.2.upsamplers.0.conv",
        "output_blocks_11_1_transformer_blocks_0_attn2_to_v": "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v",
    }
    for sgm, path in sd15.items():
        assert sgm_to_path(sgm, SD15_LAYOUT) == path, sgm
    tiny = UNetLayout(
        levels=2, attention_levels=(0,), layers_per_block=1
    )  # a toy UNet: layout is a parameter
    assert sgm_to_path("input_blocks_1_1_proj_in", tiny) == "down_blocks.0.attentions.0.proj_in"
    assert sgm_to_path("input_blocks_2_0_op", tiny) == "down_blocks.0.downsamplers.0.conv"
    assert sgm_to_path("input_blocks_3_0_in_layers_2", tiny) == "down_blocks.1.resnets.0.conv1"
    assert sgm_to_path("output_blocks_1_1_conv", tiny) == "up_blocks.0.upsamplers.0.conv"
    assert sgm_to_path("output_blocks_3_1_proj_out", tiny) == "up_blocks.1.attentions.1.proj_out"
    for bad in ("output_blocks_9_0_in_layers_2", "input_blocks_8_0_op", "input_blocks_1_1_proj_in"):
        with pytest.raises(UnknownKeysError, match=bad):
            sgm_to_path(
                bad
            )  # SDXL: 9 output blocks, no downsampler at the last level, no attention at level 0


def test_underscore_names_need_known_words():
    assert underscore_to_path("transformer_blocks_0_attn_to_out_0") == "transformer_blocks.0.attn.to_out.0"
    assert underscore_to_path("text_model_encoder_layers_3_mlp_fc2") == "text_model.encoder.layers.3.mlp.fc2"
    assert underscore_to_path("time_text_embed_guidance_embedder_linear_1") == (
        "time_text_embed.guidance_embedder.linear_1"
    )
    with pytest.raises(UnknownKeysError) as e:
        underscore_to_path("down_blocks_0_attentions_0_widget_to_q", key="lora_unet_bad.lora_down.weight")
    assert e.value.keys == ["lora_unet_bad.lora_down.weight"]


# --- readers -----------------------------------------------------------------------------------------------


def delta_of(m: ModuleDelta) -> torch.Tensor:
    return m.scale * (m.tensors["up"].flatten(1) @ m.tensors["down"].flatten(1))


def test_kohya_sdxl_sgm_names_text_encoders_and_alpha(tmp_path):
    sd = (
        kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", alpha=1.0)
        | kohya("lora_unet_output_blocks_2_2_conv", alpha=4.0)
        | kohya("lora_unet_middle_block_0_in_layers_2", alpha=2.0)
        | kohya("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", alpha=1.0)
        | kohya("lora_te2_text_model_encoder_layers_1_mlp_fc1")
    )
    lf = read_lora(write(tmp_path / "sdxl.safetensors", sd))
    assert lf.source_format == "kohya" and lf.family == "sdxl"
    assert set(lf.modules) == {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.up_blocks.0.upsamplers.0.conv",
        "unet.mid_block.resnets.0.conv1",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc1",
    }
    q = lf.modules["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert q.kind == "lora" and q.alpha == 1.0 and q.scale == 0.5
    assert torch.equal(
        q.tensors["down"], sd["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"]
    )
    assert lf.modules["text_encoder_2.text_model.encoder.layers.1.mlp.fc1"].alpha is None
    assert lf.rank == 2 and lf.components == {"unet", "text_encoder", "text_encoder_2"}


def test_kohya_sgm_and_diffusers_named_unet_keys_agree():
    sgm = kohya("lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0", alpha=2.0)
    named = {
        k.replace("output_blocks_5_1", "up_blocks_1_attentions_2"): v for k, v in sgm.items()
    }  # the same weights under diffusers names
    a, _ = convert_state_dict(sgm)
    b, _ = convert_state_dict(named)
    assert set(a) == set(b) == {"unet.up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_out.0"}
    ((ka, ma),) = a.items()
    assert torch.equal(delta_of(ma), delta_of(b[ka]))


def test_kohya_sd15_sgm_layout_from_te_prefix_and_block_indices():
    sd = kohya("lora_unet_output_blocks_11_1_transformer_blocks_0_attn2_to_k") | kohya(
        "lora_unet_input_blocks_1_1_proj_in"
    )
    mods, _ = convert_state_dict(sd)  # indices above SDXL's 8 and attention at level 0 tell SD1.5
    assert set(mods) == {
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k",
        "unet.down_blocks.0.attentions.0.proj_in",
    }
    mods, _ = convert_state_dict(
        kohya("lora_unet_output_blocks_2_1_conv") | kohya("lora_te_text_model_encoder_layers_0_mlp_fc1")
    )
    assert set(mods) == {
        "unet.up_blocks.0.upsamplers.0.conv",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1",
    }
    assert detect_family(mods) is None  # no width or structure clue without metadata
    assert detect_family(mods, {"ss_base_model_version": "sd_v1"}) == "sd15"


def test_diffusers_peft_legacy_and_comfy_keys():
    d1, u1 = lora_pair(6, 5)
    d2, u2 = lora_pair(6, 5)
    d3, u3 = lora_pair(6, 5)
    d4, u4 = lora_pair(6, 5)
    d5, u5 = lora_pair(6, 5)
    sd = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": d1,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": u1,
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": d2,
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": u2,
        "unet.mid_block.attentions.0.proj_in.lora.down.weight": d3,
        "unet.mid_block.attentions.0.proj_in.lora.up.weight": u3,
        "unet.mid_block.attentions.0.proj_in.alpha": torch.tensor(1.0),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.down.weight": d4,
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.up.weight": u4,
        "text_encoder_2.encoder.layers.1.self_attn.v_proj.lora_A.weight": d5,  # flattened CLIP naming
        "text_encoder_2.encoder.layers.1.self_attn.v_proj.lora_B.weight": u5,
    }
    mods, fmt = convert_state_dict(sd)
    assert fmt == "diffusers"
    q = mods["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert q.alpha is None and torch.equal(q.tensors["down"], d1) and torch.equal(q.tensors["up"], u1)
    assert torch.equal(
        mods["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"].tensors["up"], u2
    )
    assert mods["unet.mid_block.attentions.0.proj_in"].alpha == 1.0
    assert "text_encoder.text_model.encoder.layers.0.self_attn.k_proj" in mods
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj" in mods
    comfy = {
        "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": d1,
        "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": u1,
    }
    mods, fmt = convert_state_dict(comfy)
    assert fmt == "peft" and set(mods) == {"transformer.transformer_blocks.0.attn.to_q"}


def test_peft_metadata_alpha_wins_over_alpha_keys_with_patterns():
    sd = {}
    paths = [
        "down_blocks.0.attentions.0.proj_in",
        "up_blocks.1.attentions.0.proj_in",
        "mid_block.attentions.0.proj_out",
    ]
    for i, path in enumerate(paths):
        d, u = lora_pair(6, 5, r=4 if i == 2 else 2)
        sd |= {
            f"unet.{path}.lora_A.weight": d,
            f"unet.{path}.lora_B.weight": u,
            f"unet.{path}.alpha": torch.tensor(99.0),
        }
    config = {
        "unet.r": 2,
        "unet.lora_alpha": 8,
        "unet.rank_pattern": {"^mid_block.attentions.0.proj_out": 4},
        "unet.alpha_pattern": {"^up_blocks.1.attentions.0.proj_in": 1},
    }
    mods, _ = convert_state_dict(sd, {"lora_adapter_metadata": json.dumps(config)})
    assert mods["unet.down_blocks.0.attentions.0.proj_in"].alpha == 8.0
    assert mods["unet.up_blocks.1.attentions.0.proj_in"].alpha == 1.0
    assert mods["unet.mid_block.attentions.0.proj_out"].scale == 2.0  # lora_alpha 8 / r 4
    rs = {"r": 2, "lora_alpha": 4, "use_rslora": True}  # unprefixed keys, rsLoRA scaling alpha / sqrt(r)
    mods, _ = convert_state_dict(sd, {"lora_adapter_metadata": json.dumps(rs)})
    assert mods["unet.down_blocks.0.attentions.0.proj_in"].scale == pytest.approx(4 / 2**0.5)
    with pytest.raises(LoraFileError, match="lora_adapter_metadata"):
        convert_state_dict(sd, {"lora_adapter_metadata": "{not json"})


def test_flux_kohya_fused_qkv_and_linear1_are_split_exactly():
    inner, r = 4, 3
    sd = (
        kohya("lora_unet_double_blocks_0_img_attn_qkv", out=3 * inner, inp=inner, r=r, alpha=1.5)
        | kohya("lora_unet_double_blocks_0_txt_attn_qkv", out=3 * inner, inp=inner, r=r)
        | kohya("lora_unet_double_blocks_0_img_mod_lin", out=6 * inner, inp=inner)
        | kohya("lora_unet_double_blocks_0_txt_mlp_2", out=inner, inp=4 * inner)
        | kohya("lora_unet_single_blocks_1_linear1", out=7 * inner, inp=inner, r=r, alpha=6.0)
        | kohya("lora_unet_single_blocks_1_modulation_lin", out=3 * inner, inp=inner)
    )
    mods, fmt = convert_state_dict(sd)
    assert fmt == "kohya" and detect_family(mods) == "flux"
    fused = (
        sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
        @ sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    )
    for n, name in enumerate(("to_q", "to_k", "to_v")):
        m = mods[f"transformer.transformer_blocks.0.attn.{name}"]
        assert m.alpha == 1.5 and m.rank == r
        assert torch.allclose(m.tensors["up"] @ m.tensors["down"], fused[n * inner : (n + 1) * inner])
    for name in ("add_q_proj", "add_k_proj", "add_v_proj"):
        assert f"transformer.transformer_blocks.0.attn.{name}" in mods
    assert "transformer.transformer_blocks.0.norm1.linear" in mods
    assert "transformer.transformer_blocks.0.ff_context.net.2" in mods
    assert "transformer.single_transformer_blocks.1.norm.linear" in mods
    fused = (
        sd["lora_unet_single_blocks_1_linear1.lora_up.weight"]
        @ sd["lora_unet_single_blocks_1_linear1.lora_down.weight"]
    )
    parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    rebuilt = torch.cat(
        [
            (lambda m: m.tensors["up"] @ m.tensors["down"])(
                mods[f"transformer.single_transformer_blocks.1.{p}"]
            )
            for p in parts
        ]
    )
    assert torch.allclose(rebuilt, fused)
    assert mods["transformer.single_transformer_blocks.1.proj_mlp"].tensors["up"].shape[0] == 4 * inner
    with pytest.raises(LoraFileError, match="img_attn_qkv.*cannot be split into 3"):
        convert_state_dict(kohya("lora_unet_double_blocks_0_img_attn_qkv", out=10))


def test_dora_and_tucker_keys_are_read_as_their_kinds():
    sd = kohya("lora_unet_conv_in") | {"lora_unet_conv_in.dora_scale": torch.ones(1, 5)}
    (m,) = convert_state_dict(sd)[0].values()
    assert m.kind == "dora" and set(m.tensors) == {"down", "up", "magnitude"}
    sd = kohya("lora_unet_conv_in") | {"lora_unet_conv_in.lora_mid.weight": torch.ones(2, 2, 3, 3)}
    (m,) = convert_state_dict(sd)[0].values()
    assert m.kind == "lora" and set(m.tensors) == {"down", "mid", "up"}


def test_lycoris_loha_and_lokr_keep_raw_tensors():
    loha = {
        f"lora_unet_down_blocks_0_attentions_0_proj_in.hada_{w}": torch.randn(2, 2, generator=G)
        for w in ("w1_a", "w1_b", "w2_a", "w2_b")
    }
    lokr = {
        "lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.randn(2, 2, generator=G),
        "lycoris_transformer_blocks_0_attn_to_q.lokr_w2_a": torch.randn(3, 1, generator=G),
        "lycoris_transformer_blocks_0_attn_to_q.lokr_w2_b": torch.randn(1, 3, generator=G),
        "lycoris_transformer_blocks_0_attn_to_q.alpha": torch.tensor(1.0),
    }
    mods, fmt = convert_state_dict(loha | lokr)
    assert fmt == "lycoris"
    h = mods["unet.down_blocks.0.attentions.0.proj_in"]
    assert h.kind == "loha" and set(h.tensors) == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    k = mods["transformer.transformer_blocks.0.attn.to_q"]
    assert k.kind == "lokr" and k.alpha == 1.0 and set(k.tensors) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    with pytest.raises(LoraFileError, match="mixes"):
        convert_state_dict(kohya("lora_unet_conv_in") | {"lora_unet_conv_in.hada_w1_a": torch.ones(2, 2)})


def test_unknown_keys_are_named_and_counted(tmp_path):
    sd = kohya("lora_unet_conv_in") | {f"model.diffusion_model.w{i}.weight": torch.ones(1) for i in range(12)}
    sd |= kohya("lora_unet_down_blocks_0_gizmo_to_q")
    with pytest.raises(UnknownKeysError) as e:
        read_lora(write(tmp_path / "u.safetensors", sd))
    assert "model.diffusion_model.w0.weight" in str(e.value) and "more" in str(e.value)
    assert "lora_unet_down_blocks_0_gizmo_to_q.lora_down.weight" in e.value.keys
    assert len(e.value.keys) == 14
    sgm = kohya("lora_unet_input_blocks_4_1_proj_in")
    dup = sgm | {k.replace("input_blocks_4_1", "down_blocks_1_attentions_0"): v for k, v in sgm.items()}
    with pytest.raises(LoraFileError, match="both adapt unet.down_blocks.1.attentions.0.proj_in"):
        convert_state_dict(dup)
    with pytest.raises(LoraFileError, match="no up weight"):
        convert_state_dict({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 3)})
    with pytest.raises(LoraFileError, match="does not fit"):
        convert_state_dict(
            {
                "lora_unet_conv_in.lora_down.weight": torch.ones(2, 3),
                "lora_unet_conv_in.lora_up.weight": torch.ones(3, 4),
            }
        )


# --- family and trigger words ------------------------------------------------------------------------------


def test_family_from_structure_widths_and_metadata():
    def mods(**paths_in):
        out = {}
        for comp_path, inp in paths_in.items():
            comp, path = comp_path.split("__")
            d, u = lora_pair(4, inp)
            out[f"{comp}.{path}"] = ModuleDelta(
                comp, path.replace("_DOT_", "."), "lora", {"down": d, "up": u}
            )
        return out

    assert detect_family(mods(unet__attn2_DOT_to_k=5)) is None
    assert detect_family(mods(text_encoder_2__text_model=5)) == "sdxl"
    assert detect_family(mods(transformer__proj_out=5)) == "flux"
    assert (
        detect_family(
            {
                "unet.x.attn2.to_k": ModuleDelta(
                    "unet", "x.attn2.to_k", "lora", {"down": torch.ones(2, 2048), "up": torch.ones(4, 2)}
                )
            }
        )
        == "sdxl"
    )
    assert (
        detect_family(
            {
                "unet.x.attn2.to_k": ModuleDelta(
                    "unet", "x.attn2.to_k", "lora", {"down": torch.ones(2, 768), "up": torch.ones(4, 2)}
                )
            }
        )
        == "sd15"
    )
    tiny_sdxl = mods(text_encoder_2__text_model=5)
    assert detect_family(tiny_sdxl, {"modelspec.architecture": "flux-1-dev/lora"}) == "flux"  # metadata wins
    for text, family in [("SDXL 1.0", "sdxl"), ("Pony", "sdxl"), ("Flux.1 D", "flux"), ("SD 1.5", "sd15"),
                         ("sdxl_base_v1-0", "sdxl"), ("stable-diffusion-v1/lora", "sd15"), ("sd_v2", None), ("", None)]:  # fmt: skip
        assert family_from_string(text) == family, text


def test_trigger_words_from_metadata_and_sidecars(tmp_path):
    tags = {"10_ohwx": {"ohwx dog": 20, " red collar": 12, "grass": 3}, "5_reg": {"grass": 10, "dog": 1}}
    p = write(
        tmp_path / "dog.safetensors", kohya("lora_unet_conv_in"), {"ss_tag_frequency": json.dumps(tags)}
    )
    lf = read_lora(p)
    assert lf.trigger_words[:3] == ["ohwx dog", "grass", "red collar"]
    assert lf.family is None
    p = write(
        tmp_path / "cat.safetensors",
        kohya("lora_unet_conv_in"),
        {
            "modelspec.trigger_phrase": "sks cat, tabby",
            "trained_words": '["sks cat", "whiskers"]',
            "ss_tag_frequency": json.dumps(tags),
        },
    )
    assert read_lora(p).trigger_words == ["sks cat", "tabby", "whiskers"]  # declared words beat caption tags
    p = write(tmp_path / "side.safetensors", kohya("lora_unet_conv_in"))
    (tmp_path / "side.civitai.info").write_text(
        json.dumps({"trainedWords": ["zxc style, ink"], "baseModel": "SDXL 1.0"})
    )
    (tmp_path / "side.json").write_text(json.dumps({"activation text": "inkwash", "sd version": "SD1"}))
    lf = read_lora(p)
    assert lf.trigger_words == ["zxc style", "ink", "inkwash"] and lf.family == "sdxl"
    assert read_lora(p, sidecars=False).trigger_words == []
    (tmp_path / "side.civitai.info").write_text("{broken")
    lf = read_lora(p)  # an unreadable sidecar is logged and skipped, the LoRA still reads
    assert lf.trigger_words == ["inkwash"] and lf.family == "sd15"
