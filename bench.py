"""
Benchmarks that print tables (they are not tests). Machines are noisy: compare inside one run, as ratios.

    python bench.py model [--teacher=HF_DIR] [--dtype=bfloat16]        # model.Transformer vs transformers
    python bench.py step [config.py ...] [--key=value ...] [--variants=fp32,bf16,bf16+compile] [--peak_tflops=X]
    python bench.py head [--vocab=151936 --tokens=2048 --d=1200 --d_teacher=2048]
    python bench.py official --official_path=DIR [--official_python=PY] [config.py ...] [--key=value ...] [--rounds=3]
    python bench.py smoke [--device=cuda] [--out=out/smoke]              # run this first on a new cluster
    python bench.py memory config/lrc_qwen.py [--world_size=8] [--zero=True] [--key=value ...]   # no GPU needed

model  forward tokens/s (batch_size x block_size, no grad) and greedy generation tokens/s (batch 1, a random
       prompt of prompt_len tokens, new_tokens new ones, KV cache) of our model and of
       transformers.AutoModelForCausalLM (a test extra, imported here only) on the same HF dir (default: the demo
       teacher), run alternately, median of iters after warmup; plus their logits' max |diff| and greedy agreement.
step   one training step of a train.py config (default config/lrc_demo.py and the demo teacher) on random tokens
       (grad_accum micro-batches of batch_size x block_size): forward, backward, optimizer (clip +
       Adam); timed alone, the teacher forward (no grad) and the loss head (losses.distill_head, forward + backward,
       on random hidden states of the step's shape); the student forward is then about forward - teacher - head.
       tokens/s, MFU (train.flops_per_token against train.peak_flops, or --peak_tflops), peak memory.
       --variants: one row each, '+'-joined parts of fp32 | bf16 | compile | eager | ckpt (activation checkpointing)
       | permicro (LRC weights generated per micro-batch instead of once per step) on top of the config.
head   the loss stage alone, plain (full logits h @ W.T, losses.distill_losses, backward) vs fused (losses.distill_head,
       backward): time and peak memory above the inputs, and the two's max |diff| in losses and gradients.
official  s/step of the official LRC code (a checkout at official_path: github.com/CURRENTF/LowRankClone; it is
       not a dependency and asserts transformers 4.41.2, so official_python is an interpreter that has that, e.g. a
       venv made with --system-site-packages and `pip install transformers==4.41.2 accelerate`) and of nanoLRC at
       equal work, each step in a fresh process, alternating, for rounds rounds: wall and CPU seconds, per-round
       ratios and medians. nanoLRC's variants (default fp32+eager, bf16+eager, bf16+compile) each meet the official
       code in their dtype; see official_step for how it is run. E.g. the issue-18 table:
       python bench.py official --official_path=DIR --official_python=PY --d_student=256 --alpha=0.5
           --temperature=40.0 --kl_reduction=batchmean --clone_norm=none --init=normal
smoke  every path that only a GPU takes, end to end as a user runs it, on a small random teacher (no download):
       torchrun with nccl (1 process; 2 with 2+ GPUs, there with zero, epoch sampling and a wall-time stop),
       bf16 autocast, torch.compile, evaluation, a checkpoint, a preemption and --resume, export, sample.py from
       the export and from the checkpoint. One line per check, then 'smoke: all N checks passed' (exit 1 if not).
       A few minutes on one GPU; on CPU (--device=cpu, gloo) it runs the same checks, slower.
memory a recipe's peak GPU memory per rank without a GPU: its teacher built from config.json alone (config/shapes/
       for the paper recipes), the student, two train.train_step and one train.evaluate on fake tensors of a fake GPU
       device (CUDA's autocast casts and flash attention emulated), a fake process group of world_size ranks;
       live tensor bytes by what holds them, FLOPs per step, last line 'predicted peak per GPU: N GiB'. A collective
       on a tensor of another device fails as nccl would. Checked: on an H100 the same accounting on real CUDA
       tensors read 56.1 GiB where the allocator's peak was 56.4 (lrc_qwen, world size 1); predicted 55.3.
Peak memory is torch.cuda.max_memory_allocated on CUDA and the process's peak RSS on CPU (VmHWM, or ru_maxrss
off Linux), so every variant and stage runs in a fresh process; a step's peak covers its whole run, warm-up and
compilation included. MFU counts model FLOPs (teacher forward included) against the bf16 peak, for every variant.
The options of each command (MODEL_OPTS, STEP_OPTS + train.DEFAULTS, HEAD_OPTS) are set as --key=value
(configurator.py: unknown keys and wrong types are errors); device=auto picks cuda when available.
"""
import contextlib
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import weakref
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from statistics import median
from unittest.mock import patch

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import demo
import lrc
import train
from configurator import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, ConfigError, check_ranges, configure_or_exit,
                          run_or_exit)
from data import prepare
from losses import distill_head, distill_losses
from model import ModelConfig, Transformer, read_json
from tokenizer import bytes_to_unicode, load_tokenizer

MODEL_OPTS = dict(teacher="", device="auto", dtype="float32", batch_size=8, block_size=256, prompt_len=16,
                  new_tokens=64, warmup=2, iters=5, compile=True)
# beside every key of train.DEFAULTS; one_pass=False generates LRC's weights per micro-batch (the baseline)
STEP_OPTS = dict(variants="", peak_tflops=0.0, warmup=1, iters=3, one_pass=True, stages=True)  # stages: time the
# teacher and the loss head alone as well
HEAD_OPTS = dict(vocab=151936, tokens=2048, d=1200, d_teacher=2048, temperature=40.0, device="auto",
                 dtype="float32", warmup=0, iters=2, seed=0)
VARIANTS = {"fp32": ("dtype", "float32"), "bf16": ("dtype", "bfloat16"), "compile": ("compile", True),
            "eager": ("compile", False), "ckpt": ("checkpoint", True), "permicro": ("one_pass", False)}
SMOKE_OPTS = dict(out="out/smoke", device="auto", compile=True, nproc=0, steps=20)  # nproc 0: 2 if 2+ GPUs, else 1
HEAD_RTOL = {"float32": 1e-3, "bfloat16": 5e-2}  # max |fused - plain| / max |plain| allowed per quantity


# -----------------------------------------------------------------------------
# timing, memory, processes, tables

def pick_device(device):
    return train.resolve_device(device)  # auto: cuda if available; a device the machine lacks is an error


def autocast_for(device, dtype):
    """bf16 = autocast with fp32 weights, as in train.py."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def timed(device, fn):
    """(fn(), seconds); the GPU queue is drained on both sides of the timer."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def cpu_timed(device, fn):
    """(wall seconds, CPU seconds of this process, all threads) of fn(). On a shared machine the CPU seconds
    move less with the load than the wall time does."""
    c0 = time.process_time()
    _, t = timed(device, fn)
    return t, time.process_time() - c0


