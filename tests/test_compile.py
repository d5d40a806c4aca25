"""A compiled denoiser: fixed-shape slots that serve every LoRA set, equal to the eager layer, no recompiles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from composer.adapters.functional import lokr_factor_shapes
from composer.adapters.host import AdapterHost
from composer.adapters.spatial import SpatialScale, TokenGeometry
from composer.errors import AdapterError
from composer.formats.model import LoraFile, ModuleDelta
from tests.test_adapters import Net, lora_for


def lokr_for(net: Net, seed: int) -> LoraFile:
    g = torch.Generator().manual_seed(seed)
    (out_l, in_m), (out_k, in_n) = lokr_factor_shapes(24, 16)
    t = {"lokr_w1": torch.randn(out_l, in_m, generator=g), "lokr_w2": torch.randn(out_k, in_n, generator=g)}
    return LoraFile({"unet.a": ModuleDelta("unet", "a", "lokr", t, None)}, "lycoris", "sdxl")


def _hosts():
    """Two identical nets with the same resident adapters: one eager (the reference), one static."""
    nets = [Net(), Net()]
    hosts = [AdapterHost({"unet": n}, "sdxl") for n in nets]
    for host, net in zip(hosts, nets, strict=True):
        host.add("l0", lora_for(net, 0, rank=2, conv=True))
        host.add("l1", lora_for(net, 1, rank=3, conv=True, alpha=1.5))
        host.add("kr", lokr_for(net, 2))
    return nets, hosts


SETS = [
    {"l0": 0.8},
    {"l0": 0.5, "l1": -1.0},
    {"l1": 0.7, "kr": 0.6},
    {"kr": 1.0},
    {},
    {"l0": 1.2, "l1": 0.3, "kr": -0.4},
]


def test_static_slots_equal_the_eager_layer_for_every_set_and_restore_the_base():
    (eager, static), (h_eager, h_static) = _hosts()
    state = {k: v.clone() for k, v in static.state_dict().items()}
    h_static.make_static("unet", rank=8)
    assert set(static.state_dict()) == set(state)  # the slots never reach a saved model
    x, img = torch.randn(5, 16), torch.randn(2, 3, 8, 8)
    for scales in SETS:
        h_eager.set_active(scales)
        h_static.set_active(scales)
        (y_e, c_e), (y_s, c_s) = eager(x, img), static(x, img)
        torch.testing.assert_close(y_s, y_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c_s, c_e, rtol=1e-5, atol=1e-5)
    h_static.set_active({})  # the LoKr folded into the weight is taken out again, exactly
    for k, v in static.state_dict().items():
        assert torch.equal(v, state[k]), k
    h_static.set_active({"kr": 1.0})
    h_static.detach()
    fresh = Net().state_dict()  # the same seed: the original weights
    assert set(static.state_dict()) == set(fresh)
    for k, v in static.state_dict().items():
        assert torch.equal(v, fresh[k]), k
    assert not any(hasattr(m, "slot_down") for m in static.modules())


def test_static_refusals_name_the_problem_and_keep_the_previous_set():
    _, (_, host) = _hosts()
    host.make_static("unet", rank=4)
    host.set_active({"l0": 1.0})
    with pytest.raises(AdapterError, match=r"add up to rank 5, more than the compiled slots' 4"):
        host.set_active({"l0": 1.0, "l1": 1.0})
    assert dict(host.context.active) == {"l0": 1.0}
    with pytest.raises(AdapterError, match="per-sample or per-region weights"):
        host.set_active({"l0": torch.tensor([1.0, 0.0])})
    assert dict(host.context.active) == {"l0": 1.0}
    with pytest.raises(AdapterError, match="per-sample or per-region weights"):
        host.set_active({"l0": SpatialScale(1.0, torch.ones(2, 2), TokenGeometry())})
    assert dict(host.context.active) == {"l0": 1.0}
    with pytest.raises(AdapterError, match="fusing is not needed"):
        host.fuse({"l0": 1.0})
    with pytest.raises(AdapterError, match="no component 'vae'"):
        host.make_static("vae")


def _unet_with_loras(n: int, rank: int = 4):
    from bench.common import build_unet, random_lora, unet_inputs
    from composer.backbones import sdxl

    unet = build_unet("tiny", "cpu", torch.float32)
    targets = sdxl.BACKBONE.target_modules(unet)
    host = AdapterHost({"unet": unet}, "sdxl")
    for i in range(n):
        host.add(f"l{i}", random_lora(unet, i, rank, targets)[0])
    return unet, host, unet_inputs(unet, 2, 8, "cpu", torch.float32)


UNET_SETS = [
    {"l0": 0.8, "l1": 0.6},
    {"l2": 0.7},
    {"l3": 1.0, "l0": -0.5},
    {"l1": 0.3, "l2": 0.2, "l3": 0.1},
    {},
]


def _compile_and_switch(backend: str, sets: list[dict], atol: float) -> dict:
    """Eager outputs for each set, then the same UNet made static, compiled with `backend` and run through the
    sets again: each output equals eager; returns torch._dynamo's counters."""
    from torch._dynamo.utils import counters

    unet, host, inputs = _unet_with_loras(4)
    with torch.inference_mode():
        expected = {}
        for scales in sets:
            host.set_active(scales)
            expected[repr(scales)] = unet(**inputs).sample
        host.make_static("unet", rank=16)
        torch._dynamo.reset()
        counters.clear()
        unet.compile(backend=backend)
        for scales in sets:
            host.set_active(scales)
            torch.testing.assert_close(unet(**inputs).sample, expected[repr(scales)], rtol=1e-4, atol=atol)
    found = {k: dict(v) for k, v in counters.items()}
    torch._dynamo.reset()
    return found


