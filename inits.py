"""
Calibrated starts for LRC's projections, beyond the paper (which starts every P ~ N(0, 0.02):
lrc.py's init_normal). Each reads the teacher's activations on calibration tokens (train windows,
[N, T]) and sets the projections and the student's norms of a LowRankClone in place:

  pca    the teacher truncated to the top-d_S principal subspace of its residual stream (SliceGPT);
  prune  the d_S most active residual coordinates kept, the rest cut (Minitron's width pruning);
  clone  pca, then LRC's own clone objective solved layer by layer in closed form (least squares).

    lrc = LowRankClone(teacher, d_student=288, init="clone", calibration=windows)  # init_clone

With d_S = d_T, pca and clone give the teacher back (tests/test_lrc.py). What each buys at the
demo's scale is measured in results/README.md.
"""
import torch
import torch.nn.functional as F

from lrc import INPUT_SIDE
from model import rope_cos_sin


@torch.no_grad()
def init_pca(lrc, calibration, batch_size=8, prune=False):
    """PCA (after SliceGPT's rotation, Ashkboos et al., 2024): start the student as the teacher
    truncated to the top-d_S principal subspace U of its residual stream. The stream is sampled on
    calibration (token ids [N, T]) where the teacher reads it (every RMSNorm input), each token
    scaled to unit RMS first, so the attention sink's massive activations count as one token, not as
    most of the energy. With h_S = U^T h_T: P_emb = P_o = P_down = U; the input side folds the
    teacher's norm weights in, P = diag(g_T) U; the student's norms become sqrt(d_T/d_S), the RMS
    ratio of the same vector in d_S and d_T coordinates. U is rotated within its span to diagonalise
    U^T diag(g_final) U, so a tied head, which must reuse P_emb, gets that diagonal as its final
    norm (an untied head folds g_final in exactly). With d_S = d_T the student is the teacher."""
    if calibration is None:
        raise ValueError("init='pca' needs calibration=token ids [N, T] from the training data")
    teacher, dS, eps = lrc.teacher, lrc.config.hidden_size, lrc.config.rms_norm_eps
    cov = 0

    # one RMSNorm input, every token at unit RMS (as the norm sees it: an all-zero row stays 0)
    def add(r):
        nonlocal cov
        z = r.flatten(0, 1).double()
        z = z * (z.square().mean(-1, keepdim=True) + eps).rsqrt()
        cov = cov + z.T @ z
    for x in calibration.split(batch_size):
        cos, sin = rope_cos_sin(teacher.inv_freq, 0, x.shape[1])
        h = teacher.embed_tokens(x)
        for layer in teacher.layers:
            acts = {}
            h_next = layer(h, cos, sin, 0, acts)
            add(h)  # input_layernorm's input
            add(h + acts["attn_out"])  # post_attention_layernorm's
            h = h_next
        add(h)  # the final norm's
    g, scale = teacher.norm.weight.double(), (teacher.config.hidden_size / dS) ** 0.5
    # the d_S coordinates of largest mean square, kept as they are (columns of I, in order)
    if prune:
        keep = cov.diagonal().topk(dS).indices.sort().values
        # U^T diag(g) U is diagonal already
        U, lam = torch.eye(len(cov), dtype=cov.dtype)[:, keep], g[keep]
    else:
        # eigenvalues ascend: the top d_S directions
        U = torch.linalg.eigh(cov).eigenvectors[:, -dS:]
        lam, R = torch.linalg.eigh(U.T @ (g[:, None] * U))
        U = U @ R
    for t, P, n in zip(teacher.layers, lrc.proj, lrc.norms):
        for m in P:  # q, k, v read input_layernorm's output; gate, up post_attention_layernorm's
            norm = t.input_layernorm if m in ("q", "k", "v") else t.post_attention_layernorm
            g_in = norm.weight.double()
            P[m].copy_(g_in[:, None] * U if m in INPUT_SIDE else U)
        for norm in n.values():
            norm.weight.fill_(scale)
    for a in lrc.align or []:  # explicit alignment (ablation) starts as the reused projection would
        for m in a:
            a[m].copy_(U)
    lrc.p_emb.copy_(U)
    if lrc.p_lm is None:
        lrc.norm.weight.copy_(scale * lam)
    else:
        lrc.p_lm.copy_(g[:, None] * U)
        lrc.norm.weight.fill_(scale)


