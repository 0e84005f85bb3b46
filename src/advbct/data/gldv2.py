"""Google Landmarks v2 (Weyand et al., CVPR 2020) in its official layout.

    <root>/index.csv (id,...)   <root>/test.csv (id,...)
    <root>/retrieval_solution_v2.1.csv (id,images,Usage): a test image's index images ("None" when it shows no
        indexed landmark) and whether it counts for the Public or the Private score (or is Ignored)
    <root>/<split>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg for split in train, index, test

CSV files are read with the csv module (no eval, no pickle). Only the retrieval benchmark is read here: models
evaluated on it are trained elsewhere (an image folder, CIFAR-100).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from advbct.data.images import DataError

SOLUTION_FILE = "retrieval_solution_v2.1.csv"
USAGES = ("Public", "Private")


def gldv2_image_path(root: str | Path, split: str, image_id: str) -> Path:
    """``<root>/<split>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``."""
    if len(image_id) < 3:
        raise DataError(f"GLDv2 image id {image_id!r} is shorter than 3 characters")
    return Path(root) / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def _rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path.name} not found in {path.parent}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or ())]
        if missing:
            raise DataError(f"{path} lacks column(s) {', '.join(missing)}; header is {reader.fieldnames}")
        return list(reader)


def _ids(path: Path) -> list[str]:
    ids = [row["id"] for row in _rows(path, ("id",))]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path} lists some image id more than once")
    return ids


@dataclass(frozen=True)
class GLDv2Retrieval:
    """The retrieval task: index and test image ids, and per usage the scored test rows' relevant index rows."""

    root: Path
    index_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    solution: dict[str, dict[int, list[int]]]

    def index_files(self) -> list[Path]:
        return [gldv2_image_path(self.root, "index", i) for i in self.index_ids]

    def test_files(self) -> list[Path]:
        return [gldv2_image_path(self.root, "test", i) for i in self.test_ids]


def load_gldv2_retrieval(root: str | Path) -> GLDv2Retrieval:
    """index.csv, test.csv and the v2.1 solution, with every id in the solution checked against the lists."""
    root = Path(root)
    index_ids, test_ids = _ids(root / "index.csv"), _ids(root / "test.csv")
    index_row = {image_id: row for row, image_id in enumerate(index_ids)}
    test_row = {image_id: row for row, image_id in enumerate(test_ids)}
    solution: dict[str, dict[int, list[int]]] = {usage: {} for usage in USAGES}
    path = root / SOLUTION_FILE
    for line, row in enumerate(_rows(path, ("id", "images", "Usage")), start=2):
        usage = row["Usage"]
        if usage == "Ignored":
            continue
        if usage not in USAGES:
            raise DataError(f"{path}:{line}: Usage {usage!r} is not Public, Private or Ignored")
        if row["id"] not in test_row:
            raise DataError(f"{path}:{line}: test id {row['id']} is not in test.csv")
        images = row["images"].split()
        if images == ["None"] or not images:
            continue
        unknown = [i for i in images if i not in index_row]
        if unknown:
            raise DataError(f"{path}:{line}: index id {unknown[0]} is not in index.csv")
        solution[usage][test_row[row["id"]]] = [index_row[i] for i in images]
    return GLDv2Retrieval(root, tuple(index_ids), tuple(test_ids), solution)