def test_compiled_denoiser_does_not_recompile_across_switches_and_equals_eager():
    """Dynamo's guards decide recompilation whatever the backend; aot_eager keeps the test fast (the inductor
    case is the slow test below)."""
    counts = _compile_and_switch("aot_eager", UNET_SETS * 2, atol=1e-5)  # ten switches
    assert counts["stats"]["unique_graphs"] == 1, counts["stats"]
    assert not counts.get("recompiles"), counts.get("recompiles")


@pytest.mark.slow
def test_inductor_compiled_denoiser_equals_eager_without_recompiling():
    counts = _compile_and_switch("inductor", UNET_SETS, atol=1e-4)
    assert counts["stats"]["unique_graphs"] == 1, counts["stats"]
    assert not counts.get("recompiles"), counts.get("recompiles")


def test_layers_wrapped_after_make_static_get_slots_too():
    net = Net()
    host = AdapterHost({"unet": net}, "sdxl")
    host.make_static("unet", rank=4)
    lora = lora_for(net, 0, rank=2)
    host.add("late", lora)
    assert all(m.slot_rank == 4 for m in net.modules() if hasattr(m, "adapters"))
    x = torch.randn(3, 16)
    base = net(x)
    host.set_active({"late": 1.0})
    assert not torch.allclose(net(x), base)  # the adapter is in the slots
    assert isinstance(net.a, nn.Linear)


@pytest.mark.slow
def test_studio_renders_with_compile_equal_eager_and_switching_loras_does_not_recompile(tmp_path):
    """The `compile` setting as `render --compile` and `serve --compile` use it, on the bundled toy model and
    its LoRAs: each render within 1/255 of the eager one, and only the first compiles."""
    import numpy as np
    from torch._dynamo.utils import counters

    from app.settings import Settings
    from app.studio import Studio

    stacks = [[("star", 1.0), ("brick", 0.8)], [("ring", 0.9)], [("star", 0.5), ("ring", 0.5)], []]

    def renders(studio: Studio) -> list:
        return [
            np.asarray(
                studio.render_image(prompt="a xyvo on the left", loras=stack, seed=3, steps=4).images[0],
                dtype=np.int16,
            )
            for stack in stacks
        ]

    eager = renders(Studio.open(Settings(data_dir=tmp_path / "eager", bundled=True)))
    torch._dynamo.reset()
    counters.clear()
    compiled = renders(Studio.open(Settings(data_dir=tmp_path / "compiled", bundled=True, compile="default")))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    for want, got in zip(eager, compiled, strict=True):
        assert np.abs(got - want).max() <= 1
    assert (
        np.abs(eager[0] - eager[3]).max() > 10
    )  # the LoRAs change the picture: the comparison means something
    torch._dynamo.reset()
