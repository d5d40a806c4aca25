"""The wrapper put once around each adapted module: many resident adapters, mixed by a shared context."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from composer.adapters.base import MixingContext, active_rows, broadcast_scale, is_trainable
from composer.adapters.lora import LoraAdapter
from composer.adapters.spatial import SpatialScale
from composer.errors import AdapterError, AdapterRuntimeError

_STACK_CACHE_SIZE = 4  # resident stacked LoRA sets kept per layer (switching back and forth costs nothing)


def _param_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        return p.dtype
    return None


def _stacks(adapter: nn.Module) -> bool:
    """A plain LoRA (a Linear's, or a Conv2d's without a Tucker core): its downs and ups concatenate with
    others' into one pair of matmuls or convolutions."""
    return isinstance(adapter, LoraAdapter) and adapter.mid is None


_ROUTES: dict[tuple, tuple] = {}  # ids of a set's per-sample scales -> (the scales, which, weight)


def _route_rows(work: list, adapters: list, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(which LoRA, its weight) per row when every scale is per sample and no row has two LoRAs and the LoRAs
    share one rank (a batch whose images each have their own LoRA); None otherwise. Cached per scale tensors,
    which callers build once per call shape and reuse."""
    scales = [s for _, s in work]
    if not all(isinstance(s, torch.Tensor) and s.shape == (batch,) for s in scales):
        return None
    if len({a.rank for a in adapters}) != 1:
        return None
    key = tuple(id(s) for s in scales)
    cached = _ROUTES.get(key)
    if cached is None or any(a is not b for a, b in zip(cached[0], scales, strict=True)):
        table = torch.stack([s.float() for s in scales])  # (K, B)
        if bool(((table != 0).sum(dim=0) > 1).any()):
            route = None
        else:
            which = (table != 0).float().argmax(dim=0)  # a row with none: index 0 at weight 0
            route = (which, table.gather(0, which[None]).squeeze(0))
        if len(_ROUTES) > 256:
            _ROUTES.clear()
        cached = _ROUTES[key] = (tuple(scales), route)
    return cached[1]


def _weigh_columns(
    h: torch.Tensor, work: list, adapters: list, ranks: list[int], channels_first: bool
) -> torch.Tensor:
    """h's rank columns (the last axis; axis 1 for a convolution's) times each LoRA's scale: one (B, R)
    product when the scales are numbers or per sample, a product per LoRA when one is per region."""
    axis = 1 if channels_first else -1
    if any(isinstance(scale, SpatialScale) for _, scale in work):
        chunks = h.split(ranks, dim=axis)
        return torch.cat(
            [
                chunk * (broadcast_scale(scale, chunk) * adapter.scale)
                for chunk, (_, scale), adapter in zip(chunks, work, adapters, strict=True)
            ],
            dim=axis,
        )
    batch = h.shape[0]
    for _, scale in work:
        if isinstance(scale, torch.Tensor) and (scale.ndim != 1 or scale.shape[0] != batch):
            raise ValueError(f"per-sample scale has shape {tuple(scale.shape)}, batch is {batch}")
    cols = torch.cat(
        [
            (scale.to(h).view(-1, 1) if isinstance(scale, torch.Tensor) else h.new_full((1, 1), float(scale)))
            .mul(adapter.scale)
            .expand(batch, rank)
            for (_, scale), adapter, rank in zip(work, adapters, ranks, strict=True)
        ],
        dim=1,
    )  # (B, R)
    if channels_first:
        return h * cols.view(batch, -1, *([1] * (h.ndim - 2)))
    return h * cols.view(batch, *([1] * (h.ndim - 2)), -1)


class AdaptedModule(nn.Module):
    """Wraps a Linear or Conv2d: y = base(x) + sum_i s_i * delta_i(x) over the context's active adapters.

    The wrapper stands in for the module it wraps: `AdaptedModule(base, ...)` is an `AdaptedLinear` (an
    nn.Linear) or an `AdaptedConv2d` (an nn.Conv2d), so isinstance checks in diffusers and peft still hold,
    and every attribute of the original (in_features, kernel_size, stride, weight, bias, ...) reads through
    to it. Plain LoRAs are evaluated as one stacked pair of matmuls (convolutions on a Conv2d: all
    active downs concatenated, then all ups), which keeps k LoRAs close to the cost of one. Anything else runs adapter by
    adapter; an adapter that fails names itself and the module (`AdapterRuntimeError`).
    """

    def __new__(cls, *args, **kwargs):
        if cls is AdaptedModule and args:  # pick the subclass that is-a the wrapped module's kind
            base = args[0]
            cls = AdaptedConv2d if isinstance(base, nn.Conv2d) else AdaptedLinear
        return super().__new__(cls)

    def __init__(self, base: nn.Module, context: MixingContext, key: str = ""):
        nn.Module.__init__(self)  # not nn.Linear's / nn.Conv2d's: their state is `base`'s
        if not isinstance(base, (nn.Linear, nn.Conv2d)) or isinstance(base, AdaptedModule):
            raise AdapterError(f"cannot adapt a {type(base).__name__}; only Linear and Conv2d")
        self.base = base
        self.key = key  # "component.path", for messages
        self.adapters = nn.ModuleDict()
        self.context = context
        self._stacks: dict[tuple, tuple[torch.Tensor, torch.Tensor, list[int]]] = {}
        self._backup: torch.Tensor | None = None  # the exact base weight while something is fused
        self._residency = 0  # bumped when an adapter is added or removed here
        self._work_key: tuple[int, int] = (-1, -1)
        self._work: list[tuple[str, object]] = []
        self.slot_rank = 0  # > 0: fixed-shape slots for a compiled denoiser (`make_static`)

    # --- residency ----------------------------------------------------------------------------------
    def add(self, name: str, adapter: nn.Module) -> None:
        self.adapters[name] = adapter
        self._stacks.clear()
        self._residency += 1

    def remove(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
            self._stacks.clear()
            self._residency += 1

    def active_work(self) -> list[tuple[str, object]]:
        """(name, scale) of the context's effective adapters that live on this layer; computed once per
        switch (the context's version) and residency change, not per forward."""
        key = (self.context.version, self._residency)
        if self._work_key != key:
            self._work = [(n, s) for n, s in self.context.effective() if n in self.adapters]
            self._work_key = key
        return self._work

    # --- fusing -------------------------------------------------------------------------------------
    @torch.no_grad()
    def fuse(self, scales: dict[str, float]) -> None:
        """Fold adapters into the base weight; the exact original is kept for `unfuse`."""
        todo = {n: s for n, s in scales.items() if n in self.adapters}
        if not todo:
            return
        if self._backup is None:
            self._backup = self.base.weight.detach().clone()
        weight = self.base.weight
        # every delta first, then add: a delta that reads the base weight (TLoRA) sees the original
        deltas = [(self.adapters[n].delta_weight().to(weight), float(s)) for n, s in todo.items()]
        for delta, scale in deltas:
            weight.add_(delta, alpha=scale)

    @torch.no_grad()
    def unfuse(self) -> None:
        if self._backup is not None:
            self.base.weight.copy_(self._backup)
            self._backup = None

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.slot_rank:  # compiled denoiser: the same graph for every set (see `make_static`)
            return self.base(x, *args, **kwargs) + self._static_delta(x)
        y = base_out = self.base(x, *args, **kwargs)
        work = self.active_work()
        if not work:
            return y
        if self.context.combiner is not None:  # gated fusion: each adapter's output apart
            return self.context.combiner(self, y, self.outputs(x, base_out, work))
        stackable = all(_stacks(self.adapters[n]) for n, _ in work)  # one LoRA too (its own factors)
        if stackable and not (
            torch.is_grad_enabled() and any(is_trainable(self.adapters[n]) for n, _ in work)
        ):
            try:
                return y + self._stacked_delta(x, y, work)
            except Exception as exc:
                raise AdapterRuntimeError(tuple(n for n, _ in work), self.key, exc) from exc
        for name, scale in work:
            adapter = self.adapters[name]
            rows = active_rows(scale)  # a batch whose images have their own LoRAs: this one's rows only
            try:
                if rows is not None:
                    if len(rows):
                        delta = self._delta(adapter, x, base_out, rows).to(y.dtype)
                        y = y.index_add(0, rows, broadcast_scale(scale[rows], delta) * delta)
                    continue
                delta = self._delta(adapter, x, base_out).to(y.dtype)
                y = y + broadcast_scale(scale, delta) * delta
            except Exception as exc:
                raise AdapterRuntimeError((name,), self.key, exc) from exc
        return y

    def outputs(
        self, x: torch.Tensor, base_out: torch.Tensor, work: list[tuple[str, object]]
    ) -> list[tuple[str, torch.Tensor]]:
        """Each active adapter's scaled output change apart, (name, s_i * delta_i(x)), as a combiner takes
        them: any adapter type, every row (a per-sample scale of 0 gives zeros there)."""
        out = []
        for name, scale in work:
            try:
                delta = self._delta(self.adapters[name], x, base_out).to(base_out.dtype)
                out.append((name, broadcast_scale(scale, delta) * delta))
            except Exception as exc:
                raise AdapterRuntimeError((name,), self.key, exc) from exc
        return out

    @staticmethod
    def _delta(adapter, x: torch.Tensor, base_out: torch.Tensor, rows: torch.Tensor | None = None):
        """The adapter's delta on the batch, or on its `rows` only."""
        dtype = _param_dtype(adapter)  # fp32 trainable adapters on an fp16 model compute in fp32
        inputs = x if dtype in (None, x.dtype) else x.to(dtype)
        if getattr(adapter, "reads_base_output", False):  # DoRA: reuses W x instead of recomputing it
            if rows is not None:
                return adapter.forward_delta(inputs[rows], base_out=base_out[rows])
            return adapter.forward_delta(inputs, base_out=base_out)
        return adapter.forward_delta(inputs if rows is None else inputs[rows])

    def _static_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The slots' contribution: the same two ops whatever the set (zeros when nothing is active)."""
        down, up = self.slot_down, self.slot_up
        if self._conv_args is None:
            return F.linear(F.linear(x, down), up)
        return F.conv2d(F.conv2d(x, down, **self._conv_args), up)

    def _stacked_delta(
        self, x: torch.Tensor, y: torch.Tensor, work: list[tuple[str, object]]
    ) -> torch.Tensor:
        adapters = [self.adapters[n] for n, _ in work]
        # parameter versions in the key: an in-place update (an optimizer step) invalidates the stack
        names = tuple((n, a.down._version, a.up._version) for (n, _), a in zip(work, adapters, strict=True))
        varying = any(not isinstance(s, (int, float)) for _, s in work)  # per sample, or per region
        # numeric scales are folded into the stacked up matrix (part of the key): two matmuls per forward
        scales = (
            None if varying else tuple(float(s) * a.scale for (_, s), a in zip(work, adapters, strict=True))
        )
        if varying and len(adapters) > 1:
            routed = _route_rows(work, adapters, x.shape[0])
            if routed is not None:  # each image one LoRA: each row through its own LoRA only
                return self._routed_delta(x, adapters, names, *routed)
        if len(adapters) == 1:  # one LoRA: its own factors (no copy kept per weight), its scale on h below
            a = adapters[0]
            down, up, ranks = a.down.to(x.dtype), a.up.to(x.dtype), [a.rank]
        else:
            down, up, ranks = self._stack(adapters, names, scales, x)
        conv = adapters[0]._conv  # None: a Linear; else the layer's stride, padding and dilation
        h = F.linear(x, down) if conv is None else F.conv2d(x, down, **conv)  # (..., R) or (B, R, h, w)
        if varying:
            # each LoRA's rank columns times its weight (per sample, per token): exact, as up is linear
            h = _weigh_columns(h, work, adapters, ranks, channels_first=conv is not None)
        elif len(adapters) == 1:
            h = h * scales[0]
        if conv is not None:
            return F.conv2d(h, up)
        return F.linear(h, up)

    def _routed_delta(
        self, x: torch.Tensor, adapters: list, names: tuple, which: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """Row b through LoRA `which[b]` at `weight[b]` (0 for a row with none): batched products with each
        row's own factors (a grouped convolution on a Conv2d), so a batch of k LoRAs costs about one."""
        key = ("routed", names, x.dtype, x.device, torch.is_inference_mode_enabled())
        stack = self._stacks.get(key)
        if stack is None:
            stack = (
                torch.stack([a.down for a in adapters]).to(x.dtype),  # (K, r, in[, kh, kw])
                torch.stack([a.up * a.scale for a in adapters]).to(x.dtype),  # (K, out, r[, 1, 1])
            )
            if len(self._stacks) >= _STACK_CACHE_SIZE:
                self._stacks.pop(next(iter(self._stacks)))
            self._stacks[key] = stack
        downs, ups = stack[0][which], stack[1][which]  # each row's own
        batch, weight = x.shape[0], weight.to(x)
        conv = adapters[0]._conv
        if conv is None:
            flat = x.reshape(batch, -1, x.shape[-1])  # (B, N, in)
            h = torch.bmm(flat, downs.transpose(1, 2)) * weight.view(-1, 1, 1)  # (B, N, r)
            return torch.bmm(h, ups.transpose(1, 2)).reshape(*x.shape[:-1], -1)
        rank = downs.shape[1]
        h = F.conv2d(x.reshape(1, -1, *x.shape[2:]), downs.flatten(0, 1), groups=batch, **conv)
        h = h.reshape(batch, rank, *h.shape[2:]) * weight.view(-1, 1, 1, 1)
        out = F.conv2d(h.reshape(1, -1, *h.shape[2:]), ups.flatten(0, 1), groups=batch)
        return out.reshape(batch, -1, *out.shape[2:])

    def _stack(self, adapters: list, names: tuple, scales: tuple | None, x: torch.Tensor):
        """(down, up, ranks) of a set of LoRAs, concatenated (numeric scales folded into up), cached per set."""
        # inference-mode tensors cannot enter a graph: a stack built under inference_mode serves only there
        key = (names, scales, x.dtype, x.device, torch.is_inference_mode_enabled())
        stack = self._stacks.get(key)
        if stack is None:
            down = torch.cat([a.down for a in adapters], dim=0).to(x.dtype)  # (R, in[, kh, kw])
            ups = (
                [a.up for a in adapters]
                if scales is None
                else [a.up * s for a, s in zip(adapters, scales, strict=True)]
            )
            up = torch.cat(ups, dim=1).to(x.dtype)  # (out, R[, 1, 1])
            stack = (down, up, [a.rank for a in adapters])
            if len(self._stacks) >= _STACK_CACHE_SIZE:
                self._stacks.pop(next(iter(self._stacks)))
            self._stacks[key] = stack
        return stack

    # --- standing in for the wrapped module ---------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # our own parameters, buffers and submodules
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)  # weight, bias, in_features, kernel_size, stride, padding, ...

    @property
    def dtype(self) -> torch.dtype:
        return self.base.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.base.weight.device

    def extra_repr(self) -> str:
        return self.key


class AdaptedLinear(AdaptedModule, nn.Linear):
    """An AdaptedModule around an nn.Linear (what `AdaptedModule(linear, ...)` makes)."""


class AdaptedConv2d(AdaptedModule, nn.Conv2d):
    """An AdaptedModule around an nn.Conv2d (what `AdaptedModule(conv, ...)` makes)."""
