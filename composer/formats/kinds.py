"""Key suffixes of the adapter kinds beyond plain LoRA in kohya-named files, both directions.

One kind per module; a file may mix kinds. What write_kohya writes after `<prefix>_<name>.`:

- "kron" (DiffuseKronA): LyCORIS LoKr keys `lokr_w1` = A (small factor), `lokr_w2` = B (large), `alpha` (a
  placeholder: full factors mean scale 1), so every LoKr reader (LyCORIS, ComfyUI, A1111, Forge) applies it.
  Metadata says which LoKr modules were Kronecker adapters, so read_lora gives kind "kron" back.
- "lokr", "loha": the LyCORIS tensors as they are, and `alpha`.
- "dora": LyCORIS's LoCon with weight decomposition: `lora_down.weight`, `lora_up.weight` (`lora_mid.weight`
  with a Tucker core), `dora_scale`, `alpha` (read by LyCORIS, ComfyUI, A1111, Forge and diffusers).
- "tensor" (TLoRA): `tr_t.<k>` (transform cores (I_k, J_k, R_t, R_t)) and `tr_d.<k>` (residual cores
  (O_k, J_k, R, R)), k = 0, 1, ...; the core shapes (the tensorisation) go to metadata. This is our own
  layout: community tools do not read it.

Metadata: `lora_studio.adapter_type` (the kind, or "mixed"), `lora_studio.kron_modules` (JSON list of module
names holding a Kronecker adapter, in a mixed file), `lora_studio.tensor_modes` (JSON {module name: {"tr_t":
[shapes], "tr_d": [shapes]}}), and kohya's `ss_network_module` / `ss_network_args` as LyCORIS writes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import torch

from composer.adapters.functional import TENSOR_CORES, lokr_kron_factors
from composer.errors import LoraFileError
from composer.formats.model import ModuleDelta

ADAPTER_TYPE_KEY = "lora_studio.adapter_type"
KRON_MODULES_KEY = "lora_studio.kron_modules"
TENSOR_MODES_KEY = "lora_studio.tensor_modes"
KIND_KEYS = (ADAPTER_TYPE_KEY, KRON_MODULES_KEY, TENSOR_MODES_KEY)  # describe one written file only


# --- the adapter types' own tables (composer.adapters.registry), read at call time --------------------
def _types() -> list:
    from composer.adapters.registry import ADAPTER_TYPES  # at call time: the registry imports formats

    return ADAPTER_TYPES


def _file_types() -> list:
    """The types whose kind appears in files (B-LoRA is saved as "lora")."""
    return [t for t in _types() if t.file_kind == t.kind]


def file_roles() -> set[str]:
    """Every fixed key suffix an adapter type writes and recognises (tr_t.<k> / tr_d.<k> apart)."""
    return {r for t in _file_types() for r in t.file_roles}


def lycoris_algo(kind: str) -> str | None:
    """The LyCORIS algorithm that holds a kind in kohya files (ss_network_args), or None."""
    return next((t.lycoris_algo for t in _file_types() if t.kind == kind), None)


def module_rank(m: ModuleDelta) -> int | None:
    """A module's rank: LoRA's (and LoCon's) down rows, or what its type's `file_rank` reads of its tensors
    (DoRA, LoHa, low-rank LoKr); None for a kind without one (Kronecker, full LoKr, TLoRA)."""
    if m.kind == "lora":
        return m.rank
    file_rank = next((getattr(t, "file_rank", None) for t in _file_types() if t.kind == m.kind), None)
    return None if file_rank is None else file_rank(m.tensors)


# --- reading ----------------------------------------------------------------------------------------
def role_kind(role: str) -> str | None:
    """The kind a module role belongs to ("down"/"up": lora); None for alpha."""
    return next((t.kind for t in _file_types() if t.reads_role(role)), None)


def module_kind(kinds: set[str]) -> set[str]:
    """The kinds of one module's roles, a type that extends another taking its roles: LoRA's down / up
    beside DoRA's magnitude make a DoRA."""
    for t in _file_types():
        if t.kind in kinds and getattr(t, "extends", None) in kinds:
            kinds = kinds - {t.extends}
    return kinds


def lora_like(kind: str) -> bool:
    """LoRA, or a kind that extends it (DoRA): the module holds LoRA's down / up (and mid)."""
    return kind == "lora" or any(t.kind == kind and getattr(t, "extends", None) == "lora" for t in _types())


def kron_declared(metadata: Mapping[str, str], source: str) -> Callable[[str], bool]:
    """Which module names (kohya names, or dotted paths) the file says hold a Kronecker adapter as LoKr."""
    if metadata.get(ADAPTER_TYPE_KEY) == "kron":
        return lambda name: True
    raw = metadata.get(KRON_MODULES_KEY)
    if not raw:
        return lambda name: False
    try:
        listed = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraFileError(f"{source}: {KRON_MODULES_KEY} is not valid JSON ({e})") from e
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise LoraFileError(f"{source}: {KRON_MODULES_KEY} is not a JSON list of module names")
    return frozenset(listed).__contains__


def as_kron(d: ModuleDelta) -> ModuleDelta:
    """A LoKr delta that is a textbook Kronecker product (full lokr_w1, lokr_w2) as kind "kron"; else d."""
    factors = lokr_kron_factors(d.tensors) if d.kind == "lokr" else None
    if factors is None:
        return d
    a, b = factors  # (a1, a2), (d_out / a1, d_in / a2)
    return ModuleDelta(d.component, d.path, "kron", {"kron_a": a, "kron_b": b})


# --- writing ----------------------------------------------------------------------------------------
def kohya_keys(m: ModuleDelta, where: str) -> dict[str, torch.Tensor]:
    """Key suffix -> tensor of one non-LoRA module, alpha included (a float32 scalar).

    Raises:
        LoraFileError: an unknown kind, tensors the kind does not hold, a Kronecker A larger than B (LoKr
            cannot hold it), tensor cores not numbered 0, 1, ...
    """
    own = {t.kind: t for t in _file_types() if t.kind != "lora"}
    if m.kind not in own:
        raise LoraFileError(
            f"{where}: adapter kind {m.kind!r} has no kohya layout (known: lora, {', '.join(own)})"
        )
    return own[m.kind].kohya_keys(m, where)


def _network_module(present: set[str], algos: set[str]) -> str:
    """kohya's ss_network_module: LyCORIS when a LyCORIS algorithm holds a module, else the one non-LoRA
    kind's module (TLoRA: composer.adapters.tensor), else networks.lora."""
    if algos:
        return "lycoris.kohya"
    modules = {t.kind: t.network_module for t in _file_types()}
    others = sorted(modules[k] for k in present if k in modules and k != "lora")
    return others[0] if others else modules["lora"]


def _core_shapes(m: ModuleDelta) -> dict[str, list[list[int]]]:
    def index(name: str) -> int:
        return int(name.rsplit(".", 1)[1])

    return {
        family: [list(m.tensors[n].shape) for n in sorted(m.tensors, key=index) if n.startswith(f"{family}.")]
        for family in TENSOR_CORES
    }


def kohya_metadata(
    source: Mapping[str, str], kinds: Mapping[str, str], tensors: Mapping[str, ModuleDelta]
) -> dict[str, str]:
    """The source metadata with the keys that name the file's adapter kinds set (or dropped when stale).

    Args:
        source: metadata carried over from the source file (without our KIND_KEYS).
        kinds: kind by kohya module name, for every module of the file.
        tensors: the "tensor" deltas by kohya module name.
    """
    meta = dict(source)
    present = set(kinds.values())
    meta[ADAPTER_TYPE_KEY] = next(iter(present)) if len(present) == 1 else "mixed"
    algos = {a for k in present if (a := lycoris_algo(k)) is not None}
    meta["ss_network_module"] = _network_module(present, algos)
    args = meta.pop("ss_network_args", None)
    try:
        kept = json.loads(args) if args else None
    except json.JSONDecodeError:
        kept = None
    algo = algos.pop() if len(algos) == 1 else None
    if algo is not None:
        keep = isinstance(kept, dict) and kept.get("algo") == algo
        meta["ss_network_args"] = args if keep else json.dumps({"algo": algo})
    elif args and not (isinstance(kept, dict) and "algo" in kept):
        meta["ss_network_args"] = args  # a plain network's arguments; a LyCORIS algo would be stale
    if "kron" in present and meta[ADAPTER_TYPE_KEY] == "mixed":
        meta[KRON_MODULES_KEY] = json.dumps(sorted(n for n, k in kinds.items() if k == "kron"))
    if tensors:
        meta[TENSOR_MODES_KEY] = json.dumps({n: _core_shapes(m) for n, m in sorted(tensors.items())})
    return meta
