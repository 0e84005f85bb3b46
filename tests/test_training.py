"""The training loop: learning-rate schedule, and resuming an interrupted run to the same weights."""

import json

import pytest
import torch

from advbct import pipeline
from advbct.config import OptimConfig
from advbct.models.checkpoint import CheckpointError
from advbct.models.embedding import EmbeddingModel
from advbct.presets import train_config
from advbct.training import learning_rate, run_folder
from advbct.training.setup import start_from_old


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

    real_save = run_folder.atomic_save
    calls = {"n": 0}

    def save_then_stop(obj, path):
        real_save(obj, path)
        calls["n"] += 1
        if calls["n"] == 2:  # killed right after the second epoch's checkpoint
            raise Interrupted

    monkeypatch.setattr(run_folder, "atomic_save", save_then_stop)
    with pytest.raises(Interrupted):
        pipeline.train_old(cfg, tmp_path / "broken", show_progress=False)
    assert not (tmp_path / "broken" / "model.pt").exists()
    monkeypatch.setattr(run_folder, "atomic_save", real_save)
    resumed = pipeline.train_old(cfg, tmp_path / "broken", show_progress=False)

    a = torch.load(whole, weights_only=True)["model"]
    b = torch.load(resumed, weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def test_a_run_trains_the_same_weights_whatever_the_process_drew_before(tiny_folder, tmp_path):
    # Concurrent runs share no generator (each is a process of its own), and a run seeds the global one itself right
    # before it draws initial weights: what the process drew earlier changes nothing.
    overrides = ["data.dataset=image-folder", "device=cpu", "optim.epochs=1"]
    cfg = train_config("old", "smoke", None, overrides, str(tiny_folder), None)
    first = pipeline.train_old(cfg, tmp_path / "first", show_progress=False)
    torch.manual_seed(12345)
    torch.rand(1000)
    second = pipeline.train_old(cfg, tmp_path / "second", show_progress=False)
    a = torch.load(first, weights_only=True)["model"]
    b = torch.load(second, weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_run_folder_made_with_another_config_is_refused(tiny_folder, tmp_path):
    overrides = ["data.dataset=image-folder", "device=cpu", "optim.epochs=1"]
    cfg = train_config("old", "smoke", None, overrides, str(tiny_folder), None)
    first = pipeline.train_old(cfg, tmp_path / "old", show_progress=False)
    assert pipeline.train_old(cfg, tmp_path / "old", show_progress=False) == first  # same config: reused
    before = first.read_bytes()
    other = train_config("old", "smoke", None, [*overrides, "optim.lr=0.3"], str(tiny_folder), None)
    with pytest.raises(CheckpointError, match=r"different config \(sections optim differ\)"):
        pipeline.train_old(other, tmp_path / "old", show_progress=False)
    assert first.read_bytes() == before


def _old_and_new_config(tiny_folder, tmp_path, *new_overrides):
    base = ["data.dataset=image-folder", "device=cpu", "optim.epochs=1"]
    old_cfg = train_config("old", "smoke", None, base, str(tiny_folder), None)
    old_path = pipeline.train_old(old_cfg, tmp_path / "old", show_progress=False)
    new_cfg = train_config(
        "new", "smoke", None, [*base, "compat.method=independent", *new_overrides], str(tiny_folder), None
    )
    return pipeline.load_old(old_path), new_cfg


def test_a_new_model_started_from_the_old_one_embeds_exactly_like_it(tiny_folder, tmp_path):
    old, new_cfg = _old_and_new_config(tiny_folder, tmp_path, "init_from_old=true")
    num_classes = len(old.meta.class_names)
    model = EmbeddingModel(
        new_cfg.model.backbone,
        new_cfg.model.embedding_dim,
        num_classes,
        small_input=True,
        backbone_kwargs=new_cfg.model.backbone_kwargs,
    )
    start_from_old(model, new_cfg.model, old)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), old.model(x))
    rows = torch.tensor(old.meta.head_classes)
    assert len(rows) < num_classes  # extended-class: the new head is wider
    assert torch.equal(model.head.weight[rows], old.model.head.weight)


