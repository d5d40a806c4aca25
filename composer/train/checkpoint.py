"""Training checkpoints without pickle: adapter and optimizer tensors in safetensors, the rest in JSON.

A checkpoint is a folder written under a temporary name and renamed into place, so a run killed at any
moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from composer.errors import StudioError

KEEP = 2  # checkpoints kept per run


class CheckpointError(StudioError):
    """A checkpoint that does not belong to this run or cannot be read."""


@dataclass
class Checkpoint:
    step: int
    adapter: dict[str, torch.Tensor]  # parameter name -> tensor
    optimizer: dict  # torch optimizer state_dict
    generator_state: torch.Tensor
    losses: list[float]
    config: dict
    scaler: dict = field(default_factory=dict)  # GradScaler state (fp16 runs; empty otherwise)


def _optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        rest["state"][str(index)] = []
        for key, value in entries.items():
            tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            rest["state"][str(index)].append(key)
    return tensors, rest


def _optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state = {int(i): {k: tensors[f"{i}.{k}"] for k in keys} for i, keys in rest["state"].items()}
    return {"state": state, "param_groups": rest["param_groups"]}


def save(run_dir: Path, ckpt: Checkpoint) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{ckpt.step:07d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in ckpt.adapter.items()}, tmp / "adapter.safetensors"
    )
    opt_tensors, opt_rest = _optimizer_tensors(ckpt.optimizer)
    save_file({**opt_tensors, "generator_state": ckpt.generator_state.cpu()}, tmp / "optimizer.safetensors")
    scaler = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in ckpt.scaler.items()}
    state = {
        "step": ckpt.step,
        "losses": ckpt.losses,
        "config": ckpt.config,
        "optimizer": opt_rest,
        "scaler": scaler,
    }
    (tmp / "state.json").write_text(json.dumps(state) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    found = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load(path: Path) -> Checkpoint:
    try:
        state = json.loads((path / "state.json").read_text())
        adapter = load_file(path / "adapter.safetensors")
        tensors = load_file(path / "optimizer.safetensors")
        generator_state = tensors.pop("generator_state")
        return Checkpoint(
            step=int(state["step"]),
            adapter=adapter,
            optimizer=_optimizer_state(tensors, state["optimizer"]),
            generator_state=generator_state,
            losses=[float(x) for x in state["losses"]],
            config=state["config"],
            scaler=dict(state.get("scaler", {})),  # checkpoints before the scaler was saved: none
        )
    except Exception as exc:  # noqa: BLE001 - safetensors, JSON, missing keys: all mean "unreadable"
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); delete it to resume from the one before"
        ) from None


def check_config(path: Path, config: dict) -> None:
    """Refuse to resume a checkpoint made with other settings, naming them."""
    try:
        saved = json.loads((path / "state.json").read_text())["config"]
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable checkpoint state ({exc})") from None
    changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if changed:
        raise CheckpointError(
            f"{path} was made with other settings ({', '.join(changed)}); resume with the same settings"
        )
