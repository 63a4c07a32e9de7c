"""
train.py end to end, as users run it (subprocesses, CPU, fp32): a tiny Qwen2 teacher, config/tiny.py, seconds a run.

    python -m pytest tests/test_train.py            # ≈45 s on 2 idle cores (runs are shared per session)
    python -m pytest tests/test_train.py -m "not slow"

What is checked: DDP over 2 ranks = grad accumulation over 2 micro-batches; resuming is bit-exact; a checkpoint
survives a kill mid-write; a corrupt checkpoint, a non-finite loss, bad config keys and bad data stop with a
clear message and leave the last good checkpoint alone; the exported student equals the checkpointed one.
"""
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

import common
import train
from data import prepare
from model import Transformer
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("tokens_per_s", "mfu")  # wall-clock fields of metrics.jsonl: the only ones allowed to differ
HALF = 3  # config/tiny.py: max_steps 6, checkpoints and evals every 3 steps


def train_py(*args, nproc=1, stop_at=0, env=None):
    """Run `python train.py config/tiny.py ARGS` (or torchrun with nproc ranks) from the repo root;
    stop_at > 0: saved at that step and exited, as a preemption would (train.py's NANOLRC_STOP_AT)."""
    launch = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    # the same threads in every run: bit-exact comparisons
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("NANOLRC_STOP_AT", None)
    if stop_at:
        env["NANOLRC_STOP_AT"] = str(stop_at)
    return subprocess.run([*launch, "train.py", "config/tiny.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def write_text(path, n_docs=60, n_words=40):
    words = "the and world in a or he an light day night earth water heaven".split()
    rnd = random.Random(0)
    path.write_text("\n\n".join(" ".join(rnd.choice(words) for _ in range(n_words)) for _ in range(n_docs)))
    return str(path)


def resume(out, tiny_teacher, tiny_data, *args):
    return train_py(f"--teacher={tiny_teacher}", f"--data_dir={tiny_data}", f"--out_dir={out}", "--resume=True",
                    *args)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)


def assert_identical(a, b, where=""):
    """Nested dicts / lists of tensors and plain values, equal to the bit."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def file_state(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns


def check_export(out):
    """out_dir/student is an HF dir whose logits equal those of the student rebuilt from ckpt.pt."""
    student_dir = os.path.join(out, "student")
    exported = Transformer.from_pretrained(student_dir)
    rebuilt, cfg = common.load_student(out)
    assert exported.config.hidden_size == cfg["d_student"] == 16
    idx = torch.randint(0, 271, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(idx)[0], rebuilt(idx)[0])
    assert load_tokenizer(student_dir).vocab_size == 271  # the teacher's tokenizer travels with the student


# -----------------------------------------------------------------------------
# runs that finish

def test_smoke(runs):
    out = runs()
    rows = metrics(out)
    assert rows[-1]["step"] == 6 and all(v == v for v in rows[-1].values())  # final eval, no NaN
    assert ckpt(out)["step"] == 6
    check_export(out)


@pytest.mark.slow  # torchrun start-up ≈7 s
def test_smoke_torchrun(runs):
    out = runs("--grad_accum=1", nproc=2)
    assert ckpt(out)["step"] == 6
    check_export(out)


@pytest.mark.slow  # a torchrun and a single-process run
def test_ddp_equals_grad_accum(runs):
    """2 ranks x 1 micro-batch = 1 rank x 2 micro-batches: Batches draws micro-batch (micro_step * world_size +
    rank) of the global batch, so both see the same windows; the loss is a mean per micro-batch divided by
    grad_accum and DDP averages gradients over ranks, so the gradients are the same too."""
    single, ddp = runs(), runs("--grad_accum=1", nproc=2)
    a, b = ckpt(single), ckpt(ddp)
    assert (a["config"]["grad_accum"], b["config"]["grad_accum"]) == (2, 1) and a["step"] == b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{k}: {m}")
    # the logged losses are the global batch's too (all-reduced over ranks), and so are the evals
    rows_a, rows_b = metrics(single), metrics(ddp)
    assert [r.keys() for r in rows_a] == [r.keys() for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert rb == pytest.approx(ra, rel=1e-5, abs=1e-7)



@pytest.mark.slow  # a torchrun and a single-process run
def test_pca_init_is_the_same_on_every_rank(runs):
    """init='pca' measures the teacher on the same train windows on every rank, so 2 ranks x 1 micro-batch
    start and end where 1 rank x 2 micro-batches do; and it starts nearer the teacher than init 'normal'."""
    single, ddp = runs("--init=pca"), runs("--init=pca", "--grad_accum=1", nproc=2)
    a, b = ckpt(single), ckpt(ddp)
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    first = [metrics(out)[0] for out in (single, ddp, runs())]
    assert first[0]["step"] == 0 and first[1]["val_kl"] == pytest.approx(first[0]["val_kl"], rel=1e-5)
    assert first[0]["val_kl"] < 0.7 * first[2]["val_kl"], first  # 0.14 vs 0.25 on this random teacher

def test_resume_is_exact(runs, halfway, tiny_teacher, tiny_data):
    """6 steps in one go = 3 steps, stop, resume to 6: the same metrics rows and checkpoint to the bit."""
    assert ckpt(halfway)["step"] == HALF and not os.path.exists(os.path.join(halfway, "student"))
    r = resume(halfway, tiny_teacher, tiny_data)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {os.path.join(halfway, 'ckpt.pt')} at step {HALF}" in r.stdout
    full = runs()
    assert metrics(halfway) == metrics(full)
    a, b = ckpt(full), ckpt(halfway)
    assert_identical(b["model"], a["model"], "model")
    assert_identical(b["optimizer"], a["optimizer"], "optimizer")
    assert b["step"] == a["step"] == 6
    for name in ("model.safetensors", "config.json"):
        with open(os.path.join(full, "student", name), "rb") as fa, \
                open(os.path.join(halfway, "student", name), "rb") as fb:
            assert fa.read() == fb.read(), name


# -----------------------------------------------------------------------------
# crashes and bad checkpoints

# save_checkpoint of a run whose torch.save stalls halfway through the file, until the test SIGKILLs it
KILLED_SAVE = r"""
import io, os, sys, time
import torch
import common
import train
out = sys.argv[1]
ck = common.load_checkpoint(out)
model = common.build_model(ck["config"], "cpu", "float32")
model.load_state_dict(ck["model"])
optimizer = train.make_optimizer(model, ck["config"])
optimizer.load_state_dict(ck["optimizer"])
real_save = torch.save
def stalled_save(obj, f):
    buf = io.BytesIO()
    real_save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # f: the open ckpt.pt.tmp
    f.flush()
    print("half written", flush=True)
    time.sleep(300)
torch.save = stalled_save
common.save_checkpoint(os.path.join(out, "ckpt.pt"), model, optimizer, ck["step"] + 1, ck["config"])
"""


def test_kill_during_checkpoint_write(runs, halfway, tiny_teacher, tiny_data):
    path = os.path.join(halfway, "ckpt.pt")
    before = file_state(path)
    p = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, halfway], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = p.stdout.readline()
        assert line == "half written\n", p.stderr.read() if p.poll() is not None else line
    finally:
        p.kill()  # SIGKILL
        p.communicate()
    # the half-written file is the temporary one; the checkpoint is the one from before
    with pytest.raises(ValueError, match="unreadable"):
        common.load_checkpoint(path + ".tmp")
    assert file_state(path) == before
    r = resume(halfway, tiny_teacher, tiny_data)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not os.path.exists(path + ".tmp")  # the next save went through the .tmp file and renamed it
    assert_identical(ckpt(halfway)["model"], ckpt(runs())["model"], "model")


def test_corrupt_checkpoint(halfway, tiny_teacher, tiny_data):
    """A truncated ckpt.pt (say, a copy cut short): a clear error, and the file is left for the user."""
    path = os.path.join(halfway, "ckpt.pt")
    with open(path, "rb") as f:
        good = f.read()
    with open(path, "wb") as f:
        f.write(good[: len(good) // 2])
    before = file_state(path)
    r = resume(halfway, tiny_teacher, tiny_data)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert f"checkpoint {path} is unreadable" in r.stderr and "move it away" in r.stderr
    assert file_state(path) == before
    assert not os.path.exists(os.path.join(halfway, "student"))


def test_nonfinite_loss_stops(halfway, tiny_teacher, tiny_data):
    """lr 1e30 from step 3 on: the weights blow up, and with skip_nonfinite 0 the run stops at the first
    non-finite loss without touching the step-3 checkpoint (nor rewriting it on resume)."""
    path = os.path.join(halfway, "ckpt.pt")
    before = file_state(path)
    r = resume(halfway, tiny_teacher, tiny_data, "--lr=1e30", "--skip_nonfinite=0")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    m = re.search(r"error: step (\d+): non-finite \{.*'loss': (inf|-inf|nan)", r.stderr)
    assert m and int(m.group(1)) > HALF, r.stderr[-3000:]
    assert "the last good checkpoint" in r.stderr and "lower lr" in r.stderr
    assert file_state(path) == before
    assert not os.path.exists(os.path.join(halfway, "student"))


# -----------------------------------------------------------------------------
# clear errors for bad configs and data

@pytest.mark.parametrize("arg, code, message", [
    ("--lrr=1e-3", 2, "unknown config key 'lrr'; did you mean 'lr'?"),
    ("--batch_size=2.5", 2, "config key 'batch_size' expects int, got float 2.5"),
    ("--teacher={tmp}/missing", 1, "teacher dir '{tmp}/missing' does not exist: set --teacher=HF_DIR"),
    ("--data_dir={tmp}/missing", 1, "{tmp}/missing holds no prepared data (no meta.json)"),
    ("--resume=True", 1, "no checkpoint at {tmp}/out/ckpt.pt"),
    ("--resume=maybe", 2, "--resume=maybe: choose True, False or auto"),
    ("--block_size=100000", 1, "fewer than one block of 100000+1"),
])
def test_config_errors(tiny_teacher, tiny_data, tmp_path, arg, code, message):
    r = train_py(f"--teacher={tiny_teacher}", f"--data_dir={tiny_data}", f"--out_dir={tmp_path}/out",
                 arg.format(tmp=tmp_path))
    assert r.returncode == code, r.stderr[-3000:]
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert message.format(tmp=tmp_path) in r.stderr


def test_data_of_another_tokenizer(tiny_teacher, make_tokenizer_dir, tmp_path):
    other = load_tokenizer(make_tokenizer_dir(merges=["Ġ t", "h e"]))
    prepare(other, [{"path": write_text(tmp_path / "a.txt")}], str(tmp_path / "bin"), val_fraction=0.1)
    r = train_py(f"--teacher={tiny_teacher}", f"--data_dir={tmp_path}/bin", f"--out_dir={tmp_path}/out")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "was tokenized with a different tokenizer" in r.stderr and "prepare it again" in r.stderr


def test_data_too_short(tiny_teacher, tmp_path):
    """Two short documents, shorter together than one block of 32 + 1 tokens: refused with what to do."""
    tok = load_tokenizer(tiny_teacher)
    prepare(tok, [{"path": write_text(tmp_path / "a.txt", n_docs=2, n_words=5)}], str(tmp_path / "bin"),
            val_fraction=0.0)
    r = train_py(f"--teacher={tiny_teacher}", f"--data_dir={tmp_path}/bin", f"--out_dir={tmp_path}/out")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.search(r"the train split has \d+ tokens, fewer than one block of 32\+1; add data", r.stderr)


def test_new_run_never_overwrites_a_checkpoint(runs, halfway, tiny_teacher, tiny_data):
    before = file_state(os.path.join(halfway, "ckpt.pt"))
    r = train_py(f"--teacher={tiny_teacher}", f"--data_dir={tiny_data}", f"--out_dir={halfway}")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "exists: pass --resume=True" in r.stderr
    assert file_state(os.path.join(halfway, "ckpt.pt")) == before


def test_cpu_buffers_are_reused_without_page_faults():
    """On CPU, common.resolve_system keeps freed memory for reuse (common.keep_freed_memory): allocating and freeing
    the same two 40 MB buffers 10 times faults their pages in once, not at every round as with glibc's defaults
    (blocks above 32 MB are always mmapped, and unmapped at free). Counted by the OS (minor page faults of the
    process), in a fresh process, since the setting is process-wide."""
    code = """
import resource, torch, common
def faults():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        xs = [torch.ones(10 << 20) for _ in range(2)]  # 2 x 40 MB, freed together
        del xs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
before = faults()
common.resolve_system({"device": "cpu", "dtype": "float32"})
faults()  # the first round after the change maps the memory once more
print(before, faults())
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    before, after = map(int, r.stdout.split())
    assert before > 9 * 2 * 10240, (before, after)  # glibc's defaults: each round faults its 2 x 10,240 pages in
    assert after < before / 20, (before, after)



def test_a_checkpoint_with_the_norms_in_a_second_optimizer_group_resumes():
    """Checkpoints written when Adam kept the RMSNorm weights in a group of their own (after the
    other parameters) load into today's single group: the same state per parameter, and the next
    step gives the weights the old optimizer's next step gives."""
    import copy
    from model import RMSNorm
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), RMSNorm(8, 1e-6), torch.nn.Linear(8, 4))
    norm = set(model[1].parameters())
    old = torch.optim.Adam([{"params": [p for p in model.parameters() if p not in norm], "lr_mult": 1.0},
                            {"params": list(norm), "lr_mult": 1.0}], lr=1e-2)
    x = torch.randn(16, 8)

    def step(optimizer):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for _ in range(2):
        step(old)
    saved = copy.deepcopy(old.state_dict())
    new = train.make_optimizer(model, {**train.DEFAULTS, "lr": 1e-2})
    new.load_state_dict(train.one_group(saved, model))
    for p in model.parameters():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(new.state[p][k], old.state[p][k]), k
    start = [p.detach().clone() for p in model.parameters()]
    step(old)
    by_old = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    step(new)
    assert all(torch.equal(p, o) for p, o in zip(model.parameters(), by_old))
    assert not all(torch.equal(s, o) for s, o in zip(start, by_old))  # the step did move the weights
