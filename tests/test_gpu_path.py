"""
The GPU-path fixes, checked on the CPU: the stop decision is the same on every rank; ZeRO (sharded Adam) = Adam;
checkpoints load weights-only onto the CPU, RNG state included, and refuse pickled code; the paper recipes' token
budget on any number of ranks; ZeRO and tokens_per_step end to end (torchrun, gloo); log lines reach a redirected
stdout as they are printed; LRC's init 'pca' at the teacher's width and on an all-zero embedding row.

    python -m pytest -q tests/test_gpu_path.py              # ≈60 s on 2 idle cores
    python -m pytest -q tests/test_gpu_path.py -m "not slow"
"""
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common
import train
from configurator import configure
from lrc import LowRankClone
from model import RMSNorm, Transformer
from test_train import HALF, ROOT, assert_identical, ckpt, metrics, train_py


# -----------------------------------------------------------------------------
# two gloo processes: the stop decision and the sharded optimizer

STOP_CASES = [(False, True), (True, False), (False, False), (True, True)]  # (rank 0, rank 1) out of time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_worker(rank, port, out):
    """Runs in each of 2 spawned processes: train.stop_everywhere on STOP_CASES, then 3 Adam steps of a small
    model through train.make_optimizer with zero on and off; writes what it saw to out/rank{rank}.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        seen = {"stop": [train.stop_everywhere(case[rank], "cpu") for case in STOP_CASES]}
        cfg = {**train.DEFAULTS, "lr": 1e-2}
        params = []
        for zero in (True, False):
            torch.manual_seed(0)  # the same model, and the same data, on both ranks and for both optimizers
            model = torch.nn.Sequential(torch.nn.Linear(8, 8), RMSNorm(8, 1e-6), torch.nn.Linear(8, 4))
            optimizer = train.make_optimizer(model, {**cfg, "zero": zero})
            x = torch.randn(16, 8)
            for _ in range(3):
                model(x).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
            params.append([p.detach().clone() for p in model.parameters()])
            if zero:
                seen["type"] = type(optimizer).__name__
                seen["local_state"] = len(getattr(optimizer, "optim", optimizer).state)  # Adam state held here
                full = train.optimizer_state(optimizer)  # a collective: every rank calls it
            else:
                plain = optimizer.state_dict()
        seen["n_params"] = len(params[0])
        seen["same_params"] = all(torch.equal(a, b) for a, b in zip(*params))
        seen["full_state"] = full is not None
        if full is not None:  # rank 0: the gathered state is replicated Adam's, tensor by tensor
            seen["state_keys"] = sorted(full["state"]) == sorted(plain["state"])
            seen["same_state"] = all(torch.equal(full["state"][i][k], plain["state"][i][k])
                                     for i in plain["state"] for k in ("exp_avg", "exp_avg_sq"))
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of 2 gloo ranks saw in two_rank_worker: [rank 0's, rank 1's]."""
    out = str(tmp_path_factory.mktemp("ranks"))
    mp.spawn(two_rank_worker, args=(free_port(), out), nprocs=2)
    seen = []
    for rank in (0, 1):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            seen.append(json.load(f))
    return seen


def test_stop_is_decided_on_every_rank(two_ranks):
    """One rank out of time stops every rank (else the other waits in the next collective forever)."""
    expected = [a or b for a, b in STOP_CASES]  # [True, True, False, True]
    assert two_ranks[0]["stop"] == two_ranks[1]["stop"] == expected
    assert not dist.is_initialized()  # one process: its own clock decides
    assert train.stop_everywhere(True, "cpu") is True and train.stop_everywhere(False, "cpu") is False


def test_zero_shards_adam_and_gathers_its_state(two_ranks):
    """zero: each rank holds the Adam state of its shard only, the updated shards reach every rank (the
    parameters equal replicated Adam's after 3 steps), and optimizer_state gathers the whole state on rank 0."""
    r0, r1 = two_ranks
    assert r0["type"] == r1["type"] == "ZeroRedundancyOptimizer"
    assert r0["n_params"] == 5 and 0 < r0["local_state"] < 5 and r0["local_state"] + r1["local_state"] == 5
    assert r0["same_params"] and r1["same_params"]
    assert r0["full_state"] and not r1["full_state"]
    assert r0["state_keys"] and r0["same_state"]


# -----------------------------------------------------------------------------
# checkpoints: weights only, on the CPU

