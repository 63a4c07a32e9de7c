"""
The losses of LRC (paper Sec. 4.2.2-4.2.3) as plain functions of tensors; lrc.py and baselines.py
call them.

  mse             one clone term E(a, b): the mean squared error, averaged in fp32
  distill_losses  (L_KL, L_LM) from whole logits: the plain reference, also evaluation's per-token
                  metrics
  distill_head    w_kl L_KL + w_lm L_LM straight from the final hidden states and the two heads,
                  chunk by chunk over tokens, never building [tokens, V] logits (FusedDistillHead);
                  what training uses
  head_chunk      tokens per chunk of the loss head and of evaluation (HEAD_CHUNK_ELEMENTS per
                  device)
  head_block      tokens per block of the head's elementwise work (HEAD_BLOCK_ELEMENTS: cache-sized
                  on CPU)

    kl, lm = distill_losses(s_logits, t_logits, targets, temperature=40.0)  # (B, T, V) logits
    # (B, T, d) hidden states, (V, d) heads
    loss, kl, lm = distill_head(h_s, w_s, h_t, w_t, targets, temperature=40.0)

Both give the same numbers (tests/test_lrc.py::test_fused_head_equals_plain_losses).
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error, its sum of squares in fp32 (see SquaredError)."""
    return SquaredError.apply(s, t)


class SquaredError(torch.autograd.Function):
    """mean((s - t)^2), with gradients 2 (s - t) / n to s and its negative to t (an LRC target
    t_acts @ P carries P's). One pass makes the difference d = s - t in s's dtype (bf16 under
    autocast: no fp32 copy of either activation), one more sums d^2 in fp32 (each square widened,
    none rounded to bf16), and backward is one multiply of the saved d. Autograd through
    (d * d).mean() would make and save more: a second [tokens, width] pass forward, three backward.
    Not F.mse_loss, which would keep the teacher tensor alive for backward. Memory: d alone is
    saved, 7 terms x every layer. The reduction runs outside autocast, which would otherwise widen
    all of d into a temporary fp32 copy first (CUDA's autocast lists the norms as fp32 ops)."""

    @staticmethod
    def forward(ctx, s, t):
        d = s - t.to(s.dtype)
        ctx.save_for_backward(d)
        ctx.t_dtype = t.dtype
        with torch.autocast(d.device.type, enabled=False):
            return torch.linalg.vector_norm(d, dtype=torch.float32).square() / d.numel()

    @staticmethod
    def backward(ctx, grad):
        d, = ctx.saved_tensors
        grad_s = d * (2 * grad / d.numel()).to(d.dtype)
        return grad_s, (-grad_s).to(ctx.t_dtype) if ctx.needs_input_grad[1] else None


def distill_losses(s_logits, t_logits, targets, temperature, kl_reduction="batchmean"):
    """(L_KL, L_LM) from whole logits (the plain computation; evaluation uses it at T=1 per token),
    both in fp32. L_KL = KL(p_T || p_S) of logits / temperature. 'batchmean' is the official code's
    scaling: summed over tokens and vocabulary, divided by the number of sequences, no T^2 (the
    published alpha, T and lr were tuned with it); 'token' divides by the number of tokens."""
    s, t = s_logits.float() / temperature, t_logits.float() / temperature
    s_logp, t_logp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    kl_sum = (t_logp.exp() * (t_logp - s_logp)).sum()
    n = s_logits.shape[0] if kl_reduction == "batchmean" else s_logits.shape[:-1].numel()
    kl = kl_sum / n
    lm = F.cross_entropy(s_logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    return kl, lm


# The loss head works in two sizes of token chunk, per device. A chunk (HEAD_CHUNK_ELEMENTS / V
# tokens) is what one matmul covers: large, so the heads (V x d, read once per chunk, four times)
# are read few times; on GPU a larger chunk is faster until the [chunk, V] buffers cost more memory
# than the time saved is worth. A block (HEAD_BLOCK_ELEMENTS / V tokens) is what the elementwise
# work covers, about ten passes over [block, V]: on CPU small enough that those passes run in
# cache, on one thread (one_thread); on GPU the whole chunk (a pass is one kernel launch, the fewer
# the better). Under torch.compile the block is the chunk as well: inductor fuses the passes itself
# (one graph, no break, for the head).
HEAD_CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}
HEAD_BLOCK_ELEMENTS = {"cpu": 1 << 20}  # a [block, V] fp32 buffer of 4 MB; not listed: the chunk


