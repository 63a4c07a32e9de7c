"""
The losses of LRC (paper Sec. 4.2.2-4.2.3) as plain functions of tensors; lrc.py and baselines.py call them.

  mse             one clone term E(a, b): the mean squared error, averaged in fp32
  distill_losses  (L_KL, L_LM) from whole logits: the plain reference, also evaluation's per-token metrics
  distill_head    w_kl L_KL + w_lm L_LM straight from the final hidden states and the two heads, chunk by chunk
                  over tokens, never building [tokens, V] logits (FusedDistillHead); what training uses
  head_chunk      tokens per chunk of the loss head and of evaluation (HEAD_CHUNK_ELEMENTS per device)

    kl, lm = distill_losses(s_logits, t_logits, targets, temperature=40.0)      # (B, T, V) logits
    loss, kl, lm = distill_head(h_s, w_s, h_t, w_t, targets, temperature=40.0)   # (B, T, d) states, (V, d) heads

Both give the same numbers (tests/test_lrc.py::test_fused_head_equals_plain_losses).
"""
import torch
import torch.nn.functional as F


def mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error, averaged in fp32. Written out rather than F.mse_loss, which would keep the teacher
    tensor alive for backward; here only the difference is saved, in the activations' dtype (bf16 under
    autocast: half the memory of an fp32 copy, for 7 terms x every layer). d * d, not d.square(): CUDA's
    autocast runs square as pow in fp32 and would save an fp32 copy of d (7 GiB more at the Qwen recipe)."""
    d = s - t.to(s.dtype)
    return (d * d).mean(dtype=torch.float32)


def distill_losses(s_logits, t_logits, targets, temperature, kl_reduction="batchmean"):
    """(L_KL, L_LM) from whole logits (the plain computation; evaluation uses it at T=1 per token),
    both in fp32. L_KL = KL(p_T || p_S) of logits / temperature. 'batchmean' is the
    official code's scaling: summed over tokens and vocabulary, divided by the number of sequences, no
    T^2 (the published alpha, T and lr were tuned with it); 'token' divides by the number of tokens."""
    s, t = s_logits.float() / temperature, t_logits.float() / temperature
    s_logp, t_logp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    kl_sum = (t_logp.exp() * (t_logp - s_logp)).sum()
    kl = kl_sum / (s_logits.shape[0] if kl_reduction == "batchmean" else s_logits.shape[:-1].numel())
    lm = F.cross_entropy(s_logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    return kl, lm


# Token chunk of the loss head: chunk x vocab elements per [tokens, V] fp32 buffer. CPU: 64 MB, cache-sized
# work; GPU: 512 MB, 883 tokens at V = 151,936. Measured on an H100 (4,096 tokens, d_S 1200, bf16, forward +
# backward): 2^24 elements 154 ms / 2.3 GiB above the inputs, 2^26 83 ms / 3.1, 2^27 73 ms / 4.5, 2^28 69 ms / 8.0.
HEAD_CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}


def head_chunk(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk of the loss head (and of evaluation) on this device."""
    return max(1, HEAD_CHUNK_ELEMENTS.get(device.type, HEAD_CHUNK_ELEMENTS["cuda"]) // vocab_size)


def distill_head(h_s, w_s, h_t, w_t, targets, temperature, kl_reduction="batchmean", weights=(1.0, 1.0)):
    """(w_kl L_KL + w_lm L_LM, L_KL, L_LM) of distill_losses from the final hidden states (B, T, d) and the
    two heads (V, d), without ever materialising [tokens, V] logits of either model (see FusedDistillHead).
    Only the weighted sum carries a gradient; the parts are detached values for logging. weights=(w_kl, w_lm):
    1, 1 in LRC (Sec. 4.2.3); VanillaKD mixes them (baselines.py)."""
    kl_div = h_s.shape[0] if kl_reduction == "batchmean" else targets.numel()
    return FusedDistillHead.apply(h_s.flatten(0, 1), w_s, h_t.flatten(0, 1), w_t, targets.flatten(),
                                  temperature, kl_div, *weights)


class FusedDistillHead(torch.autograd.Function):
    """L_KL + L_LM, chunk by chunk over tokens. The loss is a scalar, so its gradients with respect to
    the student's hidden states and head are formed in the same pass as the loss and backward only scales
    them. With z the student's logits, T the temperature, p_T = softmax(t) the teacher's distribution:
      d L_LM / dz = softmax(z) - onehot(target)      (per valid token, averaged over them)
      d L_KL / dz = (softmax(z / T) - p_T) / T        (divided by kl_div, as the loss)
    Exact: no approximation is involved. Memory: a chunk holds at most six [chunk, V] fp32 buffers."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, temperature, kl_div, w_kl, w_lm):
        N, V = targets.numel(), w_s.shape[0]
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1)
        grad_h = torch.empty_like(h_s, dtype=torch.float32)  # d(loss)/d h_s, filled chunk by chunk
        grad_w = torch.zeros_like(w_s, dtype=torch.float32)  # d(loss)/d w_s, summed over chunks
        kl = h_s.new_zeros((), dtype=torch.float32)
        lm = h_s.new_zeros((), dtype=torch.float32)
        chunk = head_chunk(V, h_s.device)
        for i in range(0, N, chunk):
            hs, ok = h_s[i:i + chunk], valid[i:i + chunk]
            target = targets[i:i + chunk].clamp(min=0)  # an ignored target (-100) points at id 0, weighted 0
            rows = torch.arange(len(target), device=hs.device)
            z = (hs @ w_s.T).float()  # (c, V) student logits
            t = (h_t[i:i + chunk] @ w_t.T).float() / temperature  # (c, V) teacher logits / T

            # L_LM: cross-entropy, lse(z) - z[target], for valid targets, averaged over them
            lse = z.logsumexp(-1, keepdim=True)  # (c, 1)
            z_target = z.gather(1, target[:, None])[:, 0]  # (c,)
            lm += ((lse[:, 0] - z_target) * ok).sum()
            lm_weight = ok * w_lm / n_valid  # (c,) each token's weight in w_lm L_LM (0 if ignored)
            g = (z - lse).exp_()  # (c, V) softmax(z), in the fresh buffer z - lse
            g *= lm_weight[:, None]
            g[rows, target] -= lm_weight  # g = d(w_lm L_LM)/dz = (softmax(z) - onehot(target)) * weight

            # L_KL: sum_v p_T (log p_T - log q_S) = sum_v p_T (t - z/T) - lse(t) + lse(z/T)
            z_T = z / temperature  # (c, V) student logits / T
            del z  # z_T takes its place: one buffer fewer at the peak below
            lse_s = z_T.logsumexp(-1, keepdim=True)  # (c, 1)
            lse_t = t.logsumexp(-1, keepdim=True)  # (c, 1)
            p_t = (t - lse_t).exp_()  # (c, V) p_T, in the fresh buffer t - lse_t
            kl += (p_t * (t - z_T)).sum() + (lse_s - lse_t).sum()
            grad_kl = (z_T - lse_s).exp_()  # (c, V) q_S = softmax(z / T), in the fresh buffer z_T - lse_s
            grad_kl -= p_t
            grad_kl *= w_kl / (temperature * kl_div)  # grad_kl = d(w_kl L_KL)/dz = w_kl (q_S - p_T) / (T kl_div)
            g += grad_kl

            grad_h[i:i + chunk] = g.to(w_s.dtype) @ w_s  # dz/dh_s = w_s
            grad_w += (g.T.to(hs.dtype) @ hs).float()  # dz/dw_s = h_s
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
