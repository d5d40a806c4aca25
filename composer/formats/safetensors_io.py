"""Safetensors I/O: header parsing without loading tensors, pickle refusal, hashes, atomic saves."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from composer.errors import LoraFileError, PickleRefusedError
from composer.formats.model import FileHashes

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_CHUNK = 1 << 20


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return struct.unpack("<Q", head[:8])[0] <= size - 8


def refuse_pickle(path: str | os.PathLike) -> None:
    """Raise PickleRefusedError for pickle/zip checkpoints (by suffix or leading bytes); never unpickle.

    Raises:
        PickleRefusedError: the file is, or claims to be, a pickle checkpoint.
    """
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefusedError(
            f"{p}: {p.suffix} checkpoints are pickles and are never loaded; use .safetensors"
        )
    try:
        with p.open("rb") as f:
            head = f.read(16)
        size = p.stat().st_size
    except OSError as e:
        raise LoraFileError(f"{p}: cannot read ({e.strerror})") from e
    if head.startswith(b"PK\x03\x04"):
        raise PickleRefusedError(f"{p}: is a zip archive (torch.save checkpoint); it is never loaded")
    if len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5 and not _looks_like_safetensors(head, size):
        raise PickleRefusedError(
            f"{p}: starts with a pickle protocol {head[1]} opcode; it is never unpickled"
        )


def _check_entry(p: Path, name: str, entry: object) -> tuple[int, int]:
    """Validate one tensor entry of the header; return its (begin, end) data offsets."""
    if not isinstance(entry, dict):
        raise LoraFileError(f"{p}: header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise LoraFileError(f"{p}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise LoraFileError(f"{p}: tensor {name!r} has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise LoraFileError(f"{p}: tensor {name!r} has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise LoraFileError(
            f"{p}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs {expected}"
        )
    return offsets[0], offsets[1]


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """Parse and validate a safetensors header without reading tensor data.

    Returns:
        (header without "__metadata__", metadata str->str, byte offset where tensor data starts)
    Raises:
        LoraFileError: too short, header length past the end, bad JSON, inconsistent or truncated entries.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise LoraFileError(f"{p}: not safetensors: file too short ({size} bytes) for a header")
            (n,) = struct.unpack("<Q", raw_len)
            if n > size - 8:
                raise LoraFileError(
                    f"{p}: not safetensors or truncated: header length {n} beyond file size {size}"
                )
            if n > MAX_HEADER_BYTES:
                raise LoraFileError(f"{p}: header length {n} exceeds {MAX_HEADER_BYTES} bytes")
            raw = f.read(n)
    except OSError as e:
        raise LoraFileError(f"{p}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(f"{p}: corrupt safetensors header: invalid JSON ({e})") from e
    if not isinstance(header, dict):
        raise LoraFileError(f"{p}: corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise LoraFileError(f"{p}: __metadata__ must map strings to strings")
    data_offset = 8 + n
    spans = sorted((*_check_entry(p, name, entry), name) for name, entry in header.items())
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise LoraFileError(f"{p}: tensor {name!r} starts at {begin}, expected {cursor} (overlap or gap)")
        cursor = end
    if data_offset + cursor > size:
        raise LoraFileError(
            f"{p}: truncated: tensor data needs {data_offset + cursor} bytes, file has {size}"
            + (f" (last tensor {spans[-1][2]!r})" if spans else "")
        )
    if data_offset + cursor < size:
        raise LoraFileError(f"{p}: {size - data_offset - cursor} unexpected bytes after the tensor data")
    return header, dict(metadata), data_offset


def _check_finite(p: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    bad = [
        k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t.float()).all())
    ]
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise LoraFileError(f"{p}: non-finite values (NaN/Inf) in {', '.join(sorted(bad)[:10])}{more}")


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor on CPU after validating the header; reject pickles and NaN/Inf.

    Raises:
        PickleRefusedError: a pickle checkpoint.
        LoraFileError: an invalid file, or tensors holding NaN/Inf (named).
    """
    p = Path(path)
    refuse_pickle(p)
    _, metadata, _ = read_header(p)
    try:
        tensors = safetensors.torch.load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraFileError(f"{p}: cannot load tensors ({e})") from e
    _check_finite(p, tensors)
    return tensors, metadata


def file_hashes(path: str | os.PathLike) -> FileHashes:
    """Full-file SHA-256, AutoV2 (its first 10 hex) and the SHA-256 of the bytes after the header."""
    p = Path(path)
    full, tensor = hashlib.sha256(), hashlib.sha256()
    try:
        with p.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise LoraFileError(f"{p}: not safetensors: file too short to hash")
            full.update(raw_len)
            remaining = struct.unpack("<Q", raw_len)[0]  # header bytes still to skip for the tensor hash
            while chunk := f.read(_CHUNK):
                full.update(chunk)
                skip = min(remaining, len(chunk))
                remaining -= skip
                tensor.update(chunk[skip:])
    except OSError as e:
        raise LoraFileError(f"{p}: cannot read ({e.strerror})") from e
    if remaining:
        raise LoraFileError(f"{p}: truncated: header length beyond file size")
    digest = full.hexdigest()
    return FileHashes(sha256=digest, autov2=digest[:10], tensor_sha256=tensor.hexdigest())


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, cloning any that share storage (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors bytes of tensors + metadata (metadata values must be str)."""
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise LoraFileError(f"metadata values must be str: {', '.join(map(str, bad[:10]))}")
    return safetensors.torch.save(_unshared(tensors), metadata=meta or None)


def tensor_bytes_sha256(blob: bytes) -> str:
    """SHA-256 of the bytes after the header of an in-memory safetensors blob (kohya's sshs_model_hash)."""
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(memoryview(blob)[8 + n :]).hexdigest()


def write_bytes_atomic(path: str | os.PathLike, blob: bytes) -> None:
    """Write blob to path via a temp file in the same directory and os.replace."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically.

    Raises:
        LoraFileError: a metadata value is not a str (named).
    """
    write_bytes_atomic(path, serialize(tensors, metadata))
