"""Finding LoRAs: full-text, by what their weights do, and both (hybrid); similar LoRAs and near-duplicates.

The served base model's LoRA retriever (`retrieval.model`, shipped as `<model>/lora_encoder/`) embeds every
catalog entry of its family from its weights alone; the embeddings are stored with the entries (tagged with the
encoder that made them, so a new encoder re-embeds) and held in a vector index (`retrieval.index`), which
follows imports, edits and deletes made through this process, and re-reads the catalog when another process
changed it. A prompt is embedded by the retriever's text side and compared with the entries' embeddings.

Hybrid ranking fuses the full-text ranking (bm25 over names, trigger words, tags, descriptions: `db.search`)
with the embedding ranking by reciprocal rank (`retrieval.train.reciprocal_rank_fusion`): an entry high in
either list ranks high, one high in both ranks first. The weight side has no floor: on the zoo a nonsense query's
best cosine (median 0.75) is above a true match's (median 0.51), so no cosine tells "nothing fits"; every
weight hit carries its cosine, and `text` mode is the strict one.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.catalog import MAX_AUTO_LORAS, AdapterInfo
from app.library import Library
from composer.errors import StudioError
from composer.formats.readers import read_lora
from retrieval import model as retriever_model
from retrieval.index import VectorIndex
from retrieval.train import reciprocal_rank_fusion

log = logging.getLogger(__name__)

MODES = ("hybrid", "text", "weights")
MAGIC = b"LSE1"
# cosine from which two entries count as one LoRA in different files (a converted, refactored or rescaled copy
# scores >= 0.999; on the zoo no two different adapters reach 0.99: docs/BENCHMARKS.md, "Retrieval: the zoo")
NEAR_DUPLICATE = 0.99
_RESIDENT = "finder:embedding"


@dataclass(frozen=True)
class Hit:
    """One search result: the entry, its fused score and what each side gave (None: not found there)."""

    info: AdapterInfo
    score: float
    text_score: float | None = None
    weight_score: float | None = None


def pack(vector: np.ndarray, encoder_id: bytes) -> bytes:
    """An embedding as stored: magic, the encoder's 16-byte id, float32 values."""
    return MAGIC + encoder_id + struct.pack(f"<{len(vector)}f", *np.asarray(vector, dtype=np.float32))


def unpack(blob: bytes | None, encoder_id: bytes) -> np.ndarray | None:
    """The stored vector when it was made by this encoder, else None (to embed again)."""
    if not blob or blob[:4] != MAGIC or blob[4:20] != encoder_id:
        return None
    return np.frombuffer(blob[20:], dtype="<f4").astype(np.float32)


