"""Pack a per-class subset of an image-folder dataset into one compressed file, and unpack it as PNG folders.

Used to carry real CIFAR-100 images to a remote GPU machine whose upload limit is smaller than the dataset:
    python bench/subset_archive.py pack ../shared/data/cifar100 subset.npz --train 220 --test 40
    python bench/subset_archive.py unpack subset.npz /tmp/cifar100
    python bench/subset_archive.py fill /tmp/cifar100_full --train-per-class 500 --test-per-class 100
Pixels are stored losslessly (row-delta + LZMA); unpacking writes ``<root>/<split>/<class>/<n>.png``. ``fill``
tops each class folder up to that many files by repeating its images (hard links): an epoch then costs what the
full dataset's does, for timing the full-size table where only a subset can travel. Accuracy figures from
repeated images are not CIFAR-100 results.
"""

from __future__ import annotations

import argparse
import io
import lzma
from pathlib import Path

import numpy as np
from PIL import Image

from advbct.data.images import load_image_folder
from advbct.data.sources import sample_per_class


def pack(root: Path, out: Path, per_split: dict[str, int]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for split, limit in per_split.items():
        images = load_image_folder(root / split, 32)
        idx = sample_per_class(images.labels, limit, seed=0)
        pixels = images.images[idx].numpy()
        arrays[f"{split}_delta"] = np.frombuffer(
            lzma.compress(np.diff(pixels, axis=3, prepend=0).astype(np.uint8).tobytes(), preset=6), dtype=np.uint8
        )
        arrays[f"{split}_shape"] = np.asarray(pixels.shape)
        arrays[f"{split}_labels"] = images.labels[idx].numpy()
        arrays["classes"] = np.asarray(images.classes)
    np.savez(out, **arrays)


def fill_class_folders(split_root: Path, per_class: int) -> None:
    """Hard-link each class folder's images, cycling through them, until the folder holds ``per_class`` files."""
    for folder in sorted(p for p in split_root.iterdir() if p.is_dir()):
        originals = sorted(folder.glob("*.png"))
        for k in range(len(originals), per_class):
            original = originals[k % len(originals)]
            (folder / f"r{k:05d}_{original.name}").hardlink_to(original)


def unpack(archive: Path, root: Path) -> None:
    with np.load(archive, allow_pickle=False) as npz:
        classes = npz["classes"].tolist()
        for split in ("train", "test"):
            shape = tuple(npz[f"{split}_shape"])
            delta = np.frombuffer(lzma.decompress(npz[f"{split}_delta"].tobytes()), dtype=np.uint8).reshape(shape)
            pixels = np.cumsum(delta, axis=3, dtype=np.uint8)
            for i, (image, label) in enumerate(zip(pixels, npz[f"{split}_labels"], strict=True)):
                folder = root / split / classes[label]
                folder.mkdir(parents=True, exist_ok=True)
                buffer = io.BytesIO()
                Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
                (folder / f"{i:05d}.png").write_bytes(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("root", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=220)
    p.add_argument("--test", type=int, default=40)
    u = sub.add_parser("unpack")
    u.add_argument("archive", type=Path)
    u.add_argument("root", type=Path)
    f = sub.add_parser("fill")
    f.add_argument("root", type=Path)
    f.add_argument("--train-per-class", type=int, required=True)
    f.add_argument("--test-per-class", type=int, required=True)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.root, args.out, {"train": args.train, "test": args.test})
    elif args.command == "unpack":
        unpack(args.archive, args.root)
    else:
        fill_class_folders(args.root / "train", args.train_per_class)
        fill_class_folders(args.root / "test", args.test_per_class)


if __name__ == "__main__":
    main()
