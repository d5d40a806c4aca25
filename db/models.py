"""Catalog tables: adapters (LoRA files and what we know about them), renders (full provenance), API keys
(stored as SHA-256 hashes, never the secret), render jobs (the REST API's batches, run by an executor) and
admin users (password hashes only), and gate sets (gated fusion's trained gates per LoRA set and base model).

The audit log comes later, in a new Alembic revision.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.mutable import MutableDict, MutableList
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates
from sqlalchemy.types import TypeEngine

from db.errors import InvalidFieldError

FAMILIES = ("sd15", "sdxl", "flux")
# The built-in adapter types (composer.adapters.registry's kinds; a test pins the two together). db never
# imports composer, so the app passes the live registry in (`use_adapter_types`); this torch-free copy serves
# db on its own and the REST filter (app.api never imports torch).
ADAPTER_TYPES = ("lora", "lokr", "loha", "dora", "blora", "kron", "tensor")
SOURCE_FORMATS = ("diffusers", "peft", "kohya", "lycoris")
RENDER_STATUSES = ("pending", "running", "done", "failed", "cancelled")
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
JOB_FINISHED = ("done", "failed", "cancelled")
NAME_MAX = 128
API_KEY_PREFIX_LEN = 8  # characters of the secret kept in clear, to tell keys apart in lists

_NAME_RE = re.compile(r"[\w.\- ]+")  # \w: unicode letters, digits, underscore; no / or \ by construction
_HEX_RE = re.compile(r"[0-9a-f]+")

# Constraint and index names are fixed so that migrations can name what they alter or drop.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind the catalog stores)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on every backend.

    PostgreSQL stores `timestamptz`; SQLite has no time zones, so the value is stored as UTC and read back
    with UTC attached. Naive datetimes are refused rather than guessed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise InvalidFieldError(
                f"naive datetime {value.isoformat()}: the catalog stores timezone-aware UTC"
            )
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def json_type() -> TypeEngine[Any]:
    """JSON everywhere, JSONB on PostgreSQL (indexable; `jsonb_array_elements_text` serves tag search).

    A fresh instance per column: `Mutable*.as_mutable` keys on the type instance.
    """
    return JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    """Declarative base of every catalog table; `Base.metadata` is Alembic's target."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def validate_name(name: object, what: str = "adapter name") -> str:
    """Check a name: 1-128 letters, digits, `-_.` and spaces; no path separators, no padding.

    Raises:
        InvalidFieldError: naming the offending value (as `what`, e.g. "adapter name").
    """
    if not isinstance(name, str):
        raise InvalidFieldError(f"{what} must be a string, got {type(name).__name__}")
    if not 1 <= len(name) <= NAME_MAX:
        raise InvalidFieldError(f"{what} {name!r}: must be 1-{NAME_MAX} characters, got {len(name)}")
    if not _NAME_RE.fullmatch(name):
        bad = sorted({c for c in name if not _NAME_RE.fullmatch(c)})
        raise InvalidFieldError(
            f"{what} {name!r}: characters {''.join(bad)!r} not allowed "
            "(letters, digits, '-', '_', '.', spaces)"
        )
    if name != name.strip():
        raise InvalidFieldError(f"{what} {name!r}: no leading or trailing spaces")
    if set(name) == {"."}:
        raise InvalidFieldError(f"{what} {name!r}: a name of only dots looks like a path")
    return name


def _builtin_adapter_types() -> Collection[str]:
    return ADAPTER_TYPES


_adapter_types: Callable[[], Collection[str]] = _builtin_adapter_types


def use_adapter_types(source: Callable[[], Collection[str]]) -> None:
    """Validate adapter_type against `source()` from now on: the app passes its adapter registry's kinds."""
    global _adapter_types
    _adapter_types = source


