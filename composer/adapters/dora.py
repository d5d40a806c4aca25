"""DoRA (Liu et al., ICML 2024): weight-decomposed LoRA, as peft, diffusers and LyCORIS store it.

W' = m * V / ||V||, V = W + (alpha / r) * up @ down: the LoRA moves the direction of each weight row (or
column), the trained magnitude m sets its length. The norm runs per output row in peft
(`lora_magnitude_vector`, (out,) on a Linear, (1, out, 1, 1) on a Conv2d) and in LyCORIS with `wd_on_out`
(its default; `dora_scale` (out, 1[, 1, 1])), and per input column in LyCORIS without it (`dora_scale`
(1, in[, 1, 1])). Files are read into that LyCORIS layout (ModuleDelta kind "dora", tensor "magnitude"), so
the axis is the one whose size the magnitude has (ComfyUI's rule: its first dimension equals the layer's
output size -> per output row).

At weight w the layer becomes W + w * (W' - W), as A1111, Forge and ComfyUI apply a DoRA at a strength:
equal to peft and LyCORIS at w = 1, and additive like every other type, so DoRA mixes, switches and fuses
with them. W is the base weight as it stands when the adapter runs (another adapter fused below it is
part of W, as in LyCORIS and ComfyUI, which normalise the merged weight). The small epsilon LyCORIS adds
to the norm is added here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from composer.adapters.base import Recipe, TrainSpec, all_targets, conv_args, count_parameters, no_metadata
from composer.adapters.lora import LoraAdapter
from composer.errors import AdapterError, LoraFileError

if TYPE_CHECKING:
    from composer.formats.model import ModuleDelta


def dora_rank(tensors: Mapping[str, torch.Tensor]) -> int:
    return int(tensors["down"].shape[0])


def _missing(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first of down, up and magnitude a DoRA module lacks, or None."""
    return next((n for n in ("down", "up", "magnitude") if n not in tensors), None)


