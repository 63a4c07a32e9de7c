"""
Small-scale experiments on the CPU demo's teacher (SmolLM2-135M-Instruct) and corpus (the teacher's
own text: its general English and chats, as python demo.py builds it), one run at a time:

    python experiments.py --set=baselines   # LRC, its ablations, vanilla KD, TinyBERT, LM-only at
                                            # equal size and tokens
    python experiments.py --set=efficiency  # the paper's LRC recipe against the efficiency options
    python experiments.py --set=efficiency --tokens=200000 --only="paper,scale-free clone"
    python experiments.py --set=efficiency --minutes=12.5 --only="paper,demo recipe"  # the demo's
                                                                                    # budget per run
    python experiments.py --set=comparison --seeds=3  # the paper's comparisons from the teacher's
                                                      # weights, mean ± std

Keys are set as in every script (configurator.py; python experiments.py --help lists them). Each run
is `python train.py config/lrc_demo.py <overrides>` into out/experiments/<set>/<run>. The script
then evaluates every exported student on the demo val split and on held-out text it never trained
on (Debian's /usr/share/common-licenses), and writes results/<set>.md (a table) and
results/<set>.png (val loss against tokens; needs matplotlib, an optional extra). With --seeds=N
every run is repeated with seeds 1337, 1338, ... (data order and calibration windows;
<run>-seed<k> beside <run>), and the table and the plot give mean ± std. Runs already finished are
reused: delete their dir to redo one.
"""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch

import demo
from configurator import ConfigError, check_ranges, configure_or_exit, run_or_exit
from data import Batches, partial_dir, prepare
from lrc import LowRankClone
from model import Transformer
from tokenizer import load_tokenizer
from train import DEFAULTS as TRAIN_DEFAULTS, calibration_tokens, evaluate

# run name -> train.py overrides, on top of config/lrc_demo.py (the demo's own recipe)
RANDOM = ["--init=normal", "--lr=1e-3"]  # the paper's N(0, 0.02) projections, at the lr they need
PAPER = ["--clone_norm=none", "--clone_skip=0", "--temperature=40.0", "--kl_reduction=batchmean",
         "--alpha=0.5", *RANDOM]
# init 'pca' starts near the teacher: a small lr (a large one undoes the init in one Adam step),
# KL at T=1 per token
PCA = ["--init=pca", "--lr=1e-5", "--clone_norm=target", "--clone_skip=0", "--temperature=1.0",
       "--kl_reduction=token"]
# the baselines' shared recipe: random start, lr 1e-3, scale-free clone (see results/baselines.md)
RANDOM_START = [*RANDOM, "--alpha=0.5", "--temperature=40.0", "--kl_reduction=batchmean",
                "--clone_norm=target"]
