"""The toy world's concept adapters, imported into a new catalog on first start.

Each bundled adapter is imported once: its SHA-256 goes into <data dir>/bundled.json, so a user who deletes
one does not see it come back, and a newer studio version with new adapters adds only those.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from app.library import Library
from composer.errors import StudioError
from db.errors import CatalogError, DuplicateAdapterError

log = logging.getLogger(__name__)


def manifest(folder: Path) -> list[dict]:
    path = folder / "manifest.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text())["adapters"]


def _training_record(entry: dict) -> dict | None:
    """The catalog's training record of a bundled adapter: its training settings and its own measured success
    (toyworld.train_concepts measures each adapter right after training; the manifest keeps the same figures)."""
    training = entry.get("training")
    if "success" not in entry:
        return training
    return {**(training or {}), "success": entry["success"]}


def import_bundled(library: Library, folder: Path, record: Path) -> list[str]:
    """Import the bundled adapters not imported before; the names imported now."""
    from composer.formats.safetensors_io import file_hashes

    done: set[str] = set()
    if record.is_file():
        try:
            done = set(json.loads(record.read_text())["sha256"])
        except (ValueError, KeyError, TypeError) as exc:  # a damaged record only means "imported nothing yet"
            log.warning(
                "%s unreadable (%s); bundled adapters already in the catalog stay as they are", record, exc
            )
    imported = []
    try:
        entries = manifest(folder)
    except (ValueError, KeyError, OSError) as exc:
        log.warning("bundled manifest in %s unreadable: %s", folder, exc)
        return []
    for entry in entries:
        try:
            path = folder / entry["file"]
            sha = file_hashes(path).sha256
        except (KeyError, TypeError, OSError, StudioError) as exc:
            log.warning("bundled entry %s skipped: %s", entry, exc)
            continue
        if sha in done:
            continue
        try:
            info = library.import_file(
                path,
                name=entry["name"],
                tags=entry["tags"],
                description=entry["description"],
                training_config=_training_record(entry),
            )
            imported.append(info.name)
        except DuplicateAdapterError as exc:  # the same tensors are catalogued already: nothing to add
            log.info("bundled adapter %s already in the catalog as %r", path.name, exc.existing_name)
        except (StudioError, CatalogError) as exc:  # a broken bundle must not stop the studio
            log.warning("bundled adapter %s not imported: %s", path.name, exc)
            continue
        done.add(sha)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps({"sha256": sorted(done)}) + "\n")
    os.replace(tmp, record)
    return imported
