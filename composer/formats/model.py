"""The in-memory form of a LoRA file, independent of the key convention it was stored in."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FAMILIES = ("sd15", "sdxl", "flux")
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class FileHashes:
    """Identity of a file: full-file SHA-256, its AutoV2 prefix, and a tensor-only hash that survives metadata edits."""

    sha256: str
    autov2: str  # first 10 hex of sha256 (Civitai)
    tensor_sha256: str  # SHA-256 of the bytes after the header (kohya's sshs_model_hash)


@dataclass
class ModuleDelta:
    """The adapter weights of one adapted module.

    kind "lora": tensors["down"] (r, in) or (r, in, kh, kw); tensors["up"] (out, r) or (out, r, 1, 1);
    effective delta = (alpha / r) * up @ down, alpha None meaning alpha = r (scale 1). A LoCon Tucker module
    adds tensors["mid"] (r, r, kh, kw), with down (r, in, 1, 1).
    kind "dora": the "lora" tensors (mid included) plus tensors["magnitude"], LyCORIS's dora_scale layout:
    (out, 1[, 1, 1]) for a norm per output row (peft, LyCORIS wd_on_out) or (1, in[, 1, 1]) per input column.
    kind "kron": tensors["kron_a"] (a1, a2), ["kron_b"] (d_out / a1, d_in / a2); delta = kron(a, b), no alpha.
    kind "tensor": cores "tr_t.<k>" (I_k, J_k, R_t, R_t) and "tr_d.<k>" (O_k, J_k, R, R), k = 0, 1, ...; no alpha.
    LyCORIS kinds ("lokr", "loha") keep their own tensor names (lokr_w1, hada_w1_a, ...).
    """

    component: str  # one of COMPONENTS
    path: str  # diffusers module path inside the component, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None

    @property
    def key(self) -> str:
        return f"{self.component}.{self.path}"

    @property
    def rank(self) -> int:
        if self.kind in ("lora", "dora"):
            return int(self.tensors["down"].shape[0])
        raise NotImplementedError(f"rank of a {self.kind} delta")

    @property
    def scale(self) -> float:
        """alpha / rank for LoRA and DoRA (1.0 when alpha is absent)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank


@dataclass
class LoraFile:
    """A parsed LoRA file: its deltas in canonical diffusers names, and what the file says about itself."""

    modules: dict[str, ModuleDelta]  # by ModuleDelta.key
    source_format: str  # "diffusers" | "peft" | "kohya" | "lycoris"
    family: str | None  # one of FAMILIES, or None when it cannot be told
    metadata: dict[str, str] = field(default_factory=dict)
    hashes: FileHashes | None = None
    path: str | None = None
    trigger_words: list[str] = field(default_factory=list)

    @property
    def network_kinds(self) -> set[str]:
        return {m.kind for m in self.modules.values()}

    @property
    def rank(self) -> int | None:
        """The most common rank in the file (LoRA, LoCon, LoHa, low-rank LoKr: formats.kinds.module_rank);
        None when no module has one."""
        from composer.formats.kinds import module_rank  # kinds reads the adapter registry, which imports us

        ranks = [r for m in self.modules.values() if (r := module_rank(m)) is not None]
        return max(set(ranks), key=ranks.count) if ranks else None

    @property
    def components(self) -> set[str]:
        return {m.component for m in self.modules.values()}
