"""Tensor-decomposed adapter, TLoRA: maths against a dense reference, init, training, host, counts, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from composer.adapters.functional import tensor_modes, tr_matrix, tr_matvec
from composer.adapters.host import AdapterHost
from composer.adapters.registry import adapter_type
from composer.adapters.tensor import TensorAdapter
from composer.errors import AdapterError
from composer.formats.model import LoraFile, ModuleDelta


def dense_ring(cores: list[torch.Tensor]) -> torch.Tensor:
    """M[o, j] = trace(G_1[o_1, j_1] @ ... @ G_D[o_D, j_D]), entry by entry from the definition (float64)."""
    rows = [range(g.shape[0]) for g in cores]
    cols = [range(g.shape[1]) for g in cores]
    m = torch.zeros(math.prod(map(len, rows)), math.prod(map(len, cols)), dtype=torch.float64)
    for r, o in enumerate(itertools.product(*rows)):
        for c, j in enumerate(itertools.product(*cols)):
            p = torch.eye(cores[0].shape[2], dtype=torch.float64)
            for g, a, b in zip(cores, o, j, strict=True):
                p = p @ g[a, b].double()
            m[r, c] = p.trace()
    return m


def random_cores(rows, cols, ranks, g, scale=0.6) -> list[torch.Tensor]:
    """Cores (rows_k, cols_k, ranks_k, ranks_k+1) of a ring; N(0, scale^2) so products stay O(1)."""
    ring = [*ranks, ranks[0]]
    return [
        torch.randn(o, j, ring[k], ring[k + 1], generator=g) * scale
        for k, (o, j) in enumerate(zip(rows, cols, strict=True))
    ]


def random_adapter(base: nn.Linear, g, t_rank=2, d_rank=3, order=3) -> TensorAdapter:
    """Non-identity T (I + noise in ring form) and non-zero D, both genuinely tensor-ring."""
    ins, outs = tensor_modes(base.in_features, order), tensor_modes(base.out_features, order)
    t = random_cores(ins, ins, [t_rank] * order, g)
    d = random_cores(outs, ins, [d_rank] * order, g)
    return TensorAdapter(base, t, d)


def reference_delta(adapter: TensorAdapter) -> torch.Tensor:
    w0 = adapter._base[0].weight.double()
    t = dense_ring(list(adapter.t_cores))
    return (w0 @ (t - torch.eye(t.shape[0], dtype=t.dtype)) + dense_ring(list(adapter.d_cores))).float()


def test_tensor_modes():
    table = {
        (640, 3): (8, 8, 10), (1280, 3): (8, 10, 16), (2048, 3): (8, 16, 16), (768, 3): (8, 8, 12),
        (12, 2): (3, 4), (7, 3): (1, 1, 7), (1, 3): (1, 1, 1), (1280, 1): (1280,), (16, 4): (2, 2, 2, 2),
    }  # fmt: skip
    for (n, order), want in table.items():
        assert tensor_modes(n, order) == want, (n, order)
    for n in range(1, 200):
        modes = tensor_modes(n)
        assert len(modes) == 3 and math.prod(modes) == n and list(modes) == sorted(modes)
    with pytest.raises(AdapterError, match="0 modes"):
        tensor_modes(64, 0)


@pytest.mark.parametrize(
    "d_in, d_out, x_shape, order",
    [
        (16, 24, (3, 5, 16), 3),  # (B, N, d), d_out != d_in
        (24, 8, (4, 24), 3),  # shrinking layer
        (12, 12, (12,), 2),  # square, unbatched
        (30, 7, (2, 3, 1, 30), 3),  # prime d_out: modes (1, 1, 7)
    ],
)
def test_matches_dense_reference(d_in, d_out, x_shape, order):
    g = torch.Generator().manual_seed(d_in + d_out)
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    adapter = random_adapter(base, g, order=order)
    assert adapter.t_modes == tensor_modes(d_in, order) and adapter.d_modes[0] == tensor_modes(d_out, order)
    dw = adapter.delta_weight()
    assert dw.shape == (d_out, d_in) and dw.abs().max() > 0.1
    torch.testing.assert_close(dw, reference_delta(adapter), atol=1e-5, rtol=1e-5)
    x = torch.randn(x_shape, generator=g)
    y = adapter.forward_delta(x)
    assert y.shape == (*x_shape[:-1], d_out)
    torch.testing.assert_close(y, F.linear(x, dw), atol=1e-5, rtol=1e-5)


def test_ring_with_uneven_ranks_and_orders():
    g = torch.Generator().manual_seed(3)
    base = nn.Linear(12, 20)
    t = random_cores((3, 4), (3, 4), [2, 3], g)  # order 2, ring ranks 2 -> 3 -> 2
    d = random_cores((2, 2, 5), (2, 3, 2), [1, 2, 3], g)  # order 3, its own tensorisation of the input
    adapter = TensorAdapter(base, t, d)
    torch.testing.assert_close(adapter.delta_weight(), reference_delta(adapter), atol=1e-5, rtol=1e-5)
    x = torch.randn(6, 12, generator=g)
    torch.testing.assert_close(adapter.forward_delta(x), x @ adapter.delta_weight().T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tr_matvec(x, d), x @ dense_ring(d).float().T, atol=1e-5, rtol=1e-5)


def test_forward_never_builds_a_dense_matrix(monkeypatch):
    base = nn.Linear(20, 16)
    adapter = random_adapter(base, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 20)
    want = F.linear(x, adapter.delta_weight())

    def refuse(*args, **kwargs):
        raise AssertionError("dense matrix built in forward")

    monkeypatch.setattr(torch, "eye", refuse)
    torch.testing.assert_close(adapter.forward_delta(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "transform_rank, order, exact", [(1, 3, True), (4, 2, True), (8, 3, True), (2, 3, False)]
)
def test_create_starts_at_identity(transform_rank, order, exact):
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    adapter = TensorAdapter.create(base, rank=2, transform_rank=transform_rank, order=order)
    t = tr_matrix(list(adapter.t_cores))
    if exact:  # c = R_t^(-1/D) is a power of two
        assert torch.equal(t, torch.eye(40))
        assert torch.count_nonzero(adapter.delta_weight()) == 0
        assert adapter.identity_regulariser().item() == 0.0
    else:
        torch.testing.assert_close(t, torch.eye(40), atol=1e-6, rtol=0)
        assert adapter.identity_regulariser().item() < 1e-10
    assert adapter.transform_rank == transform_rank and adapter.rank == 2
    assert (
        torch.count_nonzero(adapter.d_cores[0]) == 0 and torch.count_nonzero(tr_matrix(adapter.d_cores)) == 0
    )
    assert all(torch.count_nonzero(c) == c.numel() for c in adapter.d_cores[1:])
    x = torch.randn(5, 40)
    torch.testing.assert_close(adapter.forward_delta(x), torch.zeros(5, 24), atol=1e-5, rtol=0)


def test_create_defaults_init_and_determinism():
    base = nn.Linear(1280, 640)
    adapter = TensorAdapter.create(base, rank=4, generator=torch.Generator().manual_seed(0))
    again = TensorAdapter.create(base, rank=4, generator=torch.Generator().manual_seed(0))
    assert all(
        torch.equal(a, b) for a, b in zip(adapter.tensors().values(), again.tensors().values(), strict=True)
    )
    assert adapter.t_modes == (8, 10, 16) and adapter.d_modes == ((8, 8, 10), (8, 10, 16))
    assert TensorAdapter.create(base).rank == 1 and TensorAdapter.create(base).transform_rank == 1
    rest = torch.cat([c.flatten() for c in adapter.d_cores[1:]])
    assert abs(rest.var().item() - 1 / 4) < 0.05  # N(0, 1/R)
    assert all(p.requires_grad for p in adapter.parameters())
    assert base.weight.data_ptr() not in {p.data_ptr() for p in adapter.parameters()}
    assert set(adapter.state_dict()) == {f"t_cores.{k}" for k in range(3)} | {
        f"d_cores.{k}" for k in range(3)
    }


def test_one_step_trains_both_sides():
    torch.manual_seed(0)
    base = nn.Linear(16, 12).requires_grad_(False)
    adapter = TensorAdapter.create(base, rank=2, transform_rank=2, order=2)
    x, target = torch.randn(32, 16), torch.randn(32, 12)
    before = base(x) + adapter.forward_delta(x)
    loss = F.mse_loss(before, target)
    loss.backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in adapter.t_cores)  # through W0
    assert adapter.d_cores[0].grad.abs().sum() > 0  # the zero core learns first, as LoRA's B
    torch.optim.SGD(adapter.parameters(), lr=0.1).step()
    after = base(x) + adapter.forward_delta(x)
    assert not torch.allclose(after, before, atol=1e-4) and F.mse_loss(after, target) < loss
    assert adapter.identity_regulariser() > 1e-4  # T moved away from I (it starts at ~1e-14 here)


def test_identity_regulariser_matches_dense():
    g = torch.Generator().manual_seed(5)
    adapter = TensorAdapter.create(nn.Linear(24, 10), transform_rank=2, generator=g)
    assert adapter.identity_regulariser().item() < 1e-10
    with torch.no_grad():
        for c in adapter.t_cores:
            c.add_(torch.randn(c.shape, generator=g) * 0.1)
    t = dense_ring(list(adapter.t_cores))
    want = (t - torch.eye(24, dtype=t.dtype)).square().sum()
    got = adapter.identity_regulariser()
    assert got.item() > 1e-3 and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    got.backward()
    assert all(c.grad.abs().sum() > 0 for c in adapter.t_cores)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))


def make_file(model: nn.Sequential, seed: int = 1) -> LoraFile:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path in ("0", "2"):
        tensors = random_adapter(model.get_submodule(path), g).tensors()
        assert set(tensors) == {f"tr_{s}.{k}" for s in "td" for k in range(3)}
        modules[f"unet.{path}"] = ModuleDelta("unet", path, "tensor", tensors, None)
    return LoraFile(modules, "studio", "sdxl")


def test_host_forward_fuse_and_unfuse():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(9))
    base = model(x)
    lora = make_file(model)
    ref = net()  # the reference: W0 + s * (W0 (T - I) + D), with T and D from the trace definition
    with torch.no_grad():
        for d in lora.modules.values():
            w = ref.get_submodule(d.path).weight
            t = dense_ring([d.tensors[f"tr_t.{k}"] for k in range(3)])
            dd = dense_ring([d.tensors[f"tr_d.{k}"] for k in range(3)])
            w += 0.7 * (w.double() @ (t - torch.eye(t.shape[0], dtype=t.dtype)) + dd).float()
    host = AdapterHost({"unet": model}, "sdxl")
    host.add("l", lora)
    assert host.parameter_count("l") == sum(
        t.numel() for d in lora.modules.values() for t in d.tensors.values()
    )
    with host.activate({"l": 0.7}):
        unfused = model(x)
        host.fuse({"l": 0.7})
        fused = model(x)
    torch.testing.assert_close(unfused, ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unfused, base, atol=1e-3)
    host.unfuse()
    assert all(torch.equal(model[i].weight, before[f"{i}.weight"]) for i in (0, 2))  # bit-exact
    assert torch.equal(model(x), base)  # nothing active: the plain model
    host.detach()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(x), base) and isinstance(model[0], nn.Linear)


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(16, 24, 3, padding=1), nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.Conv2d(16, 24, 1)],
    ids=["3x3", "3x3-stride2", "1x1"],
)
def test_conv_forward_is_conv_with_the_delta(conv):
    """On a Conv2d, T mixes input channels and D sits at the kernel centre: forward = conv(x, delta)."""
    g = torch.Generator().manual_seed(4)
    ins, outs = tensor_modes(16), tensor_modes(24)
    adapter = TensorAdapter(conv, random_cores(ins, ins, [2] * 3, g), random_cores(outs, ins, [3] * 3, g))
    w0 = conv.weight.double()
    t = dense_ring(list(adapter.t_cores)) - torch.eye(16, dtype=torch.float64)
    want = torch.einsum("oihw,ic->ochw", w0, t)
    want[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] += dense_ring(list(adapter.d_cores))
    torch.testing.assert_close(adapter.delta_weight(), want.float(), atol=1e-5, rtol=1e-4)
    x = torch.randn(2, 16, 7, 7, generator=g)
    dense = F.conv2d(x, adapter.delta_weight(), None, conv.stride, conv.padding)
    torch.testing.assert_close(adapter.forward_delta(x), dense, atol=1e-4, rtol=1e-4)
    fresh = TensorAdapter.create(conv, rank=2, transform_rank=2, generator=g)  # T = I, D = 0
    assert fresh.forward_delta(x).abs().max() < 1e-5


def test_tensors_round_trip_through_registry():
    model = net()
    adapter = random_adapter(model[0], torch.Generator().manual_seed(2))
    delta = ModuleDelta("unet", "0", "tensor", adapter.tensors(), 1.0)
    back = adapter_type("tensor").from_delta(model[0], delta)
    assert back.kind == "tensor" and adapter_type("tensor") is TensorAdapter
    assert torch.equal(back.delta_weight(), adapter.delta_weight())
    assert not any(p.requires_grad for p in back.parameters())  # loaded for inference


def test_bad_inputs_are_named():
    model = net()
    good = random_adapter(model[0], torch.Generator().manual_seed(0)).tensors()
    t = [good[f"tr_t.{k}"] for k in range(3)]
    d = [good[f"tr_d.{k}"] for k in range(3)]
    with pytest.raises(AdapterError, match=r"odd kernel with 'same' padding.*padding \(0, 0\)"):
        TensorAdapter(nn.Conv2d(4, 4, 3), t, d)
    with pytest.raises(AdapterError, match=r"odd kernel with 'same' padding.*kernel \(2, 2\)"):
        TensorAdapter.create(nn.Conv2d(4, 4, 2, padding=1))
    with pytest.raises(AdapterError, match="Linear and Conv2d layers, not a Embedding"):
        TensorAdapter.create(nn.Embedding(4, 4))
    small = [torch.ones(2, 2, 1, 1), torch.ones(2, 2, 1, 1), torch.ones(2, 4, 1, 1)]
    with pytest.raises(
        AdapterError, match=r"D cores .*\(2, 4, 1, 1\)\] give a 8x16 matrix; Linear 16->24 needs 24x16"
    ):
        TensorAdapter(model[0], t, small)
    with pytest.raises(AdapterError, match=r"T cores .*give a 27x27 matrix; Linear 16->24 needs 16x16"):
        TensorAdapter(model[0], [torch.ones(3, 3, 1, 1)] * 3, d)
    with pytest.raises(AdapterError, match=r"T core 1 \(2, 2, 2, 3\) does not chain to core 2"):
        TensorAdapter(model[0], [torch.ones(2, 2, 2, 2), torch.ones(2, 2, 2, 3), torch.ones(4, 4, 2, 2)], d)
    with pytest.raises(AdapterError, match=r"T core 0 \(2, 8, 1, 1\) is not square"):
        TensorAdapter(model[0], [torch.ones(2, 8, 1, 1), torch.ones(8, 2, 1, 1)], d)
    with pytest.raises(AdapterError, match=r"D core 2 \(2, 4\) is not 4-d"):
        TensorAdapter(model[0], t, [*d[:2], torch.ones(2, 4)])
    with pytest.raises(AdapterError, match="T has no cores"):
        TensorAdapter(model[0], [], d)
    with pytest.raises(AdapterError, match="ranks must be >= 1"):
        TensorAdapter.create(model[0], rank=0)

    def delta(tensors, alpha=None):
        return ModuleDelta("unet", "0", "tensor", tensors, alpha)

    with pytest.raises(AdapterError, match="missing: none; unknown: lora_down, tr_t.01"):
        TensorAdapter.from_delta(model[0], delta(good | {"lora_down": t[0], "tr_t.01": t[0]}))
    with pytest.raises(AdapterError, match="missing: tr_t.1; unknown: none"):
        TensorAdapter.from_delta(model[0], delta({k: v for k, v in good.items() if k != "tr_t.1"}))
    with pytest.raises(AdapterError, match="missing: tr_d.0"):
        TensorAdapter.from_delta(model[0], delta({k: v for k, v in good.items() if k.startswith("tr_t")}))
    with pytest.raises(AdapterError, match="no alpha scaling; the delta carries alpha=4.0"):
        TensorAdapter.from_delta(model[0], delta(good, 4.0))
    host = AdapterHost({"unet": model}, "sdxl")  # through the host: the module key is named, nothing attached
    bad = {"unet.2": ModuleDelta("unet", "2", "tensor", good, None)}  # cores for layer 0 offered to layer 2
    with pytest.raises(AdapterError, match=r"module unet\.2: TLoRA T cores .*Linear 24->8 needs 24x24"):
        host.add("bad", LoraFile(bad, "studio", "sdxl"))
    assert host.names == [] and isinstance(model[2], nn.Linear)


# --- the real SDXL UNet on the meta device: the 560 attention linears the backbone targets --------------
MODES = {640: (8, 8, 10), 1280: (8, 10, 16), 2048: (8, 16, 16)}  # balanced 3-mode splits, written out


def test_real_sdxl_parameter_count():
    from composer.backbones import get_backbone

    backbone = get_backbone("sdxl")
    unet = backbone.build_meta_denoiser()
    targets = backbone.target_modules(unet)
    assert len(targets) == 560
    layers = [unet.get_submodule(n) for n in targets]
    # rank 1, transform rank 1: T costs sum_k J_k^2, D costs sum_k O_k J_k (every R^2 = 1)
    formula = sum(
        sum(j * j for j in MODES[m.in_features])
        + sum(o * j for o, j in zip(MODES[m.out_features], MODES[m.in_features], strict=True))
        for m in layers
    )
    lora_r1 = sum(m.in_features + m.out_features for m in layers)
    g = torch.Generator().manual_seed(0)
    modules = {}
    for n, m in zip(targets, layers, strict=True):
        adapter = TensorAdapter.create(m, generator=g)  # a meta-device base: cores drawn on CPU, then moved
        assert adapter.d_cores[0].device.type == "meta"
        modules[f"unet.{n}"] = ModuleDelta("unet", n, "tensor", adapter.tensors(), None)
    host = AdapterHost({"unet": unet})
    try:
        host.add("tlora", LoraFile(modules, "studio", "sdxl"))
        count = host.parameter_count("tlora")
    finally:
        host.detach()
    print(
        f"SDXL attention, 560 layers: TLoRA r=1/rt=1 {count:,} params vs LoRA r=1 {lora_r1:,} ({count / lora_r1:.1%})"
    )
    assert lora_r1 == 1_451_520
    assert count == formula == 475_040
    assert count < lora_r1
