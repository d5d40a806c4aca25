"""B-LoRA (Frenkel et al., ECCV 2024): one LoRA on the backbone's content and style blocks, used in halves.

A B-LoRA file is a plain LoRA file (community tools load it whole) whose modules all sit in the two blocks
the backbone declares (SDXL: content = up_blocks.0.attentions.0, style = up_blocks.0.attentions.1). Our
metadata names the blocks, so the halves can be taken apart at load time and given separate strengths.

Strength convention: a half at strength s adds s * (alpha / r) * up @ down, as every LoRA here. The
reference code multiplies both factors by its scale, so its strength s is our s**2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from composer.adapters.base import Recipe
from composer.adapters.lora import LoraAdapter
from composer.errors import AdapterError
from composer.formats.model import LoraFile

BLOCKS_KEY = "lora_studio.blora_blocks"  # JSON {"content": "up_blocks.0.attentions.0", "style": ...}
ROLES = ("content", "style")


def in_block(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def block_targets(targets: list[str], blocks: Mapping[str, str]) -> list[str]:
    """The subset of denoiser target module names that lie in the B-LoRA blocks."""
    return [t for t in targets if any(in_block(t, b) for b in blocks.values())]


class BloraAdapter(LoraAdapter):
    """The trainable B-LoRA type: a LoRA on the backbone's two B-LoRA blocks only, saved as a plain LoRA
    file whose metadata names the blocks (so files hold kind "lora"; the catalog says "blora")."""

    kind = "blora"
    file_kind = "lora"
    recipe = Recipe(
        steps=1000, learning_rate=5e-5, rank=64, conv=False, min_images=1, text_encoder=False, ranked=True
    )
    file_roles = ()

    @classmethod
    def reads_role(cls, role: str) -> bool:
        return False  # its files are plain LoRA files

    @staticmethod
    def select_targets(names: list[str], blocks: Mapping[str, str]) -> list[str]:
        """The targets inside the content and style blocks (AdapterError when there are none)."""
        if not blocks:
            raise AdapterError("the backbone declares no B-LoRA content/style blocks")
        inside = block_targets(names, blocks)
        if not inside:
            raise AdapterError(f"no attention layers in the B-LoRA blocks {', '.join(blocks.values())}")
        return inside

    @staticmethod
    def file_metadata(blocks: Mapping[str, str]) -> dict[str, str]:
        return {BLOCKS_KEY: json.dumps(dict(blocks))}


def blocks_of(lora: LoraFile) -> dict[str, str] | None:
    """The role -> block map a B-LoRA file records, or None for any other file."""
    raw = lora.metadata.get(BLOCKS_KEY)
    if raw is None:
        return None
    try:
        blocks = json.loads(raw)
    except json.JSONDecodeError:
        raise AdapterError(
            f"{lora.path or 'LoRA'}: metadata {BLOCKS_KEY} is not JSON: {raw[:80]!r}"
        ) from None
    if not isinstance(blocks, dict) or set(blocks) != set(ROLES):
        raise AdapterError(
            f"{lora.path or 'LoRA'}: {BLOCKS_KEY} must name the roles {ROLES}, got {raw[:80]!r}"
        )
    return {str(k): str(v) for k, v in blocks.items()}


def half(lora: LoraFile, role: str) -> LoraFile:
    """The content or style half of a B-LoRA file, as a LoraFile of its own.

    Raises:
        AdapterError: the file is not a B-LoRA, or the role is not content/style.
    """
    if role not in ROLES:
        raise AdapterError(f"B-LoRA half {role!r}: choose {' or '.join(ROLES)}")
    blocks = blocks_of(lora)
    if blocks is None:
        raise AdapterError(
            f"{lora.path or 'LoRA'} is not a B-LoRA (no {BLOCKS_KEY} metadata); it has no halves"
        )
    modules = {k: m for k, m in lora.modules.items() if in_block(m.path, blocks[role])}
    if not modules:
        raise AdapterError(f"{lora.path or 'LoRA'}: no modules in the {role} block {blocks[role]}")
    return LoraFile(
        modules=modules,
        source_format=lora.source_format,
        family=lora.family,
        metadata=dict(lora.metadata),
        hashes=lora.hashes,
        path=lora.path,
        trigger_words=list(lora.trigger_words),
    )
