"""Read LoRA files (diffusers/peft, kohya, LyCORIS) into ModuleDelta entries with canonical diffusers names."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch

from composer.adapters.functional import check_cores, core_suffix, is_core
from composer.errors import LoraFileError, UnknownKeysError
from composer.formats import names
from composer.formats.family import family_from_metadata, family_from_string, family_from_structure
from composer.formats.kinds import (
    as_kron,
    file_roles,
    kron_declared,
    lora_like,
    lycoris_algo,
    module_kind,
    role_kind,
)
from composer.formats.model import COMPONENTS, LoraFile, ModuleDelta
from composer.formats.safetensors_io import file_hashes, load_tensors
from composer.formats.triggers import read_sidecars, trigger_words

LORA_ROLES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up", "alpha": "alpha", "lora_mid.weight": "mid",
    "dora_scale": "magnitude", "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
}  # fmt: skip
REFUSED = {
    # LyCORIS algorithms other than LoCon, LoHa and LoKr, named by a key only they write
    "diff": "LyCORIS full fine-tuning (diff) is not supported yet",
    "on_input": "LyCORIS (IA)^3 (on_input) is not supported yet",
    "oft_blocks": "LyCORIS OFT / BOFT (oft_blocks) is not supported yet",
    "a1.weight": "LyCORIS GLoRA (a1, a2, b1, b2) is not supported yet",
    "w_norm": "LyCORIS normalisation-layer training (w_norm) is not supported yet",
}
_KOHYA = re.compile(r"^(lora_unet|lora_transformer|lora_te[123]?|lycoris)_([^.]+)\.(.+)$")
_LEGACY = re.compile(r"^(.+)_lora\.(down|up)\.weight$")  # unet.<...>.processor.to_q_lora.down.weight
_KOHYA_TEXT = {"lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2",
               "lora_te3": "text_encoder_2"}  # fmt: skip
PEFT_METADATA_KEY = "lora_adapter_metadata"
_MAX_LISTED = 10


@dataclass
class _Group:
    """The keys of one source module: style "kohya" (prefix + underscore name) or dotted (component + path)."""

    style: str  # "kohya" | "diffusers" | "peft"
    prefix: str | None  # kohya prefix, or the component named by a dotted key
    name: str  # kohya underscore name, or dotted module path
    keys: dict[str, str] = field(default_factory=dict)  # role -> file key


def _listed(keys: list[str]) -> str:
    more = f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _suffixes() -> list[str]:
    """Every key suffix a module role can have, longest first (plus tr_t.<k>, tr_d.<k>): LoRA's spellings,
    the registered adapter types' own (formats.kinds.file_roles) and the refused ones."""
    return _sorted_suffixes(frozenset(file_roles()))


@cache
def _sorted_suffixes(roles: frozenset[str]) -> list[str]:
    return sorted({*LORA_ROLES, *roles, *REFUSED}, key=len, reverse=True)


def _split_key(key: str) -> tuple[str, str, str | None, str, str] | None:
    """(group id, style, prefix, module name, role) of a key, or None when it fits no convention.

    Tensor cores (tr_t.<k>, tr_d.<k>) are ours: only kohya names and dotted diffusers names carry them.
    """
    suffixes = _suffixes()
    m = _KOHYA.match(key)
    if m and (m.group(3) in suffixes or is_core(m.group(3))):
        return f"{m.group(1)}_{m.group(2)}", "kohya", m.group(1), m.group(2), m.group(3)
    if legacy := _LEGACY.match(key):
        module, role = legacy.group(1), f"lora.{legacy.group(2)}.weight"
        module = module + ".0" if module.endswith(".to_out") else module
    else:
        role = next((s for s in suffixes if key.endswith(f".{s}")), None) or core_suffix(key)
        if role is None:
            return None
        module = key[: -len(role) - 1]
    module = module.replace(".processor.", ".")
    first, _, rest = module.partition(".")
    if first in COMPONENTS and rest:
        return module, "diffusers", first, rest, role
    if is_core(role):
        return None
    for strip in ("diffusion_model.", "base_model.model."):
        if module.startswith(strip):
            return module, "peft", None, module[len(strip) :], role
    return module, "peft", None, module, role


