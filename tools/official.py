"""
Seconds per training step of the official LRC code and of nanoLRC at equal work, alternating.

    python tools/official.py --official_path=DIR [--official_python=PY] [config.py] [--key=value]
    python tools/official.py --official_path=DIR --official_python=PY --d_student=256 --alpha=0.5 \
        --temperature=40.0 --kl_reduction=batchmean --clone_norm=none --init=normal --rounds=3

official_path is a checkout of github.com/CURRENTF/LowRankClone. It is not a dependency and asserts
transformers 4.41.2, so official_python is an interpreter that has that version, e.g. a venv made
with --system-site-packages and `pip install transformers==4.41.2 accelerate`. Each step runs in a
fresh process, the two sides alternating for --rounds rounds: wall and CPU seconds, per-round ratios
and their medians. nanoLRC's variants (bench.py's VARIANTS; default fp32+eager, bf16+eager,
bf16+compile) each meet the official code in their dtype; official_step says how the official code
is run. The options are train.DEFAULTS, bench.py's STEP_OPTS and OFFICIAL_OPTS, as --key=value.
Results: see results/README.md (speed.md); how the two codes differ: docs/official.md.
"""
import json
import os
import subprocess
import sys
import tempfile
from statistics import median

import torch
import torch.nn.functional as F

# run as a script from the repo root: sys.path[0] is tools/, so the repo's modules need the root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import demo  # noqa: E402
import train  # noqa: E402
from bench import (STEP_OPTS, cpu_timed, in_fresh_process, print_table, step_variant,  # noqa: E402
                   system, variant_config)
from configurator import (AT_LEAST_1, NON_NEGATIVE, ConfigError, check_ranges,  # noqa: E402
                          configure_or_exit, run_or_exit)
from model import read_json  # noqa: E402

OFFICIAL_OPTS = dict(official_path="", official_python="", rounds=3)  # beside STEP_OPTS, DEFAULTS


def sdpa_attention(self, q, k, v, attention_mask, query_length, *args, **kwargs):
    """Stands in for transformers 4.41's FlashAttention2._flash_attention_forward (flash-attn is
    CUDA-only): causal attention over (B, T, heads, head_dim) inputs, kv heads shared by groups, no
    padding; same output."""
    if attention_mask is not None:
        raise NotImplementedError("tools/official.py runs unpadded windows only")
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)  # (B, heads, T, head_dim) -> (B, T, heads, head_dim)


