"""bench.py runs end to end on tiny sizes and its checks pass (the numbers themselves are not tested)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args):
    r = subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_head_plain_and_fused_agree():
    out = bench("head", "--vocab=300", "--tokens=64", "--d=16", "--d_teacher=32", "--temperature=2.0")
    assert "plain: logits + distill_losses + backward" in out and "fused: distill_head + backward" in out
    assert "agree: every relative difference <=" in out, out


@pytest.mark.slow
def test_step_table_has_a_row_per_variant(tiny_teacher):
    out = bench("step", "config/tiny.py", f"--teacher={tiny_teacher}", "--variants=fp32,bf16", "--warmup=0",
                "--iters=1", "--peak_tflops=1")
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("variant"))
    assert all(col in header for col in ("teacher ms", "head ms", "backward ms", "tok/s", "MFU", "peak mem"))
    rows = [line.split() for line in lines if line.startswith(("fp32 ", "bf16 "))]
    assert [r[:2] for r in rows] == [["fp32", "(float32)"], ["bf16", "(bfloat16)"]], out
    assert rows[0][-2:] == ["1.00", "1.00"] and any(c.endswith("%") for c in rows[0]), out  # ratios; MFU shown


def test_step_rejects_an_unknown_variant(tiny_teacher):
    r = subprocess.run([sys.executable, "bench.py", "step", "config/tiny.py", f"--teacher={tiny_teacher}",
                        "--variants=fp32,fp16"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown variant part 'fp16'" in r.stderr


def test_model_against_transformers(tiny_teacher):
    pytest.importorskip("transformers")
    out = bench("model", f"--teacher={tiny_teacher}", "--batch_size=2", "--block_size=16", "--new_tokens=8",
                "--warmup=0", "--iters=1")
    assert "ours/theirs" in out and "forward tok/s (2x16)" in out and "generate tok/s (batch 1, 8 new)" in out
    assert "greedy tokens identical for the first 8/8" in out, out