@torch.no_grad()
def init_prune(lrc, calibration):
    """Width pruning as Minitron (Muralidharan et al., 2024) ranks embedding channels, as a start.
    The d_S residual coordinates with the largest activation importance (mean square at every
    RMSNorm input on calibration, each token at unit RMS) are kept and the rest cut, i.e. init_pca
    with U = those columns of I: the student is the teacher's weights with d_T - d_S rows and
    columns deleted."""
    init_pca(lrc, calibration, prune=True)


@torch.no_grad()
def init_clone(lrc, calibration, ridge=1e-3):
    """LRC's own clone objective solved in closed form before training (nanoLRC's; "Train What You
    Deploy", 2026, reports a related data-aware SVD + ridge start per layer). From the pca start
    (P_emb = U, so h_S = U^T h_T at the embedding), layer by layer on the calibration tokens, with
    the student's real inputs (errors of earlier layers included):
      input side:  one least-squares P for q, k, v (and one for gate, up) so that P n_S ~ n_T, the
                   teacher's normed input; the best fit for every W_T at once, so W_T P n_S clones
                   q, k, v, gate, up;
      output side: ridge P_o (P_down) so that h_S + P^T o_S ~ U^T (h_T + o_T): the module output,
                   written into the student's stream, lands where the teacher's does, drift of
                   earlier layers corrected; each token weighted by 1 / its mean square, as the
                   next RMSNorm sees it;
      final norm:  per coordinate, so that the student's normed output ~ U^T the teacher's.
    With P_q = P_k = P_v the student's attention is the teacher's module run on P n_S (and so the
    MLP)."""
    init_pca(lrc, calibration)
    teacher, U, dtype = lrc.teacher, lrc.p_emb.double(), lrc.teacher.embed_tokens.weight.dtype
    cos, sin = rope_cos_sin(teacher.inv_freq, 0, calibration.shape[1])

    def run(module, x, *args):  # a teacher module in the teacher's dtype; the streams in fp32
        return module(x.to(dtype), *args).float()
    h_t = teacher.embed_tokens(calibration).float()  # (N, T, d_T): every calibration token at once
    h_s = h_t @ lrc.p_emb  # (N, T, d_S)
    for t, P, n in zip(teacher.layers, lrc.proj, lrc.norms):
        for norm, module, args, ins, out in (
                ("input_layernorm", t.self_attn, (cos, sin), ("q", "k", "v"), "o"),
                ("post_attention_layernorm", t.mlp, (), ("gate", "up"), "down")):
            # the normed inputs, (N, T, d_T | d_S)
            n_t, n_s = run(t.get_submodule(norm), h_t), n[norm](h_s)
            P_in = ridge_fit(n_s, n_t, ridge=1e-6)  # (d_S, d_T): n_T ~ n_S @ P_in
            # outputs, (N, T, d_T)
            o_t, o_s = run(module, n_t, *args), run(module, n_s @ P_in.float(), *args)
            h_t = h_t + o_t
            h = h_t.double()
            # each token as the next norm sees it
            target, weight = h @ U - h_s, h.square().mean(-1).reciprocal()
            P_out = ridge_fit(o_s, target, weight, ridge)
            h_s = h_s + o_s @ P_out.float()
            for m in ins:
                P[m].copy_(P_in.T)
            P[out].copy_(P_out)
    # explicit alignment (ablation) starts as the reused P would
    for a, P in zip(lrc.align or [], lrc.proj):
        for m in a:
            a[m].copy_(P[m])
    if lrc.p_lm is None:
        target = run(teacher.norm, h_t)
    else:
        target = F.rms_norm(h_t, (h_t.shape[-1],), eps=lrc.norm.eps)
    r_s = F.rms_norm(h_s, (h_s.shape[-1],), eps=lrc.norm.eps).double().flatten(0, 1)
    y = (target.double() @ U).flatten(0, 1)
    lrc.norm.weight.copy_((r_s * y).sum(0) / r_s.square().sum(0))


def ridge_fit(x, y, weight=None, ridge=1e-3):
    """argmin_P sum_n weight_n |x_n P - y_n|^2 + ridge * mean(diag(x^T x)) |P|^2, in float64; x
    (..., a), y (..., b)."""
    x, y = x.flatten(0, -2).double(), y.flatten(0, -2).double()
    xw = x if weight is None else x * weight.flatten()[:, None].double()
    gram = xw.T @ x
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    gram = gram + ridge * gram.diagonal().mean() * eye
    return torch.linalg.solve(gram, xw.T @ y)
