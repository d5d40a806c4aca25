"""Shared fixtures: everything is built offline; nothing downloads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LORA_STUDIO_BUNDLED", "false")  # tests that want the bundled adapters turn them on

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import random_lora  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_sdxl_factory():
    from composer.backbones import get_backbone, load_pipeline

    backbone = get_backbone("sdxl")
    return backbone, lambda: load_pipeline(backbone, "tiny")


@pytest.fixture(scope="session")
def tiny_flux_factory():
    from composer.backbones import get_backbone, load_pipeline

    backbone = get_backbone("flux")
    return backbone, lambda: load_pipeline(backbone, "tiny")


@pytest.fixture
def make_lora():
    return random_lora
