"""No training-step operation waits on the device: every compatibility loss, forward and backward, and the batch
path (gather, GPU augmentation, normalisation) run without an op that copies a device value to the host.

On a GPU such an op (``.item()``, ``nonzero``, indexing with a boolean mask) stalls the CPU until every queued
kernel has finished, so the next step cannot be queued behind the current one. The ops are recorded on the CPU
with a dispatch mode, which sees the same aten calls a CUDA run makes.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from advbct.compat import (
    CompatBatch,
    CompatContext,
    compute_class_statistics,
    create,
    list_methods,
    reference_method,
)
from advbct.data.batches import BatchStream, Preprocessing, normalise
from advbct.distributed import World
from advbct.models.heads import SoftmaxHead

SYNCING_OPS = {"nonzero", "masked_select", "_local_scalar_dense", "is_nonzero", "equal", "unique", "item"}


class SyncRecorder(TorchDispatchMode):
    """Names of the aten ops that read a device value on the host, as they are dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNCING_OPS:
            self.found.append(str(func))
        if name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        ):
            self.found.append(f"{func} with a boolean mask")
        if name in ("_to_copy", "copy_") and self._host_to_device(name, args, kwargs or {}):
            self.found.append(f"{func} from the host to the device")
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _host_to_device(name: str, args: tuple, kwargs: dict) -> bool:
        """A blocking host-to-device copy waits for the device's queue to drain first."""
        if name == "_to_copy":
            source, target = args[0].device, kwargs.get("device", args[0].device)
        else:
            source, target = args[1].device, args[0].device
        return source.type == "cpu" and torch.device(target).type != "cpu"


def test_the_recorder_sees_each_kind_of_sync():
    x, mask = torch.randn(6), torch.tensor([True, False] * 3)
    for make in (lambda: x[mask], lambda: x.sum().item(), lambda: torch.nonzero(mask), lambda: x.masked_select(mask)):
        with SyncRecorder() as recorder:
            make()
        assert recorder.found, make
    with SyncRecorder() as recorder:
        torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)
    assert recorder.found == []


def make_context(dim: int, classes: int) -> CompatContext:
    torch.manual_seed(0)
    old_classes = list(range(0, classes, 2))
    stats = compute_class_statistics(
        torch.randn(20 * len(old_classes), dim), torch.tensor(old_classes).repeat(20), classes, "old"
    )
    head = SoftmaxHead(dim, len(old_classes)).eval().requires_grad_(False)
    return CompatContext(dim, classes, stats, head, tuple(old_classes))


METHOD_CASES = [(m, {}) for m in list_methods() if m != reference_method()]


@pytest.mark.parametrize(("name", "options"), METHOD_CASES)
def test_compatibility_losses_never_wait_on_the_device(name, options):
    dim, classes, n = 8, 6, 12
    method = create(name, make_context(dim, classes), **options)
    new_emb = torch.randn(n, dim, requires_grad=True)
    classifier = torch.randn(classes, dim, requires_grad=True)
    old_emb = torch.randn(n, dim) if method.needs_old_embeddings else None
    labels = torch.arange(n) % classes
    with SyncRecorder() as recorder:
        out = method(CompatBatch(new_emb, labels, old_emb, 0.3, 1, 3, classifier))
        out.total.backward()
    assert recorder.found == [], f"{name}: {recorder.found}"
    assert new_emb.grad is not None


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_batch_path_never_waits_on_the_device(device):
    # On the meta device (shapes only, standing in for a GPU) a copy from the host shows as a device change.
    images = torch.randint(0, 256, (80, 3, 8, 8), dtype=torch.uint8).to(device)
    stream = BatchStream(images, (torch.arange(80) % 5).to(device), 16, seed=0, augment=True, world=World(0, 1, 0))
    prep = Preprocessing(8)
    batches = stream.epoch(0, 0)
    normalise(next(batches)[0], prep, True)  # the epoch's order and crops move to the device once, here
    with SyncRecorder() as recorder:
        for batch, _ in batches:
            normalise(batch, prep, True)
    assert recorder.found == []


def test_the_recorder_sees_a_copy_to_the_device():
    with SyncRecorder() as recorder:
        torch.arange(4).to("meta")
    assert recorder.found
