"""torch.compile of the compatibility losses (``compile: true``): one compilation serves a whole run, and the
compiled loss computes what the eager one does."""

import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from advbct import pipeline
from advbct.compat import CompatBatch, create, list_methods
from advbct.presets import train_config
from advbct.training import run_folder
from advbct.training.cuda_graph import StepScalars
from test_host_sync import make_context

SLOW_TO_COMPILE = {
    "advbct-adv-only",
    "advbct-bound-only",
    "advbct-fixed-radius",
    "advbct-tight",
    "bct",
    "l2",
    "lce",
    "unibct",
}
# The variant's non-default choices: a class-conditional D called with the batch's labels, a warm-up weight of
# the tensor epoch, an elastic radius with tau from the statistics.
TIGHT_CHOICES = {
    "discriminator": "class-conditional",
    "adversarial_schedule": "warmup",
    "elastic": True,
    "tau": "stats",
}
METHODS = [
    *(
        pytest.param(name, {}, marks=pytest.mark.slow) if name in SLOW_TO_COMPILE else pytest.param(name, {})
        for name in list_methods()
        if name != "independent"
    ),
    pytest.param("advbct-tight", TIGHT_CHOICES, marks=pytest.mark.slow, id="advbct-tight-choices"),
]


@pytest.mark.parametrize(("name", "options"), METHODS)
def test_a_compiled_loss_matches_the_eager_one_without_compiling_again(name, options):
    # Three steps whose progress and epoch change, as training's do: handed as 0-d tensors (StepScalars) they are
    # inputs of the compiled loss, so a second compilation would be an error here.
    dim, classes, n = 8, 6, 12
    torch._dynamo.reset()
    torch.manual_seed(1)
    compiled = create(name, make_context(dim, classes), **options)
    torch.manual_seed(1)
    eager = create(name, make_context(dim, classes), **options)
    compiled.compile()
    scalars = StepScalars(torch.device("cpu"))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            new_emb = torch.randn(n, dim, requires_grad=True)
            old_emb = torch.randn(n, dim)
            labels = torch.arange(n) % classes
            classifier = torch.randn(classes, dim, requires_grad=True)
            progress, epoch = scalars.set(step / 2, step)
            outputs = [
                method(CompatBatch(new_emb, labels, old_emb, progress, epoch, 3, classifier))
                for method in (compiled, eager)
            ]
            grads = [torch.autograd.grad(out.total, [new_emb, classifier], allow_unused=True) for out in outputs]
            torch.testing.assert_close(outputs[0].total, outputs[1].total, rtol=1e-5, atol=1e-6)
            assert outputs[0].parts.keys() == outputs[1].parts.keys()
            for a, b in zip(*grads, strict=True):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_step_scalars_refill_the_same_tensors():
    scalars = StepScalars(torch.device("cpu"))
    progress, epoch = scalars.set(0.25, 3)
    again = scalars.set(0.5, 4)
    assert again[0] is progress and again[1] is epoch
    assert (progress.item(), epoch.item()) == (0.5, 4.0)


@pytest.mark.slow
def test_compiled_advbct_training_compiles_nothing_after_its_first_epoch(tiny_folder, tmp_path, monkeypatch):
    # The second epoch brings a new epoch value (the adversarial weight) and new progress values at every step: a
    # loss that took them as Python numbers would compile again there. The eager run learns the same model.
    common = ["data.dataset=image-folder", "device=cpu", "optim.epochs=2"]
    old_cfg = train_config("old", "smoke", None, common, str(tiny_folder), None)
    old_path = pipeline.train_old(old_cfg, tmp_path / "old", show_progress=False)
    _, stats_path = pipeline.compute_statistics(old_path, data_root=str(tiny_folder), device="cpu")
    graphs_after_epoch: list[int] = []
    real_save = run_folder.atomic_save

    def save_and_count(obj, path):
        real_save(obj, path)
        if path.name == "last.pt":
            graphs_after_epoch.append(counters["stats"]["unique_graphs"])

    histories = {}
    for compiled in (False, True):
        cfg = train_config("new", "smoke", None, [*common, f"compile={compiled}"], str(tiny_folder), None)
        torch._dynamo.reset()
        counters.clear()
        graphs_after_epoch.clear()
        monkeypatch.setattr(run_folder, "atomic_save", save_and_count)
        run = pipeline.train_new(cfg, tmp_path / f"new-{compiled}", old_path, stats_path, show_progress=False)
        histories[compiled] = json.loads((run.parent / "history.json").read_text())
    first, second = graphs_after_epoch
    assert first > 0 and second == first, graphs_after_epoch
    for eager_epoch, compiled_epoch in zip(histories[False], histories[True], strict=True):
        for part in ("cls", "bound", "adv"):
            assert compiled_epoch[part] == pytest.approx(eager_epoch[part], rel=2e-2, abs=1e-3), part
