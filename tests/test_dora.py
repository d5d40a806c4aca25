"""DoRA (weight-decomposed LoRA) and LoCon Tucker (lora_mid): the math against a dense reference, the weight
as a strength, fusing, bad input named, and the file layouts (peft, LyCORIS / kohya) both ways.
Files written by peft, diffusers and LyCORIS themselves are in test_peer_files.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from composer.adapters.dora import DoraAdapter
from composer.adapters.host import AdapterHost
from composer.adapters.lora import LoraAdapter
from composer.adapters.registry import build_adapter
from composer.errors import AdapterError, LoraFileError
from composer.formats import (
    LoraFile,
    ModuleDelta,
    convert_state_dict,
    load_tensors,
    read_lora,
    write_diffusers,
    write_kohya,
)

G = torch.Generator().manual_seed(5)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 24)
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, x, img):
        return self.a(x), self.conv(img)


INPUTS = (rand(3, 5, 16), rand(2, 4, 7, 7))


def lora_tensors(layer: nn.Module, rank: int = 3, tucker: bool = False) -> dict[str, torch.Tensor]:
    if isinstance(layer, nn.Linear):
        return {"down": rand(rank, layer.in_features) * 0.3, "up": rand(layer.out_features, rank) * 0.3}
    if tucker:
        return {
            "down": rand(rank, layer.in_channels, 1, 1) * 0.3,
            "mid": rand(rank, rank, *layer.kernel_size) * 0.3,
            "up": rand(layer.out_channels, rank, 1, 1) * 0.3,
        }
    return {
        "down": rand(rank, layer.in_channels, *layer.kernel_size) * 0.3,
        "up": rand(layer.out_channels, rank, 1, 1) * 0.3,
    }


def magnitude(layer: nn.Module, on_out: bool) -> torch.Tensor:
    """LyCORIS's dora_scale layout, the weight's own norms times 1 + 0.3 N(0, 1)."""
    w = layer.weight.detach()
    ones = [1] * (w.ndim - 2)
    if on_out:
        norm = w.flatten(1).norm(dim=1).reshape(-1, 1, *ones)
    else:
        norm = w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *ones)
    return norm * (1 + 0.3 * torch.randn(norm.shape, generator=G))


def reference_dora_weight(layer: nn.Module, t: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """W' = m * V / ||V||, V = W + (alpha / r) up @ down, written out densely (the DoRA paper's equation 5)."""
    w = layer.weight.detach()
    r = t["down"].shape[0]
    if "mid" in t:
        dw = torch.einsum("ijkl,oi,jn->onkl", t["mid"], t["up"].flatten(1), t["down"].flatten(1))
    else:
        dw = (t["up"].flatten(1) @ t["down"].flatten(1)).reshape(w.shape)
    v = w + alpha / r * dw
    m = t["magnitude"]
    if m.shape[0] == w.shape[0]:
        norm = v.flatten(1).norm(dim=1).reshape(m.shape)
    else:
        norm = v.transpose(0, 1).flatten(1).norm(dim=1).reshape(m.shape)
    return m * v / norm


CASES = {
    "linear-out": ("a", True, False),
    "linear-in": ("a", False, False),
    "conv-out": ("conv", True, False),
    "conv-in": ("conv", False, False),
    "conv-tucker-out": ("conv", True, True),
    "conv-tucker-in": ("conv", False, True),
}


def dora_delta(net: Net, case: str) -> ModuleDelta:
    path, on_out, tucker = CASES[case]
    layer = net.get_submodule(path)
    t = lora_tensors(layer, tucker=tucker)
    t["magnitude"] = magnitude(layer, on_out)
    return ModuleDelta("unet", path, "dora", t, 1.5)


@pytest.mark.parametrize("case", CASES)
def test_dora_forward_is_the_decomposed_weight_at_any_strength(case):
    net = Net()
    d = dora_delta(net, case)
    layer = net.get_submodule(d.path)
    want_w = reference_dora_weight(layer, d.tensors, 1.5)
    x = INPUTS[0] if d.path == "a" else INPUTS[1]
    base = layer(x)
    adapter = build_adapter(layer, d)
    assert isinstance(adapter, DoraAdapter) and adapter.on_out == CASES[case][1]
    torch.testing.assert_close(adapter.delta_weight(), want_w - layer.weight, atol=1e-5, rtol=1e-5)
    host = AdapterHost({"unet": net}, "sdxl")
    host.add("d", LoraFile({d.key: d}, "studio", "sdxl"))
    for w in (1.0, 0.5, -0.3):  # W + w (W' - W): the UIs' strength, additive like every other type
        with host.activate({"d": w}):
            y = net(*INPUTS)[0 if d.path == "a" else 1]
        conv = {} if d.path == "a" else dict(stride=2, padding=1)
        weight = layer.weight + w * (want_w - layer.weight)
        want = F.linear(x, weight, layer.bias) if not conv else F.conv2d(x, weight, layer.bias, **conv)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(y, base, atol=1e-3)
    host.detach()
    assert torch.equal(layer(x), base)


def test_dora_matches_lycoris_weight_decompose():
    lycoris = pytest.importorskip("lycoris.functional.general")
    net = Net()
    for case in CASES:
        d = dora_delta(net, case)
        layer = net.get_submodule(d.path)
        adapter = build_adapter(layer, d)
        merged = layer.weight + adapter.lora.delta_weight()
        theirs = lycoris.weight_decompose(merged, d.tensors["magnitude"], 1, CASES[case][1])
        torch.testing.assert_close(layer.weight + adapter.delta_weight(), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["linear-out", "conv-tucker-in"])
def test_dora_fuses_and_unfuses_bit_exactly(case):
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    d = dora_delta(net, case)
    host = AdapterHost({"unet": net}, "sdxl")
    host.add("d", LoraFile({d.key: d}, "studio", "sdxl"))
    with host.activate({"d": 0.8}):
        unfused = net(*INPUTS)
        host.fuse({"d": 0.8})
        fused = net(*INPUTS)
    for f, u in zip(fused, unfused, strict=True):
        torch.testing.assert_close(f, u, atol=1e-5, rtol=1e-5)
    host.unfuse()
    host.detach()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_locon_tucker_is_three_convolutions_with_the_layers_geometry():
    net = Net()
    t = lora_tensors(net.conv, tucker=True)
    adapter = LoraAdapter(net.conv, t["down"], t["up"], 2.0, mid=t["mid"])
    img = INPUTS[1]
    dense = torch.einsum("ijkl,oi,jn->onkl", t["mid"], t["up"].flatten(1), t["down"].flatten(1)) * 2.0 / 3
    torch.testing.assert_close(adapter.delta_weight(), dense)
    want = F.conv2d(img, dense, stride=2, padding=1)
    torch.testing.assert_close(adapter.forward_delta(img), want, atol=1e-5, rtol=1e-5)
    assert set(adapter.tensors()) == {"down", "mid", "up"}


def test_bad_dora_and_tucker_inputs_are_named():
    net = Net()
    t = lora_tensors(net.a)
    with pytest.raises(AdapterError, match=r"magnitude \(7, 1\) fits neither the layer's 24 output rows"):
        build_adapter(net.a, ModuleDelta("unet", "a", "dora", {**t, "magnitude": torch.ones(7, 1)}))
    with pytest.raises(AdapterError, match="missing: magnitude"):
        DoraAdapter.from_delta(net.a, ModuleDelta("unet", "a", "dora", t))
    with pytest.raises(AdapterError, match="adapts a Conv2d, not a Linear"):
        LoraAdapter(net.a, t["down"], t["up"], mid=torch.ones(3, 3, 3, 3))
    c = lora_tensors(net.conv, tucker=True)
    with pytest.raises(
        AdapterError, match=r"lora_mid \(3, 3, 1, 1\) does not fit rank 3 and the kernel \(3, 3\)"
    ):
        LoraAdapter(net.conv, c["down"], c["up"], mid=torch.ones(3, 3, 1, 1))
    with pytest.raises(AdapterError, match=r"down must be \(r, in, 1, 1\)"):
        LoraAdapter(net.conv, torch.ones(3, 4, 3, 3), c["up"], mid=c["mid"])


# --- files ------------------------------------------------------------------------------------------------
Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.1.resnets.0.conv1"


def studio_file() -> LoraFile:
    mods = [
        ModuleDelta("unet", Q, "dora", {"down": rand(4, 12), "up": rand(8, 4), "magnitude": rand(8, 1)}, 2.0),
        ModuleDelta(
            "unet",
            CONV,
            "dora",
            {
                "down": rand(4, 6, 1, 1),
                "mid": rand(4, 4, 3, 3),
                "up": rand(8, 4, 1, 1),
                "magnitude": rand(1, 6, 1, 1),
            },
            1.0,
        ),  # fmt: skip
        ModuleDelta(
            "unet",
            CONV.replace("conv1", "conv2"),
            "lora",
            {"down": rand(2, 8, 1, 1), "mid": rand(2, 2, 3, 3), "up": rand(8, 2, 1, 1)},
            1.0,
        ),  # fmt: skip
    ]
    return LoraFile({m.key: m for m in mods}, "studio", "sdxl")


def test_dora_and_tucker_round_trip_exactly_through_kohya_as_lycoris_writes_them(tmp_path):
    src = studio_file()
    out = tmp_path / "dora.safetensors"
    write_kohya(src, out)
    tensors, meta = load_tensors(out)
    name = "lora_unet_" + CONV.replace(".", "_")
    assert {f"{name}.{k}" for k in ("lora_down.weight", "lora_mid.weight", "lora_up.weight", "dora_scale", "alpha")} <= set(tensors)  # fmt: skip
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["lora_studio.adapter_type"] == "mixed"
    back = read_lora(out, sidecars=False)
    assert back.source_format == "lycoris" and back.rank == 4
    for key, m in src.modules.items():
        n = back.modules[key]
        assert (n.kind, n.alpha, set(n.tensors)) == (m.kind, m.alpha, set(m.tensors)), key
        assert all(torch.equal(n.tensors[k], t) for k, t in m.tensors.items()), key


def test_diffusers_writer_holds_per_row_dora_and_refuses_what_peft_cannot(tmp_path):
    src = studio_file()
    rows = LoraFile({k: m for k, m in src.modules.items() if k.endswith("to_q")}, "studio", "sdxl")
    conv = ModuleDelta("unet", CONV, "dora", {"down": rand(4, 6, 3, 3), "up": rand(8, 4, 1, 1), "magnitude": rand(8, 1, 1, 1)}, 2.0)  # fmt: skip
    rows.modules[conv.key] = conv
    write_diffusers(rows, tmp_path / "dora.safetensors")
    tensors, meta = load_tensors(tmp_path / "dora.safetensors")
    assert tensors[f"unet.{Q}.lora_magnitude_vector"].shape == (8,)  # peft's own shapes
    assert tensors[f"unet.{CONV}.lora_magnitude_vector"].shape == (1, 8, 1, 1)
    assert '"unet.use_dora": true' in meta["lora_adapter_metadata"]
    back = read_lora(tmp_path / "dora.safetensors", sidecars=False)
    for key, m in rows.modules.items():
        n = back.modules[key]
        assert (n.kind, n.alpha) == (m.kind, m.alpha)
        assert all(torch.equal(n.tensors[k], t) for k, t in m.tensors.items()), key
    with pytest.raises(LoraFileError, match=r"conv1 is a LoCon Tucker module \(lora_mid\)"):
        write_diffusers(src, tmp_path / "x.safetensors")
    per_column = LoraFile({k: m for k, m in src.modules.items() if "conv1" in k}, "studio", "sdxl")
    per_column.modules[f"unet.{CONV}"] = ModuleDelta("unet", CONV, "dora", {**conv.tensors, "magnitude": rand(1, 6, 1, 1)})  # fmt: skip
    with pytest.raises(LoraFileError, match=r"conv1 is a DoRA normalised per input column"):
        write_diffusers(per_column, tmp_path / "y.safetensors")
    plain = ModuleDelta("unet", Q.replace("to_q", "to_k"), "lora", {"down": rand(2, 12), "up": rand(8, 2)})
    mixed = LoraFile({f"unet.{Q}": src.modules[f"unet.{Q}"], plain.key: plain}, "studio", "sdxl")
    with pytest.raises(LoraFileError, match="unet mixes LoRA and DoRA modules"):
        write_diffusers(mixed, tmp_path / "z.safetensors")


def test_peft_magnitude_layouts_read_into_the_lycoris_layout():
    state = {
        f"unet.{Q}.lora_A.weight": rand(4, 12),
        f"unet.{Q}.lora_B.weight": rand(8, 4),
        f"unet.{Q}.lora_magnitude_vector": rand(8),
        f"unet.{CONV}.lora_A.weight": rand(4, 6, 3, 3),
        f"unet.{CONV}.lora_B.weight": rand(8, 4, 1, 1),
        f"unet.{CONV}.lora_magnitude_vector": rand(1, 8, 1, 1),
    }
    modules, source = convert_state_dict(state)
    assert source == "diffusers" and {m.kind for m in modules.values()} == {"dora"}
    assert modules[f"unet.{Q}"].tensors["magnitude"].shape == (8, 1)
    conv = modules[f"unet.{CONV}"].tensors["magnitude"]
    assert conv.shape == (8, 1, 1, 1) and torch.equal(conv.flatten(), state[f"unet.{CONV}.lora_magnitude_vector"].flatten())  # fmt: skip


def test_dora_on_lokr_or_loha_is_refused_by_name():
    name = "lora_unet_" + Q.replace(".", "_")
    state = {f"{name}.lokr_w1": rand(2, 3), f"{name}.lokr_w2": rand(4, 4), f"{name}.dora_scale": rand(8, 1)}
    with pytest.raises(LoraFileError, match="DoRA weight decomposition on lokr is not supported yet"):
        convert_state_dict(state)
