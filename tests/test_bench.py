"""bench.py, memory.py and tools/official.py run end to end on tiny sizes and their checks pass (the
numbers themselves are not tested)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, timeout=300):
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def bench(*args):
    return run("bench.py", *args)


def test_head_plain_and_fused_agree():
    out = bench("head", "--vocab=300", "--tokens=64", "--d=16", "--d_teacher=32",
                "--temperature=2.0")
    assert "plain: logits + distill_losses + backward" in out
    assert "fused: distill_head + backward" in out
    assert "agree: every relative difference <=" in out, out


@pytest.mark.slow
def test_step_table_has_a_row_per_variant(tiny_teacher):
    out = bench("step", "config/tiny.py", f"--teacher={tiny_teacher}", "--variants=fp32,bf16",
                "--warmup=0", "--iters=1", "--peak_tflops=1")
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("variant"))
    for col in ("teacher ms", "head ms", "backward ms", "tok/s", "MFU", "peak mem"):
        assert col in header
    rows = [line.split() for line in lines if line.startswith(("fp32 ", "bf16 "))]
    assert [r[:2] for r in rows] == [["fp32", "(float32)"], ["bf16", "(bfloat16)"]], out
    # the ratios to the first row, and MFU shown
    assert rows[0][-2:] == ["1.00", "1.00"] and any(c.endswith("%") for c in rows[0]), out


def test_step_rejects_an_unknown_variant(tiny_teacher):
    r = subprocess.run([sys.executable, "bench.py", "step", "config/tiny.py",
                        f"--teacher={tiny_teacher}", "--variants=fp32,fp16"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown variant part 'fp16'" in r.stderr


def test_model_against_transformers(tiny_teacher):
    pytest.importorskip("transformers")
    out = bench("model", f"--teacher={tiny_teacher}", "--batch_size=2", "--block_size=16",
                "--new_tokens=8", "--warmup=0", "--iters=1")
    assert "ours/theirs" in out and "forward tok/s (2x16)" in out
    assert "generate tok/s (batch 1, 8 new)" in out
    assert "generate tok/s, compiled step (batch 1, 8 new)" in out
    # the eager step and the compiled step
    assert out.count("greedy tokens identical for the first 8/8") == 2, out


# -- memory.py: the dry run at the real shapes ----------------------------------------------------

@pytest.mark.parametrize("command", [
    ("bench.py", "memory", "config/lrc_qwen.py"),  # python bench.py memory: the same planner
    ("memory.py", "config/lrc_llama.py"),
    ("memory.py", "config/lrc_qwen_4b.py"),
    ("memory.py", "config/lrc_qwen3.py"),
])
def test_memory_dry_run_of_the_paper_recipes(command):
    out = run(*command)
    assert "Adam state" in out and "loss head" in out and "TFLOP per step" in out, out
    assert re.fullmatch(r"predicted peak per GPU: \d+\.\d{1,2} GiB", out.splitlines()[-1]), out


def test_memory_fails_on_a_collective_given_a_cpu_tensor(tiny_teacher):
    """A gradient all-reduce whose buffer is made on the CPU (a GPU-only bug) stops the dry run."""
    code = ("import sys, torch, torch.distributed as dist, memory, train\n"
            "train.all_reduce_mean = lambda tensors, world: dist.all_reduce(torch.zeros(len(tensors)))\n"
            f"memory.main(['config/tiny.py', '--teacher={tiny_teacher}', '--world_size=2'])\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0, r.stderr[-2000:]
    assert "a collective received a tensor on another device" in r.stderr, r.stderr[-2000:]


def test_memory_model_matches_a_real_cpu_run(tmp_path):
    """LiveBytes on fake tensors predicts the peak RSS of the same step + evaluation run for real on
    the CPU (a teacher big enough that tensors dominate the process's memory), within 15%."""
    import torch

    import bench
    import memory
    import train
    from model import ModelConfig, Transformer
    cfg = ModelConfig(model_type="qwen2", vocab_size=16384, hidden_size=512, intermediate_size=1536,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, attention_bias=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    Transformer(cfg).init_weights(0.02).save_pretrained(str(tmp_path))
    recipe = {**train.DEFAULTS, "teacher": str(tmp_path), "d_student": 256, "batch_size": 4,
              "block_size": 256, "device": "cpu", "dtype": "float32", "eval_batches": 1}
    r = bench.in_fresh_process(memory.measured_cpu, recipe)
    print(f"predicted {r['predicted'] / 2**20:.1f} MiB, measured {r['measured'] / 2**20:.1f} MiB")
    assert abs(r["predicted"] / r["measured"] - 1) < 0.15, r


# -- tools/official.py: the official code beside nanoLRC ------------------------------------------

def test_official_needs_a_checkout_of_the_official_code(tmp_path):
    """tools/official.py takes the official code's path (it is not a dependency): a wrong one is a
    clear error."""
    r = subprocess.run([sys.executable, "tools/official.py", f"--official_path={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "not a checkout of the official LRC code" in r.stderr
