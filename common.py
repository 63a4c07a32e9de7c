"""
What train.py, sample.py, eval.py, demo.py and bench.py share, without the training loop: the device
and dtype of a run, the trainable module of each method (build_model), and the checkpoint format.

    device, dtype = resolve_system({"device": "auto", "dtype": "auto"})
    model = build_model(cfg, device, dtype)            # LowRankClone or a baseline of baselines.py
    student, cfg = load_student("out/lrc")             # a checkpoint's student, a model.Transformer
"""
import ctypes
import os
import platform

import torch

from baselines import LMOnly, TinyBERT, VanillaKD, student_config
from configurator import ConfigError, check_ranges
from lrc import LowRankClone
from model import ModelConfig, Transformer, read_json

# -----------------------------------------------------------------------------
# the device and dtype of a run

def resolve_device(device):
    """'auto': cuda if available, else cpu. A device this machine lacks is an error naming --device,
    before anything is loaded (not a traceback from deep inside pin_memory or the first .to())."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind, index = torch.device(device).type, torch.device(device).index
    except RuntimeError:
        raise ConfigError(f"--device={device} is not a device: use auto, cpu, cuda or cuda:N") \
            from None
    if kind == "cuda" and not torch.cuda.is_available():
        build = "" if torch.version.cuda else ", a CPU-only build"
        raise ConfigError(f"--device={device}: CUDA is not available on this machine "
                          f"(torch {torch.__version__}{build}): use --device=cpu, or auto")
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"--device={device}: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device={device}: MPS is not available on this machine: "
                          "use --device=cpu, or auto")
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device={device}: only cpu, cuda and mps are supported")
    return device


def resolve_dtype(cfg, device):
    """'auto': bfloat16 on cuda, float32 elsewhere."""
    check_ranges(cfg, {}, {"dtype": ("auto", "float32", "bfloat16")})
    if cfg["dtype"] != "auto":
        return cfg["dtype"]
    return "bfloat16" if device.startswith("cuda") else "float32"


def resolve_system(cfg):
    """(device, dtype) of cfg; on CPU, memory is kept for reuse as well (keep_freed_memory)."""
    device = resolve_device(cfg["device"])
    if device == "cpu":
        keep_freed_memory()
    return device, resolve_dtype(cfg, device)


def keep_freed_memory(mmap_below=1 << 26, trim_above=1 << 30):
    """On glibc, keep freed memory in the process for reuse. A CPU step allocates and frees the same
    multi-MB buffers many times (activations, the loss head's blocks), and glibc's defaults hand
    such buffers back to the OS at every free (mmap above 128 KB to 32 MB, trimming above twice
    that), so each reuse faults its pages in again; kept, a CPU step is faster (results/speed.md).
    The cost: the process keeps its peak memory after a peak. Elsewhere (no glibc) nothing
    changes."""
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        # M_MMAP_THRESHOLD: smaller blocks come from the heap, reused after free
        libc.mallopt(-3, mmap_below)
        libc.mallopt(-1, trim_above)  # M_TRIM_THRESHOLD: the heap's free top returned above this


# -----------------------------------------------------------------------------
# the trainable module of each method

METHODS = ("lrc", "kd", "tinybert", "lm", "sft")


def check_teacher(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"teacher dir {path!r} does not exist: set --teacher=HF_DIR "
                                "(for the demo teacher run python demo.py once)")


def tokenizer_dir(cfg):
    """The HF dir whose tokenizer the data is prepared with and the export carries: init_from, else
    the teacher. (.get: configs of checkpoints written before init_from existed lack it.)"""
    return cfg.get("init_from") or cfg["teacher"]


def build_model(cfg, device, dtype, calibration=None, load=False):
    """The trainable module for cfg['method'] (lrc.py, baselines.py): forward(idx, targets) ->
    (loss, parts); .teacher (None for lm, sft); .config; .student(); .export(). calibration: token
    ids for LRC's inits 'pca', 'prune', 'clone' (calibration_tokens). load: LRC's projections are
    left uninitialised, for a checkpoint's weights."""
    method = cfg["method"]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    if method in ("lm", "sft"):  # no teacher; fp32 master weights
        if cfg["init_from"]:
            start = Transformer.from_pretrained(cfg["init_from"], device=device, dtype=torch.float32)
            return LMOnly(start)
        if method == "sft":
            raise ValueError("method 'sft' fine-tunes a trained model: set --init_from=HF_DIR")
        check_teacher(cfg["teacher"])  # from scratch: only its config.json and tokenizer are used
        tc = ModelConfig.from_hf(read_json(os.path.join(cfg["teacher"], "config.json")))
        with torch.device(device):
            model = Transformer(student_config(tc, cfg["d_student"], cfg["student_config"]))
        return LMOnly(model.init_weights(cfg["init_std"]))
    check_teacher(cfg["teacher"])
    # the teacher is frozen: held in the compute dtype (bf16 on GPU), no fp32 master copy needed
    teacher = Transformer.from_pretrained(cfg["teacher"], device=device,
                                          dtype=getattr(torch, dtype))
    if method in ("kd", "tinybert"):  # from scratch, the LRC student's shape unless student_config
        s_config = student_config(teacher.config, cfg["d_student"], cfg["student_config"])
    if method == "kd":
        start = Transformer.from_pretrained(cfg["init_from"], device=device, dtype=torch.float32) \
            if cfg["init_from"] else None
        return VanillaKD(teacher, s_config, alpha_kl=cfg["alpha_kl"], temperature=cfg["temperature"],
                         kl_reduction=cfg["kl_reduction"], init_std=cfg["init_std"], model=start)
    if method == "tinybert":
        return TinyBERT(teacher, s_config, temperature=cfg["temperature"],
                        kl_reduction=cfg["kl_reduction"], init_std=cfg["init_std"])
    if method == "lrc":
        terms = tuple(t for t in cfg["clone_terms"].split(",") if t)
        with torch.device(device):
            return LowRankClone(teacher, cfg["d_student"], clone_terms=terms, alpha=cfg["alpha"],
                                temperature=cfg["temperature"], kl_reduction=cfg["kl_reduction"],
                                alignment=cfg["alignment"], init_std=cfg["init_std"],
                                init=None if load else cfg["init"],
                                calibration=calibration, clone_norm=cfg["clone_norm"],
                                clone_skip=cfg["clone_skip"],
                                recompute=cfg.get("recompute", False))  # .get: older checkpoints


# -----------------------------------------------------------------------------
# checkpoints: the trainable state, the optimizer, the step, the config and the RNG, in one file

def save_checkpoint(path, model, optimizer_state, step, cfg, **loop_state):
    """Write to a temporary file, then rename: a crash mid-write never replaces the last good
    checkpoint. loop_state: more of the loop's state to resume (train.py: skipped steps, the
    dashboard's run id)."""
    state = {"model": model.state_dict(), "optimizer": optimizer_state, "step": step, "config": cfg,
             "rng": torch.get_rng_state(), **loop_state}
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        # on disk before the rename, so a power loss cannot leave an empty ckpt.pt
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    """The checkpoint dict of a training run (path: ckpt.pt or the out_dir holding it), on the CPU:
    weights are copied to the model's device by load_state_dict, the optimizer's state by its
    load_state_dict, and the RNG state must be a CPU tensor. weights_only: a checkpoint from
    elsewhere can hold data, never code."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); it is left as "
                         "it is: move it away and resume from an earlier copy, or start a new "
                         "out_dir") from e


def load_student(path, device="cpu"):
    """The trained student as a model.Transformer, from a training checkpoint (teacher +
    projections)."""
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    for key in ("teacher", "init_from"):  # the student is rebuilt from the dirs its run was given
        if cfg.get(key) and not os.path.isdir(cfg[key]):
            raise FileNotFoundError(f"{path}: the {key} dir of this run, {cfg[key]!r}, is gone; the "
                                    "student is built from it: put it back, or use the run's "
                                    "exported student/")
    model = build_model(cfg, device, "float32", load=True)
    model.load_state_dict(ckpt["model"])
    return model.student(), cfg
