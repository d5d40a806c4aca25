"""Trigger words and base-model hints from file metadata and sidecar files (Civitai, A1111, Lora-Manager)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sidecars:
    """What sidecar files next to a LoRA say about it."""

    trained_words: list[str] = field(default_factory=list)
    base_model: str | None = None
    files: list[str] = field(default_factory=list)


def _split(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def _words(value: object) -> list[str]:
    """Words from a string (comma-separated), a JSON list string, or a list of strings."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return _words(json.loads(text))
            except json.JSONDecodeError:
                pass
        return _split(text)
    if isinstance(value, list):
        return [w for item in value if isinstance(item, str) for w in _split(item)]
    return []


def _dedupe(words: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for w in words:
        if w.lower() not in seen:
            seen.add(w.lower())
            out.append(w)
    return out


def top_tags(tag_frequency: str | Mapping, top_k: int = 5) -> list[str]:
    """The most frequent tags of kohya's ss_tag_frequency ({dataset: {tag: count}}), summed over datasets."""
    data = json.loads(tag_frequency) if isinstance(tag_frequency, str) else tag_frequency
    counts: Counter[str] = Counter()
    for tags in data.values() if isinstance(data, dict) else ():
        for tag, n in tags.items() if isinstance(tags, dict) else ():
            if tag.strip() and isinstance(n, int | float):
                counts[tag.strip()] += n
    return [t for t, _ in counts.most_common(top_k)]


def _load_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable sidecar %s: %s", path, e)
        return None
    if not isinstance(data, dict):
        log.warning("ignoring sidecar %s: not a JSON object", path)
        return None
    return data


def read_sidecars(path: str | os.PathLike) -> Sidecars:
    """Read foo.civitai.info (trainedWords, baseModel), foo.json (A1111 activation text, sd version) and
    foo.metadata.json (Lora-Manager) next to foo.safetensors; unreadable sidecars are logged and skipped."""
    p = Path(path)
    stem = p.with_suffix("")
    words: list[str] = []
    base: str | None = None
    found: list[str] = []
    for suffix in (".civitai.info", ".json", ".metadata.json"):
        side = Path(f"{stem}{suffix}")
        if not side.is_file() or (data := _load_json(side)) is None:
            continue
        found.append(str(side))
        if suffix == ".civitai.info":
            words += _words(data.get("trainedWords"))
            base = base or data.get("baseModel")
        elif suffix == ".json":
            words += _words(data.get("activation text"))
            version = data.get("sd version")
            base = base or (version if version and version.lower() != "unknown" else None)
        else:
            civitai = data.get("civitai") if isinstance(data.get("civitai"), dict) else {}
            words += _words(civitai.get("trainedWords"))
            base = base or data.get("base_model")
    return Sidecars(
        trained_words=_dedupe(words), base_model=base if isinstance(base, str) else None, files=found
    )


def trigger_words(metadata: Mapping[str, str], sidecars: Sidecars | None = None, top_k: int = 5) -> list[str]:
    """Trigger words: modelspec.trigger_phrase, trained_words and sidecars first; the top ss_tag_frequency
    tags only when none of those names any (caption tags are a guess, declared words are not)."""
    declared = _words(metadata.get("modelspec.trigger_phrase", "")) + _words(
        metadata.get("trained_words", "")
    )
    if sidecars:
        declared += sidecars.trained_words
    if declared:
        return _dedupe(declared)
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return []
    try:
        return top_tags(raw, top_k)
    except json.JSONDecodeError as e:
        log.warning("ignoring invalid ss_tag_frequency JSON: %s", e)
        return []
