"""Fetch the official benchmark files: resumable HTTP downloads, checksums, safe archive extraction.

A download goes to ``<file>.part``; an interrupted one resumes with an HTTP Range request from the bytes already
there (a server that ignores Range restarts it). A file is renamed into place only after its checksum matched,
so a finished name is always a verified file, and a file already in place is checked and skipped. Archives are
unpacked member by member with paths confined to the destination folder (no ``..``, no absolute paths, no links).

Checksums: the revisitop ground-truth pickles by SHA-256 (of the official files); GLDv2's archives by the MD5
files Google publishes beside them (fetched first). The Oxford and Paris image archives have no published
checksum: they are verified by unpacking every member.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from advbct.data.images import DataError

CHUNK = 1 << 20
REVISITOP_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
OXFORD_IMAGES_URL = "https://www.robots.ox.ac.uk/~vgg/data"
GLDV2_URL = "https://s3.amazonaws.com/google-landmark"
GLDV2_ARCHIVES = {"train": 500, "index": 100, "test": 20}
GND_SHA256 = {
    "roxford5k": "ba7967754bd2d7d2210a5799f9c45ad5835e269a80ef9d3eba44caa35816c471",
    "rparis6k": "d2e729a5293dda7dda8a15c8383424a42e4964a2c4cfea2f32fa85d11d2df499",
}
IMAGE_ARCHIVES = {
    "roxford5k": ["oxbuildings/oxbuild_images-v1.tgz"],
    "rparis6k": ["parisbuildings/paris_1-v1.tgz", "parisbuildings/paris_2-v1.tgz"],
}


@dataclass(frozen=True)
class Checksum:
    algorithm: str
    digest: str


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, checksum: Checksum | None) -> bool:
    return checksum is None or file_digest(path, checksum.algorithm) == checksum.digest.lower()


def download_file(
    url: str, dest: Path, checksum: Checksum | None = None, on_bytes: Callable[[int, int | None], None] | None = None
) -> Path:
    """``dest``, downloaded (or resumed) from ``url`` and checked; an existing verified ``dest`` is kept."""
    dest = Path(dest)
    if dest.is_file():
        if _verify(dest, checksum):
            return dest
        raise DataError(f"{dest} exists but its {checksum.algorithm} does not match; delete it to download again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            resumed = have > 0 and response.status == 206
            total = response.headers.get("Content-Length")
            total_bytes = int(total) + (have if resumed else 0) if total is not None else None
            with part.open("ab" if resumed else "wb") as out:
                done = have if resumed else 0
                while block := response.read(CHUNK):
                    out.write(block)
                    done += len(block)
                    if on_bytes is not None:
                        on_bytes(done, total_bytes)
            if total_bytes is not None and done < total_bytes:
                raise DataError(
                    f"download of {url} stopped at {done} of {total_bytes} bytes; run the command again to resume"
                )
    except urllib.error.HTTPError as exc:
        if not (exc.code == 416 and have):  # 416 with a part file: it is already complete
            raise DataError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise DataError(f"download of {url} failed ({exc}); run the command again to resume") from exc
    if not _verify(part, checksum):
        part.unlink()
        raise DataError(f"{url}: {checksum.algorithm} mismatch, the download was discarded; try again")
    part.replace(dest)
    return dest


def _safe_members(archive: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    root = dest.resolve()
    members = []
    for member in archive.getmembers():
        target = (dest / member.name).resolve()
        if member.issym() or member.islnk() or not (target == root or root in target.parents):
            raise DataError(f"archive member {member.name!r} would leave {dest} or is a link; refusing the archive")
        if member.isfile() or member.isdir():
            members.append(member)
    return members


def extract_tar(archive_path: Path, dest: Path, flatten: bool = False) -> int:
    """Unpack regular files into ``dest`` (every member checked first); ``flatten`` drops their folders (the
    Paris archives nest images by landmark, the benchmark expects them all in ``jpg/``). Returns the file count."""
    try:
        with tarfile.open(archive_path) as archive:
            members = _safe_members(archive, dest)
            count = 0
            for member in members:
                if not member.isfile():
                    continue
                target = dest / (Path(member.name).name if flatten else member.name)
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                if source is None:
                    continue
                with source, target.open("wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
                count += 1
            return count
    except (tarfile.TarError, EOFError) as exc:
        raise DataError(f"{archive_path} is not a readable tar archive: {exc}") from exc


def parse_md5_file(path: Path, name: str) -> Checksum:
    """GLDv2's ``md5.images_NNN.txt``: lines of ``<md5>  <file name>``."""
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == name:
            return Checksum("md5", parts[0])
    raise DataError(f"{path} lists no checksum for {name}")


