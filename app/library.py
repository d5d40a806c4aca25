"""The catalog side of the Studio: import files and folders, look adapters up, export them."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from app.catalog import EDITABLE_FIELDS, AdapterInfo, ImportOutcome
from composer.adapters import blora, registry
from composer.errors import LoraFileError, StudioError
from composer.formats.readers import read_lora
from composer.formats.writers import write_diffusers, write_kohya
from db import models
from db.errors import CatalogError, DuplicateAdapterError
from db.repository import AdapterRepository
from db.session import unit_of_work

log = logging.getLogger(__name__)

SERVED_FAMILIES = ("sdxl", "flux")
EXPORT_FORMATS = ("kohya", "diffusers")


def adapter_type_of(lora) -> str:
    """The catalog's adapter type: "blora" for a B-LoRA file, else the file's one kind ("lora" when mixed)."""
    if blora.blocks_of(lora) is not None:
        return "blora"
    kinds = lora.network_kinds
    return next(iter(kinds)) if len(kinds) == 1 else "lora"


def safe_name(stem: str) -> str:
    """A catalog name from a file stem: letters, digits, '-', '_', '.', spaces; at most 128 characters."""
    name = re.sub(r"[^A-Za-z0-9 ._-]+", "_", stem).strip(" ._") or "lora"
    return name[:128]


def _unique_name(repo: AdapterRepository, name: str) -> str:
    taken = set(repo.names())
    if name not in taken:
        return name
    i = 2
    while f"{name}-{i}" in taken:
        i += 1
    return f"{name}-{i}"


def collect_files(paths: list[Path]) -> list[Path]:
    """Files named directly, and every *.safetensors under named folders (sorted, recursive)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*.safetensors") if q.is_file()))
        elif p.exists():
            out.append(p)
        else:
            raise StudioError(f"{p}: no such file or folder")
    return out


