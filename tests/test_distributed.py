"""torchrun with gloo on CPU: one distributed step equals the single-process step on the concatenated batch, the
two-process quickstart writes the single-process results, and a run killed mid-epoch resumes to the same weights."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

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


def _run_worker(method, out, *extra, distributed=False):
    command = torchrun(str(WORKER)) if distributed else [sys.executable, str(WORKER)]
    result = subprocess.run([*command, method, str(out), *extra], capture_output=True, text=True, env=env_with(),
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _close(got, expected):
    """float32 sums in another order: equal to a millionth of the tensor's largest entry (hot-refresh's temperature
    of 0.01 makes its gradients large, so an absolute tolerance alone would not do)."""
    return (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item() + 1e-7


def test_distributed_advbct_step_matches_the_single_process_step(tmp_path):
    expected = _run_worker("advbct", tmp_path / "single.pt")
    got = _run_worker("advbct", tmp_path / "double.pt", distributed=True)
    assert set(expected) == set(got) and any(name.startswith("method.") for name in expected)
    for name, value in expected.items():
        assert _close(got[name], value), f"advbct: {name} differs"


def test_distributed_hot_refresh_step_pushes_only_each_ranks_own_batch(tmp_path):
    # The reference: in one process, each rank's loss over its own anchors with the other rank's embeddings held
    # constant, averaged over the ranks. The plain single-process step lets every anchor push every negative.
    plain = _run_worker("hot-refresh", tmp_path / "single.pt")
    as_ranks = _run_worker("hot-refresh", tmp_path / "as_ranks.pt", "as-ranks")
    got = _run_worker("hot-refresh", tmp_path / "double.pt", distributed=True)
    assert set(got) == set(as_ranks) == set(plain)
    assert not any(name.startswith("method.") for name in got)
    # The loss is the same value however the anchors are shared out: each counted once, averaged over the ranks.
    assert _close(got["loss"], plain["loss"]) and _close(as_ranks["loss"], plain["loss"])
    for name, value in as_ranks.items():
        assert _close(got[name], value), f"hot-refresh: {name} differs from the own-anchor reference"
    # Without the other rank's pushes on the negatives the gradient is not the plain step's.
    assert not _close(got["model.proj.weight"], plain["model.proj.weight"])


def test_hot_refresh_rows_gathered_from_the_other_rank_carry_no_gradient(tmp_path):
    reference = _run_worker("hot-refresh", tmp_path / "single.pt", "embeddings")["local"]
    got = _run_worker("hot-refresh", tmp_path / "double.pt", "embeddings", distributed=True)
    # Each rank's own rows get the gradient of its own loss, computed with the other rank's rows as constants.
    assert _close(got["local"], reference)
    # A gather with gradient would also hand each rank the other rank's pushes on its rows as negatives.
    assert not _close(got["shared"], reference)


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


def _train_old_command(folder, out, nproc, checkpoint_every):
    overrides = ["data.dataset=image-folder", "device=cpu", "data.old_fraction=0.75", "optim.batch_size=16",
                 "optim.epochs=2", "data.validation_per_class=0", f"checkpoint_every={checkpoint_every}"]  # fmt: skip
    args = ["-m", "advbct", "train-old", "--preset", "smoke", "--out", str(out), "--data", str(folder), "--no-progress"]
    args += [part for o in overrides for part in ("-o", o)]
    return torchrun(*args, nproc=nproc) if nproc > 1 else [sys.executable, *args]


def _last_state(path):
    try:
        blob = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return None
    return int(blob["epoch"]), int(blob["step"])


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    folder = write_image_folder(tmp_path / "data", classes=4, train_per_class=40, test_per_class=2)
    env = env_with(ADVBCT_CACHE=tmp_path / "cache")
    straight = tmp_path / "straight"
    done = subprocess.run(_train_old_command(folder, straight, 2, 0), capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    broken = tmp_path / "broken"
    process = subprocess.Popen(_train_old_command(folder, broken, 2, 1), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env, start_new_session=True)  # fmt: skip
    state, deadline = None, time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        state = _last_state(broken / "last.pt") if (broken / "last.pt").is_file() else None
        if state is not None and state[1] >= 2:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert state is not None and state[1] >= 2, f"no mid-epoch checkpoint was seen before the kill: {state}"
    assert not (broken / "model.pt").exists()

    single = tmp_path / "single"
    shutil.copytree(broken, single)

    resumed = subprocess.run(_train_old_command(folder, broken, 2, 1), capture_output=True, text=True, env=env,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = _weights(straight / "model.pt"), _weights(broken / "model.pt")
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{name} differs after resuming with the same world size"

    # The same interrupted state resumed by one process continues the same global batches; only the order of
    # float sums differs (batch-norm statistics summed in one process instead of across two).
    alone = subprocess.run(_train_old_command(folder, single, 1, 1), capture_output=True, text=True, env=env,
                           timeout=600)  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    got = _weights(single / "model.pt")
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name], value, rtol=1e-3, atol=1e-4, msg=f"{name} differs (world 1)")
