"""FLUX kohya export in the BFL layout (fused qkv / linear1) and its lossless split back on read."""

from __future__ import annotations

import pytest
import torch

from composer.errors import LoraFileError, UnknownKeysError
from composer.formats import LoraFile, ModuleDelta, convert_state_dict, load_tensors, read_lora, write_kohya
from composer.formats.names import bfl_to_paths, path_to_bfl

G = torch.Generator().manual_seed(3)
INNER = 8  # tiny FLUX: 2 heads of 4


def flux_linears() -> dict[str, tuple[int, int]]:
    """(in, out) of every linear layer of a small FLUX transformer, by diffusers path."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=4,
            num_attention_heads=2,
            joint_attention_dim=6,
            pooled_projection_dim=5,
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 0),
        )
    return {
        n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }


def delta(path: str, inp: int, out: int, r: int = 2, alpha: float | None = None, component="transformer"):
    d, u = torch.randn(r, inp, generator=G), torch.randn(out, r, generator=G)
    return ModuleDelta(component, path, "lora", {"down": d, "up": u}, alpha)


def flux_file(*deltas: ModuleDelta, family: str | None = "flux") -> LoraFile:
    return LoraFile({d.key: d for d in deltas}, "diffusers", family)


def product(m: ModuleDelta) -> torch.Tensor:
    return m.scale * (m.tensors["up"].double() @ m.tensors["down"].double())


def round_trip(tmp_path, lora: LoraFile) -> tuple[LoraFile, dict[str, torch.Tensor]]:
    p = tmp_path / "k.safetensors"
    write_kohya(lora, p)
    return read_lora(p), load_tensors(p)[0]


def assert_identical(a: ModuleDelta, b: ModuleDelta) -> None:
    assert (a.key, a.rank, a.alpha) == (b.key, b.rank, b.alpha)
    assert torch.equal(a.tensors["down"], b.tensors["down"]) and torch.equal(a.tensors["up"], b.tensors["up"])


def test_every_flux_linear_has_a_bfl_name_that_reads_back_to_it():
    linears = flux_linears()
    assert len(linears) > 40
    for path, (_, out) in linears.items():
        target = path_to_bfl(path)
        assert target is not None, path
        assert path in target.group
        rows = out // target.ratios[target.group.index(path)] * sum(target.ratios)
        assert tuple(p for p, _ in bfl_to_paths(target.name, rows)) == target.group, path
    assert path_to_bfl("transformer_blocks.0.attn.norm_q") is None
    assert path_to_bfl("pos_embed") is None


def test_flux_round_trip_gives_every_delta_back_at_its_rank(tmp_path):
    """Every linear of FLUX, ranks 1-4, alphas None / shared / different within fused layers."""
    mods = []
    for n, (path, (inp, out)) in enumerate(flux_linears().items()):
        r = 1 + n % 4
        if path.startswith("transformer_blocks.0.") or path.startswith("single_transformer_blocks.0."):
            alpha = r / 2  # one shared scale (0.5) per fused layer: tensors and alphas come back unchanged
        elif path.startswith("single_transformer_blocks.1."):
            alpha = None  # scale 1: unchanged too
        else:
            alpha = [None, 1.0, 3.0, 0.25][n % 4]  # different scales in a fused layer: folded into up
        mods.append(delta(path, inp, out, r=r, alpha=alpha))
    src = flux_file(*mods)
    back, tensors = round_trip(tmp_path, src)
    assert not any(k.startswith("lora_transformer_") for k in tensors)
    assert "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight" in tensors
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in tensors
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in tensors
    assert set(back.modules) == set(src.modules)
    assert back.family == "flux" and back.source_format == "kohya"
    for key, m in src.modules.items():
        n = back.modules[key]
        assert n.rank == m.rank, key
        assert torch.allclose(product(n), product(m), rtol=1e-6, atol=1e-6), key
        if m.path.startswith(("transformer_blocks.0.", "single_transformer_blocks.")):
            assert_identical(n, m)
    # one shared scale: alpha = scale * total rank; qkv of block 0 has ranks r, r+1, r+2
    qkv = [m for m in mods if m.path.startswith("transformer_blocks.0.attn.to_")][:3]
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 0.5 * sum(m.rank for m in qkv)


def test_shared_scale_fuses_block_diagonally(tmp_path):
    q, k, v = (delta(f"transformer_blocks.0.attn.to_{x}", INNER, INNER, r=2, alpha=1.0) for x in "qkv")
    _, tensors = round_trip(tmp_path, flux_file(q, k, v))
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    assert torch.equal(down, torch.cat([q.tensors["down"], k.tensors["down"], v.tensors["down"]]))
    assert torch.equal(up, torch.block_diag(q.tensors["up"], k.tensors["up"], v.tensors["up"]))
    assert tensors[f"{name}.alpha"].item() == 3.0  # scale 0.5 * rank 6


def test_fused_layer_with_missing_members(tmp_path):
    q = delta("transformer_blocks.0.attn.to_q", INNER, INNER, r=2, alpha=2.0)
    v = delta("transformer_blocks.0.attn.to_v", INNER, INNER, r=3, alpha=3.0)  # same scale, other rank
    k1 = delta("single_transformer_blocks.1.attn.to_k", INNER, INNER, r=2, alpha=4.0)
    mlp = delta("single_transformer_blocks.1.proj_mlp", INNER, 4 * INNER, r=4, alpha=1.0)  # other scale
    src = flux_file(q, v, k1, mlp, family=None)  # family None with a transformer: FLUX
    back, tensors = round_trip(tmp_path, src)
    up = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape == (3 * INNER, 5) and not up[INNER : 2 * INNER].any()  # no to_k: zero rows
    up1 = tensors["lora_unet_single_blocks_1_linear1.lora_up.weight"]
    assert up1.shape == (7 * INNER, 6) and not up1[:INNER].any() and not up1[2 * INNER : 3 * INNER].any()
    assert tensors["lora_unet_single_blocks_1_linear1.alpha"].item() == 6.0  # folded: alpha = rank
    assert set(back.modules) == set(src.modules)  # the missing members are not invented
    assert_identical(back.modules[q.key], q)
    assert_identical(back.modules[v.key], v)
    for m in (k1, mlp):
        n = back.modules[m.key]
        assert n.rank == m.rank and n.alpha == m.rank  # scale folded into up
        assert torch.allclose(product(n), product(m), rtol=1e-6, atol=1e-6)


def test_final_layer_scale_is_folded_and_rows_swapped(tmp_path):
    norm = delta("norm_out.linear", INNER, 2 * INNER, r=2, alpha=3.0)
    proj = delta("proj_out", INNER, 4, r=2, alpha=1.0)
    back, tensors = round_trip(tmp_path, flux_file(norm, proj))
    name = "lora_unet_final_layer_adaLN_modulation_1"
    up = tensors[f"{name}.lora_up.weight"]
    expected = 1.5 * norm.tensors["up"]
    assert torch.allclose(up, torch.cat([expected[INNER:], expected[:INNER]]))  # BFL: (shift, scale)
    assert (
        tensors[f"{name}.alpha"].item() == 2.0 and tensors["lora_unet_final_layer_linear.alpha"].item() == 2.0
    )
    for m in (norm, proj):
        assert torch.allclose(product(back.modules[m.key]), product(m), atol=1e-6)


def kohya(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> dict:
    sd = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    return sd | ({f"{name}.alpha": torch.tensor(alpha)} if alpha is not None else {})


def test_shared_down_community_file_is_read_as_before():
    down, up = torch.randn(4, INNER, generator=G), torch.randn(3 * INNER, 4, generator=G)
    near = torch.block_diag(*(torch.randn(INNER, 2, generator=G) for _ in range(3)))
    near[0, 5] = 1e-3  # one entry outside q's block: not block-diagonal
    sd = kohya("lora_unet_double_blocks_0_img_attn_qkv", down, up, 2.0) | kohya(
        "lora_unet_double_blocks_1_img_attn_qkv", torch.randn(6, INNER, generator=G), near, 6.0
    )
    zero = torch.zeros(3 * INNER, 4)  # an untrained layer says nothing about its blocks
    sd |= kohya("lora_unet_double_blocks_2_img_attn_qkv", down, zero, None)
    mods, _ = convert_state_dict(sd)
    near_down = sd["lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight"]
    for block, d, u, alpha in ((0, down, up, 2.0), (1, near_down, near, 6.0), (2, down, zero, None)):
        for n, x in enumerate("qkv"):
            m = mods[f"transformer.transformer_blocks.{block}.attn.to_{x}"]
            assert m.tensors["down"] is d and m.rank == d.shape[0] and m.alpha == alpha
            assert torch.equal(m.tensors["up"], u[n * INNER : (n + 1) * INNER])


def test_sd_scripts_style_block_diagonal_file_is_split():
    """sd-scripts' convert_flux_lora writes cat(down) + block-diagonal up with alpha = total rank."""
    downs = [torch.randn(2, INNER, generator=G) for _ in range(4)]
    ups = [torch.randn(rows, 2, generator=G) for rows in (INNER, INNER, INNER, 4 * INNER)]
    sd = kohya("lora_unet_single_blocks_0_linear1", torch.cat(downs), torch.block_diag(*ups), 8.0)
    mods, _ = convert_state_dict(sd)
    paths = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    assert set(mods) == {f"transformer.single_transformer_blocks.0.{p}" for p in paths}
    for p, d, u in zip(paths, downs, ups, strict=True):
        m = mods[f"transformer.single_transformer_blocks.0.{p}"]
        assert torch.equal(m.tensors["down"], d) and torch.equal(m.tensors["up"], u)
        assert m.rank == 2 and m.alpha == 2.0  # scale 1 kept