def official_step(cfg):
    """Median seconds per training step of the official LRC code (modeling/co_train_{llama,qwen}.py
    of github.com/CURRENTF/LowRankClone, imported from cfg["official_path"] and run as they are) at
    cfg's work: the same teacher, d_S, T, alpha, grad_accum micro-batches of batch_size x
    block_size random tokens; clip and Adam as train.py. Its flags are its README's paper command
    (use_all_attn, tie_word_emb_proj for a tied teacher). dtype float32: everything fp32. bfloat16:
    as its DeepSpeed config trains, bf16 weights (no autocast) with fp32 master copies for Adam. Two
    changes, neither in its files: flash-attn -> SDPA (sdpa_attention), and a stub for wandb, which
    it imports to log every 20 micro-batches. Its process keeps freed memory for reuse as nanoLRC's
    does (common.resolve_system, on CPU). Runs in an interpreter with transformers 4.41.2 (the
    official code asserts that version)."""
    import importlib.machinery
    import types
    sys.path.insert(0, os.path.abspath(cfg["official_path"]))
    if "wandb" not in sys.modules:
        sys.modules["wandb"] = types.ModuleType("wandb")
        sys.modules["wandb"].__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        sys.modules["wandb"].log = lambda *a, **k: None
    import transformers
    # its checkpoint lacks the student's new weights: a page of warnings
    transformers.logging.set_verbosity_error()
    from transformers.models.llama.modeling_llama import LlamaFlashAttention2
    from transformers.models.qwen2.modeling_qwen2 import Qwen2FlashAttention2
    LlamaFlashAttention2._flash_attention_forward = sdpa_attention
    Qwen2FlashAttention2._flash_attention_forward = sdpa_attention
    model_type = read_json(os.path.join(cfg["teacher"], "config.json"))["model_type"]
    if model_type not in ("llama", "qwen2"):
        raise ValueError(f"the official code has Llama and Qwen2 students only, not {model_type!r}")
    official = __import__(f"modeling.co_train_{'qwen' if model_type == 'qwen2' else 'llama'}",
                          fromlist=["_"])
    from tools.global_state import hyper_params  # the official checkout's tools/, not this folder
    hyper_params.update(gradient_accumulation_steps=cfg["grad_accum"],
                        aux_loss_scale_factor=cfg["alpha"])
    device, dtype = common.resolve_system(cfg)
    dtype = getattr(torch, dtype)
    torch.manual_seed(cfg["seed"])
    config = official.CustomConfig.from_pretrained(cfg["teacher"])
    config.set_custom_kwargs(target_hidden_size=cfg["d_student"],
                             target_rms_norm_eps=config.rms_norm_eps,
                             kl_temperature=cfg["temperature"], use_all_attn=True,
                             tie_word_emb_proj=config.tie_word_embeddings)
    model = official.CoTrainLM.from_pretrained(cfg["teacher"], config=config, torch_dtype=dtype,
                                               attn_implementation="sdpa").to(device)
    model.freeze_original_model()
    model.apply(official.reinit_weight)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float() for p in params] if dtype != torch.float32 else params
    optimizer = torch.optim.Adam(masters, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                                 weight_decay=0.0)
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
    """official_step(cfg) in a new process of the given interpreter (its JSON is the last line
    printed). This file is imported there as the module `official`, from tools/ itself: the official
    checkout has a tools/ package of its own, which must not meet this folder under that name."""
    code = ("import official, json, sys; "
            "print(json.dumps(official.official_step(json.loads(sys.argv[1]))))")
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, ROOT, os.environ.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:  # the working dir: the official code writes logs/
        r = subprocess.run([python, "-c", code, json.dumps(cfg)], cwd=tmp,
                           env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"the official code failed ({python}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv):
    """Seconds per step, official vs nanoLRC, each run in a fresh process, alternating, for rounds
    rounds; per-round ratios and their medians. Each of nanoLRC's variants is compared with the
    official code in the variant's dtype (compile is nanoLRC's alone: the official code runs eager,
    as its trainer does)."""
    if not any(a.endswith(".py") and not a.startswith("--") for a in argv):
        argv = [os.path.join(ROOT, "config", "lrc_demo.py"), *argv]
    cfg = configure_or_exit({**train.DEFAULTS, **STEP_OPTS, **OFFICIAL_OPTS}, argv)
    check_ranges(cfg, {"iters": AT_LEAST_1, "warmup": NON_NEGATIVE, "rounds": AT_LEAST_1})
    if cfg["method"] != "lrc":
        raise ConfigError(f"tools/official.py compares LRC only, not method {cfg['method']!r}")
    path = cfg["official_path"]
    if not os.path.isfile(os.path.join(path, "modeling", "co_train_llama.py")):
        raise ConfigError(f"--official_path={path!r} is not a checkout of the official LRC code "
                          "(no modeling/co_train_llama.py in it)")
    python = cfg["official_python"] or sys.executable
    train.check_config(cfg)
    train.resolve_batch(cfg, 1)
    names = [v for v in cfg["variants"].split(",") if v] or ["fp32+eager", "bf16+eager",
                                                             "bf16+compile"]
    teacher = cfg["teacher"] or demo.convert_teacher()
    # absolute paths: the official code runs in a temporary working dir (official_in)
    work = {**cfg, "teacher": os.path.abspath(teacher), "official_path": os.path.abspath(path),
            "stages": False}
    python = os.path.abspath(python) if os.sep in python else python
    variants = [variant_config(work, name) for name in names]
    print(f"official vs nanoLRC | teacher {teacher} | d_student {cfg['d_student']} | "
          f"alpha {cfg['alpha']} | T {cfg['temperature']} | {cfg['kl_reduction']} | "
          f"{cfg['grad_accum']} x {cfg['batch_size']}x{cfg['block_size']} tokens | "
          f"median of {cfg['iters']} steps after {cfg['warmup']} per process")
    times = {}  # (side, name) -> [(wall, CPU) seconds per round]
    for rnd in range(cfg["rounds"]):
        done = {}
        for name, v in zip(names, variants):
            if v["dtype"] not in done:
                side = {**work, "dtype": v["dtype"], "compile": v["compile"]}
                done[v["dtype"]] = official_in(python, side)
                off = done[v["dtype"]]
                times.setdefault(("official", v["dtype"]), []).append((off["step"], off["cpu"]))
            r = in_fresh_process(step_variant, {**work, **v})
            step = r["forward"] + r["backward"] + r["optimizer"]
            times.setdefault(("nanoLRC", name), []).append((step, r["cpu"]))
            (ow, oc), (nw, nc) = times["official", v["dtype"]][-1], times["nanoLRC", name][-1]
            print(f"round {rnd + 1}: official {v['dtype']} {ow:.2f} s ({oc:.2f} CPU s), "
                  f"nanoLRC {name} {nw:.2f} s ({nc:.2f} CPU s) | load {os.getloadavg()[0]:.1f}",
                  flush=True)
    print(f"nanoLRC: {r['system']}\nofficial: {done[v['dtype']]['system']}")
    rows = []
    for name, v in zip(names, variants):
        off, ours = times["official", v["dtype"]], times["nanoLRC", name]
        for i, unit in ((0, "s"), (1, "CPU s")):
            ratios = [a[i] / b[i] for a, b in zip(off, ours)]
            rows.append([name, v["dtype"], unit, f"{median(a[i] for a in off):.2f}",
                         f"{median(b[i] for b in ours):.2f}", f"{median(ratios):.2f}x",
                         " ".join(f"{x:.2f}" for x in ratios)])
    print_table(["nanoLRC variant", "official dtype", "per step", "official", "nanoLRC",
                 "official/nanoLRC", "per round"], rows)
    print("s: wall seconds (what the machine gave); CPU s: CPU seconds of the process, all threads "
          "(steadier on a shared machine). Ratios within a round only; medians over rounds.")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    run_or_exit(lambda: main(sys.argv[1:]))
