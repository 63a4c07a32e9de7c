"""
The memory planner: a recipe's peak GPU memory per rank, predicted on any machine (no GPU needed).

    python memory.py config/lrc_qwen.py [--world_size=8] [--zero=True | --shard=all] [--key=value ...]
    python bench.py memory config/lrc_qwen.py ...          # the same command, through bench.py

It runs train.py's own code at the recipe's real shapes: the teacher built from its config.json
alone (config/shapes/ for the paper recipes, SHAPES; no weights are read), the student, two
train.train_step and one train.evaluate, on fake tensors of a fake GPU device (CUDA's autocast
casts and flash attention emulated: FakeGPU) with a fake process group of world_size ranks. It
predicts the live tensor bytes by what holds them (LiveBytes) at the step's peak, the evaluation's
peak, the FLOPs per step, the bytes each collective sends per GPU in a step (Traffic) with their
time at stated bandwidths (LINKS), and last 'predicted peak per GPU: N GiB'. A sharded recipe
(--shard) is planned with FSDP2 applied as train.py applies it (shard.py). A collective given a
tensor of another device fails as nccl would, so such a GPU-only bug shows here first. Not counted: the CUDA
context, NCCL's buffers, the allocator's rounding and fragmentation. How close it comes to a real
GPU's peak: see results/README.md (gpu.md). The options are train.DEFAULTS and MEMORY_OPTS, as
--key=value.
"""
import contextlib
import os
import sys
import weakref
from contextlib import contextmanager
from unittest.mock import patch

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import common
import lrc
import shard
import train
from bench import autocast_for, mem_mark, mem_peak, print_table, without_pca
from configurator import AT_LEAST_1, ConfigError, check_ranges, configure_or_exit, run_or_exit
from model import ModelConfig, Transformer, read_json

MEMORY_OPTS = dict(world_size=8)  # beside every key of train.DEFAULTS
FAKE_DEVICE = "fakecuda"
# the paper teachers' config.json (config/shapes), used where a recipe leaves teacher empty
SHAPES = {"lrc_qwen.py": "Qwen2.5-3B-Instruct", "lrc_llama.py": "Llama-3.2-3B-Instruct",
          "lrc_qwen_4b.py": "Qwen2.5-7B-Instruct", "lrc_qwen3.py": "Qwen3-4B",
          "lrc_llama_8b.py": "Llama-3.1-8B-Instruct", "lrc_qwen3_8b.py": "Qwen3-8B"}
# what CUDA autocast runs in bf16 (matmul-like ops), and in fp32 when given bf16 (of those train.py
# reaches)
AUTOCAST_LOW = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
                torch.Tensor.__rmatmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm,
                torch.addmm, torch.baddbmm}
AUTOCAST_FP32 = {F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax,
                 torch.Tensor.log_softmax, F.cross_entropy, torch.logsumexp, torch.Tensor.logsumexp,
                 torch.exp, torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.square,
                 torch.Tensor.square, torch.rsqrt, torch.Tensor.rsqrt}  # square: autocast sees pow
COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single", "send", "recv",
               "all_gather_single", "reduce_scatter_single")  # the last two: FSDP2's
# Stated bandwidths, per GPU and direction: NVLink 4 (H100 / H200 SXM: 900 GB/s both ways) and one
# 400 Gb/s NIC per GPU (InfiniBand / RoCE between nodes). Latency and protocol overhead not modelled.
LINKS = {"NVLink": 450e9, "400 Gb/s": 50e9}
# bytes each rank sends for a collective over S bytes on n ranks, as NCCL's ring algorithms do
WIRE = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
        "reduce_scatter": lambda n: (n - 1) / n}
MFU = 0.4  # the compute time a step's communication is set against: 40% of 989 TFLOP/s, near the
# compiled Qwen recipe on one H100 (results/gpu.md)


# -----------------------------------------------------------------------------
# a fake GPU: a device for fake tensors, and what CUDA would do on it