class DoraAdapter(nn.Module):
    """A DoRA on a Linear or Conv2d: a LoRA (LoCon Tucker core allowed) and a magnitude per row or column."""

    kind = "dora"
    file_kind = "dora"
    extends = "lora"  # a module holding LoRA's down / up plus a magnitude is a DoRA
    title = "DoRA"
    recipe: Recipe | None = None  # applied from files; the studio does not train it
    lycoris_algo = "locon"  # LyCORIS holds it as LoCon with dora_wd
    network_module = "lycoris.kohya"
    file_roles = ("magnitude",)
    select_targets = staticmethod(all_targets)
    file_metadata = staticmethod(no_metadata)
    file_rank = staticmethod(dora_rank)
    reads_base_output = True  # forward_delta takes the layer's own output (composer.adapters.layer)

    def __init__(self, base: nn.Module, lora: LoraAdapter, magnitude: torch.Tensor):
        super().__init__()
        self._conv = conv_args(base, self.title)
        self.lora = lora
        shape = tuple(base.weight.shape)  # (out, in[, kh, kw])
        ones = (1,) * (len(shape) - 2)
        m = magnitude.detach()
        if m.numel() == shape[0] and m.shape[0] == shape[0]:
            self.on_out, canonical = True, (shape[0], 1, *ones)
        elif m.numel() == shape[1] and m.ndim >= 2 and m.shape[1] == shape[1]:
            self.on_out, canonical = False, (1, shape[1], *ones)
        else:
            raise AdapterError(
                f"DoRA magnitude {tuple(m.shape)} fits neither the layer's {shape[0]} output rows nor its "
                f"{shape[1]} input columns (weight {shape})"
            )
        self.magnitude = nn.Parameter(m.reshape(canonical).to(base.weight), requires_grad=False)
        self._base = [base]  # W is read at call time; a plain list keeps it out of this module's state
        self._gain: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_delta(cls, base: nn.Module, delta: ModuleDelta) -> DoraAdapter:
        t = delta.tensors
        if missing := _missing(t):
            raise AdapterError(f"DoRA delta needs down, up and magnitude (missing: {missing})")
        lora = LoraAdapter(base, t["down"], t["up"], delta.alpha, mid=t.get("mid"))
        return cls(base, lora, t["magnitude"])

    @classmethod
    def create_for(cls, base: nn.Module, config: TrainSpec, generator: torch.Generator) -> DoraAdapter:
        raise AdapterError("DoRA is applied from files, not trained here")

    @classmethod
    def reads_role(cls, role: str) -> bool:
        return role in cls.file_roles

    @classmethod
    def kohya_keys(cls, delta: ModuleDelta, where: str) -> dict[str, torch.Tensor]:
        """LyCORIS's LoCon-with-DoRA keys: lora_down / lora_up (/ lora_mid), dora_scale, alpha."""
        t = delta.tensors
        if missing := _missing(t):
            raise LoraFileError(f"{where}: a DoRA module needs down, up and magnitude (missing {missing})")
        keys = {"lora_down.weight": t["down"], "lora_up.weight": t["up"], "dora_scale": t["magnitude"]}
        if "mid" in t:
            keys["lora_mid.weight"] = t["mid"]
        rank = int(t["down"].shape[0])
        alpha = float(rank if delta.alpha is None else delta.alpha)
        keys["alpha"] = torch.tensor(alpha, dtype=torch.float32)
        return keys

    @property
    def alpha(self) -> float:
        return self.lora.alpha

    @property
    def rank(self) -> int:
        return self.lora.rank

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.lora.tensors(), "magnitude": self.magnitude.detach().clone()}

    def parameter_count(self) -> int:
        return count_parameters(self)

    # --- the decomposition ----------------------------------------------------------------------------
    def _norm(self, v: torch.Tensor) -> torch.Tensor:
        """||V|| per output row (shape (out, 1[, 1, 1])) or per input column ((1, in[, 1, 1]))."""
        dims = tuple(d for d in range(v.ndim) if d != (0 if self.on_out else 1))
        return torch.linalg.vector_norm(v, dim=dims, keepdim=True) + torch.finfo(v.dtype).eps

    def gain(self) -> torch.Tensor:
        """m / ||W + dW|| in float32, cached until the base weight or the adapter's tensors change."""
        w = self._base[0].weight
        key = (
            w._version, w.data_ptr(), self.magnitude._version, self.lora.down._version, self.lora.up._version,
            torch.is_inference_mode_enabled(),
        )  # fmt: skip
        if self._gain is not None and self._gain[0] == key:
            return self._gain[1]
        with torch.no_grad():
            v = w.float() + self.lora.delta_weight().float()
            gain = self.magnitude.float() / self._norm(v)
        self._gain = (key, gain)
        return gain

    def delta_weight(self) -> torch.Tensor:
        weight = self._base[0].weight
        w = weight.float()
        return ((w + self.lora.delta_weight().float()) * self.gain() - w).to(weight.dtype)

    def _linear_map(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """W x without the bias: the layer's own map."""
        return F.linear(x, w) if self._conv is None else F.conv2d(x, w, **self._conv)

    def forward_delta(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """W'x - Wx without the dense W': per output row g * (Wx + dW x) - Wx, Wx read off the layer's own
        output `base_out` (its bias taken off) when given; per input column (W + dW)(g * x) - Wx (scaling
        input column j of a weight scales input channel j)."""
        base = self._base[0]
        w = base.weight.to(x.dtype)
        shape = (-1,) if self._conv is None else (1, -1, 1, 1)  # over the output / input channels
        g = self.gain().to(x.dtype).view(shape)
        if base_out is None:
            wx = self._linear_map(x, w)
        else:
            wx = (
                base_out.to(x.dtype)
                if base.bias is None
                else base_out.to(x.dtype) - base.bias.to(x.dtype).view(shape)
            )
        if self.on_out:
            return (g - 1) * wx + g * self.lora.forward_delta(x)
        xs = x * g
        return self._linear_map(xs, w) + self.lora.forward_delta(xs) - wx
