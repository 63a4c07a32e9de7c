"""
Sharded training with torch's FSDP2, for recipes whose teacher or trainable state does not fit one
GPU replicated. train.py calls it only where --shard is not "none"; the replicated path never
reaches it.

    torchrun --nproc_per_node=8 train.py config/lrc_llama_8b.py          # the recipe sets shard="all"
    torchrun --nproc_per_node=8 train.py config/lrc_qwen.py --shard=trainable
    python bench.py memory config/lrc_llama_8b.py                       # per-GPU memory and traffic

shard="trainable": every layer's projections are one FSDP unit (`fully_shard` per layer), the
student's RMSNorms and the embedding / head projections the root unit: each rank keeps 1/world of
the trainable parameters, of their gradients and of Adam's state (ZeRO-3). shard="all": the frozen
teacher's layers are sharded as well (their matrices; the vectors and the embedding and head stay
whole), each all-gathered in turn as the interleaved forward reaches it, so that a teacher larger
than one GPU works. Under bf16 FSDP's mixed precision policy all-gathers the projections in bf16
(the compute dtype the replicated path's autocast gives them) and reduces gradients in fp32 into
fp32 master shards; the student's RMSNorm weights are gathered in bf16 too (the replicated path
multiplies by their fp32 masters), a difference within bf16's rounding (tests/test_shard.py).

LRC's one projection pass per step (lrc.LowRankClone.accumulate) is kept: the step's student weights
are generated once, layer by layer, each unit all-gathered for its generation and freed after, and
the gradients reach the projections once, at the end of the step, where FSDP reduce-scatters them.
Inside the micro-batches only P_o and P_down are read (the clone targets of attn_out, ffn_out):
their gradients are reduce-scattered at each micro-batch's backward, as it reaches the layer.
(Holding them unsharded until the last pass instead, set_requires_gradient_sync(False), fails under
bf16: FSDP then accumulates them in fp32 beside the last pass's bf16 gradients, and its
reduce-scatter wants one dtype.) Why not regenerate per micro-batch: docs/gpus.md, Sharded training.

Checkpoints are torch's distributed checkpoint (DCP): out_dir/ckpt.dcp, one file per rank, readable
on any number of ranks (8 -> 4, 2 -> 1); the exported student is one plain HF checkpoint written by
rank 0. With one process there is nothing to shard: the model stays as it is, and only the
checkpoint is DCP.
"""
import json
import os
import shutil
from contextlib import contextmanager

import torch
import torch.distributed as dist

from lrc import LowRankClone

# FSDP2 and DCP are imported where they are used: together ~1 s, which train.py's replicated runs
# (importing this file for its names) should not pay

SHARDS = ("none", "trainable", "all")
CKPT = "ckpt.dcp"  # the sharded runs' checkpoint dir in out_dir (the replicated runs': ckpt.pt)


def shard(model, cfg, device, dtype):
    """Apply FSDP2 to an LRC model in place (before its optimizer is built) and return it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    if not dist.is_initialized():
        return model  # one process: nothing to shard
    mesh = dist.device_mesh.init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    bf16 = dtype == "bfloat16"
    # inputs left as they are: RoPE's cos, sin stay fp32, as under the replicated path's autocast
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32, cast_forward_inputs=False)
    teacher = model.teacher
    if cfg["shard"] == "all":
        for layer in teacher.layers:
            vectors = {p for p in layer.parameters() if p.ndim < 2}  # biases, norms: whole (tiny)
            fully_shard(layer, mesh=mesh, ignored_params=vectors)
            # each teacher layer is its own FSDP root (the teacher is outside the LRC module), and
            # a root keeps its parameters after forward: freed here instead
            layer.register_forward_hook(lambda m, args, out: m.reshard())
    for i, P in enumerate(model.proj):
        P.pair = lambda *args, i=i: LowRankClone.layer_pair(model, i, *args)
        P.weights = lambda i=i: generate_layer(model, i)
        fully_shard(P, mesh=mesh, mp_policy=mp)
        register_fsdp_forward_method(P, "pair")
        register_fsdp_forward_method(P, "weights")
    # the rest (student norms, embedding / head projections, alignment) is the root unit: all-gathered
    # for each forward and each generation, small (2 d_T x d_S)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "generate")
    # LowRankClone's loop calls these per layer: through the layer's unit
    model.layer_pair = lambda i, *args: model.proj[i].pair(*args)
    model.layer_weights = lambda i: model.proj[i].weights()
    accumulate = model.accumulate

    def sharded_accumulate():
        """accumulate(), then the teacher's layers all sharded again."""
        with accumulate() as weights:
            yield weights
        for layer in teacher.layers:  # the last pass's backward left one teacher layer gathered
            if is_sharded(layer):
                layer.reshard()
    model.accumulate = contextmanager(sharded_accumulate)
    return model


