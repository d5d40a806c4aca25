"""A base model's LoRA retriever: the weight encoder and the text head, trained together, saved as one folder.

    <folder>/config.json          widths, probes, the module shapes the encoder reads, training record
    <folder>/weights.safetensors  both networks' weights

The studio looks for it as `lora_encoder/` inside the base model's folder (the toy model ships one, trained on
the toy world's zoo: `python -m bench.retrieval_zoo`). LoRAs and prompts land in one space: a prompt's
embedding is compared with LoRAs' embeddings by cosine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from retrieval.encoder import PROBES, WIDTH, WeightEncoder, adapter_deltas
from retrieval.text import feature_width, text_features

FOLDER = "lora_encoder"
FORMAT = 1


class TextHead(nn.Module):
    """Frozen CLIP text features (`retrieval.text`) -> the encoder's space, unit length."""

    def __init__(self, features: int, width: int = WIDTH, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(features), nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, width)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=-1)


class LoraRetriever(nn.Module):
    """Weight encoder + text head for one base model's modules."""

    def __init__(self, shapes: dict, features: int, probes: int = PROBES, width: int = WIDTH, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = WeightEncoder(shapes, probes=probes, width=width, seed=seed)
        self.text = TextHead(features, width)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
        self.config = {"format": FORMAT, "probes": probes, "width": width, "features": features, "seed": seed}
        self.record: dict = {}

    @classmethod
    def for_pipeline(cls, pipe, shapes: dict, **kwargs) -> LoraRetriever:
        return cls(shapes, feature_width(pipe), **kwargs)

    @property
    def width(self) -> int:
        return self.config["width"]

    # --- use ----------------------------------------------------------------------------------------
    def known(self, deltas: dict) -> dict:
        """The deltas of modules the encoder reads (a LoRA may also adapt modules it was not built for)."""
        return {k: v for k, v in deltas.items() if k in self.encoder.shapes}

    @torch.no_grad()
    def embed_adapter(self, host, resident: str) -> np.ndarray:
        """A resident adapter's embedding (float32, unit length).

        Raises:
            ValueError: the adapter changes none of the modules this encoder reads (named).
        """
        deltas = adapter_deltas(host, resident)
        known = self.known(deltas)
        if not known:
            sample = ", ".join(sorted(deltas)[:3])
            raise ValueError(
                f"{resident!r} adapts none of the {len(self.encoder.shapes)} modules the LoRA encoder reads "
                f"(it adapts {len(deltas)}: {sample}...); it was built for another base model"
            )
        was = self.training
        self.eval()
        try:
            return self.encoder(known).float().numpy()
        finally:
            self.train(was)

    @torch.no_grad()
    def embed_texts(self, pipe, texts: list[str]) -> np.ndarray:
        """(n, width) unit-length embeddings of prompts or descriptions."""
        return self.text(text_features(pipe, texts)).float().numpy()

    # --- files --------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {**self.config, "shapes": {k: list(v) for k, v in self.encoder.shapes.items()}}
        config["record"] = self.record
        (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "weights.safetensors"))

    @classmethod
    def load(cls, folder: Path) -> LoraRetriever:
        """Raises ValueError naming what is wrong with the folder."""
        folder = Path(folder)
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder}: no readable config.json ({exc})") from None
        if config.get("format") != FORMAT:
            raise ValueError(
                f"{folder}: LoRA encoder format {config.get('format')!r}, this studio reads {FORMAT}"
            )
        shapes = {k: tuple(v) for k, v in config["shapes"].items()}
        model = cls(
            shapes, config["features"], probes=config["probes"], width=config["width"], seed=config["seed"]
        )
        try:
            state = load_file(str(folder / "weights.safetensors"))
            model.load_state_dict(state)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{folder}: weights do not fit its config ({exc})") from None
        model.record = config.get("record", {})
        model.eval()
        return model


def find(model_folder: Path | str) -> LoraRetriever | None:
    """The retriever shipped with a base model (`<model>/lora_encoder/`), or None when it has none."""
    folder = Path(model_folder) / FOLDER
    if not (folder / "config.json").is_file():
        return None
    return LoraRetriever.load(folder)