def _check_choice(field: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidFieldError(f"{field} {value!r}: expected one of {', '.join(choices)}")
    return str(value)


def _check_hex(field: str, value: object, length: int) -> str:
    if not isinstance(value, str) or len(value) != length or not _HEX_RE.fullmatch(value.lower()):
        raise InvalidFieldError(f"{field} {value!r}: expected {length} hex digits")
    return value.lower()


def _check_str_list(field: str, value: object) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidFieldError(f"{field} {value!r}: expected a list of strings")
    out: list[str] = []
    for item in (v.strip() for v in value):
        if not item:
            raise InvalidFieldError(f"{field} {value!r}: empty entry")
        if item not in out:
            out.append(item)
    return out


class Adapter(Base):
    """One adapter file in the catalog. `tensor_sha256` is its identity: it survives metadata edits.

    JSON lists and dicts are tracked for in-place changes (`adapter.tags.append(...)` is saved).
    """

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX), unique=True, index=True)
    family: Mapped[str] = mapped_column(String(16))
    adapter_type: Mapped[str] = mapped_column(String(16))
    source_format: Mapped[str] = mapped_column(String(16))
    rank: Mapped[int | None] = mapped_column(Integer)
    alpha: Mapped[float | None] = mapped_column(Float)
    file_path: Mapped[str] = mapped_column(Text)
    file_size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    autov2: Mapped[str] = mapped_column(String(10), index=True)
    tensor_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    trigger_words: Mapped[list[str]] = mapped_column(MutableList.as_mutable(json_type()), default=list)
    tags: Mapped[list[str]] = mapped_column(MutableList.as_mutable(json_type()), default=list)
    description: Mapped[str] = mapped_column(Text, default="")
    metadata_json: Mapped[dict[str, Any]] = mapped_column(MutableDict.as_mutable(json_type()), default=dict)
    training_config: Mapped[dict[str, Any] | None] = mapped_column(MutableDict.as_mutable(json_type()))
    preview_path: Mapped[str | None] = mapped_column(Text)
    # base model -> what the LoRA changes at each spatial frequency, measured from its own renders (cmlora
    # orders LoRAs by it): {"score", "radial", "sha256" of the file it was measured on, ...}
    frequency_profiles: Mapped[dict[str, Any] | None] = mapped_column(MutableDict.as_mutable(json_type()))
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow, server_default=func.now()
    )

    def __repr__(self) -> str:
        return f"Adapter(name={self.name!r}, family={self.family!r}, type={self.adapter_type!r}, autov2={self.autov2!r})"

    @validates("name")
    def _v_name(self, key: str, value: object) -> str:
        return validate_name(value)

    @validates("family")
    def _v_family(self, key: str, value: object) -> str:
        return _check_choice(key, value, FAMILIES)

    @validates("adapter_type")
    def _v_adapter_type(self, key: str, value: object) -> str:
        return _check_choice(key, value, tuple(_adapter_types()))

    @validates("source_format")
    def _v_source_format(self, key: str, value: object) -> str:
        return _check_choice(key, value, SOURCE_FORMATS)

    @validates("sha256", "tensor_sha256")
    def _v_sha256(self, key: str, value: object) -> str:
        return _check_hex(key, value, 64)

    @validates("autov2")
    def _v_autov2(self, key: str, value: object) -> str:
        return _check_hex(key, value, 10)

    @validates("file_path")
    def _v_file_path(self, key: str, value: object) -> str:
        if not isinstance(value, str) or not os.path.isabs(value):
            raise InvalidFieldError(f"file_path {value!r}: expected an absolute path")
        return value

    @validates("file_size")
    def _v_file_size(self, key: str, value: object) -> int:
        if not isinstance(value, int) or value < 0:
            raise InvalidFieldError(f"file_size {value!r}: expected a non-negative integer")
        return value

    @validates("rank")
    def _v_rank(self, key: str, value: object) -> int | None:
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise InvalidFieldError(f"rank {value!r}: expected a positive integer or None")
        return value

    @validates("trigger_words", "tags")
    def _v_str_list(self, key: str, value: object) -> list[str]:
        return _check_str_list(key, value)

    @validates("metadata_json")
    def _v_metadata(self, key: str, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise InvalidFieldError(f"metadata_json {value!r}: expected a dict")
        return value

    @validates("frequency_profiles")
    def _v_frequency_profiles(self, key: str, value: object) -> dict[str, Any] | None:
        if value is not None and not (
            isinstance(value, dict) and all(isinstance(v, dict) for v in value.values())
        ):
            raise InvalidFieldError(
                f"frequency_profiles {value!r}: expected a dict of dicts by model, or None"
            )
        return value

    @validates("training_config")
    def _v_training_config(self, key: str, value: object) -> dict[str, Any] | None:
        if value is not None and not isinstance(value, dict):
            raise InvalidFieldError(f"training_config {value!r}: expected a dict or None")
        return value


class Render(Base):
    """One render and everything needed to reproduce it: prompt, backbone, model, method and its params,
    seed, and the LoRAs by name, SHA-256 and weight."""

    __tablename__ = "renders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=func.now(), index=True
    )
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    backbone: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(
        json_type(), default=dict
    )  # steps, guidance, size, method params
    seed: Mapped[int] = mapped_column(BigInteger)
    loras: Mapped[list[dict[str, Any]]] = mapped_column(json_type(), default=list)  # [{name, sha256, weight}]
    output_path: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    error: Mapped[str | None] = mapped_column(Text)

    def __repr__(self) -> str:
        return f"Render(id={self.id!r}, status={self.status!r}, method={self.method!r}, seed={self.seed!r})"

    @validates("status")
    def _v_status(self, key: str, value: object) -> str:
        return _check_choice(key, value, RENDER_STATUSES)

    @validates("params")
    def _v_params(self, key: str, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise InvalidFieldError(f"params {value!r}: expected a dict")
        return value

    @validates("seed")
    def _v_seed(self, key: str, value: object) -> int:
        if not isinstance(value, int) or not -(2**63) <= value < 2**63:
            raise InvalidFieldError(f"seed {value!r}: expected a 64-bit integer")
        return value

    @validates("loras")
    def _v_loras(self, key: str, value: object) -> list[dict[str, Any]]:
        if not isinstance(value, list | tuple):
            raise InvalidFieldError(f"loras {value!r}: expected a list of {{name, sha256, weight}}")
        out = []
        for entry in value:
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("weight"), int | float)
            )
            if not ok:
                raise InvalidFieldError(
                    f"loras entry {entry!r}: expected {{name: str, sha256: str, weight: number}}"
                )
            out.append(dict(entry))
        return out


