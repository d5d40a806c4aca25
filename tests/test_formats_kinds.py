"""write_kohya / read_lora for every adapter kind: Kronecker (as LoKr), LoKr, LoHa, tensor cores, mixed files."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch import nn

from composer.adapters.kron import KronAdapter
from composer.adapters.lycoris import LohaAdapter, LokrAdapter
from composer.errors import LoraFileError, UnknownKeysError
from composer.formats import (
    LoraFile,
    ModuleDelta,
    convert_state_dict,
    load_tensors,
    read_lora,
    write_diffusers,
    write_kohya,
)

G = torch.Generator().manual_seed(3)
Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # kohya: lora_unet_down_blocks_1_..._to_q
K = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
V = "up_blocks.0.attentions.1.transformer_blocks.2.attn2.to_v"
TE = "text_model.encoder.layers.0.self_attn.q_proj"
OUT, IN = 8, 12  # every module here adapts a Linear IN -> OUT


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def kron(path: str, a1: int = 2, a2: int = 3) -> ModuleDelta:
    return ModuleDelta("unet", path, "kron", {"kron_a": rand(a1, a2), "kron_b": rand(OUT // a1, IN // a2)})


def lokr(path: str, low_rank: bool = False) -> ModuleDelta:
    if low_rank:  # w1 (2, 3) and w2 (4, 4), each from rank-2 factors
        t = {
            "lokr_w1_a": rand(2, 2),
            "lokr_w1_b": rand(2, 3),
            "lokr_w2_a": rand(4, 2),
            "lokr_w2_b": rand(2, 4),
        }
        return ModuleDelta("unet", path, "lokr", t, 1.5)
    return ModuleDelta("unet", path, "lokr", {"lokr_w1": rand(2, 3), "lokr_w2": rand(4, 4)}, 4.0)


def loha(path: str, component: str = "unet") -> ModuleDelta:
    t = {
        "hada_w1_a": rand(OUT, 2),
        "hada_w1_b": rand(2, IN),
        "hada_w2_a": rand(OUT, 2),
        "hada_w2_b": rand(2, IN),
    }
    return ModuleDelta(component, path, "loha", t, 2.0)


def tensor(path: str) -> ModuleDelta:
    # IN = 3 * 4 tensorised in two modes; transform rank 1, residual rank 2
    t = {
        "tr_t.0": rand(3, 3, 1, 1),
        "tr_t.1": rand(4, 4, 1, 1),
        "tr_d.0": rand(2, 3, 2, 2),
        "tr_d.1": rand(4, 4, 2, 2),
    }
    return ModuleDelta("unet", path, "tensor", t)


def lora(path: str, component: str = "unet") -> ModuleDelta:
    return ModuleDelta(component, path, "lora", {"down": rand(2, IN), "up": rand(OUT, 2)}, 1.0)


def file_of(*deltas: ModuleDelta) -> LoraFile:
    return LoraFile({d.key: d for d in deltas}, "studio", "sdxl")


def round_trip(tmp_path, lf: LoraFile) -> tuple[LoraFile, dict[str, torch.Tensor], dict[str, str]]:
    out = tmp_path / "out.safetensors"
    write_kohya(lf, out)
    tensors, meta = load_tensors(out)
    return read_lora(out, sidecars=False), tensors, meta


def assert_same(a: LoraFile, b: LoraFile) -> None:
    assert set(a.modules) == set(b.modules)
    for key, m in a.modules.items():
        n = b.modules[key]
        assert (n.kind, n.alpha, set(n.tensors)) == (m.kind, m.alpha, set(m.tensors)), key
        assert all(torch.equal(n.tensors[k], t) for k, t in m.tensors.items()), key


CASES = {
    "kron": lambda: file_of(kron(Q), kron(K, 1, 2)),
    "lokr-full": lambda: file_of(lokr(Q)),
    "lokr-low-rank": lambda: file_of(lokr(Q, low_rank=True)),
    "loha": lambda: file_of(loha(Q), loha(TE, "text_encoder")),
    "tensor": lambda: file_of(tensor(Q), tensor(K)),
    "mixed": lambda: file_of(
        kron(Q), lokr(K), loha(V), tensor(Q.replace("to_q", "to_out.0")), lora(TE, "text_encoder")
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_every_kind_round_trips_exactly_through_kohya(tmp_path, case):
    src = CASES[case]()
    back, tensors, meta = round_trip(tmp_path, src)
    assert_same(src, back)
    kinds = src.network_kinds
    assert back.network_kinds == kinds
    assert meta["lora_studio.adapter_type"] == (kinds.pop() if len(kinds) == 1 else "mixed")
    assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_te1_")) for k in tensors)


def test_kron_is_written_as_lokr_that_lycoris_readers_apply_identically(tmp_path):
    src = file_of(kron(Q), kron(K, 1, 2))
    _, tensors, meta = round_trip(tmp_path, src)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {k for k in tensors if k.startswith(f"{name}.")} == {
        f"{name}.{s}" for s in ("lokr_w1", "lokr_w2", "alpha")
    }
    assert (
        meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == "lokr"
    )
    base = nn.Linear(IN, OUT)
    for d in src.modules.values():
        prefix = f"lora_unet_{d.path.replace('.', '_')}."
        lokr_tensors = {k.removeprefix(prefix): t for k, t in tensors.items() if k.startswith(prefix)}
        alpha = float(lokr_tensors.pop("alpha"))
        as_lokr = LokrAdapter(base, lokr_tensors, alpha).delta_weight()
        assert torch.equal(as_lokr, KronAdapter.from_delta(base, d).delta_weight())
        assert torch.equal(as_lokr, torch.kron(d.tensors["kron_a"], d.tensors["kron_b"]))
    # without our metadata the same keys read as a plain LoKr with the same delta
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(tensors, str(plain))
    lf = read_lora(plain, sidecars=False)
    assert lf.network_kinds == {"lokr"} and lf.source_format == "lycoris"
    d = lf.modules[f"unet.{Q}"]
    want = torch.kron(src.modules[f"unet.{Q}"].tensors["kron_a"], src.modules[f"unet.{Q}"].tensors["kron_b"])
    assert torch.equal(LokrAdapter.from_delta(base, d).delta_weight(), want)


def test_loha_and_tensor_metadata(tmp_path):
    src = file_of(loha(Q), tensor(K))
    back, _, meta = round_trip(tmp_path, src)
    base = nn.Linear(IN, OUT)
    d = back.modules[f"unet.{Q}"]
    assert torch.equal(
        LohaAdapter.from_delta(base, d).delta_weight(),
        LohaAdapter.from_delta(base, src.modules[d.key]).delta_weight(),
    )
    assert meta["lora_studio.adapter_type"] == "mixed" and meta["ss_network_module"] == "lycoris.kohya"
    modes = json.loads(meta["lora_studio.tensor_modes"])
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
    assert modes == {name: {"tr_t": [[3, 3, 1, 1], [4, 4, 1, 1]], "tr_d": [[2, 3, 2, 2], [4, 4, 2, 2]]}}
    _, _, meta = round_trip(tmp_path, file_of(tensor(K)))
    assert (
        meta["lora_studio.adapter_type"] == "tensor"
        and meta["ss_network_module"] == "composer.adapters.tensor"
    )
    assert "ss_network_args" not in meta and "ss_network_dim" not in meta


def test_mixed_file_marks_only_kron_modules(tmp_path):
    # a full LoKr is stored like a kron: it must stay LoKr, and the kron must come back as kron
    src = file_of(kron(Q), lokr(K), lora(TE, "text_encoder"))
    back, _, meta = round_trip(tmp_path, src)
    assert json.loads(meta["lora_studio.kron_modules"]) == [
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    ]
    assert {m.path: m.kind for m in back.modules.values()} == {Q: "kron", K: "lokr", TE: "lora"}
    assert meta["ss_network_dim"] == "2"


def test_kron_with_a_larger_than_b_is_refused_naming_module_and_shapes(tmp_path):
    big_a = kron(Q, 4, 6)  # A (4, 6), B (2, 2)
    with pytest.raises(
        LoraFileError, match=rf"unet\.{Q} is kron: .*A \(4, 6\) is larger than B \(2, 2\).*LoKr"
    ):
        write_kohya(file_of(big_a), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_tensor_core_indices_must_be_contiguous(tmp_path):
    gap = tensor(Q)
    gap.tensors["tr_t.2"] = gap.tensors.pop("tr_t.1")
    with pytest.raises(LoraFileError, match=rf"unet\.{Q} is tensor: tr_t cores are numbered 0, 2"):
        write_kohya(file_of(gap), tmp_path / "x.safetensors")
    # a file edited by hand: the reader refuses it too
    write_kohya(file_of(tensor(Q)), tmp_path / "ok.safetensors")
    tensors, meta = load_tensors(tmp_path / "ok.safetensors")
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors[f"{name}.tr_d.3"] = tensors.pop(f"{name}.tr_d.1")
    safetensors.torch.save_file(tensors, str(tmp_path / "gap.safetensors"), meta)
    with pytest.raises(LoraFileError, match=rf"gap\.safetensors: {name}\.tr_.*tr_d cores are numbered 0, 3"):
        read_lora(tmp_path / "gap.safetensors", sidecars=False)


def test_dotted_diffusers_tensor_cores_read_and_peft_style_ones_do_not():
    t = tensor(Q).tensors
    modules, fmt = convert_state_dict({f"unet.{Q}.{k}": v for k, v in t.items()})
    assert modules[f"unet.{Q}"].kind == "tensor" and fmt == "diffusers"
    with pytest.raises(UnknownKeysError):
        convert_state_dict({f"diffusion_model.{Q}.{k}": v for k, v in t.items()})


def test_write_diffusers_refuses_other_kinds_and_suggests_kohya(tmp_path):
    with pytest.raises(LoraFileError, match=rf"unet\.{Q} is kron.*--format kohya"):
        write_diffusers(file_of(lora(K), kron(Q)), tmp_path / "x.safetensors")


def test_flux_fused_layers_refuse_other_kinds(tmp_path):
    q = ModuleDelta("transformer", "transformer_blocks.0.attn.to_q", "lokr", lokr(Q).tensors, 4.0)
    proj = ModuleDelta("transformer", "transformer_blocks.0.attn.to_out.0", "lokr", lokr(Q).tensors, 4.0)
    flux = LoraFile({q.key: q}, "studio", "flux")
    with pytest.raises(
        LoraFileError, match=r"transformer\.transformer_blocks\.0\.attn\.to_q is lokr: .*img_attn_qkv fuses"
    ):
        write_kohya(flux, tmp_path / "x.safetensors")
    flux = LoraFile({proj.key: proj}, "studio", "flux")  # an unfused BFL layer holds it
    back, tensors, _ = round_trip(tmp_path, flux)
    assert set(tensors) == {
        f"lora_unet_double_blocks_0_img_attn_proj.{k}" for k in ("lokr_w1", "lokr_w2", "alpha")
    }
    assert_same(flux, back)


def test_rewriting_drops_stale_kind_metadata(tmp_path):
    back, _, _ = round_trip(tmp_path, file_of(kron(Q), kron(K)))
    back.modules = {f"unet.{Q}": lora(Q)}  # the same file, now plain LoRA
    write_kohya(back, tmp_path / "plain.safetensors")
    _, meta = load_tensors(tmp_path / "plain.safetensors")
    assert meta["lora_studio.adapter_type"] == "lora" and meta["ss_network_module"] == "networks.lora"
    assert "ss_network_args" not in meta and "lora_studio.kron_modules" not in meta
    assert read_lora(tmp_path / "plain.safetensors").network_kinds == {"lora"}


def test_incomplete_lycoris_modules_are_refused(tmp_path):
    both = lokr(Q)
    both.tensors["lokr_w1_a"] = rand(2, 2)
    with pytest.raises(LoraFileError, match=rf"unet\.{Q} is lokr: LoKr needs exactly one of lokr_w1 or"):
        write_kohya(file_of(both), tmp_path / "x.safetensors")
    half = loha(Q)
    del half.tensors["hada_w2_b"]
    with pytest.raises(LoraFileError, match=rf"unet\.{Q} is loha: LoHa weights missing: hada_w2_b"):
        write_kohya(file_of(half), tmp_path / "x.safetensors")