def mem_mark(device):
    """Start a peak-memory window; return the bytes in use now (CUDA: allocated; CPU: resident set)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if os.path.exists("/proc/self/statm"):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return mem_peak(device)  # no /proc (macOS): the peak so far is the nearest we can read


def mem_peak(device):
    """Peak bytes: CUDA max allocated; CPU peak RSS, from VmHWM on Linux because a spawned child's ru_maxrss
    also holds the parent's RSS at the fork before exec."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def in_fresh_process(fn, *args):
    """fn(*args) in a new Python process (spawn), so that the peak RSS it reports is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def gib(n):
    return f"{n / 2**30:.3f} GiB"


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def system(device):
    cuda = device.startswith("cuda")
    where = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    return f"{where} | python {platform.python_version()} torch {torch.__version__}"


# -----------------------------------------------------------------------------
# model: ours vs transformers

def bench_model(o):
    check_ranges(o, {**dict.fromkeys(("batch_size", "block_size", "prompt_len", "new_tokens", "iters"), AT_LEAST_1),
                     "warmup": NON_NEGATIVE}, {"dtype": ("float32", "bfloat16", "float16")})
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.utils.logging.disable_progress_bar()
    device, dtype = pick_device(o["device"]), getattr(torch, o["dtype"])
    path = o["teacher"] or demo.convert_teacher()
    ours = Transformer.from_pretrained(path, device=device, dtype=dtype).eval()
    theirs = AutoModelForCausalLM.from_pretrained(path).to(device=device, dtype=dtype).eval()
    torch.manual_seed(0)
    x = torch.randint(ours.config.vocab_size, (o["batch_size"], o["block_size"]), device=device)
    prompt, n = torch.randint(ours.config.vocab_size, (1, o["prompt_len"]), device=device), o["new_tokens"]
    gen_theirs = lambda: theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,  # noqa
                                         max_new_tokens=n, min_new_tokens=n)[:, prompt.shape[1]:]
    gen_ours = lambda compile: lambda: torch.stack(list(ours.generate(prompt, n, compile=compile)), 1)  # noqa
    runs = {  # (name, tokens per call): (ours, theirs)
        (f"forward tok/s ({o['batch_size']}x{o['block_size']})", x.numel()):
            (lambda: ours(x)[0], lambda: theirs(x, use_cache=False).logits),  # neither builds a KV cache
        (f"generate tok/s (batch 1, {n} new)", n): (gen_ours(False), gen_theirs),
    }
    if o["compile"]:  # the compiled one-token step over the static cache; warmup includes its compilation
        runs[f"generate tok/s, compiled step (batch 1, {n} new)", n] = (gen_ours(True), gen_theirs)
    print(f"model {path} | {o['dtype']} | {system(device)} transformers {transformers.__version__}")
    rows, outs = [], {}
    with torch.no_grad():
        for (name, tokens), fns in runs.items():
            times = ([], [])
            for i in range(o["warmup"] + o["iters"]):
                for who, fn in enumerate(fns):  # alternate, so that drift in the machine hits both alike
                    outs[name, who], t = timed(device, fn)
                    if i >= o["warmup"]:
                        times[who].append(t)
            ours_tps, theirs_tps = (tokens / median(t) for t in times)
            ratios = sorted(b / a for a, b in zip(*times))  # per round: theirs' time / ours'
            rows.append([name, f"{ours_tps:,.1f}", f"{theirs_tps:,.1f}", f"{ours_tps / theirs_tps:.2f}",
                         f"{ratios[0]:.2f}-{ratios[-1]:.2f}"])
    print_table(["", "nanoLRC", "transformers", "ours/theirs", "per round"], rows)
    (fwd, _), *gens = runs
    diff = (outs[fwd, 0].float() - outs[fwd, 1].float()).abs().max().item()
    print(f"logits max |diff| {diff:.3g}")
    for gen, _ in gens:
        same = (outs[gen, 0] == outs[gen, 1])[0].tolist() + [False]
        print(f"{gen.split(' tok/s')[0]}: greedy tokens identical for the first {same.index(False)}/{n}")


# -----------------------------------------------------------------------------
# step: one training step, by stage, per variant

def without_pca(cfg):
    """cfg with init "normal" in place of "pca" and "clone", which need training data: time and memory do not depend on
    where the projections start."""
    return {**cfg, "init": "normal" if cfg["init"] in lrc.CALIBRATED_INITS else cfg["init"]}


def variant_config(cfg, name):
    cfg = dict(cfg)
    for part in name.split("+"):
        if part not in VARIANTS:
            raise ConfigError(f"unknown variant part {part!r} in {name!r}; choose from {list(VARIANTS)}")
        cfg[VARIANTS[part][0]] = VARIANTS[part][1]
    return cfg


def step_variant(cfg):
    """Median stage times and the peak memory of one training step of cfg (run in a fresh process)."""
    device, dtype = train.resolve_system(cfg)
    torch.manual_seed(cfg["seed"])
    model = train.build_model(without_pca(cfg), device, dtype)
    optimizer = train.make_optimizer(model, cfg)
    fwd = torch.compile(model) if cfg["compile"] else model
    autocast = autocast_for(device, dtype)
    B, T, V = cfg["batch_size"], cfg["block_size"], model.config.vocab_size
    xs = torch.randint(V, (cfg["grad_accum"], 2, B, T), device=device)  # micro-batches of (x, y)
    x, y = xs[0]
    teacher = model.teacher
    if teacher is None:
        raise ValueError(f"bench.py step times distillation: method {cfg['method']!r} has no teacher")

    def step():
        """grad_accum micro-batches as train.py runs them. With one_pass, generating the step's weights
        counts as forward and the one pass of their gradients into the projections as backward."""
        ctx = model.accumulate() if cfg["one_pass"] else nullcontext()
        with autocast:
            _, t_fwd = timed(device, ctx.__enter__)
            t_bwd = 0.0
            for mx, my in xs:
                (loss, _), t = timed(device, lambda: fwd(mx, my))
                t_fwd += t
                t_bwd += timed(device, (loss / len(xs)).backward)[1]
            t_bwd += timed(device, lambda: ctx.__exit__(None, None, None))[1]
        _, t_opt = timed(device, lambda: (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"]),
                                          optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        return {"forward": t_fwd, "backward": t_bwd, "optimizer": t_opt}

    # the stages timed alone; the head gets random hidden states and student head of the step's shape
    h_s = torch.randn(B, T, model.config.hidden_size, device=device, requires_grad=True)
    w_s = (0.02 * torch.randn(V, model.config.hidden_size, device=device)).requires_grad_()
    h_t = torch.randn(B, T, teacher.config.hidden_size, device=device)

    def parts():
        with autocast, torch.no_grad():
            _, t_teacher = timed(device, lambda: teacher.hidden(x))
        with autocast:
            _, t_head = timed(device, lambda: distill_head(h_s, w_s, h_t, teacher.lm_head.weight, y,
                                                           cfg["temperature"], cfg["kl_reduction"])[0].backward())
        return {"teacher": t_teacher, "head": t_head}

    def step_cpu():
        c0 = time.process_time()
        return {**step(), "cpu": time.process_time() - c0}
    base = mem_mark(device)
    times = [step_cpu() for _ in range(cfg["warmup"] + cfg["iters"])][cfg["warmup"]:]
    peak = mem_peak(device)  # before the parts timed alone: their tensors are not the step's
    if cfg["stages"]:
        times += [parts() for _ in range(cfg["warmup"] + cfg["iters"])][cfg["warmup"]:]
    out = {k: median([t[k] for t in times if k in t] or [float("nan")])
           for k in ("forward", "backward", "optimizer", "teacher", "head", "cpu")}
    return {**out, "peak": peak, "above_model": peak - base, "flops": len(xs) * B * T * train.flops_per_token(model, T),
            "system": system(device), "dtype": dtype}


def bench_step(argv):
    if not any(a.endswith(".py") and not a.startswith("--") for a in argv):
        argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "lrc_demo.py"), *argv]
    cfg = configure_or_exit({**train.DEFAULTS, **STEP_OPTS}, argv)
    check_ranges(cfg, {"iters": AT_LEAST_1, "warmup": NON_NEGATIVE, "peak_tflops": NON_NEGATIVE})
    train.check_config(cfg)
    train.resolve_batch(cfg, 1)
    pick_device(cfg["device"])
    names = [v for v in cfg["variants"].split(",") if v] or ["eager" if not cfg["compile"] else "compile"]
    try:
        variants = [variant_config(cfg, name) for name in names]
    except ConfigError as e:
        sys.exit(f"error: {e}")
    teacher = cfg["teacher"] or demo.convert_teacher()
    tokens = cfg["batch_size"] * cfg["block_size"] * cfg["grad_accum"]
    print(f"step {cfg['method']} | teacher {teacher} | d_student {cfg['d_student']} | "
          f"{cfg['grad_accum']} x {cfg['batch_size']}x{cfg['block_size']} tokens")
    rows, first = [], None
    for name, v in zip(names, variants):
        r = in_fresh_process(step_variant, {**v, "teacher": teacher})
        step = r["forward"] + r["backward"] + r["optimizer"]
        peak = cfg["peak_tflops"] * 1e12 or train.peak_flops(train.resolve_system(v)[0])
        first = first or (step, r["peak"])
        rows.append([f"{name} ({r['dtype']})", *(f"{1e3 * t:,.1f}" for t in (
            r["teacher"], r["forward"] - r["teacher"] - r["head"], r["head"], r["forward"], r["backward"],
            r["optimizer"], step)), f"{tokens / step:,.1f}", f"{r['flops'] / step / peak:.1%}" if peak else "n/a",
            gib(r["peak"]), gib(r["above_model"]), f"{first[0] / step:.2f}", f"{r['peak'] / first[1]:.2f}"])
    print(r["system"])
    print_table(["variant", "teacher ms", "student~ ms", "head ms", "forward ms", "backward ms", "optim ms",
                 "step ms", "tok/s", "MFU", "peak mem", "above model", "speed x", "mem x"], rows)
    print("student~ = forward - teacher - head (timed alone); speed x and mem x are relative to the first row")


# -----------------------------------------------------------------------------
# official: the official LRC code and nanoLRC at equal work, alternating

OFFICIAL_OPTS = dict(official_path="", official_python="", rounds=3)  # beside STEP_OPTS and train.DEFAULTS


def sdpa_attention(self, q, k, v, attention_mask, query_length, *args, **kwargs):
    """Stands in for transformers 4.41's FlashAttention2._flash_attention_forward (flash-attn is CUDA-only):
    causal attention over (B, T, heads, head_dim) inputs, kv heads shared by groups, no padding; same output."""
    if attention_mask is not None:
        raise NotImplementedError("bench.py official runs unpadded windows only")
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=q.shape[2] != k.shape[2])  # (B, heads, T, head_dim)
    return out.transpose(1, 2)


def official_step(cfg):
    """Median seconds per training step of the official LRC code (modeling/co_train_{llama,qwen}.py of
    github.com/CURRENTF/LowRankClone, imported from cfg["official_path"] and run as they are) at cfg's work: the
    same teacher, d_S, T, alpha, grad_accum micro-batches of batch_size x block_size random tokens; clip and Adam
    as train.py. Its flags are its README's paper command (use_all_attn, tie_word_emb_proj for a tied teacher).
    dtype float32: everything fp32. bfloat16: as its DeepSpeed config trains, bf16 weights (no autocast) with fp32
    master copies for Adam. Two changes, neither in its files: flash-attn -> SDPA (sdpa_attention), and a stub
    for wandb, which it imports to log every 20 micro-batches. Its process keeps freed memory for reuse as
    nanoLRC's does (train.resolve_system, on CPU). Runs in an interpreter with transformers 4.41.2 (the official
    code asserts that version)."""
    import importlib.machinery
    import types
    sys.path.insert(0, os.path.abspath(cfg["official_path"]))
    if "wandb" not in sys.modules:
        sys.modules["wandb"] = types.ModuleType("wandb")
        sys.modules["wandb"].__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        sys.modules["wandb"].log = lambda *a, **k: None
    import transformers
    transformers.logging.set_verbosity_error()  # its checkpoint lacks the student's new weights: a page of warnings
    from transformers.models.llama.modeling_llama import LlamaFlashAttention2
    from transformers.models.qwen2.modeling_qwen2 import Qwen2FlashAttention2
    LlamaFlashAttention2._flash_attention_forward = Qwen2FlashAttention2._flash_attention_forward = sdpa_attention
    model_type = read_json(os.path.join(cfg["teacher"], "config.json"))["model_type"]
    if model_type not in ("llama", "qwen2"):
        raise ValueError(f"the official code has Llama and Qwen2 students only, not {model_type!r}")
    official = __import__(f"modeling.co_train_{'qwen' if model_type == 'qwen2' else 'llama'}", fromlist=["_"])
    from tools.global_state import hyper_params
    hyper_params.update(gradient_accumulation_steps=cfg["grad_accum"], aux_loss_scale_factor=cfg["alpha"])
    device, dtype = train.resolve_system(cfg)
    dtype = getattr(torch, dtype)
    torch.manual_seed(cfg["seed"])
    config = official.CustomConfig.from_pretrained(cfg["teacher"])
    config.set_custom_kwargs(target_hidden_size=cfg["d_student"], target_rms_norm_eps=config.rms_norm_eps,
                             kl_temperature=cfg["temperature"], use_all_attn=True,
                             tie_word_emb_proj=config.tie_word_embeddings)
    model = official.CoTrainLM.from_pretrained(cfg["teacher"], config=config, torch_dtype=dtype,
                                               attn_implementation="sdpa").to(device)
    model.freeze_original_model()
    model.apply(official.reinit_weight)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float() for p in params] if dtype != torch.float32 else params
    optimizer = torch.optim.Adam(masters, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), weight_decay=0.0)
    V, B, T = config.vocab_size, cfg["batch_size"], cfg["block_size"]
    xs = torch.randint(V, (cfg["grad_accum"], B, T), device=device)

    def step():
        for x in xs:  # its labels are the inputs, shifted inside (T - 1 predictions per window)
            (model(input_ids=x, labels=x).loss / len(xs)).backward()
        for p, m in zip(params, masters):
            if m is not p:
                m.grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(masters, cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in zip(params, masters):
                if m is not p:
                    p.copy_(m)
    times = [cpu_timed(device, step) for _ in range(cfg["warmup"] + cfg["iters"])][cfg["warmup"]:]
    return {"step": median(t for t, _ in times), "cpu": median(c for _, c in times),
            "system": f"{system(device)} transformers {transformers.__version__}"}


def official_in(python, cfg):
    """official_step(cfg) in a new process of the given interpreter (its JSON is the last line printed)."""
    code = "import bench, json, sys; print(json.dumps(bench.official_step(json.loads(sys.argv[1]))))"
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:  # its working dir: the official code writes a logs/ dir there
        r = subprocess.run([python, "-c", code, json.dumps(cfg)], cwd=tmp, env={**os.environ, "PYTHONPATH": path},
                           capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"the official code failed ({python}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_official(argv):
    """Seconds per step, official vs nanoLRC, each run in a fresh process, alternating, for rounds rounds;
    per-round ratios and their medians. Each of nanoLRC's variants is compared with the official code in the
    variant's dtype (compile is nanoLRC's alone: the official code runs eager, as its trainer does)."""
    if not any(a.endswith(".py") and not a.startswith("--") for a in argv):
        argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "lrc_demo.py"), *argv]
    cfg = configure_or_exit({**train.DEFAULTS, **STEP_OPTS, **OFFICIAL_OPTS}, argv)
    check_ranges(cfg, {"iters": AT_LEAST_1, "warmup": NON_NEGATIVE, "rounds": AT_LEAST_1})
    if cfg["method"] != "lrc":
        raise ConfigError(f"bench.py official compares LRC only, not method {cfg['method']!r}")
    path = cfg["official_path"]
    if not os.path.isfile(os.path.join(path, "modeling", "co_train_llama.py")):
        raise ConfigError(f"--official_path={path!r} is not a checkout of the official LRC code "
                          "(no modeling/co_train_llama.py in it)")
    python = cfg["official_python"] or sys.executable
    train.check_config(cfg)
    train.resolve_batch(cfg, 1)
    names = [v for v in cfg["variants"].split(",") if v] or ["fp32+eager", "bf16+eager", "bf16+compile"]
    teacher = cfg["teacher"] or demo.convert_teacher()
    # absolute paths: the official code runs in a temporary working dir (official_in)
    work = {**cfg, "teacher": os.path.abspath(teacher), "official_path": os.path.abspath(path), "stages": False}
    python = os.path.abspath(python) if os.sep in python else python
    variants = [variant_config(work, name) for name in names]
    print(f"official vs nanoLRC | teacher {teacher} | d_student {cfg['d_student']} | alpha {cfg['alpha']} | "
          f"T {cfg['temperature']} | {cfg['kl_reduction']} | {cfg['grad_accum']} x {cfg['batch_size']}x"
          f"{cfg['block_size']} tokens | median of {cfg['iters']} steps after {cfg['warmup']} per process")
    times = {}  # (side, name) -> [seconds per round]
    for rnd in range(cfg["rounds"]):
        done = {}
        for name, v in zip(names, variants):
            if v["dtype"] not in done:
                done[v["dtype"]] = official_in(python, {**work, **{k: v[k] for k in ("dtype", "compile")}})
                off = done[v["dtype"]]
                times.setdefault(("official", v["dtype"]), []).append((off["step"], off["cpu"]))
            r = in_fresh_process(step_variant, {**work, **v})
            times.setdefault(("nanoLRC", name), []).append((r["forward"] + r["backward"] + r["optimizer"], r["cpu"]))
            (ow, oc), (nw, nc) = times["official", v["dtype"]][-1], times["nanoLRC", name][-1]
            print(f"round {rnd + 1}: official {v['dtype']} {ow:.2f} s ({oc:.2f} CPU s), nanoLRC {name} {nw:.2f} s "
                  f"({nc:.2f} CPU s) | load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"nanoLRC: {r['system']}\nofficial: {done[v['dtype']]['system']}")
    rows = []
    for name, v in zip(names, variants):
        off, ours = times["official", v["dtype"]], times["nanoLRC", name]
        for i, unit in ((0, "s"), (1, "CPU s")):
            ratios = [a[i] / b[i] for a, b in zip(off, ours)]
            rows.append([name, v["dtype"], unit, f"{median(a[i] for a in off):.2f}",
                         f"{median(b[i] for b in ours):.2f}", f"{median(ratios):.2f}x",
                         " ".join(f"{x:.2f}" for x in ratios)])
    print_table(["nanoLRC variant", "official dtype", "per step", "official", "nanoLRC", "official/nanoLRC",
                 "per round"], rows)
    print("s: wall seconds (what the machine gave); CPU s: CPU seconds of the process, all threads (steadier on a "
          "shared machine). Ratios within a round only; medians over rounds.")


# -----------------------------------------------------------------------------
# head: the loss stage, plain vs fused

def head_stage(o, mode, check):
    """Median time and peak memory of one loss stage (run in a fresh process); with check, the max |diff| of
    losses and gradients against the other mode as well (after the peak is read)."""
    device = pick_device(o["device"])
    torch.manual_seed(o["seed"])
    N, V, d, d_t = o["tokens"], o["vocab"], o["d"], o["d_teacher"]
    h_s = torch.randn(1, N, d, device=device, requires_grad=True)  # one sequence of N tokens
    w_s = (0.02 * torch.randn(V, d, device=device)).requires_grad_()
    h_t, w_t = torch.randn(1, N, d_t, device=device), 0.02 * torch.randn(V, d_t, device=device)
    y = torch.randint(V, (1, N), device=device)

    def run(mode):
        h_s.grad = w_s.grad = None
        with autocast_for(device, o["dtype"]):
            if mode == "plain":
                with torch.no_grad():
                    t_logits = h_t @ w_t.T  # (1, N, V)
                kl, lm = distill_losses(h_s @ w_s.T, t_logits, y, o["temperature"])
                loss = kl + lm
            else:
                loss, kl, lm = distill_head(h_s, w_s, h_t, w_t, y, o["temperature"])
        loss.backward()
        return {"loss": loss.detach(), "kl": kl.detach(), "lm": lm.detach(), "grad h_S": h_s.grad,
                "grad W_S": w_s.grad}

    base = mem_mark(device)
    times = [timed(device, lambda: run(mode))[1] for _ in range(o["warmup"] + o["iters"])][o["warmup"]:]
    out = {"time": median(times), "peak": mem_peak(device) - base, "system": system(device)}
    if check:
        ref = {k: v.float().clone() for k, v in run(mode).items()}
        other = run("fused" if mode == "plain" else "plain")
        out["diff"] = {k: ((other[k].float() - v).abs().max().item(), v.abs().max().item()) for k, v in ref.items()}
    return out


def bench_head(o):
    check_ranges(o, {**dict.fromkeys(("vocab", "tokens", "d", "d_teacher", "iters"), AT_LEAST_1),
                     "warmup": NON_NEGATIVE, "temperature": POSITIVE}, {"dtype": tuple(HEAD_RTOL)})
    pick_device(o["device"])
    plain = in_fresh_process(head_stage, o, "plain", True)
    fused = in_fresh_process(head_stage, o, "fused", False)
    print(f"loss head | {o['tokens']:,} tokens, vocab {o['vocab']:,}, d_S {o['d']}, d_T {o['d_teacher']}, "
          f"T {o['temperature']} | {o['dtype']} | {plain['system']}")
    stages = (("plain: logits + distill_losses + backward", plain), ("fused: distill_head + backward", fused))
    print_table(["stage", "time ms", "peak mem above inputs", "time x", "mem x"], [
        [name, f"{1e3 * r['time']:,.1f}", gib(r["peak"]), f"{r['time'] / plain['time']:.2f}",
         f"{r['peak'] / max(plain['peak'], 1):.2f}"] for name, r in stages])
    tol = HEAD_RTOL[o["dtype"]]
    rel = {k: d / max(scale, 1e-30) for k, (d, scale) in plain["diff"].items()}
    print_table(["fused vs plain", "max |diff|", "max |plain|", "relative"],
                [[k, f"{d:.3g}", f"{scale:.3g}", f"{rel[k]:.2g}"] for k, (d, scale) in plain["diff"].items()])
    ok = all(r <= tol for r in rel.values())
    print(f"{'agree' if ok else 'DISAGREE'}: every relative difference {'<=' if ok else 'is not <='} {tol:g}")
    if not ok:
        sys.exit(1)


# -----------------------------------------------------------------------------
# smoke: the GPU-only paths, end to end

def write_tokenizer(path, merges=(), specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), pre_tokenizer=None,
                    chat_template=None):
    """A byte-level BPE tokenizer as HF files (tokenizer.json, tokenizer_config.json): the 256 byte tokens, then
    one token per merge, then the specials; EOS <|im_end|> (258 without merges). For tests and the smoke run."""
    os.makedirs(path, exist_ok=True)
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    added = [{"id": len(vocab) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(specials)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                 "pre_tokenizer": pre_tokenizer or byte_level, "post_processor": None, "decoder": byte_level,
                 "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                           "ignore_merges": False, "vocab": vocab, "merges": list(merges)}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              **({"chat_template": chat_template} if chat_template else {})}
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return path


def write_random_teacher(path, cfg: ModelConfig, device="cpu", dtype=torch.float32, seed=0):
    """An HF dir with random weights of any shape (a real model's config.json, say) and the byte tokenizer."""
    write_tokenizer(path)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        Transformer(cfg).to(dtype).init_weights(0.05).save_pretrained(path, dtype=dtype)
    return path


def tiny_teacher_config(hidden=256, layers=4, heads=4, kv_heads=2, ffn=768):
    """A small Qwen2 (q/k/v bias, tied) for the byte tokenizer: enough to exercise every path of the loop."""
    return ModelConfig(model_type="qwen2", vocab_size=320, hidden_size=hidden, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=hidden // heads, attention_bias=True, tie_word_embeddings=True, eos_token_id=258)


def smoke_corpus(out):
    """This repository's own text (README, code) as the training corpus: English and code, always present."""
    root, path = os.path.dirname(os.path.abspath(__file__)), os.path.join(out, "corpus.txt")
    names = sorted(n for n in os.listdir(root) if n.endswith((".py", ".md")))
    with open(path, "w") as f:
        for name in names:
            with open(os.path.join(root, name)) as src:
                f.write(src.read() + "\n\n")
    return path


def bench_smoke(o):
    check_ranges(o, {"steps": (lambda v: v >= 2, "at least 2"), "nproc": NON_NEGATIVE})
    device = pick_device(o["device"])
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    nproc = o["nproc"] or (2 if gpus >= 2 else 1)
    out, root = os.path.abspath(o["out"]), os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(out):
        sys.exit(f"error: {out} exists: remove it or choose another --out")
    teacher = write_random_teacher(os.path.join(out, "teacher"), tiny_teacher_config())
    data = os.path.join(out, "data")
    prepare(load_tokenizer(teacher), [{"path": smoke_corpus(out)}], data, val_fraction=0.05)
    n, half = o["steps"], o["steps"] // 2
    common = [f"--teacher={teacher}", f"--data_dir={data}", f"--device={device}", "--dtype=bfloat16",
              "--d_student=128", "--batch_size=4", "--block_size=128", "--tokens_per_step=1024",
              f"--max_steps={n}", f"--eval_interval={half}", "--eval_batches=2", "--log_interval=5",
              f"--ckpt_interval={half}", f"--compile={o['compile']}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    run_dir, zero_dir = os.path.join(out, "run"), os.path.join(out, "zero")
    checks = [
        ("torchrun x1: compile, bf16, eval, checkpoint, preemption", [*torchrun, "--nproc_per_node=1", "train.py",
         *common, f"--out_dir={run_dir}", f"--stop_at={half}"], f"stopped at step {half}"),
        ("torchrun x1: --resume, eval, export", [*torchrun, "--nproc_per_node=1", "train.py", *common,
         f"--out_dir={run_dir}", "--resume=True"], f"exported the student to {run_dir}/student after {n} steps"),
        ("sample.py from the exported student", [sys.executable, "sample.py", f"--model={run_dir}/student",
         "--prompt=def ", "--max_new_tokens=16", "--temperature=0", f"--device={device}"], "def "),
        ("sample.py from the checkpoint", [sys.executable, "sample.py", f"--model={run_dir}/ckpt.pt",
         "--prompt=def ", "--max_new_tokens=16", "--temperature=0", f"--device={device}"], "def "),
    ]
    if nproc >= 2:
        checks.append((f"torchrun x{nproc}: zero, epoch sampling, wall-time stop, export", [
            *torchrun, f"--nproc_per_node={nproc}", "train.py", *common, f"--out_dir={zero_dir}", "--zero=True",
            "--sampling=epoch", "--max_minutes=0.5", "--max_steps=100000"], "exported the student"))
    print(f"smoke | {system(device)} | {nproc} process(es) | {out}")
    failed = 0
    for name, cmd, expect in checks:
        t0 = time.time()
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        ok = r.returncode == 0 and expect in r.stdout
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {time.time() - t0:6.1f} s  {name}")
        last = [line for line in r.stdout.splitlines() if line.startswith("step ")][-1:]
        print("\n".join(f"       {line}" for line in last))
        if not ok:
            print(f"       $ {' '.join(cmd)}\n" + "\n".join("       " + line for line in
                                                        (r.stdout + r.stderr).splitlines()[-25:]))
    print(f"smoke: {'all' if not failed else failed} {'' if not failed else 'of '}{len(checks)} checks "
          f"{'passed' if not failed else 'FAILED'}")
    sys.exit(1 if failed else 0)



# -----------------------------------------------------------------------------
# memory: train.py's step and evaluation at the real shapes on fake tensors, and the peak memory they need

MEMORY_OPTS = dict(world_size=8)  # beside every key of train.DEFAULTS
FAKE_DEVICE = "fakecuda"
# the paper teachers' config.json (config/shapes), used where a recipe leaves teacher empty
SHAPES = {"lrc_qwen.py": "Qwen2.5-3B-Instruct", "lrc_llama.py": "Llama-3.2-3B-Instruct",
          "lrc_qwen_4b.py": "Qwen2.5-7B-Instruct", "lrc_qwen3.py": "Qwen3-4B"}
# what CUDA autocast runs in bf16 (matmul-like ops), and in fp32 when given bf16 (of those train.py reaches)
AUTOCAST_LOW = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
                torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm}
AUTOCAST_FP32 = {F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax,
                 torch.Tensor.log_softmax, F.cross_entropy, torch.logsumexp, torch.Tensor.logsumexp, torch.exp,
                 torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.square, torch.Tensor.square, torch.rsqrt,
                 torch.Tensor.rsqrt}  # square: CUDA autocast sees it as pow


def setup_fake_device():
    """A stand-in GPU for a CPU-only torch. Fake tensors on device 'cuda' run forward, but a CPU build cannot
    run autograd on them (the engine asks for a CUDA accelerator: 'Cannot access accelerator device when none is
    available'), so the dry run's device is PrivateUse1 renamed 'fakecuda', with torch's python device guard.
    Autocast is accepted there but dispatches nothing: FakeGPU applies CUDA's bf16 rules itself."""
    if hasattr(torch, FAKE_DEVICE):
        return
    from torch.utils import backend_registration

    class Module(backend_registration._DummyBackendModule):
        def get_amp_supported_dtype(self):
            return [torch.bfloat16, torch.float16]
    backend_registration._setup_privateuseone_for_python_backend(FAKE_DEVICE, backend_module=Module())
    setup_fake_device.lib = torch.library.Library("_", "IMPL")  # kept alive: the fallthrough lives as long as it
    setup_fake_device.lib.fallback(torch.library.fallthrough_kernel, "AutocastPrivateUse1")


class FakeGPU(TorchFunctionMode):
    """What a GPU would do that the fake device does not: CUDA autocast's bf16 / fp32 casts (with its cache of
    the casts of fp32 leaf parameters, cleared by clear_cache as leaving autocast does), SDPA as flash attention
    (what CUDA runs for bf16, head_dim <= 256: O(T) memory, not the (T, T) scores), and host reads of fake values
    (item, tolist, bool; fake tensors have no values) answered with 1; new_tensor makes a fake of its data's shape (fake mode would move a host constant)."""

    def __init__(self, device):
        super().__init__()
        self.device, self.cache = device, {}

    def clear_cache(self):
        self.cache.clear()

    def cast(self, t, dtype):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == self.device
                and t.dtype != dtype and t.dtype in (torch.float32, torch.bfloat16, torch.float16)):
            return t
        if not (t.is_leaf and t.requires_grad and torch.is_grad_enabled()):  # as CUDA's cache: no casts made
            return t.to(dtype)  # under no_grad, which would carry no graph into a later forward
        if id(t) not in self.cache:
            self.cache[id(t)] = (t, t.to(dtype))
        return self.cache[id(t)][1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist) and \
                args[0].device.type == self.device:
            t = args[0]
            return True if func is torch.Tensor.__bool__ else (1.0 if t.dim() == 0 else torch.ones(t.shape).tolist())
        if func is torch.Tensor.new_tensor and args[0].device.type == self.device:  # a fake of the data's shape
            return torch.zeros(torch.tensor(args[1]).shape, dtype=kwargs.get("dtype", args[0].dtype),
                               device=args[0].device)
        on = torch.is_autocast_enabled(self.device)
        dtype = torch.get_autocast_dtype(self.device)
        if on and func is F.scaled_dot_product_attention:
            q, k, v = (self.cast(t, dtype) for t in args[:3])
            if kwargs.get("attn_mask") is None and len(args) <= 3:
                return torch.ops.aten._scaled_dot_product_flash_attention(
                    q, k, v, 0.0, kwargs.get("is_causal", False))[0]
            return func(q, k, v, *args[3:], **kwargs)
        if on and func in AUTOCAST_LOW:
            args, kwargs = tree_map(lambda t: self.cast(t, dtype), (args, kwargs))
        elif on and func in AUTOCAST_FP32:
            args, kwargs = tree_map(lambda t: self.cast(t, torch.float32) if isinstance(t, torch.Tensor)
                                    and t.dtype == dtype else t, (args, kwargs))
        return func(*args, **kwargs)


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages and their peak, by label. Every storage an op creates is counted once (views
    share it), under the label in force when it was created (or given later by relabel), until it is freed.
    Inside backward, new storages count as 'backward'. Allocator rounding and fragmentation are not modelled."""

    def __init__(self):
        super().__init__()
        self.label, self.live, self.by_label = "other", {}, {}
        self.now = self.peak = 0
        self.at_peak = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out

    def add(self, t):
        st = t.untyped_storage()
        if id(st) in self.live or st.nbytes() == 0 or t.device.type == "meta":  # meta: shapes only (lrc's skeleton)
            return
        label = "backward" if torch._C._current_graph_task_id() != -1 else self.label
        self.live[id(st)] = [label, st.nbytes()]
        weakref.finalize(st, self.free, id(st))
        self.count(label, st.nbytes())

    def count(self, label, n):
        self.by_label[label] = self.by_label.get(label, 0) + n
        self.now += n
        if self.now > self.peak:
            self.peak, self.at_peak = self.now, dict(self.by_label)

    def free(self, key):
        label, n = self.live.pop(key)
        self.count(label, -n)

    def relabel(self, tensors, label):
        for t in tensors:
            entry = self.live.get(id(t.untyped_storage()))
            if entry is not None and entry[0] != label:
                self.count(entry[0], -entry[1])
                entry[0] = label
                self.count(label, entry[1])

    def reset_peak(self):
        self.peak, self.at_peak = self.now, dict(self.by_label)

    @contextmanager
    def phase(self, label):
        before, self.label = self.label, label
        try:
            yield
        finally:
            self.label = before


class RandomBatches:
    """train.py's batches (get_batch, eval_steps, device) as random tokens of the recipe's shape: the dry run's
    data, and the CPU check's."""

    def __init__(self, cfg, vocab_size, device, world):
        self.shape, self.vocab, self.device, self.world = (cfg["batch_size"], cfg["block_size"]), vocab_size, device, world

    def get_batch(self, split, step, micro=0):
        return (torch.randint(self.vocab, self.shape, device=self.device),
                torch.randint(self.vocab, self.shape, device=self.device))

    def eval_steps(self, n):
        return range(0, n, self.world)  # rank 0's share


def from_config_json(cls, path, device="cpu", dtype=None):
    """Transformer.from_pretrained's model without the weights (config.json only): for the dry run."""
    cfg = ModelConfig.from_hf(read_json(os.path.join(path, "config.json")))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with torch.device(device):
            return cls(cfg)
    finally:
        torch.set_default_dtype(default)


def step_and_eval(cfg, world, device, mem, hooks=None):
    """Build the model as train.py does, then two optimizer steps (train.train_step) and one evaluation
    (train.evaluate), with mem (LiveBytes) labelling what is allocated. Returns a report dict; its step peak is
    the second step's."""
    dtype = train.resolve_dtype(cfg, "cuda" if device == FAKE_DEVICE else device)  # the fake GPU's dtype is CUDA's
    autocast = autocast_for(device, dtype)
    cfg = {**without_pca(cfg), "compile": False}
    with mem.phase("parameters"):
        model = train.build_model(cfg, device, dtype)
        optimizer = train.make_optimizer(model, cfg)
    teacher = list(model.teacher.parameters()) if model.teacher is not None else []
    mem.relabel(teacher, "teacher (frozen)")
    mem.relabel(model.parameters(), "trainable parameters")
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: mem.relabel([p.grad], "gradients"))
    accumulate, step = model.accumulate, optimizer.step

    @contextmanager
    def labelled_accumulate():  # the step's generated weights, then the one pass into the projections' grads
        ctx = accumulate()
        with mem.phase("generated weights"):
            ctx.__enter__()
        for leaf in tree_flatten(model.weights)[0] if getattr(model, "weights", None) else []:
            if leaf.requires_grad:  # after accumulate's own hook, which moves the grad into model.grad_sums
                leaf.register_post_accumulate_grad_hook(lambda t: mem.relabel(
                    [g for g in model.grad_sums if g is not None], "generated weights' grads"))
        try:
            with mem.phase("activations"):
                yield
        finally:
            with mem.phase("optimizer step"):
                ctx.__exit__(None, None, None)
        mem.label = "optimizer step"  # all-reduce buffer, clipping

    def labelled_step(*a, **k):
        with mem.phase("optimizer step"):
            out = step(*a, **k)
        state = optimizer.optim.state if hasattr(optimizer, "optim") else optimizer.state
        mem.relabel([t for s in state.values() for t in s.values() if isinstance(t, torch.Tensor)], "Adam state")
        return out
    if hasattr(model, "accumulate"):
        model.accumulate = labelled_accumulate
    optimizer.step = labelled_step
    head = lrc.distill_head

    def labelled_head(*a, **k):
        with mem.phase("loss head"):
            return head(*a, **k)
    batches = RandomBatches(cfg, model.config.vocab_size, device, world)
    with patch.object(lrc, "distill_head", labelled_head):
        for i in range(2):  # the second step is the steady state: Adam's state exists from the first one on
            mem.reset_peak()
            with mem.phase("activations"):
                train.train_step(model, model, optimizer, batches, i, cfg, world, autocast)
            for h in hooks or []:
                h()
        step_peak, step_at_peak = mem.peak, mem.at_peak
        mem.reset_peak()
        with mem.phase("evaluation"):
            train.evaluate(model, batches, cfg["eval_batches"], autocast)
        for h in hooks or []:
            h()
    eval_peak = mem.peak
    sizes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    state = optimizer.optim.state if hasattr(optimizer, "optim") else optimizer.state
    return {"step_peak": step_peak, "at_peak": step_at_peak, "eval_peak": eval_peak,
            "peak": max(step_peak, eval_peak), "teacher": sizes({id(p): p for p in teacher}.values()),
            "trainable": sizes(model.parameters()), "n_trainable": sum(p.numel() for p in model.parameters()),
            "adam": sizes(t for s in state.values() for t in s.values() if isinstance(t, torch.Tensor)),
            "flops_per_token": train.flops_per_token(model, cfg["block_size"]), "dtype": dtype,
            "zero": hasattr(optimizer, "consolidate_state_dict")}


