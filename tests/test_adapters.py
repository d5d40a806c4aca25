"""The adapter layer: forward = base + delta, stacked = loop, per-sample mixing, fuse/unfuse, detach, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from composer.adapters.host import AdapterHost
from composer.adapters.layer import AdaptedModule
from composer.adapters.lora import LoraAdapter
from composer.errors import AdapterError, AdapterRuntimeError, FamilyMismatchError, UnknownKeysError
from composer.formats.model import LoraFile, ModuleDelta


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 8)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x, img=None):
        y = self.b(torch.relu(self.a(x)))
        return y if img is None else (y, self.conv(img))


def lora_for(net: Net, seed: int, rank: int = 2, alpha: float | None = 1.0, conv: bool = False) -> LoraFile:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name in ("a", "b"):
        m = net.get_submodule(name)
        m = getattr(m, "base", m)
        t = {
            "down": torch.randn(rank, m.in_features, generator=g),
            "up": torch.randn(m.out_features, rank, generator=g),
        }
        mods[f"unet.{name}"] = ModuleDelta("unet", name, "lora", t, alpha)
    if conv:
        t = {"down": torch.randn(rank, 3, 3, 3, generator=g), "up": torch.randn(6, rank, 1, 1, generator=g)}
        mods["unet.conv"] = ModuleDelta("unet", "conv", "lora", t, alpha)
    return LoraFile(mods, "diffusers", "sdxl")


def reference(net: Net, loras: list[tuple[LoraFile, float]], x, img=None):
    """Forward with the dense deltas written into a copy of the weights."""
    import copy

    ref = copy.deepcopy(net)
    with torch.no_grad():
        for lora, s in loras:
            for d in lora.modules.values():
                w = ref.get_submodule(d.path).weight
                scale = d.scale * s
                up, down = d.tensors["up"], d.tensors["down"]
                w += scale * (up.flatten(1) @ down.flatten(1)).view_as(w)
    return ref(x, img)


def test_forward_equals_base_plus_delta_linear_and_conv():
    net = Net()
    l1, l2 = lora_for(net, 1, conv=True), lora_for(net, 2, rank=3, alpha=None, conv=True)
    x, img = torch.randn(4, 16), torch.randn(2, 3, 8, 8)
    base_y, base_img = net(x, img)
    host = AdapterHost({"unet": net}, "sdxl")
    host.add("one", l1)
    host.add("two", l2)
    assert isinstance(net.a, AdaptedModule)
    with host.activate({"one": 0.7, "two": -0.4}):
        y, yi = net(x, img)
    ry, ryi = reference(Net(), [(l1, 0.7), (l2, -0.4)], x, img)
    torch.testing.assert_close(y, ry, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(yi, ryi, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, base_y, atol=1e-3)
    # inactive again: exactly the base output
    y0, yi0 = net(x, img)
    assert torch.equal(y0, base_y) and torch.equal(yi0, base_img)


def test_stacked_path_equals_adapter_by_adapter():
    torch.manual_seed(3)
    base = nn.Linear(32, 40)
    wrapped = AdaptedModule(base, host_ctx := AdapterHost({}).context)
    adapters = [
        LoraAdapter(base, torch.randn(r, 32), torch.randn(40, r), alpha)
        for r, alpha in [(2, 1.0), (4, 8.0), (3, None)]
    ]
    for i, a in enumerate(adapters):
        wrapped.add(f"l{i}", a)
    x = torch.randn(5, 7, 32)
    host_ctx.active = {"l0": 0.5, "l1": 1.0, "l2": -2.0}
    stacked = wrapped(x)
    loop = base(x) + sum(s * a.forward_delta(x) for a, s in zip(adapters, [0.5, 1.0, -2.0], strict=True))
    torch.testing.assert_close(stacked, loop, atol=1e-5, rtol=1e-5)


def test_stacked_convolutions_equal_adapter_by_adapter():
    """Conv LoRAs stack too (one down and one up convolution for the set), with numbers, per-sample scales and
    region masks alike; a LoCon Tucker core keeps its own path beside them."""
    from composer.adapters.spatial import SpatialScale, TokenGeometry

    torch.manual_seed(4)
    base = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    context = AdapterHost({}).context
    wrapped = AdaptedModule(base, context)
    adapters = [
        LoraAdapter(base, torch.randn(r, 6, 3, 3), torch.randn(10, r, 1, 1), alpha)
        for r, alpha in [(2, 1.0), (4, 8.0)]
    ]
    adapters.append(
        LoraAdapter(base, torch.randn(3, 6, 1, 1), torch.randn(10, 3, 1, 1), 3.0, mid=torch.randn(3, 3, 3, 3))
    )
    for i, a in enumerate(adapters):
        wrapped.add(f"l{i}", a)
    x = torch.randn(4, 6, 8, 8)
    left = torch.zeros(8, 8)
    left[:, :4] = 1.0
    for scales in (  # the Tucker adapter off (0.0): the first two stack
        [0.5, 1.0, 0.0],
        [torch.tensor([1.0, 0.0, 0.5, 2.0]), torch.tensor([0.0, 1.0, 0.5, 0.0]), 0.0],
        [SpatialScale(1.0, left, TokenGeometry()), SpatialScale(0.5, 1 - left, TokenGeometry()), 0.0],
        [0.5, 1.0, -2.0],  # with it: adapter by adapter
    ):
        context.active = {f"l{i}": s for i, s in enumerate(scales)}
        stacked = wrapped(x)
        loop = base(x)
        for a, s in zip(adapters, scales, strict=True):
            delta = a.forward_delta(x)
            weight = s.weights_for(delta) if isinstance(s, SpatialScale) else s
            if isinstance(weight, torch.Tensor) and weight.ndim == 1:
                weight = weight.view(-1, 1, 1, 1)
            loop = loop + weight * delta
        torch.testing.assert_close(stacked, loop, atol=1e-4, rtol=1e-4)
    assert len(wrapped._stacks) == 2  # built: numbers folded in; varying weights (per sample and per region)


def test_images_with_one_lora_each_route_each_row_through_its_own():
    """A batch whose rows each have at most one LoRA runs each row through its own factors (batched products,
    a grouped convolution), equal to the LoRAs applied one by one."""
    torch.manual_seed(5)
    for base, x in (
        (nn.Linear(6, 10), torch.randn(4, 7, 6)),
        (nn.Conv2d(6, 10, 3, padding=1), torch.randn(4, 6, 8, 8)),
    ):
        context = AdapterHost({}).context
        wrapped = AdaptedModule(base, context)
        shape = (2, 6) if isinstance(base, nn.Linear) else (2, 6, 3, 3)
        up_shape = (10, 2) if isinstance(base, nn.Linear) else (10, 2, 1, 1)
        adapters = [
            LoraAdapter(base, torch.randn(*shape), torch.randn(*up_shape), alpha)
            for alpha in (1.0, 4.0, None)
        ]
        for i, a in enumerate(adapters):
            wrapped.add(f"l{i}", a)
        scales = [
            torch.tensor([1.0, 0.0, 0.0, 0.0]),
            torch.tensor([0.0, 0.5, 0.0, 0.0]),
            torch.tensor([0.0, 0.0, 2.0, 0.0]),
        ]
        context.active = {f"l{i}": s for i, s in enumerate(scales)}
        routed = wrapped(x)
        expected = base(x) + torch.stack(
            [
                sum(
                    float(s[b]) * a.forward_delta(x[b : b + 1])[0]
                    for a, s in zip(adapters, scales, strict=True)
                )
                for b in range(4)
            ]
        )
        torch.testing.assert_close(routed, expected, atol=1e-4, rtol=1e-4)
        assert any(k[0] == "routed" for k in wrapped._stacks)  # the routed path ran (row 3 has none)


def test_per_sample_scales_mix_different_sets_in_one_batch():
    net = Net()
    l1, l2 = lora_for(net, 1), lora_for(net, 2)
    x = torch.randn(3, 16)
    host = AdapterHost({"unet": net})
    host.add("one", l1)
    host.add("two", l2)
    with host.activate({"one": torch.tensor([1.0, 0.0, 0.5]), "two": torch.tensor([0.0, 1.0, 0.5])}):
        y = net(x)
    for i, (s1, s2) in enumerate([(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]):
        with host.activate({"one": s1, "two": s2}):
            torch.testing.assert_close(y[i : i + 1], net(x[i : i + 1]), atol=1e-5, rtol=1e-5)


def test_switching_sets_moves_no_weights():
    net = Net()
    host = AdapterHost({"unet": net})
    host.add("one", lora_for(net, 1))
    host.add("two", lora_for(net, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 16)
    outs = []
    for scales in [{"one": 1.0}, {"two": 1.0}, {"one": 1.0}]:
        host.set_active(scales)
        outs.append(net(x))
    assert torch.equal(outs[0], outs[2]) and not torch.allclose(outs[0], outs[1])
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fuse_is_equivalent_and_unfuse_restores_bit_exactly():
    net = Net()
    original = {k: v.clone() for k, v in net.state_dict().items()}
    host = AdapterHost({"unet": net})
    host.add("one", lora_for(net, 1, conv=True))
    host.add("two", lora_for(net, 2, conv=True))
    x, img = torch.randn(2, 16), torch.randn(1, 3, 8, 8)
    host.set_active({"one": 0.8, "two": 0.3})
    unfused = net(x, img)
    host.fuse({"one": 0.8, "two": 0.3})
    assert not torch.equal(net.a.base.weight, original["a.weight"])
    fused = net(x, img)
    for f, u in zip(fused, unfused, strict=True):
        torch.testing.assert_close(f, u, atol=1e-4, rtol=1e-4)
    host.unfuse()
    host.detach()
    assert isinstance(net.a, nn.Linear) and not isinstance(net.a, AdaptedModule)
    restored = net.state_dict()
    assert all(torch.equal(original[k], restored[k]) for k in original)


def test_partial_fuse_applies_the_residual():
    net = Net()
    l1, l2 = lora_for(net, 1), lora_for(net, 2)
    x = torch.randn(2, 16)
    host = AdapterHost({"unet": net})
    host.add("one", l1)
    host.add("two", l2)
    host.fuse({"one": 0.8, "two": 0.3})
    host.set_active({"one": 0.8})  # "two" is fused but inactive: it must be taken back out
    torch.testing.assert_close(net(x), reference(Net(), [(l1, 0.8)], x), atol=1e-4, rtol=1e-4)


def test_errors_name_the_problem_and_attach_nothing():
    net = Net()
    host = AdapterHost({"unet": net}, "sdxl")
    bad = lora_for(net, 1)
    bad.modules["unet.nope.to_q"] = ModuleDelta(
        "unet", "nope.to_q", "lora", {"down": torch.ones(1, 4), "up": torch.ones(4, 1)}
    )
    with pytest.raises(UnknownKeysError, match="unet.nope.to_q") as info:
        host.add("bad", bad)
    assert info.value.keys == ["unet.nope.to_q"]
    assert isinstance(net.a, nn.Linear)  # nothing wrapped
    other = lora_for(net, 2)
    other.family = "sd15"
    with pytest.raises(FamilyMismatchError, match="sd15"):
        host.add("other", other)
    shapes = lora_for(net, 3)
    shapes.modules["unet.a"].tensors["down"] = torch.ones(2, 99)
    with pytest.raises(AdapterError, match=r"unet\.a.*\(2, 99\)"):
        host.add("shapes", shapes)
    with pytest.raises(AdapterError, match="rank 20 exceeds"):
        LoraAdapter(nn.Linear(16, 8), torch.ones(20, 16), torch.ones(8, 20))
    host.add("ok", lora_for(net, 4))
    with pytest.raises(AdapterError, match="already resident"):
        host.add("ok", lora_for(net, 4))
    with pytest.raises(AdapterError, match="not resident: ghost"):
        host.set_active({"ghost": 1.0})


def test_remove_frees_the_adapter():
    net = Net()
    host = AdapterHost({"unet": net})
    host.add("one", lora_for(net, 1))
    x = torch.randn(2, 16)
    base = Net()(x)
    host.set_active({"one": 1.0})
    host.remove("one")
    assert host.names == [] and len(net.a.adapters) == 0
    torch.testing.assert_close(net(x), base)


def test_the_wrapper_stands_in_for_the_module_it_wraps():
    """Callers read the original's attributes (diffusers reads add_embedding.linear_1.in_features) and
    make isinstance checks (peft, diffusers' loaders) on the wrapper."""
    context = AdapterHost({}).context
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1, bias=False)
    linear = nn.Linear(6, 10)
    for base, attrs in (
        (conv, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                "padding_mode", "weight", "bias")),
        (linear, ("in_features", "out_features", "weight", "bias")),
    ):  # fmt: skip
        wrapped = AdaptedModule(base, context, "unet.layer")
        assert isinstance(wrapped, type(base)) and isinstance(wrapped, AdaptedModule)
        for attr in attrs:
            assert getattr(wrapped, attr) is getattr(base, attr), attr
        assert (wrapped.dtype, wrapped.device) == (base.weight.dtype, base.weight.device)
        assert [n for n, _ in wrapped.named_parameters()] == [f"base.{n}" for n, _ in base.named_parameters()]
        with pytest.raises(AttributeError):
            _ = wrapped.no_such_attribute
    with pytest.raises(AdapterError, match="cannot adapt a LayerNorm"):
        AdaptedModule(nn.LayerNorm(4), context)


def test_an_adapter_that_fails_in_forward_names_itself_and_the_module():
    net = Net()
    host = AdapterHost({"unet": net}, "sdxl")
    host.add("one", lora_for(net, 1))
    with host.activate({"one": torch.ones(3)}), pytest.raises(AdapterRuntimeError) as caught:
        net(torch.randn(4, 16), torch.randn(4, 3, 8, 8))  # a per-sample scale for 3 of 4 samples
    assert "adapter 'one' on module unet.a: ValueError: per-sample scale" in str(caught.value)
