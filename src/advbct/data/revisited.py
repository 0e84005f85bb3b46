"""Revisited Oxford 5k and Paris 6k (Radenovic et al., CVPR 2018) in their official layout.

    <root>/gnd_<name>.pkl      imlist (database names), qimlist (query names), gnd (one dict per query:
                               bbx [x1, y1, x2, y2], easy, hard, junk as 0-based indices into imlist)
    <root>/jpg/<image>.jpg     every database and query image

Queries are the query images cropped to their ``bbx``. The ground truth is read with the plain-data unpickler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from advbct.data.images import DataError
from advbct.data.safe_pickle import load_plain_pickle

REVISITED_NAMES = ("roxford5k", "rparis6k")


@dataclass(frozen=True)
class RevisitedDataset:
    """One revisited benchmark: database and query image names and the per-query ground truth."""

    name: str
    root: Path
    imlist: tuple[str, ...]
    qimlist: tuple[str, ...]
    gnd: tuple[dict, ...]

    def image_path(self, image: str) -> Path:
        return self.root / "jpg" / f"{image}.jpg"

    def database_files(self) -> list[Path]:
        return [self.image_path(name) for name in self.imlist]

    def query_files(self) -> list[Path]:
        return [self.image_path(name) for name in self.qimlist]

    def query_boxes(self) -> list[tuple[float, float, float, float]]:
        return [tuple(float(v) for v in entry["bbx"]) for entry in self.gnd]


def find_revisited_root(data_root: str | Path, name: str) -> Path:
    """The folder holding ``gnd_<name>.pkl``: ``data_root`` itself or ``data_root/<name>``."""
    if name not in REVISITED_NAMES:
        raise DataError(f"unknown revisited benchmark {name!r}; use one of {', '.join(REVISITED_NAMES)}")
    data_root = Path(data_root)
    for candidate in (data_root, data_root / name):
        if (candidate / f"gnd_{name}.pkl").is_file():
            return candidate
    raise DataError(
        f"gnd_{name}.pkl not found in {data_root} or {data_root / name}; "
        f"get it with `advbct download {name} --root {data_root}`"
    )


def _index_list(value: object, where: str, db_size: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise DataError(f"{where} must be a list of integer database indices")
    if value and (min(value) < 0 or max(value) >= db_size):
        raise DataError(f"{where} names database index {max(value)}, the database has {db_size} images")
    return value


def _check_ground_truth(tree: object, path: Path) -> tuple[tuple[str, ...], tuple[str, ...], tuple[dict, ...]]:
    if not isinstance(tree, dict) or not {"imlist", "qimlist", "gnd"} <= tree.keys():
        raise DataError(f"{path} must hold a dict with keys imlist, qimlist and gnd")
    imlist, qimlist, gnd = tree["imlist"], tree["qimlist"], tree["gnd"]
    for key, names in (("imlist", imlist), ("qimlist", qimlist)):
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{path}: {key} must be a list of image names")
    if not isinstance(gnd, list) or len(gnd) != len(qimlist):
        raise DataError(f"{path}: gnd must be a list with one entry per query ({len(qimlist)})")
    checked = []
    for q, entry in enumerate(gnd):
        where = f"{path}: gnd[{q}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where} must be a dict")
        bbx = entry.get("bbx")
        if not isinstance(bbx, list) or len(bbx) != 4 or not all(isinstance(v, (int, float)) for v in bbx):
            raise DataError(f"{where}['bbx'] must be [x1, y1, x2, y2]")
        if bbx[2] <= bbx[0] or bbx[3] <= bbx[1]:
            raise DataError(f"{where}['bbx'] = {bbx} is an empty box")
        lists = {
            key: _index_list(entry.get(key, []), f"{where}[{key!r}]", len(imlist)) for key in ("easy", "hard", "junk")
        }
        checked.append({"bbx": list(bbx), **lists})
    return tuple(imlist), tuple(qimlist), tuple(checked)


def load_revisited(data_root: str | Path, name: str) -> RevisitedDataset:
    """Load and check the ground truth of ``roxford5k`` or ``rparis6k``; image files are checked when read."""
    root = find_revisited_root(data_root, name)
    path = root / f"gnd_{name}.pkl"
    imlist, qimlist, gnd = _check_ground_truth(load_plain_pickle(path), path)
    return RevisitedDataset(name, root, imlist, qimlist, gnd)
