"""Catalog exceptions. Every message names the offending adapter, name, hash or value.

`db` never imports `composer`, so these do not derive from `composer.errors.StudioError`; the app layer
catches `CatalogError` next to `StudioError`.
"""

from __future__ import annotations


class CatalogError(Exception):
    """Base of every error the catalog raises on purpose."""


class InvalidFieldError(CatalogError, ValueError):
    """A field value is malformed: a bad name, hash, family, adapter type, path or JSON shape."""


class DuplicateAdapterError(CatalogError):
    """The same adapter (same tensor hash or same file hash) is already in the catalog."""

    def __init__(self, message: str, existing_name: str):
        super().__init__(message)
        self.existing_name = existing_name


class NameTakenError(CatalogError):
    """Another adapter already uses this name."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


class AdapterNotFoundError(CatalogError, LookupError):
    """No adapter has this name or hash."""

    def __init__(self, message: str, ref: str, suggestions: list[str] | None = None):
        super().__init__(message)
        self.ref = ref
        self.suggestions = list(suggestions or [])


class AmbiguousHashError(CatalogError, LookupError):
    """A short hash (AutoV2 prefix) matches more than one adapter."""

    def __init__(self, message: str, ref: str, names: list[str]):
        super().__init__(message)
        self.ref = ref
        self.names = names


class RenderNotFoundError(CatalogError, LookupError):
    """No render has this id."""


class ApiKeyNotFoundError(CatalogError, LookupError):
    """No API key has this name."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


class ApiKeyRefusedError(CatalogError):
    """An API key is unknown, malformed or revoked."""


class MigrationError(CatalogError):
    """The database schema cannot be brought to the version this code expects."""


class JobNotFoundError(CatalogError, LookupError):
    """No job has this id (or not one the caller may see)."""


class JobFinishedError(CatalogError):
    """The job is already done, failed or cancelled."""


class IdempotencyConflictError(CatalogError):
    """An Idempotency-Key was used before with a different request body."""


class QueueFullError(CatalogError):
    """Too many jobs are queued; `retry_after` seconds is a fair time to wait."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class SubmitRaceError(CatalogError):
    """Another submit with the same Idempotency-Key was stored first; the transaction is spoilt: retry it."""


class JobLostError(CatalogError):
    """The worker no longer holds the job: it was recovered, cancelled or finished elsewhere."""
