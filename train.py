"""
Train a student from a frozen teacher: Low-Rank Clone (default), one loop for every method.

    python train.py config/lrc_demo.py                          # one process (CPU or one GPU)
    python train.py config/lrc_demo.py --resume=True             # continue from out_dir/ckpt.pt
    torchrun --nproc_per_node=8 train.py config/lrc_qwen.py      # data parallel on one node
    # two nodes: run on each, with --node_rank=0 / 1
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \\
        train.py config/lrc_qwen.py
    torchrun --nproc_per_node=8 train.py config/lrc_qwen.py config/ablation_no_ffn.py  # an ablation
    torchrun --nproc_per_node=8 train.py config/kd_qwen.py       # baselines: kd | tinybert | lm | sft

Every key in DEFAULTS can be set from a config file or as --key=value (configurator.py).
The checkpoint out_dir/ckpt.pt holds the trainable state, the optimizer, the step and the config;
the finished student is exported as an HF dir to out_dir/student.
"""
import datetime
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common import (METHODS, build_model, check_teacher, load_checkpoint, resolve_system,
                    save_checkpoint, tokenizer_dir)
from configurator import (AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, ConfigError, check_ranges,
                          configure_or_exit, run_or_exit)
from data import Batches, check_compatible
from losses import head_chunk
from lrc import CALIBRATED_INITS, CLONE_TERMS
from model import RMSNorm
import shard
from tokenizer import load_tokenizer

DEFAULTS = dict(
    # I/O
    teacher="",  # HF dir of the teacher (config.json, safetensors, tokenizer.json)
    data_dir="",  # prepared by data.py with the teacher's tokenizer
    out_dir="out/lrc",  # ckpt.pt, metrics.jsonl and the exported student/ go here
    resume="false",  # "true": continue from out_dir/ckpt.pt (an error if there is none); "auto":
    # continue if there is one, else start (one job script starts and re-queues a run)
    # method: LRC (paper Sec. 4)
    method="lrc",  # lrc | kd | tinybert | lm | sft (the last four: baselines.py)
    d_student=256,  # the student's residual width (LRC; also the baselines' default hidden size)
    clone_terms=",".join(CLONE_TERMS),  # ablations: drop terms, e.g. "q,k,v,attn_out" (w/o FFN)
    alignment="reuse",  # "explicit": separate alignment matrices (ablation)
    init="normal",  # projections: "normal" N(0, init_std) as in the paper, "identity" (the first
    # d_S coordinates), or calibrated on 32 train windows (inits.py): "pca" (the teacher's top-d_S
    # residual subspace), "prune" (the d_S most active coordinates, as Minitron prunes width) or
    # "clone" (pca, then each layer's projections by least squares: LRC's clone objective solved)
    init_std=0.02,  # std of LRC's projections (init "normal") and of from-scratch weights (kd, ...)
    alpha=0.5,  # weight of the clone loss
    temperature=40.0,  # of the KL (lrc, kd, tinybert)
    kl_reduction="batchmean",  # the official scaling; "token" = mean over tokens (lrc, kd, tinybert)
    clone_norm="none",  # "target": each clone term / its target's mean square (not in the paper)
    clone_skip=0,  # leave the first positions of each window (the attention sink) out of the clone
    # loss
    # baselines (baselines.py): students from scratch (kd, tinybert, lm) or a fine-tuned model (sft)
    student_config="",  # config.json (or HF dir) of the student; "": the teacher's, d_student wide
    init_from="",  # lm, sft, kd: train this HF dir (weights, tokenizer); required by sft
    alpha_kl=0.5,  # kd: L = alpha_kl * KL + (1 - alpha_kl) * LM
    # batch
    batch_size=8,  # sequences per micro-batch per process
    block_size=256,  # tokens per sequence
    grad_accum=1,  # micro-batches per optimizer step per process (from tokens_per_step if set)
    tokens_per_step=0,  # > 0: tokens per optimizer step over all ranks, whatever the world size:
    # grad_accum = tokens_per_step / (batch_size * block_size * ranks), an error if not whole
    max_tokens=0,  # > 0: train on this many tokens (max_steps = max_tokens // tokens per step)
    sampling="random",  # train windows: "random" (with replacement) or "epoch" (each packed window
    # once per epoch in a seeded order, as the paper's one pass over its data; data.Batches)
    # optimizer: Adam, warmup then decay (paper: linear)
    lr=6.7e-5,  # peak learning rate
    min_lr=0.0,  # learning rate at the end of the decay
    warmup_ratio=0.005,  # linear warmup over this fraction of max_steps
    decay="linear",  # or "cosine"
    beta1=0.9,  # Adam betas
    beta2=0.999,
    weight_decay=0.0,  # Adam's (L2) weight decay; the paper uses none
    grad_clip=1.0,  # clip the global gradient norm (0: off)
    max_steps=1000,  # optimizer steps (the lr schedule spans them); from max_tokens if set
    max_minutes=0.0,  # > 0: stop (evaluate, save, export) after this wall time
    skip_nonfinite=3,  # a step whose loss or gradient is not finite is skipped (no update, a warning,
    # counted in metrics.jsonl); more than this many in a row stop the run (0: stop at the first)
    # evaluation, logging, checkpoints
    eval_interval=200,  # steps between evaluations on the val split (and at the end)
    eval_batches=8,  # val batches per evaluation (fixed windows, the same every time)
    log_interval=10,  # steps between log lines / metrics rows
    ckpt_interval=200,  # steps between checkpoints (and at the end)
    wandb_log=False,  # also log metrics.jsonl's rows to Weights & Biases (rank 0; pip install wandb)
    wandb_project="nanolrc",
    wandb_run_name="",  # "": out_dir's name
    export_dtype="float32",  # dtype of the exported student
    # system
    device="auto",  # auto: cuda if available, else cpu
    dtype="auto",  # auto: bfloat16 on cuda, else float32; bfloat16: autocast, fp32 master weights
    compile=False,  # torch.compile the training forward (minutes to compile on CPU, then faster)
    recompute=False,  # LRC: activation checkpointing per (teacher, student) layer pair: their
    # activations are recomputed in the backward instead of kept (less memory, more compute)
    zero=False,  # shard Adam's state over the ranks (ZeRO-1: torch's ZeroRedundancyOptimizer; the
    # gradients are still all-reduced whole, and each rank broadcasts its updated parameters)
    shard="none",  # LRC with FSDP2 (shard.py): "trainable" shards the projections, their gradients
    # and Adam's state per layer (ZeRO-3); "all" also the teacher's layers. Checkpoint: ckpt.dcp
    dist_timeout_minutes=30.0,  # how long a rank waits in a collective before the run fails: the
    # others wait while rank 0 writes a checkpoint (GBs for the large recipes) to a shared filesystem
    seed=1337,  # initialisation and data order
)


