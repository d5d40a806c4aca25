"""composer.formats against diffusers, the reference: same module names, same deltas, files diffusers loads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from composer.formats import (
    LoraFile,
    ModuleDelta,
    convert_state_dict,
    read_lora,
    write_diffusers,
    write_kohya,
)

lora_pipeline = pytest.importorskip("diffusers.loaders.lora_pipeline")
G = torch.Generator().manual_seed(2)


def kohya(name: str, out: int = 6, inp: int = 5, r: int = 2, alpha: float | None = None) -> dict:
    sd = {
        f"{name}.lora_down.weight": torch.randn(r, inp, generator=G),
        f"{name}.lora_up.weight": torch.randn(out, r, generator=G),
    }
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def product(m: ModuleDelta) -> torch.Tensor:
    return m.scale * (m.tensors["up"].flatten(1) @ m.tensors["down"].flatten(1))


def peft_products(state_dict: dict) -> dict[str, torch.Tensor]:
    """B @ A per module of a diffusers-converted state dict (diffusers folds alpha into A and B)."""
    out = {}
    for key, a in state_dict.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[module] = state_dict[f"{module}.lora_B.weight"] @ a
    return out


SGM_NAMES = [
    "input_blocks_0_0",
    "input_blocks_1_0_in_layers_2",
    "input_blocks_2_0_emb_layers_1",
    "input_blocks_3_0_op",
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "input_blocks_5_1_proj_in",
    "input_blocks_7_0_skip_connection",
    "input_blocks_8_1_transformer_blocks_9_attn2_to_k",
    "middle_block_0_out_layers_3",
    "middle_block_1_transformer_blocks_3_ff_net_0_proj",
    "middle_block_2_in_layers_2",
    "output_blocks_0_1_proj_out",
    "output_blocks_2_2_conv",
    "output_blocks_4_0_emb_layers_1",
    "output_blocks_5_1_transformer_blocks_1_attn2_to_out_0",
    "output_blocks_5_2_conv",
    "output_blocks_8_0_skip_connection",
    "time_embed_0",
    "label_emb_0_2",
    "out_2",
]


def test_sdxl_sgm_names_match_diffusers():
    sd = {}
    for name in SGM_NAMES:
        sd |= kohya(f"lora_unet_{name}")
    ours, _ = convert_state_dict(sd)
    ref_sd, _ = lora_pipeline.StableDiffusionXLLoraLoaderMixin.lora_state_dict(
        dict(sd), unet_config=SimpleNamespace(layers_per_block=2)
    )
    ref, _ = convert_state_dict(ref_sd)  # diffusers emits legacy keys, which we read too
    assert set(ours) == set(ref) and len(ours) == len(SGM_NAMES)
    for key, m in ours.items():
        assert torch.equal(product(m), product(ref[key])), key


def test_flux_bfl_split_matches_diffusers():
    sd = (
        kohya("lora_unet_double_blocks_0_img_attn_qkv", out=12, inp=4, r=2, alpha=1.0)
        | kohya("lora_unet_double_blocks_0_txt_attn_qkv", out=12, inp=4, alpha=4.0)
        | kohya("lora_unet_double_blocks_0_img_mlp_0", out=16, inp=4)
        | kohya("lora_unet_double_blocks_0_txt_mod_lin", out=24, inp=4, alpha=2.0)
        | kohya(
            "lora_unet_single_blocks_0_linear1", out=7 * 3072, inp=8, r=1, alpha=0.5
        )  # diffusers fixes 3072
        | kohya("lora_unet_single_blocks_0_linear2", out=8, inp=5 * 3072, r=1)
        | kohya(
            "lora_unet_final_layer_adaLN_modulation_1", out=8, inp=4
        )  # diffusers drops final_layer alphas
        | kohya("lora_unet_img_in", out=4, inp=6)
    )
    ours, _ = convert_state_dict(sd)
    ref = peft_products(lora_pipeline.FluxLoraLoaderMixin.lora_state_dict(dict(sd)))
    assert {k.removeprefix("transformer.") for k in ref} == {k.removeprefix("transformer.") for k in ours}
    for key, m in ours.items():
        expected = ref.get(key, ref.get(key.removeprefix("transformer.")))
        assert torch.allclose(product(m), expected, atol=1e-6), key


def test_our_kohya_files_load_in_diffusers(tmp_path):
    def delta(component, path, out=6, inp=5, alpha=None, r=2):
        d, u = torch.randn(r, inp, generator=G), torch.randn(out, r, generator=G)
        return ModuleDelta(component, path, "lora", {"down": d, "up": u}, alpha)

    # FLUX.1 widths: diffusers splits linear1 into rows 3072 * (1, 1, 1, 4) whatever the file says
    d = 3072
    flux = [
        delta("transformer", "transformer_blocks.0.attn.to_q", out=d, inp=d, alpha=1.0),
        delta("transformer", "transformer_blocks.0.attn.to_v", out=d, inp=d, alpha=4.0, r=3),  # no to_k
        delta("transformer", "transformer_blocks.0.attn.to_add_out", alpha=1.0),
        delta("transformer", "transformer_blocks.1.ff_context.net.0.proj", alpha=1.0),
        delta("transformer", "single_transformer_blocks.1.attn.to_v", out=d, inp=d, alpha=4.0),
        delta("transformer", "single_transformer_blocks.1.proj_mlp", out=4 * d, inp=d, alpha=4.0),
        delta("transformer", "single_transformer_blocks.1.norm.linear", alpha=2.0),
        delta("transformer", "norm_out.linear", out=8, alpha=3.0),  # diffusers ignores final_layer alphas
        delta("transformer", "proj_out", alpha=0.5),
        delta("transformer", "x_embedder", alpha=2.0),
        delta("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", alpha=1.0),
    ]
    p = tmp_path / "flux.safetensors"
    write_kohya(LoraFile({m.key: m for m in flux}, "kohya", "flux"), p)
    # diffusers names top-level layers (x_embedder, proj_out, norm_out.linear) without "transformer." - and
    # load_lora_weights then drops them (diffusers 0.42) - and emits legacy text-encoder keys: read its output
    ref, _ = convert_state_dict(lora_pipeline.FluxLoraLoaderMixin.lora_state_dict(str(p)))
    zero = {  # fused members the LoRA does not adapt come out as zero deltas
        "transformer.transformer_blocks.0.attn.to_k",
        *(f"transformer.single_transformer_blocks.1.attn.to_{x}" for x in "qk"),
    }
    te = "text_encoder.text_model.encoder.layers.0.self_attn."
    ref[f"{te}q_proj"] = ref.pop(f"{te}to_q")  # diffusers' legacy text-encoder names
    assert set(ref) == {m.key for m in flux} | zero
    for m in flux:
        assert torch.allclose(product(ref[m.key]), product(m), atol=1e-5), m.key
    assert all(not product(ref[k]).any() for k in zero)

    sdxl = [
        delta("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", alpha=1.0),
        delta("unet", "up_blocks.2.resnets.0.conv_shortcut", alpha=8.0),
        delta("text_encoder_2", "text_model.encoder.layers.3.mlp.fc1", alpha=1.0),
    ]
    p = tmp_path / "sdxl.safetensors"
    write_kohya(LoraFile({m.key: m for m in sdxl}, "kohya", "sdxl"), p)
    ref_sd, alphas = lora_pipeline.StableDiffusionXLLoraLoaderMixin.lora_state_dict(
        str(p), unet_config=SimpleNamespace(layers_per_block=2)
    )
    ref, _ = convert_state_dict(ref_sd)
    assert set(ref) == {m.key for m in sdxl}
    assert sorted(alphas.values()) == [1.0, 1.0, 8.0]


def test_our_diffusers_file_loads_into_a_unet_with_the_same_scales(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    base = {n: m.weight.detach().clone() for n, m in unet.named_modules() if hasattr(m, "weight")}
    mods = [
        ModuleDelta(
            "unet",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
            "lora",
            {"down": torch.randn(2, 8, generator=G), "up": torch.randn(16, 2, generator=G)},
            alpha=1.0,
        ),
        ModuleDelta(
            "unet",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "lora",
            {"down": torch.randn(4, 16, generator=G), "up": torch.randn(16, 4, generator=G)},
            alpha=2.0,
        ),
        ModuleDelta(
            "unet",
            "down_blocks.0.resnets.0.conv1",
            "lora",
            {"down": torch.randn(2, 8, 3, 3, generator=G), "up": torch.randn(8, 2, 1, 1, generator=G)},
            alpha=4.0,
        ),
    ]
    p = tmp_path / "pytorch_lora_weights.safetensors"
    write_diffusers(LoraFile({m.key: m for m in mods}, "diffusers", None), p)
    unet.load_lora_adapter(str(tmp_path), weight_name=p.name, prefix="unet", adapter_name="x")
    unet.fuse_lora(adapter_names=["x"])
    for m in mods:
        layer = unet.get_submodule(m.path)
        weight = getattr(layer, "base_layer", layer).weight
        expected = base[m.path] + product(m).reshape(base[m.path].shape)
        assert torch.allclose(weight, expected, atol=1e-5), m.path
    assert read_lora(p).modules.keys() == {m.key for m in mods}


def test_every_adaptable_module_of_the_real_architectures_has_a_kohya_name():
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from composer.formats.names import underscore_to_path

    models = {
        "sdxl unet": UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(8, 16, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=8,
            attention_head_dim=2,
            norm_num_groups=4,
            transformer_layers_per_block=(1, 2, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=32,
            use_linear_projection=True,
        ),
        "flux": FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=4,
            num_attention_heads=2,
            joint_attention_dim=8,
            pooled_projection_dim=8,
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 0),
        ),
        "clip": CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=8,
                intermediate_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=100,
                bos_token_id=0,
                eos_token_id=1,
                projection_dim=8,
            )  # fmt: skip
        ),
        "t5": T5EncoderModel(
            T5Config(
                d_model=8,
                d_ff=16,
                num_layers=1,
                num_heads=2,
                d_kv=4,
                vocab_size=100,
                feed_forward_proj="gated-gelu",
            )
        ),
    }
    for label, model in models.items():
        names = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d | torch.nn.Embedding)
        ]
        assert names, label
        for name in names:
            assert underscore_to_path(name.replace(".", "_")) == name, f"{label}: {name}"
