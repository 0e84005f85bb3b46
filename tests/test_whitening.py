"""The frozen patch-whitening stem and label smoothing: hand-computed filters, decorrelated outputs, a stem that
training leaves untouched, and the smoothed classification loss."""

import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advbct import pipeline
from advbct.compat import CompatContext, create
from advbct.data.allocation import load_allocation
from advbct.data.sources import load_split
from advbct.models.checkpoint import CheckpointError, load_checkpoint
from advbct.models.embedding import EmbeddingModel
from advbct.models.whitening import set_whitened_stem, whitening_filters
from advbct.presets import train_config
from advbct.training.setup import whitening_sample
from advbct.training.step import TrainStep


def _balanced_pixels(scales: tuple[float, float, float]) -> torch.Tensor:
    """8 one-pixel images, every sign combination of the per-channel ``scales``: zero mean, no cross-covariance,
    and unbiased variance 8 s^2 / 7 per channel."""
    signs = torch.tensor(list(itertools.product([1.0, -1.0], repeat=3)))
    return (signs * torch.tensor(scales)).view(8, 3, 1, 1)


def test_whitening_filters_on_a_hand_example():
    conv = nn.Conv2d(3, 8, 1, bias=False)
    random_tail = conv.weight[6:].detach().clone()
    images = _balanced_pixels((0.5, 2.0, 1.0))  # variances 2/7, 32/7, 8/7: the order is 2nd, 3rd, 1st channel
    with torch.no_grad():
        conv.weight[:6] = 0.0
    filters = whitening_filters(torch.diag(torch.tensor([2 / 7, 32 / 7, 8 / 7], dtype=torch.float64)), 3, eps=0.0)
    expected = torch.tensor(
        [[0.0, (7 / 32) ** 0.5, 0.0], [0.0, 0.0, (7 / 8) ** 0.5], [(7 / 2) ** 0.5, 0.0, 0.0]], dtype=torch.float64
    )
    assert torch.allclose(filters, torch.cat([expected, -expected]), atol=1e-12)

    set_whitened_stem(conv, images, eps=0.0)
    assert torch.allclose(conv.weight[:6, :, 0, 0].double(), torch.cat([expected, -expected]), atol=1e-6)
    assert torch.equal(conv.weight[6:], random_tail)  # 3 patch dimensions fill 6 channels; the rest stay random


def test_whitened_stem_outputs_are_decorrelated_and_of_unit_variance():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(3, 3, generator=generator) + 2 * torch.eye(3)
    base = torch.randn(400, 3, 12, 12, generator=generator)
    images = torch.einsum("ij,njhw->nihw", mixing, base)
    images = F.avg_pool2d(images, 3, 1, 1)  # neighbouring pixels correlate too, as in photographs
    conv = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
    set_whitened_stem(conv, images, eps=1e-6)

    out = conv(images).detach()[:, :27]
    flat = out.permute(0, 2, 3, 1).reshape(-1, 27).double()
    assert torch.allclose(torch.cov(flat.T), torch.eye(27, dtype=torch.float64), atol=2e-3)
    assert torch.allclose(conv.weight[27:54], -conv.weight[:27])


def test_whitening_refuses_what_it_cannot_whiten():
    with pytest.raises(ValueError, match="bias-free"):
        set_whitened_stem(nn.Conv2d(3, 8, 3, bias=True), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        set_whitened_stem(nn.Conv2d(3, 8, 3, bias=False), torch.randn(2, 1, 8, 8))
    plain = EmbeddingModel("resnet18", 8, 4, backbone_kwargs={"layers": [1, 1, 1, 1]})
    with pytest.raises(ValueError, match="without whitened_stem"):
        plain.whiten_stem(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="conv1"):
        EmbeddingModel("vit_tiny_patch16_224", 8, 4, whitened_stem=True, backbone_kwargs={"img_size": 32})


def test_training_keeps_the_whitened_stem_it_started_from(tiny_folder, tmp_path):
    overrides = ["data.dataset=image-folder", "device=cpu", "optim.epochs=2", "model.whitened_stem=true"]
    cfg = train_config("old", "smoke", None, overrides, str(tiny_folder), None)
    model_path = pipeline.train_old(cfg, tmp_path / "old", show_progress=False)
    trained, meta = load_checkpoint(model_path)

    allocation = load_allocation(tmp_path / "old" / "allocation.json")
    train_set = load_split(cfg.data, "train")
    sample = whitening_sample(train_set.images[allocation.old_indices], meta.prep, cfg.seed)
    fresh = copy.deepcopy(trained.backbone.conv1)
    set_whitened_stem(fresh, sample)
    stem = trained.backbone.conv1.weight
    assert not stem.requires_grad
    assert torch.allclose(stem[:54], fresh.weight[:54], atol=1e-6)
    assert json.loads((tmp_path / "old" / "config.json").read_text())["model"]["whitened_stem"] is True


def test_label_smoothing_mixes_the_true_class_with_a_uniform_target():
    model = EmbeddingModel("resnet18", 4, 3, backbone_kwargs={"layers": [1, 1, 1, 1]})
    model.eval()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    independent = create("independent", CompatContext(embedding_dim=4, num_classes=3))
    plain = TrainStep(model, independent, True)(images, labels, labels, None, 0.0, 0, 1, False)[0]
    smooth = TrainStep(model, independent, True, 0.3)(images, labels, labels, None, 0.0, 0, 1, False)[0]

    log_p = F.log_softmax(model.classify(model(images)), dim=1)
    true_class = -log_p[torch.arange(2), labels].mean()
    uniform = -log_p.mean()
    assert plain.item() == pytest.approx(true_class.item(), rel=1e-5)
    assert smooth.item() == pytest.approx((0.7 * true_class + 0.3 * uniform).item(), rel=1e-5)


def test_a_run_folder_saved_before_an_option_existed_is_reused(tiny_folder, tmp_path):
    overrides = ["data.dataset=image-folder", "device=cpu", "optim.epochs=1"]
    cfg = train_config("old", "smoke", None, overrides, str(tiny_folder), None)
    first = pipeline.train_old(cfg, tmp_path / "old", show_progress=False)
    config_path = tmp_path / "old" / "config.json"
    saved = json.loads(config_path.read_text())
    del saved["model"]["whitened_stem"], saved["optim"]["label_smoothing"]
    config_path.write_text(json.dumps(saved))
    assert pipeline.train_old(cfg, tmp_path / "old", show_progress=False) == first

    smoothed = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"label_smoothing": 0.1})})
    with pytest.raises(CheckpointError, match="optim"):
        pipeline.train_old(smoothed, tmp_path / "old", show_progress=False)
