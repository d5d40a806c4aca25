"""Backbones: real architectures on the meta device, tiny variants, offline tokenizers, loading code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from composer.adapters.host import AdapterHost
from composer.backbones import BACKBONES, count_params, get_backbone, load_pipeline
from composer.backbones.tokenizers import clip_tokenizer, t5_tokenizer
from composer.errors import BackboneError
from composer.formats.model import LoraFile, ModuleDelta
from tests.helpers import render


def meta_lora(denoiser, names, component, rank) -> LoraFile:
    modules = {}
    for n in names:
        m = denoiser.get_submodule(n)
        tensors = {
            "down": torch.empty(rank, m.in_features, device="meta"),
            "up": torch.empty(m.out_features, rank, device="meta"),
        }
        d = ModuleDelta(component, n, "lora", tensors, float(rank))
        modules[d.key] = d
    return LoraFile(modules, "diffusers", None)


def test_real_sdxl_unet_counts():
    backbone = get_backbone("sdxl")
    unet = backbone.build_meta_denoiser()
    assert count_params(unet) == 2_567_463_684
    targets = backbone.target_modules(unet)
    assert len(targets) == 560
    for rank, expected in [(1, 1_451_520), (4, 5_806_080), (8, 11_612_160)]:
        host = AdapterHost({"unet": unet})
        host.add("l", meta_lora(unet, targets, "unet", rank))
        assert host.parameter_count("l") == expected
        host.detach()
    assert count_params(unet) == 2_567_463_684  # detach put the original modules back


def test_real_flux_transformer_count():
    backbone = get_backbone("flux")
    transformer = backbone.build_meta_denoiser()
    assert count_params(transformer) == 11_901_408_320
    targets = backbone.target_modules(transformer)
    # 19 double blocks x 14 linears (attention 8, two feed-forwards 4, two modulations 2) + 38 single blocks x 6
    assert len(targets) == 19 * 14 + 38 * 6


def test_clip_tokenizer_matches_openai_ids():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    # token ids of openai/clip-vit-large-patch14 for this text
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    small = clip_tokenizer(8000)
    assert small("a red circle").input_ids[1:-1] == [320, 736, 7117]


def test_t5_tokenizer_encodes_any_text():
    tok = t5_tokenizer()
    ids = tok("a red circle, zqxj!").input_ids
    assert ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids
    assert "▁circle" in tok.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_tiny_saved_in_diffusers_layout_loads_back_identically(family, tmp_path):
    backbone = get_backbone(family)
    pipe = load_pipeline(backbone, "tiny")
    pipe.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "model_index.json").is_file()
    again = load_pipeline(backbone, tmp_path / "model")
    np.testing.assert_allclose(render(pipe), render(again), atol=1e-5)
    assert not getattr(again, backbone.denoiser).training


def test_wrong_family_directory_is_refused(tmp_path):
    load_pipeline(get_backbone("flux"), "tiny").save_pretrained(tmp_path / "flux")
    with pytest.raises(BackboneError, match="FluxPipeline"):
        load_pipeline(get_backbone("sdxl"), tmp_path / "flux")


def test_missing_model_and_pickle_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="not a diffusers pipeline directory"):
        load_pipeline(get_backbone("sdxl"), tmp_path)
    (tmp_path / "m.ckpt").write_bytes(b"\x80\x04junk")
    with pytest.raises(BackboneError, match="pickle"):
        load_pipeline(get_backbone("sdxl"), tmp_path / "m.ckpt")
    with pytest.raises(BackboneError, match="unknown backbone"):
        get_backbone("sd3")


def test_pipelines_load_from_several_threads_at_once(tmp_path):
    """diffusers' lazy imports are not thread-safe; load_pipeline serialises loads (fresh process: the race
    only happens on a process's first imports)."""
    import subprocess
    import sys

    code = (
        "import threading\n"
        "from composer.backbones import get_backbone, load_pipeline\n"
        "errors = []\n"
        "def load(name):\n"
        "    try:\n"
        "        load_pipeline(get_backbone(name), 'tiny')\n"
        "    except Exception as exc:\n"
        "        errors.append(repr(exc))\n"
        "threads = [threading.Thread(target=load, args=(n,)) for n in ('sdxl', 'flux', 'sdxl', 'flux')]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "assert not errors, errors\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
