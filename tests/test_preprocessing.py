"""The evaluation transform recorded in a checkpoint: ImageNet's from timm for pretrained backbones, the training
images' statistics for models trained from scratch, CIFAR-100's published ones for CIFAR; evaluation and serving
frame and normalise images by it."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from advbct import pipeline
from advbct.config import ConfigError, DataConfig, ModelConfig
from advbct.data.batches import CIFAR100_MEAN, CIFAR100_STD, Preprocessing, channel_statistics
from advbct.data.cifar import load_cifar100
from advbct.data.images import square_rgb
from advbct.models import load_checkpoint
from advbct.models.preprocessing import training_preprocessing
from advbct.presets import train_config
from advbct.serving.models import Embedder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NO_IMAGES = torch.zeros(0, 3, 32, 32, dtype=torch.uint8)


def test_channel_statistics_of_hand_made_images():
    # Channel 0 is 0 in one image and 255 in the other: mean 0.5, std 0.5. Channel 1 is 51 everywhere: 0.2, 0.
    # Channel 2 holds 0 and 255 in each image's two pixels: mean 0.5, std 0.5.
    images = torch.tensor(
        [[[[0, 0]], [[51, 51]], [[0, 255]]], [[[255, 255]], [[51, 51]], [[0, 255]]]], dtype=torch.uint8
    )
    mean, std = channel_statistics(images, chunk=1)
    assert mean == pytest.approx((0.5, 0.2, 0.5)) and std == pytest.approx((0.5, 0.0, 0.5), abs=1e-7)


def test_square_rgb_frames_the_centre_fraction_of_the_short_side():
    # An 8x4 image whose pixel (row r, column c) holds 10 c + r in every channel.
    pixels = np.array([[[10 * c + r] * 3 for c in range(8)] for r in range(4)], dtype=np.uint8)
    image = Image.fromarray(pixels)
    # Half of the short side (4) is 2: the 2x2 square at columns 3-4, rows 1-2.
    assert square_rgb(image, 2, crop_fraction=0.5)[..., 0].tolist() == [[31, 41], [32, 42]]
    # The whole short side: columns 2-5. Nearest interpolation to 2 pixels samples at output pixel centres, source
    # offsets (i + 0.5) * 2 = 1 and 3: columns 3 and 5, rows 1 and 3.
    assert square_rgb(image, 2, interpolation="nearest")[..., 0].tolist() == [[31, 51], [33, 53]]


def test_a_pretrained_backbone_takes_imagenet_normalisation_from_timms_pretrained_config():
    prep = training_preprocessing(ModelConfig(backbone="resnet18", pretrained=True), DataConfig(), NO_IMAGES)
    # timm's default resnet18 weights (a1_in1k): ImageNet statistics; the framing is the training data's.
    assert prep == Preprocessing(32, IMAGENET_MEAN, IMAGENET_STD, 1.0, "bicubic")
    vit = training_preprocessing(ModelConfig(backbone="vit_small_patch16_224.augreg_in21k", weights="w.pt"),
                                 DataConfig(image_size=224), NO_IMAGES)  # fmt: skip
    assert vit == Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bicubic")
    with pytest.raises(ConfigError, match="timm has no pretrained config for 'no_such_net'"):
        training_preprocessing(ModelConfig(backbone="no_such_net", pretrained=True), DataConfig(), NO_IMAGES)


def test_cifar_keeps_its_published_statistics_which_are_those_of_its_training_split(real_data):
    assert training_preprocessing(ModelConfig(), DataConfig(), NO_IMAGES) == Preprocessing(
        32, CIFAR100_MEAN, CIFAR100_STD, 1.0, "bicubic"
    )
    channels = load_cifar100(real_data, "train").images.numpy().transpose(1, 0, 2, 3)  # one channel at a time
    assert tuple(c.mean(dtype=np.float64) / 255 for c in channels) == pytest.approx(CIFAR100_MEAN, abs=5e-5)
    assert tuple(c.std(dtype=np.float64) / 255 for c in channels) == pytest.approx(CIFAR100_STD, abs=5e-5)


def _train_old(folder: Path, out: Path, *overrides: str) -> Path:
    base = ["data.dataset=image-folder", "device=cpu", "optim.epochs=1", "data.validation_per_class=0"]
    cfg = train_config("old", "smoke", None, [*base, *overrides], str(folder), None)
    return pipeline.train_old(cfg, out, show_progress=False)


def _old_training_pixels(folder: Path, head_classes: list[int]) -> np.ndarray:
    """Every training image of the old classes, read straight from the PNG files: (N, 32, 32, 3) in [0, 1]."""
    class_dirs = sorted((folder / "train").iterdir())
    files = [f for c in head_classes for f in sorted(class_dirs[c].glob("*.png"))]
    return np.stack([np.asarray(Image.open(f), dtype=np.float64) / 255.0 for f in files])


def test_a_model_trained_from_scratch_records_its_training_images_statistics(tiny_folder, tmp_path):
    path = _train_old(tiny_folder, tmp_path / "old")
    _, meta = load_checkpoint(path)
    pixels = _old_training_pixels(tiny_folder, meta.head_classes)
    assert meta.prep.mean == pytest.approx(tuple(pixels.mean(axis=(0, 1, 2))), abs=1e-9)
    assert meta.prep.std == pytest.approx(tuple(pixels.std(axis=(0, 1, 2))), abs=1e-9)
    assert (meta.prep.crop_fraction, meta.prep.interpolation) == (1.0, "bicubic")


def test_a_pretrained_backbone_run_records_and_serves_with_imagenet_normalisation(tiny_folder, tmp_path):
    # The pretrained path without a download: the backbone's weights come from a local file (randomly initialised
    # here); its normalisation is still read from timm's pretrained config of the backbone.
    kwargs = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}
    weights = tmp_path / "resnet18.pt"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0, **kwargs).state_dict(), weights)
    path = _train_old(tiny_folder, tmp_path / "old", f"model.weights={weights}")
    model, meta = load_checkpoint(path)
    assert meta.prep == Preprocessing(32, IMAGENET_MEAN, IMAGENET_STD, 1.0, "bicubic")

    # Serving frames an upload as training framed its images (the whole 40-pixel square, bicubic to 32) and
    # normalises it by the recorded statistics; here both are done by hand with PIL and numpy.
    photo = np.random.default_rng(0).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    framed = Image.fromarray(photo).resize((32, 32), Image.Resampling.BICUBIC)
    by_hand = (np.asarray(framed, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        expected = model(torch.from_numpy(by_hand.transpose(2, 0, 1)).float().unsqueeze(0))
    served = Embedder(path, "cpu").embed_files([tmp_path / "photo.png"])
    expected = torch.nn.functional.normalize(expected, dim=1).numpy()
    assert np.allclose(served, expected, atol=1e-4)