def test_checkpoint_loads_on_the_cpu_and_restores_the_rng(tmp_path, monkeypatch):
    """A checkpoint written by a GPU run (every storage tagged cuda:0) loads on a CPU-only machine, every tensor on
    the CPU, and torch.set_rng_state(ckpt['rng']) continues the random stream where the run saved it."""
    path = str(tmp_path / "ckpt.pt")
    with torch.random.fork_rng(devices=[]):  # leave the session's RNG as it was
        torch.manual_seed(7)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters())
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        torch.rand(3)
        with monkeypatch.context() as m:
            m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")  # as torch.save on a GPU
            common.save_checkpoint(path, model, optimizer.state_dict(), 5, {"lr": 0.5})
        expected = torch.rand(4)  # the draws that follow the saved state
        torch.rand(100)
        if not torch.cuda.is_available():  # the file really asks for CUDA: a plain load fails here
            with pytest.raises(RuntimeError, match="CUDA"):
                torch.load(path, weights_only=True)
        ck = common.load_checkpoint(str(tmp_path))  # the out_dir holding ckpt.pt
        tensors = [ck["rng"], *ck["model"].values(),
                   *(t for s in ck["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t))]
        assert len(tensors) == 1 + 2 + 2 * 3 and all(t.device.type == "cpu" for t in tensors)
        for k, v in model.state_dict().items():
            assert torch.equal(ck["model"][k], v), k
        assert ck["step"] == 5 and ck["config"] == {"lr": 0.5}
        torch.set_rng_state(ck["rng"])
        assert torch.equal(torch.rand(4), expected)


class Payload:
    """Unpickling this runs a shell command (pickle's __reduce__): what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def test_checkpoint_with_code_is_refused(tmp_path):
    path, marker = str(tmp_path / "ckpt.pt"), str(tmp_path / "marker")
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1, "x": Payload(marker)}, path)
    with pytest.raises(ValueError, match=f"checkpoint {re.escape(path)} is unreadable"):
        common.load_checkpoint(path)
    assert not os.path.exists(marker)  # refused before running anything
    torch.load(path, weights_only=False)  # the payload is live: a full unpickle runs it
    assert os.path.exists(marker)


# -----------------------------------------------------------------------------
# the token budget of the paper recipes

# By hand: 20e9 tokens / 32,768 per step (16 x 2048) = 610,351.56 -> 610,351 steps (Qwen);
# 10e9 / 49,152 (24 x 2048) = 203,450.52 -> 203,450 steps (Llama). Micro-batches per rank: 16 sequences per step
# over 2 per micro-batch = 8 micro-batches on 1 rank, 4 on 2, 2 on 4, 1 on 8; Llama: 24 / 3, the same.
RECIPES = {"config/lrc_qwen.py": (32_768, 610_351, {1: 8, 2: 4, 4: 2, 8: 1}),
           "config/lrc_llama.py": (49_152, 203_450, {1: 8, 2: 4, 4: 2, 8: 1})}


@pytest.mark.parametrize("recipe", RECIPES)
def test_paper_token_budget_on_any_number_of_ranks(recipe):
    tokens, steps, accum = RECIPES[recipe]
    cfg = configure(train.DEFAULTS, [os.path.join(ROOT, recipe)])
    for world in (1, 2, 4, 8):
        resolved, tokens_per_step = train.resolve_batch(cfg, world)
        assert (tokens_per_step, resolved["max_steps"], resolved["grad_accum"]) == (tokens, steps, accum[world])
        assert resolved["grad_accum"] * resolved["batch_size"] * resolved["block_size"] * world == tokens
    assert (cfg["grad_accum"], cfg["max_steps"]) == (1, 1000)  # resolve_batch returned a copy
    for change, world in (({}, 3), ({"batch_size": 5}, 1)):  # 3 ranks, or 5 x 2048 per micro-batch: no whole step
        with pytest.raises(ValueError, match="tokens_per_step"):
            train.resolve_batch({**cfg, **change}, world)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        train.resolve_batch({**cfg, "batch_size": 0}, 1)


def test_without_a_token_budget_grad_accum_and_max_steps_are_kept():
    cfg = configure(train.DEFAULTS, [os.path.join(ROOT, "config/tiny.py")])  # 2 x 32 tokens, grad_accum 2
    resolved, tokens_per_step = train.resolve_batch(cfg, 2)
    assert (tokens_per_step, resolved["grad_accum"], resolved["max_steps"]) == (2 * 32 * 2 * 2, 2, 6)
    resolved, _ = train.resolve_batch({**cfg, "max_tokens": 1000}, 2)
    assert resolved["max_steps"] == 3  # 1000 // 256


# -----------------------------------------------------------------------------
# end to end: torchrun with 2 ranks (gloo), config/tiny.py

# 128 tokens per step = 2 sequences x 32 tokens x 2 ranks: 1 micro-batch per rank on 2 ranks, 2 on 1 rank
BUDGET = ("--sampling=epoch", "--tokens_per_step=128")


def assert_same_params(a, b, rtol=1e-5, atol=1e-7):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow  # 2 torchruns ≈15 s
def test_zero_equals_replicated_adam(runs):
    plain, zero = ckpt(runs(*BUDGET, nproc=2)), ckpt(runs(*BUDGET, "--zero=True", nproc=2))
    assert zero["config"]["zero"] and not plain["config"]["zero"] and plain["step"] == zero["step"] == 6
    assert_same_params(plain["model"], zero["model"])
    # the optimizer state gathered from the shards is replicated Adam's
    assert plain["optimizer"]["state"].keys() == zero["optimizer"]["state"].keys()
    for i, s in plain["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(zero["optimizer"]["state"][i][k], s[k], rtol=1e-5, atol=1e-10)


@pytest.mark.slow  # 2 torchruns + the one above
def test_zero_resume_is_exact(runs, tiny_teacher, tiny_data, tmp_path):
    """6 steps with zero in one go = 3 steps, stop, resume to 6 (2 ranks each time): the same checkpoint."""
    out = str(tmp_path / "out")
    shutil.copytree(runs(*BUDGET, "--zero=True", nproc=2, stop_at=HALF), out)
    assert ckpt(out)["step"] == HALF
    r = train_py(f"--teacher={tiny_teacher}", f"--data_dir={tiny_data}", f"--out_dir={out}", "--resume=True",
                 *BUDGET, "--zero=True", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {os.path.join(out, 'ckpt.pt')} at step {HALF}" in r.stdout
    full_dir = runs(*BUDGET, "--zero=True", nproc=2)
    full, resumed = ckpt(full_dir), ckpt(out)
    assert resumed["step"] == full["step"] == 6
    assert_identical(resumed["model"], full["model"], "model")
    assert_identical(resumed["optimizer"], full["optimizer"], "optimizer")
    assert metrics(out) == metrics(full_dir)


@pytest.mark.slow  # a torchrun and a single-process run
def test_tokens_per_step_is_world_size_independent(runs):
    """1 rank x 2 micro-batches = 2 ranks x 1 with the same tokens_per_step and epoch sampling: the same global
    batch of windows every step, so the same training."""
    one, two = runs(*BUDGET), runs(*BUDGET, nproc=2)
    a, b = ckpt(one), ckpt(two)
    assert (a["config"]["grad_accum"], b["config"]["grad_accum"]) == (2, 1) and a["step"] == b["step"] == 6
    assert_same_params(a["model"], b["model"])
    for ra, rb in zip(metrics(one), metrics(two), strict=True):
        assert rb == pytest.approx(ra, rel=1e-5, abs=1e-7)


# -----------------------------------------------------------------------------
# logs as they happen

def test_logs_reach_a_redirected_stdout_before_an_error(tiny_teacher, tiny_data, tmp_path):
    """stdout and stderr into one file (a cluster job's log): the step lines come before the error that ends the
    run. With stdout block-buffered they would only be written at exit, after the error on stderr."""
    log = tmp_path / "job.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open(log, "w") as f:  # lr 1e30 from step 0: the loss is non-finite at step 1
        r = subprocess.run([sys.executable, "train.py", "config/tiny.py", f"--teacher={tiny_teacher}",
                            f"--data_dir={tiny_data}", f"--out_dir={tmp_path}/out", "--lr=1e30", "--log_interval=1"],
                           cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, stdout=f, stderr=subprocess.STDOUT,
                           timeout=300)
    lines = log.read_text().splitlines()
    assert r.returncode == 1, lines[-20:]
    error = next(i for i, line in enumerate(lines) if line.startswith("error: step "))
    evals = [i for i, line in enumerate(lines) if re.match(r"step \d+: val loss", line)]
    steps = [i for i, line in enumerate(lines) if re.match(r"step \d+ \| loss", line)]
    assert evals and steps, lines
    assert max(evals + steps) < error, lines


# -----------------------------------------------------------------------------
# LRC init 'pca': a student as wide as the teacher, a teacher with an all-zero embedding row

def test_pca_student_as_wide_as_the_teacher_loads_from_its_checkpoint(tiny_teacher, tmp_path):
    """d_S = d_T with init 'pca': U is a full rotation, so the student is the teacher; rebuilt from the checkpoint
    (common.load_student: projections left uninitialised for the checkpoint's weights, no calibration needed)."""
    teacher = Transformer.from_pretrained(tiny_teacher)
    d = teacher.config.hidden_size
    g = torch.Generator().manual_seed(0)
    lrc = LowRankClone(teacher, d, init="pca", calibration=torch.randint(0, 271, (8, 32), generator=g))
    cfg = {**train.DEFAULTS, "teacher": tiny_teacher, "d_student": d, "init": "pca"}
    common.save_checkpoint(str(tmp_path / "ckpt.pt"), lrc, None, 0, cfg)
    student, loaded_cfg = common.load_student(str(tmp_path))
    assert loaded_cfg == cfg and student.config.hidden_size == d
    idx = torch.randint(0, 271, (2, 24), generator=g)
    with torch.no_grad():
        assert torch.equal(student(idx)[0], lrc.student()(idx)[0])
        torch.testing.assert_close(student(idx)[0], teacher(idx)[0], rtol=1e-4, atol=1e-4)


def test_a_checkpoint_from_before_recompute_loads_its_student(tiny_teacher, tmp_path):
    """Checkpoints written before `checkpoint` became `recompute` hold the old key: their student
    still loads (sample.py, eval.py) and is the trained one."""
    teacher = Transformer.from_pretrained(tiny_teacher)
    torch.manual_seed(0)
    lrc = LowRankClone(teacher, 24)
    cfg = {**train.DEFAULTS, "teacher": tiny_teacher, "d_student": 24}
    cfg["checkpoint"] = cfg.pop("recompute")
    common.save_checkpoint(str(tmp_path / "ckpt.pt"), lrc, None, 0, cfg)
    student, _ = common.load_student(str(tmp_path))
    idx = torch.randint(0, 271, (2, 16))
    with torch.no_grad():
        assert torch.equal(student(idx)[0], lrc.student()(idx)[0])


def test_pca_on_a_teacher_with_an_all_zero_embedding_row(tiny_teacher):
    """A token whose embedding row is zero (an unused or pruned vocabulary entry) reaches the first RMSNorm as an
    all-zero vector; the calibration normalises it as the norm does (with eps), so the projections stay finite."""
    teacher = Transformer.from_pretrained(tiny_teacher)
    zero_token = 7
    with torch.no_grad():
        teacher.embed_tokens.weight[zero_token] = 0
    calibration = torch.randint(0, 271, (4, 32), generator=torch.Generator().manual_seed(0))
    calibration[:, ::5] = zero_token
    lrc = LowRankClone(teacher, 16, init="pca", calibration=calibration)
    assert all(torch.isfinite(p).all() for p in lrc.parameters())
    loss, _ = lrc(calibration[:, :-1], calibration[:, 1:])
    assert torch.isfinite(loss)


# -----------------------------------------------------------------------------
# evaluation builds logits a chunk of tokens at a time: the same numbers as whole logits

def test_chunked_evaluation_equals_whole_logits(monkeypatch, tiny_data, tiny_teacher):
    """train.evaluate (chunks of 7 tokens here, a short last one) against the metrics written out on whole
    [B, T, V] logits with torch's own functions: NLL of both models, per-token KL(p_T || p_S), agreement."""
    import losses
    from data import Batches
    torch.manual_seed(0)
    teacher = Transformer.from_pretrained(tiny_teacher)
    model = LowRankClone(teacher, 16)
    with torch.no_grad():
        for p in model.projections():
            p.normal_(std=0.15)
    batches = Batches(tiny_data, batch_size=2, block_size=32)
    monkeypatch.setitem(losses.HEAD_CHUNK_ELEMENTS, "cpu", 7 * teacher.config.vocab_size)
    ev = train.evaluate(model, batches, 3, torch.autocast("cpu", enabled=False))
    x = torch.cat([batches.get_batch("val", k)[0] for k in range(3)])
    y = torch.cat([batches.get_batch("val", k)[1] for k in range(3)])
    with torch.no_grad():
        s, t = model.student()(x)[0].flatten(0, 1), teacher(x)[0].flatten(0, 1)  # (N, V)
    kl = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum") / len(s)
    want = {"val_loss": torch.nn.functional.cross_entropy(s, y.flatten()).item(),
            "teacher_val_loss": torch.nn.functional.cross_entropy(t, y.flatten()).item(),
            "val_kl": kl.item(), "val_agreement": (s.argmax(-1) == t.argmax(-1)).float().mean().item()}
    assert 0 < want["val_agreement"] < 1 and want["val_kl"] > 1e-3  # a student that differs from its teacher
    for k, v in want.items():
        assert ev[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