ByteProgress = Callable[[str], Callable[[int, int | None], None]]


def _done_marker(folder: Path, archive: str) -> Path:
    return folder / f".extracted-{Path(archive).name}"


def download_revisited(
    name: str,
    root: Path,
    with_images: bool = True,
    gnd_base: str = REVISITOP_URL,
    images_base: str = OXFORD_IMAGES_URL,
    progress: ByteProgress | None = None,
) -> Path:
    """``<root>/<name>/gnd_<name>.pkl`` and ``<root>/<name>/jpg/*.jpg``; finished steps are skipped."""
    if name not in GND_SHA256:
        raise DataError(f"unknown revisited benchmark {name!r}; use one of {', '.join(GND_SHA256)}")
    folder = Path(root) / name
    gnd_file = f"gnd_{name}.pkl"
    download_file(
        f"{gnd_base}/{name}/{gnd_file}",
        folder / gnd_file,
        Checksum("sha256", GND_SHA256[name]),
        progress(gnd_file) if progress else None,
    )
    if with_images:
        for archive in IMAGE_ARCHIVES[name]:
            marker = _done_marker(folder / "jpg", archive)
            if marker.is_file():
                continue
            local = folder / "archives" / Path(archive).name
            download_file(f"{images_base}/{archive}", local, None, progress(local.name) if progress else None)
            extract_tar(local, folder / "jpg", flatten=True)
            marker.touch()
    return folder


def download_gldv2(
    root: Path,
    splits: tuple[str, ...] = ("index", "test"),
    max_archives: int | None = None,
    base: str = GLDV2_URL,
    progress: ByteProgress | None = None,
) -> Path:
    """The metadata and ground truth CSVs, then each split's image archives, MD5-checked and unpacked into
    ``<root>/gldv2/<split>/``. ``max_archives`` takes the first N archives of each split (a partial copy)."""
    unknown = [s for s in splits if s not in GLDV2_ARCHIVES]
    if unknown:
        raise DataError(f"unknown GLDv2 split(s) {', '.join(unknown)}; use {', '.join(GLDV2_ARCHIVES)}")
    folder = Path(root) / "gldv2"
    metadata = [f"metadata/{f}" for f in ("train.csv", "train_clean.csv", "index.csv", "test.csv")]
    for path in [*metadata, "ground_truth/retrieval_solution_v2.1.csv"]:
        name = Path(path).name
        download_file(f"{base}/{path}", folder / name, None, progress(name) if progress else None)
    for split in splits:
        count = GLDV2_ARCHIVES[split] if max_archives is None else min(max_archives, GLDV2_ARCHIVES[split])
        for index in range(count):
            archive = f"images_{index:03d}.tar"
            marker = _done_marker(folder / split, archive)
            if marker.is_file():
                continue
            md5_file = download_file(
                f"{base}/md5sum/{split}/md5.images_{index:03d}.txt", folder / "archives" / split / f"md5.{archive}.txt"
            )
            local = download_file(
                f"{base}/{split}/{archive}",
                folder / "archives" / split / archive,
                parse_md5_file(md5_file, archive),
                progress(f"{split}/{archive}") if progress else None,
            )
            extract_tar(local, folder / split)
            marker.touch()
            local.unlink()
    return folder
