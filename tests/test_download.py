"""Benchmark downloads against a real HTTP server on localhost: resume with Range, checksums, safe unpacking."""

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from advbct.data.download import Checksum, download_file, extract_tar
from advbct.data.gldv2 import load_gldv2_retrieval
from advbct.data.images import DataError
from advbct.data.revisited import load_revisited
from conftest import REPO
from landmark_layouts import write_gldv2, write_revisited


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=N-`` support; records every request; can cut chosen responses short."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        range_header = self.headers.get("Range")
        if range_header and server.honour_range:
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.path in server.cut_once:
            server.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    httpd.requests, httpd.cut_once, httpd.honour_range, httpd.root = [], set(), True, root
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()


def _payload(server, name="blob.bin", size=300_000):
    data = bytes(range(256)) * (size // 256)
    (server.root / name).write_bytes(data)
    return data, Checksum("sha256", hashlib.sha256(data).hexdigest())


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    data, checksum = _payload(server)
    server.cut_once.add("/blob.bin")
    dest = tmp_path / "out" / "blob.bin"
    with pytest.raises(DataError, match="run the command again to resume"):
        download_file(f"{server.url}/blob.bin", dest, checksum)
    part = dest.with_name("blob.bin.part")
    assert not dest.exists() and 0 < part.stat().st_size < len(data)
    have = part.stat().st_size
    download_file(f"{server.url}/blob.bin", dest, checksum)
    assert dest.read_bytes() == data and not part.exists()
    assert server.requests[-1] == ("/blob.bin", f"bytes={have}-")
    download_file(f"{server.url}/blob.bin", dest, checksum)
    assert len(server.requests) == 2, "a verified file in place is not fetched again"


def test_a_server_ignoring_range_restarts_the_file(server, tmp_path):
    data, checksum = _payload(server)
    server.honour_range = False
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(b"stale bytes from another file")
    download_file(f"{server.url}/blob.bin", dest, checksum)
    assert dest.read_bytes() == data


def test_checksum_mismatch_keeps_nothing(server, tmp_path):
    _payload(server)
    dest = tmp_path / "blob.bin"
    with pytest.raises(DataError, match="sha256 mismatch"):
        download_file(f"{server.url}/blob.bin", dest, Checksum("sha256", "0" * 64))
    assert not dest.exists() and not dest.with_name("blob.bin.part").exists()
    with pytest.raises(DataError, match="HTTP 404"):
        download_file(f"{server.url}/missing.bin", dest)


def _tar(path, files):
    with tarfile.open(path, "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_extraction_refuses_members_that_leave_the_folder(tmp_path):
    _tar(tmp_path / "evil.tar", {"ok.txt": b"fine", "../escaped.txt": b"nope"})
    with pytest.raises(DataError, match="would leave"):
        extract_tar(tmp_path / "evil.tar", tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out" / "ok.txt").exists()
    _tar(tmp_path / "good.tar", {"a/b/c.txt": b"x", "d.txt": b"y"})
    assert extract_tar(tmp_path / "good.tar", tmp_path / "flat" / "jpg", flatten=True) == 2
    assert sorted(p.name for p in (tmp_path / "flat" / "jpg").iterdir()) == ["c.txt", "d.txt"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "advbct", *args], capture_output=True, text=True, timeout=300)


def test_download_roxford5k_command(server, tmp_path):
    official = REPO.parent / "shared" / "data" / "revisitop" / "gnd_roxford5k.pkl"
    if not official.is_file():
        pytest.skip("the official gnd_roxford5k.pkl (its checksum is pinned) is not in ../shared/data/revisitop")
    (server.root / "roxford5k").mkdir()
    shutil.copy(official, server.root / "roxford5k" / "gnd_roxford5k.pkl")
    tiny = tmp_path / "tiny"
    write_revisited(tiny, "roxford5k")
    (server.root / "oxbuildings").mkdir()
    images = {p.name: p.read_bytes() for p in (tiny / "jpg").iterdir()}
    _tar(server.root / "oxbuildings" / "oxbuild_images-v1.tgz", images)
    root = tmp_path / "data"
    result = run_cli("download", "roxford5k", "--root", str(root), "--base-url", server.url)
    assert result.returncode == 0, result.stderr
    assert load_revisited(root, "roxford5k").qimlist[0] == "all_souls_000013"
    assert sorted(p.name for p in (root / "roxford5k" / "jpg").glob("*.jpg")) == sorted(
        p.name for p in (tiny / "jpg").iterdir()
    )
    requests = len(server.requests)
    assert run_cli("download", "roxford5k", "--root", str(root), "--base-url", server.url).returncode == 0
    assert len(server.requests) == requests, "finished files and unpacked archives are skipped"
    (server.root / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(b"tampered")
    other = run_cli("download", "roxford5k", "--root", str(tmp_path / "other"), "--base-url", server.url)
    assert other.returncode == 2 and "sha256 mismatch" in other.stderr


def test_download_gldv2_command(server, tmp_path):
    source = tmp_path / "source"
    write_gldv2(source)
    for name in ("train.csv", "index.csv", "test.csv"):
        (server.root / "metadata").mkdir(exist_ok=True)
        shutil.copy(source / name, server.root / "metadata" / name)
    (server.root / "metadata" / "train_clean.csv").write_text("landmark_id,images\n")
    (server.root / "ground_truth").mkdir()
    shutil.copy(source / "retrieval_solution_v2.1.csv", server.root / "ground_truth")
    for split in ("index", "test"):
        files = {str(p.relative_to(source / split)): p.read_bytes() for p in (source / split).rglob("*.jpg")}
        (server.root / split).mkdir()
        _tar(server.root / split / "images_000.tar", files)
        md5 = hashlib.md5((server.root / split / "images_000.tar").read_bytes()).hexdigest()
        (server.root / "md5sum" / split).mkdir(parents=True)
        (server.root / "md5sum" / split / "md5.images_000.txt").write_text(f"{md5}  images_000.tar\n")
    root = tmp_path / "data"
    result = run_cli("download", "gldv2", "--root", str(root), "--max-archives", "1", "--base-url", server.url)
    assert result.returncode == 0, result.stderr
    data = load_gldv2_retrieval(root / "gldv2")
    assert all(path.is_file() for path in [*data.index_files(), *data.test_files()])
    bad = run_cli("download", "gldv2", "--root", str(root), "--splits", "query", "--base-url", server.url)
    assert bad.returncode == 2 and "unknown GLDv2 split(s) query" in bad.stderr
