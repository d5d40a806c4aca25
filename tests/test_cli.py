"""The command line: import, list, show, export, render; errors are one line and a non-zero exit."""

from __future__ import annotations

import json

import torch
from PIL import Image
from typer.testing import CliRunner

from app.cli import app
from composer.formats import write_diffusers
from tests.helpers import random_lora

runner = CliRunner()


def test_cli_end_to_end(tmp_path, tiny_sdxl_factory):
    backbone, make = tiny_sdxl_factory
    src = tmp_path / "loras"
    src.mkdir()
    pipe = make()
    for i, name in enumerate(["alpha", "beta"]):
        write_diffusers(
            random_lora(pipe, backbone, seed=i), src / f"{name}.safetensors", trigger_words=[f"{name}tok"]
        )
    (src / "notes.ckpt").write_bytes(b"\x80\x04K\x01.")  # a pickle in the folder: refused, the rest imported
    data = ["--data-dir", str(tmp_path / "data")]

    result = runner.invoke(app, ["import", str(src), str(src / "notes.ckpt"), *data])
    assert result.exit_code == 1, result.output
    assert "2 imported" in result.output and "1 failed" in result.output and "pickle" in result.output

    result = runner.invoke(app, ["list", *data])
    assert result.exit_code == 0 and "alpha" in result.output and "beta" in result.output
    result = runner.invoke(app, ["list", "betatok", *data])
    assert "beta" in result.output and "alpha" not in result.output
    result = runner.invoke(app, ["search", "ALPHA", *data])  # ranked full-text search, word prefixes
    assert result.exit_code == 0 and "alpha" in result.output and "beta" not in result.output
    float(result.output.split()[0])  # the score comes first (bm25: relative, near 0 in a tiny catalog)
    assert "no LoRAs found" in runner.invoke(app, ["search", "gamma", *data]).output

    result = runner.invoke(app, ["show", "alpha", *data])
    assert result.exit_code == 0 and "sdxl" in result.output and "alphatok" in result.output

    out = tmp_path / "alpha.kohya.safetensors"
    result = runner.invoke(app, ["export", "alpha", "--format", "kohya", "--out", str(out), *data])
    assert result.exit_code == 0 and out.is_file()

    png = tmp_path / "r.png"
    args = [
        "render",
        "--backbone",
        "sdxl",
        "--prompt",
        "a red circle on the left",
        "--lora",
        "alpha:0.7",
        "--lora",
        "beta",
        "--steps",
        "2",
    ]
    result = runner.invoke(app, [*args, "--seed", "3", "--out", str(png), *data])
    assert result.exit_code == 0, result.output
    meta = json.loads(Image.open(png).text["lora_studio"])
    assert [(x["name"], x["weight"]) for x in meta["loras"]] == [("alpha", 0.7), ("beta", 1.0)]

    left = Image.new("L", (32, 32), 0)
    left.paste(255, (0, 0, 16, 32))
    left.save(tmp_path / "left.png")
    regional = tmp_path / "regional.png"
    result = runner.invoke(
        app,
        [*args, "--method", "regional", "--mask", f"alpha={tmp_path / 'left.png'}", "--param", "feather=2"]
        + ["--param", "prompts=alpha: a red circle, white background", "--out", str(regional), *data],
    )
    assert result.exit_code == 0, result.output
    meta = json.loads(Image.open(regional).text["lora_studio"])
    assert meta["method"] == "regional" and list(meta["method_params"]["regions"]) == ["alpha"]
    assert meta["method_params"]["feather"] == 2
    assert meta["method_params"]["prompts"] == "alpha: a red circle, white background"
    masks = sorted(tmp_path.glob("regional.regional*.png"))  # the masks used, beside the render
    assert [m.name for m in masks] == ["regional.regional0.png", "regional.regional1.png"]
    assert "region: alpha (50%)" in result.output
    for bad, message in [
        (["--mask", "alpha"], "write NAME=PICTURE"),
        (["--mask", f"alpha={tmp_path / 'missing.png'}"], "no file"),
        (["--mask", f"gamma={tmp_path / 'left.png'}"], "masks for LoRAs not in the stack: gamma"),
        (["--param", "blur=1"], "regional has no parameter blur"),
        (["--param", "prompts=beta: x"], "a region prompt for beta, which has no painted region"),
    ]:
        result = runner.invoke(app, [*args, "--method", "regional", *bad, "--out", str(regional), *data])
        assert result.exit_code == 1 and message in result.output, result.output

    contrastive = tmp_path / "clora.png"
    clora_args = ["render", "--backbone", "sdxl", "--prompt", "alphatok left, betatok right", "--steps", "2"]
    clora_args += ["--lora", "alpha", "--lora", "beta", "--method", "clora", "--param", "threshold=0.4"]
    result = runner.invoke(app, [*clora_args, "--out", str(contrastive), *data])
    assert result.exit_code == 0, result.output
    assert json.loads(Image.open(contrastive).text["lora_studio"])["method_params"]["threshold"] == 0.4
    masks = sorted(p.name for p in tmp_path.glob("clora.clora*.png"))  # base, alpha, beta
    assert masks == ["clora.clora0.png", "clora.clora1.png", "clora.clora2.png"]
    assert "clora: alpha (" in result.output
    result = runner.invoke(
        app, [*clora_args[:4], "alphatok only", *clora_args[5:], "--out", str(contrastive), *data]
    )
    assert result.exit_code == 1 and "does not contain 'beta''s trigger word ('betatok')" in result.output

    result = runner.invoke(app, ["render", "--backbone", "sdxl", "--prompt", "x", "--lora", "alpah", *data])
    assert result.exit_code == 1 and "alpah" in result.output and "alpha" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["export", "alpha", "--format", "ckpt", *data])
    assert result.exit_code == 1 and "unknown export format" in result.output


