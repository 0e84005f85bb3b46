"""Tiny landmark benchmarks written in the official layouts: real JPEG files, a real ground-truth pickle, real
GLDv2 CSV files. Each landmark has its own colour, so a trained or untrained model sees structure.

Every query's box holds, pixel for pixel, one database image of its landmark pasted into a larger random canvas;
once cropped to its box and resized, the query equals that database image, so a model searching its own
embeddings must rank it first. That makes the cropping path checkable end to end.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

LANDMARKS = 3
PER_LANDMARK = 4


def _photo(rng: np.random.Generator, colour: np.ndarray, height: int, width: int) -> np.ndarray:
    noise = rng.normal(0, 30, size=(height, width, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


def _save_jpeg(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=100, subsampling=0)


def write_revisited(root: Path, name: str, seed: int = 0) -> dict:
    """``root/gnd_<name>.pkl`` and ``root/jpg/*.jpg``; returns the ground truth written."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, size=(LANDMARKS, 3))
    imlist, landmark_of = [], []
    for landmark in range(LANDMARKS):
        for i in range(PER_LANDMARK):
            image = f"{name}_l{landmark}_{i:03d}"
            height, width = int(rng.integers(40, 64)), int(rng.integers(40, 64))
            _save_jpeg(_photo(rng, colours[landmark], height, width), root / "jpg" / f"{image}.jpg")
            imlist.append(image)
            landmark_of.append(landmark)
    qimlist, gnd = [], []
    for landmark in range(LANDMARKS):
        same = [i for i, lm in enumerate(landmark_of) if lm == landmark]
        source = same[0]
        with Image.open(root / "jpg" / f"{imlist[source]}.jpg") as img:
            pasted = np.asarray(img.convert("RGB"))
        canvas = rng.integers(0, 256, size=(pasted.shape[0] + 30, pasted.shape[1] + 24, 3), dtype=np.uint8)
        top, left = 10, 7
        canvas[top : top + pasted.shape[0], left : left + pasted.shape[1]] = pasted
        query = f"{name}_query_{landmark}"
        # Stored losslessly (PNG bytes under the .jpg name the layout asks for; decoders read the content).
        Image.fromarray(canvas).save(root / "jpg" / f"{query}.jpg", format="PNG")
        qimlist.append(query)
        other = next(i for i, lm in enumerate(landmark_of) if lm != landmark)
        gnd.append(
            {
                "bbx": [float(left), float(top), float(left + pasted.shape[1]), float(top + pasted.shape[0])],
                "easy": [source],
                "hard": same[1:] if landmark != 0 else [],
                "junk": [other],
            }
        )
    tree = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    (root / f"gnd_{name}.pkl").write_bytes(pickle.dumps(tree, protocol=2))
    return tree


def gldv2_id(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list("0123456789abcdef"), size=16))


def write_gldv2(root: Path, seed: int = 0) -> dict:
    """The retrieval CSVs, a train.csv and a train_clean.csv, index and test images; returns what was written."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, size=(LANDMARKS, 3))
    index_ids, index_landmark = [], []
    for landmark in range(LANDMARKS):
        for _ in range(PER_LANDMARK):
            image_id = gldv2_id(rng)
            path = root / "index" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
            _save_jpeg(_photo(rng, colours[landmark], 48, 56), path)
            index_ids.append(image_id)
            index_landmark.append(landmark)
    test_rows = []
    for landmark in range(LANDMARKS):
        source = index_ids[index_landmark.index(landmark)]
        test_id = gldv2_id(rng)
        target = root / "test" / test_id[0] / test_id[1] / test_id[2] / f"{test_id}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((root / "index" / source[0] / source[1] / source[2] / f"{source}.jpg").read_bytes())
        relevant = [i for i, lm in zip(index_ids, index_landmark, strict=True) if lm == landmark]
        test_rows.append((test_id, " ".join(relevant), "Private" if landmark != 1 else "Public"))
    for usage in ("Private", "Ignored"):
        test_id = gldv2_id(rng)
        target = root / "test" / test_id[0] / test_id[1] / test_id[2] / f"{test_id}.jpg"
        _save_jpeg(_photo(rng, np.array([128, 128, 128]), 40, 40), target)
        test_rows.append((test_id, "None", usage))
    with (root / "index.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("id",), *((i,) for i in index_ids)])
    with (root / "test.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("id",), *((row[0],) for row in test_rows)])
    with (root / "retrieval_solution_v2.1.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("id", "images", "Usage"), *test_rows])
    train = [(gldv2_id(rng), f"http://example.invalid/{i}.jpg", int(lm)) for i, lm in enumerate([7, 3, 7, 11, 3, 7])]
    with (root / "train.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("id", "url", "landmark_id"), *train])
    return {"index_ids": index_ids, "index_landmark": index_landmark, "test_rows": test_rows, "train": train}
