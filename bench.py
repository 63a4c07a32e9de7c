"""
Benchmarks that print tables (they are not tests). Machines are noisy: compare inside one run, as
ratios. Numbers measured with them: see results/README.md (speed.md, gpu.md).

    python bench.py model [--teacher=HF_DIR] [--dtype=bfloat16]     # ours vs transformers
    python bench.py step [config.py ...] [--key=value ...] [--variants=fp32,bf16,bf16+compile]
    python bench.py head [--vocab=151936 --tokens=2048 --d=1200 --d_teacher=2048]
    python bench.py memory config/lrc_qwen.py [--world_size=8] [--key=value ...]   # memory.py
    python bench.py tokenize --source='corpus/*.parquet' [--tokenizer=HF_DIR] [--num_proc=1,2]

model  forward tokens/s (batch_size x block_size, no grad) and greedy generation tokens/s (batch 1,
       a random prompt of prompt_len tokens, new_tokens new ones, KV cache) of our model and of
       transformers.AutoModelForCausalLM (a test extra, imported here only) on the same HF dir
       (default: the demo teacher), run alternately, median of iters after warmup; plus their
       logits' max |diff| and greedy agreement.
step   one training step of a train.py config (default config/lrc_demo.py and the demo teacher) on
       random tokens (grad_accum micro-batches of batch_size x block_size): forward, backward,
       optimizer (clip + Adam); timed alone, the teacher forward (no grad) and the loss head
       (losses.distill_head, forward + backward, on random hidden states of the step's shape); the
       student forward is then about forward - teacher - head. tokens/s, MFU (train.flops_per_token
       against train.peak_flops, or --peak_tflops), peak memory. --variants: one row each,
       '+'-joined parts of VARIANTS (fp32 | bf16 | compile | eager | recompute, i.e. activation
       checkpointing | permicro, LRC weights generated per micro-batch instead of once per step) on
       top of the config.
head   the loss stage alone, plain (full logits h @ W.T, losses.distill_losses, backward) vs fused
       (losses.distill_head, backward): time and peak memory above the inputs, and the two's max
       |diff| in losses and gradients.
tokenize  data.py's tokens/s (per wall and CPU second) against tiktoken and HF tokenizers on the
       same documents (results/data.md).
memory the memory planner, run from here: memory.py (its docstring says what it predicts).
Peak memory is torch.cuda.max_memory_allocated on CUDA and the process's peak RSS on CPU (VmHWM, or
ru_maxrss off Linux), so every variant and stage runs in a fresh process; a step's peak covers its
whole run, warm-up and compilation included. MFU counts model FLOPs (teacher forward included)
against the bf16 peak, for every variant. The options of each command (MODEL_OPTS, STEP_OPTS +
train.DEFAULTS, HEAD_OPTS) are set as --key=value (configurator.py: unknown keys and wrong types are
errors); device=auto picks cuda when available. The official LRC code's step beside nanoLRC's:
tools/official.py.
"""
import multiprocessing
import os
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from statistics import median

import torch

import common
import demo
import lrc
import train
from configurator import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, ConfigError, check_ranges,
                          configure_or_exit, run_or_exit)
from losses import distill_head, distill_losses
from model import Transformer

MODEL_OPTS = dict(teacher="", device="auto", dtype="float32", batch_size=8, block_size=256,
                  prompt_len=16, new_tokens=64, warmup=2, iters=5, compile=True)
# beside every key of train.DEFAULTS; one_pass=False generates LRC's weights per micro-batch (the
# baseline); stages: time the teacher and the loss head alone as well
STEP_OPTS = dict(variants="", peak_tflops=0.0, warmup=1, iters=3, one_pass=True, stages=True)
HEAD_OPTS = dict(vocab=151936, tokens=2048, d=1200, d_teacher=2048, temperature=40.0, device="auto",
                 dtype="float32", warmup=0, iters=2, seed=0)
VARIANTS = {"fp32": ("dtype", "float32"), "bf16": ("dtype", "bfloat16"),
            "compile": ("compile", True), "eager": ("compile", False),
            "recompute": ("recompute", True), "permicro": ("one_pass", False)}
HEAD_RTOL = {"float32": 1e-3, "bfloat16": 5e-2}  # max |fused - plain| / max |plain| allowed


# -----------------------------------------------------------------------------
# timing, memory, processes, tables