def test_onetrainer_names_are_still_read():
    sd = (
        kohya(
            "lora_transformer_transformer_blocks_0_attn_to_q",
            *torch.randn(2, 2, INNER, generator=G).unbind(),
            1.0,
        )
        | kohya(
            "lora_transformer_single_transformer_blocks_1_proj_mlp",
            torch.randn(2, INNER, generator=G),
            torch.randn(4 * INNER, 2, generator=G),
            1.0,
        )  # fmt: skip
        | kohya(
            "lora_transformer_norm_out_linear",
            torch.randn(2, INNER, generator=G),
            torch.randn(2 * INNER, 2, generator=G),
            None,
        )  # fmt: skip
    )
    sd["lora_transformer_transformer_blocks_0_attn_to_q.lora_up.weight"] = torch.randn(INNER, 2, generator=G)
    mods, fmt = convert_state_dict(sd)
    assert fmt == "kohya"
    assert set(mods) == {
        "transformer.transformer_blocks.0.attn.to_q",
        "transformer.single_transformer_blocks.1.proj_mlp",
        "transformer.norm_out.linear",
    }
    assert torch.equal(
        mods["transformer.norm_out.linear"].tensors["up"],
        sd["lora_transformer_norm_out_linear.lora_up.weight"],
    )  # OneTrainer keeps diffusers row order