# --init_from=start:INIT: LRC's step-0 student of that init, exported (start_student), to train all
# its weights
START = "start:"
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
        "scale-free clone + KL T=1 per token": ["--clone_norm=target", "--clone_skip=0",
                                                "--temperature=1.0", "--kl_reduction=token",
                                                "--alpha=0.5", *RANDOM],
        "+ skip sink position": ["--clone_norm=target", "--clone_skip=1", "--temperature=1.0",
                                 "--kl_reduction=token", "--alpha=0.5", *RANDOM],
        "+ lr 3e-3": ["--clone_norm=target", "--clone_skip=0", "--temperature=1.0",
                      "--kl_reduction=token", "--alpha=0.5", "--init=normal", "--lr=3e-3"],
        "pca init + paper loss": [*PAPER, "--init=pca", "--lr=1e-5"],
        "pca init + paper KL": [*PCA, "--temperature=40.0", "--kl_reduction=batchmean",
                                "--alpha=0.5"],
        "pca init": [*PCA, "--alpha=0.5"],
        "pca init w/o clone": [*PCA, "--alpha=0"],
        "pca init w/o clone + lr 3e-5": [*PCA, "--alpha=0", "--lr=3e-5", "--warmup_ratio=0.1"],
        "pca init + lr 3e-5": [*PCA, "--alpha=0.5", "--lr=3e-5", "--warmup_ratio=0.1"],
        "pca init w/o clone + lr 1e-4": [*PCA, "--alpha=0", "--lr=1e-4", "--warmup_ratio=0.1"],
        "KD of the pca student + lr 3e-5": ["--method=kd", f"--init_from={START}pca", *PCA,
                                            "--alpha_kl=0.5", "--lr=3e-5", "--warmup_ratio=0.1"],
        "demo recipe": [],
    },
    # the paper's comparisons (Sec. 5) at equal tokens, every student but TinyBERT's starting from
    # the teacher's weights, with the demo's recipe (clone init on 32 train windows, KL at T=1 per
    # token + LM, lr 3e-5)
    "comparison": {
        "LRC": ["--alpha=0.02"],  # clone loss on, each term / its target's mean square
        "LRC w/o clone loss": [],  # the demo recipe
        "Vanilla KD of LRC's start": ["--method=kd", f"--init_from={START}clone", "--alpha_kl=0.5"],
        "Minitron-style prune + KD": ["--method=kd", f"--init_from={START}prune", "--alpha_kl=0.5"],
        "TinyBERT": ["--method=tinybert", *RANDOM_START],
    },
}


def start_student(init, seed, teacher, teacher_dir, data_dir):
    """LRC's student of init at step 0 (train.py's calibration windows for seed), exported once;
    its dir."""
    out = os.path.join("out", "experiments", "starts", f"{init}-seed{seed}")
    if not os.path.isdir(out):
        cfg = {**TRAIN_DEFAULTS, "data_dir": data_dir, "batch_size": 8, "block_size": 256,
               "seed": seed}
        LowRankClone(teacher, 288, init=init, calibration=calibration_tokens(cfg, "cpu")).export(
            out, tokenizer_dir=teacher_dir)
    return out


def held_out_data(tokenizer):
    """Debian's licence texts, tokenised with the teacher's tokenizer: text no student saw."""
    out = demo.cache_dir("data-licenses-" + tokenizer.fingerprint[:12])
    if not os.path.isfile(os.path.join(out, "meta.json")):
        files = sorted(f for f in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(f))
        if not files:
            raise FileNotFoundError("/usr/share/common-licenses is empty: "
                                    "install Debian's base-files")
        with tempfile.TemporaryDirectory() as tmp:
            # paragraphs become documents; half go to val (the split used)
            text_path = os.path.join(tmp, "licenses.txt")
            with open(text_path, "w", encoding="utf-8") as f:
                f.write("\n\n".join(open(p, encoding="utf-8", errors="replace").read()
                                    for p in files))
            # a killed earlier attempt's unfinished work: from another temporary path, so not resumable
            shutil.rmtree(partial_dir(out), ignore_errors=True)
            prepare(tokenizer, [{"path": text_path}], out, val_fraction=0.5, seed=0, overwrite=True)
    return out