def _sgm_layout(groups: list[_Group], metadata: Mapping[str, str]) -> names.UNetLayout:
    """SD1.5 or SDXL block layout for SGM names: metadata, then text-encoder prefixes, then block indices."""
    family = family_from_metadata(metadata)
    prefixes = {g.prefix for g in groups}
    if family == "sd15" or (family is None and "lora_te" in prefixes):
        return names.SD15_LAYOUT
    if family == "sdxl" or prefixes & {"lora_te1", "lora_te2"}:
        return names.SDXL_LAYOUT
    for g in groups:
        idx = names.sgm_indices(g.name.replace(".", "_"))
        if idx and (idx[1] > 8 or (idx[0] == "input_blocks" and idx[1] in (1, 2) and idx[2] == 1)):
            return names.SD15_LAYOUT  # SDXL has 9 input/output blocks and no attention at level 0
    return names.SDXL_LAYOUT


def _targets(g: _Group, rows: int, layout: names.UNetLayout, key: str) -> tuple[str, names.RowPieces]:
    """(component, pieces) for a group: diffusers paths and the output rows each takes."""
    whole = (slice(None),)
    if g.style == "kohya":
        if g.prefix in _KOHYA_TEXT:
            return _KOHYA_TEXT[g.prefix], (
                (names.canonical_text_path(names.underscore_to_path(g.name, key)), whole),
            )
        if g.prefix in ("lora_unet", "lora_transformer") and names.is_bfl(g.name):
            return "transformer", names.bfl_to_paths(g.name, rows, key)
        if g.prefix == "lora_unet" and names.is_sgm(g.name):
            return "unet", ((names.sgm_to_path(g.name, layout, key), whole),)
        path = names.underscore_to_path(g.name, key)
        root = names.component_of(path)
        if g.prefix == "lycoris":
            if root is None:
                raise UnknownKeysError(f"{key}: cannot tell which model component {path!r} belongs to", [key])
            return root, ((path, whole),)
        return ("transformer" if g.prefix == "lora_transformer" or root == "transformer" else "unet"), (
            (path, whole),
        )
    component, path = g.prefix, g.name
    flat = path.replace(".", "_")
    if component in (None, "transformer") and names.is_bfl(flat):
        return "transformer", names.bfl_to_paths(flat, rows, key)
    if component in (None, "unet") and names.is_sgm(flat):
        return "unet", ((names.sgm_to_path(flat, layout, key), whole),)
    component = component or names.component_of(path)
    if component is None:
        raise UnknownKeysError(f"{key}: cannot tell which model component {path!r} belongs to", [key])
    if component.startswith("text_encoder"):
        path = names.canonical_text_path(path)
    return component, ((path, whole),)


def _pattern_value(patterns: Mapping, path: str, source: str) -> object | None:
    """The value of the first peft pattern (regex, matched at a dot boundary up to the end) matching path."""
    for pattern, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", path):
                return value
        except re.error as e:
            raise LoraFileError(f"{source}: invalid pattern {pattern!r} in {PEFT_METADATA_KEY} ({e})") from e
    return None