def module_to_in_place(to):
    """nn.Module.to for fake tensors: a no-op where every tensor is on the target device already (lrc.py's norms:
    built on the device, then .to(it)); Module._apply swaps a FakeTensor parameter even then, which fails while
    the fake mode holds a weak reference to it."""
    def module_to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and all(t.device == device for t in [*self.parameters(), *self.buffers()]) \
                and not any(isinstance(a, torch.dtype) for a in [*args, *kwargs.values()]):
            return self
        return to(self, *args, **kwargs)
    return module_to


COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all_single", "send", "recv")


def on_device_only(collective, device):
    """A collective that refuses tensors on another device than the run's, with nccl's message. (The fake process
    group does it for 'cuda:fake'; on the stand-in device it accepts CPU tensors, so the check is made here.)"""
    def checked(*args, **kwargs):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.device.type != device:
                raise RuntimeError(f"No backend type associated with device type {t.device.type}")
        return collective(*args, **kwargs)
    return checked


def dry_run(cfg, world):
    """step_and_eval on fake tensors of the fake GPU device, with a fake process group of `world` ranks (this is
    rank 0): collectives check their tensors' device as nccl does, and move no data."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    setup_fake_device()
    if dist.is_initialized():
        dist.destroy_process_group()
    if world > 1:
        dist.init_process_group(f"{FAKE_DEVICE}:fake", store=FakeStore(), rank=0, world_size=world)
    try:
        with contextlib.ExitStack() as stack:
            for name in COLLECTIVES:
                stack.enter_context(patch.object(dist, name, on_device_only(getattr(dist, name), FAKE_DEVICE)))
            return fake_run(cfg, world, FAKE_DEVICE)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def fake_run(cfg, world, device):
    """step_and_eval on fake tensors of device, the teacher built from its config.json alone."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    gpu = FakeGPU(device)
    with patch.object(Transformer, "from_pretrained", classmethod(from_config_json)), \
            patch.object(torch.nn.Module, "to", module_to_in_place(torch.nn.Module.to)), \
            FakeTensorMode(), gpu, LiveBytes() as mem:
        return step_and_eval(cfg, world, device, mem, hooks=[gpu.clear_cache])


