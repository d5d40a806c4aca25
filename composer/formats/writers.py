"""Write LoRA files in diffusers/peft and kohya layouts, with peft, kohya (ss_*) and ModelSpec metadata."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import torch

from composer.errors import LoraFileError, UnknownKeysError
from composer.formats import names
from composer.formats.kinds import KIND_KEYS, kohya_keys, kohya_metadata, lora_like
from composer.formats.model import LoraFile, ModuleDelta
from composer.formats.readers import PEFT_METADATA_KEY
from composer.formats.safetensors_io import serialize, tensor_bytes_sha256, write_bytes_atomic

BASE_MODEL_VERSION = {"sdxl": "sdxl_base_v1-0", "sd15": "sd_v1", "flux": "flux1"}
ARCHITECTURE = {
    "sdxl": "stable-diffusion-xl-v1-base/lora",
    "sd15": "stable-diffusion-v1/lora",
    "flux": "flux-1-dev/lora",
}
# Hashes and adapter kinds of the source file no longer describe a rewritten file.
STALE_KEYS = (PEFT_METADATA_KEY, "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", *KIND_KEYS)


def _modules(lora: LoraFile, path: Path) -> list[ModuleDelta]:
    if not lora.modules:
        raise LoraFileError(f"{path}: no modules to write")
    return list(lora.modules.values())


def _peft_modules(lora: LoraFile, path: Path) -> list[ModuleDelta]:
    """The modules a diffusers/peft file can hold: LoRA, and DoRA normalised per output row, one of the two per
    component (peft's `use_dora` is per config); anything else refused naming the module."""
    suggest = "(use --format kohya: write_kohya writes every adapter kind)"
    other = sorted(m.key for m in lora.modules.values() if not lora_like(m.kind))
    if other:
        raise LoraFileError(
            f"{path}: diffusers files hold LoRA and DoRA only; {other[0]} is {lora.modules[other[0]].kind} "
            f"{suggest}"
        )
    tucker = sorted(m.key for m in lora.modules.values() if "mid" in m.tensors)
    if tucker:
        raise LoraFileError(
            f"{path}: diffusers files hold LoRA and DoRA only; {tucker[0]} is a LoCon Tucker module (lora_mid) "
            f"{suggest}"
        )
    for m in lora.modules.values():
        mag = m.tensors.get("magnitude")
        if mag is not None and mag.shape[0] == 1 and mag.ndim > 1 and mag.shape[1] > 1:
            raise LoraFileError(
                f"{path}: {m.key} is a DoRA normalised per input column (LyCORIS wd_on_out=False), which peft "
                f"cannot hold {suggest}"
            )
    for component in sorted(lora.components):
        kinds = {m.kind for m in lora.modules.values() if m.component == component}
        if len(kinds) > 1:
            raise LoraFileError(
                f"{path}: {component} mixes LoRA and DoRA modules; peft's use_dora is one setting per "
                f"component {suggest}"
            )
    return _modules(lora, path)


def _alpha(m: ModuleDelta) -> float:
    return float(m.rank if m.alpha is None else m.alpha)


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def _base_metadata(lora: LoraFile, title: str | None, trigger_words: list[str] | None) -> dict[str, str]:
    """The source metadata minus stale hashes, with title and trigger words (arguments, else the file's)."""
    meta = {k: v for k, v in lora.metadata.items() if k not in STALE_KEYS}
    words = lora.trigger_words if trigger_words is None else trigger_words
    if words:
        meta["modelspec.trigger_phrase"] = ", ".join(words)
    if title:
        meta["modelspec.title"] = title
    return meta


def _peft_config(mods: list[ModuleDelta]) -> dict:
    """The LoraConfig of one component: r and lora_alpha most common, patterns for the rest."""
    text = mods[0].component.startswith("text_encoder")

    def pattern(path: str) -> str:
        # Text encoders may be flattened (no "text_model."), so match by suffix; anchor denoiser paths.
        return path.removeprefix("text_model.") if text else f"^{path}"

    r = _most_common([m.rank for m in mods])
    lora_alpha = _most_common([_alpha(m) for m in mods])
    return {
        "r": r,
        "lora_alpha": _num(lora_alpha),
        "rank_pattern": {pattern(m.path): m.rank for m in mods if m.rank != r},
        "alpha_pattern": {pattern(m.path): _num(_alpha(m)) for m in mods if _alpha(m) != lora_alpha},
        "target_modules": sorted({m.path.removeprefix("text_model.") if text else m.path for m in mods}),
        "use_dora": mods[0].kind == "dora",
        "lora_bias": False,
    }


def write_diffusers(
    lora: LoraFile,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    title: str | None = None,
    trigger_words: list[str] | None = None,
) -> None:
    """Write `<component>.<path>.lora_A.weight` / `.lora_B.weight` with the LoraConfig per component in
    `__metadata__["lora_adapter_metadata"]` (keys "unet.r", "unet.lora_alpha", ..., as diffusers saves).

    When no module has an alpha the config is omitted (diffusers then uses scale 1), so alpha None survives a
    round trip; otherwise a missing alpha is written as alpha = rank (the same scale). `title` and
    `trigger_words` (default: the LoRA's own) go to modelspec.title / modelspec.trigger_phrase. A DoRA
    component (normalised per output row) gets peft's `lora_magnitude_vector` and `use_dora` in its config.

    Raises:
        LoraFileError: a module is neither LoRA nor such a DoRA (Tucker, LoKr, ...), or a component mixes LoRA
            and DoRA; each names the module and suggests the kohya format.
    """
    p = Path(path)
    mods = _peft_modules(lora, p)
    tensors: dict[str, torch.Tensor] = {}
    for m in mods:
        tensors[f"{m.component}.{m.path}.lora_A.weight"] = m.tensors["down"]
        tensors[f"{m.component}.{m.path}.lora_B.weight"] = m.tensors["up"]
        if m.kind == "dora":  # peft's layout: (out,) on a Linear, (1, out, 1, 1) on a Conv2d
            mag = m.tensors["magnitude"]
            peft_mag = mag.flatten() if mag.ndim == 2 else mag.transpose(0, 1)
            tensors[f"{m.component}.{m.path}.lora_magnitude_vector"] = peft_mag.contiguous()
    meta = _base_metadata(lora, title, trigger_words)
    meta["format"] = "pt"
    if any(m.alpha is not None for m in mods):
        config = {}
        for component in sorted({m.component for m in mods}):
            own = [m for m in mods if m.component == component]
            config.update({f"{component}.{k}": v for k, v in _peft_config(own).items()})
        meta[PEFT_METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    meta.update(metadata or {})
    write_bytes_atomic(p, serialize(tensors, meta))


def _kohya_prefix(component: str, family: str | None, components: set[str]) -> str:
    if component == "unet":
        return "lora_unet"
    if component == "transformer":
        return "lora_transformer"
    if component == "text_encoder":
        two = family in ("sdxl", "flux") or (family is None and "text_encoder_2" in components)
        return "lora_te1" if two else "lora_te"
    return "lora_te3" if family == "flux" else "lora_te2"


def _uses_bfl(m: ModuleDelta, family: str | None) -> bool:
    """FLUX transformer deltas are written with BFL names (lora_unet_double_blocks_...), the kohya FLUX layout."""
    return m.component == "transformer" and family in ("flux", None)


def kohya_name(m: ModuleDelta, family: str | None, components: set[str]) -> str:
    """The kohya module name of a delta, e.g. lora_unet_down_blocks_1_attentions_0_..._to_q.

    FLUX transformer deltas get their BFL name, which may be a fused layer holding several deltas
    (lora_unet_double_blocks_0_img_attn_qkv for attn.to_q, to_k and to_v).
    Raises UnknownKeysError when the name would not read back as the same path.
    """
    if _uses_bfl(m, family):
        target = names.path_to_bfl(m.path)
        if target is None:
            raise UnknownKeysError(f"{m.key}: module path has no BFL FLUX name", [m.key])
        return f"lora_unet_{target.name}"
    name = m.path.replace(".", "_")
    try:
        readable = names.underscore_to_path(name) == m.path
    except UnknownKeysError:
        readable = False
    if not readable:
        raise UnknownKeysError(f"{m.key}: module path cannot be written as a kohya name", [m.key])
    return f"{_kohya_prefix(m.component, family, components)}_{name}"


# diffusers drops the alphas of these BFL layers (it applies scale 1): their scale is folded into up instead.
_ALPHA_IGNORED = frozenset({"final_layer_adaLN_modulation_1", "final_layer_linear"})


def _bfl_layer(
    target: names.BflTarget, parts: Mapping[str, ModuleDelta], where: str
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(down, up, alpha) of one BFL layer from the deltas of its group members (by path; some may be missing).

    Fused layers get down = cat(down_i) and a block-diagonal up (zero rows for missing members), so that
    each member's delta is exact: one shared scale is kept as alpha = scale * total rank; different scales are
    folded into the up blocks with alpha = total rank. Output rows follow bfl_to_paths (incl. the final
    layer's shift/scale swap).
    """
    present = [(j, parts[p]) for j, p in enumerate(target.group) if p in parts]
    label = ", ".join(m.key for _, m in present)
    downs = [m.tensors["down"] for _, m in present]
    ups = [m.tensors["up"] for _, m in present]
    if any(d.ndim != 2 or u.ndim != 2 for d, u in zip(downs, ups, strict=True)):
        raise LoraFileError(
            f"{where}: {label}: {target.name} is a linear layer; the LoRA weights are not 2-D"
        )
    if len({int(d.shape[1]) for d in downs}) > 1:
        shapes = ", ".join(f"{m.key} {tuple(m.tensors['down'].shape)}" for _, m in present)
        raise LoraFileError(f"{where}: cannot fuse into {target.name}: input shapes differ ({shapes})")
    units = {int(u.shape[0]) / target.ratios[j] for (j, _), u in zip(present, ups, strict=True)}
    if len(units) != 1 or not (unit := units.pop()).is_integer():
        shapes = ", ".join(f"{m.key} {tuple(m.tensors['up'].shape)}" for _, m in present)
        raise LoraFileError(f"{where}: cannot fuse into {target.name}: output rows do not fit ({shapes})")
    rows = int(unit) * sum(target.ratios)
    total = sum(int(d.shape[0]) for d in downs)
    scales = [m.scale for _, m in present]
    if all(m.alpha is None for _, m in present):
        alpha, factors = None, [1.0] * len(present)
    elif len(present) == 1 and target.name not in _ALPHA_IGNORED:
        alpha, factors = float(present[0][1].alpha), [1.0]
    elif len(set(scales)) == 1 and target.name not in _ALPHA_IGNORED:
        first = present[0][1]
        alpha, factors = _alpha(first) * total / first.rank, [1.0] * len(present)
    else:
        alpha, factors = float(total), scales
    dtype = downs[0].dtype
    for t in (*downs, *ups):
        dtype = torch.promote_types(dtype, t.dtype)
    down = torch.cat([d.to(dtype) for d in downs], dim=0)
    up = torch.zeros(rows, total, dtype=dtype)
    pieces = dict(names.bfl_to_paths(target.name, rows))
    col = 0
    for (j, _), u, f in zip(present, ups, factors, strict=True):
        u = (u.float() * f).to(dtype) if f != 1.0 else u.to(dtype)
        r, row = int(u.shape[1]), 0
        for s in pieces[target.group[j]]:
            n = len(range(*s.indices(rows)))
            up[s, col : col + r] = u[row : row + n]
            row += n
        col += r
    return down.contiguous(), up, alpha


def _other_name(m: ModuleDelta, family: str | None, components: set[str], p: Path) -> str:
    """The kohya name of a non-LoRA delta; FLUX layers that BFL fuses or reorders cannot hold one."""
    target = names.path_to_bfl(m.path) if _uses_bfl(m, family) else None
    if target is not None and not target.whole_rows:
        why = f"fuses {', '.join(target.group)}" if target.fused else "reorders its output rows"
        raise LoraFileError(
            f"{p}: {m.key} is {m.kind}: the FLUX layer {target.name} {why}, which only plain LoRA can "
            f"express losslessly"
        )
    return kohya_name(m, family, components)


def _kohya_tensors(
    lora: LoraFile, mods: list[ModuleDelta], p: Path
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, ModuleDelta]]:
    """(tensors by key, kind by kohya module name, the "tensor" deltas by kohya module name)."""
    components = {m.component for m in mods}
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    cores: dict[str, ModuleDelta] = {}

    def put(
        name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None, mid: torch.Tensor | None = None
    ) -> None:
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        if mid is not None:  # LoCon Tucker core
            tensors[f"{name}.lora_mid.weight"] = mid
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)

    bfl: dict[str, tuple[names.BflTarget, dict[str, ModuleDelta]]] = {}
    unnamed: list[str] = []
    for m in mods:
        if m.kind != "lora":
            name = _other_name(m, lora.family, components, p)
            tensors.update({f"{name}.{k}": t for k, t in kohya_keys(m, f"{p}: {m.key} is {m.kind}").items()})
            kinds[name] = m.kind
            if m.kind == "tensor":
                cores[name] = m
        elif not _uses_bfl(m, lora.family):
            name = kohya_name(m, lora.family, components)
            put(name, m.tensors["down"], m.tensors["up"], m.alpha, m.tensors.get("mid"))
            kinds[name] = "lora"
        elif (target := names.path_to_bfl(m.path)) is None:
            unnamed.append(m.key)
        else:
            bfl.setdefault(target.name, (target, {}))[1][m.path] = m
    if unnamed:
        more = f" (and {len(unnamed) - 10} more)" if len(unnamed) > 10 else ""
        raise UnknownKeysError(
            f"{p}: {len(unnamed)} FLUX modules have no BFL name: {', '.join(unnamed[:10])}{more}", unnamed
        )
    for name, (target, parts) in bfl.items():
        put(f"lora_unet_{name}", *_bfl_layer(target, parts, str(p)))
        kinds[f"lora_unet_{name}"] = "lora"
    return tensors, kinds, cores


def write_kohya(
    lora: LoraFile,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    title: str | None = None,
    trigger_words: list[str] | None = None,
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    date: datetime | None = None,
) -> None:
    """Write kohya keys (`<prefix>_<name>.lora_down.weight` / `.lora_up.weight` / `.alpha`) with ss_* and
    ModelSpec metadata; other adapter kinds under the same module names with their own suffixes.

    Names are diffusers paths with "_" for ".": the UNet as `lora_unet_down_blocks_...` (not SGM names). FLUX
    (family "flux", or None, component "transformer") is written in the BFL layout that sd-scripts, ComfyUI,
    Forge and diffusers all read: `lora_unet_double_blocks_{i}_img_attn_qkv` / `_img_attn_proj` / `_img_mlp_0`
    / ..., `lora_unet_single_blocks_{i}_linear1` / `_linear2` / `_modulation_lin`, and `img_in`, `txt_in`,
    `time_in_*`, `vector_in_*`, `guidance_in_*`, `final_layer_linear`, `final_layer_adaLN_modulation_1`
    (shift/scale rows swapped). Fused layers (qkv: q, k, v; linear1: q, k, v, proj_mlp) get down = cat(down_i)
    and a block-diagonal up, zero rows for a member the LoRA does not adapt; alpha = shared scale * total rank,
    or, when the members' scales differ, each scale folded into its up block and alpha = total rank. The
    final_layer scales are always folded (diffusers ignores their alphas). read_lora splits such layers back
    into the original deltas at the original ranks (see readers). `lora_transformer_` (OneTrainer) names are
    read but no longer written. Text encoders: `lora_te_` (sd15), `lora_te1_` / `lora_te2_` (sdxl),
    `lora_te1_` / `lora_te3_` (flux CLIP / T5, as sd-scripts). Alpha is a float32 scalar; a module
    without alpha gets no `.alpha` key. `modelspec.hash_sha256` is "0x" + the SHA-256 of the tensor bytes.
    `title` (default: the file stem) and `trigger_words` (default: the LoRA's own) as in write_diffusers.

    Other kinds (one per module; a file may mix them), see composer.formats.kinds: "kron" as LyCORIS LoKr
    (`lokr_w1` = A, `lokr_w2` = B, `alpha`), which every UI reads; "lokr" / "loha" with their LyCORIS tensors;
    "dora" as LyCORIS's LoCon with `dora_scale`; a LoCon Tucker core as `lora_mid.weight`;
    "tensor" as `tr_t.<k>` / `tr_d.<k>` cores, our own layout that community tools do not read. Metadata:
    `lora_studio.adapter_type` (the kind, or "mixed"), `ss_network_module` ("networks.lora", "lycoris.kohya"
    with `ss_network_args` {"algo": ...} for kron/lokr/loha, or "composer.adapters.tensor"),
    `lora_studio.kron_modules` in a mixed file, `lora_studio.tensor_modes` (core shapes). ss_network_dim /
    ss_network_alpha come from the plain LoRA modules (kept from the source when there are none).
    On FLUX, non-LoRA kinds go under BFL names only where BFL neither fuses nor reorders the layer.

    Raises:
        LoraFileError: members of a fused FLUX layer whose shapes do not fuse; a non-LoRA delta on a fused or
            reordered FLUX layer; a Kronecker A larger than B (LoKr cannot hold it); tensors a kind does not
            hold; tensor cores not numbered 0, 1, ...
        UnknownKeysError: a module path has no kohya name that reads back (FLUX: no BFL name; all are named).
    """
    p = Path(path)
    mods = _modules(lora, p)
    tensors, kinds, cores = _kohya_tensors(lora, mods, p)
    meta = kohya_metadata(_base_metadata(lora, title, trigger_words), kinds, cores)
    if loras := [m for m in mods if lora_like(m.kind)]:
        meta["ss_network_dim"] = str(_most_common([m.rank for m in loras]))
        meta["ss_network_alpha"] = str(_num(_most_common([_alpha(m) for m in loras])))
    meta.update(
        {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.implementation": "diffusers",
            "modelspec.title": meta.get("modelspec.title") or p.stem,
            "modelspec.date": (date or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    if lora.family in BASE_MODEL_VERSION:
        meta["ss_base_model_version"] = BASE_MODEL_VERSION[lora.family]
        meta["modelspec.architecture"] = ARCHITECTURE[lora.family]
    if tag_frequency is not None:
        meta["ss_tag_frequency"] = json.dumps(tag_frequency)
    meta.update(metadata or {})
    tensor_hash = tensor_bytes_sha256(serialize(tensors))  # tensor bytes do not depend on the metadata
    meta["sshs_model_hash"] = tensor_hash
    meta["modelspec.hash_sha256"] = f"0x{tensor_hash}"
    write_bytes_atomic(p, serialize(tensors, meta))