def head_chunk(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk of the loss head (and of evaluation) on this device."""
    return max(1, HEAD_CHUNK_ELEMENTS.get(device.type, HEAD_CHUNK_ELEMENTS["cuda"]) // vocab_size)


def head_block(vocab_size: int, device: torch.device) -> int:
    """Tokens per block of the loss head's elementwise work on this device (HEAD_BLOCK_ELEMENTS)."""
    chunk = head_chunk(vocab_size, device)
    if device.type not in HEAD_BLOCK_ELEMENTS or torch.compiler.is_compiling():
        return chunk
    return max(1, min(chunk, HEAD_BLOCK_ELEMENTS[device.type] // vocab_size))


@contextmanager
def one_thread(enabled=True):
    """CPU blocks run their elementwise passes on one thread: a pass over a cache-sized block is too
    short to split, and each split op waits at a barrier for every thread, which on a loaded machine
    costs more than the split saves. The matmuls keep every thread."""
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled:
            torch.set_num_threads(threads)


def distill_head(h_s, w_s, h_t, w_t, targets, temperature, kl_reduction="batchmean",
                 weights=(1.0, 1.0)):
    """(w_kl L_KL + w_lm L_LM, L_KL, L_LM) of distill_losses from the final hidden states (B, T, d)
    and the two heads (V, d), without ever materialising [tokens, V] logits of either model (see
    FusedDistillHead). Only the weighted sum carries a gradient; the parts are detached values for
    logging. weights=(w_kl, w_lm): 1, 1 in LRC (Sec. 4.2.3); VanillaKD mixes them (baselines.py)."""
    kl_div = h_s.shape[0] if kl_reduction == "batchmean" else targets.numel()
    return FusedDistillHead.apply(h_s.flatten(0, 1), w_s, h_t.flatten(0, 1), w_t,
                                  targets.flatten(), temperature, kl_div, *weights)


def logsumexp_from_softmax(x, p):
    """logsumexp of each row of x given p = softmax(x), from the row's max, where
    p = exp(max - lse) >= 1/V: two cheap max passes instead of a third exp pass, and no underflow
    (p elsewhere can be 0)."""
    return x.amax(-1) - p.amax(-1).log()


def head_block_losses(z, t, target, valid, lm_weight, kl_scale, temperature, grad_out):
    """The head's work on one block of tokens, in fp32: returns the block's sums of L_KL and L_LM
    (token terms, before kl_div and n_valid) and writes dL/dz into grad_out. z (r, V) student and
    t (r, V) teacher logits, in the matmuls' dtype (z may be grad_out itself); target (r,) ids,
    ignored ones clamped to 0, valid (r,) where they are not; lm_weight (r,) each token's weight in w_lm L_LM (0 if ignored);
    kl_scale = w_kl / (T kl_div). Three exp passes (the three softmaxes), no log_softmax:
    L_KL = sum_v p_T (t - z) / T - (lse(t / T) - lse(z / T)) as sum_v p_T = 1."""
    # (r, V); a fresh fp32 copy under autocast, z itself in fp32 (then overwritten in place)
    z = z.float()
    p_s = torch.softmax(z, -1)  # (r, V) softmax(z)
    nll = logsumexp_from_softmax(z, p_s) - z.gather(1, target[:, None])[:, 0]  # (r,)
    lm = (nll * valid).sum()
    z_T = z.div_(temperature)  # (r, V) z / T, in z's buffer
    q_s = torch.softmax(z_T, -1)  # (r, V) q_S = softmax(z / T)
    t_T = t.float().div_(temperature)  # (r, V) t / T
    p_t = torch.softmax(t_T, -1)  # (r, V) p_T
    lse_gap = logsumexp_from_softmax(t_T, p_t) - logsumexp_from_softmax(z_T, q_s)  # (r,)
    kl = (torch.linalg.vecdot(p_t, t_T.sub_(z_T)) - lse_gap).sum()  # sum_v p_T (log p_T - log q_S)
    # dL/dz = kl_scale (q_S - p_T) + lm_weight (softmax(z) - onehot), formed as kl_scale * (...) in
    # q_s's buffer; kl_scale 0 (KD with alpha_kl 0: the LM loss alone) as the LM term alone
    rows = torch.arange(len(target), device=z.device)
    if kl_scale == 0:
        g = p_s.mul_(lm_weight[:, None])
        g[rows, target] -= lm_weight
        grad_out.copy_(g)
        return kl, lm
    g = q_s.sub_(p_t).addcmul_(p_s, (lm_weight / kl_scale)[:, None])
    g[rows, target] -= lm_weight / kl_scale
    torch.mul(g, kl_scale, out=grad_out)
    return kl, lm


class FusedDistillHead(torch.autograd.Function):
    """L_KL + L_LM, chunk by chunk over tokens. The loss is a scalar, so its gradients with respect
    to the student's hidden states and head are formed in the same pass as the loss and backward
    only scales them. With z the student's logits, T the temperature, p_T = softmax(t / T) the
    teacher's distribution:
      d L_LM / dz = softmax(z) - onehot(target)      (per valid token, averaged over them)
      d L_KL / dz = (softmax(z / T) - p_T) / T        (divided by kl_div, as the loss)
    Exact: no approximation is involved. The matmuls run in autocast's dtype (the plain
    computation's logits), each head cast once per call, not once per chunk as autocast would.
    Memory: two [chunk, V] buffers in the matmuls' dtype (the logits; z's buffer then holds dL/dz),
    plus four [block, V] fp32 ones."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, temperature, kl_div, w_kl, w_lm):
        N, V, device = targets.numel(), w_s.shape[0], h_s.device
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else w_s.dtype
        hs_all, ws, ht_all, wt = h_s.to(dtype), w_s.to(dtype), h_t.to(dtype), w_t.to(dtype)
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1)
        lm_weight = valid * (w_lm / n_valid)  # (N,) each token's weight in w_lm L_LM (0 if ignored)
        kl_scale = w_kl / (temperature * kl_div)
        targets = targets.clamp(min=0)  # an ignored target (-100) points at id 0, weighted 0
        grad_h = torch.empty_like(h_s, dtype=torch.float32)  # d(loss)/d h_s, filled chunk by chunk
        grad_w = torch.zeros_like(w_s, dtype=torch.float32)  # d(loss)/d w_s, summed over chunks
        kl = h_s.new_zeros((), dtype=torch.float32)
        lm = h_s.new_zeros((), dtype=torch.float32)
        chunk, block = head_chunk(V, device), head_block(V, device)
        with torch.autocast(device.type, enabled=False):  # dtypes are explicit here
            for i in range(0, N, chunk):
                hs, c = hs_all[i:i + chunk], slice(i, i + chunk)
                z = hs @ ws.T  # (c, V) student logits; its buffer receives dL/dz, block by block
                t = ht_all[c] @ wt.T  # (c, V) teacher logits
                # CPU blocks (on GPU and under compile a block is the chunk)
                with one_thread(block < chunk):
                    for j in range(0, len(hs), block):
                        b = slice(j, j + block)
                        kl_b, lm_b = head_block_losses(z[b], t[b], targets[c][b], valid[c][b],
                                                       lm_weight[c][b], kl_scale, temperature,
                                                       grad_out=z[b])
                        kl, lm = kl + kl_b, lm + lm_b
                grad_h[c] = z @ ws  # dz/dh_s = w_s
                grad_w += z.T @ hs  # dz/dw_s = h_s
        lm = lm / n_valid
        kl = kl / kl_div
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = h_s.dtype, w_s.dtype
        ctx.mark_non_differentiable(kl, lm)
        return w_kl * kl + w_lm * lm, kl, lm

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_lm):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h.mul(grad_loss).to(h_dtype), grad_w.mul(grad_loss).to(w_dtype),
                None, None, None, None, None, None, None)
