"""The toy world's concept adapters, imported into a new catalog on first start.

Each bundled adapter is imported once: its SHA-256 goes into <data dir>/bundled.json, so a user who deletes
one does not see it come back, and a newer studio version with new adapters adds only those. A newer version
of a bundled adapter (same name, new file: retrained for a new toy model) takes the name; the catalog entry of
the version it replaces is kept under "<name>-previous", tagged "superseded" (adapters trained for an earlier
toy model may not fit the current one), so nothing the user had is lost.
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


def _retire_previous_version(library: Library, name: str, bundled: set[str]) -> None:
    """Rename the catalog's `name` out of the way if an earlier bundle put it there (its hash is in `bundled`);
    an entry of the user's own under that name stays, and the new version gets a numbered name."""
    if name not in library.names():
        return
    old = library.get(name)
    if old.sha256 not in bundled:
        return
    new_name = library.free_name(f"{name}-previous")
    tags = [*old.tags, "superseded"] if "superseded" not in old.tags else old.tags
    library.update(old.name, name=new_name, tags=tags)
    log.info("bundled adapter %r has a new version; the previous one is kept as %r", name, new_name)


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
            _retire_previous_version(library, entry["name"], done)
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
