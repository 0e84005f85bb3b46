"""The gallery in Milvus: Milvus Lite in a local file by default (``./gallery.db``), a Milvus server or cluster
by URI (``http://host:19530``), through the same client code.

Each item is (id, image reference, its vectors, generation that embedded the current one, generation of the
previous one, time of embedding, bucket). ``vectors`` holds two L2-normalised embeddings side by side, the current
one and the one the previous generation made (zeros where there is none): a re-embedding keeps the vector it
replaces, so a rollback finds re-embedded items through their kept vectors at once and a roll-forward swaps them
back without a model. Both live in one vector field because Milvus before 2.4 (the ``milvus`` test server is 2.3)
refuses a second one; a search queries one half by zeroing the other half of the query, which inner product
leaves exact. Search is inner product on normalised vectors, i.e. cosine similarity. ``bucket`` = id mod 64 is stored
so backfill workers can split the gallery by id with a plain filter (Milvus filters have no modulo).
Reads use strong consistency, so what a write returned from is what the next search sees. In Milvus Lite each
write is flushed into a sealed segment (a bulk job's every few batches): a Lite search scans unflushed rows one by
one, so they slow every search that follows, while a flush is paid once. A server indexes its growing segments
itself and seals them on its own schedule; there a flush per write only makes small segments and waits for them
to persist, so writes to a server are never flushed by hand.
pymilvus is imported when a gallery is opened, so the training commands run where only their needs are installed.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
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
NO_GENERATION = 0  # ``previous_generation`` of an item that has no kept vector (generations count from 1)
ITEM_FIELDS = ["id", "ref", "generation", "previous_generation", "embedded_at"]
STATE_FIELDS = ["generation", "previous_generation"]  # what the ledger mirrors of each item


def is_server_uri(db: str) -> bool:
    """A Milvus server or cluster (``http://host:19530``) rather than a Milvus Lite file."""
    return "://" in db


class StoreError(AdvbctError):
    """A request the gallery refuses (unknown or duplicate id, wrong dimension); nothing was changed."""


@dataclass(frozen=True)
class Hit:
    """One search result. ``score`` is the cosine similarity to the query of the item's vector made by
    ``matched_generation``: its current one (``generation``, the generation that embedded the item) or the one it
    kept when it was re-embedded. ``relevance``, where a mixed gallery was merged, is the calibrated log-odds that
    the item is relevant, which is what the hits are ranked by."""

    id: int
    score: float
    generation: int
    matched_generation: int
    ref: str
    relevance: float | None = None


@dataclass(frozen=True)
class SearchParts:
    """Which filtered searches a merged search for one active generation must run: each is skipped only where no
    item can be in it (``cross``: items with no vector of the active generation; ``kept``: items whose kept vector
    is the active generation's)."""

    cross: bool = True
    kept: bool = True


@dataclass(frozen=True)
class MixedMerge:
    """How an ``active`` generation's queries search the gallery: its own vectors where an item has one (current
    or kept), every other item's current vector otherwise. With a calibration, the active generation's hits are
    ranked by its ``same`` Platt scaling of cosine and the others by its ``cross`` one (both fitted on the
    validation split at upgrade); without one (the first generation), by plain cosine."""

    active: int
    same: tuple[float, float] | None = None
    cross: tuple[float, float] | None = None

    @classmethod
    def from_calibration(cls, active: int, calibration: dict) -> MixedMerge:
        same, cross = calibration["same"], calibration["cross"]
        return cls(active, (same["scale"], same["bias"]), (cross["scale"], cross["bias"]))

    def rank(self, same: list[Hit], cross: list[Hit], k: int) -> list[Hit]:
        """The ``k`` best of both parts' hits by calibrated score, or by cosine without a calibration (equal
        scores keep the lower id first). An item found in both parts, or twice in ``same`` (moved between the
        searches), counts once, as its last hit in ``same``."""
        if self.same is None or self.cross is None:
            unique = {h.id: h for h in [*cross, *same]}
            return sorted(unique.values(), key=lambda h: (-h.score, h.id))[:k]
        scaled = {h.id: replace(h, relevance=self.cross[0] * h.score + self.cross[1]) for h in cross}
        scaled.update({h.id: replace(h, relevance=self.same[0] * h.score + self.same[1]) for h in same})
        return sorted(scaled.values(), key=lambda h: (-h.relevance, h.id))[:k]


def normalised(vectors: np.ndarray, dim: int) -> np.ndarray:
    """``vectors`` as float32 rows of unit length; a :class:`StoreError` for a wrong shape, a non-finite value or a
    zero vector, which cosine search cannot rank."""
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
    # pymilvus pings its channel every 10 s even with no call in flight; the Milvus Lite server answers an idle
    # client's pings with GOAWAY ("too_many_pings") and gRPC prints that as an error line whenever a long step (a
    # backfill curve, an embedding pass) leaves the gallery idle. A local file needs no keepalive.
    options = {} if is_server_uri(uri) else {"grpc_options": {"grpc.keepalive_permit_without_calls": False}}
    try:
        return client_class(uri, **options)
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
    (``advbct.serving.ledger``), which is what keeps the per-generation counts and lets a merged search skip the
    parts of the gallery that hold no item; a store without one (benchmarks, storage tests) writes Milvus alone
    and runs every part. ``on_search`` is told the part (``plain``, ``cross``, ``kept`` or ``current``) of each
    search sent to Milvus: what the service counts in its metrics."""

    def __init__(
        self,
        uri: str,
        dim: int,
        collection: str = "gallery",
        ledger: ItemLedger | None = None,
        on_search: Callable[[str], None] | None = None,
    ):
        from pymilvus import MilvusClient

        if not COLLECTION_NAME.fullmatch(collection):
            raise StoreError(
                f"collection name {collection!r}: use letters, digits and underscores, not starting with a digit"
            )
        self.uri, self.dim, self.collection, self.ledger, self.on_search = uri, dim, collection, ledger, on_search
        # The most rows one listing query may return: Milvus servers cap offset + limit at 16,384
        # (maxQueryResultWindow); Milvus Lite has no cap, and each of its filtered queries scans the collection,
        # so fewer, larger listings cost less.
        server = is_server_uri(uri)
        self.page_limit = 16_384 if server else 131_072
        self.flushes_writes = not server
        # Writers a bulk job may run at once. A server answers a strongly consistent read at its next time tick
        # (the proxy's ``timeTickInterval``, 200 ms by default), so a backfill's check-then-upsert per batch is
        # pipelined over several threads there; Milvus Lite answers at once and shares this process's cores, where
        # more writers only compete.
        self.concurrent_writes = 4 if server else 1
        # Milvus Lite takes one write (and its flush) at a time: two request threads flushing at once fail with
        # "current_seq is monotonic". A server orders concurrent writes itself. The lock also covers the read a
        # write is computed from (see ``replace``), so no other write of this process lands in between, and the
        # parts of a merged search (see ``search``), so they read one state of the gallery.
        self._writing: AbstractContextManager = nullcontext() if server else threading.Lock()
        self.client = _connect(MilvusClient, uri)
        try:
            if self.client.has_collection(collection):
                self._check_schema()
            else:
                create_collection(self.client, collection, dim)
        except StoreError:
            self.client.close()
            raise
        self.client.load_collection(collection)

    def _check_schema(self) -> None:
        """Refuse a collection this code cannot use: one made without room for previous vectors (it can be
        converted), or one of another dimension."""
        fields = {f["name"]: f for f in self.client.describe_collection(self.collection)["fields"]}
        if "vectors" not in fields:
            raise StoreError(
                f"collection {self.collection!r} in {self.uri} has no room for previous vectors (made by an older "
                f"advbct); convert it once with `advbct index migrate --db {self.uri} --collection {self.collection}`"
            )
        have = int(fields["vectors"]["params"]["dim"]) // 2
        if have != self.dim:
            raise StoreError(f"collection {self.collection!r} in {self.uri} holds {have}-d vectors, not {self.dim}-d")

    def _rows(
        self, ids: Sequence[int], refs: Sequence[str], vectors: np.ndarray, generation: int, kept: list[dict] | None
    ) -> list[dict]:
        """Rows of new vectors at ``generation``; ``kept``: each item's stored row, whose current vector and
        generation become its previous ones (``None``: new items, with none)."""
        if not (len(ids) == len(refs) == len(vectors)):
            raise StoreError(f"{len(ids)} ids, {len(refs)} references and {len(vectors)} vectors do not match")
        if any(len(ref) > MAX_REF_LENGTH for ref in refs):
            raise StoreError(f"an image reference is longer than {MAX_REF_LENGTH} characters")
        vectors = normalised(vectors, self.dim)
        if kept is None:
            previous, previous_generations = np.zeros_like(vectors), [NO_GENERATION] * len(ids)
        else:
            previous = np.stack([row["vector"] for row in kept])
            previous_generations = [int(row["generation"]) for row in kept]
        return self._pack(ids, refs, np.hstack([vectors, previous]), generation, previous_generations)

    def _pack(
        self, ids: Sequence[int], refs: Sequence[str], both: np.ndarray, generation: int, previous: Sequence[int]
    ) -> list[dict]:
        now = time.time()
        # Each vector stays a float32 array row: pymilvus packs that faster than a Python list of floats.
        return [
            {"id": int(i), "ref": ref, "vectors": v, "generation": int(generation), "previous_generation": int(p),
             "embedded_at": now, "bucket": int(i) % BUCKETS}
            for i, ref, v, p in zip(ids, refs, both.astype(np.float32), previous, strict=True)
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
        return {item: generation for item, (generation, _) in self.states_of(ids).items()}

    def states_of(self, ids: Sequence[int]) -> dict[int, tuple[int, int]]:
        """(generation, previous generation) of each stored item among ``ids`` (ids not stored are absent)."""
        if not ids:
            return {}
        rows = self.client.query(
            self.collection, filter=f"id in {[int(i) for i in ids]}", output_fields=["id", *STATE_FIELDS]
        )
        return {int(row["id"]): (int(row["generation"]), int(row["previous_generation"])) for row in rows}

    def add(self, ids: Sequence[int], refs: Sequence[str], vectors: np.ndarray, generation: int) -> None:
        """New items; refused as a whole when any id is already stored or repeated."""
        if len(set(ids)) != len(ids):
            raise StoreError("the request repeats an id")
        rows = self._rows(ids, refs, vectors, generation, kept=None)
        with self._writing:
            taken = self.existing(ids)
            if taken:
                raise StoreError(f"ids already in the gallery: {sorted(taken)[:10]}")
            with self._journalled(rows, generation):
                self.client.insert(self.collection, rows)
                self.flush()

    def replace(
        self, ids: Sequence[int], refs: Sequence[str], vectors: np.ndarray, generation: int, flush: bool = True
    ) -> list[int]:
        """Re-embedded items at ``generation``, each keeping the vector it replaces as its previous one; the ids
        written. An item no longer stored must not come back, and one already at ``generation`` is left as it is
        (its kept vector too). One upsert by primary key writes both vectors of an item, so a write killed at any
        point leaves each item whole, as it was or re-embedded, and doing it twice leaves one copy.

        The stored rows are read and the upsert written under the store's write lock. On Milvus Lite, which one
        process holds, every write goes through that lock, so a delete cannot land between the read and the
        upsert and an item deleted meanwhile never comes back. On a Milvus server the lock is not taken (writers
        run in several threads and processes, and Milvus has no conditional write): there a delete that lands
        between this read and the upsert is undone, the item coming back re-embedded, and must be sent again.

        ``flush=False`` leaves the rows in the growing segment (a bulk writer flushes every few batches)."""
        with self._writing:
            stored = {int(row["id"]): row for row in self.get(ids, with_vectors=True)}
            at = {item: int(row["generation"]) for item, row in stored.items()}
            keep = [i for i, item in enumerate(ids) if at.get(int(item), generation) != generation]
            if keep:
                kept = [stored[int(ids[i])] for i in keep]
                rows = self._rows([ids[i] for i in keep], [refs[i] for i in keep], vectors[keep], generation, kept)
                self._upsert(rows, generation, flush)
        return [int(ids[i]) for i in keep]

    def restore(self, ids: Sequence[int], generation: int, flush: bool = True) -> list[int]:
        """Items whose kept vector is ``generation``'s get it back as their current one, and keep the vector they
        had instead (a swap, no model needed); the ids written. Items without a kept vector of ``generation``, or
        already at it, are left as they are. A racing delete is handled as in ``replace``."""
        with self._writing:
            rows = [
                row for row in self.get(ids, with_vectors=True)
                if row["previous_generation"] == generation and row["generation"] != generation
            ]  # fmt: skip
            written = [int(r["id"]) for r in rows]
            if rows:
                restored, replaced = [np.stack([r[half] for r in rows]) for half in ("previous_vector", "vector")]
                both = np.hstack([restored, replaced])
                was = [int(r["generation"]) for r in rows]
                self._upsert(self._pack(written, [r["ref"] for r in rows], both, generation, was), generation, flush)
        return written

    def _upsert(self, rows: list[dict], generation: int, flush: bool) -> None:
        """Write ``rows`` by primary key; the caller holds the write lock."""
        with self._journalled(rows, generation):
            self.client.upsert(self.collection, rows)
            if flush:
                self.flush()

    def flush(self) -> None:
        if self.flushes_writes:
            self.client.flush(self.collection)

    def delete(self, ids: Sequence[int]) -> None:
        """Delete items; refused as a whole when any id is not stored."""
        with self._writing:
            missing = set(int(i) for i in ids) - self.existing(ids)
            if missing:
                raise StoreError(f"unknown ids: {sorted(missing)[:10]}")
            with self._journalled([{"id": i} for i in ids], None):
                self.client.delete(self.collection, ids=[int(i) for i in ids])
                self.flush()

    def _journalled(self, rows: Sequence[dict], generation: int | None) -> AbstractContextManager:
        """A write's ledger bracket (journal, then settle each row's ``generation`` and ``previous_generation``;
        ``generation`` ``None`` for a delete), inside the write lock on Milvus Lite so the mirror settles in the
        order Milvus applied the writes."""
        if self.ledger is None:
            return nullcontext()
        states = {
            int(r["id"]): None if generation is None else (generation, int(r["previous_generation"])) for r in rows
        }
        return self.ledger.writing(self, generation, states)

    def get(self, ids: Sequence[int], with_vectors: bool = False) -> list[dict]:
        """The stored items among ``ids``: ``id``, ``ref``, ``generation``, ``previous_generation``
        (``NO_GENERATION`` where none is kept), ``embedded_at``, and with ``with_vectors`` the current ``vector``
        and the kept ``previous_vector`` (zeros where none is kept)."""
        fields = [*ITEM_FIELDS, *(["vectors"] if with_vectors else [])]
        rows = self.client.get(self.collection, ids=[int(i) for i in ids], output_fields=fields)
        if with_vectors:
            for row in rows:
                both = np.asarray(row.pop("vectors"), dtype=np.float32)
                row["vector"], row["previous_vector"] = both[: self.dim], both[self.dim :]
        return rows

    def count(self, filter: str = "") -> int:
        rows = self.client.query(self.collection, filter=filter, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def generations(self, field: str = "generation") -> dict[int, int]:
        """Items per generation; with ``field="previous_generation"``, items per generation of their kept vector
        (items keeping none left out)."""
        counts: dict[int, int] = {}
        for generation in self.distinct_generations(field):
            if generation != NO_GENERATION:
                counts[generation] = self.count(f"{field} == {generation}")
        return counts

    def all_states(self) -> dict[int, tuple[int, int]]:
        """Every stored item's (generation, previous generation) by id, listed in pages: what a ledger is rebuilt
        from."""
        states: dict[int, tuple[int, int]] = {}
        batch = min(self.page_limit, 16_384)  # pymilvus's query iterator takes batches of at most 16,384 rows
        listing = self.client.query_iterator(self.collection, batch_size=batch, output_fields=STATE_FIELDS)
        try:
            while rows := listing.next():
                states.update((int(r["id"]), (int(r["generation"]), int(r["previous_generation"]))) for r in rows)
        finally:
            listing.close()
        return states

    def stale_items(self, generation: int, with_vectors: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The ids (ascending: the order items were added in) of every item not at ``generation``, and with
        ``with_vectors`` their stored (L2-normalised) vectors, listed in pages: what a backfill order is computed
        from."""
        batch = min(self.page_limit, 16_384)
        fields = ["vectors"] if with_vectors else ["generation"]
        listing = self.client.query_iterator(
            self.collection, batch_size=batch, filter=f"generation != {int(generation)}", output_fields=fields
        )
        ids: list[int] = []
        vectors: list[np.ndarray] = []
        try:
            while rows := listing.next():
                ids.extend(int(row["id"]) for row in rows)
                if with_vectors:
                    vectors.append(np.asarray([row["vectors"] for row in rows], dtype=np.float32)[:, : self.dim])
        finally:
            listing.close()
        by_id = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        if not with_vectors:
            return np.asarray(ids, dtype=np.int64)[by_id], None
        stacked = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(ids, dtype=np.int64)[by_id], stacked[by_id]

    def distinct_generations(self, field: str = "generation") -> list[int]:
        """The values of ``field`` (a generation field) some stored item holds: one single-row query per value,
        each excluding those found, and a last one that finds none."""
        seen: set[int] = set()
        while True:
            clause = f"{field} not in {sorted(seen)}" if seen else ""
            rows = self.client.query(self.collection, filter=clause, output_fields=[field], limit=1)
            if not rows:
                return sorted(seen)
            seen.add(int(rows[0][field]))

    def stale(
        self,
        generation: int,
        limit: int,
        buckets: Sequence[int] | None = None,
        exclude: Collection[int] = (),
        after: int | None = None,
    ) -> list[dict]:
        """Up to ``limit`` items embedded by another generation than ``generation`` (in the given id buckets),
        other than those of ``exclude``; with ``after``, only ids above it (a cursor through the gallery by id).
        Rows hold ``id``, ``ref``, ``generation`` and ``previous_generation`` (where it is ``generation``, the
        item is restored rather than re-embedded)."""
        clause = f"generation != {int(generation)}"
        if after is not None:
            clause += f" and id > {int(after)}"
        if buckets is not None:
            clause += f" and bucket in {[int(b) for b in buckets]}"
        if exclude:
            clause += f" and id not in {sorted(int(i) for i in exclude)}"
        fields = ["id", "ref", "generation", "previous_generation"]
        return self.client.query(self.collection, filter=clause, output_fields=fields, limit=limit)

    def search(self, vectors: np.ndarray, k: int, merge: MixedMerge | None = None) -> list[list[Hit]]:
        """The ``k`` best items for each query vector. Without ``merge``, by cosine with every item's current
        vector. With it, the query is the ``merge.active`` generation's: each item is scored through that
        generation's vector where it has one (current, or kept since a re-embedding that a rollback has undone)
        and through its current vector otherwise, and a calibrated merge ranks the two parts by the log-odds that
        each hit is relevant (``Hit.relevance``), so items not yet re-embedded compete on what their score means,
        not its scale.

        With a ledger, a part no item can be in is not searched: where every item is at the active generation, one
        plain search answers (see ``ItemLedger.search_parts`` for why the counts it reads first are safe)."""
        if k < 1:
            raise StoreError(f"k must be at least 1, got {k}")
        vectors = normalised(vectors, self.dim)
        if merge is None:
            return self._search(vectors, k, "", part="plain")
        active = int(merge.active)
        parts = SearchParts() if self.ledger is None else self.ledger.search_parts(active)
        if not (parts.cross or parts.kept):
            return [merge.rank(hits, [], k) for hits in self._search(vectors, k, "", part="plain")]
        # The other generations first, then the kept vectors, then the current ones: a backfill only moves items
        # from the earlier parts into the last, so an item moved between two searches is found twice (and
        # counted once), never missed. That needs each search to see at least what the one before it saw, which
        # Milvus Lite does not promise while it writes and flushes (two consecutive filtered searches can miss an
        # item that moved); there the parts are searched under the write lock, so no write lands between them.
        clause = f"generation != {active} and previous_generation != {active}"
        with self._writing:
            cross = self._search(vectors, k, clause, part="cross") if parts.cross else [[] for _ in vectors]
            mine = self._own_vectors(vectors, k, active, parts.kept)
        return [merge.rank(own, theirs, k) for own, theirs in zip(mine, cross, strict=True)]

    def search_generation(self, vectors: np.ndarray, k: int, generation: int) -> list[list[Hit]]:
        """The ``k`` best, by cosine, among the vectors ``generation`` made (current or kept): one generation's
        own retrieval."""
        if k < 1:
            raise StoreError(f"k must be at least 1, got {k}")
        with self._writing:  # the two parts read one state of the gallery (see ``search``)
            own = self._own_vectors(normalised(vectors, self.dim), k, int(generation), with_kept=True)
        return [MixedMerge(int(generation)).rank(hits, [], k) for hits in own]

    def _own_vectors(self, vectors: np.ndarray, k: int, generation: int, with_kept: bool) -> list[list[Hit]]:
        """Each query's hits among ``generation``'s kept vectors (``with_kept``), then among its current ones
        (unranked)."""
        clause = f"previous_generation == {generation} and generation != {generation}"
        kept = self._search(vectors, k, clause, part="kept") if with_kept else [[] for _ in vectors]
        current = self._search(vectors, k, f"generation == {generation}", part="current")
        return [[*a, *b] for a, b in zip(kept, current, strict=True)]

    def _search(self, vectors: np.ndarray, k: int, clause: str, part: str) -> list[list[Hit]]:
        """One ``part``'s hits: by inner product with the kept half of the stored vectors for ``kept``, with the
        current half otherwise; the query fills that half and zeros the other."""
        from pymilvus.exceptions import MilvusException

        kept = part == "kept"
        zeros = np.zeros_like(vectors)
        queries = np.hstack([zeros, vectors] if kept else [vectors, zeros])
        if self.on_search is not None:
            self.on_search(part)
        try:
            results = self.client.search(
                self.collection, data=queries.tolist(), limit=k, filter=clause, anns_field="vectors",
                output_fields=["generation", "previous_generation", "ref"], search_params={"metric_type": "IP"},
            )  # fmt: skip
        except MilvusException as exc:
            raise StoreError(f"search failed: {exc}") from exc
        matched = "previous_generation" if kept else "generation"
        return [
            [Hit(int(h["id"]), float(h["distance"]), int(h["entity"]["generation"]), int(h["entity"][matched]),
                 h["entity"]["ref"]) for h in row]
            for row in results
        ]  # fmt: skip

    def close(self) -> None:
        self.client.close()


