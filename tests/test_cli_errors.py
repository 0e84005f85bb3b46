"""Refused input through the real command lines: one line on stderr naming what is wrong, exit status 2, no
traceback, nothing written."""

import os
import subprocess
import sys

import pytest

from advbct.cli_errors import REFUSED
from advbct.compat import CompatError, StatisticsError
from advbct.config import ConfigError
from advbct.data.images import DataError
from advbct.errors import AdvbctError
from advbct.models.checkpoint import CheckpointError
from advbct.serving.gate import GateRefused
from advbct.serving.orders import OrderConflict
from advbct.serving.store import StoreError


def run_cli(*args):
    result = subprocess.run(
        [sys.executable, "-m", "advbct", *args], capture_output=True, text=True, env=dict(os.environ), timeout=300
    )
    return result


def assert_refused(result, message):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.mark.parametrize(
    "error",
    [ConfigError, DataError, CheckpointError, StatisticsError, CompatError, GateRefused, StoreError, OrderConflict],
)
def test_every_project_refusal_is_one_the_command_lines_map(error):
    assert issubclass(error, AdvbctError) and issubclass(error, REFUSED)


def test_cuda_graph_on_a_cpu_is_one_line_and_trains_nothing(tiny_folder, tmp_path):
    common = ["--preset", "smoke", "--data", str(tiny_folder), "--no-progress", "--device", "cpu"]
    result = run_cli("train-old", "--out", str(tmp_path / "old"), *common,
                     "-o", "data.dataset=image-folder", "-o", "cuda_graph=true")  # fmt: skip
    assert_refused(result, "cuda_graph needs a CUDA device, the run uses cpu")
    result = run_cli("quickstart", "--out", str(tmp_path / "run"), *common,
                     "-o", "common.data.dataset=image-folder", "-o", "common.cuda_graph=true")  # fmt: skip
    assert_refused(result, "cuda_graph needs a CUDA device, the run uses cpu")
    assert not (tmp_path / "old" / "model.pt").exists() and not (tmp_path / "run" / "old" / "model.pt").exists()


def test_a_quickstart_without_a_compatible_method_is_one_line_and_trains_nothing(tiny_folder, tmp_path):
    result = run_cli("quickstart", "--out", str(tmp_path / "run"), "--preset", "smoke", "--data", str(tiny_folder),
                     "--no-progress", "-o", "new.compat.method=independent")  # fmt: skip
    assert_refused(result, "new.compat.method is 'independent': the quickstart trains that model beside a compatible")
    assert not (tmp_path / "run").exists()


def test_an_option_the_method_does_not_take_is_one_line(tiny_folder, tmp_path):
    result = run_cli("train-new", "--method", "independent", "--out", str(tmp_path / "new"), "--preset", "smoke",
                     "--data", str(tiny_folder), "--no-progress", "--device", "cpu",
                     "-o", "data.dataset=image-folder", "-o", "compat.options.tau_typo=1")  # fmt: skip
    assert_refused(result, "tau_typo")
    assert not (tmp_path / "new" / "model.pt").exists()


def test_an_unknown_checkpoint_is_one_line_in_the_serving_command_line(tmp_path):
    result = run_cli("index", "add", "--db", str(tmp_path / "g.db"), "--image-root", str(tmp_path),
                     "--model", str(tmp_path / "missing.pt"), str(tmp_path))  # fmt: skip
    assert_refused(result, "missing.pt")


def test_an_unknown_or_empty_evaluation_split_is_one_line(tiny_folder, three_models, tmp_path):
    result = run_cli("compare", "--out", str(tmp_path / "cmp"), "--preset", "smoke", "--data", str(tiny_folder),
                     "--split", "train", "--no-progress", "-o", "common.data.dataset=image-folder")  # fmt: skip
    assert_refused(result, "unknown split 'train'; use one of test, validation")
    assert not (tmp_path / "cmp").exists()
    # These models' allocation set no images aside.
    result = run_cli("eval", "--old", str(three_models["old"]), "--new", str(three_models["new"]),
                     "--split", "validation", "--device", "cpu")  # fmt: skip
    assert_refused(result, "the validation split is empty")


def test_a_new_model_whose_config_names_another_split_than_the_old_models_is_one_line(three_models, tmp_path):
    old = three_models["old"]
    folder = old.parent.parent / "data"  # the PNG folder the fixture's models trained on
    result = run_cli("train-new", "--old", str(old), "--method", "independent", "--out", str(tmp_path / "new"),
                     "--preset", "smoke", "--data", str(folder), "--no-progress", "--device", "cpu",
                     "-o", "data.dataset=image-folder", "-o", "data.validation_per_class=0",
                     "-o", "data.allocation=extended-data")  # fmt: skip
    assert_refused(result, "this run's data section asks for ('extended-data', 0.3, 0, 0)")
    assert not (tmp_path / "new").exists()