def test_cli_prompt_tags_activate_catalog_loras(tmp_path, tiny_sdxl_factory):
    backbone, make = tiny_sdxl_factory
    lora = tmp_path / "alpha.safetensors"
    write_diffusers(random_lora(make(), backbone, seed=1), lora)
    data = ["--data-dir", str(tmp_path / "data")]
    assert runner.invoke(app, ["import", str(lora), *data]).exit_code == 0
    args = ["render", "--backbone", "sdxl", "--steps", "2", "--height", "32", "--width", "32", *data]

    tagged, explicit = tmp_path / "tagged.png", tmp_path / "explicit.png"
    result = runner.invoke(app, [*args, "--prompt", "a red circle <lora:alpha:0.7>", "--out", str(tagged)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, [*args, "--prompt", "a red circle", "--lora", "alpha:0.7", "--out", str(explicit)]
    )
    assert result.exit_code == 0, result.output
    meta = json.loads(Image.open(tagged).text["lora_studio"])
    assert meta["prompt"] == "a red circle" and meta["prompt_tags"] == [{"name": "alpha", "weight": 0.7}]
    assert [(x["name"], x["weight"]) for x in meta["loras"]] == [("alpha", 0.7)]
    assert list(Image.open(tagged).getdata()) == list(Image.open(explicit).getdata())

    for prompt, message in [
        ("x <lora:alpah:0.5>", "prompt tag <lora:alpah:0.5>: no adapter named 'alpah'; did you mean 'alpha'"),
        ("x <lora:alpha:lots>", "weight 'lots' is not a number"),
        ("x <lora:alpha:<lora:alpha>>", "prompt tags cannot nest"),
    ]:
        result = runner.invoke(app, [*args, "--prompt", prompt, "--out", str(tmp_path / "bad.png")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_cli_names_the_family_of_a_single_file_checkpoint_it_cannot_load(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "v1-5-pruned.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}, path)
    args = ["render", "--backbone", "sdxl", "--model", str(path), "--prompt", "x", "--steps", "1"]
    result = runner.invoke(
        app, [*args, "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "r.png")]
    )
    assert result.exit_code == 1 and "is an SD 1.x checkpoint, not one of the sdxl family" in result.output
    assert "Traceback" not in result.output


def test_a_failing_render_is_one_line_naming_the_lora_and_the_trace_is_logged(
    tmp_path, tiny_sdxl_factory, monkeypatch, caplog
):
    from composer.adapters import lora as lora_module
    from composer.formats.model import LoraFile, ModuleDelta

    backbone, make = tiny_sdxl_factory
    pipe = make()
    data = ["--data-dir", str(tmp_path / "data")]
    ok = random_lora(pipe, backbone, seed=1)
    wrong = {"unet.add_embedding.linear_1": ModuleDelta(  # 81 inputs; the layer has 80
        "unet", "add_embedding.linear_1", "lora", {"down": torch.ones(2, 81), "up": torch.ones(128, 2)}
    )}  # fmt: skip
    write_diffusers(ok, tmp_path / "fine.safetensors")
    write_diffusers(LoraFile(wrong, "diffusers", "sdxl"), tmp_path / "misfit.safetensors")
    result = runner.invoke(
        app, ["import", str(tmp_path / "fine.safetensors"), str(tmp_path / "misfit.safetensors"), *data]
    )
    assert result.exit_code == 0, result.output
    render = [
        "render",
        "--backbone",
        "sdxl",
        "--prompt",
        "x",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
    ]
    out = ["--out", str(tmp_path / "r.png"), *data]

    result = runner.invoke(app, [*render, "--lora", "misfit", *out])  # refused as it is made resident
    assert result.exit_code == 1 and "LoRA 'misfit', module unet.add_embedding.linear_1" in result.output

    def broken(self, *args, **kwargs):  # an adapter that fails while the model runs
        raise RuntimeError("shapes do not fit\nsecond line")

    from composer.adapters.layer import AdaptedModule

    monkeypatch.setattr(lora_module.LoraAdapter, "forward_delta", broken)  # adapter by adapter
    monkeypatch.setattr(AdaptedModule, "_stacked_delta", broken)  # plain LoRAs' own path
    with caplog.at_level("ERROR"):
        result = runner.invoke(app, [*render, "--lora", "fine:0.5", *out])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: render failed: LoRA 'fine' on module unet."), line
    assert line.endswith("RuntimeError: shapes do not fit")
    assert any(r.exc_info and "render failed" in r.getMessage() for r in caplog.records), (
        "the trace is logged"
    )
