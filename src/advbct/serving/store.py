"""The gallery in Milvus: Milvus Lite in a local file by default (``./gallery.db``), a Milvus server or cluster
by URI (``http://host:19530``), through the same client code.

Each item is (id, image reference, L2-normalised vector, generation that embedded it, time of embedding,
bucket). Search is inner product on normalised vectors, i.e. cosine similarity. ``bucket`` = id mod 64 is stored
so backfill workers can split the gallery by id with a plain filter (Milvus filters have no modulo).
Reads use strong consistency, so what a write returned from is what the next search sees. In Milvus Lite every
write is flushed into a sealed segment: a Lite search scans unflushed rows one by one (2,048 of them add about
40 ms to a 20,000-item search), while a flush of a batch costs tens of milliseconds once. A server indexes its
growing segments itself and seals them on its own schedule; there a flush per write only makes small segments
and waits for them to persist, so writes to a server are never flushed by hand.
pymilvus is imported when a gallery is opened, so the training commands run where only their needs are installed.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from advbct.errors import AdvbctError

if TYPE_CHECKING:
    from advbct.serving.ledger import ItemLedger

BUCKETS = 64
MAX_K = 1000  # the most hits one search returns, over HTTP and in the CLI alike
MAX_REF_LENGTH = 2048
COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


def is_server_uri(db: str) -> bool:
    """A Milvus server or cluster (``http://host:19530``) rather than a Milvus Lite file."""
    return "://" in db


class StoreError(AdvbctError):
    """A request the gallery refuses (unknown or duplicate id, wrong dimension); nothing was changed."""


@dataclass(frozen=True)
class Hit:
    """One search result. ``score`` is the cosine similarity to the query; ``relevance``, where a mixed gallery
    was merged, the calibrated log-odds that the item is relevant, which is what the hits are ranked by."""

    id: int
    score: float
    generation: int
    ref: str
    relevance: float | None = None


@dataclass(frozen=True)
class MixedMerge:
    """How to rank a gallery that two generations embedded: the active generation's items by its ``same`` Platt
    scaling of cosine, every other item by its ``cross`` one (both fitted on the validation split at upgrade)."""

    active: int
    same: tuple[float, float]
    cross: tuple[float, float]

    @classmethod
    def from_calibration(cls, active: int, calibration: dict) -> MixedMerge:
        same, cross = calibration["same"], calibration["cross"]
        return cls(active, (same["scale"], same["bias"]), (cross["scale"], cross["bias"]))

    def rank(self, same: list[Hit], cross: list[Hit], k: int) -> list[Hit]:
        """The ``k`` best of both parts' hits by calibrated score (equal scores keep the lower id first). An item
        found in both parts (re-embedded between the two searches) counts once, as the active generation's."""
        scaled = {h.id: replace(h, relevance=self.cross[0] * h.score + self.cross[1]) for h in cross}
        scaled.update({h.id: replace(h, relevance=self.same[0] * h.score + self.same[1]) for h in same})
        return sorted(scaled.values(), key=lambda h: (-h.relevance, h.id))[:k]


def normalised(vectors: np.ndarray, dim: int) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise StoreError(f"vectors must be (n, {dim}), got {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(vectors)) or np.any(norms == 0):
        raise StoreError("vectors must be finite and non-zero")
    return vectors / norms


def _connect(client_class: type, uri: str):
    """A client on ``uri``; failing that, a StoreError that says why in one line. The usual cause for a Milvus
    Lite file is another process holding it (a running ``advbct serve``): Lite opens a file in one process only."""
    quiet = logging.getLogger("milvus_lite.server_manager")  # it logs a traceback before pymilvus raises
    quiet.disabled, was = True, quiet.disabled
    try:
        return client_class(uri)
    except Exception as exc:  # pymilvus raises several unrelated types here; each is reported the same way
        if is_server_uri(uri):
            raise StoreError(f"cannot reach Milvus at {uri}: {str(exc).splitlines()[0]}") from None
        raise StoreError(
            f"cannot open the Milvus Lite file {uri}: another process (a running `advbct serve`?) may hold it; "
            "stop that process, or send the request to its HTTP API"
        ) from None
    finally:
        quiet.disabled = was


class GalleryStore:
    """One Milvus collection of gallery items.

    With a ``ledger`` every add, replace and delete is journalled and mirrored in the model registry's file
    (``advbct.serving.ledger``), which is what keeps the per-generation counts; a store without one (benchmarks,
    storage tests) writes Milvus alone."""

    def __init__(self, uri: str, dim: int, collection: str = "gallery", ledger: ItemLedger | None = None):
        from pymilvus import MilvusClient

        if not COLLECTION_NAME.fullmatch(collection):
            raise StoreError(
                f"collection name {collection!r}: use letters, digits and underscores, not starting with a digit"
            )
        self.uri, self.dim, self.collection, self.ledger = uri, dim, collection, ledger
        # The most rows one listing query may return: Milvus servers cap offset + limit at 16,384
        # (maxQueryResultWindow); Milvus Lite has no cap, and each of its filtered queries scans the collection,
        # so fewer, larger listings cost less.
        server = is_server_uri(uri)
        self.page_limit = 16_384 if server else 131_072
        self.flushes_writes = not server
        # Writers a bulk job may run at once. A server answers a strongly consistent read at its next time tick
        # (about 200 ms), so a backfill's check-then-upsert per batch is pipelined over several threads there;
        # Milvus Lite answers at once and shares this process's cores, where more writers only compete.
        self.concurrent_writes = 4 if server else 1
        # Milvus Lite takes one write (and its flush) at a time: two request threads flushing at once fail with
        # "current_seq is monotonic". A server orders concurrent writes itself.
        self._writing: AbstractContextManager = nullcontext() if server else threading.Lock()
        self.client = _connect(MilvusClient, uri)
        if self.client.has_collection(collection):
            have = self._stored_dim()
            if have != dim:
                raise StoreError(f"collection {collection!r} in {uri} holds {have}-d vectors, not {dim}-d")
        else:
            self._create()
        self.client.load_collection(collection)

    def _stored_dim(self) -> int:
        fields = self.client.describe_collection(self.collection)["fields"]
        vector = next(f for f in fields if f["name"] == "vector")
        return int(vector["params"]["dim"])

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("ref", DataType.VARCHAR, max_length=MAX_REF_LENGTH)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("generation", DataType.INT64)
        schema.add_field("embedded_at", DataType.DOUBLE)
        schema.add_field("bucket", DataType.INT64)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="IP")
        self.client.create_collection(self.collection, schema=schema, index_params=index, consistency_level="Strong")

    def _rows(self, ids: Sequence[int], refs: Sequence[str], vectors: np.ndarray, generation: int) -> list[dict]:
        if not (len(ids) == len(refs) == len(vectors)):
            raise StoreError(f"{len(ids)} ids, {len(refs)} references and {len(vectors)} vectors do not match")
        if any(len(ref) > MAX_REF_LENGTH for ref in refs):
            raise StoreError(f"an image reference is longer than {MAX_REF_LENGTH} characters")
        vectors = normalised(vectors, self.dim)
        now = time.time()
        # Each vector stays a float32 array row: pymilvus packs that faster than a Python list of floats
        # (57 against 70 ms per 256 rows of 256-d into Milvus Lite).
        return [
            {"id": int(i), "ref": ref, "vector": v, "generation": int(generation), "embedded_at": now,
             "bucket": int(i) % BUCKETS}
            for i, ref, v in zip(ids, refs, vectors, strict=True)
        ]  # fmt: skip

    def existing(self, ids: Sequence[int]) -> set[int]:
        return set(self.generation_of(ids))

    def stored_refs(self, refs: Sequence[str]) -> set[str]:
        """Which of ``refs`` some stored item already names: what makes adding a folder again add only the rest."""
        if not refs:
            return set()
        rows = self.client.query(self.collection, filter=f"ref in {json.dumps(list(refs))}", output_fields=["ref"])
        return {row["ref"] for row in rows}

    def generation_of(self, ids: Sequence[int]) -> dict[int, int]:
        """The generation of each stored item among ``ids`` (ids not stored are absent)."""
        if not ids:
            return {}
        rows = self.client.query(
            self.collection, filter=f"id in {[int(i) for i in ids]}", output_fields=["id", "generation"]
        )
        return {int(row["id"]): int(row["generation"]) for row in rows}

    def add(self, ids: Sequence[int], refs: Sequence[str], vectors: np.ndarray, generation: int) -> None:
        """New items; refused as a whole when any id is already stored or repeated."""
        if len(set(ids)) != len(ids):
            raise StoreError("the request repeats an id")
        taken = self.existing(ids)
        if taken:
            raise StoreError(f"ids already in the gallery: {sorted(taken)[:10]}")
        rows = self._rows(ids, refs, vectors, generation)
        with self._writing, self._journalled(ids, generation):
            self.client.insert(self.collection, rows)
            self.flush()

    def replace(
        self, ids: Sequence[int], refs: Sequence[str], vectors: np.ndarray, generation: int, flush: bool = True
    ) -> None:
        """Re-embedded items: an upsert by primary key, so doing it twice leaves one copy of each.

        ``flush=False`` leaves the rows in the growing segment (a bulk writer flushes every few batches)."""
        rows = self._rows(ids, refs, vectors, generation)
        with self._writing, self._journalled(ids, generation):
            self.client.upsert(self.collection, rows)
            if flush:
                self.flush()

    def flush(self) -> None:
        if self.flushes_writes:
            self.client.flush(self.collection)

    def delete(self, ids: Sequence[int]) -> None:
        missing = set(int(i) for i in ids) - self.existing(ids)
        if missing:
            raise StoreError(f"unknown ids: {sorted(missing)[:10]}")
        with self._writing, self._journalled(ids, None):
            self.client.delete(self.collection, ids=[int(i) for i in ids])
            self.flush()

    def _journalled(self, ids: Sequence[int], generation: int | None) -> AbstractContextManager:
        """A write's ledger bracket (journal, then settle at ``generation``, ``None`` for deleted), inside the write
        lock on Milvus Lite so the mirror settles in the order Milvus applied the writes."""
        return nullcontext() if self.ledger is None else self.ledger.writing(self, ids, generation)

    def get(self, ids: Sequence[int], with_vectors: bool = False) -> list[dict]:
        fields = ["id", "ref", "generation", "embedded_at", *(["vector"] if with_vectors else [])]
        return self.client.get(self.collection, ids=[int(i) for i in ids], output_fields=fields)

    def count(self, filter: str = "") -> int:
        rows = self.client.query(self.collection, filter=filter, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def generations(self) -> dict[int, int]:
        """Items per generation."""
        counts: dict[int, int] = {}
        for generation in self.distinct_generations():
            counts[generation] = self.count(f"generation == {generation}")
        return counts

    def all_generations(self) -> dict[int, int]:
        """Every stored item's generation by id, listed in pages: what a ledger is rebuilt from."""
        states: dict[int, int] = {}
        batch = min(self.page_limit, 16_384)  # pymilvus's query iterator takes batches of at most 16,384 rows
        listing = self.client.query_iterator(self.collection, batch_size=batch, output_fields=["generation"])
        try:
            while rows := listing.next():
                states.update((int(row["id"]), int(row["generation"])) for row in rows)
        finally:
            listing.close()
        return states

    def stale_items(self, generation: int, with_vectors: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The ids (ascending: the order items were added in) of every item not at ``generation``, and with
        ``with_vectors`` their stored (L2-normalised) vectors, listed in pages: what a backfill order is computed
        from."""
        batch = min(self.page_limit, 16_384)
        fields = ["vector"] if with_vectors else ["generation"]
        listing = self.client.query_iterator(
            self.collection, batch_size=batch, filter=f"generation != {int(generation)}", output_fields=fields
        )
        ids: list[int] = []
        vectors: list[np.ndarray] = []
        try:
            while rows := listing.next():
                ids.extend(int(row["id"]) for row in rows)
                if with_vectors:
                    vectors.append(np.asarray([row["vector"] for row in rows], dtype=np.float32))
        finally:
            listing.close()
        by_id = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        if not with_vectors:
            return np.asarray(ids, dtype=np.int64)[by_id], None
        stacked = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(ids, dtype=np.int64)[by_id], stacked[by_id]

    def distinct_generations(self) -> list[int]:
        seen: set[int] = set()
        while True:
            clause = f"generation not in {sorted(seen)}" if seen else ""
            rows = self.client.query(self.collection, filter=clause, output_fields=["generation"], limit=1)
            if not rows:
                return sorted(seen)
            seen.add(int(rows[0]["generation"]))

    def stale(
        self,
        generation: int,
        limit: int,
        buckets: Sequence[int] | None = None,
        exclude: Collection[int] = (),
        after: int | None = None,
    ) -> list[dict]:
        """Up to ``limit`` items embedded by another generation than ``generation`` (in the given id buckets),
        other than those of ``exclude``; with ``after``, only ids above it (a cursor through the gallery by id)."""
        clause = f"generation != {int(generation)}"
        if after is not None:
            clause += f" and id > {int(after)}"
        if buckets is not None:
            clause += f" and bucket in {[int(b) for b in buckets]}"
        if exclude:
            clause += f" and id not in {sorted(int(i) for i in exclude)}"
        return self.client.query(self.collection, filter=clause, output_fields=["id", "ref", "generation"], limit=limit)

    def search(self, vectors: np.ndarray, k: int, merge: MixedMerge | None = None) -> list[list[Hit]]:
        """The ``k`` best items for each query vector. Without ``merge``, by cosine over the whole gallery. With it,
        the active generation's items and the others are searched apart and merged by the log-odds that each hit is
        relevant (``Hit.relevance``), so items not yet re-embedded compete on what their score means, not its
        scale."""
        if k < 1:
            raise StoreError(f"k must be at least 1, got {k}")
        vectors = normalised(vectors, self.dim)
        if merge is None:
            return self._search(vectors, k, "")
        # The other generations first: a backfill only moves items into the active one, so an item re-embedded
        # between the two searches is found twice (and counted once), never missed.
        cross = self._search(vectors, k, f"generation != {int(merge.active)}")
        same = self._search(vectors, k, f"generation == {int(merge.active)}")
        return [merge.rank(mine, theirs, k) for mine, theirs in zip(same, cross, strict=True)]

    def search_generation(self, vectors: np.ndarray, k: int, generation: int) -> list[list[Hit]]:
        """The ``k`` best, by cosine, among the items ``generation`` embedded: one generation's own retrieval."""
        if k < 1:
            raise StoreError(f"k must be at least 1, got {k}")
        return self._search(normalised(vectors, self.dim), k, f"generation == {int(generation)}")

    def _search(self, vectors: np.ndarray, k: int, clause: str) -> list[list[Hit]]:
        from pymilvus.exceptions import MilvusException

        try:
            results = self.client.search(
                self.collection, data=vectors.tolist(), limit=k, filter=clause,
                output_fields=["generation", "ref"], search_params={"metric_type": "IP"},
            )  # fmt: skip
        except MilvusException as exc:
            raise StoreError(f"search failed: {exc}") from exc
        return [
            [Hit(int(h["id"]), float(h["distance"]), int(h["entity"]["generation"]), h["entity"]["ref"]) for h in row]
            for row in results
        ]

    def close(self) -> None:
        self.client.close()
