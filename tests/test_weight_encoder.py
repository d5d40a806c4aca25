"""AutoLoRA's weight encoder sees only what a LoRA's weights do: refactored factors, another alpha / rank
convention, another file format or a Kronecker adapter written as LoKr give the same embedding (cosine
>= 0.999); a different LoRA does not; missing modules and any rank are fine; bad input is named."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from composer.adapters.host import AdapterHost
from composer.formats import LoraFile, ModuleDelta, read_lora, write_diffusers, write_kohya
from retrieval.encoder import WeightEncoder, adapter_deltas, module_shapes
from tests.helpers import random_lora


@pytest.fixture(scope="module")
def rig(tiny_sdxl_factory):
    backbone, make = tiny_sdxl_factory
    pipe = make()
    host = AdapterHost.for_pipeline(pipe, backbone)
    base = random_lora(pipe, backbone, seed=1, rank=4, alpha=4.0)
    host.add("probe", base)
    encoder = WeightEncoder(module_shapes(host, sorted(base.modules)))
    host.remove("probe")
    yield pipe, backbone, host, encoder, base
    host.detach()


def embed(rig, lora: LoraFile) -> torch.Tensor:
    _, _, host, encoder, _ = rig
    host.add("x", lora)
    try:
        with torch.no_grad():
            return encoder(adapter_deltas(host, "x"))
    finally:
        host.remove("x")


def with_modules(lora: LoraFile, change) -> LoraFile:
    return dataclasses.replace(lora, modules={k: change(m) for k, m in lora.modules.items()})


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_only_the_product_counts(rig):
    base = rig[4]
    reference = embed(rig, base)
    assert reference.shape == (128,) and abs(float(reference.norm()) - 1) < 1e-5
    g = torch.Generator().manual_seed(9)
    mix = torch.randn(4, 4, generator=g) + 4 * torch.eye(4)  # invertible

    def refactor(m: ModuleDelta) -> ModuleDelta:  # A -> M A, B -> B M^-1
        t = m.tensors
        return dataclasses.replace(
            m, tensors={"down": mix @ t["down"], "up": t["up"] @ torch.linalg.inv(mix)}
        )

    def rescale(m: ModuleDelta) -> ModuleDelta:  # alpha x2, up / 2: the same delta
        return dataclasses.replace(m, alpha=m.alpha * 2, tensors={**m.tensors, "up": m.tensors["up"] / 2})

    def weaker(
        m: ModuleDelta,
    ) -> ModuleDelta:  # the same change at 1/1000 of the strength (real deltas ~1e-3)
        return dataclasses.replace(m, tensors={**m.tensors, "up": m.tensors["up"] / 1000})

    same = [
        cosine(embed(rig, with_modules(base, change)), reference) for change in (refactor, rescale, weaker)
    ]
    assert min(same) >= 0.999
    pipe, backbone = rig[0], rig[1]
    other = embed(rig, random_lora(pipe, backbone, seed=2, rank=4, alpha=4.0))
    # another LoRA is another point: even untrained, far further away than any invariance moves it
    assert 1 - cosine(other, reference) > 50 * max(1 - min(same), 1e-6)


def test_file_formats_and_types_that_hold_the_same_delta_embed_alike(rig, tmp_path):
    base = rig[4]
    reference = embed(rig, base)
    for write, name in ((write_kohya, "k.safetensors"), (write_diffusers, "d.safetensors")):
        write(base, tmp_path / name)
        assert cosine(embed(rig, read_lora(tmp_path / name)), reference) >= 0.999, name
    # a Kronecker adapter written as LyCORIS LoKr and read back
    g = torch.Generator().manual_seed(5)
    _, _, host, _, _ = rig
    kron = {}
    for key, m in base.modules.items():
        out, inp = host.find(key).weight.shape
        t = {"kron_a": torch.randn(2, 2, generator=g), "kron_b": torch.randn(out // 2, inp // 2, generator=g)}
        kron[key] = ModuleDelta(m.component, m.path, "kron", t, None)
    kron_file = LoraFile(modules=kron, source_format="diffusers", family="sdxl")
    reference = embed(rig, kron_file)
    write_kohya(kron_file, tmp_path / "kron.safetensors")  # LyCORIS LoKr keys
    assert cosine(embed(rig, read_lora(tmp_path / "kron.safetensors")), reference) >= 0.999
    lokr = {  # the same factors as a LoKr module of another tool
        key: dataclasses.replace(
            m, kind="lokr", tensors={"lokr_w1": m.tensors["kron_a"], "lokr_w2": m.tensors["kron_b"]}
        )
        for key, m in kron.items()
    }
    lokr_file = LoraFile(modules=lokr, source_format="lycoris", family="sdxl")
    assert cosine(embed(rig, lokr_file), reference) >= 0.999


def test_missing_modules_any_rank_and_bad_input(rig):
    pipe, backbone, _, encoder, base = rig
    half = dict(list(base.modules.items())[: len(base.modules) // 2])
    partial = embed(rig, dataclasses.replace(base, modules=half))
    assert torch.isfinite(partial).all() and abs(float(partial.norm()) - 1) < 1e-5
    rank_one = embed(rig, random_lora(pipe, backbone, seed=3, rank=1, alpha=1.0))
    assert torch.isfinite(rank_one).all()
    key = next(iter(base.modules))
    with pytest.raises(KeyError, match="no module 'unet.nowhere'"):
        encoder({"unet.nowhere": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="a delta of shape"):
        encoder({key: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="no module to encode"):
        encoder({})


def test_a_batch_embeds_each_lora_as_alone(rig):
    _, _, host, encoder, base = rig
    half = dataclasses.replace(base, modules=dict(list(base.modules.items())[::2]))
    deltas = []
    for i, lora in enumerate((base, half)):
        host.add(f"b{i}", lora)
        deltas.append(adapter_deltas(host, f"b{i}"))
        host.remove(f"b{i}")
    with torch.no_grad():
        together = encoder.embed_batch(deltas)
        alone = torch.stack([encoder(d) for d in deltas])
    assert torch.allclose(together, alone, atol=1e-5)
    assert cosine(together[0], together[1]) < 0.9999  # the half LoRA is not the whole one