def run(name, overrides, out_dir, teacher, data_dir, tokens, minutes, seed):
    if minutes:  # the demo's budget: its steps, compiled, stopped by wall time
        budget = [f"--max_minutes={minutes}"]
    else:  # equal tokens, eager: no compile time
        steps = tokens // (8 * 256)
        budget = [f"--max_tokens={steps * 8 * 256}", "--max_minutes=0",
                  f"--eval_interval={max(1, steps // 5)}", f"--ckpt_interval={steps}",
                  "--compile=False", "--warmup_ratio=0.02"]
    # config files first: the flags below must win
    files = [o for o in overrides if o.endswith(".py")]
    args = [sys.executable, "train.py", "config/lrc_demo.py", *files, f"--teacher={teacher}",
            f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--seed={seed}", *budget,
            *(o for o in overrides if not o.endswith(".py"))]
    if os.path.isdir(os.path.join(out_dir, "student")):
        return
    # a run that failed or was stopped: go on from it
    if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        args.append("--resume=True")
    print(f"--- {name}: {' '.join(args[2:])}", flush=True)
    t0 = time.time()
    with open(out_dir + ".log", "a") as log:
        code = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f"run {name!r} failed (exit status {code}): see the end of "
                           f"{out_dir}.log; finished runs are kept and this one resumes from its "
                           "checkpoint when the same command runs again")
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
    windows = [losses[max(0, i - 10):i + 1] for i in range(len(losses))]  # each loss and 10 before
    spikes = sum(b > 10 * sorted(w)[len(w) // 2] for b, w in zip(losses, windows))  # > 10x median
    return {"run": name, "tokens": last["tokens"], "wall_min": wall / 60,
            "val_loss_0": first["val_loss"], "val_loss": last["val_loss"],
            "val_kl": last.get("val_kl", float("nan")),
            "agreement": last.get("val_agreement", float("nan")),
            "teacher_val_loss": last.get("teacher_val_loss", float("nan")),
            "held_loss": held["val_loss"], "held_kl": held["val_kl"],
            "held_agreement": held["val_agreement"], "teacher_held_loss": held["teacher_val_loss"],
            "loss_spikes": spikes, "curve": [(r["tokens"], r["val_loss"]) for r in evals]}


METRICS = ("val_loss_0", "val_loss", "val_kl", "agreement", "held_loss", "held_kl",
           "held_agreement")


def combine(rows):
    """One row for a run's seeds: each metric as (mean, std over seeds; 0 for one seed), and the val
    curves' mean and std at each eval."""
    def stats(xs):
        t = torch.tensor(xs, dtype=torch.float64)
        return t.mean().item(), (t.std().item() if len(xs) > 1 else 0.0)
    tokens = [t for t, _ in rows[0]["curve"]]
    curves = [[v for _, v in r["curve"]] for r in rows]
    return {**rows[0], **{k: stats([r[k] for r in rows]) for k in METRICS},
            "wall_min": sum(r["wall_min"] for r in rows) / len(rows), "seeds": len(rows),
            "loss_spikes": sum(r["loss_spikes"] for r in rows),
            "curve": [(t, *stats(list(v))) for t, v in zip(tokens, zip(*curves))]}


def write_results(set_name, rows, command):
    os.makedirs("results", exist_ok=True)
    seeds = rows[0]["seeds"]

    def cell(r, k, fmt):
        mean, std = r[k]
        return format(mean, fmt) + (f" ± {format(std, fmt)}" if seeds > 1 else "")
    lines = [f"Regenerate: `{command}`", "",
             "| run | tokens | wall (min) | val loss step 0 → end | KL | top-1 agreement | "
             "held-out loss | held-out KL | held-out agreement | loss spikes >10× median |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['tokens']:,} | {r['wall_min']:.1f} | "
                     f"{cell(r, 'val_loss_0', '.2f')} → {cell(r, 'val_loss', '.2f')} | "
                     f"{cell(r, 'val_kl', '.2f')} | {cell(r, 'agreement', '.1%')} | "
                     f"{cell(r, 'held_loss', '.2f')} | {cell(r, 'held_kl', '.2f')} | "
                     f"{cell(r, 'held_agreement', '.1%')} | {r['loss_spikes']} |")
    lines += ["", f"Teacher: val loss {rows[0]['teacher_val_loss']:.2f} (the demo corpus's val "
              f"split), {rows[0]['teacher_held_loss']:.2f} (held-out licence texts). KL is per "
              "token at T=1, teacher ‖ student."
              + (f" Mean ± std over {seeds} seeds; wall time per run." if seeds > 1 else "")]
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
        tokens, mean, std = zip(*r["curve"])
        line, = ax.plot(tokens, mean, marker="o", ms=3, label=r["run"])
        if seeds > 1:
            ax.fill_between(tokens, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.2)
    ax.axhline(rows[0]["teacher_val_loss"], color="gray", ls="--", label="teacher")
    ylabel = "val loss" + (f" (mean ± std, {seeds} seeds)" if seeds > 1 else "")
    ax.set(xlabel="training tokens", ylabel=ylabel,
           title=f"nanoLRC {set_name} (SmolLM2-135M teacher)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"results/{set_name}.png", dpi=110)


DEFAULTS = dict(
    set="",  # which set of runs: one of SETS
    tokens=150_000,  # training tokens per run (equal for all)
    minutes=0.0,  # > 0: instead of --tokens, the demo's recipe with this wall-time bound per run
                  # (compiled, as python demo.py runs); results/<set>-<minutes>min.md
    only="",  # comma-separated run names (default: all of the set)
    seeds=1,  # runs per run name, with seeds 1337, 1338, ...
)


def main(argv=None):
    cfg = configure_or_exit(DEFAULTS, argv)
    if not cfg["set"]:
        raise ConfigError(f"no --set given: pass --set=NAME, one of {list(SETS)}")
    check_ranges(cfg, {}, {"set": SETS})
    set_name, tokens, minutes, seeds = cfg["set"], cfg["tokens"], cfg["minutes"], cfg["seeds"]
    if tokens < 8 * 256 and not minutes:  # run() trains tokens // (8 * 256) steps
        raise ValueError(f"--tokens={tokens}: at least 2048 (one step of 8 x 256 tokens)")
    if minutes < 0:
        raise ValueError(f"--minutes={minutes}: must be >= 0 (0: --tokens sets the budget)")
    if seeds < 1:
        raise ValueError(f"--seeds={seeds}: at least 1")
    only = cfg["only"].split(",")
    unknown = [n for n in only if n and n not in SETS[set_name]]
    if unknown:
        raise ValueError(f"--only: no run named {unknown[0]!r} in the set {set_name!r}; "
                         f"its runs: {list(SETS[set_name])}")
    teacher_dir = demo.convert_teacher()
    tokenizer = load_tokenizer(teacher_dir)
    # python demo.py's corpus
    demo.read_corpus_meta(demo.CORPUS, teacher_dir, tokenizer)
    data_dir = demo.prepare_corpus(tokenizer, demo.CORPUS)
    held_out = Batches(held_out_data(tokenizer), batch_size=8, block_size=256)
    teacher = Transformer.from_pretrained(teacher_dir)
    names = [n for n in SETS[set_name] if not cfg["only"] or n in only]
    results_name = set_name + (f"-{minutes:g}min" if minutes else "")
    rows = []
    for name in names:
        per_seed = []
        for seed in range(TRAIN_DEFAULTS["seed"], TRAIN_DEFAULTS["seed"] + seeds):
            run_dir = re.sub(r"[^\w+.=-]", "", name.replace(" ", "_"))
            run_dir += f"-seed{seed}" if seed != TRAIN_DEFAULTS["seed"] else ""
            out_dir = os.path.join("out", "experiments", results_name, run_dir)
            os.makedirs(os.path.dirname(out_dir), exist_ok=True)
            overrides = []
            for o in SETS[set_name][name]:
                if o.startswith(f"--init_from={START}"):  # the step-0 student, exported first
                    init = o.split(START)[1]
                    o = f"--init_from={start_student(init, seed, teacher, teacher_dir, data_dir)}"
                overrides.append(o)
            run(name, overrides, out_dir, teacher_dir, data_dir, tokens, minutes, seed)
            per_seed.append(summarise(name, out_dir, teacher, held_out))
        rows.append(combine(per_seed))
    write_results(results_name, rows, "python " + shlex.join(sys.argv))


if __name__ == "__main__":
    run_or_exit(main)