def _peft_configs(metadata: Mapping[str, str], source: str) -> dict[str | None, dict]:
    """LoraConfig dicts by component from lora_adapter_metadata (keys "unet.r" ... or unprefixed "r")."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraFileError(f"{source}: {PEFT_METADATA_KEY} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise LoraFileError(f"{source}: {PEFT_METADATA_KEY} is not a JSON object")
    configs: dict[str | None, dict] = {}
    for k, v in data.items():
        component, _, name = k.partition(".")
        if component in COMPONENTS and name:
            configs.setdefault(component, {})[name] = v
        else:
            configs.setdefault(None, {})[k] = v
    return configs


def _peft_alpha(config: dict, path: str, rank: int, source: str) -> float | None:
    """alpha such that alpha / rank equals peft's scaling (lora_alpha / r, or / sqrt(r) with rsLoRA)."""
    if "lora_alpha" not in config and "alpha_pattern" not in config:
        return None
    paths = (path, path.removeprefix("text_model."))
    r = next(
        (v for p in paths if (v := _pattern_value(config.get("rank_pattern"), p, source)) is not None), None
    )
    a = next(
        (v for p in paths if (v := _pattern_value(config.get("alpha_pattern"), p, source)) is not None), None
    )
    r = float(r if r is not None else config.get("r", rank))
    a = float(a if a is not None else config.get("lora_alpha", r))
    if config.get("use_rslora"):
        return a / math.sqrt(r) * rank
    return a if r == rank else a / r * rank


def _peft_magnitude(m: torch.Tensor, ndim: int) -> torch.Tensor:
    """peft's lora_magnitude_vector in LyCORIS's dora_scale layout (see ModuleDelta): (out,) on a Linear and
    (1, out, 1, 1) on a Conv2d become (out, 1[, 1, 1]); (out, 1[, 1, 1]) (a dora_scale diffusers renamed)
    stays."""
    if m.ndim == 1:
        return m.reshape(-1, *[1] * (ndim - 1))
    if m.ndim == 4 and m.shape[0] == 1 and m.shape[1] != 1:
        return m.transpose(0, 1).contiguous()
    return m


def _lora_tensors(
    g: _Group, tensors: Mapping[str, torch.Tensor], source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [r for r in ("down", "up") if r not in g.keys]
    if missing:
        raise LoraFileError(f"{source}: {next(iter(g.keys.values()))}: module has no {missing[0]} weight")
    down, up = tensors[g.keys["down"]], tensors[g.keys["up"]]
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise LoraFileError(
            f"{source}: {g.keys['up']} {tuple(up.shape)} does not fit {g.keys['down']} {tuple(down.shape)}"
        )
    return down, up


def _group_keys(tensors: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, _Group], list[str]]:
    """Keys grouped by source module, and the keys that fit no convention."""
    groups: dict[str, _Group] = {}
    unknown: list[str] = []
    for key in tensors:
        parsed = _split_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        gid, style, prefix, name, suffix = parsed
        if suffix in REFUSED:
            raise LoraFileError(f"{source}: {key}: {REFUSED[suffix]}")
        role = LORA_ROLES.get(suffix, suffix)
        group = groups.setdefault(gid, _Group(style, prefix, name))
        if role in group.keys:
            raise LoraFileError(f"{source}: {key} and {group.keys[role]} hold the same weight")
        group.keys[role] = key
    return groups, unknown


def _kind(g: _Group, source: str) -> str:
    first_key = next(iter(g.keys.values()))
    kinds = module_kind({k for r in g.keys if (k := role_kind(r)) is not None})
    if len(kinds) == 2 and "dora" in kinds:  # LyCORIS's dora_wd on LoHa / LoKr
        other = next(iter(kinds - {"dora"}))
        raise LoraFileError(
            f"{source}: {first_key}: DoRA weight decomposition on {other} is not supported yet (only on LoRA "
            f"and LoCon)"
        )
    if len(kinds) > 1:
        raise LoraFileError(f"{source}: {first_key}: module mixes {' and '.join(sorted(kinds))} weights")
    if not kinds:
        raise LoraFileError(f"{source}: {first_key}: alpha without any weights")
    return kinds.pop()