def setup_fake_device():
    """A stand-in GPU for a CPU-only torch. Fake tensors on device 'cuda' run forward, but a CPU
    build cannot run autograd on them (the engine asks for a CUDA accelerator: 'Cannot access
    accelerator device when none is available'), so the dry run's device is PrivateUse1 renamed
    'fakecuda', with torch's python device guard. Autocast is accepted there but dispatches nothing:
    FakeGPU applies CUDA's bf16 rules itself."""
    if hasattr(torch, FAKE_DEVICE):
        return
    from torch.utils import backend_registration

    class Module(backend_registration._DummyBackendModule):
        # FSDP2's streams and events: torch.cpu's, which order nothing (no asynchrony to model)
        Stream, Event, stream = torch.cpu.Stream, torch.cpu.Event, staticmethod(torch.cpu.stream)
        current_stream = staticmethod(torch.cpu.current_stream)

        def get_amp_supported_dtype(self):
            return [torch.bfloat16, torch.float16]
    backend_registration._setup_privateuseone_for_python_backend(FAKE_DEVICE,
                                                                 backend_module=Module())
    # kept alive: the fallthrough lives as long as the library object does
    setup_fake_device.lib = torch.library.Library("_", "IMPL")
    setup_fake_device.lib.fallback(torch.library.fallthrough_kernel, "AutocastPrivateUse1")


