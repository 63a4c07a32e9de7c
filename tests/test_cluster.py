"""
train.py as a cluster job meets it (subprocesses, CPU, gloo, config/tiny.py): MFU per GPU on any
world size, non-finite steps skipped or stopped without a bad checkpoint, strict JSON metrics,
--resume=auto, out_dir checked to be shared by every rank, Weights & Biases logging (offline).

    python -m pytest tests/test_cluster.py
"""
import glob
import json
import os
import re
import struct
import subprocess
import sys

import pytest
import torch

import common
import train
from test_train import HALF, ROOT, assert_identical, ckpt, file_state, metrics, train_py

# train.py's command line run with a patch applied first (PATCH: code that may use `train`, `rank`)
LAUNCH = """
import os, sys
sys.path.insert(0, {root!r})
import torch, train
rank = int(os.environ.get("RANK", 0))
{patch}
train.run_or_exit(train.train, train.configure_or_exit(train.DEFAULTS))
"""

# gradients of the first trainable parameter turned NaN at the optimizer steps in BAD (counted from 1
# in this process; LRC's projections receive one backward per step), on the ranks in RANKS
POISON = """
BAD, RANKS = {bad}, {ranks}
build, calls = train.build_model, [0]
def poisoned(*a, **k):
    model = build(*a, **k)
    def hook(g):
        calls[0] += 1
        return g * float("nan") if calls[0] in BAD and rank in RANKS else g
    next(model.parameters()).register_hook(hook)
    return model
train.build_model = poisoned
"""


