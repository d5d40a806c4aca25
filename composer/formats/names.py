"""Module-name conversion: kohya underscore names, SGM (ldm) UNet names and BFL FLUX names to diffusers paths."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from composer.errors import LoraFileError, UnknownKeysError

UNET_WORDS = (
    "conv_in", "conv_out", "conv_norm_out", "conv_act", "time_embedding", "time_proj", "add_embedding",
    "add_time_proj", "class_embedding", "encoder_hid_proj", "linear_1", "linear_2", "cond_proj",
    "down_blocks", "up_blocks", "mid_block", "attentions", "resnets", "downsamplers", "upsamplers", "conv",
    "norm1", "norm2", "norm3", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
    "norm", "proj_in", "proj_out", "transformer_blocks", "attn1", "attn2", "ff", "net", "proj",
)  # fmt: skip
ATTENTION_WORDS = (
    "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "norm_q", "norm_k", "norm_added_q", "norm_added_k", "norm_cross", "group_norm",
)  # fmt: skip
FLUX_WORDS = (
    "x_embedder", "context_embedder", "time_text_embed", "timestep_embedder", "text_embedder",
    "guidance_embedder", "single_transformer_blocks", "attn", "norm1_context", "norm2_context", "ff_context",
    "linear", "norm_out", "proj_mlp", "act_mlp", "pos_embed",
)  # fmt: skip
TEXT_WORDS = (
    "text_model", "embeddings", "token_embedding", "position_embedding", "encoder", "layers", "self_attn",
    "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2", "mlp", "fc1", "fc2",
    "final_layer_norm", "text_projection",
    # T5 (FLUX text_encoder_2)
    "shared", "block", "layer", "SelfAttention", "q", "k", "v", "o", "relative_attention_bias", "layer_norm",
    "DenseReluDense", "wi", "wi_0", "wi_1", "wo", "embed_tokens",
)  # fmt: skip
VOCABULARY = frozenset(UNET_WORDS + ATTENTION_WORDS + FLUX_WORDS + TEXT_WORDS)

UNET_ROOTS = frozenset(
    {"conv_in", "conv_out", "conv_norm_out", "time_embedding", "add_embedding", "class_embedding",
     "encoder_hid_proj", "down_blocks", "up_blocks", "mid_block"}
)  # fmt: skip
TRANSFORMER_ROOTS = frozenset(
    {"x_embedder", "context_embedder", "time_text_embed", "transformer_blocks", "single_transformer_blocks",
     "norm_out", "proj_out", "pos_embed"}
)  # fmt: skip
TEXT_ROOTS = frozenset({"text_model", "text_projection"})


def _unknown(key: str, why: str) -> UnknownKeysError:
    return UnknownKeysError(f"{key}: {why}", [key])


def underscore_to_path(name: str, key: str | None = None) -> str:
    """Split a kohya underscore name into a dotted diffusers path by longest match over VOCABULARY.

    Numeric segments become indices; when the longest match leads nowhere a shorter one is tried.
    Raises UnknownKeysError naming key (default: name) when no split exists.
    """
    parts = name.split("_")

    @cache
    def split_from(i: int) -> tuple[str, ...] | None:
        if i == len(parts):
            return ()
        if parts[i].isdigit():
            rest = split_from(i + 1)
            return None if rest is None else (parts[i], *rest)
        for j in range(len(parts), i, -1):
            word = "_".join(parts[i:j])
            if word in VOCABULARY and (rest := split_from(j)) is not None:
                return (word, *rest)
        return None

    words = split_from(0) if name else None
    if words is None:
        raise _unknown(key or name, f"module name {name!r} contains unknown pieces")
    return ".".join(words)


def component_of(path: str) -> str | None:
    """The pipeline component a bare diffusers path belongs to, from its first segment."""
    root = path.split(".", 1)[0]
    if root in UNET_ROOTS:
        return "unet"
    if root in TRANSFORMER_ROOTS:
        return "transformer"
    if root in TEXT_ROOTS:
        return "text_encoder"
    return None


def canonical_text_path(path: str) -> str:
    """CLIP paths always carry "text_model." (transformers 5 flattens CLIPTextModel; files keep the prefix)."""
    if path.startswith(("encoder.layers.", "embeddings.", "final_layer_norm")):
        return f"text_model.{path}"
    return path


# --- SGM (ldm / sd-scripts SDXL) UNet names -------------------------------------------------------------


@dataclass(frozen=True)
class UNetLayout:
    """Block layout of an SGM UNet: levels, levels with attention, resnets per level."""

    levels: int
    attention_levels: tuple[int, ...]
    layers_per_block: int = 2


SDXL_LAYOUT = UNetLayout(levels=3, attention_levels=(1, 2))
SD15_LAYOUT = UNetLayout(levels=4, attention_levels=(0, 1, 2))

_RESNET_INNER = {
    "in_layers_0": "norm1",
    "in_layers_2": "conv1",
    "emb_layers_1": "time_emb_proj",
    "out_layers_0": "norm2",
    "out_layers_3": "conv2",
    "skip_connection": "conv_shortcut",
}
_SGM_TOP = {
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
    "input_blocks_0_0": "conv_in",
    "out_0": "conv_norm_out",
    "out_2": "conv_out",
}
_SGM_BLOCK = re.compile(
    r"^(input_blocks|output_blocks)_(\d+)_(\d+)(?:_(.+))?$|^middle_block_(\d+)(?:_(.+))?$"
)


def is_sgm(name: str) -> bool:
    """True when an underscore UNet name uses SGM block names."""
    return bool(_SGM_BLOCK.match(name)) or name in _SGM_TOP


def sgm_indices(name: str) -> tuple[str, int, int] | None:
    """(input_blocks|output_blocks|middle_block, block index, sub index) of an SGM name, for layout guessing."""
    m = _SGM_BLOCK.match(name)
    if not m:
        return None
    if m.group(1):
        return m.group(1), int(m.group(2)), int(m.group(3))
    return "middle_block", 0, int(m.group(5))


def _inner(rest: str | None, kind: str, key: str) -> str:
    """Map what follows an SGM block to diffusers: resnet internals, sampler convs, or vocabulary words."""
    if kind == "resnets":
        if rest in _RESNET_INNER:
            return _RESNET_INNER[rest]
        raise _unknown(key, f"unknown resnet layer {rest!r}")
    if kind in ("downsamplers", "upsamplers"):
        if rest in ("op", "conv"):
            return "conv"
        raise _unknown(key, f"unknown sampler layer {rest!r}")
    if not rest:
        raise _unknown(key, "attention block without a layer name")
    return underscore_to_path(rest, key)


def sgm_to_path(name: str, layout: UNetLayout = SDXL_LAYOUT, key: str | None = None) -> str:
    """Map an underscore SGM UNet name (input_blocks_4_1_...) to a diffusers UNet path.

    Raises UnknownKeysError naming key (default: name) for names outside the layout.
    """
    key = key or name
    if name in _SGM_TOP:
        return _SGM_TOP[name]
    m = _SGM_BLOCK.match(name)
    if not m:
        raise _unknown(key, "not an SGM UNet name")
    per = layout.layers_per_block + 1
    if m.group(5) is not None:  # middle_block: resnet, attention, resnet
        sub, rest = int(m.group(5)), m.group(6)
        kind, idx = {0: ("resnets", 0), 1: ("attentions", 0), 2: ("resnets", 1)}.get(sub, (None, 0))
        if kind is None:
            raise _unknown(key, f"middle_block has no child {sub}")
        return f"mid_block.{kind}.{idx}.{_inner(rest, kind, key)}"
    which, i, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if which == "input_blocks":
        level, pos = divmod(i - 1, per)
        if i == 0 or level >= layout.levels:
            raise _unknown(key, f"input_blocks.{i} is outside a {layout.levels}-level UNet")
        if pos == layout.layers_per_block:  # the level's downsampler
            if sub != 0 or level == layout.levels - 1:
                raise _unknown(key, f"input_blocks.{i}.{sub} is not a downsampler")
            return f"down_blocks.{level}.downsamplers.0.{_inner(rest, 'downsamplers', key)}"
        kinds = ["resnets", "attentions"] if level in layout.attention_levels else ["resnets"]
        if sub >= len(kinds):
            raise _unknown(key, f"input_blocks.{i} has no child {sub}")
        return f"down_blocks.{level}.{kinds[sub]}.{pos}.{_inner(rest, kinds[sub], key)}"
    block, pos = divmod(i, per)
    if block >= layout.levels:
        raise _unknown(key, f"output_blocks.{i} is outside a {layout.levels}-level UNet")
    level = layout.levels - 1 - block
    kinds = ["resnets", "attentions"] if level in layout.attention_levels else ["resnets"]
    if pos == layout.layers_per_block and block < layout.levels - 1:
        kinds.append("upsamplers")
    if sub >= len(kinds):
        raise _unknown(key, f"output_blocks.{i} has no child {sub}")
    index = 0 if kinds[sub] == "upsamplers" else pos
    return f"up_blocks.{block}.{kinds[sub]}.{index}.{_inner(rest, kinds[sub], key)}"


# --- BFL (original FLUX) names --------------------------------------------------------------------------

_BFL_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_BFL_SINGLE = {"linear2": "proj_out", "modulation_lin": "norm.linear"}
_BFL_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
}
_BFL_SWAPPED = "final_layer_adaLN_modulation_1"  # norm_out.linear, its two halves of rows swapped
_BFL_BLOCK = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")
BFL_ROOTS = ("double_blocks_", "single_blocks_", "img_in", "txt_in", "time_in_", "vector_in_", "guidance_in_",
             "final_layer_")  # fmt: skip

RowPieces = tuple[tuple[str, tuple[slice, ...]], ...]  # (diffusers path, row slices of the fused output)


def is_bfl(name: str) -> bool:
    """True when an underscore transformer name uses BFL FLUX names (double_blocks_..., img_in, ...)."""
    return name.startswith(BFL_ROOTS)


def _even(rows: int, parts: int, key: str) -> int:
    if rows % parts:
        raise LoraFileError(f"{key}: {rows} output rows cannot be split into {parts} equal parts")
    return rows // parts


def bfl_to_paths(name: str, rows: int, key: str | None = None) -> RowPieces:
    """Map an underscore BFL FLUX name to diffusers transformer paths and the output rows each one takes.

    Fused projections are split: qkv into 3 equal parts, single-block linear1 into q, k, v (inner_dim each)
    and proj_mlp (4 * inner_dim, inner_dim = rows / 7); final_layer adaLN rows swap halves (shift, scale).
    """
    key = key or name
    whole = (slice(None),)
    if name in _BFL_TOP:
        return ((_BFL_TOP[name], whole),)
    if name == _BFL_SWAPPED:
        h = _even(rows, 2, key)
        return (("norm_out.linear", (slice(h, 2 * h), slice(0, h))),)
    m = _BFL_BLOCK.match(name)
    if not m:
        raise _unknown(key, f"unknown FLUX module {name!r}")
    which, i, rest = m.group(1), int(m.group(2)), m.group(3)
    if which == "double_blocks":
        if rest not in _BFL_DOUBLE:
            raise _unknown(key, f"unknown FLUX double-block layer {rest!r}")
        targets = _BFL_DOUBLE[rest]
        step = _even(rows, len(targets), key)
        return tuple(
            (f"transformer_blocks.{i}.{t}", (slice(n * step, (n + 1) * step),) if len(targets) > 1 else whole)
            for n, t in enumerate(targets)
        )
    if rest == "linear1":
        d = _even(rows, 7, key)
        names = ("attn.to_q", "attn.to_k", "attn.to_v")
        pieces = [
            (f"single_transformer_blocks.{i}.{t}", (slice(n * d, (n + 1) * d),)) for n, t in enumerate(names)
        ]
        return (*pieces, (f"single_transformer_blocks.{i}.proj_mlp", (slice(3 * d, 7 * d),)))
    if rest not in _BFL_SINGLE:
        raise _unknown(key, f"unknown FLUX single-block layer {rest!r}")
    return ((f"single_transformer_blocks.{i}.{_BFL_SINGLE[rest]}", whole),)


@dataclass(frozen=True)
class BflTarget:
    """Where a diffusers FLUX transformer path goes in a BFL file.

    name: the BFL underscore name (double_blocks_0_img_attn_qkv, final_layer_linear, ...).
    group: every diffusers path that name holds, in the order of its output rows (one path when not fused).
    ratios: the relative output rows of each group member (linear1: q, k, v = 1 each, proj_mlp = 4).
    """

    name: str
    group: tuple[str, ...]
    ratios: tuple[int, ...]

    @property
    def fused(self) -> bool:
        return len(self.group) > 1

    @property
    def whole_rows(self) -> bool:
        """True when the layer's output rows are exactly its one path's, in order (not fused, no row swap)."""
        return not self.fused and self.name != _BFL_SWAPPED


_BFL_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_DOUBLE_PATH = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_SINGLE_PATH = re.compile(r"^single_transformer_blocks\.(\d+)\.(.+)$")


def path_to_bfl(path: str) -> BflTarget | None:
    """The BFL target of a diffusers FLUX transformer path (the inverse of bfl_to_paths); None when it has none.

    norm_out.linear maps to final_layer_adaLN_modulation_1, whose rows bfl_to_paths swaps (shift, scale).
    """
    if m := _DOUBLE_PATH.match(path):
        i, rest = m.groups()
        for bfl, targets in _BFL_DOUBLE.items():
            if rest in targets:
                group = tuple(f"transformer_blocks.{i}.{t}" for t in targets)
                return BflTarget(f"double_blocks_{i}_{bfl}", group, (1,) * len(targets))
        return None
    if m := _SINGLE_PATH.match(path):
        i, rest = m.groups()
        if rest in _BFL_LINEAR1:
            group = tuple(f"single_transformer_blocks.{i}.{t}" for t in _BFL_LINEAR1)
            return BflTarget(f"single_blocks_{i}_linear1", group, (1, 1, 1, 4))
        bfl = next((b for b, t in _BFL_SINGLE.items() if t == rest), None)
        return None if bfl is None else BflTarget(f"single_blocks_{i}_{bfl}", (path,), (1,))
    if path == "norm_out.linear":
        return BflTarget(_BFL_SWAPPED, (path,), (1,))
    bfl = next((b for b, p in _BFL_TOP.items() if p == path), None)
    return None if bfl is None else BflTarget(bfl, (path,), (1,))