# -----------------------------------------------------------------------------
# setup

def setup_distributed(device, timeout_minutes):
    """(rank, local_rank, world_size, device). Without torchrun: a single process. timeout_minutes:
    how long a collective waits for the slowest rank before the run fails."""
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), local_rank, dist.get_world_size(), device


def check_shared(out_dir, rank, world, device):
    """Only rank 0 writes checkpoints and the export, and every rank reads ckpt.pt on resume, so
    out_dir must be one dir that every rank sees (across nodes: a shared filesystem). Rank 0 writes
    a token there under a new name; a rank that cannot read it back stops every rank with one line,
    before anything is loaded or written."""
    if world == 1:
        return
    token = torch.tensor([int.from_bytes(os.urandom(4), "little") if rank == 0 else 0],
                         device=device)
    dist.broadcast(token, 0)
    path = os.path.join(out_dir, f".shared_check_{token.item()}")
    if rank == 0:
        with open(path, "w") as f:
            f.write(str(token.item()))
    dist.barrier()
    try:
        with open(path) as f:
            seen = f.read() == str(token.item())
    except OSError:
        seen = False
    blind = torch.zeros(world, device=device)
    blind[rank] = float(not seen)
    dist.all_reduce(blind)  # every rank learns which ranks cannot see out_dir
    if rank == 0:
        os.remove(path)
    if blind.any():
        raise ValueError(f"--out_dir={out_dir} is not the same dir on every rank: ranks "
                         f"{blind.nonzero().flatten().tolist()} do not see rank 0's files there; "
                         "only rank 0 writes checkpoints and every rank reads them, so put out_dir "
                         "on a filesystem that every node shares")


