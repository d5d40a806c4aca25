"""A new adapter type lives in one file and one registry line: this module defines a per-output-channel scale
adapter ((IA)^3-like: dW = diag(s) W0) and, registered for these tests only, trains it, saves it into the
catalog, re-imports the file and renders with it, all through the CLI. Nothing outside this file names it."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from app.cli import app
from app.settings import Settings
from app.studio import Studio
from composer.adapters import registry
from composer.adapters.base import AdapterType, Recipe, TrainSpec
from composer.errors import AdapterError, LoraFileError
from composer.formats.model import ModuleDelta
from composer.formats.readers import read_lora

KIND = "chanscale"


class ChannelScaleAdapter(nn.Module):
    """dW = s[:, None] * W0 on a Linear: one learned scale per output channel, zero at the start."""

    kind = KIND
    file_kind = KIND
    recipe = Recipe(steps=20, learning_rate=1e-2, rank=1, conv=False)
    lycoris_algo = None
    network_module = "tests.test_new_adapter_type"
    file_roles = ("chan_scale",)
    alpha = None

    def __init__(self, base: nn.Module, scale: torch.Tensor, *, trainable: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"a channel scale adapts Linear layers, not a {type(base).__name__}")
        if tuple(scale.shape) != (base.out_features,):
            raise AdapterError(f"chan_scale {tuple(scale.shape)} does not fit {base.out_features} outputs")
        self.scale = nn.Parameter(scale.detach().to(base.weight).clone(), requires_grad=trainable)
        self._base = [base]  # W0 is not this module's parameter

    @classmethod
    def create_for(
        cls, base: nn.Module, config: TrainSpec, generator: torch.Generator
    ) -> ChannelScaleAdapter:
        return cls(base, torch.zeros(getattr(base, "out_features", 0)), trainable=True)

    @classmethod
    def from_delta(cls, base: nn.Module, delta: ModuleDelta) -> ChannelScaleAdapter:
        if set(delta.tensors) != {"chan_scale"}:
            raise AdapterError(f"{delta.key}: a chanscale delta holds chan_scale only")
        return cls(base, delta.tensors["chan_scale"])

    @classmethod
    def reads_role(cls, role: str) -> bool:
        return role in cls.file_roles

    @classmethod
    def kohya_keys(cls, delta: ModuleDelta, where: str) -> dict[str, torch.Tensor]:
        if set(delta.tensors) != {"chan_scale"}:
            raise LoraFileError(f"{where}: a chanscale delta holds chan_scale only")
        return dict(delta.tensors)

    @staticmethod
    def select_targets(names: list[str], blocks: Mapping[str, str]) -> list[str]:
        return names

    @staticmethod
    def file_metadata(blocks: Mapping[str, str]) -> dict[str, str]:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"chan_scale": self.scale.detach().clone()}

    def parameter_count(self) -> int:
        return self.scale.numel()

    def delta_weight(self) -> torch.Tensor:
        return self.scale[:, None] * self._base[0].weight

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._base[0].weight.to(x.dtype)) * self.scale.to(x.dtype)


runner = CliRunner()
TINY = ["--backbone", "sdxl", "--model", "tiny"]


@pytest.fixture
def channel_scale():
    with registry.registered(ChannelScaleAdapter):  # the one registry line
        yield ChannelScaleAdapter


def _images(path, n=3):
    path.mkdir(parents=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def _render(data, png, lora: list[str]) -> np.ndarray:
    args = ["render", "--prompt", "a photo of sks", "--steps", "2", "--out", str(png), *TINY[:2]]
    result = runner.invoke(app, [*args, *lora, "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(png), dtype=np.int16)


def test_the_type_satisfies_the_contract(channel_scale):
    assert isinstance(channel_scale, type) and registry.adapter_type(KIND) is channel_scale
    adapter: AdapterType = channel_scale.create_for(nn.Linear(4, 3), None, torch.Generator())
    assert torch.count_nonzero(adapter.delta_weight()) == 0 and adapter.parameter_count() == 3
    with pytest.raises(AdapterError, match="registered already"), registry.registered(channel_scale):
        pass


def test_train_save_reimport_and_render_a_new_type(tmp_path, channel_scale):
    trained, imported = tmp_path / "trained", tmp_path / "imported"
    images = _images(tmp_path / "imgs")
    train = ["train", "--images", str(images), "--prompt", "a photo of sks", "--name", "cs", "--type", KIND]
    result = runner.invoke(app, [*train, "--steps", "3", *TINY, "--data-dir", str(trained)])
    assert result.exit_code == 0, result.output
    assert f"cs: {KIND}" in result.output

    info = Studio.open(Settings(data_dir=trained)).library.get("cs")
    assert info.adapter_type == KIND and info.training_config["kind"] == KIND
    saved = read_lora(info.file_path)
    assert saved.network_kinds == {KIND} and saved.source_format == "kohya"
    assert all(torch.count_nonzero(d.tensors["chan_scale"]) > 0 for d in saved.modules.values())

    result = runner.invoke(app, ["import", str(info.file_path), "--data-dir", str(imported)])
    assert result.exit_code == 0, result.output
    library = Studio.open(Settings(data_dir=imported)).library
    [again] = library.list()
    assert again.adapter_type == KIND
    back = read_lora(again.file_path)
    assert back.modules.keys() == saved.modules.keys()
    for key, d in saved.modules.items():
        assert torch.equal(back.modules[key].tensors["chan_scale"], d.tensors["chan_scale"])

    base = _render(imported, tmp_path / "base.png", [])
    with_it = _render(imported, tmp_path / "cs.png", ["--lora", f"{again.name}:1.0"])
    assert np.abs(with_it - base).max() > 0


def test_without_registration_the_type_is_unknown(tmp_path):
    images = _images(tmp_path / "imgs")
    train = ["train", "--images", str(images), "--prompt", "a photo of sks", "--name", "cs", "--type", KIND]
    result = runner.invoke(app, [*train, "--steps", "3", *TINY, "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 1 and "not trainable" in result.output
    assert KIND not in registry.kinds()
