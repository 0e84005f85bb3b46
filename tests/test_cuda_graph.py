"""Training steps replayed from CUDA graphs (``cuda_graph=true``): the refusals and the pieces a captured step
relies on run everywhere; on a CUDA machine a graphed AdvBCT run is checked against the eager one."""

import json
import math

import pytest
import torch

from advbct import pipeline
from advbct.compat.advbct import adversarial_weight, dann_alpha, grad_reverse
from advbct.presets import train_config
from advbct.training.cuda_graph import (
    CudaGraphStep,
    check_cuda_graph_setup,
    prepare_optimizer,
    set_learning_rate,
)
from advbct.training.logger import LossMeter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_the_dann_schedule_and_the_reversal_accept_a_device_progress():
    # A captured step reads the progress from a 0-d tensor: alpha(0.5) = 2 / (1 + e^-5) - 1 = 0.98661...
    expected = 2.0 / (1.0 + math.exp(-5.0)) - 1.0
    assert dann_alpha(0.5) == pytest.approx(expected)
    alpha = dann_alpha(torch.tensor(0.5))
    assert isinstance(alpha, torch.Tensor) and alpha.item() == pytest.approx(expected, rel=1e-6)
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    (grad_reverse(x, torch.tensor(0.25)) * torch.tensor([1.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [-0.25, -0.75]  # d/dx of (x1 + 3 x2), times -0.25


def test_the_adversarial_weight_accepts_a_device_epoch():
    # w_e = (E - e + 1) / E with E = 4: 1.25 at e = 0, 1.0 at e = 1, 0.5 at e = 3.
    assert [adversarial_weight(e, 4) for e in (0, 1, 3)] == [1.25, 1.0, 0.5]
    weights = [adversarial_weight(torch.tensor(float(e)), 4) for e in (0, 1, 3)]
    assert all(isinstance(w, torch.Tensor) for w in weights) and [w.item() for w in weights] == [1.25, 1.0, 0.5]


def _twin_linear_models(device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    eager = torch.nn.Linear(4, 3).to(device)
    twin = torch.nn.Linear(4, 3).to(device)
    twin.load_state_dict(eager.state_dict())
    return eager, twin


SCHEDULE = (0.1, 0.05, 0.02, 0.3, 0.2, 0.01, 0.4)


def test_fused_sgd_reading_its_rate_from_a_device_tensor_follows_the_schedule_a_float_rate_does():
    # The graphed path's optimizer (fused, the rate a 0-d tensor filled in place) against the eager path's, over a
    # schedule that changes every step, so a rate stuck at its first value could not end at the same weights.
    eager, twin = _twin_linear_models("cpu")
    hyper = {"momentum": 0.9, "weight_decay": 5e-4}
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1, **hyper)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, fused=True, **hyper)
    prepare_optimizer(twin_opt, graphed=True, device=torch.device("cpu"))
    x = torch.randn(8, 4)
    for lr in SCHEDULE:
        for model, opt in ((eager, eager_opt), (twin, twin_opt)):
            set_learning_rate(opt, lr)
            opt.zero_grad()
            (model(x) ** 2).mean().backward()
            opt.step()
    assert twin_opt.param_groups[0]["lr"].item() == pytest.approx(0.4)
    torch.testing.assert_close(twin.weight, eager.weight, rtol=1e-5, atol=1e-6)


def test_a_resumed_run_puts_the_saved_optimizer_in_its_own_steps_form():
    # A graphed run resuming an eager run's last.pt gets fused SGD with a tensor rate back; an eager run resuming
    # a graphed one gets its float rate and its multi-tensor SGD back, whatever the saved groups said.
    eager, twin = _twin_linear_models("cpu")
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    graphed_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, fused=True)
    prepare_optimizer(graphed_opt, graphed=True, device=torch.device("cpu"))
    set_learning_rate(graphed_opt, 0.05)
    saved_eager, saved_graphed = eager_opt.state_dict(), graphed_opt.state_dict()
    graphed_opt.load_state_dict(saved_eager)
    prepare_optimizer(graphed_opt, graphed=True, device=torch.device("cpu"))
    group = graphed_opt.param_groups[0]
    assert group["fused"] is True and isinstance(group["lr"], torch.Tensor) and group["lr"].item() == pytest.approx(0.1)
    eager_opt.load_state_dict(saved_graphed)
    prepare_optimizer(eager_opt, graphed=False, device=torch.device("cpu"))
    group = eager_opt.param_groups[0]
    assert group["fused"] is None and group["lr"] == pytest.approx(0.05) and isinstance(group["lr"], float)


def test_the_meter_keeps_its_own_copy_of_outputs_a_replay_overwrites():
    meter = LossMeter()
    output, accuracy = torch.tensor(2.0), torch.tensor(1, dtype=torch.long)
    meter.add({"loss": output, "acc": accuracy})
    output.fill_(5.0)  # what the next replay of a graph does to its output tensors
    accuracy.fill_(0)
    meter.add({"loss": output, "acc": accuracy})
    assert meter.read() == {"acc": 0.5, "loss": 3.5}  # means, sorted by name
    assert meter.read() == {}  # reset by the read
    meter.add({"loss": output})
    with pytest.raises(ValueError, match="loss parts changed within a run"):
        meter.add({"cls": output})


def test_cuda_graph_is_refused_where_it_cannot_run(tiny_folder, tmp_path):
    overrides = ["data.dataset=image-folder", "device=cpu", "optim.epochs=1", "cuda_graph=true"]
    cfg = train_config("old", "smoke", None, overrides, str(tiny_folder), None)
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device, the run uses cpu"):
        pipeline.train_old(cfg, tmp_path / "old", show_progress=False)
    assert not any((tmp_path / "old" / name).exists() for name in ("config.json", "last.pt", "model.pt"))
    with pytest.raises(ValueError, match="cuda_graph and compile are alternatives"):
        check_cuda_graph_setup(torch.device("cuda"), distributed=False, compiled=True)
    with pytest.raises(ValueError, match="cuda_graph is for single-GPU runs"):
        check_cuda_graph_setup(torch.device("cuda"), distributed=True, compiled=False)
    check_cuda_graph_setup(torch.device("cuda"), distributed=False, compiled=False)


def test_a_run_folder_is_reused_whether_or_not_its_config_names_cuda_graph(tiny_folder, tmp_path):
    cfg = train_config("old", "smoke", None, ["data.dataset=image-folder", "device=cpu", "optim.epochs=1"],
                       str(tiny_folder), None)  # fmt: skip
    first = pipeline.train_old(cfg, tmp_path / "old", show_progress=False)
    saved = tmp_path / "old" / "config.json"
    tree = json.loads(saved.read_text())
    del tree["cuda_graph"]  # as written before the option existed
    saved.write_text(json.dumps(tree))
    assert pipeline.train_old(cfg, tmp_path / "old", show_progress=False) == first
    graphed = cfg.model_copy(update={"cuda_graph": True})
    assert pipeline.train_old(graphed, tmp_path / "old", show_progress=False) == first  # finished: not retrained


@needs_cuda
def test_a_graphed_advbct_run_replays_each_steps_batch_progress_and_epoch(tiny_folder, tmp_path):
    base = ["data.dataset=image-folder", "device=cuda", "optim.batch_size=16", "optim.milestones=[2]"]
    old_cfg = train_config("old", "smoke", None, [*base, "optim.epochs=1"], str(tiny_folder), None)
    old_path = pipeline.train_old(old_cfg, tmp_path / "old", show_progress=False)
    _, stats_path = pipeline.compute_statistics(old_path, device="cuda")
    # A learning rate of 1e-6 holds both runs at their shared start, so float noise (cuDNN's algorithms, atomic
    # adds) cannot grow between them, and each epoch's mean loss parts must agree closely. A replay that read the
    # captured batch instead of each step's, or baked in the capture's epoch weight, would move them by percents,
    # far outside the 0.1% tolerance; at a real learning rate float noise alone would grow that large.
    runs = {}
    for name, graphed in (("eager", "false"), ("graphed", "true")):
        # 4 steps per epoch, 4 epochs: 3 eager warm-up steps, then one capture replayed 13 times
        overrides = [*base, "optim.epochs=4", "optim.lr=1e-6", "compat.method=advbct", f"cuda_graph={graphed}"]
        cfg = train_config("new", "smoke", None, overrides, str(tiny_folder), None)
        path = pipeline.train_new(cfg, tmp_path / name, old_path, stats_path, show_progress=False)
        runs[name] = json.loads((path.parent / "history.json").read_text())
    assert len(runs["eager"]) == len(runs["graphed"]) == 4
    for a, b in zip(runs["eager"], runs["graphed"], strict=True):
        for part in ("loss", "cls", "bound", "adv", "violating"):
            assert b[part] == pytest.approx(a[part], rel=1e-3, abs=1e-4), (a["epoch"], part)


@needs_cuda
def test_one_captured_step_follows_the_learning_rate_and_epoch_of_every_replay():
    # A linear model whose loss is scaled by AdvBCT's epoch weight, stepped by fused SGD through CudaGraphStep
    # (3 eager warm-up calls, one capture, replays) against the same model stepped eagerly with host numbers.
    eager, twin = _twin_linear_models("cuda")
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, fused=True)
    prepare_optimizer(twin_opt, graphed=True, device=torch.device("cuda"))
    graphed = CudaGraphStep()

    def step(x, target, progress, epoch, model=twin, opt=twin_opt):
        loss = adversarial_weight(epoch, 4) * progress * ((model(x) - target.float().unsqueeze(1)) ** 2).mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    for i, lr in enumerate(SCHEDULE):
        x, target = torch.randn(8, 4, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
        epoch, progress = i % 4, (i + 1) / len(SCHEDULE)
        set_learning_rate(eager_opt, lr)
        set_learning_rate(twin_opt, lr)
        expected = step(x, target, progress, epoch, eager, eager_opt)["loss"]
        got = graphed(step, x, target, progress, epoch)["loss"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert graphed.graph is not None  # the last calls were replays
    torch.testing.assert_close(twin.weight, eager.weight, rtol=1e-5, atol=1e-6)
