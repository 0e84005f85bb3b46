"""Micro-batching: concurrent requests are embedded together, one model call per batch.

Each request puts its decoded images on a queue and waits; one worker thread takes whatever arrived within a
short window (up to ``max_batch`` images), embeds them in one forward pass and hands each request its rows.
Under load this turns many single-image calls into a few large ones; alone, a request waits at most the window.
One batcher serves for the life of the service: an upgrade swaps the model it calls (with the generation it
stands for) in one assignment, so no thread is ever started per model and every answer says which model made it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from advbct.serving.models import Embedder


class MicroBatcher:
    def __init__(
        self,
        embedder: Embedder,
        generation: int,
        max_batch: int = 64,
        window_s: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
    ):
        """``on_batch``: called with each model call's number of images (the service's batch-size metric)."""
        self.model = (embedder, generation)
        self.on_batch = on_batch
        self.max_batch, self.window_s = max_batch, window_s
        self._queue: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="advbct-batcher", daemon=True)
        self._thread.start()
        self.batches = 0

    def swap(self, embedder: Embedder, generation: int) -> None:
        """Batches taken from now on are embedded by ``embedder``."""
        self.model = (embedder, generation)

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """uint8 (N, H, W, 3) at the model's input size -> normalised (N, d) and the generation that embedded them,
        batched with other requests."""
        future: Future = Future()
        self._queue.put((images, future))
        return future.result()

    def close(self) -> None:
        """Stop the worker once the requests queued before this call are answered."""
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            pending, count = [first], len(first[0])
            while count < self.max_batch:
                try:
                    item = self._queue.get(timeout=self.window_s)
                except queue.Empty:
                    break
                if item is None:  # close() was called: answer what is pending, then stop
                    self._queue.put(None)
                    break
                pending.append(item)
                count += len(item[0])
            embedder, generation = self.model
            try:
                vectors = embedder.embed_arrays(np.concatenate([images for images, _ in pending]))
            except Exception as exc:  # every waiting request learns about the failure
                for _, future in pending:
                    future.set_exception(exc)
                continue
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(count)
            start = 0
            for images, future in pending:
                future.set_result((vectors[start : start + len(images)], generation))
                start += len(images)