def generate_layer(model, i):
    """Layer i's student weights (LowRankClone.layer_weights) inside its FSDP unit. A sharded teacher
    layer is all-gathered for the generation and freed after; the backward of W_S = W_T P needs W_T
    again, so a hook on each generated weight gathers that teacher layer before its backward runs
    (FSDP keeps a parameter's unsharded tensor and refills it at each all-gather, so the saved W_T
    is whole again), freeing the layer gathered before it."""
    layer = model.teacher.layers[i]
    if not is_sharded(layer):
        return LowRankClone.layer_weights(model, i)
    layer.unshard()
    w = LowRankClone.layer_weights(model, i)
    layer.reshard()
    if torch.is_grad_enabled():
        for v in w.values():
            if v.requires_grad and v.grad_fn is not None:
                v.register_hook(lambda g: gather_teacher_layer(model, i) or g)
    return w


def gather_teacher_layer(model, i):
    opened = getattr(model, "gathered_teacher_layer", None)
    if opened is not None and opened != i:
        model.teacher.layers[opened].reshard()
    model.teacher.layers[i].unshard()
    object.__setattr__(model, "gathered_teacher_layer", i)


def full_norm(norm):
    """clip_grad_norm_'s total norm as a plain tensor (over sharded gradients it is a DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def is_sharded(module):
    """Whether fully_shard was applied to module (an FSDPModule)."""
    return hasattr(module, "reshard")


# -----------------------------------------------------------------------------
# checkpoints (DCP) and export

def save(out_dir, model, optimizer, step, cfg, **loop_state):
    """Every rank writes its shard into a fresh sibling of out_dir/ckpt.dcp, with the step, the config,
    the RNG state and loop_state (as common.save_checkpoint); rank 0 then renames it over the old one:
    a crash mid-write never replaces the last good checkpoint (one between the two renames leaves it
    as ckpt.dcp.old: recover)."""
    path, master = os.path.join(out_dir, CKPT), not dist.is_initialized() or dist.get_rank() == 0
    tmp = path + ".tmp"
    if master and os.path.exists(tmp):
        shutil.rmtree(tmp)  # a killed save's
    barrier()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state, "rng": torch.get_rng_state()},
             checkpoint_id=tmp, no_dist=not dist.is_initialized())
    if master:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "config": cfg, **loop_state}, f)
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)  # a save killed after its second rename
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def recover(out_dir):
    """A save killed between its two renames leaves the last good checkpoint as ckpt.dcp.old only: put
    it back (train.preflight, on rank 0, before anything looks for a checkpoint)."""
    path = os.path.join(out_dir, CKPT)
    if not os.path.exists(path) and os.path.exists(path + ".old"):
        os.replace(path + ".old", path)


def read_meta(out_dir):
    """The step and config of out_dir/ckpt.dcp (read before the state, so a changed setting is named
    before DCP fails on a shape)."""
    path = os.path.join(out_dir, CKPT, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no sharded checkpoint at {os.path.dirname(path)} (a run with "
                                "--shard=none writes ckpt.pt: resume it with --shard=none)")
    with open(path) as f:
        return json.load(f)


def load(out_dir, model, optimizer):
    """Load out_dir/ckpt.dcp into model and optimizer, on any number of ranks (DCP reshards); returns
    the saved CPU RNG state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state, "rng": torch.get_rng_state()}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, CKPT), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    return state["rng"]


def export(model, path, dtype, tokenizer_dir):
    """model.export on rank 0; the student is generated on every rank (its units all-gather)."""
    student = model.student(dtype)
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.student = lambda dtype=None: student
        model.export(path, dtype=dtype, tokenizer_dir=tokenizer_dir)
    barrier()


def barrier():
    if dist.is_initialized():
        dist.barrier()