class FakeGPU(TorchFunctionMode):
    """What a GPU would do that the fake device does not: CUDA autocast's bf16 / fp32 casts (with
    its cache of the casts of fp32 leaf parameters, cleared by clear_cache as leaving autocast
    does), SDPA as flash attention (what CUDA runs for bf16, head_dim <= 256: O(T) memory, not the
    (T, T) scores), and host reads of fake values (item, tolist, bool; fake tensors have no values)
    answered with 1; new_tensor makes a fake of its data's shape (fake mode would move a host
    constant)."""

    def __init__(self, device):
        super().__init__()
        self.device, self.cache = device, {}

    def clear_cache(self):
        self.cache.clear()

    def cast(self, t, dtype):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()
                and t.device.type == self.device and t.dtype != dtype
                and t.dtype in (torch.float32, torch.bfloat16, torch.float16)):
            return t
        # as CUDA's cache: casts made under no_grad are not kept (no graph for a later forward)
        if not (t.is_leaf and t.requires_grad and torch.is_grad_enabled()):
            return t.to(dtype)
        if id(t) not in self.cache:
            self.cache[id(t)] = (t, t.to(dtype))
        return self.cache[id(t)][1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist) and \
                args[0].device.type == self.device:
            t = args[0]
            if func is torch.Tensor.__bool__:
                return True
            return 1.0 if t.dim() == 0 else torch.ones(t.shape).tolist()
        if func is torch.Tensor.new_tensor and args[0].device.type == self.device:
            shape = torch.tensor(args[1]).shape  # a fake of the data's shape
            return torch.zeros(shape, dtype=kwargs.get("dtype", args[0].dtype),
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
            args, kwargs = tree_map(lambda t: self.cast(t, torch.float32)
                                    if isinstance(t, torch.Tensor) and t.dtype == dtype else t,
                                    (args, kwargs))
        return func(*args, **kwargs)


# -----------------------------------------------------------------------------
# counting live bytes by what holds them

class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages and their peak, by label. Every storage an op creates is
    counted once (views share it), under the label in force when it was created (or given later by
    relabel), until it is freed. Inside backward, new storages count as 'backward'. Allocator
    rounding and fragmentation are not modelled."""

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
        st = local(t).untyped_storage()
        # meta: shapes only (lrc's skeleton)
        if id(st) in self.live or st.nbytes() == 0 or t.device.type == "meta":
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
            entry = self.live.get(id(local(t).untyped_storage()))
            if entry is not None and entry[0] != label:
                self.count(entry[0], -entry[1])
                entry[0] = label
                self.count(label, entry[1])

    def resized(self, t):
        """FSDP frees an unsharded parameter by resizing its storage to 0 and refills the same one
        (storage.resize_, which no dispatch mode sees): shard.py's planner calls this after each."""
        entry = self.live.get(id(t.untyped_storage()))
        if entry is None:
            return self.add(t)
        n = t.untyped_storage().nbytes()
        self.count(entry[0], n - entry[1])
        entry[1] = n

    def reset_peak(self):
        self.peak, self.at_peak = self.now, dict(self.by_label)

    @contextmanager
    def phase(self, label):
        before, self.label = self.label, label
        try:
            yield
        finally:
            self.label = before


# -----------------------------------------------------------------------------
# train.py's step and evaluation, labelled

class RandomBatches:
    """train.py's batches (get_batch, eval_steps, device) as random tokens of the recipe's shape:
    the dry run's data, and the CPU check's."""

    def __init__(self, cfg, vocab_size, device, world):
        self.shape, self.vocab = (cfg["batch_size"], cfg["block_size"]), vocab_size
        self.device, self.world = device, world

    def get_batch(self, split, step, micro=0):
        return (torch.randint(self.vocab, self.shape, device=self.device),
                torch.randint(self.vocab, self.shape, device=self.device))

    def eval_steps(self, n):
        return range(0, n, self.world)  # rank 0's share


def local(t):
    """A sharded parameter's (DTensor's) local shard, what this rank holds; any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


@contextmanager
def fsdp_storage_seen(mem):
    """FSDP2's frees and refills of unsharded parameters (storage.resize_) counted by mem."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    def seen(resize):
        def resize_and_count(tensor):
            resize(tensor)
            mem.resized(tensor)
        return resize_and_count
    with patch.object(_fsdp_param, "free_storage", seen(_fsdp_param.free_storage)), \
            patch.object(_fsdp_param, "alloc_storage", seen(_fsdp_param.alloc_storage)), \
            patch.object(_fsdp_param_group, "alloc_storage", seen(_fsdp_param.alloc_storage)):
        yield


def from_config_json(cls, path, device="cpu", dtype=None):
    """Transformer.from_pretrained's model without the weights (config.json only): the dry run's."""
    cfg = ModelConfig.from_hf(read_json(os.path.join(path, "config.json")))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with torch.device(device):
            return cls(cfg)
    finally:
        torch.set_default_dtype(default)


def step_and_eval(cfg, world, device, mem, hooks=None, traffic=None):
    """Build the model as train.py does, then two optimizer steps (train.train_step) and one
    evaluation (train.evaluate), with mem (LiveBytes) labelling what is allocated. Returns a report
    dict; its step peak is the second step's."""
    # the fake GPU's dtype is CUDA's
    dtype = common.resolve_dtype(cfg, "cuda" if device == FAKE_DEVICE else device)
    autocast = autocast_for(device, dtype)
    cfg = {**without_pca(cfg), "compile": False}
    with mem.phase("parameters"):
        model = common.build_model(cfg, device, dtype)
        if cfg["shard"] != "none":
            model = shard.shard(model, cfg, device, dtype)
        optimizer = train.make_optimizer(model, cfg)
    teacher = list(model.teacher.parameters()) if model.teacher is not None else []
    mem.relabel(teacher, "teacher (frozen)")
    mem.relabel(model.parameters(), "trainable parameters")
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: mem.relabel([p.grad], "gradients"))
    accumulate, step = model.accumulate, optimizer.step

    @contextmanager
    def labelled_accumulate():  # the step's generated weights, then one pass into the projections
        ctx = accumulate()
        with mem.phase("generated weights"):
            weights = ctx.__enter__()  # None for the baselines: they generate no weights
        for leaf in tree_flatten(weights)[0] if weights is not None else []:
            if leaf.requires_grad:  # after accumulate's own hook, which moves grads to grad_sums
                leaf.register_post_accumulate_grad_hook(lambda t: mem.relabel(
                    [g for g in model.grad_sums if g is not None], "generated weights' grads"))
        try:
            with mem.phase("activations"):
                yield weights
        finally:
            with mem.phase("optimizer step"):
                ctx.__exit__(None, None, None)
        mem.label = "optimizer step"  # all-reduce buffer, clipping

    def labelled_step(*a, **k):
        with mem.phase("optimizer step"):
            out = step(*a, **k)
        state = optimizer.optim.state if hasattr(optimizer, "optim") else optimizer.state
        mem.relabel([t for s in state.values() for t in s.values() if isinstance(t, torch.Tensor)],
                    "Adam state")
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
        for i in range(2):  # the second step is the steady state: Adam's state exists by then
            mem.reset_peak()
            if traffic is not None:
                traffic.rows = {}  # the second step's are reported
            with mem.phase("activations"):
                train.train_step(model, model, optimizer, batches, i, cfg, world, autocast)
            for h in hooks or []:
                h()
        step_peak, step_at_peak = mem.peak, mem.at_peak
        step_traffic = dict(traffic.rows) if traffic is not None else {}
        mem.reset_peak()
        with mem.phase("evaluation"):
            train.evaluate(model, batches, cfg["eval_batches"], autocast)
        for h in hooks or []:
            h()
    eval_peak = mem.peak
    sizes = lambda ts: sum(local(t).numel() * t.element_size() for t in ts)  # noqa: E731
    state = optimizer.optim.state if hasattr(optimizer, "optim") else optimizer.state
    adam = (t for s in state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return {"step_peak": step_peak, "at_peak": step_at_peak, "eval_peak": eval_peak,
            "peak": max(step_peak, eval_peak),
            "teacher": sizes({id(p): p for p in teacher}.values()),
            "trainable": sizes(model.parameters()),
            "n_trainable": sum(p.numel() for p in model.parameters()),
            "adam": sizes(adam), "flops_per_token": train.flops_per_token(model, cfg["block_size"]),
            "dtype": dtype, "zero": hasattr(optimizer, "consolidate_state_dict"),
            "traffic": step_traffic}


# -----------------------------------------------------------------------------
# the dry run: fake tensors, a fake process group

def module_to_in_place(to):
    """nn.Module.to for fake tensors: a no-op where every tensor is on the target device already
    (lrc.py's norms: built on the device, then .to(it)); Module._apply swaps a FakeTensor parameter
    even then, which fails while the fake mode holds a weak reference to it."""
    def module_to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        tensors = [*self.parameters(), *self.buffers()]
        if device is not None and all(t.device == device for t in tensors) \
                and not any(isinstance(a, torch.dtype) for a in [*args, *kwargs.values()]):
            return self
        return to(self, *args, **kwargs)
    return module_to


class Traffic:
    """Bytes each collective moves per rank (WIRE), by collective and by the part of the step it runs
    in: 'generated weights' (the step's generation), 'activations' and 'backward' (the micro-batches,
    where FSDP overlaps it with compute), 'optimizer step' (accumulate's last pass and after: the
    replicated gradients' all-reduce, which nothing hides)."""

    def __init__(self, world):
        self.world, self.rows, self.mem = world, {}, None

    def counted(self, name, collective):
        def count(*args, **kwargs):
            self.record(name, args, kwargs)
            return collective(*args, **kwargs)
        return count

    def record(self, name, args, kwargs):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        size = max(t.numel() * t.element_size() for t in tensors)  # the whole, gathered or reduced
        kind = name.replace("_single", "").replace("_into_tensor", "").replace("_tensor", "")
        phase = self.mem.label if self.mem is not None else ""
        if torch._C._current_graph_task_id() != -1:
            phase = "backward" if phase == "activations" else f"{phase}, backward"
        calls, sent = self.rows.get((kind, phase), (0, 0))
        self.rows[kind, phase] = (calls + 1, sent + size * WIRE.get(kind, lambda n: 1)(self.world))


def on_device_only(collective, device):
    """A collective that refuses tensors on another device than the run's, with nccl's message.
    (The fake process group does it for 'cuda:fake'; on the stand-in device it accepts CPU tensors,
    so the check is made here.)"""
    def checked(*args, **kwargs):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.device.type != device:
                raise RuntimeError(f"No backend type associated with device type {t.device.type}")
        return collective(*args, **kwargs)
    return checked


def dry_run(cfg, world, device=FAKE_DEVICE):
    """step_and_eval on fake tensors of the fake GPU device (or of the CPU: measured_cpu's
    prediction), with a fake process group of `world` ranks (this is rank 0): collectives check
    their tensors' device as nccl does, and move no data."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if device == FAKE_DEVICE:
        setup_fake_device()
    if dist.is_initialized():
        dist.destroy_process_group()
    if world > 1:
        dist.init_process_group(f"{device}:fake", store=FakeStore(), rank=0, world_size=world)
    try:
        with contextlib.ExitStack() as stack:
            traffic = Traffic(world)
            for name in COLLECTIVES:
                checked = on_device_only(traffic.counted(name, getattr(dist, name)), device)
                stack.enter_context(patch.object(dist, name, checked))
            if world > 1:  # shard.py's mesh, made here: inside the fake mode its rank map is fake
                mesh = dist.device_mesh.init_device_mesh(device, (world,))
                stack.enter_context(patch.object(dist.device_mesh, "init_device_mesh",
                                                 lambda *args, **kwargs: mesh))
            return fake_run(cfg, world, device, traffic)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def fake_run(cfg, world, device, traffic=None):
    """step_and_eval on fake tensors of device, the teacher built from its config.json alone;
    traffic: a Traffic the collectives report to."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    gpu = FakeGPU(device)
    with patch.object(Transformer, "from_pretrained", classmethod(from_config_json)), \
            patch.object(torch.nn.Module, "to", module_to_in_place(torch.nn.Module.to)), \
            FakeTensorMode(), gpu, LiveBytes() as mem, fsdp_storage_seen(mem):
        if traffic is not None:
            traffic.mem = mem
        return step_and_eval(cfg, world, device, mem, hooks=[gpu.clear_cache], traffic=traffic)


def measured_cpu(cfg):
    """The same step and evaluation for real on the CPU, in this fresh process: peak RSS above the
    RSS before the model is built, and what LiveBytes (fake tensors, device cpu) predicts for it.
    The check that the accounting is right, where a GPU is not at hand. Under torchrun (gloo, e.g.
    cfg's shard): this rank's peak, and the prediction on a fake process group of as many ranks."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    # a warm-up of the same code at a tiny size: the libraries' one-time memory is paid here
    with LiveBytes() as mem:
        step_and_eval({**cfg, "batch_size": 1, "block_size": 8}, world, "cpu", mem)
    base = mem_mark("cpu")
    step_and_eval(cfg, world, "cpu", LiveBytes())
    measured = mem_peak("cpu") - base
    if world > 1:
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank > 0:  # rank 0's shards are the largest: predicted there
            return {"measured": measured}
    return {"measured": measured, "predicted": dry_run(cfg, world, "cpu")["peak"]}


# -----------------------------------------------------------------------------
# the report

def memory_rows(r, world):
    """(name, bytes) rows of a dry run's report: what is held for the whole run."""
    zero = f" (zero: 1/{world} of it)" if r["zero"] else ""
    teacher = "teacher (frozen, bf16)" if r["dtype"] == "bfloat16" else "teacher (frozen)"
    return [(teacher, r["teacher"]), ("trainable parameters (fp32)", r["trainable"]),
            (f"Adam state{zero}", r["adam"])]


def print_traffic(r, tokens_per_step, world):
    """The step's collectives: bytes each rank sends, and their time at the stated bandwidths
    (LINKS) beside the step's compute per GPU at MFU."""
    if not r["traffic"]:
        return
    rows = [[kind, phase, f"{calls:,}", f"{sent / 2**30:.2f}",
             *[f"{sent / bw * 1e3:,.0f}" for bw in LINKS.values()]]
            for (kind, phase), (calls, sent) in sorted(r["traffic"].items(), key=lambda kv: -kv[1][1])]
    sent = sum(s for _, s in r["traffic"].values())
    print_table(["collective per step", "in", "calls", "GiB sent", *[f"ms {k}" for k in LINKS]],
                rows + [["total", "", "", f"{sent / 2**30:.2f}",
                         *[f"{sent / bw * 1e3:,.0f}" for bw in LINKS.values()]]])
    compute = tokens_per_step * r["flops_per_token"] / world / (MFU * 989e12)
    print(f"compute per step per GPU: {compute * 1e3:,.0f} ms at {MFU:.0%} MFU of 989 TFLOP/s; "
          f"bandwidths per GPU and direction: " + ", ".join(f"{k} {v / 1e9:.0f} GB/s"
                                                            for k, v in LINKS.items()))


def main(argv):
    recipes = [a for a in argv if a.endswith(".py") and not a.startswith("--")]
    cfg = configure_or_exit({**train.DEFAULTS, **MEMORY_OPTS}, argv)
    check_ranges(cfg, {"world_size": AT_LEAST_1})
    train.check_config(cfg)
    if cfg["recompute"]:  # the recomputation in backward aborts the process on the fake device
        raise ConfigError("--recompute=True: the dry run cannot predict activation checkpointing; "
                          "it lowers the peak: predict without it")
    if not cfg["teacher"]:
        name = next((SHAPES[os.path.basename(r)] for r in reversed(recipes)
                     if os.path.basename(r) in SHAPES), None)
        if name is None:
            sys.exit("error: set --teacher= to an HF dir (only its config.json is read); "
                     f"known recipes: {list(SHAPES)}")
        root = os.path.dirname(os.path.abspath(__file__))
        cfg["teacher"] = os.path.join(root, "config", "shapes", name)
    world = cfg["world_size"]
    cfg, tokens_per_step = train.resolve_batch(cfg, world)
    print(f"memory {cfg['method']} | teacher {cfg['teacher']} | d_student {cfg['d_student']} | "
          f"{world} ranks x {cfg['grad_accum']} micro-batches x {cfg['batch_size']} x "
          f"{cfg['block_size']} = {tokens_per_step:,} tokens per step | zero {cfg['zero']} | "
          f"shard {cfg['shard']} | "
          f"recompute {cfg['recompute']}")
    print(f"dry run on fake '{FAKE_DEVICE}' tensors (nothing allocated), fake process group of "
          f"{world}; torch.compile skipped (compile={cfg['compile']} in the recipe)")
    try:
        r = dry_run(cfg, world)
    except RuntimeError as e:
        if "No backend type associated with device type" in str(e):
            sys.exit(f"error: a collective received a tensor on another device than the run's "
                     f"({FAKE_DEVICE}, a GPU on a real run), as nccl would refuse it: {e}")
        raise
    at = r["at_peak"]
    print(f"{r['n_trainable']:,} trainable parameters | {r['dtype']} | "
          f"{tokens_per_step * r['flops_per_token'] / 1e12:,.1f} TFLOP per step "
          f"({r['flops_per_token'] / 1e9:.2f} GFLOP per token, train.flops_per_token)")
    print_table(["held for the whole run", "GiB"],
                [[k, f"{v / 2**30:.2f}"] for k, v in memory_rows(r, world)])
    order = ["teacher (frozen)", "trainable parameters", "Adam state", "gradients",
             "generated weights", "generated weights' grads", "activations", "loss head",
             "backward", "optimizer step"]
    rows = [[k, f"{at[k] / 2**30:.2f}"] for k in order + sorted(set(at) - set(order)) if at.get(k)]
    print_table(["at the step's peak, live", "GiB"],
                rows + [["total (step peak)", f"{r['step_peak'] / 2**30:.2f}"]])
    print_traffic(r, tokens_per_step, world)
    print(f"evaluation peak: {r['eval_peak'] / 2**30:.2f} GiB (student materialised in bf16 + "
          "chunked val logits)")
    print("not counted: the CUDA context and NCCL buffers (~1 GiB), allocator rounding and "
          "fragmentation")
    print(f"predicted peak per GPU: {r['peak'] / 2**30:.2f} GiB")
    return r


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    run_or_exit(lambda: main(sys.argv[1:]))