class ApiKey(Base):
    """A REST API key. Only the SHA-256 of the secret is stored; `prefix` (its first characters) is what
    lists show and what verification looks up before comparing hashes in constant time."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX), unique=True, index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(API_KEY_PREFIX_LEN), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    rate_limit_per_minute: Mapped[int] = mapped_column(Integer)

    def __repr__(self) -> str:
        return f"ApiKey(name={self.name!r}, prefix={self.prefix!r}, revoked={self.revoked_at is not None})"

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @validates("name")
    def _v_name(self, key: str, value: object) -> str:
        return validate_name(value, "API key name")

    @validates("key_hash")
    def _v_key_hash(self, key: str, value: object) -> str:
        return _check_hex(key, value, 64)

    @validates("prefix")
    def _v_prefix(self, key: str, value: object) -> str:
        if not isinstance(value, str) or len(value) != API_KEY_PREFIX_LEN:
            raise InvalidFieldError(f"prefix {value!r}: expected the first {API_KEY_PREFIX_LEN} characters")
        return value

    @validates("rate_limit_per_minute")
    def _v_rate(self, key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
            raise InvalidFieldError(f"rate_limit_per_minute {value!r}: expected an integer in 1..1000000")
        return value


class RenderJob(Base):
    """A batch of render requests submitted together (REST API), run by an executor.

    Lifecycle: queued -> running -> done | failed, or cancelled from queued/running. A worker that dies leaves
    its job "running" with a stale heartbeat; recovery puts it back to queued until `max_attempts`, then
    failed with the reason. `requests` holds the requests as submitted (JSON), `results` one entry per
    finished request (image paths, render ids, provenance), so a restarted job skips what is already done.
    """

    __tablename__ = "render_jobs"
    __table_args__ = (UniqueConstraint("api_key_id", "idempotency_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=func.now(), index=True
    )
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))  # SHA-256 of the canonical request JSON
    backbone: Mapped[str] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(Text)
    requests: Mapped[list[dict[str, Any]]] = mapped_column(MutableList.as_mutable(json_type()), default=list)
    results: Mapped[list[dict[str, Any]]] = mapped_column(MutableList.as_mutable(json_type()), default=list)
    total: Mapped[int] = mapped_column(Integer)  # images the job will make
    completed: Mapped[int] = mapped_column(Integer, default=0)  # images made so far
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1, denoising steps included
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=2)
    worker: Mapped[str | None] = mapped_column(String(128))  # who holds it while running
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)

    def __repr__(self) -> str:
        return f"RenderJob(id={self.id!r}, status={self.status!r}, {self.completed}/{self.total})"

    @property
    def finished(self) -> bool:
        return self.status in JOB_FINISHED

    @validates("status")
    def _v_status(self, key: str, value: object) -> str:
        return _check_choice(key, value, JOB_STATUSES)

    @validates("request_hash")
    def _v_request_hash(self, key: str, value: object) -> str:
        return _check_hex(key, value, 64)

    @validates("total", "completed", "attempts", "max_attempts")
    def _v_count(self, key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidFieldError(f"{key} {value!r}: expected a non-negative integer")
        return value


class User(Base):
    """An admin-page user. Only an Argon2 hash of the password is stored."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(NAME_MAX), unique=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    def __repr__(self) -> str:
        return f"User(username={self.username!r}, admin={self.is_admin!r})"

    @validates("username")
    def _v_username(self, key: str, value: object) -> str:
        return validate_name(value, "username")


