"""Image folders, the uint8 cache, allocations and batch augmentation."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from advbct.data import DataError, find_cifar100_root, load_image_folder, make_allocation, random_crop_flip
from advbct.data.allocation import load_or_make_allocation
from advbct.data.sources import sample_per_class


def test_image_folder_loads_real_pngs_and_caches(tiny_folder, tmp_path):
    first = load_image_folder(tiny_folder / "train", 32, cache_dir=tmp_path / "c")
    assert first.images.shape == (72, 3, 32, 32) and first.images.dtype == torch.uint8
    assert first.classes == tuple(f"class_{c:02d}" for c in range(6))
    assert first.labels.tolist() == [c for c in range(6) for _ in range(12)]
    assert len(list((tmp_path / "c").glob("*.npz"))) == 1
    second = load_image_folder(tiny_folder / "train", 32, cache_dir=tmp_path / "c")
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def test_threads_decoding_one_folder_at_once_leave_one_valid_cache(tiny_folder, tmp_path):
    # Runs training side by side (the processes of --jobs) may all find the cache missing and write it at once;
    # threads stand in for them here. Each writes its own temporary file and renames it, so every writer gets the
    # images and one whole cache file remains.
    def load(_: int):
        return load_image_folder(tiny_folder / "train", 32, cache_dir=tmp_path / "c")

    with ThreadPoolExecutor(4) as pool:
        loads = list(pool.map(load, range(4)))
    assert all(torch.equal(one.images, loads[0].images) for one in loads)
    files = list((tmp_path / "c").iterdir())
    assert len(files) == 1 and files[0].name.startswith("images-") and files[0].suffix == ".npz"  # no leftovers
    assert torch.equal(load(0).images, loads[0].images)  # read back from the cache


def test_image_folder_resizes_other_sizes(tiny_folder, tmp_path):
    images = load_image_folder(tiny_folder / "test", 16, cache_dir=tmp_path / "c")
    assert images.images.shape == (30, 3, 16, 16)


def test_undecodable_image_is_named_and_nothing_is_cached(tiny_folder, tmp_path):
    bad = tiny_folder / "train" / "class_03" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.png"):
        load_image_folder(tiny_folder / "train", 32, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.npz"))


def test_missing_roots_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        load_image_folder(tmp_path / "nope", 32)
    with pytest.raises(DataError, match="holds no CIFAR-100 image folders"):
        find_cifar100_root(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(tmp_path / "empty", 32)


@pytest.mark.parametrize("kind", ["extended-class", "extended-data"])
def test_allocations_are_deterministic_and_old_is_inside_new(kind):
    labels = torch.arange(1000) % 20
    a = make_allocation(labels, 20, kind, 0.3, seed=7)
    b = make_allocation(labels, 20, kind, 0.3, seed=7)
    c = make_allocation(labels, 20, kind, 0.3, seed=8)
    assert torch.equal(a.old_indices, b.old_indices) and a.old_classes == b.old_classes
    assert not torch.equal(a.old_indices, c.old_indices)
    assert torch.isin(a.old_indices, a.new_indices).all() and a.new_indices.numel() == 1000
    counts = torch.bincount(labels[a.old_indices], minlength=20)
    if kind == "extended-class":
        assert len(a.old_classes) == 6
        assert counts[list(a.old_classes)].tolist() == [50] * 6 and counts.sum() == 300
    else:
        assert counts.tolist() == [15] * 20


def test_saved_allocation_is_reused_and_mismatch_refused(tmp_path):
    labels = torch.arange(200) % 10
    first = load_or_make_allocation(tmp_path / "a.json", labels, 10, "extended-class", 0.3, 0)
    again = load_or_make_allocation(tmp_path / "a.json", labels, 10, "extended-class", 0.3, 0)
    assert torch.equal(first.old_indices, again.old_indices)
    with pytest.raises(DataError, match="was made for"):
        load_or_make_allocation(tmp_path / "a.json", labels, 10, "extended-data", 0.3, 0)


@pytest.mark.parametrize("kind", ["extended-class", "extended-data"])
def test_validation_split_is_held_out_of_both_models(kind, tmp_path):
    labels = torch.arange(1000) % 20  # 50 images of each of 20 classes
    a = make_allocation(labels, 20, kind, 0.3, seed=7, validation_per_class=5)
    assert torch.bincount(labels[a.validation_indices], minlength=20).tolist() == [5] * 20
    assert a.new_indices.numel() == 900
    assert not torch.isin(a.validation_indices, a.new_indices).any()
    assert not torch.isin(a.validation_indices, a.old_indices).any()
    counts = torch.bincount(labels[a.old_indices], minlength=20)
    if kind == "extended-class":  # all 45 remaining images of each old class
        assert counts[list(a.old_classes)].tolist() == [45] * 6 and counts.sum() == 270
    else:  # round(0.3 * 45) = 14 (13.5 rounds to even) of every class
        assert counts.tolist() == [14] * 20
    path = tmp_path / "a.json"
    saved = load_or_make_allocation(path, labels, 20, kind, 0.3, 7, validation_per_class=5)
    again = load_or_make_allocation(path, labels, 20, kind, 0.3, 7, validation_per_class=5)
    assert torch.equal(saved.validation_indices, again.validation_indices)
    assert torch.equal(saved.validation_indices, a.validation_indices)
    with pytest.raises(DataError, match="validation per class"):
        load_or_make_allocation(path, labels, 20, kind, 0.3, 7, validation_per_class=6)


def test_no_validation_split_leaves_the_allocation_as_without_one():
    labels = torch.arange(1000) % 20
    plain = make_allocation(labels, 20, "extended-data", 0.3, seed=3)
    assert plain.validation_indices.numel() == 0 and plain.new_indices.numel() == 1000


def test_a_validation_split_that_leaves_a_class_empty_is_refused():
    labels = torch.tensor([0] * 10 + [1] * 3)
    with pytest.raises(DataError, match="class 1 \\(3 training images\\) nothing to train on"):
        make_allocation(labels, 2, "extended-data", 0.3, seed=0, validation_per_class=3)


def test_sample_per_class():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 6)
    idx = sample_per_class(labels, 4, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [4, 3, 4]
    assert torch.equal(idx, sample_per_class(labels, 4, seed=0))


def test_random_crop_flip_matches_per_image_reference():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, 2, torch.Generator().manual_seed(5))
    ref_gen = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 5, (6, 1, 1), generator=ref_gen).flatten()
    dx = torch.randint(0, 5, (6, 1, 1), generator=ref_gen).flatten()
    flip = (torch.rand(6, 1, 1, generator=ref_gen) < 0.5).flatten()
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        crop = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        expected = crop.flip(-1) if flip[i] else crop
        assert torch.equal(out[i], expected)


def test_real_cifar100_layout(real_data):
    root = find_cifar100_root(real_data)
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert len(classes) == 100 and classes[0] == "apple"
    assert np.asarray(sorted((root / "test").iterdir())).size == 100