def test_members_that_cannot_be_fused_are_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    q = delta("transformer_blocks.0.attn.to_q", INNER, INNER)
    k = delta("transformer_blocks.0.attn.to_k", INNER + 1, INNER)
    with pytest.raises(LoraFileError, match="double_blocks_0_img_attn_qkv: input shapes differ"):
        write_kohya(flux_file(q, k), p)
    k = delta("transformer_blocks.0.attn.to_k", INNER, INNER + 2)
    with pytest.raises(LoraFileError, match="double_blocks_0_img_attn_qkv: output rows do not fit"):
        write_kohya(flux_file(q, k), p)
    mlp = delta("single_transformer_blocks.0.proj_mlp", INNER, 2 * INNER)
    q1 = delta("single_transformer_blocks.0.attn.to_q", INNER, INNER)
    with pytest.raises(LoraFileError, match="single_blocks_0_linear1: output rows"):
        write_kohya(flux_file(q1, mlp), p)
    loha = ModuleDelta(
        "transformer", "transformer_blocks.0.attn.to_k", "loha", {"hada_w1_a": torch.ones(2, 2)}
    )
    with pytest.raises(LoraFileError, match="transformer.transformer_blocks.0.attn.to_k is loha"):
        write_kohya(flux_file(q, loha), p)
    conv = ModuleDelta(
        "transformer",
        "transformer_blocks.0.attn.to_k",
        "lora",
        {"down": torch.ones(2, INNER, 1, 1), "up": torch.ones(INNER, 2, 1, 1)},
    )
    with pytest.raises(LoraFileError, match="to_k: double_blocks_0_img_attn_qkv is a linear layer"):
        write_kohya(flux_file(q, conv), p)
    assert not p.exists()


def test_flux_modules_without_a_bfl_name_are_named(tmp_path):
    odd = [
        delta("transformer_blocks.0.attn.norm_q", 4, 4),
        delta("custom_head.linear", 4, 4),
        delta("transformer_blocks.0.attn.to_q", INNER, INNER),
    ]
    with pytest.raises(UnknownKeysError, match="2 FLUX modules have no BFL name") as e:
        write_kohya(flux_file(*odd), tmp_path / "x.safetensors")
    assert e.value.keys == ["transformer.transformer_blocks.0.attn.norm_q", "transformer.custom_head.linear"]
    assert not list(tmp_path.iterdir())


def test_text_encoders_keep_their_kohya_names(tmp_path):
    q = delta("transformer_blocks.0.attn.to_q", INNER, INNER, alpha=1.0)
    clip = delta("text_model.encoder.layers.0.self_attn.q_proj", 4, 4, alpha=1.0, component="text_encoder")
    t5 = delta("encoder.block.0.layer.0.SelfAttention.q", 4, 4, component="text_encoder_2")
    back, tensors = round_trip(tmp_path, flux_file(q, clip, t5))
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in tensors
    for m in (q, clip, t5):
        assert_identical(back.modules[m.key], m)