def pick_device(device):
    return common.resolve_device(device)  # auto: cuda if available; one the machine lacks: an error


def autocast_for(device, dtype):
    """bf16 = autocast with fp32 weights, as in train.py."""
    if dtype != "bfloat16":
        return nullcontext()
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)


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
    """(wall seconds, CPU seconds of this process, all threads) of fn(). On a shared machine the CPU
    seconds move less with the load than the wall time does."""
    c0 = time.process_time()
    _, t = timed(device, fn)
    return t, time.process_time() - c0


def mem_mark(device):
    """Start a peak-memory window; return the bytes in use now (CUDA: allocated; CPU: resident)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if os.path.exists("/proc/self/statm"):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return mem_peak(device)  # no /proc (macOS): the peak so far is the nearest we can read


def mem_peak(device):
    """Peak bytes: CUDA max allocated; CPU peak RSS, from VmHWM on Linux because a spawned child's
    ru_maxrss also holds the parent's RSS at the fork before exec."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    kib = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib


def in_fresh_process(fn, *args):
    """fn(*args) in a new Python process (spawn), so that the peak RSS it reports is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def gib(n):
    return f"{n / 2**30:.3f} GiB"


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))


def system(device):
    cuda = device.startswith("cuda")
    where = (torch.cuda.get_device_name(device) if cuda
             else f"cpu, {torch.get_num_threads()} threads")
    return f"{where} | python {platform.python_version()} torch {torch.__version__}"


# -----------------------------------------------------------------------------
# model: ours vs transformers

def bench_model(o):
    sizes = ("batch_size", "block_size", "prompt_len", "new_tokens", "iters")
    check_ranges(o, {**dict.fromkeys(sizes, AT_LEAST_1), "warmup": NON_NEGATIVE},
                 {"dtype": ("float32", "bfloat16", "float16")})
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.utils.logging.disable_progress_bar()
    device, dtype = pick_device(o["device"]), getattr(torch, o["dtype"])
    path = o["teacher"] or demo.convert_teacher()
    ours = Transformer.from_pretrained(path, device=device, dtype=dtype).eval()
    theirs = AutoModelForCausalLM.from_pretrained(path).to(device=device, dtype=dtype).eval()
    torch.manual_seed(0)
    x = torch.randint(ours.config.vocab_size, (o["batch_size"], o["block_size"]), device=device)
    prompt = torch.randint(ours.config.vocab_size, (1, o["prompt_len"]), device=device)
    n = o["new_tokens"]
    gen_theirs = lambda: theirs.generate(  # noqa: E731
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
        min_new_tokens=n)[:, prompt.shape[1]:]
    gen_ours = lambda compile: lambda: torch.stack(  # noqa: E731
        list(ours.generate(prompt, n, compile=compile)), 1)
    runs = {  # (name, tokens per call): (ours, theirs)
        (f"forward tok/s ({o['batch_size']}x{o['block_size']})", x.numel()):
            (lambda: ours(x)[0], lambda: theirs(x, use_cache=False).logits),  # neither has a cache
        (f"generate tok/s (batch 1, {n} new)", n): (gen_ours(False), gen_theirs),
    }
    if o["compile"]:  # the compiled one-token step over the static cache; warmup includes compiling
        runs[f"generate tok/s, compiled step (batch 1, {n} new)", n] = (gen_ours(True), gen_theirs)
    print(f"model {path} | {o['dtype']} | {system(device)} transformers {transformers.__version__}")
    rows, outs = [], {}
    with torch.no_grad():
        for (name, tokens), fns in runs.items():
            times = ([], [])
            for i in range(o["warmup"] + o["iters"]):
                for who, fn in enumerate(fns):  # alternate: drift in the machine hits both alike
                    outs[name, who], t = timed(device, fn)
                    if i >= o["warmup"]:
                        times[who].append(t)
            ours_tps, theirs_tps = (tokens / median(t) for t in times)
            ratios = sorted(b / a for a, b in zip(*times))  # per round: theirs' time / ours'
            rows.append([name, f"{ours_tps:,.1f}", f"{theirs_tps:,.1f}",
                         f"{ours_tps / theirs_tps:.2f}", f"{ratios[0]:.2f}-{ratios[-1]:.2f}"])
    print_table(["", "nanoLRC", "transformers", "ours/theirs", "per round"], rows)
    (fwd, _), *gens = runs
    diff = (outs[fwd, 0].float() - outs[fwd, 1].float()).abs().max().item()
    print(f"logits max |diff| {diff:.3g}")
    for gen, _ in gens:
        same = (outs[gen, 0] == outs[gen, 1])[0].tolist() + [False]
        print(f"{gen.split(' tok/s')[0]}: greedy tokens identical for the first "
              f"{same.index(False)}/{n}")


# -----------------------------------------------------------------------------
# step: one training step, by stage, per variant

def without_pca(cfg):
    """cfg with init "normal" in place of the calibrated inits ("pca", "prune", "clone"), which need
    training data: time and memory do not depend on where the projections start."""
    return {**cfg, "init": "normal" if cfg["init"] in lrc.CALIBRATED_INITS else cfg["init"]}


def variant_config(cfg, name):
    cfg = dict(cfg)
    for part in name.split("+"):
        if part not in VARIANTS:
            raise ConfigError(f"unknown variant part {part!r} in {name!r}; "
                              f"choose from {list(VARIANTS)}")
        cfg[VARIANTS[part][0]] = VARIANTS[part][1]
    return cfg


def step_variant(cfg):
    """Median stage times and the peak memory of one training step of cfg (in a fresh process)."""
    device, dtype = common.resolve_system(cfg)
    torch.manual_seed(cfg["seed"])
    model = common.build_model(without_pca(cfg), device, dtype)
    optimizer = train.make_optimizer(model, cfg)
    fwd = torch.compile(model) if cfg["compile"] else model
    autocast = autocast_for(device, dtype)
    B, T, V = cfg["batch_size"], cfg["block_size"], model.config.vocab_size
    xs = torch.randint(V, (cfg["grad_accum"], 2, B, T), device=device)  # micro-batches of (x, y)
    x, y = xs[0]
    teacher = model.teacher
    if teacher is None:
        raise ValueError(f"bench.py step times distillation: method {cfg['method']!r} has no "
                         "teacher")

    def step():
        """grad_accum micro-batches as train.py runs them. With one_pass, generating the step's
        weights counts as forward and the one pass of their gradients into the projections as
        backward."""
        ctx = model.accumulate() if cfg["one_pass"] else nullcontext()
        with autocast:
            weights, t_fwd = timed(device, ctx.__enter__)  # None: each forward generates its own
            t_bwd = 0.0
            for mx, my in xs:
                (loss, _), t = timed(device, lambda: fwd(mx, my) if weights is None
                                     else fwd(mx, my, weights))
                t_fwd += t
                t_bwd += timed(device, (loss / len(xs)).backward)[1]
            t_bwd += timed(device, lambda: ctx.__exit__(None, None, None))[1]
        _, t_opt = timed(device, lambda: (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"]),
            optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        return {"forward": t_fwd, "backward": t_bwd, "optimizer": t_opt}

    # the stages timed alone; the head gets random hidden states and student head of the step's
    # shape
    h_s = torch.randn(B, T, model.config.hidden_size, device=device, requires_grad=True)
    w_s = (0.02 * torch.randn(V, model.config.hidden_size, device=device)).requires_grad_()
    h_t = torch.randn(B, T, teacher.config.hidden_size, device=device)

    def parts():
        with autocast, torch.no_grad():
            _, t_teacher = timed(device, lambda: teacher.hidden(x))
        with autocast:
            _, t_head = timed(device, lambda: distill_head(
                h_s, w_s, h_t, teacher.lm_head.weight, y, cfg["temperature"],
                cfg["kl_reduction"])[0].backward())
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
    return {**out, "peak": peak, "above_model": peak - base,
            "flops": len(xs) * B * T * train.flops_per_token(model, T), "system": system(device),
            "dtype": dtype}


def bench_step(argv):
    if not any(a.endswith(".py") and not a.startswith("--") for a in argv):
        root = os.path.dirname(os.path.abspath(__file__))
        argv = [os.path.join(root, "config", "lrc_demo.py"), *argv]
    cfg = configure_or_exit({**train.DEFAULTS, **STEP_OPTS}, argv)
    check_ranges(cfg, {"iters": AT_LEAST_1, "warmup": NON_NEGATIVE, "peak_tflops": NON_NEGATIVE})
    train.check_config(cfg)
    train.resolve_batch(cfg, 1)
    pick_device(cfg["device"])
    names = [v for v in cfg["variants"].split(",") if v] or ["compile" if cfg["compile"]
                                                             else "eager"]
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
        peak = cfg["peak_tflops"] * 1e12 or train.peak_flops(common.resolve_system(v)[0])
        first = first or (step, r["peak"])
        ms = (r["teacher"], r["forward"] - r["teacher"] - r["head"], r["head"], r["forward"],
              r["backward"], r["optimizer"], step)
        rows.append([f"{name} ({r['dtype']})", *(f"{1e3 * t:,.1f}" for t in ms),
                     f"{tokens / step:,.1f}", f"{r['flops'] / step / peak:.1%}" if peak else "n/a",
                     gib(r["peak"]), gib(r["above_model"]), f"{first[0] / step:.2f}",
                     f"{r['peak'] / first[1]:.2f}"])
    print(r["system"])
    print_table(["variant", "teacher ms", "student~ ms", "head ms", "forward ms", "backward ms",
                 "optim ms", "step ms", "tok/s", "MFU", "peak mem", "above model", "speed x",
                 "mem x"], rows)
    print("student~ = forward - teacher - head (timed alone); speed x and mem x are relative to "
          "the first row")


# -----------------------------------------------------------------------------
# head: the loss stage, plain vs fused

def head_stage(o, mode, check):
    """Median time and peak memory of one loss stage (run in a fresh process); with check, the max
    |diff| of losses and gradients against the other mode as well (after the peak is read)."""
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
    runs = [timed(device, lambda: run(mode))[1] for _ in range(o["warmup"] + o["iters"])]
    times = runs[o["warmup"]:]
    out = {"time": median(times), "peak": mem_peak(device) - base, "system": system(device)}
    if check:
        ref = {k: v.float().clone() for k, v in run(mode).items()}
        other = run("fused" if mode == "plain" else "plain")
        out["diff"] = {k: ((other[k].float() - v).abs().max().item(), v.abs().max().item())
                       for k, v in ref.items()}
    return out


def bench_head(o):
    check_ranges(o, {**dict.fromkeys(("vocab", "tokens", "d", "d_teacher", "iters"), AT_LEAST_1),
                     "warmup": NON_NEGATIVE, "temperature": POSITIVE}, {"dtype": tuple(HEAD_RTOL)})
    pick_device(o["device"])
    plain = in_fresh_process(head_stage, o, "plain", True)
    fused = in_fresh_process(head_stage, o, "fused", False)
    print(f"loss head | {o['tokens']:,} tokens, vocab {o['vocab']:,}, d_S {o['d']}, "
          f"d_T {o['d_teacher']}, T {o['temperature']} | {o['dtype']} | {plain['system']}")
    stages = (("plain: logits + distill_losses + backward", plain),
              ("fused: distill_head + backward", fused))
    print_table(["stage", "time ms", "peak mem above inputs", "time x", "mem x"], [
        [name, f"{1e3 * r['time']:,.1f}", gib(r["peak"]), f"{r['time'] / plain['time']:.2f}",
         f"{r['peak'] / max(plain['peak'], 1):.2f}"] for name, r in stages])
    tol = HEAD_RTOL[o["dtype"]]
    rel = {k: d / max(scale, 1e-30) for k, (d, scale) in plain["diff"].items()}
    print_table(["fused vs plain", "max |diff|", "max |plain|", "relative"],
                [[k, f"{d:.3g}", f"{scale:.3g}", f"{rel[k]:.2g}"]
                 for k, (d, scale) in plain["diff"].items()])
    ok = all(r <= tol for r in rel.values())
    print(f"{'agree' if ok else 'DISAGREE'}: every relative difference "
          f"{'<=' if ok else 'is not <='} {tol:g}")
    if not ok:
        sys.exit(1)


def bench_memory(argv):
    """python bench.py memory ... runs python memory.py ...: the planner lives in memory.py."""
    import memory  # here, not at the top: memory.py imports this file's helpers
    return memory.main(argv)


def bench_tokenize(argv):
    """python bench.py tokenize --source='corpus/*.parquet' [--tokenizer=HF_DIR] [--num_proc=1,2]
    [--repeat=2]: tokens/s of data.py's preparation of a source (parquet shards of text, say)
    against the bare tokenizers on the same documents at the same process counts: tiktoken's
    encode_ordinary_batch (data.py's Encoding without its special-token and unk handling) and HF
    tokenizers' encode_batch (what datasets.map runs), each process encoding its share of the
    documents on one thread. data.py's time is the whole command's: reading, tokenizing, writing.
    The best of repeat runs of each, alternated."""
    import tempfile

    import data
    import sources
    from tokenizer import load_tokenizer
    o = configure_or_exit(dict(tokenizer="", source="", num_proc="1,2", repeat=2), argv)
    if not o["source"]:
        raise ConfigError("no --source set: pass --source=PATH (a data.py source)")
    path = o["tokenizer"] or demo.convert_teacher()
    tok, src = load_tokenizer(path), sources.parse_source(o["source"])
    docs = [d for f in sources.source_files(src) for r in sources.read_records(f, src)
            if isinstance(d := sources.document(r, src), str)]
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"{len(docs):,} documents, {n_bytes / 2**20:.1f} MiB of text | {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f} | tokenizer {os.path.basename(path)}")

    def processes(n, encode):  # tokens of n forked processes encoding a share of the documents each
        ctx = multiprocessing.get_context("fork")
        queue = ctx.SimpleQueue()
        procs = [ctx.Process(target=lambda k=k: queue.put(encode(docs[k::n]))) for k in range(n)]
        for p in procs:
            p.start()
        tokens = sum(queue.get() for _ in procs)
        for p in procs:
            p.join()
        return tokens

    def measured(run):  # (tokens, wall s, CPU s of this process and its children, all cores)
        def cpu():
            usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
            return sum(r.ru_utime + r.ru_stime for r in usage)
        c0, t0 = cpu(), time.perf_counter()
        tokens = run()
        return tokens, time.perf_counter() - t0, cpu() - c0

    def tiktoken_side(share):
        return sum(map(len, tok.enc.encode_ordinary_batch(share, num_threads=1)))

    def hf_side(share):
        os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool
        import tokenizers
        hf = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        return sum(len(e.ids) for i in range(0, len(share), 1000)  # datasets.map's batch size
                   for e in hf.encode_batch(share[i:i + 1000], add_special_tokens=False))

    def data_side(n):
        with tempfile.TemporaryDirectory() as tmp:
            meta = data.prepare(tok, [src], os.path.join(tmp, "out"), num_proc=n)
        # without the EOS data.py adds to each document
        return sum(meta["tokens"].values()) - sum(meta["documents"].values())

    rows = []
    for n in [int(x) for x in str(o["num_proc"]).split(",")]:
        best = {}  # the best of repeat runs: (tokens / wall s, tokens / CPU s, tokens)
        for _ in range(o["repeat"]):
            for name, run in (("data.py", lambda: data_side(n)),
                              ("tiktoken", lambda: processes(n, tiktoken_side)),
                              ("tokenizers", lambda: processes(n, hf_side))):
                tokens, wall, cpu = measured(run)
                old = best.get(name, (0, 0, 0))
                best[name] = (max(old[0], tokens / wall), max(old[1], tokens / cpu), tokens)
        names = ("data.py", "tiktoken", "tokenizers")
        rows.append([n, *(f"{best[k][0] / 1e6:.2f}M" for k in names),
                     *(f"{best[k][1] / 1e6:.2f}M" for k in names),
                     f"{best['data.py'][1] / best['tiktoken'][1]:.2f}",
                     f"{best['data.py'][2]:,} / {best['tiktoken'][2]:,}"])
    print_table(["num_proc", "data.py tok/s", "tiktoken tok/s", "tokenizers tok/s",
                 "data.py tok/CPU-s", "tiktoken tok/CPU-s", "tokenizers tok/CPU-s",
                 "data.py / tiktoken per CPU-s", "tokens data.py / tiktoken"], rows)


if __name__ == "__main__":
    commands = {"model": (MODEL_OPTS, bench_model), "step": (None, bench_step),
                "head": (HEAD_OPTS, bench_head), "memory": (None, bench_memory),
                "tokenize": (None, bench_tokenize)}
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    if sys.argv[1] not in commands:
        print(f"error: unknown command {sys.argv[1]!r}: choose one of {list(commands)} "
              "(python bench.py -h)", file=sys.stderr)
        sys.exit(2)
    opts, fn = commands[sys.argv[1]]
    run_or_exit(lambda: fn(sys.argv[2:] if opts is None else configure_or_exit(opts, sys.argv[2:])))