class Finder:
    """Search for one served base model. `pipeline()` returns the loaded pipeline (`pipe`, `host`) and is only
    called when an entry must be embedded; `lock` is held around pipeline use."""

    def __init__(
        self, library: Library, family: str, model: str, pipeline: Callable, lock=None, ready: Callable = bool
    ):
        """`ready()`: whether the pipeline is loaded already (an import is then embedded at once even before
        the first search)."""
        self.library = library
        self._ready = ready
        self.family = family
        self.model = model
        self._pipeline = pipeline
        self._lock = lock or threading.RLock()
        self._retriever = None
        self._loaded = False
        self._encoder_id = b""
        self._index: VectorIndex | None = None
        self._ids: dict[str, int] = {}  # entry sha256 -> index id
        self._by_id: dict[int, str] = {}
        self._state: tuple | None = None
        library.listeners.append(self._changed)

    # --- the retriever ------------------------------------------------------------------------------
    @property
    def retriever(self):
        """The base model's retriever, or None when its folder ships none (weights search is then off)."""
        if not self._loaded:
            self._loaded = True
            folder = Path(self.model)
            if folder.is_dir():
                self._retriever = retriever_model.find(folder)
            if self._retriever is not None:
                weights = folder / retriever_model.FOLDER / "weights.safetensors"
                self._encoder_id = hashlib.sha256(weights.read_bytes()).digest()[:16]
        return self._retriever

    def available(self) -> bool:
        return self.retriever is not None

    def _require(self) -> None:
        if self.retriever is None:
            raise StudioError(
                f"weight search needs a LoRA encoder for the served model ({self.model}/"
                f"{retriever_model.FOLDER}/ is missing); text search still works (mode 'text')"
            )

    # --- embeddings ---------------------------------------------------------------------------------
    def embed(self, info: AdapterInfo) -> np.ndarray:
        """Compute an entry's embedding from its file and store it with the entry."""
        self._require()
        with self._lock:
            loaded = self._pipeline()
            loaded.host.add(_RESIDENT, read_lora(Path(info.file_path)))
            try:
                vector = self.retriever.embed_adapter(loaded.host, _RESIDENT)
            finally:
                loaded.host.remove(_RESIDENT)
        self.library.set_embedding(info.name, pack(vector, self._encoder_id))
        return vector

    def _embed_or_skip(self, info: AdapterInfo) -> np.ndarray | None:
        """`embed`, or None with a warning naming the entry: a broken file must not take search down."""
        try:
            return self.embed(info)
        except Exception as exc:
            log.warning("could not embed %r for weight search: %s", info.name, exc)
            return None

    def index(self) -> VectorIndex:
        """The vector index over every entry of the family, brought up to date with the catalog (entries
        without an embedding from this encoder are embedded now; one that cannot be is logged and skipped)."""
        self._require()
        state = self.library.catalog_state(self.family)
        if self._index is not None and state == self._state:
            return self._index
        index = VectorIndex(self.retriever.width)
        ids: dict[str, int] = {}
        for info, blob in self.library.embeddings(self.family):
            vector = unpack(blob, self._encoder_id)
            if vector is None:
                vector = self._embed_or_skip(info)
                if vector is None:
                    continue
            ids[info.sha256] = len(ids)
            index.add(np.array([ids[info.sha256]]), vector[None])
        self._index, self._ids = index, ids
        self._by_id = {i: sha for sha, i in ids.items()}
        self._state = state  # storing embeddings leaves the state as it was
        return index

    def _changed(self, event: str, info: AdapterInfo) -> None:
        """Library events: keep the index in step without re-reading the catalog; an import is embedded and
        stored at once when the pipeline is loaded (else at the first weight search)."""
        if info.family != self.family:
            return
        if self._index is None:
            if event == "imported" and self._ready() and self.available():
                self._embed_or_skip(info)
            return
        if event == "deleted":
            if info.sha256 in self._ids:
                self._index.remove(np.array([self._ids.pop(info.sha256)]))
        elif event == "imported":
            vector = self._embed_or_skip(info)
            if vector is None:
                return
            new_id = max(self._by_id, default=-1) + 1
            self._ids[info.sha256] = new_id
            self._by_id[new_id] = info.sha256
            self._index.add(np.array([new_id]), vector[None])
        self._state = self.library.catalog_state(self.family)

    # --- queries ------------------------------------------------------------------------------------
    def search(
        self,
        query: str,
        mode: str = "hybrid",
        limit: int = 20,
        tag: str | None = None,
        adapter_type: str | None = None,
        any_word: bool = False,
    ) -> list[Hit]:
        """Entries of the family for `query`, best first (see the module docstring for the modes); `any_word`:
        the text side takes entries matching any word of the query, not every word (auto mode's prompts).

        Raises:
            StudioError: an unknown mode, an empty query, or weight search without an encoder.
        """
        if mode not in MODES:
            raise StudioError(f"search mode {mode!r}: choose {', '.join(MODES)}")
        if not query.strip():
            raise StudioError("an empty search query; type some words")
        if mode == "hybrid" and not self.available():
            mode = "text"  # no encoder for this model: hybrid is the text side alone
        wide = max(limit * 4, 50)
        text = (
            self.library.search(
                query,
                family=self.family,
                tag=tag,
                adapter_type=adapter_type,
                limit=wide,
                any_word=any_word,
            )
            if mode in ("text", "hybrid")
            else []
        )
        weights: list[tuple[AdapterInfo, float]] = []
        if mode in ("weights", "hybrid"):
            weights = self._by_weights(query, wide, tag, adapter_type)
        infos = {i.sha256: i for i, _ in [*text, *weights]}
        text_scores = {i.sha256: s for i, s in text}
        weight_scores = {i.sha256: s for i, s in weights}
        if mode == "text":
            order = [(i.sha256, s) for i, s in text]
        elif mode == "weights":
            order = [(i.sha256, s) for i, s in weights]
        else:
            fused = reciprocal_rank_fusion([[i.sha256 for i, _ in text], [i.sha256 for i, _ in weights]])
            order = sorted(fused.items(), key=lambda kv: -kv[1])
        return [
            Hit(infos[sha], round(float(score), 6), text_scores.get(sha), weight_scores.get(sha))
            for sha, score in order[:limit]
        ]

    def _by_weights(self, query, limit, tag, adapter_type) -> list[tuple[AdapterInfo, float]]:
        index = self.index()
        if not len(index):
            return []
        with self._lock:
            loaded = self._pipeline()
            vector = self.retriever.embed_texts(loaded.pipe, [query])[0]
        return self._resolve(index.search(vector, limit * 2), tag, adapter_type)[:limit]

    def _resolve(self, found: list[tuple[int, float]], tag=None, adapter_type=None, skip: str | None = None):
        """Index hits as (entry, cosine), filtered; ids of entries deleted meanwhile are dropped."""
        infos = self.library.by_sha256([self._by_id[i] for i, _ in found if i in self._by_id])
        out = []
        for i, score in found:
            info = infos.get(self._by_id.get(i, ""))
            if info is None or info.sha256 == skip:
                continue
            if (tag and tag not in info.tags) or (adapter_type and info.adapter_type != adapter_type):
                continue
            out.append((info, score))
        return out

    def similar(self, ref: str, limit: int = 10) -> list[tuple[AdapterInfo, float]]:
        """The entries whose weights do the most alike to `ref`'s (cosine, best first; itself excluded)."""
        info = self.library.get(ref)
        index = self.index()
        vector = unpack(self.library.embedding_of(info.name), self._encoder_id)
        if vector is None:
            vector = self.embed(info)
        return self._resolve(index.search(vector, limit + 1), skip=info.sha256)[:limit]

    def near_duplicates(self, threshold: float = NEAR_DUPLICATE) -> list[dict]:
        """Groups of entries (two or more, different files) whose embeddings are at least `threshold` alike:
        probably one concept twice. Exact over the whole family (the admin page's check, not a hot path)."""
        index = self.index()
        ids, vectors = index.items()
        if len(ids) < 2:
            return []
        sims = vectors @ vectors.T
        parent = list(range(len(ids)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        rows, cols = np.nonzero(np.triu(sims >= threshold, k=1))
        for a, b in zip(rows.tolist(), cols.tolist(), strict=True):
            parent[root(a)] = root(b)
        groups: dict[int, list[int]] = {}
        for i in range(len(ids)):
            groups.setdefault(root(i), []).append(i)
        infos = self.library.by_sha256([self._by_id[int(i)] for i in ids])
        out = []
        for members in groups.values():
            if len(members) < 2:
                continue
            names = [infos[self._by_id[int(ids[m])]].name for m in members]
            closest = float(max(sims[a, b] for a in members for b in members if a < b))
            out.append({"names": sorted(names), "cosine": round(closest, 4)})
        return sorted(out, key=lambda g: -g["cosine"])

    def pick(self, prompt: str, k: int, mode: str = "hybrid") -> list[Hit]:
        """Auto mode: the top `k` entries for a prompt (a prompt's words rarely all appear in one entry's
        metadata, so the text side takes entries matching any of its words)."""
        if not 1 <= k <= MAX_AUTO_LORAS:
            raise StudioError(f"auto mode picks 1 to {MAX_AUTO_LORAS} LoRAs, not {k}")
        return self.search(prompt, mode=mode, limit=k, any_word=True)


def with_triggers(prompt: str, picks: list[AdapterInfo]) -> str:
    """The prompt with each picked LoRA's first trigger word appended where the prompt lacks all of them (a
    LoRA trained on a trigger word does little without it)."""
    from composer.methods.base import whole_word

    words = []
    for info in picks:
        if info.trigger_words and not any(whole_word(w).search(prompt) for w in info.trigger_words):
            words.append(info.trigger_words[0])
    return ", ".join([prompt, *words]) if words else prompt
