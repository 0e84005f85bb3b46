"""The upgrade path end to end through the real CLI, on real PNG files, plus its refusals of bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from advbct import pipeline
from advbct.compat import CompatError, StatisticsError
from advbct.models import CheckpointError
from advbct.presets import quickstart_config, train_config
from paper_scores import reference_p_scores

TESTS = ("old/old", "new/new", "new/old", "independent/independent", "independent/old")


def run_cli(*args, env=None):
    """The CLI in a subprocess; ``env`` adds variables to this process's environment."""
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "advbct", *args], capture_output=True, text=True, env=environment, timeout=600
    )


def check_results(path):
    return check_results_dict(json.loads(path.read_text()))


def check_results_dict(report):
    assert set(report["tests"]) == set(TESTS)
    for values in report["tests"].values():
        assert set(values) >= {"map", "map_at_r", "top1", "top5"}
        assert all(0.0 <= v <= 100.0 for v in values.values())
    maps = {key: values["map"] for key, values in report["tests"].items()}
    old, new, cross, independent = (maps[k] for k in ("old/old", "new/new", "new/old", "independent/independent"))
    expected = reference_p_scores([old], [independent], [new], [cross])
    assert {key: report[key] for key in expected} == pytest.approx(expected)
    assert report["criterion"] == (cross > old) and report["self_criterion"] == (new > old)
    assert report["cross_vs_independent"] == pytest.approx(cross / maps["independent/old"])
    return report