def _diagonal_blocks(parts: list[torch.Tensor]) -> list[tuple[int, int] | None] | None:
    """The column range each part's up rows use when a fused up is block-diagonal, else None.

    parts: the up rows of each member of a fused layer, (out_i, r). Block-diagonal means each part's nonzero
    columns lie in a range no other part touches (a part with all-zero rows gets None: the LoRA had no delta
    there). A shared down (community files: every part uses every column) or an all-zero up gives None.
    """
    spans: list[tuple[int, int] | None] = []
    for u in parts:
        cols = torch.nonzero(u.ne(0).any(dim=0)).flatten()
        spans.append((int(cols[0]), int(cols[-1]) + 1) if len(cols) else None)
    used = sorted(s for s in spans if s is not None)
    if not used or any(a[1] > b[0] for a, b in zip(used, used[1:], strict=False)):
        return None
    return spans


def _deltas(
    g: _Group,
    tensors: Mapping[str, torch.Tensor],
    layout: names.UNetLayout,
    peft: dict[str | None, dict],
    source: str,
) -> list[ModuleDelta]:
    """The ModuleDelta entries of one source module (several when a fused FLUX layer is split).

    A fused layer (BFL qkv, linear1) whose up is block-diagonal (written by write_kohya or sd-scripts'
    converter) splits into each member's own down rows and up columns, at its own rank, with alpha scaled to
    keep the layer's scale (alpha_i = alpha * r_i / r); a member with all-zero up rows is dropped. Otherwise
    (shared down) every member gets the whole down and its rows of up.
    """
    first_key = next(iter(g.keys.values()))
    kind = _kind(g, source)
    down, up = _lora_tensors(g, tensors, source) if lora_like(kind) else (None, None)
    try:
        component, pieces = _targets(g, int(up.shape[0]) if up is not None else 0, layout, first_key)
    except UnknownKeysError:
        raise
    except LoraFileError as e:  # a fused layer whose rows do not split: name the file too
        raise LoraFileError(f"{source}: {e}") from e
    whole = (slice(None),)
    if kind != "lora" and (len(pieces) > 1 or pieces[0][1] != whole):
        raise LoraFileError(f"{source}: {first_key}: {kind} on a fused FLUX layer cannot be split yet")
    alpha_t = tensors.get(g.keys.get("alpha", ""))
    if alpha_t is not None and alpha_t.numel() != 1:
        raise LoraFileError(f"{source}: {g.keys['alpha']} must be a scalar, has shape {tuple(alpha_t.shape)}")
    config = peft.get(component, peft.get(None)) if g.style != "kohya" and lora_like(kind) else None
    rows_of = [
        (up if rows == whole else torch.cat([up[s] for s in rows], dim=0)) if kind == "lora" else None
        for _, rows in pieces
    ]  # (rows, r) per piece
    blocks = _diagonal_blocks(rows_of) if kind == "lora" and len(pieces) > 1 and down.ndim == 2 else None
    out = []
    for n, (path, _) in enumerate(pieces):
        if kind == "lora":
            module_tensors = {
                "down": down,
                "up": rows_of[n],
                **({"mid": tensors[g.keys["mid"]]} if "mid" in g.keys else {}),
            }
            if blocks is not None:
                if blocks[n] is None:
                    continue
                lo, hi = blocks[n]
                module_tensors = {"down": down[lo:hi].contiguous(), "up": rows_of[n][:, lo:hi].contiguous()}
        else:
            module_tensors = {r: tensors[k] for r, k in g.keys.items() if r != "alpha"}
            if kind == "tensor":
                check_cores(module_tensors, f"{source}: {first_key}")
            if not g.keys.get("magnitude", "dora_scale").endswith("dora_scale"):  # peft's spelling
                module_tensors["magnitude"] = _peft_magnitude(module_tensors["magnitude"], down.ndim)
        rank = int(down.shape[0]) if lora_like(kind) else 0
        alpha = _peft_alpha(config, path, rank, source) if config else None
        if alpha is None and alpha_t is not None:
            alpha = float(alpha_t.item())
        if alpha is not None and blocks is not None:
            alpha = alpha * int(module_tensors["down"].shape[0]) / rank
        out.append(
            ModuleDelta(component=component, path=path, kind=kind, tensors=module_tensors, alpha=alpha)
        )
    return out


