"""Landmark benchmark loaders, the plain-data unpickler, and `advbct eval --benchmark` end to end on tiny
datasets written in the official layouts (real JPEG files, a real pickle, real CSV files)."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from advbct.data.benchmarks import find_benchmark_root
from advbct.data.gldv2 import gldv2_image_path, load_gldv2_retrieval
from advbct.data.images import DataError, decode_image
from advbct.data.revisited import load_revisited
from advbct.data.safe_pickle import load_plain_pickle
from advbct.evaluation.landmarks import paper_summary
from conftest import REPO
from landmark_layouts import write_gldv2, write_revisited
from paper_scores import reference_p_scores


def shared_revisitop():
    env = os.environ.get("ADVBCT_DATA")
    root = (Path(env) if env else REPO.parent / "shared" / "data") / "revisitop"
    if not (root / "gnd_roxford5k.pkl").is_file():
        pytest.skip("revisitop ground truth not found (set ADVBCT_DATA or place it at ../shared/data)")
    return root


@pytest.mark.parametrize(("name", "db", "queries"), [("roxford5k", 4993, 70), ("rparis6k", 6322, 70)])
def test_official_ground_truth_loads_through_the_plain_unpickler(name, db, queries):
    data = load_revisited(shared_revisitop(), name)
    assert (len(data.imlist), len(data.qimlist), len(data.gnd)) == (db, queries, queries)
    assert all(len(entry["easy"]) + len(entry["hard"]) > 0 for entry in data.gnd)
    x1, y1, x2, y2 = data.query_boxes()[0]
    assert x2 > x1 and y2 > y1
    assert data.query_files()[0].name == f"{data.qimlist[0]}.jpg"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_plain_unpickler_refuses_any_global_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "gnd_evil.pkl"
    evil.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(DataError, match=r"gnd_evil.pkl is not a readable plain-data pickle: refusing to load"):
        load_plain_pickle(evil)
    assert not (tmp_path / "pwned").exists()
    fancy = tmp_path / "fancy.pkl"
    fancy.write_bytes(pickle.dumps({"gnd": [np.int64(3)]}))
    with pytest.raises(DataError, match="refusing to load numpy"):
        load_plain_pickle(fancy)
    truncated = tmp_path / "cut.pkl"
    truncated.write_bytes(pickle.dumps({"a": [1, 2, 3]})[:-4])
    with pytest.raises(DataError, match=r"cut\.pkl is not a readable plain-data pickle"):
        load_plain_pickle(truncated)
    assert load_plain_pickle(_plain(tmp_path)) == {"imlist": ["a"], "n": 1.5}


def _plain(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"], "n": 1.5}))
    return path


def test_revisited_loader_refuses_broken_ground_truth(tmp_path):
    root = tmp_path / "roxford5k"
    tree = write_revisited(root, "roxford5k")
    assert load_revisited(tmp_path, "roxford5k").qimlist == tuple(tree["qimlist"])
    tree["gnd"][1]["junk"] = [len(tree["imlist"])]
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(tree))
    with pytest.raises(DataError, match=r"gnd\[1\]\['junk'\] names database index 12"):
        load_revisited(root, "roxford5k")
    tree["gnd"][1]["junk"] = []
    tree["gnd"][2]["bbx"] = [5.0, 5.0, 5.0, 9.0]
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(tree))
    with pytest.raises(DataError, match="empty box"):
        load_revisited(root, "roxford5k")
    with pytest.raises(DataError, match="advbct download rparis6k"):
        load_revisited(tmp_path, "rparis6k")
    with pytest.raises(DataError, match="unknown benchmark"):
        find_benchmark_root("oxford105k", tmp_path)


def test_decode_with_a_box_cuts_the_region_and_keeps_it_whole(tmp_path):
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[10:30, 20:50] = (200, 40, 90)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    inside = decode_image(tmp_path / "p.png", 8, box=(20.0, 10.0, 50.0, 30.0))
    assert inside.shape == (8, 8, 3) and (inside == (200, 40, 90)).all()
    whole = decode_image(tmp_path / "p.png", 8, whole=True)
    assert (whole[0] == 0).all() and (whole[:, 0] == 0).all(), "the whole image, borders included"
    with pytest.raises(DataError, match="cannot decode image"):
        decode_image(tmp_path / "p.png", 8, box=(20.0, 10.0, 20.0, 30.0))


def test_gldv2_retrieval_loader(tmp_path):
    written = write_gldv2(tmp_path)
    data = load_gldv2_retrieval(tmp_path)
    assert data.index_ids == tuple(written["index_ids"])
    # Landmarks 0 and 2 score Private, landmark 1 Public; the "None" and Ignored rows are not scored.
    assert sorted(data.solution["Private"]) == [0, 2]
    assert sorted(data.solution["Public"]) == [1]
    assert data.solution["Private"][2] == [8, 9, 10, 11]
    first = written["index_ids"][0]
    assert data.index_files()[0] == tmp_path / "index" / first[0] / first[1] / first[2] / f"{first}.jpg"
    assert gldv2_image_path(tmp_path, "train", "abcdef") == tmp_path / "train" / "a" / "b" / "c" / "abcdef.jpg"

    with (tmp_path / "retrieval_solution_v2.1.csv").open("a") as f:
        f.write("ffffffffffffffff,None,Private\n")
    with pytest.raises(DataError, match=r"retrieval_solution_v2.1.csv:7: test id ffffffffffffffff is not in test.csv"):
        load_gldv2_retrieval(tmp_path)
    (tmp_path / "index.csv").write_text("name\nx\n")
    with pytest.raises(DataError, match=r"index\.csv lacks column"):
        load_gldv2_retrieval(tmp_path)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "advbct", *args], capture_output=True, text=True, timeout=600)


def test_eval_benchmarks_end_to_end(three_models, tmp_path):
    write_revisited(tmp_path / "roxford5k", "roxford5k")
    write_gldv2(tmp_path / "gldv2")
    old = str(three_models["old"])
    out = tmp_path / "self.json"
    result = run_cli(
        "eval", "--benchmark", "roxford5k,gldv2", "--query-model", old, "--gallery-model", old,
        "--data", str(tmp_path), "--out", str(out), "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    single = json.loads(out.read_text())
    # Each query's box (revisited) or the test photo (GLDv2) is pixel-identical to its first relevant database
    # image, so searching with the model's own embeddings finds it first.
    easy = single["roxford5k"]["tests"]["query/gallery"]["easy"]
    assert easy["map"] == pytest.approx(100.0) and easy["mp@1"] == pytest.approx(100.0)
    assert single["gldv2"]["headline_name"] == "Private mAP@100"
    assert set(single["gldv2"]["tests"]["query/gallery"]) == {"private", "public"}

    out = tmp_path / "paper.json"
    result = run_cli(
        "eval", "--benchmark", "roxford5k,gldv2", "--old", old, "--new", str(three_models["new"]),
        "--independent", str(three_models["independent"]), "--data", str(tmp_path), "--out", str(out),
        "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    tests = ("old/old", "new/new", "new/old", "independent/independent", "independent/old")
    for name in ("roxford5k", "gldv2"):
        assert tuple(report[name]["tests"]) == tests
        for key in tests:
            headline = report[name]["headline"][key]
            scores = report[name]["tests"][key]
            assert headline == (scores["medium"]["map"] if name == "roxford5k" else scores["private"])
    assert report["roxford5k"]["tests"]["old/old"] == single["roxford5k"]["tests"]["query/gallery"]
    names = ("roxford5k", "gldv2")
    heads = [report[name]["headline"] for name in names]
    summary = report["summary"]
    assert summary["criterion"] == {n: h["new/old"] > h["old/old"] for n, h in zip(names, heads, strict=True)}
    if "p_scores_undefined" not in summary:
        expected = reference_p_scores(
            *[[h[k] for h in heads] for k in ("old/old", "independent/independent", "new/new", "new/old")]
        )
        assert {k: summary[k] for k in expected} == pytest.approx(expected)
    assert "Medium mAP" in result.stdout and "Private mAP@100" in result.stdout


def test_eval_benchmark_refusals(three_models, tmp_path):
    old = str(three_models["old"])
    missing = run_cli("eval", "--benchmark", "rparis6k", "--query-model", old, "--gallery-model", old,
                      "--data", str(tmp_path))  # fmt: skip
    assert missing.returncode == 2 and "gnd_rparis6k.pkl not found" in missing.stderr
    unknown = run_cli("eval", "--benchmark", "holidays", "--old", old, "--new", old, "--data", str(tmp_path))
    assert unknown.returncode == 2 and "unknown benchmark holidays" in unknown.stderr
    root = tmp_path / "roxford5k"
    write_revisited(root, "roxford5k")
    next((root / "jpg").iterdir()).write_bytes(b"not a jpeg")
    broken = run_cli("eval", "--benchmark", "roxford5k", "--query-model", old, "--gallery-model", old,
                     "--data", str(tmp_path), "--no-progress")  # fmt: skip
    assert broken.returncode == 2 and "cannot decode image" in broken.stderr


def test_the_paper_summary_over_benchmarks_from_hand_worked_headlines():
    names = ("old/old", "new/new", "new/old", "independent/independent", "independent/old")
    # roxford: cross 50 > old 40; gldv2: cross 19 < old 20.
    headlines = {"roxford5k": dict(zip(names, (40.0, 60.0, 50.0, 60.0, 2.0), strict=True)),
                 "gldv2": dict(zip(names, (20.0, 30.0, 19.0, 30.0, 1.0), strict=True))}  # fmt: skip
    summary = paper_summary(headlines)
    assert summary.criterion == {"roxford5k": True, "gldv2": False}
    # P_up: both 100 s(0) = 50. P_comp: 100 s(0.5) = 62.2459 and 100 s(-0.1) = 47.5021, mean 54.8740.
    # P_1: 55.4550 and 2 * 50 * 47.5021 / 97.5021 = 48.7190, mean 52.0870.
    assert summary.scores.p_up == pytest.approx(50.0)
    assert summary.scores.p_comp == pytest.approx(54.8740, abs=1e-4)
    assert summary.scores.p_1 == pytest.approx(52.0870, abs=1e-4)
    assert summary.to_json() == {"criterion": summary.criterion, "p_up": summary.scores.p_up,
                                 "p_comp": summary.scores.p_comp, "p_1": summary.scores.p_1}  # fmt: skip
    headlines["gldv2"]["independent/independent"] = 20.0  # M(*,*) = M(o,o): P_comp divides by zero
    undefined = paper_summary(headlines)
    assert undefined.scores is None and "P_comp is undefined" in undefined.to_json()["p_scores_undefined"]