def create_collection(client, name: str, dim: int) -> None:
    """An empty gallery collection for ``dim``-d embeddings (the schema in the module docstring)."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("ref", DataType.VARCHAR, max_length=MAX_REF_LENGTH)
    schema.add_field("vectors", DataType.FLOAT_VECTOR, dim=2 * dim)  # current | previous
    schema.add_field("generation", DataType.INT64)
    schema.add_field("previous_generation", DataType.INT64)
    schema.add_field("embedded_at", DataType.DOUBLE)
    schema.add_field("bucket", DataType.INT64)
    index = client.prepare_index_params()
    index.add_index("vectors", index_type="FLAT", metric_type="IP")
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")


def migrate_collection(uri: str, collection: str) -> int:
    """Convert a collection made without room for previous vectors into the current schema (every item keeps its
    id, reference, vector, generation and time of embedding, with no previous vector); the items converted.

    The items are copied into a staging collection first and the old one is dropped only once the copy is
    complete, so a conversion stopped at any point is finished by running it again."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    staging = f"{collection}_migrating"
    client = _connect(MilvusClient, uri)
    try:
        if client.has_collection(collection):
            fields = {f["name"]: f for f in client.describe_collection(collection)["fields"]}
            if "vectors" in fields:
                raise StoreError(f"collection {collection!r} in {uri} has room for previous vectors already")
            if client.has_collection(staging):
                client.drop_collection(staging)
            dim = int(fields["vector"]["params"]["dim"])
            create_collection(client, staging, dim)
            client.load_collection(collection)
            _copy_items(client, collection, staging, dim)
            client.drop_collection(collection)
        elif not client.has_collection(staging):
            raise StoreError(f"no collection {collection!r} in {uri}")
        client.rename_collection(staging, collection)
        client.load_collection(collection)
        rows = client.query(collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])
    except MilvusException as exc:
        raise StoreError(f"the conversion of {collection!r} stopped ({exc.message}); run it again to finish") from None
    finally:
        client.close()


def _copy_items(client, source: str, target: str, dim: int) -> None:
    """Every item of an old-schema ``source`` written into ``target`` with no previous vector, a page at a time."""
    fields = ["ref", "vector", "generation", "embedded_at", "bucket"]
    listing = client.query_iterator(source, batch_size=16_384, output_fields=fields)
    try:
        while rows := listing.next():
            zeros = np.zeros(dim, dtype=np.float32)
            client.insert(target, [
                {**{f: row[f] for f in ("id", "ref", "generation", "embedded_at", "bucket")},
                 "vectors": np.concatenate([np.asarray(row["vector"], dtype=np.float32), zeros]),
                 "previous_generation": NO_GENERATION}
                for row in rows
            ])  # fmt: skip
    finally:
        listing.close()
    client.flush(target)