def test_init_from_old_reaches_the_trained_model_and_refuses_other_shapes(tiny_folder, tmp_path):
    frozen = ["init_from_old=true", "optim.lr=1e-30", "optim.momentum=0", "optim.weight_decay=0", "seed=7"]
    old, new_cfg = _old_and_new_config(tiny_folder, tmp_path, *frozen)
    new_path = pipeline.train_new(new_cfg, tmp_path / "new", old.path, show_progress=False)
    new_state, old_state = torch.load(new_path, weights_only=True)["model"], old.model.state_dict()
    conv = "backbone.conv1.weight"
    assert torch.equal(new_state[conv], old_state[conv])  # a step of 1e-30 leaves every weight where it started
    # Fine-tuned from the old model, it keeps the old model's normalisation rather than taking its own data's.
    new_meta = json.loads(torch.load(new_path, weights_only=True)["meta"])
    assert new_meta["preprocessing"] == old.meta.preprocessing

    wider = train_config(
        "new",
        "smoke",
        None,
        [
            "data.dataset=image-folder",
            "device=cpu",
            "compat.method=independent",
            "init_from_old=true",
            "model.embedding_dim=48",
        ],
        str(tiny_folder),
        None,
    )
    with pytest.raises(CheckpointError, match=r"embeds to dim 32"):
        pipeline.train_new(wider, tmp_path / "wider", old.path, show_progress=False)
    stride = new_cfg.model_copy(update={"model": new_cfg.model.model_copy(update={"small_input_stride": 2})})
    with pytest.raises(CheckpointError, match=r"differs from this model in model\.small_input_stride"):
        pipeline.train_new(stride, tmp_path / "stride", old.path, show_progress=False)
    assert not (tmp_path / "stride").exists()
    old_run = train_config(
        "old", "smoke", None, ["data.dataset=image-folder", "device=cpu", "init_from_old=true"], str(tiny_folder), None
    )
    with pytest.raises(CheckpointError, match="init_from_old needs a new-model run"):
        pipeline.train_old(old_run, tmp_path / "old2", show_progress=False)


def test_a_method_that_reads_the_old_model_is_refused_without_one_and_the_reference_is_not(tiny_folder, tmp_path):
    base = ["data.dataset=image-folder", "device=cpu", "optim.epochs=1"]
    l2 = train_config("new", "smoke", None, [*base, "compat.method=l2"], str(tiny_folder), None)
    with pytest.raises(CheckpointError, match="method 'l2' needs an old checkpoint"):
        pipeline.train_new(l2, tmp_path / "l2", None, show_progress=False)
    assert not (tmp_path / "l2" / "model.pt").exists()
    reference = train_config("new", "smoke", None, [*base, "compat.method=independent"], str(tiny_folder), None)
    assert pipeline.train_new(reference, tmp_path / "independent", None, show_progress=False).is_file()


def test_a_run_records_every_compat_option_so_a_changed_default_is_not_reused_unnoticed(tiny_folder, tmp_path):
    base = ["data.dataset=image-folder", "device=cpu", "optim.epochs=1"]
    old_path = pipeline.train_old(train_config("old", "smoke", None, base, str(tiny_folder), None), tmp_path / "old",
                                  show_progress=False)  # fmt: skip
    _, stats = pipeline.compute_statistics(old_path, device="cpu")
    cfg = train_config("new", "smoke", None, [*base, "compat.method=advbct-tight", "compat.options.radius=median"],
                       str(tiny_folder), None)  # fmt: skip
    out = tmp_path / "tight"
    first = pipeline.train_new(cfg, out, old_path, stats, show_progress=False)
    saved = json.loads((out / "config.json").read_text())
    recorded = saved["compat"]["options"]
    assert recorded["radius"] == "median" and recorded["normalise_discriminator_input"] is True
    assert recorded["tau"] == 1.0 and recorded["discriminator"] == "marginal"
    assert pipeline.train_new(cfg, out, old_path, stats, show_progress=False) == first  # same request: reused
    # A folder made while a default was different records it: the same request now means another run.
    saved["compat"]["options"]["normalise_discriminator_input"] = False
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"different config \(sections compat differ\)"):
        pipeline.train_new(cfg, out, old_path, stats, show_progress=False)
    # A folder that recorded only the options it was given is compared at today's defaults, as it always was.
    saved["compat"]["options"] = {"radius": "median"}
    (out / "config.json").write_text(json.dumps(saved))
    assert pipeline.train_new(cfg, out, old_path, stats, show_progress=False) == first
