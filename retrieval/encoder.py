"""AutoLoRA's weight encoder: one embedding per LoRA from what its weights do, not from how they are stored.

For every adapted module the encoder pushes a set of learned probe vectors through the module's dense change
dW (the adapter's `delta_weight`, scale included). Only the product dW reaches the encoder, so refactoring the
factors (A -> M A, B -> B M^-1), another alpha / rank convention that leaves dW equal, or another file format
(kohya, diffusers, peft, LyCORIS: the reader's job) cannot change the embedding, and every adapter type with
a dense delta (LoRA, LoCon, LoHa, LoKr, Kronecker, DoRA, TLoRA, B-LoRA halves) is encoded the same way.

Per module: Y = dW P (P: probes, one set per input width), each probe's output normalised (LayerNorm, so a
LoRA's strength does not move it), projected to a shared width by a projection per module type (its
component and shape), averaged over probes, plus a learned embedding of the module's place. A summary token
and one transformer layer over the modules present (a LoRA may adapt any subset; absent modules are simply
not tokens) give the LoRA's embedding, unit length.

The encoder is untrained here: its invariances hold by construction whatever its weights; what it retrieves
depends on the contrastive training (issue 21, to come).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

PROBES = 16
WIDTH = 128


def module_type(key: str, shape: tuple[int, int]) -> str:
    """A module's type for the per-type projections: its component and (out, in) shape."""
    return f"{key.partition('.')[0]}:{shape[0]}x{shape[1]}"


class WeightEncoder(nn.Module):
    """Embeds a LoRA given as {module key: dense delta}; built for a model's adaptable modules.

    Args:
        shapes: "component.path" -> (out, in) of every module a LoRA may adapt (a convolution's `in` is
            in_channels x kh x kw).
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        probes: int = PROBES,
        width: int = WIDTH,
        heads: int = 4,
        seed: int = 0,
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.shapes = {key: (int(out), int(inp)) for key, (out, inp) in shapes.items()}
        self.keys = sorted(self.shapes)
        self.index = {key: i for i, key in enumerate(self.keys)}
        inputs = sorted({inp for _, inp in self.shapes.values()})
        self.probes = nn.ParameterDict(
            {str(n): nn.Parameter(torch.randn(n, probes, generator=generator) / n**0.5) for n in inputs}
        )
        self.type_of = {key: _safe(module_type(key, shape)) for key, shape in self.shapes.items()}
        outs = {self.type_of[key]: out for key, (out, _) in self.shapes.items()}
        self.projections = nn.ModuleDict({t: nn.Linear(out, width) for t, out in sorted(outs.items())})
        self.places = nn.Embedding(len(self.keys), width)
        self.summary = nn.Parameter(torch.zeros(1, 1, width))
        self.mixer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, width)

    def module_tokens(self, deltas: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(modules present, width): one token per adapted module the encoder knows."""
        unknown = sorted(set(deltas) - set(self.shapes))
        if unknown:
            raise KeyError(f"the encoder has no module {unknown[0]!r} ({len(unknown)} unknown)")
        tokens = []
        for key in sorted(deltas):
            out, inp = self.shapes[key]
            delta = deltas[key].reshape(deltas[key].shape[0], -1).to(self.summary)
            if tuple(delta.shape) != (out, inp):
                raise ValueError(f"{key}: a delta of shape {tuple(delta.shape)}, expected {(out, inp)}")
            response = (delta @ self.probes[str(inp)]).T  # (probes, out)
            # each probe's output to unit scale first: deltas are ~1e-3, below LayerNorm's eps
            response = response / response.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
            response = F.layer_norm(response, (out,), eps=1e-12)
            token = self.projections[self.type_of[key]](response).mean(dim=0)
            tokens.append(token + self.places.weight[self.index[key]])
        if not tokens:
            raise ValueError("a LoRA with no module to encode")
        return torch.stack(tokens)

    def forward(self, deltas: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The LoRA's embedding, (width,), unit length."""
        tokens = torch.cat([self.summary, self.module_tokens(deltas)[None]], dim=1)
        mixed = self.mixer(tokens)
        return F.normalize(self.head(mixed[0, 0]), dim=-1)


def _safe(name: str) -> str:
    return name.replace(".", "_")


def adapter_deltas(host, resident: str) -> dict[str, torch.Tensor]:
    """{module key: dense delta at scale 1, flattened to (out, in)} of an adapter resident on `host` (an
    `AdapterHost`): what the encoder reads, whatever the adapter's type or file."""
    out = {}
    with torch.no_grad():
        for key, adapter in host.adapter_modules(resident).items():
            delta = adapter.delta_weight().detach().float()
            out[key] = delta.reshape(delta.shape[0], -1)
    return out


def module_shapes(host, keys: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of the modules `keys` name ("component.path"), for building an encoder."""
    out = {}
    for key in keys:
        module = host.find(key)
        if module is None:
            raise KeyError(f"no module {key!r}")
        weight = module.weight
        out[key] = (int(weight.shape[0]), int(weight[0].numel()))
    return out
