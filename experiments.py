"""
Small-scale experiments on the CPU demo teacher (SmolLM2-135M-Instruct) and corpus (KJV), one run at a time:

    python experiments.py baselines      # LRC, its ablations, vanilla KD, TinyBERT, LM-only at equal size and tokens
    python experiments.py efficiency     # the paper's LRC recipe against the distillation-efficiency options
    python experiments.py efficiency --tokens=200000 --only="paper,scale-free clone"
    python experiments.py efficiency --minutes=12.5 --only="paper,demo recipe"   # the demo's budget per run

Each run is `python train.py config/lrc_demo.py <overrides>` into out/experiments/<set>/<run>. The script then
evaluates every exported student on the demo val split and on held-out text it never trained on (Debian's
/usr/share/common-licenses), and writes results/<set>.md (a table) and results/<set>.png (val loss against
tokens; needs matplotlib, an optional extra). Runs already finished are reused: delete their dir to redo one.
"""
import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch

import demo
from configurator import run_or_exit
from data import Batches, prepare
from lrc import LowRankClone
from model import Transformer
from tokenizer import load_tokenizer
from train import DEFAULTS, calibration_tokens, evaluate

# run name -> train.py overrides, on top of config/lrc_demo.py (the demo's own recipe)
RANDOM = ["--init=normal", "--lr=1e-3"]  # the paper's N(0, 0.02) projections, at the lr they needed here
PAPER = ["--clone_norm=none", "--clone_skip=0", "--temperature=40.0", "--kl_reduction=batchmean", "--alpha=0.5",
         "--norm_lr_mult=1.0", *RANDOM]
# init 'pca' starts near the teacher: lr 1e-5 (1e-4 undid the init in one Adam step), KL at T=1 per token
PCA = ["--init=pca", "--lr=1e-5", "--clone_norm=target", "--clone_skip=0", "--temperature=1.0", "--kl_reduction=token",
       "--norm_lr_mult=1.0"]
# the baselines were run with the demo's recipe before init 'pca': random start, lr 1e-3, scale-free clone
RANDOM_START = [*RANDOM, "--alpha=0.5", "--temperature=40.0", "--kl_reduction=batchmean", "--clone_norm=target"]
# init 'pca''s step-0 student, exported (pca_student): the same start for KD of all its weights
PCA_STUDENT = os.path.join("out", "experiments", "pca_student")
SETS = {
    "baselines": {
        "LRC": RANDOM_START,
        "LRC w/o FFN clone": ["config/ablation_no_ffn.py", *RANDOM_START],
        "LRC w/o attention clone": ["config/ablation_no_attn.py", *RANDOM_START],
        "LRC w/o clone": ["config/ablation_no_clone.py", *RANDOM_START],
        "Vanilla KD": ["--method=kd", *RANDOM_START],
        "TinyBERT": ["--method=tinybert", *RANDOM_START],
        "LM only": ["--method=lm", *RANDOM_START],
    },
    "efficiency": {
        "paper": PAPER,
        "scale-free clone": ["--clone_norm=target", *PAPER[1:]],
        "scale-free clone + KL T=1 per token": ["--clone_norm=target", "--clone_skip=0", "--temperature=1.0",
                                               "--kl_reduction=token", "--alpha=0.5", "--norm_lr_mult=1.0", *RANDOM],
        "+ skip sink position": ["--clone_norm=target", "--clone_skip=1", "--temperature=1.0",
                                 "--kl_reduction=token", "--alpha=0.5", "--norm_lr_mult=1.0", *RANDOM],
        "+ lr 3e-3": ["--clone_norm=target", "--clone_skip=0", "--temperature=1.0", "--kl_reduction=token",
                      "--alpha=0.5", "--norm_lr_mult=1.0", "--init=normal", "--lr=3e-3"],
        "pca init + paper loss": [*PAPER, "--init=pca", "--lr=1e-5"],
        "pca init + paper KL": [*PCA, "--temperature=40.0", "--kl_reduction=batchmean", "--alpha=0.5"],
        "pca init": [*PCA, "--alpha=0.5"],
        "pca init w/o clone": [*PCA, "--alpha=0"],
        "pca init w/o clone + lr 3e-5": [*PCA, "--alpha=0", "--lr=3e-5", "--warmup_ratio=0.1"],
        "pca init + lr 3e-5": [*PCA, "--alpha=0.5", "--lr=3e-5", "--warmup_ratio=0.1"],
        "pca init w/o clone + lr 1e-4": [*PCA, "--alpha=0", "--lr=1e-4", "--warmup_ratio=0.1"],
        "KD of the pca student + lr 3e-5": ["--method=kd", f"--init_from={PCA_STUDENT}", *PCA, "--alpha_kl=0.5",
                                            "--lr=3e-5", "--warmup_ratio=0.1"],
        "demo recipe": [],
    },
}


