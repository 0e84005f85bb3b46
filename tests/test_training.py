"""The training loop: learning-rate schedule, and resuming an interrupted run to the same weights."""

import pytest
import torch

from advbct import pipeline
from advbct.cli import train_config
from advbct.config import OptimConfig
from advbct.training import learning_rate
from advbct.training import loop as loop_module


def test_learning_rate_schedule():
    cfg = OptimConfig(lr=0.1, milestones=[2, 4], gamma=0.1, warmup_epochs=1)
    assert learning_rate(cfg, 0, 10) == pytest.approx(0.01)  # first warm-up step: 1/10 of the base rate
    assert learning_rate(cfg, 9, 10) == pytest.approx(0.1)
    assert learning_rate(cfg, 19, 10) == pytest.approx(0.1)
    assert learning_rate(cfg, 20, 10) == pytest.approx(0.01)
    assert learning_rate(cfg, 45, 10) == pytest.approx(0.001)


class Interrupted(Exception):
    pass


def test_resume_after_interruption_gives_identical_weights(tiny_folder, tmp_path, monkeypatch):
    cfg = train_config(
        "old", "smoke", None, ["data.dataset=image-folder", "device=cpu", "optim.epochs=3"], str(tiny_folder), None
    )
    whole = pipeline.train_old(cfg, tmp_path / "whole", show_progress=False)

    real_save = loop_module.atomic_save
    calls = {"n": 0}

    def save_then_stop(obj, path):
        real_save(obj, path)
        calls["n"] += 1
        if calls["n"] == 2:  # killed right after the second epoch's checkpoint
            raise Interrupted

    monkeypatch.setattr(loop_module, "atomic_save", save_then_stop)
    with pytest.raises(Interrupted):
        pipeline.train_old(cfg, tmp_path / "broken", show_progress=False)
    assert not (tmp_path / "broken" / "model.pt").exists()
    monkeypatch.setattr(loop_module, "atomic_save", real_save)
    resumed = pipeline.train_old(cfg, tmp_path / "broken", show_progress=False)

    a = torch.load(whole, weights_only=True)["model"]
    b = torch.load(resumed, weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def test_a_run_folder_made_with_another_config_is_refused(tiny_folder, tmp_path):
    overrides = ["data.dataset=image-folder", "device=cpu", "optim.epochs=1"]
    cfg = train_config("old", "smoke", None, overrides, str(tiny_folder), None)
    first = pipeline.train_old(cfg, tmp_path / "old", show_progress=False)
    assert pipeline.train_old(cfg, tmp_path / "old", show_progress=False) == first  # same config: reused
    before = first.read_bytes()
    other = train_config("old", "smoke", None, [*overrides, "optim.lr=0.3"], str(tiny_folder), None)
    with pytest.raises(loop_module.CheckpointError, match=r"different config \(sections optim differ\)"):
        pipeline.train_old(other, tmp_path / "old", show_progress=False)
    assert first.read_bytes() == before
