"""Repositories: the only code that queries catalog tables. The caller owns the transaction
(`db.session.unit_of_work`); repositories flush so that ids and constraint errors appear at once, never commit.

Search is portable: case-insensitive LIKE (`ILIKE` on PostgreSQL, `lower() LIKE lower()` on SQLite) and JSON
array elements through each backend's table-valued function (`jsonb_array_elements_text`, `json_each`).
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, exists, func, literal, literal_column, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.expression import Exists

from db import search
from db.errors import (
    AdapterNotFoundError,
    AmbiguousHashError,
    ApiKeyNotFoundError,
    ApiKeyRefusedError,
    CatalogError,
    DuplicateAdapterError,
    InvalidFieldError,
    NameTakenError,
    RenderNotFoundError,
)
from db.models import API_KEY_PREFIX_LEN, Adapter, ApiKey, Base, Render, utcnow

ADAPTER_REQUIRED = frozenset(
    {"name", "family", "adapter_type", "source_format", "file_path", "file_size", "sha256", "tensor_sha256"}
)
RENDER_REQUIRED = frozenset({"prompt", "backbone", "model", "method", "seed"})
_MANAGED = frozenset({"id", "created_at", "updated_at"})  # set by the database or the model, never by callers
MIN_HASH_PREFIX = 8
API_KEY_MARK = "ls_"  # every secret starts so, which makes leaked keys easy to recognise in logs and scans
DEFAULT_RATE_LIMIT = 60  # requests per minute per key
LAST_USED_RESOLUTION = timedelta(minutes=1)  # last_used_at is written at most once a minute per key


def _check_fields(model: type[Base], fields: dict[str, Any], required: frozenset[str] = frozenset()) -> None:
    columns = set(model.__table__.columns.keys())
    unknown = sorted(set(fields) - (columns - _MANAGED))
    if unknown:
        raise InvalidFieldError(f"{model.__name__}: unknown or read-only fields {', '.join(unknown)}")
    missing = sorted(required - set(fields))
    if missing:
        raise InvalidFieldError(f"{model.__name__}: missing fields {', '.join(missing)}")


def _flush(session: Session, what: str) -> None:
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent writer won the race between our check and our insert
        raise CatalogError(f"{what} conflicts with a concurrent change: {exc.orig}") from exc


def _json_array_contains(
    session: Session, column: InstrumentedAttribute[Any], pattern: str, *, exact: bool
) -> Exists:
    """EXISTS an element of the JSON string array `column` equal to (exact) or containing `pattern`,
    case-insensitively."""
    if session.get_bind().dialect.name == "postgresql":
        elements = func.jsonb_array_elements_text(column).table_valued("value")
    else:
        elements = func.json_each(column).table_valued("value")
    value = elements.c.value
    cond = func.lower(value) == pattern.lower() if exact else value.icontains(pattern, autoescape=True)
    return exists(select(literal(1)).select_from(elements).where(cond))


class AdapterRepository:
    """Adapters by name (what people type) and by hash (what files say)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, **fields: Any) -> Adapter:
        """Add an adapter. `autov2` defaults to the first 10 hex of `sha256`.

        Raises:
            DuplicateAdapterError: an adapter with the same tensor_sha256 or sha256 exists (named in the message).
            NameTakenError: another adapter has this name.
            InvalidFieldError: a field is unknown, missing or malformed.
        """
        _check_fields(Adapter, fields, ADAPTER_REQUIRED)
        if "autov2" not in fields and isinstance(fields["sha256"], str):
            fields["autov2"] = fields["sha256"][:10]
        adapter = Adapter(**fields)  # validators normalize and check each value
        self._check_unique(adapter.name, adapter.sha256, adapter.tensor_sha256)
        self.session.add(adapter)
        _flush(self.session, f"adapter {adapter.name!r}")
        return adapter

    def get_by_name(self, name: str) -> Adapter:
        """The adapter with this exact name.

        Raises:
            AdapterNotFoundError: naming `name` and suggesting close names.
        """
        adapter = self.session.scalars(select(Adapter).where(Adapter.name == name)).one_or_none()
        if adapter is None:
            raise self._not_found(name)
        return adapter

    def find_by_hash(self, ref: str) -> Adapter | None:
        """The adapter whose file SHA-256, tensor SHA-256 or AutoV2 matches `ref`, or None.

        `ref`: 64 hex (sha256 or tensor_sha256), 10 hex (AutoV2), or any prefix of at least 8 hex digits;
        an optional "sha256:" prefix is ignored.

        Raises:
            InvalidFieldError: `ref` is not hex or too short.
            AmbiguousHashError: a short prefix matches several adapters.
        """
        ref = ref.strip().lower().removeprefix("sha256:")
        if not (MIN_HASH_PREFIX <= len(ref) <= 64) or any(c not in "0123456789abcdef" for c in ref):
            raise InvalidFieldError(
                f"hash {ref!r}: expected 64 hex (sha256 or tensor hash), 10 hex (AutoV2) "
                f"or a prefix of at least {MIN_HASH_PREFIX} hex"
            )
        if len(ref) == 64:
            cond: ColumnElement[bool] = or_(Adapter.sha256 == ref, Adapter.tensor_sha256 == ref)
        else:
            cond = or_(
                Adapter.autov2 == ref,
                Adapter.sha256.startswith(ref, autoescape=True),
                Adapter.tensor_sha256.startswith(ref, autoescape=True),
            )
        found = self.session.scalars(select(Adapter).where(cond).order_by(Adapter.name).limit(5)).all()
        if len(found) > 1:
            names = [a.name for a in found]
            raise AmbiguousHashError(f"hash {ref!r} matches several adapters: {', '.join(names)}", ref, names)
        return found[0] if found else None

    def resolve(self, ref: str) -> Adapter:
        """An adapter by name, else by hash (as in `find_by_hash`); what a render request names.

        Raises:
            AdapterNotFoundError: neither a name nor a known hash, with close names suggested.
            AmbiguousHashError: a short hash matches several adapters.
        """
        adapter = self.session.scalars(select(Adapter).where(Adapter.name == ref)).one_or_none()
        if adapter is None and len(ref) >= MIN_HASH_PREFIX:
            try:
                adapter = self.find_by_hash(ref)
            except InvalidFieldError:
                adapter = None  # not a hash: report it as an unknown name below
        if adapter is None:
            raise self._not_found(ref)
        return adapter

    def update(self, name: str, /, **fields: Any) -> Adapter:
        """Change fields of the adapter named `name`; `name=` among the fields renames it. `updated_at` moves
        on flush; a new `sha256` without an `autov2` also updates `autov2`.

        Raises:
            AdapterNotFoundError, NameTakenError, DuplicateAdapterError, InvalidFieldError.
        """
        _check_fields(Adapter, fields)
        adapter = self.get_by_name(name)
        if "sha256" in fields and "autov2" not in fields and isinstance(fields["sha256"], str):
            fields["autov2"] = fields["sha256"][:10]
        # Validate every value on a detached probe first, so a bad field leaves the adapter untouched.
        probe = Adapter(**fields)
        with self.session.no_autoflush:
            self._check_unique(
                probe.name if "name" in fields else adapter.name,
                probe.sha256 if "sha256" in fields else adapter.sha256,
                probe.tensor_sha256 if "tensor_sha256" in fields else adapter.tensor_sha256,
                exclude_id=adapter.id,
            )
        for key in fields:
            setattr(adapter, key, getattr(probe, key))
        _flush(self.session, f"adapter {adapter.name!r}")
        return adapter

    def delete(self, name: str) -> Adapter:
        """Remove the adapter named `name` and return it (its file_path is the caller's to remove).

        Raises:
            AdapterNotFoundError: naming `name`, with suggestions.
        """
        adapter = self.get_by_name(name)
        self.session.delete(adapter)
        _flush(self.session, f"adapter {name!r}")
        return adapter

    def count(
        self,
        query: str | None = None,
        family: str | None = None,
        adapter_type: str | None = None,
        tag: str | None = None,
    ) -> int:
        """How many adapters `list` would return without limit and offset."""
        stmt = self._filtered(select(func.count(Adapter.id)), query, family, adapter_type, tag)
        return int(self.session.scalar(stmt) or 0)

    def names(self) -> Sequence[str]:
        """Every adapter name, sorted."""
        return self.session.scalars(select(Adapter.name).order_by(Adapter.name)).all()

    def state(self, family: str | None = None) -> tuple[int, Any]:
        """(count, latest update time) of the adapters (of a family): changes whenever one is added, edited
        or deleted, so a cache built from them knows it is stale."""
        stmt = select(func.count(Adapter.id), func.max(Adapter.updated_at))
        if family is not None:
            stmt = stmt.where(Adapter.family == family)
        count, latest = self.session.execute(stmt).one()
        return int(count or 0), latest

    def set_embedding(self, name: str, blob: bytes | None) -> None:
        """Store an adapter's weight embedding; an internal field, so `updated_at` keeps its value."""
        adapter = self.get_by_name(name)
        self.session.execute(
            update(Adapter)
            .where(Adapter.id == adapter.id)
            .values(embedding=blob, updated_at=Adapter.updated_at)
            .execution_options(synchronize_session="fetch")
        )

    def by_sha256(self, digests: Sequence[str]) -> Sequence[Adapter]:
        """The adapters whose file hashes are among `digests` (any order; unknown ones are absent)."""
        if not digests:
            return []
        return self.session.scalars(select(Adapter).where(Adapter.sha256.in_(list(digests)))).all()

    def list(
        self,
        query: str | None = None,
        family: str | None = None,
        adapter_type: str | None = None,
        tag: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Sequence[Adapter]:
        """Adapters sorted by name. `query`: every word must appear (case-insensitive, substring) in the name,
        a trigger word, a tag or the description. `tag`: an exact tag, case-insensitive."""
        stmt = self._filtered(select(Adapter), query, family, adapter_type, tag)
        return self.session.scalars(stmt.order_by(Adapter.name).limit(limit).offset(offset)).all()

    def search(
        self,
        query: str,
        family: str | None = None,
        adapter_type: str | None = None,
        tag: str | None = None,
        limit: int = 20,
        any_word: bool = False,
    ) -> list[tuple[Adapter, float]]:
        """Adapters matching every word of `query` (`any_word`: any of them, `db.search`) as a word prefix in
        the name, a trigger word, a tag or the description, best first (bm25 on SQLite, ts_rank on PostgreSQL;
        a name match weighs most), with their scores; name order breaks ties. A query without words finds
        nothing."""
        stmt = search.ranked(self.session, query, any_word)
        if stmt is None:
            return []
        stmt = self._filtered(stmt, None, family, adapter_type, tag)
        rows = self.session.execute(stmt.order_by(literal_column("score").desc(), Adapter.name).limit(limit))
        return [(adapter, float(score)) for adapter, score in rows]

    def _filtered(
        self,
        stmt: Select[Any],
        query: str | None,
        family: str | None,
        adapter_type: str | None,
        tag: str | None,
    ) -> Select[Any]:
        if family is not None:
            stmt = stmt.where(Adapter.family == family)
        if adapter_type is not None:
            stmt = stmt.where(Adapter.adapter_type == adapter_type)
        if tag:
            stmt = stmt.where(_json_array_contains(self.session, Adapter.tags, tag.strip(), exact=True))
        for word in (query or "").split():
            stmt = stmt.where(
                or_(
                    Adapter.name.icontains(word, autoescape=True),
                    Adapter.description.icontains(word, autoescape=True),
                    _json_array_contains(self.session, Adapter.trigger_words, word, exact=False),
                    _json_array_contains(self.session, Adapter.tags, word, exact=False),
                )
            )
        return stmt

    def _check_unique(
        self, name: str, sha256: str, tensor_sha256: str, exclude_id: int | None = None
    ) -> None:
        others = select(Adapter)
        if exclude_id is not None:
            others = others.where(Adapter.id != exclude_id)
        same_tensors = self.session.scalars(
            others.where(Adapter.tensor_sha256 == tensor_sha256).limit(1)
        ).one_or_none()
        if same_tensors is not None:
            raise DuplicateAdapterError(
                f"adapter already in the catalog as {same_tensors.name!r} "
                f"(same tensors, tensor_sha256 {tensor_sha256[:12]}...)",
                same_tensors.name,
            )
        same_file = self.session.scalars(others.where(Adapter.sha256 == sha256).limit(1)).one_or_none()
        if same_file is not None:
            raise DuplicateAdapterError(
                f"adapter already in the catalog as {same_file.name!r} (same file, sha256 {sha256[:12]}...)",
                same_file.name,
            )
        if self.session.scalars(others.where(Adapter.name == name).limit(1)).one_or_none() is not None:
            raise NameTakenError(f"adapter name {name!r} is taken; choose another name", name)

    def _not_found(self, ref: str) -> AdapterNotFoundError:
        names = self.names()
        lowered = {n.lower(): n for n in names}
        close = difflib.get_close_matches(ref.lower(), list(lowered), n=3, cutoff=0.6)
        suggestions = [lowered[c] for c in close]
        hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
        return AdapterNotFoundError(f"no adapter named {ref!r}{hint}", ref, suggestions)


class RenderRepository:
    """Render records: what was asked, with what, and what came out."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, **fields: Any) -> Render:
        """Record a render (status "pending" unless given).

        Raises:
            InvalidFieldError: a field is unknown, missing or malformed.
        """
        _check_fields(Render, fields, RENDER_REQUIRED)
        render = Render(**fields)
        self.session.add(render)
        _flush(self.session, "render")
        return render

    def get(self, render_id: int) -> Render:
        """The render with this id.

        Raises:
            RenderNotFoundError: naming the id.
        """
        render = self.session.get(Render, render_id)
        if render is None:
            raise RenderNotFoundError(f"no render with id {render_id}")
        return render

    def set_status(
        self, render_id: int, status: str, *, output_path: str | None = None, error: str | None = None
    ) -> Render:
        """Move a render to `status`, recording its output path or error."""
        render = self.get(render_id)
        render.status = status
        if output_path is not None:
            render.output_path = output_path
        if error is not None:
            render.error = error
        _flush(self.session, f"render {render_id}")
        return render

    def count(self, status: str | None = None) -> int:
        stmt = select(func.count(Render.id))
        if status is not None:
            stmt = stmt.where(Render.status == status)
        return int(self.session.scalar(stmt) or 0)

    def list(self, limit: int = 50, offset: int = 0, status: str | None = None) -> Sequence[Render]:
        """Renders, newest first."""
        stmt = select(Render)
        if status is not None:
            stmt = stmt.where(Render.status == status)
        stmt = stmt.order_by(Render.created_at.desc(), Render.id.desc()).limit(limit).offset(offset)
        return self.session.scalars(stmt).all()


def hash_secret(secret: str) -> str:
    """SHA-256 hex of an API key secret: what the catalog stores instead of the secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeyRepository:
    """API keys: created with a secret shown once, verified by hash, revoked, listed."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, name: str, rate_limit_per_minute: int = DEFAULT_RATE_LIMIT) -> tuple[ApiKey, str]:
        """A new key and its plain secret; the secret is not stored and cannot be shown again.

        Raises:
            NameTakenError: another key (revoked ones too) has this name.
            InvalidFieldError: a malformed name or rate limit.
        """
        secret = API_KEY_MARK + secrets.token_urlsafe(32)
        key = ApiKey(
            name=name,
            key_hash=hash_secret(secret),
            prefix=secret[:API_KEY_PREFIX_LEN],
            rate_limit_per_minute=rate_limit_per_minute,
        )
        taken = self.session.scalars(select(ApiKey.id).where(ApiKey.name == key.name)).first()
        if taken is not None:
            raise NameTakenError(f"API key name {name!r} is taken (revoked keys keep their names)", name)
        self.session.add(key)
        _flush(self.session, f"API key {name!r}")
        return key, secret

    def verify(self, secret: str, now: datetime | None = None) -> ApiKey:
        """The live key whose secret this is. Candidates are found by prefix, then their hashes compared in
        constant time; `last_used_at` moves (at most once a minute).

        Raises:
            ApiKeyRefusedError: unknown or revoked key (the message says which, never echoing the secret).
        """
        if not isinstance(secret, str) or len(secret) <= API_KEY_PREFIX_LEN:
            raise ApiKeyRefusedError("invalid API key")
        digest = hash_secret(secret)
        candidates = self.session.scalars(
            select(ApiKey).where(ApiKey.prefix == secret[:API_KEY_PREFIX_LEN])
        ).all()
        found = None
        for candidate in candidates:  # no early exit: the time taken does not depend on which one matched
            if hmac.compare_digest(candidate.key_hash, digest):
                found = candidate
        if found is None:
            raise ApiKeyRefusedError("invalid API key")
        if found.revoked_at is not None:
            raise ApiKeyRefusedError(f"API key {found.name!r} was revoked on {found.revoked_at:%Y-%m-%d}")
        now = now or utcnow()
        if found.last_used_at is None or now - found.last_used_at >= LAST_USED_RESOLUTION:
            found.last_used_at = now
            _flush(self.session, f"API key {found.name!r}")
        return found

    def get_by_name(self, name: str) -> ApiKey:
        """The key with this name (revoked or not).

        Raises:
            ApiKeyNotFoundError: naming `name`.
        """
        key = self.session.scalars(select(ApiKey).where(ApiKey.name == name)).one_or_none()
        if key is None:
            raise ApiKeyNotFoundError(f"no API key named {name!r}", name)
        return key

    def revoke(self, name: str, now: datetime | None = None) -> ApiKey:
        """Revoke the key named `name` from now on; revoking a revoked key keeps its first revocation time.

        Raises:
            ApiKeyNotFoundError: naming `name`.
        """
        key = self.get_by_name(name)
        if key.revoked_at is None:
            key.revoked_at = now or utcnow()
            _flush(self.session, f"API key {name!r}")
        return key

    def list(self, include_revoked: bool = True) -> Sequence[ApiKey]:
        """Keys in creation order."""
        stmt = select(ApiKey)
        if not include_revoked:
            stmt = stmt.where(ApiKey.revoked_at.is_(None))
        return self.session.scalars(stmt.order_by(ApiKey.created_at, ApiKey.id)).all()