def patched(patch, tmp_path, *args, nproc=1, env=None):
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH.format(root=ROOT, patch=patch))
    launch = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("NANOLRC_STOP_AT", None)
    return subprocess.run([*launch, str(script), "config/tiny.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def rows(out):
    """metrics.jsonl, read as strict JSON: NaN or Infinity is an error."""
    def refuse(name):
        raise ValueError(f"{name} in metrics.jsonl")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


# -----------------------------------------------------------------------------
# what the log says

# a faked peak table (1 GFLOP/s per device) and a faked clock (each reading 1 s after the last: every
# timed train step takes 1 s)
FAKE_PEAK_AND_CLOCK = """
import itertools, types
train.peak_flops = lambda device: 1e9
ticks = itertools.count()
train.time = types.SimpleNamespace(time=lambda: float(next(ticks)))
"""


@pytest.mark.parametrize("nproc", [1, 2])
def test_mfu_is_per_gpu(tiny_teacher, tiny_data, tmp_path, nproc):
    """The same global batch of 128 tokens per step on 1 and 2 ranks, each step 1 s by the faked clock:
    tokens/s is 128 over all ranks, and MFU = 128 tokens/s x FLOPs per token / (ranks x peak), on 2 ranks
    half of what it is on one."""
    out = str(tmp_path / "out")
    r = patched(FAKE_PEAK_AND_CLOCK, tmp_path, f"--teacher={tiny_teacher}", f"--data_dir={tiny_data}",
                f"--out_dir={out}", "--tokens_per_step=128", nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    model = common.build_model(ckpt(out)["config"], "cpu", "float32", load=True)
    per_token = train.flops_per_token(model, 32)
    train_rows = [row for row in rows(out) if "lr" in row]
    assert [row["step"] for row in train_rows] == [2, 4, 6]
    for row in train_rows:
        assert row["tokens_per_s"] == 128.0
        assert row["mfu"] == pytest.approx(128 * per_token / (nproc * 1e9), rel=1e-12)
    assert "| 128 tok/s" in r.stdout and ("(64 per GPU)" in r.stdout) == (nproc > 1)


def test_metrics_are_strict_json(runs):
    """On CPU MFU is unknown: null, not NaN."""
    train_rows = [row for row in rows(runs()) if "lr" in row]
    assert train_rows and all(row["mfu"] is None and row["tokens_per_s"] > 0 for row in train_rows)


SLOW_FIRST_STEP = """
import time
step, first = train.train_step, [True]
def slow_first(*a, **k):  # as compilation makes the first step slow
    if first[0]:
        first[0] = False
        time.sleep(3)
    return step(*a, **k)
train.train_step = slow_first
"""


def test_rate_and_eta_leave_the_first_step_out(tiny_teacher, tiny_data, tmp_path):
    """A first step 3 s slower (compilation) counts neither in the first row's tokens/s nor in the ETA
    printed with it (the 4 steps left take well under a second)."""
    out = str(tmp_path / "out")
    r = patched(SLOW_FIRST_STEP, tmp_path, f"--teacher={tiny_teacher}", f"--data_dir={tiny_data}",
                f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    first = next(row for row in rows(out) if "lr" in row)
    assert first["step"] == 2 and first["tokens_per_s"] > 128 / 1.0  # with the 3 s: < 128 / 3
    assert re.search(r"step 2 \|.* tok/s \| ETA 0\.0 min", r.stdout), r.stdout


# -----------------------------------------------------------------------------
# non-finite steps

@pytest.mark.parametrize("nproc, zero", [(1, False), (2, False), (2, True)])
def test_a_nonfinite_gradient_is_skipped(tiny_teacher, tiny_data, tmp_path, nproc, zero):
    """A NaN gradient at step 2 (finite loss; on 2 ranks only rank 1's): the step changes nothing on every
    rank, says so, is counted, and the run goes on to its end: 5 Adam steps in 6, finite weights, exported.
    With zero a rank that stepped alone would hang the run in the optimizer's broadcast."""
    out = str(tmp_path / "out")
    r = patched(POISON.format(bad={2}, ranks={nproc - 1}), tmp_path, f"--teacher={tiny_teacher}",
                f"--data_dir={tiny_data}", f"--out_dir={out}", "--tokens_per_step=128", f"--zero={zero}",
                nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2: non-finite {'grad_norm': nan}: skipped, the weights are unchanged" in r.stdout
    assert "(768 tokens, 1 skipped)" in r.stdout
    state = ckpt(out)
    assert state["step"] == 6 and state["skipped"] == 1
    assert {s["step"].item() for s in state["optimizer"]["state"].values()} == {5.0}
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert [row["skipped"] for row in rows(out) if "lr" in row] == [1, 1, 1]
    assert os.path.isdir(os.path.join(out, "student"))


def test_kd_with_alpha_kl_0_is_the_lm_loss(runs):
    """--method=kd --alpha_kl=0: the LM loss alone, every step taken (the fused head once divided by the KL
    weight: finite losses, NaN gradients)."""
    train_rows = [row for row in rows(runs("--method=kd", "--alpha_kl=0")) if "lr" in row]
    assert train_rows and all(row["skipped"] == 0 and row["grad_norm"] > 0 for row in train_rows)
    assert all(row["loss"] == pytest.approx(row["lm"], rel=1e-6) for row in train_rows)


def test_nonfinite_gradients_in_a_row_stop(halfway, tiny_teacher, tiny_data, tmp_path):
    """From the step-3 checkpoint, every gradient NaN, at most 1 skipped in a row: step 4 is skipped, step 5
    stops the run with one line; the checkpoint is the step-3 one, untouched, nothing exported."""
    path = os.path.join(halfway, "ckpt.pt")
    before = file_state(path)
    r = patched(POISON.format(bad=set(range(1, 10)), ranks={0}), tmp_path, f"--teacher={tiny_teacher}",
                f"--data_dir={tiny_data}", f"--out_dir={halfway}", "--resume=True", "--skip_nonfinite=1")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "step 4: non-finite {'grad_norm': nan}: skipped" in r.stdout
    assert r.stderr.startswith("error: step 5: non-finite {'grad_norm': nan}, 2 steps in a row; stopped "
                               f"without saving, the last good checkpoint in {halfway} is untouched")
    assert "Traceback" not in r.stderr
    assert file_state(path) == before and not os.path.exists(os.path.join(halfway, "student"))
    assert max(row["step"] for row in rows(halfway)) == 4  # rows of finite weights only


# -----------------------------------------------------------------------------
# one job script that starts and re-queues a run

def test_resume_auto_starts_then_continues(runs, tiny_teacher, tiny_data, tmp_path):
    """--resume=auto in an empty out_dir starts the run; after a preemption at step 3 the same command
    continues it; the result is the uninterrupted run's, to the bit."""
    out = str(tmp_path / "out")
    args = (f"--teacher={tiny_teacher}", f"--data_dir={tiny_data}", f"--out_dir={out}", "--resume=auto")
    first = train_py(*args, stop_at=HALF)
    assert first.returncode == 0 and "resumed" not in first.stdout, first.stderr[-3000:]
    again = train_py(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {os.path.join(out, 'ckpt.pt')} at step {HALF}" in again.stdout
    full = ckpt(runs())
    assert_identical(ckpt(out)["model"], full["model"], "model")
    assert metrics(out) == metrics(runs())


def test_out_dir_that_ranks_do_not_share(runs, tiny_teacher, tiny_data, tmp_path):
    """Two nodes whose out_dir is a local disk each (here: rank 1 is given another dir): refused with one
    line naming the rank before anything is loaded, written or resumed."""
    out = str(tmp_path / "out")
    node1 = "if rank == 1:\n    sys.argv = [a.replace({out!r}, {out!r} + '_node1') for a in sys.argv]"
    r = patched(node1.format(out=out), tmp_path, f"--teacher={tiny_teacher}", f"--data_dir={tiny_data}",
                f"--out_dir={out}", "--resume=auto", "--tokens_per_step=128", nproc=2)
    assert r.returncode != 0
    assert (f"error: --out_dir={out} is not the same dir on every rank: ranks [1] do not see rank 0's "
            "files there") in r.stderr, r.stderr[-3000:]
    assert "Traceback (most recent call last):\n  File \"" + str(tmp_path) not in r.stderr
    assert os.listdir(out) == []  # the check's token is gone, nothing else was written


# -----------------------------------------------------------------------------
# Weights & Biases

def wandb_records(path):
    """The records of a W&B run file (LevelDB's log format: 32 KiB blocks of records, each a 7-byte
    header crc32, length, type (1 full, 2 first, 3 middle, 4 last), after a 7-byte file header), as
    wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, part = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            yield record
            part = b""


def test_wandb_logs_the_metrics_rows_offline(runs, tiny_teacher, tiny_data, tmp_path):
    """WANDB_MODE=offline: the run's history holds every row of metrics.jsonl at its step (same keys, same
    values), its config is the run's config, its name out_dir's; the training itself is unchanged."""
    out = str(tmp_path / "out")
    r = train_py(f"--teacher={tiny_teacher}", f"--data_dir={tiny_data}", f"--out_dir={out}", "--wandb_log=True",
                 "--wandb_project=nanolrc-test", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    [run_file] = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    history, config, run = {}, {}, None
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items.pop("_step"), {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")})
        elif kind in ("run", "config"):  # the config: the run record's, then any updates
            run = record.run if kind == "run" else run
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
    logged = {}
    for row in rows(out):
        logged.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step" and v is not None})
    assert history == logged
    assert run.display_name == "out" and run.project == "nanolrc-test"
    assert config["d_student"] == 16 and config["out_dir"] == out
    assert_identical(ckpt(out)["model"], ckpt(runs())["model"], "model")
    assert ckpt(out)["wandb_id"] == run.run_id  # a resumed run logs into the same dashboard run


def test_wandb_not_installed(tiny_teacher, tiny_data, tmp_path):
    r = patched("sys.modules['wandb'] = None", tmp_path, f"--teacher={tiny_teacher}",
                f"--data_dir={tiny_data}", f"--out_dir={tmp_path}/out", "--wandb_log=True")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr == "error: --wandb_log=True needs Weights & Biases: pip install wandb\n"