class Library:
    """Imports, look-ups and exports against the catalog and the stored files under the data dir."""

    def __init__(self, sessions: sessionmaker[Session], lora_dir: Path):
        self.sessions = sessions
        self.lora_dir = lora_dir
        # (event, entry) -> None, called after an entry is "imported", "updated" or "deleted" (the weight
        # search index follows the catalog so)
        self.listeners: list = []
        models.use_adapter_types(registry.kinds)  # the catalog accepts every registered adapter type

    def import_file(
        self,
        path: Path,
        name: str | None = None,
        tags: list[str] | None = None,
        *,
        exact_name: bool = False,
        description: str = "",
        training_config: dict | None = None,
        preview: Path | None = None,
    ) -> AdapterInfo:
        """Validate `path`, copy it into the data dir and catalog it. Nothing is written on any error.

        A taken name gets a numeric suffix, unless exact_name (then NameTakenError). A preview image is
        copied beside the file.

        Raises:
            LoraFileError: unreadable, corrupt, pickle, non-finite or unrecognised keys (named).
            StudioError: a family no backbone serves.
            DuplicateAdapterError: the same tensors are already catalogued (the message names the entry).
        """
        path = Path(path).expanduser().resolve()
        lora = read_lora(path)
        if lora.family not in SERVED_FAMILIES:
            what = lora.family or "an unknown base model"
            raise StudioError(
                f"{path.name}: a LoRA for {what}; this studio serves {', '.join(SERVED_FAMILIES)}"
            )
        hashes = lora.hashes
        with unit_of_work(self.sessions) as session:
            repo = AdapterRepository(session)
            existing = repo.find_by_hash(hashes.tensor_sha256) or repo.find_by_hash(hashes.sha256)
            if existing is not None:
                raise DuplicateAdapterError(
                    f"{path.name} is already in the catalog as {existing.name!r} (same tensors)",
                    existing.name,
                )
            # an exact name that is taken makes repo.add raise NameTakenError
            final_name = (
                (name or path.stem) if exact_name else _unique_name(repo, safe_name(name or path.stem))
            )
            self.lora_dir.mkdir(parents=True, exist_ok=True)
            target = self.lora_dir / f"{hashes.sha256[:16]}.safetensors"
            alphas = {m.alpha for m in lora.modules.values()}
            preview_target = None
            if preview is not None:
                preview_target = self.preview_path(hashes.sha256, Path(preview).suffix)
                _copy_atomic(Path(preview), preview_target)
            _copy_atomic(path, target)
            try:
                adapter = repo.add(
                    name=final_name,
                    family=lora.family,
                    adapter_type=adapter_type_of(lora),
                    source_format=lora.source_format,
                    rank=lora.rank,
                    alpha=next(iter(alphas)) if len(alphas) == 1 else None,
                    file_path=str(target),
                    file_size=target.stat().st_size,
                    sha256=hashes.sha256,
                    autov2=hashes.autov2,
                    tensor_sha256=hashes.tensor_sha256,
                    trigger_words=list(lora.trigger_words),
                    tags=list(tags or []),
                    metadata_json=dict(lora.metadata),
                    description=description,
                    training_config=training_config,
                    preview_path=str(preview_target) if preview_target else None,
                )
                info = AdapterInfo.of(adapter)
            except BaseException:
                target.unlink(missing_ok=True)
                if preview_target is not None:
                    preview_target.unlink(missing_ok=True)
                raise
        log.info("imported %s as %r", path, info.name)
        self._notify("imported", info)
        return info

    def import_paths(self, paths: list[Path], tags: list[str] | None = None) -> list[ImportOutcome]:
        """Import files and folders; one outcome per file, one bad file never stops the rest."""
        outcomes = []
        for p in collect_files(paths):
            try:
                info = self.import_file(p, tags=tags)
                outcomes.append(ImportOutcome(p, "imported", info.name))
            except DuplicateAdapterError as exc:
                outcomes.append(ImportOutcome(p, "duplicate", exc.existing_name, str(exc)))
            except (StudioError, CatalogError) as exc:
                outcomes.append(ImportOutcome(p, "failed", None, str(exc)))
        return outcomes

    def preview_path(self, sha256: str, suffix: str) -> Path:
        """Where an adapter's preview image is stored: beside its file, named by its hash."""
        return self.lora_dir / f"{sha256[:16]}.preview{suffix}"

    def set_preview(self, ref: str, image: Path) -> AdapterInfo:
        """Copy `image` in as the adapter's preview (replacing the one it had) and record it.

        Raises:
            AdapterNotFoundError: no such entry (close names suggested).
        """
        info = self.get(ref)
        target = self.preview_path(info.sha256, Path(image).suffix)
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        _copy_atomic(Path(image), target)
        with unit_of_work(self.sessions) as session:
            return AdapterInfo.of(AdapterRepository(session).update(info.name, preview_path=str(target)))

    def frequency_profile(self, info: AdapterInfo, model: str) -> dict | None:
        """The entry's stored frequency profile for base model `model`, or None when it has none or it was
        measured on another file (the entry's file changed since)."""
        stored = info.frequency_profiles.get(model)
        return stored if stored is not None and stored.get("sha256") == info.sha256 else None

    def set_frequency_profile(self, ref: str, model: str, profile: dict, sha256: str) -> AdapterInfo:
        """Store a profile measured for base model `model` on the file with hash `sha256` (replacing the one
        the entry had for that model); a profile of another file than the entry's is ignored when read.

        Raises:
            AdapterNotFoundError: no such entry (close names suggested).
        """
        with unit_of_work(self.sessions) as session:
            repo = AdapterRepository(session)
            adapter = repo.resolve(ref)
            profiles = {**(adapter.frequency_profiles or {}), model: {**profile, "sha256": sha256}}
            return AdapterInfo.of(repo.update(adapter.name, frequency_profiles=profiles))

    def _notify(self, event: str, info: AdapterInfo) -> None:
        for listener in self.listeners:
            try:
                listener(event, info)
            except Exception:  # a listener's failure never undoes a catalog change
                log.exception("a catalog listener failed on %s %r", event, info.name)

    # --- weight embeddings (app.finder) -------------------------------------------------------------
    def embeddings(self, family: str) -> list[tuple[AdapterInfo, bytes | None]]:
        """Every entry of a family with its stored embedding (None: none yet)."""
        with self.sessions() as session:
            rows = AdapterRepository(session).list(family=family, limit=10**9)
            return [(AdapterInfo.of(a), a.embedding) for a in rows]

    def embedding_of(self, ref: str) -> bytes | None:
        with self.sessions() as session:
            return AdapterRepository(session).resolve(ref).embedding

    def set_embedding(self, ref: str, blob: bytes) -> None:
        """Store an entry's weight embedding (an internal field: no edit event, no metadata change)."""
        with unit_of_work(self.sessions) as session:
            repo = AdapterRepository(session)
            repo.set_embedding(repo.resolve(ref).name, blob)

    def catalog_state(self, family: str | None = None) -> tuple:
        """Changes whenever an entry (of the family) is added, edited or deleted."""
        with self.sessions() as session:
            return AdapterRepository(session).state(family)

    def by_sha256(self, digests: list[str]) -> dict[str, AdapterInfo]:
        with self.sessions() as session:
            return {a.sha256: AdapterInfo.of(a) for a in AdapterRepository(session).by_sha256(digests)}

    def free_name(self, name: str) -> str:
        """`name` if no entry has it, else the first free `name-2`, `name-3`, ... (as imports name them)."""
        with self.sessions() as session:
            return _unique_name(AdapterRepository(session), name)

    def names(self) -> list[str]:
        """Every catalog name, sorted."""
        with self.sessions() as session:
            return list(AdapterRepository(session).names())

    def get(self, ref: str) -> AdapterInfo:
        """By name, or by hash (SHA-256, AutoV2, tensor hash, or a prefix of 8+ hex)."""
        with self.sessions() as session:
            return AdapterInfo.of(AdapterRepository(session).resolve(ref))

    def find(self, ref: str) -> AdapterInfo | None:
        """By hash (SHA-256, AutoV2, tensor hash, or a prefix of 8+ hex), or None."""
        with self.sessions() as session:
            adapter = AdapterRepository(session).find_by_hash(ref)
            return None if adapter is None else AdapterInfo.of(adapter)

    def list(
        self,
        query: str | None = None,
        family: str | None = None,
        tag: str | None = None,
        limit: int = 100,
        *,
        adapter_type: str | None = None,
        offset: int = 0,
    ) -> list[AdapterInfo]:
        """Entries sorted by name; `query` words must each appear in a name, trigger word, tag or description."""
        with self.sessions() as session:
            rows = AdapterRepository(session).list(
                query=query, family=family, adapter_type=adapter_type, tag=tag, limit=limit, offset=offset
            )
            return [AdapterInfo.of(a) for a in rows]

    def search(
        self,
        query: str,
        family: str | None = None,
        tag: str | None = None,
        limit: int = 20,
        *,
        adapter_type: str | None = None,
        any_word: bool = False,
    ) -> list[tuple[AdapterInfo, float]]:
        """Entries matching every word of `query` (`any_word`: any of them; word prefixes) in a name, trigger
        word, tag or description, best first, with their full-text scores (a name match weighs most;
        `db.search`)."""
        with self.sessions() as session:
            rows = AdapterRepository(session).search(
                query, family=family, adapter_type=adapter_type, tag=tag, limit=limit, any_word=any_word
            )
            return [(AdapterInfo.of(a), score) for a, score in rows]

    def count(
        self,
        query: str | None = None,
        family: str | None = None,
        tag: str | None = None,
        *,
        adapter_type: str | None = None,
    ) -> int:
        """How many entries `list` finds without limit and offset."""
        with self.sessions() as session:
            return AdapterRepository(session).count(
                query=query, family=family, adapter_type=adapter_type, tag=tag
            )

    def update(self, ref: str, **changes) -> AdapterInfo:
        """Edit an entry's metadata (`EDITABLE_FIELDS`; `name=` renames it). The file is not touched.

        Raises:
            StudioError: a field that cannot be edited.
            AdapterNotFoundError, NameTakenError, InvalidFieldError: from the catalog, nothing changed.
        """
        refused = sorted(set(changes) - set(EDITABLE_FIELDS))
        if refused:
            raise StudioError(
                f"cannot edit {', '.join(refused)}; editable fields: {', '.join(EDITABLE_FIELDS)}"
            )
        with unit_of_work(self.sessions) as session:
            repo = AdapterRepository(session)
            adapter = repo.resolve(ref)
            if changes:
                adapter = repo.update(adapter.name, **changes)
            info = AdapterInfo.of(adapter)
        if changes:
            self._notify("updated", info)
        return info

    def delete(self, ref: str) -> AdapterInfo:
        """Remove an entry, then its stored file and preview (only files inside the LoRA folder are removed).

        Raises:
            AdapterNotFoundError: no such entry (close names suggested).
        """
        with unit_of_work(self.sessions) as session:
            repo = AdapterRepository(session)
            info = AdapterInfo.of(repo.delete(repo.resolve(ref).name))
        # the row goes first: a file without a row is harmless, a row without its file is not
        for stored in filter(None, (info.file_path, info.preview_path)):
            path = Path(stored)
            if path.resolve().is_relative_to(self.lora_dir.resolve()):
                path.unlink(missing_ok=True)
            else:
                log.warning("deleted %r; kept %s, which is outside %s", info.name, path, self.lora_dir)
        log.info("deleted %r", info.name)
        self._notify("deleted", info)
        return info

    def export(self, ref: str, fmt: str, out: Path) -> Path:
        """Write the adapter as a kohya- or diffusers-format safetensors file with metadata."""
        if fmt not in EXPORT_FORMATS:
            raise StudioError(f"unknown export format {fmt!r}; choose {' or '.join(EXPORT_FORMATS)}")
        info = self.get(ref)
        lora = read_lora(Path(info.file_path))
        out = Path(out).expanduser()
        if out.is_dir():
            out = out / f"{info.name}.{fmt}.safetensors"
        if out.suffix != ".safetensors":
            raise StudioError(f"{out}: export files end in .safetensors")
        writer = write_kohya if fmt == "kohya" else write_diffusers
        writer(lora, out, title=info.name, trigger_words=info.trigger_words)
        return out


def _copy_atomic(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".import-", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["AdapterInfo", "ImportOutcome", "Library", "LoraFileError", "collect_files", "safe_name"]
