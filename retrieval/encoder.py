"""AutoLoRA's weight encoder: one embedding per LoRA from what its weights do, not from how they are stored.

For every adapted module the encoder pushes a set of learned probe vectors through the module's dense change
dW (the adapter's `delta_weight`, scale included). Only the product dW reaches the encoder, so refactoring the
factors (A -> M A, B -> B M^-1), another alpha / rank convention that leaves dW equal, or another file format
(kohya, diffusers, peft, LyCORIS: the reader's job) cannot change the embedding, and every adapter type with
a dense delta (LoRA, LoCon, LoHa, LoKr, Kronecker, DoRA, TLoRA, B-LoRA halves) is encoded the same way.

Per module: Y = dW P (P: probes, one set per input width), scaled to unit RMS over the whole module (so a
LoRA's strength does not move it, and how strongly each probe direction is read survives), projected to a
shared width by a projection per module type (its component and shape). Each probe's projection z_p is summed
up two ways: its mean over probes, and its root mean square, which does not change when the delta's sign in some
direction flips (a rank-1 change v a^T reads its probes with signs that depend on a only). A third number, the
module's log norm against the LoRA's mean log norm, says where the LoRA acts most (invariant to its global
strength). Plus a learned embedding of the module's place. A summary token and one transformer layer over the
modules present (a LoRA may adapt any subset; absent modules are simply not tokens) give the LoRA's
embedding, unit length.

Its weights come from contrastive training against text (`retrieval.train`); the invariances hold by
construction whatever the weights.
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
        self.moments = nn.Linear(2 * width, width)  # [mean, RMS] over probes -> the module's token
        self.energy = nn.Parameter(torch.zeros(width))  # times the module's relative log norm
        self.summary = nn.Parameter(torch.zeros(1, 1, width))
        self.mixer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, width)

    def embed_batch(self, batch: list[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """(len(batch), width) unit-length embeddings of several LoRAs at once: each module key is computed
        for every LoRA that has it in one batched product, and the LoRAs' token sets (any subset of modules)
        are padded and masked for the transformer."""
        if not batch:
            raise ValueError("no LoRA to encode")
        for deltas in batch:
            unknown = sorted(set(deltas) - set(self.shapes))
            if unknown:
                raise KeyError(f"the encoder has no module {unknown[0]!r} ({len(unknown)} unknown)")
            if not deltas:
                raise ValueError("a LoRA with no module to encode")
        keys = sorted(set().union(*batch))
        n, width = len(batch), self.summary.shape[-1]
        tokens = self.summary.new_zeros(n, len(keys), width)
        energy = self.summary.new_zeros(n, len(keys))
        present = torch.zeros(n, len(keys), dtype=torch.bool)
        for slot, key in enumerate(keys):
            out, inp = self.shapes[key]
            rows = [b for b, deltas in enumerate(batch) if key in deltas]
            stacked = []
            for b in rows:
                delta = batch[b][key].reshape(batch[b][key].shape[0], -1)
                if tuple(delta.shape) != (out, inp):
                    raise ValueError(f"{key}: a delta of shape {tuple(delta.shape)}, expected {(out, inp)}")
                stacked.append(delta)
            deltas = torch.stack(stacked).to(self.summary)  # (R, out, in)
            response = (deltas @ self.probes[str(inp)]).transpose(1, 2)  # (R, probes, out)
            rms = response.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-30)
            z = self.projections[self.type_of[key]](response / rms)  # (R, probes, width)
            summary = torch.cat([z.mean(dim=1), z.pow(2).mean(dim=1).add(1e-12).sqrt()], dim=-1)
            index = torch.tensor(rows)
            tokens = tokens.index_put(
                (index, torch.full_like(index, slot)),
                self.moments(summary) + self.places.weight[self.index[key]],
            )
            strength = torch.log(deltas.pow(2).mean(dim=(1, 2)).sqrt().clamp_min(1e-30))
            energy = energy.index_put((index, torch.full_like(index, slot)), strength)
            present[index, slot] = True
        mask = present.to(energy)
        mean = (energy * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True)
        relative = ((energy - mean).clamp(-10, 10) * mask)[..., None]
        tokens = tokens + relative * self.energy
        sequence = torch.cat([self.summary.expand(n, 1, width), tokens], dim=1)
        padding = torch.cat([torch.zeros(n, 1, dtype=torch.bool), ~present], dim=1)
        mixed = self.mixer(sequence, src_key_padding_mask=padding)
        return F.normalize(self.head(mixed[:, 0]), dim=-1)

    def forward(self, deltas: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The LoRA's embedding, (width,), unit length."""
        return self.embed_batch([deltas])[0]


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
