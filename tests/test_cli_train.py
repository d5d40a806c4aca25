"""`lora-studio train`: the adapter lands in the catalog with its config and preview; B-LoRA halves render."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from app.cli import app
from app.settings import Settings
from app.studio import Studio
from composer.train import TrainConfig

runner = CliRunner()


def _folder(path, n):
    path.mkdir(parents=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def train_args(images, name: str, kind: str) -> list[str]:
    return ["train", "--images", str(images), "--prompt", "a photo of sks", "--name", name, "--type", kind]


def test_train_blora_then_render_its_halves(tmp_path):
    data = ["--data-dir", str(tmp_path / "data")]
    tiny = ["--backbone", "sdxl", "--model", "tiny"]
    one = _folder(tmp_path / "one", 1)
    args = train_args(one, "single", "blora")
    result = runner.invoke(app, [*args, "--steps", "3", "--rank", "2", "--trigger", "sks", *tiny, *data])
    assert result.exit_code == 0, result.output
    assert "single: blora" in result.output
    result = runner.invoke(app, ["show", "single", *data])
    assert result.exit_code == 0 and "blora" in result.output and "sks" in result.output

    studio = Studio.open(Settings(data_dir=tmp_path / "data"))
    info = studio.library.get("single")
    assert info.training_config["kind"] == "blora" and info.training_config["steps_done"] == 3
    assert info.preview_path and Image.open(info.preview_path).size == (32, 32)

    png = tmp_path / "halves.png"
    render = ["render", "--prompt", "a photo of sks", "--steps", "2", "--out", str(png), *tiny[:2], *data]
    result = runner.invoke(app, [*render, "--lora", "single.content:1.0", "--lora", "single.style:0.5"])
    assert result.exit_code == 0, result.output
    provenance = json.loads(Image.open(png).text["lora_studio"])
    assert [x["name"] for x in provenance["loras"]] == ["single.content", "single.style"]

    result = runner.invoke(app, [*args, "--steps", "3", *tiny, *data])  # same name again
    assert result.exit_code == 1 and "'single' is taken" in result.output
    args = train_args(one, "subject", "lora")
    result = runner.invoke(app, [*args, "--steps", "3", *tiny, *data])
    assert result.exit_code == 1 and "at least 3" in result.output
    result = runner.invoke(app, [*args, "--steps", "3", "--kron", "3by3", *tiny, *data])
    assert result.exit_code == 1 and "A1xA2" in result.output
    assert [a.name for a in studio.library.list()] == ["single"]


def test_interrupted_training_leaves_no_catalog_entry_and_resumes(tmp_path):
    studio = Studio.open(Settings(data_dir=tmp_path / "data", backbone="sdxl"))
    images = _folder(tmp_path / "imgs", 3)
    config = TrainConfig(
        kind="kron", prompt="a photo of sks", steps=4, kron_factors=(2, 4), checkpoint_every=2
    )

    def stop(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        studio.train(config, images, "kr", progress=stop)
    assert studio.library.list() == []
    outcome = studio.train(config, images, "kr", resume=True)
    assert outcome.steps == 4 and outcome.adapter.adapter_type == "kron"
    assert [a.name for a in studio.library.list()] == ["kr"]
