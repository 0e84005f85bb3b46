"""The live watch: retrieval quality of the service as it serves, measured on a labelled probe while a backfill runs.

The gate judges a candidate on a validation split before it serves, but a forced upgrade, or a gallery unlike that
split, can still serve worse results; the watch is what sees them. It searches the live gallery with a probe folder
(``<class>/<image>``, images held out from the gallery) exactly as a user's query is searched (the active model,
the mixed gallery merged as served) when a backfill starts (so at once after an upgrade) and every ``every``
re-embedded items, and scores precision@10: the share of each probe query's top 10 hits whose class is the query's.
A gallery item's class is the name of the folder its image file is in (``.../<class>/<file>``), as in the probe.

A point below the threshold pauses the backfill and says why: re-embedding more items with a model that serves
worse than the old one only spreads the damage (and a rollback then has more to re-embed). The default threshold
is the old generation's own score on the probe (M(o,o): its model searching the items it embedded), measured at
the first watch of each backfill; an operator may set one instead.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from advbct.data.images import list_image_folder
from advbct.serving.models import Embedder
from advbct.serving.store import GalleryStore, Hit, MixedMerge

K = 10  # the watch's metric is precision@K
METRIC = f"precision@{K}"


@dataclass(frozen=True)
class WatchConfig:
    probe: Path
    every: int = 1000  # re-embedded items between points
    threshold: float | None = None  # None: the old generation's own score on the probe


@dataclass(frozen=True)
class WatchPoint:
    target_generation: int
    done: int  # items this backfill had re-embedded
    score: float
    at: float


def hit_classes(refs: list[str]) -> list[str]:
    """A gallery item's class: the folder its image file is in."""
    return [PurePosixPath(ref).parent.name for ref in refs]


def precision_at_k(hits: list[list[Hit]], labels: list[str], k: int = K) -> float:
    """Mean over queries of the share of the top ``k`` hits (a short list counts its missing hits as wrong) whose
    class is the query's."""
    classes = np.full((len(hits), k), "", dtype=object)
    for row, found in enumerate(hits):
        classes[row, : min(k, len(found))] = hit_classes([h.ref for h in found[:k]])
    return float((classes == np.asarray(labels, dtype=object)[:, None]).mean())


@dataclass
class LiveWatch:
    """The watch of one service: its probe, its points so far, and why it paused the backfill, if it did."""

    config: WatchConfig
    files: list[Path] = field(init=False)
    labels: list[str] = field(init=False)
    points: list[WatchPoint] = field(default_factory=list)
    thresholds: dict[int, float] = field(default_factory=dict)  # measured default, per target generation
    reason: str | None = None
    queries: dict[str, np.ndarray] = field(default_factory=dict)  # the probe embedded, per checkpoint
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.config.every < 1:
            raise ValueError(f"the watch measures every 1 or more re-embedded items, got {self.config.every}")
        files, classes = list_image_folder(Path(self.config.probe))
        self.files, self.labels = [f for f, _ in files], [classes[label] for _, label in files]

    def _probe(self, embedder: Embedder) -> np.ndarray:
        key = str(embedder.path)
        if key not in self.queries:
            self.queries[key] = embedder.embed_files(self.files)
        return self.queries[key]

    def score(self, embedder: Embedder, store: GalleryStore, merge: MixedMerge) -> float:
        """The service's quality now: the probe searched as a user's query is."""
        return precision_at_k(store.search(self._probe(embedder), K, merge), self.labels)

    def old_score(self, old: Embedder, old_number: int, store: GalleryStore) -> float:
        """The old generation's own score: its model searching only the items it embedded (M(o,o) on the probe)."""
        return precision_at_k(store.search_generation(self._probe(old), K, old_number), self.labels)

    def threshold(self, target: int) -> float | None:
        """The configured threshold, else the one measured for ``target`` (``None`` before it is)."""
        return self.config.threshold if self.config.threshold is not None else self.thresholds.get(target)

    def observe(self, target: int, done: int, score: float, threshold: float, pause: threading.Event) -> None:
        """Record a point; below the threshold, pause the backfill and say why."""
        with self.lock:
            self.points.append(WatchPoint(target, done, score, time.time()))
            if score < threshold:
                self.reason = (
                    f"the probe's {METRIC} fell to {score:.3f} after {done} items were re-embedded for generation "
                    f"{target}, below the threshold {threshold:.3f}: backfill paused (resume with POST "
                    "/backfill/resume, or roll back)"
                )
                pause.set()

    def due(self, done: int) -> bool:
        """Whether ``done`` re-embedded items crossed the next multiple of ``every`` since the last point."""
        last = self.points[-1].done if self.points else 0
        return done // self.config.every > last // self.config.every

    def to_json(self, target: int) -> dict:
        return {"metric": METRIC, "every": self.config.every, "threshold": self.threshold(target),
                "paused_because": self.reason,
                "points": [asdict(p) for p in self.points if p.target_generation == target]}  # fmt: skip