def pca_student(teacher, teacher_dir, data_dir):
    """Export the student of init 'pca' at step 0 (train.py's calibration windows) to PCA_STUDENT, once."""
    if not os.path.isdir(PCA_STUDENT):
        cfg = {**DEFAULTS, "data_dir": data_dir, "batch_size": 8, "block_size": 256}
        LowRankClone(teacher, 288, init="pca", calibration=calibration_tokens(cfg, "cpu")).export(
            PCA_STUDENT, tokenizer_dir=teacher_dir)


def held_out_data(tokenizer):
    """Debian's licence texts, tokenised with the teacher's tokenizer: text the students never saw."""
    out = demo.cache_dir("data-licenses-" + tokenizer.fingerprint[:12])
    if not os.path.isfile(os.path.join(out, "meta.json")):
        files = sorted(f for f in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(f))
        if not files:
            raise FileNotFoundError("/usr/share/common-licenses is empty: install Debian's base-files")
        with tempfile.TemporaryDirectory() as tmp:
            text_path = os.path.join(tmp, "licenses.txt")  # paragraphs become documents; half go to val (used)
            with open(text_path, "w", encoding="utf-8") as f:
                f.write("\n\n".join(open(p, encoding="utf-8", errors="replace").read() for p in files))
            prepare(tokenizer, [{"path": text_path}], out, val_fraction=0.5, seed=0, overwrite=True)
    return out


def run(name, overrides, out_dir, teacher, data_dir, tokens, minutes):
    if minutes:  # the demo's budget: its steps, compiled, stopped by wall time
        budget = [f"--max_minutes={minutes}"]
    else:  # equal tokens, eager: no compile time
        steps = tokens // (8 * 256)
        budget = [f"--max_steps={steps}", "--max_minutes=0", f"--eval_interval={max(1, steps // 5)}",
                  f"--ckpt_interval={steps}", "--compile=False", "--warmup_ratio=0.02"]
    files = [o for o in overrides if o.endswith(".py")]  # config files first: the flags below must win
    args = [sys.executable, "train.py", "config/lrc_demo.py", *files, f"--teacher={teacher}",
            f"--data_dir={data_dir}", f"--out_dir={out_dir}", *budget, *(o for o in overrides if not o.endswith(".py"))]
    if os.path.isdir(os.path.join(out_dir, "student")):
        return
    if os.path.exists(os.path.join(out_dir, "ckpt.pt")):  # a run that failed or was stopped: go on from it
        args.append("--resume=True")
    print(f"--- {name}: {' '.join(args[2:])}", flush=True)
    t0 = time.time()
    with open(out_dir + ".log", "a") as log:
        code = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f"run {name!r} failed (exit status {code}): see the end of {out_dir}.log; finished runs "
                           "are kept and this one resumes from its checkpoint when the same command runs again")
    with open(os.path.join(out_dir, "wall_time"), "w") as f:
        f.write(f"{time.time() - t0:.0f}")