def convert_state_dict(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    source: str = "<state dict>",
) -> tuple[dict[str, ModuleDelta], str]:
    """Convert a LoRA state dict of any supported convention to ModuleDelta entries.

    Kinds: "lora", LyCORIS "lokr" / "loha", "tensor" (tr_t.<k> / tr_d.<k> cores), and "kron" for a LoKr
    module with full lokr_w1, lokr_w2 that the metadata declares a Kronecker adapter (see formats.kinds).

    Returns:
        (modules by ModuleDelta.key, source format "diffusers" | "peft" | "kohya" | "lycoris")
    Raises:
        UnknownKeysError: keys that fit no convention (up to 10 named, with the count of the rest).
        LoraFileError: DoRA / Tucker keys, incomplete or mis-shaped modules, duplicates, bad peft metadata,
            tensor cores not numbered 0, 1, ... without gaps.
    """
    metadata = metadata or {}
    groups, unknown = _group_keys(tensors, source)
    layout = _sgm_layout(list(groups.values()), metadata)
    peft = _peft_configs(metadata, source)
    kron = kron_declared(metadata, source)
    modules: dict[str, ModuleDelta] = {}
    origin: dict[str, str] = {}
    for gid, g in groups.items():
        try:
            deltas = _deltas(g, tensors, layout, peft, source)
        except UnknownKeysError:
            unknown.extend(g.keys.values())  # collected, so that one error names them all
            continue
        if kron(gid):
            deltas = [as_kron(d) for d in deltas]
        first_key = next(iter(g.keys.values()))
        for delta in deltas:
            if delta.key in modules:
                raise LoraFileError(f"{source}: {first_key} and {origin[delta.key]} both adapt {delta.key}")
            modules[delta.key], origin[delta.key] = delta, first_key
    if unknown:
        raise UnknownKeysError(
            f"{source}: {len(unknown)} keys fit no LoRA convention: {_listed(unknown)}", unknown
        )
    if not modules:
        raise LoraFileError(f"{source}: holds no LoRA weights")
    return modules, _source_format(groups.values(), modules.values())


def _source_format(groups, modules) -> str:
    styles = {g.style for g in groups}
    # a DoRA is LyCORIS's when it says dora_scale, peft's when it says lora_magnitude_vector
    lycoris_kinds = any(lycoris_algo(m.kind) for m in modules if m.kind != "dora")
    dora_scale = any(g.keys.get("magnitude", "").endswith("dora_scale") for g in groups)
    if lycoris_kinds or dora_scale or any(g.prefix == "lycoris" for g in groups):
        return "lycoris"
    return "kohya" if "kohya" in styles else "diffusers" if "diffusers" in styles else "peft"


def read_lora(path: str | os.PathLike, *, sidecars: bool = True) -> LoraFile:
    """Read a LoRA safetensors file: refuse pickles, validate, convert keys, hash, detect family and triggers.

    Args:
        path: a .safetensors file (or any file that parses as safetensors).
        sidecars: also read foo.civitai.info / foo.json / foo.metadata.json next to the file.
    Raises:
        PickleRefusedError, LoraFileError, UnknownKeysError (see convert_state_dict).
    """
    p = Path(path)
    tensors, metadata = load_tensors(p)
    modules, source_format = convert_state_dict(tensors, metadata, str(p))
    side = read_sidecars(p) if sidecars else None
    family = (
        family_from_metadata(metadata)
        or family_from_string(side.base_model if side else None)
        or family_from_structure(modules)
    )
    return LoraFile(
        modules=modules,
        source_format=source_format,
        family=family,
        metadata=metadata,
        hashes=file_hashes(p),
        path=str(p),
        trigger_words=trigger_words(metadata, side),
    )