def measured_cpu(cfg):
    """The same step and evaluation for real on the CPU (one process), in this fresh process: peak RSS above the
    RSS before the model is built, and what LiveBytes (fake tensors, device cpu) predicts for it."""
    with LiveBytes() as mem:  # a warm-up of the same code at a tiny size: libraries' one-time memory is paid here
        step_and_eval({**cfg, "batch_size": 1, "block_size": 8}, 1, "cpu", mem)
    base = mem_mark("cpu")
    step_and_eval(cfg, 1, "cpu", LiveBytes())
    measured = mem_peak("cpu") - base
    return {"measured": measured, "predicted": fake_run(cfg, 1, "cpu")["peak"]}



def memory_rows(r, world):
    """(name, bytes) rows of a dry run's report: what is held for the whole run, then the step's peak by label."""
    held = [("teacher (frozen, bf16)" if r["dtype"] == "bfloat16" else "teacher (frozen)", r["teacher"]),
            ("trainable parameters (fp32)", r["trainable"]),
            (f"Adam state{' (zero: 1/%d of it)' % world if r['zero'] else ''}", r["adam"])]
    return held


def bench_memory(argv):
    recipes = [a for a in argv if a.endswith(".py") and not a.startswith("--")]
    cfg = configure_or_exit({**train.DEFAULTS, **MEMORY_OPTS}, argv)
    check_ranges(cfg, {"world_size": AT_LEAST_1})
    train.check_config(cfg)
    if cfg["checkpoint"]:  # the recomputation in backward aborts the process on the fake device (not understood)
        raise ConfigError("--checkpoint=True: the dry run cannot predict activation checkpointing yet; on an H100 it "
                          "halved the Qwen recipe's peak (README, On GPUs): predict without it")
    if not cfg["teacher"]:
        name = next((SHAPES[os.path.basename(r)] for r in reversed(recipes) if os.path.basename(r) in SHAPES), None)
        if name is None:
            sys.exit(f"error: set --teacher= to an HF dir (only its config.json is read); known recipes: {list(SHAPES)}")
        cfg["teacher"] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "shapes", name)
    world = cfg["world_size"]
    cfg, tokens_per_step = train.resolve_batch(cfg, world)
    print(f"memory {cfg['method']} | teacher {cfg['teacher']} | d_student {cfg['d_student']} | {world} ranks x "
          f"{cfg['grad_accum']} micro-batches x {cfg['batch_size']} x {cfg['block_size']} = {tokens_per_step:,} "
          f"tokens per step | zero {cfg['zero']} | checkpoint {cfg['checkpoint']}")
    print(f"dry run on fake '{FAKE_DEVICE}' tensors (nothing allocated), fake process group of {world}; "
          f"torch.compile skipped (compile={cfg['compile']} in the recipe)")
    try:
        r = dry_run(cfg, world)
    except RuntimeError as e:
        if "No backend type associated with device type" in str(e):
            sys.exit(f"error: a collective received a tensor on another device than the run's ({FAKE_DEVICE}, a GPU "
                     f"on a real run), as nccl would refuse it: {e}")
        raise
    at = r["at_peak"]
    print(f"{r['n_trainable']:,} trainable parameters | {r['dtype']} | "
          f"{tokens_per_step * r['flops_per_token'] / 1e12:,.1f} TFLOP per step "
          f"({r['flops_per_token'] / 1e9:.2f} GFLOP per token, train.flops_per_token)")
    print_table(["held for the whole run", "GiB"], [[k, f"{v / 2**30:.2f}"] for k, v in memory_rows(r, world)])
    order = ["teacher (frozen)", "trainable parameters", "Adam state", "gradients", "generated weights",
             "generated weights' grads", "activations", "loss head", "backward", "optimizer step"]
    rows = [[k, f"{at[k] / 2**30:.2f}"] for k in order + sorted(set(at) - set(order)) if at.get(k)]
    print_table(["at the step's peak, live", "GiB"], rows + [["total (step peak)", f"{r['step_peak'] / 2**30:.2f}"]])
    print(f"evaluation peak: {r['eval_peak'] / 2**30:.2f} GiB (student materialised in bf16 + chunked val logits)")
    print("not counted: the CUDA context and NCCL buffers (~1 GiB), allocator rounding and fragmentation")
    print(f"predicted peak per GPU: {r['peak'] / 2**30:.2f} GiB")
    return r

if __name__ == "__main__":
    commands = {"model": (MODEL_OPTS, bench_model), "head": (HEAD_OPTS, bench_head), "step": (None, bench_step),
                "smoke": (SMOKE_OPTS, bench_smoke), "memory": (None, bench_memory), "official": (None, bench_official)}
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    if sys.argv[1] not in commands:
        print(f"error: unknown command {sys.argv[1]!r}: choose one of {list(commands)} (python bench.py -h)",
              file=sys.stderr)
        sys.exit(2)
    opts, fn = commands[sys.argv[1]]
    run_or_exit(lambda: fn(sys.argv[2:] if opts is None else configure_or_exit(opts, sys.argv[2:])))