def summarise(name, out_dir, teacher, held_out):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if "val_loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    student = Transformer.from_pretrained(os.path.join(out_dir, "student"))
    model = SimpleNamespace(student=lambda: student, teacher=teacher)
    held = evaluate(model, held_out, 4, nullcontext())
    with open(os.path.join(out_dir, "wall_time")) as f:
        wall = float(f.read())
    first, last = evals[0], evals[-1]
    spikes = sum(b > 10 * sorted(losses[max(0, i - 10):i + 1])[len(losses[max(0, i - 10):i + 1]) // 2]
                 for i, b in enumerate(losses))
    return {"run": name, "tokens": last["tokens"], "wall_min": wall / 60, "val_loss_0": first["val_loss"],
            "val_loss": last["val_loss"], "val_kl": last.get("val_kl", float("nan")),
            "agreement": last.get("val_agreement", float("nan")),
            "teacher_val_loss": last.get("teacher_val_loss", float("nan")), "held_loss": held["val_loss"],
            "held_kl": held["val_kl"],
            "held_agreement": held["val_agreement"], "teacher_held_loss": held["teacher_val_loss"],
            "loss_spikes": spikes, "curve": [(r["tokens"], r["val_loss"]) for r in evals]}


def write_results(set_name, rows, command):
    os.makedirs("results", exist_ok=True)
    lines = [f"Regenerate: `{command}`", "",
             "| run | tokens | wall (min) | val loss step 0 → end | KL | top-1 agreement | held-out loss | "
             "held-out KL | held-out agreement | loss spikes >10× median |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['tokens']:,} | {r['wall_min']:.1f} | {r['val_loss_0']:.2f} → "
                     f"{r['val_loss']:.2f} | {r['val_kl']:.2f} | {r['agreement']:.1%} | {r['held_loss']:.2f} | "
                     f"{r['held_kl']:.2f} | {r['held_agreement']:.1%} | {r['loss_spikes']} |")
    lines += ["", f"Teacher: val loss {rows[0]['teacher_val_loss']:.2f} (KJV), {rows[0]['teacher_held_loss']:.2f} "
              "(held-out licence texts). KL is per token at T=1, teacher ‖ student."]
    with open(f"results/{set_name}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(f"results/{set_name}.json", "w") as f:
        json.dump(rows, f, indent=1)
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.plot(*zip(*r["curve"]), marker="o", ms=3, label=r["run"])
    ax.axhline(rows[0]["teacher_val_loss"], color="gray", ls="--", label="teacher")
    ax.set(xlabel="training tokens", ylabel="val loss (KJV)", title=f"nanoLRC {set_name} (SmolLM2-135M teacher)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"results/{set_name}.png", dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("set", choices=SETS)
    p.add_argument("--tokens", type=int, default=150_000, help="training tokens per run (equal for all)")
    p.add_argument("--minutes", type=float, default=0, help="> 0: instead of --tokens, the demo's recipe with this "
                   "wall-time bound per run (compiled, as python demo.py runs); results/<set>-<minutes>min.md")
    p.add_argument("--only", default="", help="comma-separated run names (default: all of the set)")
    args = p.parse_args()
    if args.tokens < 8 * 256 and not args.minutes:  # run() trains tokens // (8 * 256) steps
        raise ValueError(f"--tokens={args.tokens}: at least 2048 (one step of 8 x 256 tokens)")
    if args.minutes < 0:
        raise ValueError(f"--minutes={args.minutes}: must be >= 0 (0: --tokens sets the budget)")
    unknown = [n for n in args.only.split(",") if n and n not in SETS[args.set]]
    if unknown:
        raise ValueError(f"--only: no run named {unknown[0]!r} in the set {args.set!r}; "
                         f"its runs: {list(SETS[args.set])}")
    teacher_dir = demo.convert_teacher()
    tokenizer = load_tokenizer(teacher_dir)
    data_dir = demo.prepare_corpus(tokenizer)
    held_out = Batches(held_out_data(tokenizer), batch_size=8, block_size=256)
    teacher = Transformer.from_pretrained(teacher_dir)
    names = [n for n in SETS[args.set] if not args.only or n in args.only.split(",")]
    if any(f"--init_from={PCA_STUDENT}" in SETS[args.set][n] for n in names):
        pca_student(teacher, teacher_dir, data_dir)
    rows, set_name = [], args.set + (f"-{args.minutes:g}min" if args.minutes else "")
    for name in names:
        out_dir = os.path.join("out", "experiments", set_name, name.replace(" ", "_").replace("/", ""))
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        run(name, SETS[args.set][name], out_dir, teacher_dir, data_dir, args.tokens, args.minutes)
        rows.append(summarise(name, out_dir, teacher, held_out))
    write_results(set_name, rows, "python " + shlex.join(sys.argv))


if __name__ == "__main__":
    run_or_exit(main)