def test_step_commands_and_refusals(tiny_folder, tmp_path):
    common = [
        "--preset",
        "smoke",
        "--data",
        str(tiny_folder),
        "--no-progress",
        "-o",
        "data.dataset=image-folder",
    ]

    def train_old_with_stats(folder, *extra):
        assert run_cli("train-old", "--out", str(folder), *common, *extra).returncode == 0
        result = run_cli("stats", "--old", str(folder / "model.pt"), "--data", str(tiny_folder))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "r_max over" in result.stdout and "above tau = 1" in result.stdout

    old_dir = tmp_path / "old"
    train_old_with_stats(old_dir)

    # an old checkpoint of another embedding dim is refused before training, and nothing is written
    result = run_cli(
        "train-new",
        "--old",
        str(old_dir / "model.pt"),
        "--out",
        str(tmp_path / "new"),
        *common,
        "-o",
        "model.embedding_dim=48",
    )
    assert (
        result.returncode == 2
        and "embeds to dim 32, but the new model is configured with embedding_dim 48" in result.stderr
    )
    assert not (tmp_path / "new" / "model.pt").exists()

    # statistics computed from another checkpoint are refused
    other = tmp_path / "other"
    train_old_with_stats(other, "-o", "seed=1")
    result = run_cli(
        "train-new",
        "--old",
        str(old_dir / "model.pt"),
        "--stats",
        str(other / "stats.pt"),
        "--out",
        str(tmp_path / "new"),
        *common,
    )
    assert result.returncode == 2 and "run `advbct stats` on that checkpoint" in result.stderr

    result = run_cli("train-new", "--old", str(old_dir / "model.pt"), "--out", str(tmp_path / "new"), *common)
    assert result.returncode == 0, result.stdout + result.stderr
    result = run_cli(
        "eval",
        "--old",
        str(old_dir / "model.pt"),
        "--new",
        str(tmp_path / "new" / "model.pt"),
        "--data",
        str(tiny_folder),
        "--out",
        str(tmp_path / "eval.json"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["tests"]) == {"old/old", "new/new", "new/old"}


def test_missing_data_root_is_a_clear_error(tmp_path):
    result = run_cli(
        "quickstart", "--preset", "smoke", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")
    )
    assert result.returncode == 2
    assert "holds no CIFAR-100 image folders" in result.stderr
    assert not (tmp_path / "run" / "old").exists()


def test_pipeline_refusals_in_process(tiny_folder, tmp_path):
    cfg = train_config("old", "smoke", None, ["data.dataset=image-folder", "device=cpu"], str(tiny_folder), None)
    old_path = pipeline.train_old(cfg, tmp_path / "old", show_progress=False)
    _, stats_path = pipeline.compute_statistics(old_path, data_root=str(tiny_folder), device="cpu")
    new_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"embedding_dim": 8})})
    with pytest.raises(CheckpointError, match="embeds to dim 32"):
        pipeline.train_new(new_cfg, tmp_path / "new", old_path, stats_path, show_progress=False)
    stats_path.write_bytes(b"not a tensor file")
    with pytest.raises(StatisticsError, match="cannot read statistics file"):
        pipeline.train_new(cfg, tmp_path / "new", old_path, stats_path, show_progress=False)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_quickstart_smoke_on_real_cifar100(real_data, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "quickstart",
        "--preset",
        "smoke",
        "--data",
        str(real_data),
        "--out",
        str(out),
        "--no-progress",
        "-o",
        "common.device=cpu",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = check_results(out / "results.json")
    assert quickstart_config("smoke", None, None, None, None).old.data.max_test_per_class == 10
    assert report["tests"]["old/old"]["map"] > 1.0  # above chance (about 1% for 100 classes)


def test_compare_every_method_on_one_allocation(tiny_folder, tmp_path):
    out = tmp_path / "cmp"
    result = run_cli(
        "compare",
        "--preset",
        "smoke",
        "--data",
        str(tiny_folder),
        "--out",
        str(out),
        "--no-progress",
        "--ablations",
        "-o",
        "common.data.dataset=image-folder",
        "-o",
        "common.device=cpu",
        "-o",
        "new.compat.options.tau=0.5",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reports = json.loads((out / "results.json").read_text())
    # AdvBCT's option reaches AdvBCT, its ablations and its variant, and no other method; each run records every
    # option of its method at the value it used.
    for method in ("advbct", "advbct-bound-only", "advbct-tight", "bct", "hot-refresh"):
        options = json.loads((out / method / "config.json").read_text())["compat"]["options"]
        assert options.get("tau") == (0.5 if method.startswith("advbct") else None), method
    assert json.loads((out / "bct" / "config.json").read_text())["compat"]["options"] == {"weight": 1.0}
    expected = {
        "l2",
        "bct",
        "lce",
        "unibct",
        "hot-refresh",
        "advbct",
        "advbct-adv-only",
        "advbct-bound-only",
        "advbct-fixed-radius",
        "advbct-tight",
    }
    assert set(reports) == expected
    shared = {key: reports["advbct"]["tests"][key] for key in ("old/old", "independent/independent")}
    for method, report in reports.items():
        check_results_dict(report)
        for key, values in shared.items():  # one old and one independent model serve every method
            assert report["tests"][key] == values, method
        assert (out / method / "model.pt").is_file()
    assert "M(n,o) > M(o,o)" in result.stdout and "hot-refresh" in result.stdout
    old_ids = {
        json.loads(torch.load(out / m / "model.pt", weights_only=True)["meta"])["compatible_with"]["model_id"]
        for m in expected
    }
    assert len(old_ids) == 1  # every method is compatible with the same old checkpoint


def test_concurrent_runs_train_the_same_models_as_one_at_a_time(tiny_folder, tmp_path):
    common = ["--preset", "smoke", "--data", str(tiny_folder), "--no-progress", "--methods", "l2,advbct",
              "-o", "common.data.dataset=image-folder", "-o", "common.device=cpu"]  # fmt: skip
    # Every training gets one thread (CPU float sums depend on the thread count, not on concurrency): one process
    # of one thread, or two processes sharing two.
    one = run_cli("compare", *common, "--out", str(tmp_path / "one"), "--jobs", "1", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stdout + one.stderr
    # The concurrent runs start from the finished old model, so both compare the same new-model training.
    shutil.copytree(tmp_path / "one" / "old", tmp_path / "two" / "old")
    args = ["--out", str(tmp_path / "two"), "--jobs", "2"]
    two = run_cli("compare", *common, *args, env={"OMP_NUM_THREADS": "2"})
    assert two.returncode == 0, two.stdout + two.stderr
    assert "(2 at a time, in processes)" in two.stdout and "finished: advbct" in two.stdout
    for name in ("independent", "l2", "advbct"):
        first = torch.load(tmp_path / "one" / name / "model.pt", weights_only=True)["model"]
        second = torch.load(tmp_path / "two" / name / "model.pt", weights_only=True)["model"]
        for key, value in first.items():
            assert torch.equal(second[key], value), f"{name}: {key}"
    assert json.loads((tmp_path / "two" / "results.json").read_text()).keys() == {"l2", "advbct"}
    check_the_validation_split(tmp_path / "one", common)


def check_the_validation_split(run, common):
    """A finished comparison scored again on the validation split: no training, the allocation's held-out images
    (5 per class of the 6), and numbers of their own."""
    allocation = json.loads((run / "old" / "allocation.json").read_text())
    held_out = set(allocation["validation_indices"])
    assert len(held_out) == 30 and not held_out & set(allocation["old_indices"])
    assert sorted(pipeline.validation_images(run / "old" / "model.pt").labels.tolist()) == sorted(list(range(6)) * 5)
    test = json.loads((run / "results.json").read_text())
    trained = {name: (run / name / "model.pt").stat().st_mtime_ns for name in ("old", "independent", "l2", "advbct")}
    again = run_cli("compare", *common, "--out", str(run), "--split", "validation")
    assert again.returncode == 0, again.stdout + again.stderr
    assert {name: (run / name / "model.pt").stat().st_mtime_ns for name in trained} == trained
    assert "validation split" in again.stdout
    validation = json.loads((run / "results.json").read_text())
    assert {report["split"] for report in validation.values()} == {"validation"}
    assert validation["l2"]["tests"]["old/old"] != test["l2"]["tests"]["old/old"]
    refused = run_cli("eval", "--query-model", str(run / "old" / "model.pt"), "--gallery-model",
                      str(run / "l2" / "model.pt"), "--split", "validation")  # fmt: skip
    assert refused.returncode == 2 and "--split validation takes the upgrade tests" in refused.stderr


@pytest.mark.slow
def test_compiled_training_saves_the_plain_model(tiny_folder, tmp_path):
    common = ["--preset", "smoke", "--data", str(tiny_folder), "--no-progress", "-o", "data.dataset=image-folder",
              "-o", "device=cpu", "-o", "optim.epochs=1"]  # fmt: skip
    plain = run_cli("train-old", "--out", str(tmp_path / "plain"), *common)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    compiled = run_cli("train-old", "--out", str(tmp_path / "compiled"), *common, "-o", "compile=true")
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    first = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)["model"]
    second = torch.load(tmp_path / "compiled" / "model.pt", weights_only=True)["model"]
    assert second.keys() == first.keys()  # no "_orig_mod." prefixes: the checkpoint loads without the option
    # The compiled kernels fuse and reorder float arithmetic, so one epoch lands close to, not on, the plain one.
    for key, value in first.items():
        torch.testing.assert_close(second[key].float(), value.float(), rtol=1e-2, atol=1e-3, msg=key)


def test_training_commands_import_without_the_serving_database():
    # GPU machines often lack pymilvus; training, evaluation and the bench must not need it until a gallery opens.
    code = "import sys; sys.modules['pymilvus'] = None; import advbct.cli, advbct.table_bench; print('imported')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr


def test_a_shared_option_that_does_not_suit_a_compared_method_is_refused_before_training(tmp_path):
    overrides = ["new.compat.method=advbct-tight", "new.compat.options.discriminator=class-conditional"]
    cfg = quickstart_config("smoke", None, overrides, None, "cpu")
    # The configured method keeps its own section; another method receives the options it takes.
    assert pipeline.compat_config_for(cfg, "advbct-tight").options == {"discriminator": "class-conditional"}
    assert pipeline.compat_config_for(cfg, "advbct").options == {}
    # tau=stats suits advbct-tight only: a comparison that also trains advbct stops before the old model trains.
    stats_tau = quickstart_config("smoke", None, [*overrides, "new.compat.options.tau=stats"], None, "cpu")
    with pytest.raises(CompatError, match=r"method 'advbct' option tau: .*got 'stats'"):
        pipeline.plan_new_models(stats_tau, tmp_path / "run", ["advbct-tight", "advbct"], Console(quiet=True))
    assert not (tmp_path / "run").exists()