class LoginSession(Base):
    """A signed-in session (the admin page and the studio): only the SHA-256 of its token is stored, so that
    logging out, or a password change, ends it on the server whatever the browser keeps."""

    __tablename__ = "login_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class GateSet(Base):
    """Trained gates of gated fusion for one set of LoRAs on one base model. `set_key` is order-insensitive over
    the set's catalog names and file SHA-256s (`composer.gates.gate_set_key`), so a changed file makes another
    set and its old gates are never found for it. `gates` holds the gate tensors as safetensors bytes."""

    __tablename__ = "gate_sets"
    __table_args__ = (UniqueConstraint("backbone", "model", "set_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    backbone: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(Text)
    set_key: Mapped[str] = mapped_column(String(64), index=True)
    adapters: Mapped[list[dict[str, Any]]] = mapped_column(json_type(), default=list)  # [{name, sha256}]
    gates: Mapped[bytes] = mapped_column(LargeBinary)
    record: Mapped[dict[str, Any]] = mapped_column(json_type(), default=dict)  # steps, seconds, losses, ...
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())

    def __repr__(self) -> str:
        names = ", ".join(a.get("name", "?") for a in self.adapters or [])
        return f"GateSet(model={self.model!r}, adapters=[{names}], key={self.set_key[:12]!r})"

    @validates("set_key")
    def _v_set_key(self, key: str, value: object) -> str:
        return _check_hex(key, value, 64)

    @validates("adapters")
    def _v_adapters(self, key: str, value: object) -> list[dict[str, Any]]:
        entries = value if isinstance(value, list | tuple) else []
        named = (isinstance(a, dict) and {"name", "sha256"} <= set(a) for a in entries)
        if not entries or not all(named) or not all(isinstance(v, str) for a in entries for v in a.values()):
            raise InvalidFieldError(f"adapters {value!r}: expected a non-empty list of {{name, sha256}}")
        return [dict(a) for a in value]

    @validates("gates")
    def _v_gates(self, key: str, value: object) -> bytes:
        if not isinstance(value, bytes | bytearray) or not value:
            raise InvalidFieldError("gates: expected the gate tensors as non-empty safetensors bytes")
        return bytes(value)

    @validates("record")
    def _v_record(self, key: str, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise InvalidFieldError(f"record {value!r}: expected a dict")
        return value
