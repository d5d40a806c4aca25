"""Test helpers: diffusers state dicts written back in the original single-file layouts (SGM/LDM for SDXL, BFL
for FLUX), the inverse of what diffusers' single-file loaders convert. Used on tiny models (real tensors) and on
the real architectures (meta tensors, for key layouts and shapes only)."""

from __future__ import annotations

import torch

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _inner(kind: str, rest: list[str]) -> str:
    if kind == "resnets":
        rest = [_RESNET.get(rest[0], rest[0]), *rest[1:]]
    return ".".join(rest)


def sgm_unet_key(key: str, layers: int, up_types: list[str]) -> str:
    """A diffusers UNet2DConditionModel key as SGM (model.diffusion_model.*) names it."""
    for diffusers, sgm in _UNET_TOP.items():
        if key.startswith(diffusers + "."):
            return sgm + key[len(diffusers) :]
    parts = key.split(".")
    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * (layers + 1)}.0.op." + ".".join(parts[5:])
        index = 1 + i * (layers + 1) + int(parts[3])
        return f"input_blocks.{index}.{0 if kind == 'resnets' else 1}." + _inner(kind, parts[4:])
    if parts[0] == "mid_block":
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(parts[1], parts[2])]
        return f"middle_block.{index}." + _inner(parts[1], parts[3:])
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            slot = 2 if up_types[i].startswith("CrossAttn") else 1
            return f"output_blocks.{i * (layers + 1) + layers}.{slot}.conv." + ".".join(parts[5:])
        index = i * (layers + 1) + int(parts[3])
        return f"output_blocks.{index}.{0 if kind == 'resnets' else 1}." + _inner(kind, parts[4:])
    raise KeyError(key)


def ldm_vae(state: dict, levels: int) -> dict:
    """A diffusers AutoencoderKL state dict in the LDM layout (attention projections as 1x1 convolutions)."""
    out = {}
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in state.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        parts = k.split(".")
        if parts[1] == "down_blocks":
            i = parts[2]
            k = f"{parts[0]}.down.{i}." + (
                f"block.{parts[4]}." + ".".join(parts[5:])
                if parts[3] == "resnets"
                else "downsample." + ".".join(parts[5:])
            )
        elif parts[1] == "up_blocks":
            i = levels - 1 - int(parts[2])
            k = f"{parts[0]}.up.{i}." + (
                f"block.{parts[4]}." + ".".join(parts[5:])
                if parts[3] == "resnets"
                else "upsample." + ".".join(parts[5:])
            )
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            k = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        elif parts[1] == "mid_block":
            inner = ".".join(parts[4:-1])
            k = f"{parts[0]}.mid.attn_1.{attention[inner]}.{parts[-1]}"
            if inner != "group_norm" and parts[-1] == "weight":
                value = value[:, :, None, None]
        out[k] = value
    return out


def openclip(state: dict, prefix: str) -> dict:
    """A transformers CLIPTextModelWithProjection state dict in OpenCLIP's layout (fused in_proj)."""
    out = {
        prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
        prefix + "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            for a, b in names.items():
                out[f"{dst}{b}.{kind}"] = state[f"{src}{a}.{kind}"]
    return out


def clip_l(state: dict, prefix: str) -> dict:
    """A transformers CLIPTextModel state dict as the original checkpoints hold it (with `text_model.`)."""
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()}


def sdxl_checkpoint(unet: dict, unet_config, vae: dict, vae_config, te1: dict, te2: dict) -> dict:
    """An SDXL single-file checkpoint (as sd_xl_base_1.0.safetensors lays it out) of diffusers state dicts."""
    layers, ups = unet_config["layers_per_block"], list(unet_config["up_block_types"])
    out = {"model.diffusion_model." + sgm_unet_key(k, layers, ups): v for k, v in unet.items()}
    levels = len(vae_config["block_out_channels"])
    out.update({"first_stage_model." + k: v for k, v in ldm_vae(vae, levels).items()})
    out.update(clip_l(te1, "conditioner.embedders.0.transformer."))
    out.update(openclip(te2, "conditioner.embedders.1.model."))
    return out


_BFL_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
_BFL_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
    "proj_out": "linear2",
}
_BFL_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}


def _rename(rest: str, table: dict[str, str]) -> str | None:
    for diffusers, bfl in table.items():
        if rest == diffusers or rest.startswith(diffusers + "."):
            return bfl + rest[len(diffusers) :]
    return None


def bfl_transformer(state: dict) -> dict:
    """A diffusers FluxTransformer2DModel state dict in BFL's layout (flux1-dev.safetensors): fused qkv, and
    the final modulation's halves in BFL's (shift, scale) order."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "transformer_blocks":
            name = _rename(".".join(parts[2:]), _BFL_DOUBLE)
            if name is not None:
                out[f"double_blocks.{parts[1]}.{name}"] = value
        elif parts[0] == "single_transformer_blocks":
            name = _rename(".".join(parts[2:]), _BFL_SINGLE)
            if name is not None:
                out[f"single_blocks.{parts[1]}.{name}"] = value
        elif parts[0] == "norm_out":
            scale, shift = value.chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{parts[-1]}"] = torch.cat([shift, scale])
        else:
            out[_rename(key, _BFL_TOP)] = value
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    singles = {int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}
    for kind in ("weight", "bias"):
        for i in blocks:
            p = f"transformer_blocks.{i}.attn."
            out[f"double_blocks.{i}.img_attn.qkv.{kind}"] = torch.cat(
                [state[f"{p}to_{x}.{kind}"] for x in "qkv"]
            )
            added = [state[f"{p}add_{x}_proj.{kind}"] for x in "qkv"]
            out[f"double_blocks.{i}.txt_attn.qkv.{kind}"] = torch.cat(added)
        for i in singles:
            p = f"single_transformer_blocks.{i}."
            parts = [state[f"{p}attn.to_{x}.{kind}"] for x in "qkv"] + [state[f"{p}proj_mlp.{kind}"]]
            out[f"single_blocks.{i}.linear1.{kind}"] = torch.cat(parts)
    return out