def check_config(cfg):
    """The ranges of the settings train() reads (the batch's: resolve_batch; the method's: the model
    classes)."""
    unit = (lambda v: 0 <= v < 1, "in [0, 1)")
    check_ranges(cfg, {
        **dict.fromkeys(("eval_interval", "eval_batches", "log_interval", "ckpt_interval"),
                        AT_LEAST_1),
        **dict.fromkeys(("lr", "min_lr", "weight_decay", "grad_clip", "max_minutes", "tokens_per_step",
                         "max_tokens", "alpha", "clone_skip", "init_std", "skip_nonfinite"),
                        NON_NEGATIVE),
        "temperature": POSITIVE, "dist_timeout_minutes": POSITIVE, "warmup_ratio": FRACTION,
        "alpha_kl": FRACTION,
        "beta1": unit, "beta2": unit,
    }, {"decay": ("linear", "cosine"), "method": METHODS,
        "export_dtype": ("float32", "bfloat16", "float16"), "shard": shard.SHARDS})
    if cfg["shard"] != "none" and cfg["zero"]:
        raise ConfigError(f"--shard={cfg['shard']} shards Adam's state already: leave --zero=False")
    if cfg["shard"] != "none" and cfg["method"] != "lrc":
        raise ConfigError(f"--shard={cfg['shard']}: only method 'lrc' is sharded; the baselines train "
                          "replicated (--shard=none)")


