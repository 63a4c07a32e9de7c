"""
Smoke checks: every path that only a GPU takes, end to end as a user runs it, on a small random
teacher written on the spot (no download): torchrun (1 process; 2 with 2+ GPUs, there with zero,
epoch sampling and a wall-time stop), bf16 autocast, torch.compile, evaluation, a checkpoint, a
preemption (NANOLRC_STOP_AT) and --resume, export, sample.py from the export and from the
checkpoint. Run it first on a new cluster (a few minutes on one GPU; -s prints a line per check):

    python -m pytest -q -m gpu tests/test_smoke.py      # CUDA: nccl, compiled, 20 steps
    python -m pytest -q tests/test_smoke.py -k cpu      # the same checks on the CPU: gloo, eager

The GPU test skips without CUDA; the CPU one runs in the suite (marked slow).
"""
import os
import subprocess
import sys
import time

import pytest
import torch

from data import prepare
from fixtures import tiny_teacher_config, write_random_teacher
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_corpus(out):
    """This repository's own text (README, code) as the training corpus: English and code, always
    present."""
    path = os.path.join(out, "corpus.txt")
    names = sorted(n for n in os.listdir(ROOT) if n.endswith((".py", ".md")))
    with open(path, "w") as f:
        for name in names:
            with open(os.path.join(ROOT, name)) as src:
                f.write(src.read() + "\n\n")
    return path


def smoke_checks(out, device, compile, steps, nproc):
    """(name, command, environment variables, text its stdout must hold) of each check, in the order
    they run: a check reads what the ones before it wrote (the checkpoint, the export)."""
    teacher = write_random_teacher(os.path.join(out, "teacher"), tiny_teacher_config())
    data = os.path.join(out, "data")
    prepare(load_tokenizer(teacher), [{"path": smoke_corpus(out)}], data, val_fraction=0.05)
    n, half = steps, steps // 2
    train_args = [f"--teacher={teacher}", f"--data_dir={data}", f"--device={device}",
                  "--dtype=bfloat16", "--d_student=128", "--batch_size=4", "--block_size=128",
                  "--tokens_per_step=1024", f"--max_steps={n}", f"--eval_interval={half}",
                  "--eval_batches=2", "--log_interval=5", f"--ckpt_interval={half}",
                  f"--compile={compile}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    run_dir, zero_dir = os.path.join(out, "run"), os.path.join(out, "zero")
    sample = [sys.executable, "sample.py", "--prompt=def ", "--max_new_tokens=16",
              "--temperature=0", f"--device={device}"]
    one = [*torchrun, "--nproc_per_node=1", "train.py", *train_args, f"--out_dir={run_dir}"]
    checks = [
        ("torchrun x1: compile, bf16, eval, checkpoint, preemption", one,
         {"NANOLRC_STOP_AT": str(half)}, f"stopped at step {half}"),
        ("torchrun x1: --resume, eval, export", [*one, "--resume=True"], {},
         f"exported the student to {run_dir}/student after {n} steps"),
        ("sample.py from the exported student", [*sample, f"--model={run_dir}/student"], {}, "def "),
        ("sample.py from the checkpoint", [*sample, f"--model={run_dir}/ckpt.pt"], {}, "def "),
    ]
    if nproc >= 2:
        checks.append((f"torchrun x{nproc}: zero, epoch sampling, wall-time stop, export", [
            *torchrun, f"--nproc_per_node={nproc}", "train.py", *train_args,
            f"--out_dir={zero_dir}", "--zero=True", "--sampling=epoch", "--max_minutes=0.5",
            "--max_steps=100000"], {}, "exported the student"))
    return checks


def failed_checks(checks):
    """Run every check, even after a failure (the report then shows all of them); one line each, and
    the command and output tail of each one that failed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    failed = []
    for name, cmd, extra, expect in checks:
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, env={**env, **extra}, capture_output=True, text=True)
        ok = r.returncode == 0 and expect in r.stdout
        print(f"{'ok  ' if ok else 'FAIL'} {time.time() - t0:6.1f} s  {name}")
        last = [line for line in r.stdout.splitlines() if line.startswith("step ")][-1:]
        print("\n".join(f"       {line}" for line in last))
        if not ok:
            tail = "\n".join("       " + line for line in (r.stdout + r.stderr).splitlines()[-25:])
            env_text = "".join(f"{k}={v} " for k, v in extra.items())
            failed.append(f"FAIL {name}\n       $ {env_text}{' '.join(cmd)}\n{tail}")
    return failed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_smoke_on_gpu(tmp_path):
    nproc = 2 if torch.cuda.device_count() >= 2 else 1
    checks = smoke_checks(str(tmp_path), "cuda", compile=True, steps=20, nproc=nproc)
    failed = failed_checks(checks)
    assert not failed, f"{len(failed)} of {len(checks)} checks failed:\n" + "\n".join(failed)


@pytest.mark.slow  # 2 torchruns and 2 sample.py runs
def test_smoke_on_cpu(tmp_path):
    """The same checks with gloo, eager and 4 steps: all but the 2-process one (it needs 2 GPUs)."""
    checks = smoke_checks(str(tmp_path), "cpu", compile=False, steps=4, nproc=1)
    assert len(checks) == 4
    failed = failed_checks(checks)
    assert not failed, f"{len(failed)} of {len(checks)} checks failed:\n" + "\n".join(failed)