def calibration_tokens(cfg, device, windows=32):
    """Train windows for the inits that calibrate (lrc.CALIBRATED_INITS), the same on every rank
    (rank 0's first micro-batches of step 0)."""
    b = Batches(cfg["data_dir"], cfg["batch_size"], cfg["block_size"], seed=cfg["seed"],
                device=device,
                sampling=cfg["sampling"])
    n_micro = -(-windows // cfg["batch_size"])
    return torch.cat([b.get_batch("train", 0, m)[0] for m in range(n_micro)])


def resolve_batch(cfg, world):
    """(cfg with grad_accum and max_steps derived from the token budget, tokens per step). With
    tokens_per_step and max_tokens a recipe trains the same global batch and the same tokens on any
    number of ranks."""
    check_ranges(cfg, dict.fromkeys(("batch_size", "block_size", "grad_accum", "max_steps"),
                                    AT_LEAST_1))
    cfg = dict(cfg)
    per_micro = cfg["batch_size"] * cfg["block_size"] * world  # one micro-batch on every rank
    if cfg["tokens_per_step"] > 0:
        if cfg["tokens_per_step"] % per_micro:
            raise ValueError(f"tokens_per_step {cfg['tokens_per_step']:,} is not a multiple of "
                             f"batch_size x block_size x ranks = {cfg['batch_size']} x "
                             f"{cfg['block_size']} x {world}: choose a batch_size or a number of "
                             "processes that divides it")
        cfg["grad_accum"] = cfg["tokens_per_step"] // per_micro
    tokens_per_step = per_micro * cfg["grad_accum"]
    if cfg["max_tokens"] > 0:
        cfg["max_steps"] = max(1, cfg["max_tokens"] // tokens_per_step)
    return cfg, tokens_per_step


def all_reduce_mean(tensors, world):
    """Average tensors over ranks in place, as one flat buffer (one collective per step). Plain
    all-reduce rather than DDP: with one projection pass per step the gradients only exist at the
    end of it anyway."""
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    for t, v in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(v.view_as(t))


def stop_everywhere(stop: bool, device) -> bool:
    """True on every rank if it is True on any: each rank reads its own clock, and all ranks must
    enter the same collective next (an evaluation's or the gradients' all-reduce), or the run
    hangs."""
    if not dist.is_initialized():
        return stop
    flag = torch.tensor([float(stop)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def make_optimizer(model, cfg):
    """Adam over every trainable parameter. zero: each rank keeps the Adam state of its shard of the
    parameters only and broadcasts its updated shard (ZeroRedundancyOptimizer), for when replicated
    state does not fit."""
    adam = dict(lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), weight_decay=cfg["weight_decay"])
    if cfg["zero"] and dist.is_initialized():
        # imported here: its import costs ~1 s
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(list(model.parameters()), optimizer_class=torch.optim.Adam,
                                       **adam)
    return torch.optim.Adam(model.parameters(), **adam)


def optimizer_state(optimizer):
    """The whole optimizer state on rank 0, None elsewhere. A sharded (zero) optimizer gathers it
    first: a collective, so every rank calls this."""
    if hasattr(optimizer, "consolidate_state_dict"):  # ZeroRedundancyOptimizer
        optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if not dist.is_initialized() or dist.get_rank() == 0 else None


def one_group(state, model):
    """An optimizer state saved with the RMSNorm weights in a second group (checkpoints of nanoLRC
    before its single group), renumbered for the single group, so that those runs resume; any other
    state as it is."""
    if len(state["param_groups"]) != 2:
        return state
    params = list(model.parameters())
    norms = {id(p) for m in model.modules() if isinstance(m, RMSNorm) for p in m.parameters()}
    saved = [p for p in params if id(p) not in norms] + [p for p in params if id(p) in norms]
    index = {id(p): j for j, p in enumerate(params)}
    group = {k: v for k, v in state["param_groups"][0].items() if k not in ("params", "lr_mult")}
    return {"state": {index[id(saved[i])]: s for i, s in state["state"].items()},
            "param_groups": [{**group, "params": list(range(len(params)))}]}


def lr_at(step, cfg):
    """Linear warmup over warmup_ratio * max_steps, then linear (paper) or cosine decay to
    min_lr."""
    warmup = max(1, round(cfg["warmup_ratio"] * cfg["max_steps"]))
    if step < warmup:
        return cfg["lr"] * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, cfg["max_steps"] - warmup))
    shape = 1 - frac if cfg["decay"] == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return cfg["min_lr"] + (cfg["lr"] - cfg["min_lr"]) * shape


def flops_per_token(model, block_size):
    """Training FLOPs per token, the teacher's forward included: 6 N for the student (forward +
    backward), 2 N for the teacher, plus attention scores over a causal context of block_size / 2 on
    average; LRC's per-step weight generation is left out (it is not per token, and small once the
    batch is large)."""
    def dense(cfg):
        L, C, hd = cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim
        attn = C * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
        return L * (attn + 3 * C * cfg.intermediate_size) + C * cfg.vocab_size
    s, t = model.config, model.teacher
    # per token per context position
    attn_scores = 2 * s.num_hidden_layers * s.num_attention_heads * s.head_dim
    if t is None:  # lm, sft
        return 6 * (dense(s) + attn_scores * block_size / 2)
    return 6 * dense(s) + 2 * dense(t.config) + (6 + 2) * attn_scores * block_size / 2


# -----------------------------------------------------------------------------
# evaluation and checkpoints

def xy(batch):
    """(x, y) of a Batches.get_batch batch; where the data has a loss mask (SFT), y is -100 where it
    is 0, so that every loss averages over the masked-in (assistant) tokens only."""
    x, y, *mask = batch
    return x, (y.masked_fill(~mask[0], -100) if mask else y)


@torch.no_grad()
def evaluate(model, batches, n_batches, autocast):
    """Student and teacher val LM loss, per-token KL(teacher || student) at T=1, top-1 agreement;
    without a teacher (lm, sft) the val loss alone. Logits are formed a chunk of tokens at a time
    (losses.head_chunk), never as whole [B, T, V] tensors."""
    student, teacher = model.student(), model.teacher
    sums = None
    for k in batches.eval_steps(n_batches):
        x, y = xy(batches.get_batch("val", k))
        with autocast:
            h_s = student.hidden(x).flatten(0, 1)  # (B*T, d_S)
            h_t = teacher.hidden(x).flatten(0, 1) if teacher is not None else None  # (B*T, d_T)
            w_t = teacher.lm_head.weight if teacher is not None else None
            s = val_sums(h_s, student.lm_head.weight, h_t, w_t, y.flatten())
        sums = s if sums is None else sums + s
    if sums is None:  # more ranks than val batches: this rank evaluated none
        sums = torch.zeros(6 if teacher is not None else 2, device=batches.device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    if teacher is None:
        return {"val_loss": (sums[0] / sums[1]).item()}
    nll_s, nll_t, kl, agree, n_valid, n = sums.tolist()
    return {"val_loss": nll_s / n_valid, "teacher_val_loss": nll_t / n_valid, "val_kl": kl / n,
            "val_agreement": agree / n}


def val_sums(h_s, w_s, h_t, w_t, y):
    """Sums over tokens, in fp32, chunk by chunk: student NLL, [teacher NLL, KL(p_T || p_S), top-1
    agreement,] targets counted (y != -100), [tokens]."""
    out, chunk = [], head_chunk(w_s.shape[0], y.device)
    for i in range(0, len(y), chunk):
        j = i + chunk
        z_s = (h_s[i:j] @ w_s.T).float()  # (chunk, V)
        nll_s = F.cross_entropy(z_s, y[i:j], ignore_index=-100, reduction="sum")
        n_valid = (y[i:j] != -100).sum().float()
        if h_t is None:
            out.append(torch.stack([nll_s, n_valid]))
            continue
        z_t = (h_t[i:j] @ w_t.T).float()  # (chunk, V)
        nll_t = F.cross_entropy(z_t, y[i:j], ignore_index=-100, reduction="sum")
        logp_s, logp_t = z_s.log_softmax(-1), z_t.log_softmax(-1)
        kl = (logp_t.exp() * (logp_t - logp_s)).sum()
        agree = (z_s.argmax(-1) == z_t.argmax(-1)).sum().float()
        out.append(torch.stack([nll_s, nll_t, kl, agree, n_valid, z_s.new_tensor(float(len(z_s)))]))
    return torch.stack(out).sum(0)


# -----------------------------------------------------------------------------
# the loop

def train_step(raw, fwd, optimizer, batches, step, cfg, world, autocast):
    """One optimizer step: grad_accum micro-batches, gradients averaged over ranks, clipped, Adam.
    LRC generates the student's weights once for all micro-batches (lrc.LowRankClone.accumulate), so
    gradients reach the projections, and are averaged over ranks, once per step; the baselines have
    no generated weights (their accumulate gives None). A step whose loss or gradient norm is not
    finite changes nothing (the same on every rank: both are averaged first). Returns (lr, mean loss
    parts, grad norm, whether Adam stepped)."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    parts_sum = {}
    with autocast, raw.accumulate() as weights:
        for micro in range(cfg["grad_accum"]):
            # SFT: targets -100 outside the loss mask
            x, y = xy(batches.get_batch("train", step, micro))
            loss, parts = fwd(x, y) if weights is None else fwd(x, y, weights)
            (loss / cfg["grad_accum"]).backward()
            for k, v in {"loss": loss.detach(), **parts}.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v.float() / cfg["grad_accum"]
    # mean over ranks of the gradients and the losses (the log shows the global batch, and a NaN on
    # any rank skips the step on every rank)
    if world > 1:
        parts = torch.stack(list(parts_sum.values()))
        grads = [p.grad for p in raw.parameters() if p.grad is not None and cfg["shard"] == "none"]
        all_reduce_mean(grads + [parts], world)  # sharded: FSDP reduce-scattered the gradients
        parts_sum = dict(zip(parts_sum, parts))
    # a NaN or inf anywhere in the gradients makes the norm NaN or inf
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"] or float("inf"))
    grad_norm = shard.full_norm(grad_norm)
    finite = torch.isfinite(torch.stack([grad_norm, *parts_sum.values()])).all().item()
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, parts_sum, grad_norm, finite


def preflight(cfg):
    """Every check that needs no file read: ranges, the device, and that a new run would not
    overwrite a checkpoint. (device, dtype). Run first, so a bad setting is refused at once
    (demo.py: before it converts)."""
    check_config(cfg)
    # its checks; train() resolves after DDP setup
    resolve_batch(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if cfg["clone_skip"] >= cfg["block_size"]:
        raise ConfigError(f"--clone_skip={cfg['clone_skip']}: must be below block_size {cfg['block_size']}, or "
                          "no position is left for the clone loss")
    if os.path.exists(cfg["out_dir"]) and not os.path.isdir(cfg["out_dir"]):
        raise ConfigError(f"--out_dir={cfg['out_dir']} is a file: choose a dir")
    if cfg["wandb_log"]:
        try:
            import wandb  # noqa: F401  (imported only when asked for)
        except ImportError:
            raise ConfigError("--wandb_log=True needs Weights & Biases: pip install wandb") from None
    device, dtype = resolve_system(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        shard.recover(cfg["out_dir"])
    ckpt_path = checkpoint_path(cfg)
    other = os.path.join(cfg["out_dir"], shard.CKPT if cfg["shard"] == "none" else "ckpt.pt")
    if os.path.exists(other) and not os.path.exists(ckpt_path):
        setting = "--shard=none" if cfg["shard"] != "none" else "--shard=trainable or all"
        raise ValueError(f"{other} is the checkpoint of a run with {setting}: continue it with that "
                         "setting, or choose another out_dir")
    if resume_mode(cfg) == "false" and os.path.exists(ckpt_path):
        raise ValueError(f"{ckpt_path} exists: pass --resume=True to continue that run (or "
                         "--resume=auto), or choose another out_dir (a new run never overwrites a "
                         "checkpoint)")
    return device, dtype


def checkpoint_path(cfg):
    """out_dir/ckpt.pt, or the sharded runs' DCP dir out_dir/ckpt.dcp (shard.py)."""
    return os.path.join(cfg["out_dir"], "ckpt.pt" if cfg["shard"] == "none" else shard.CKPT)


def resume_mode(cfg):
    """'true', 'false' or 'auto', from --resume=True, --resume=false, --resume=auto, ..."""
    mode = cfg["resume"].lower()
    if mode not in ("true", "false", "auto"):
        raise ConfigError(f"--resume={cfg['resume']}: choose True, False or auto")
    return mode


def strict(row):
    """A metrics row for strict JSON readers: a value that is not a finite number becomes null."""
    return {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}


def check_finite(model, step, cfg):
    """Stop, on every rank, if any weight is not finite (Adam can overflow from finite gradients);
    sharded weights: each rank checks its shard."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    finite = torch.stack([torch.isfinite(t).all() for t in local]).all().float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise FloatingPointError(f"step {step}: the weights are not finite; stopped without saving, "
                                 f"the last good checkpoint in {cfg['out_dir']} is untouched: resume "
                                 "with a lower lr")


def train(cfg):
    device, dtype = preflight(cfg)
    rank, local_rank, world, device = setup_distributed(device, cfg["dist_timeout_minutes"])
    cfg, tokens_per_step = resolve_batch(cfg, world)
    master = rank == 0
    os.makedirs(cfg["out_dir"], exist_ok=True)
    check_shared(cfg["out_dir"], rank, world, device)
    ckpt_path = checkpoint_path(cfg)
    resume = resume_mode(cfg) == "true" or (resume_mode(cfg) == "auto" and os.path.exists(ckpt_path))
    if world > 1:  # rank 0's view decides for every rank (a stale view elsewhere must not split them)
        decision = torch.tensor([float(resume)], device=device)
        dist.broadcast(decision, 0)
        resume = bool(decision.item())
    torch.manual_seed(cfg["seed"])  # same initial projections on every rank
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    bf16 = dtype == "bfloat16"
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()
    log = print if master else (lambda *a, **k: None)

    if not cfg["init_from"]:
        check_teacher(cfg["teacher"])
    tokenizer = load_tokenizer(tokenizer_dir(cfg))
    check_compatible(cfg["data_dir"], tokenizer, cfg["block_size"])
    batches = Batches(cfg["data_dir"], cfg["batch_size"], cfg["block_size"], seed=cfg["seed"],
                      rank=rank, world_size=world, device=device, sampling=cfg["sampling"],
                      grad_accum=cfg["grad_accum"])
    # resume: from ckpt.pt
    calibrate = cfg["method"] == "lrc" and cfg["init"] in CALIBRATED_INITS and not resume
    calibration = calibration_tokens(cfg, device) if calibrate else None
    model = build_model(cfg, device, dtype, calibration, load=resume)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding "
                         f"only {model.config.vocab_size} rows: tokenizer and weights do not belong "
                         "together")
    if cfg["method"] == "sft" and not batches.meta["mask"]:
        raise ValueError("method 'sft' learns assistant tokens only: prepare "
                         f"{cfg['data_dir']} with data.py --mask=True")
    if world > 1:  # every rank starts from rank 0's parameters (they are equal already: same seed)
        for p in model.parameters():
            dist.broadcast(p.data, 0)
    sharded = cfg["shard"] != "none"
    if sharded:
        model = shard.shard(model, cfg, device, dtype)
    optimizer = make_optimizer(model, cfg)
    step, skipped, wandb_id = 0, 0, None
    if resume:
        ckpt = shard.read_meta(cfg["out_dir"]) if sharded else load_checkpoint(ckpt_path)
        changed = {k: (ckpt["config"].get(k), v) for k, v in cfg.items()
                   if ckpt["config"].get(k) != v and k != "resume"}
        for k in ("teacher", "method", "d_student", "clone_terms", "alignment", "student_config",
                  "init_from", "data_dir", "seed", "sampling"):
            if k in changed:
                raise ValueError(f"--resume: {k} was {changed[k][0]!r} in the checkpoint, "
                                 f"now {changed[k][1]!r}")
        if sharded:
            torch.set_rng_state(shard.load(cfg["out_dir"], model, optimizer))
        else:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(one_group(ckpt["optimizer"], model))
            torch.set_rng_state(ckpt["rng"])
        step, skipped, wandb_id = ckpt["step"], ckpt.get("skipped", 0), ckpt.get("wandb_id")
        log(f"resumed from {ckpt_path} at step {step}"
            + (f"; changed: {changed}" if changed else ""))
    raw = model
    fwd = torch.compile(model) if cfg["compile"] else model

    flops_per_step = tokens_per_step * flops_per_token(raw, cfg["block_size"])
    log(f"nanoLRC | python {platform.python_version()} torch {torch.__version__} | {device} {dtype} "
        f"x{world} | {sum(p.numel() for p in raw.parameters()):,} trainable parameters")
    log("config: " + json.dumps(cfg))
    log(f"{tokens_per_step:,} tokens per step ({world} ranks x {cfg['grad_accum']} micro-batches x "
        f"{cfg['batch_size']} x {cfg['block_size']}), {tokens_per_step * cfg['max_steps']:,} in {cfg['max_steps']} steps")
    metrics_path = os.path.join(cfg["out_dir"], "metrics.jsonl")
    # drop rows a killed run wrote past its checkpoint
    if master and step > 0 and os.path.exists(metrics_path):
        with open(metrics_path) as f:  # a line cut short by the kill is dropped too
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    metrics = open(metrics_path, "a" if step > 0 else "w") if master else None
    dashboard = open_dashboard(cfg, wandb_id) if master and cfg["wandb_log"] else None

    def record(row):
        if master:
            row = strict(row)
            metrics.write(json.dumps(row, allow_nan=False) + "\n")
            metrics.flush()
            if dashboard:
                dashboard.log({k: v for k, v in row.items() if k != "step" and v is not None},
                              step=row["step"])

    def save():  # on every rank
        loop_state = dict(skipped=skipped, wandb_id=dashboard.id if dashboard else wandb_id)
        if sharded:  # every rank writes its shard
            shard.save(cfg["out_dir"], raw, optimizer, step, cfg, **loop_state)
            return
        state = optimizer_state(optimizer)  # a zero optimizer gathers its state on rank 0
        if master:
            save_checkpoint(ckpt_path, raw, state, step, cfg, **loop_state)
        if world > 1:  # the others wait for the file here, up to dist_timeout_minutes
            dist.barrier()

    # A test hook, outside the config: NANOLRC_STOP_AT=N saves at step N and exits unexported, as a
    # preemption would; --resume=True goes on from there.
    stop_at = int(os.environ.get("NANOLRC_STOP_AT", 0))
    t_start, start_step, in_a_row = time.time(), step, 0
    # the rate: train steps only, and not this process's first (compilation, warm-up)
    timed, timed_steps = 0.0, 0
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master or not sys.stderr.isatty())
    while True:
        timed_out = time.time() - t_start > 60 * cfg["max_minutes"]
        out_of_time = cfg["max_minutes"] > 0 and stop_everywhere(timed_out, device)
        last = step >= cfg["max_steps"] or out_of_time
        # stop_at acts like a preemption: save and exit, leaving this step's eval to the resumed run
        stop = not last and 0 < stop_at <= step
        evaluating = (step % cfg["eval_interval"] == 0 or last) and not stop
        # not at the step the run started from: step 0 is untrained, and a resumed checkpoint is
        # already on disk
        saving = step > start_step and (step % cfg["ckpt_interval"] == 0 or last or stop)
        if step > start_step and (evaluating or saving):
            check_finite(raw, step, cfg)  # nothing is written from non-finite weights
        if evaluating:
            ev = evaluate(raw, batches, cfg["eval_batches"], autocast)
            bar.write(f"step {step}: val loss {ev['val_loss']:.4f}" + (
                f" (teacher {ev['teacher_val_loss']:.4f}) | KL {ev['val_kl']:.4f} | agreement "
                f"{ev['val_agreement']:.1%}" if "val_kl" in ev else "")) if master else None
            record({"step": step, "tokens": step * tokens_per_step, **ev})
        if saving:
            save()
        if last or stop:
            break

        t0 = time.time()
        lr, parts_sum, grad_norm, stepped = train_step(raw, fwd, optimizer, batches, step, cfg,
                                                       world, autocast)
        if step > start_step:
            timed, timed_steps = timed + time.time() - t0, timed_steps + 1
        step += 1
        bar.update(1)
        in_a_row = 0 if stepped else in_a_row + 1
        skipped += not stepped
        if not stepped:
            check_finite(raw, step, cfg)  # an earlier step overflowed them: write nothing more
            bad = {k: v.item() for k, v in {"grad_norm": grad_norm, **parts_sum}.items()
                   if not torch.isfinite(v)}
            if in_a_row > cfg["skip_nonfinite"]:
                raise FloatingPointError(
                    f"step {step}: non-finite {bad}" + (f", {in_a_row} steps in a row" if in_a_row > 1
                                                        else "") +
                    f"; stopped without saving, the last good checkpoint in {cfg['out_dir']} is "
                    "untouched: resume with a lower lr")
            bar.write(f"step {step}: non-finite {bad}: skipped, the weights are unchanged "
                      f"({in_a_row} in a row, at most {cfg['skip_nonfinite']})") if master else None

        if step % cfg["log_interval"] == 0 and master:
            # rates over the timed steps so far: global tokens/s, and MFU per GPU
            tps = timed_steps * tokens_per_step / timed if timed_steps else float("nan")
            peak = peak_flops(device)
            mfu = tps / tokens_per_step * flops_per_step / (peak * world) if peak else float("nan")
            row = {"step": step, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": tps, "mfu": mfu,
                   "skipped": skipped, **{k: v.item() for k, v in parts_sum.items()}}
            record(row)
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device_type == "cuda" else 0
            eta = (cfg["max_steps"] - step) * tokens_per_step / tps if timed_steps else None
            bar.write(f"step {step} | loss {row['loss']:.4f} | " +
                      " ".join(f"{k} {row[k]:.4g}" for k in ("kl", "lm", "clone") if k in row) +
                      f" | lr {lr:.2e}" + (f" | {tps:,.0f} tok/s" if timed_steps else "") +
                      (f" ({tps / world:,.0f} per GPU)" if world > 1 and timed_steps else "") +
                      (f" | MFU {mfu:.1%}" if mfu == mfu else "") +
                      (f" | peak mem {mem:.1f} GiB" if mem else "") +
                      (f" | ETA {eta / 60:.1f} min" if eta is not None else ""))
    bar.close()
    if stop:
        log(f"stopped at step {step} (NANOLRC_STOP_AT): {ckpt_path} saved; continue with "
            "--resume=True")
    elif master or sharded:  # sharded: every rank generates the student, rank 0 writes it
        student_dir = os.path.join(cfg["out_dir"], "student")
        export_dtype = getattr(torch, cfg["export_dtype"])
        if sharded:
            shard.export(raw, student_dir, export_dtype, tokenizer_dir(cfg))
        else:
            raw.export(student_dir, dtype=export_dtype, tokenizer_dir=tokenizer_dir(cfg))
        log(f"exported the student to {student_dir} after {step} steps "
            f"({step * tokens_per_step:,} tokens" + (f", {skipped} skipped" if skipped else "") + ")")
    if master:
        metrics.close()
        if dashboard:
            dashboard.finish()
    if dist.is_initialized():
        dist.destroy_process_group()
    return raw


def open_dashboard(cfg, run_id=None):
    """A Weights & Biases run for the rows of metrics.jsonl, with the config as its config; a
    resumed run continues the run of its checkpoint (run_id). Files go to out_dir/wandb;
    WANDB_MODE=offline keeps them there."""
    import wandb
    name = cfg["wandb_run_name"] or os.path.basename(os.path.abspath(cfg["out_dir"]))
    return wandb.init(project=cfg["wandb_project"], name=name, config=cfg, dir=cfg["out_dir"],
                      id=run_id, resume="allow")


def peak_flops(device):
    """Dense bf16 peak of known GPUs, for the MFU estimate (0: unknown, MFU not shown)."""
    if not device.startswith("cuda"):
        return 0.0
    name = torch.cuda.get_device_name(device)
    table = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}
    return next((v for k, v in table.items() if k in name), 0.0)


if __name__ == "__main__":
    run_or_exit(train, configure_or_exit(DEFAULTS))
