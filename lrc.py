"""
Low-Rank Clone (Hao et al., 2025, "A Token is Worth over 1,000 Tokens"), Sec. 4, in the paper's order:

  1. low-rank projections generate every student weight from the frozen teacher's (Eq. 1-3),
  2. the student runs through the same model.py code, layer by layer beside the teacher,
  3. activation clone: MSE between student and teacher q, k, v, gate, up and the layer outputs (Eq. 4-6),
  4. the total loss L = L_KL + L_LM + alpha * L_clone (Eq. 7),
  5. export of the student as a plain HF checkpoint.

    teacher = Transformer.from_pretrained("teacher_dir")
    lrc = LowRankClone(teacher, d_student=256)
    loss, parts = lrc(idx, targets)        # parts: kl, lm, clone and clone/<term>
    loss.backward()                        # gradients reach only lrc.parameters()
    lrc.export("out/student", tokenizer_dir="teacher_dir")

Convention: an nn.Linear weight is [out, in]; P is [d_T, d_S].
"""
import dataclasses
import os
import shutil
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from model import RMSNorm, Transformer, atomic_dir, rope_cos_sin

# Input-side weights read the residual stream: W_S = W_T @ P  (Eq. 2).
INPUT_SIDE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj"}
# Output-side weights write the residual stream: W_S = P^T @ W_T  (Eq. 3).
OUTPUT_SIDE = {"o": "self_attn.o_proj", "down": "mlp.down_proj"}
# Clone terms (Eq. 5): the five linear outputs compared directly, the two layer outputs through P.
CLONE_TERMS = ("q", "k", "v", "gate", "up", "attn_out", "ffn_out")
OUTPUT_TERMS = {"attn_out": "o", "ffn_out": "down"}  # which projection maps the teacher's output down
INITS = ("normal", "identity", "pca", None)  # None: left uninitialised, for a checkpoint's weights to be loaded


class LowRankClone(nn.Module):
    """The trainable part of LRC: projections, the student's RMSNorm weights and (ablation) alignment
    matrices. Everything registered in this module is trained; the teacher is deliberately kept out of
    the module tree, so it is never in parameters(), state_dict(), the optimizer or DDP's buckets."""

    def __init__(self, teacher: Transformer, d_student: int, clone_terms=CLONE_TERMS, alpha=0.5,
                 temperature=40.0, kl_reduction="batchmean", alignment="reuse", init="normal", init_std=0.02,
                 clone_norm="none", clone_skip=0, checkpoint_layers=False, calibration=None):
        super().__init__()
        check_args(teacher, d_student, clone_terms, kl_reduction, alignment, init, clone_norm)
        tc = teacher.config
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())
        self.clone_terms, self.alpha, self.temperature = tuple(clone_terms), alpha, temperature
        self.kl_reduction, self.alignment = kl_reduction, alignment
        # Not in the paper (see README, "Distillation efficiency"): clone_norm="target" divides each term by
        # its target's mean square, making the loss scale-free against the teacher's massive activations;
        # clone_skip leaves the first positions of each window (the attention sink) out of the clone loss.
        self.clone_norm, self.clone_skip = clone_norm, clone_skip
        self.checkpoint_layers = checkpoint_layers  # activation checkpointing per (teacher, student) layer pair
        self.weights, self.grad_sums = None, None  # inside accumulate(): the step's weights, their gradient sums
        # Same depth, heads, head_dim, FFN width, vocabulary and RoPE; only the residual width shrinks.
        self.config = dataclasses.replace(tc, hidden_size=d_student)
        with torch.device("meta"):  # the student's architecture only; its weights are generated (Eq. 1)
            object.__setattr__(self, "skeleton", Transformer(self.config))
        dev, dT, dS = teacher.embed_tokens.weight.device, tc.hidden_size, d_student

        def proj():
            return nn.Parameter(torch.empty(dT, dS, device=dev))
        self.proj = nn.ModuleList(nn.ParameterDict({m: proj() for m in (*INPUT_SIDE, *OUTPUT_SIDE)})
                                  for _ in teacher.layers)  # P_{m,i}
        self.p_emb = proj()  # E_S = E_T @ P_emb
        self.p_lm = None if tc.tie_word_embeddings else proj()  # H_S = H_T @ P_lm (untied teachers)
        # Student RMSNorms: new weights (init 1.0), the teacher's eps; built as modules, so trainable.
        self.norms = nn.ModuleList(nn.ModuleDict({"input_layernorm": RMSNorm(dS, tc.rms_norm_eps),
                                                  "post_attention_layernorm": RMSNorm(dS, tc.rms_norm_eps)})
                                   for _ in teacher.layers).to(dev)
        self.norm = RMSNorm(dS, tc.rms_norm_eps).to(dev)
        # Ablation "explicit alignment": separate matrices map the teacher outputs instead of P_o, P_down.
        self.align = None if alignment == "reuse" else nn.ModuleList(  # only for output terms in use
            nn.ParameterDict({OUTPUT_TERMS[t]: proj() for t in self.clone_terms if t in OUTPUT_TERMS})
            for _ in teacher.layers)
        if init == "pca" and calibration is None:
            raise ValueError("init='pca' needs calibration=token ids [N, T] from the training data")
        if init is not None:
            self.init_projections(init, init_std, calibration)

    @torch.no_grad()
    def init_projections(self, init="normal", std=0.02, calibration=None):
        """normal: every P ~ N(0, std), norms 1.0 (paper and official code). identity: P = the first d_S
        columns of I and the teacher's norm weights sliced alike, i.e. the student keeps the teacher's
        first d_S residual coordinates (with d_S = d_T the student *is* the teacher: a check of the
        whole construction). pca: see init_pca (needs calibration tokens)."""
        if init == "pca":
            return self.init_pca(calibration)
        for p in self.projections():
            if init == "normal":
                nn.init.normal_(p, std=std)
            else:
                p.copy_(torch.eye(*p.shape))
        if init == "identity":
            dS = self.config.hidden_size
            for t, s in zip(self.teacher.layers, self.norms):
                for name, norm in s.items():
                    norm.weight.copy_(t.get_submodule(name).weight[:dS])
            self.norm.weight.copy_(self.teacher.norm.weight[:dS])

    @torch.no_grad()
    def init_pca(self, tokens: torch.Tensor, batch_size=8):
        """Not in the paper (README, "Distillation efficiency"): start the student as the teacher truncated
        to the top-d_S principal subspace U of its residual stream. The stream is sampled where the teacher
        reads it (every RMSNorm input), each token scaled to unit RMS first, so the attention sink's massive
        activations count as one token, not as 94% of the energy. With h_S = U^T h_T: P_emb = P_o = P_down = U;
        the input side folds the teacher's norm weights in, P = diag(g_T) U; the student's norms become
        sqrt(d_T/d_S), the RMS ratio of the same vector in d_S and d_T coordinates. U is rotated within its span
        to diagonalise U^T diag(g_final) U, so a tied head, which must reuse P_emb, gets that diagonal as its
        final norm (an untied head folds g_final in exactly). With d_S = d_T the student is the teacher."""
        teacher, dS, eps = self.teacher, self.config.hidden_size, self.config.rms_norm_eps
        cov = 0

        def add(r):  # one RMSNorm input, every token at unit RMS (as the norm sees it: an all-zero row stays 0)
            nonlocal cov
            z = r.flatten(0, 1).double()
            z = z * (z.square().mean(-1, keepdim=True) + eps).rsqrt()
            cov = cov + z.T @ z
        for x in tokens.split(batch_size):
            cos, sin = rope_cos_sin(teacher.inv_freq, 0, x.shape[1])
            h = teacher.embed_tokens(x)
            for layer in teacher.layers:
                acts = {}
                h_next = layer(h, cos, sin, 0, acts)
                add(h)  # input_layernorm's input
                add(h + acts["attn_out"])  # post_attention_layernorm's
                h = h_next
            add(h)  # the final norm's
        U = torch.linalg.eigh(cov).eigenvectors[:, -dS:]  # eigenvalues ascend: the top d_S directions
        g = teacher.norm.weight.double()
        lam, R = torch.linalg.eigh(U.T @ (g[:, None] * U))
        U, scale = U @ R, (teacher.config.hidden_size / dS) ** 0.5
        for t, P, n in zip(teacher.layers, self.proj, self.norms):
            for m in P:  # q, k, v read input_layernorm's output; gate, up post_attention_layernorm's
                g_in = (t.input_layernorm if m in ("q", "k", "v") else t.post_attention_layernorm).weight.double()
                P[m].copy_(g_in[:, None] * U if m in INPUT_SIDE else U)
            for norm in n.values():
                norm.weight.fill_(scale)
        for a in self.align or []:  # explicit alignment (ablation) starts as the reused projection would
            for m in a:
                a[m].copy_(U)
        self.p_emb.copy_(U)
        if self.p_lm is None:
            self.norm.weight.copy_(scale * lam)
        else:
            self.p_lm.copy_(g[:, None] * U)
            self.norm.weight.fill_(scale)

    def projections(self) -> list:
        """Every projection and alignment matrix (all trainable parameters except the norm weights)."""
        extra = [self.p_emb] + ([self.p_lm] if self.p_lm is not None else [])
        return [*self.proj.parameters(), *extra, *(self.align.parameters() if self.align is not None else [])]

    # -- 1. student weights (Eq. 1-3) -------------------------------------------------------
    def layer_weights(self, i: int) -> dict:
        """Student weights of layer i, named as in model.Block, generated from the teacher's."""
        t, P, n = self.teacher.layers[i], self.proj[i], self.norms[i]
        w = {f"{name}.weight": n[name].weight for name in n}
        for m, name in (*INPUT_SIDE.items(), *OUTPUT_SIDE.items()):
            lin = t.get_submodule(name)
            w[f"{name}.weight"] = lin.weight @ P[m] if m in INPUT_SIDE else P[m].T @ lin.weight
            if lin.bias is not None:  # Qwen2's q/k/v biases: copied from the teacher, frozen
                w[f"{name}.bias"] = lin.bias
        for name in ("q_norm", "k_norm"):  # Qwen3's RMSNorms over head_dim, which LRC keeps: copied, frozen
            if getattr(t.self_attn, name) is not None:
                w[f"self_attn.{name}.weight"] = getattr(t.self_attn, name).weight
        return w

    def embedding(self) -> torch.Tensor:
        return self.teacher.embed_tokens.weight @ self.p_emb  # [V, d_S]

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return emb if self.p_lm is None else self.teacher.lm_head.weight @ self.p_lm  # [V, d_S]

    def generate(self) -> dict:
        """Every student weight of a step, generated from the teacher's (Eq. 1-3)."""
        emb = self.embedding()
        return {"emb": emb, "head": self.head(emb), "layers": [self.layer_weights(i) for i in range(len(self.proj))]}

    @contextmanager
    def accumulate(self):
        """One projection pass per optimizer step. Inside, every forward uses the same generated student
        weights (self.weights, read by forward), as leaves where backward stops; on exit their summed
        gradients flow into the projections once, instead of once per micro-batch. Exact, not an
        approximation: W_S is linear in P, so sum_m dL_m/dP = J^T (sum_m dL_m/dW_S). Memory: the leaves are
        made without a graph, which is rebuilt by generating the weights again on exit (a few GEMMs), and each
        micro-batch's gradient is added into a sum kept in fp32 from the second micro-batch on, as AMP sums a
        parameter's: under bf16 autocast the leaves are bf16, and bf16 sums would lose the small updates."""
        with torch.no_grad():
            flat, spec = tree_flatten(self.generate())
        frozen = {id(p) for p in self.teacher.parameters()}  # Qwen2's biases, Qwen3's q/k norms: the teacher's own
        leaves = [w if id(w) in frozen else w.detach().requires_grad_() for w in flat]
        self.grad_sums = [None] * len(leaves)

        def add_grad(i, leaf):
            total = self.grad_sums[i]
            self.grad_sums[i] = leaf.grad if total is None else total.float().add_(leaf.grad)
            leaf.grad = None
        hooks = [leaf.register_post_accumulate_grad_hook(lambda leaf, i=i: add_grad(i, leaf))
                 for i, leaf in enumerate(leaves) if leaf.requires_grad]
        self.weights = tree_unflatten(leaves, spec)
        try:
            yield
        finally:
            self.weights = None
            for h in hooks:
                h.remove()
        flat, _ = tree_flatten(self.generate())  # the same weights again, now with the graph into P
        done = [(w, g.to(w.dtype)) for w, g in zip(flat, self.grad_sums) if g is not None]
        self.grad_sums = None
        if done:
            torch.autograd.backward([w for w, _ in done], [g for _, g in done])

    # -- 2.-4. interleaved forward and the losses -----------------------------------------------
    def forward(self, idx, targets):
        """Returns (loss, parts). Teacher and student advance one layer at a time, and each teacher
        layer's activations become clone-loss terms at once, so only one layer's are ever alive."""
        teacher, B, T = self.teacher, *idx.shape
        w = self.weights if self.weights is not None else self.generate()
        cos, sin = rope_cos_sin(teacher.inv_freq, 0, T)
        with torch.no_grad():
            h_t = teacher.embed_tokens(idx)  # (B, T, d_T)
        h_s = F.embedding(idx, w["emb"])  # (B, T, d_S)
        clone = h_s.new_zeros(len(self.clone_terms), dtype=torch.float32)
        for i in range(len(teacher.layers)):
            args = (i, h_t, h_s, cos, sin, w["layers"][i])
            if self.checkpoint_layers and torch.is_grad_enabled():  # keep only the pair's inputs; recompute in backward
                h_t, h_s, terms = checkpoint(self.layer_pair, *args, use_reentrant=False)
            else:
                h_t, h_s, terms = self.layer_pair(*args)
            clone = clone + terms
        with torch.no_grad():
            h_t = teacher.norm(h_t)
        kl_lm, kl, lm = distill_head(self.norm(h_s), w["head"], h_t, teacher.lm_head.weight, targets,
                                     self.temperature, self.kl_reduction)
        loss = kl_lm + self.alpha * clone.sum()  # Eq. 7: L_KL + L_LM + alpha * L_clone
        parts = {"kl": kl, "lm": lm, "clone": clone.sum(), **{f"clone/{k}": v for k, v in zip(self.clone_terms, clone)}}
        return loss, {k: v.detach() for k, v in parts.items()}

    def layer_pair(self, i, h_t, h_s, cos, sin, weights):
        """Teacher layer i (no autograd) and student layer i (the same model.Block code, generated weights),
        and the clone terms of the layer (Eq. 5) as a vector."""
        t_acts, s_acts = {}, {}
        with torch.no_grad():
            h_t = self.teacher.layers[i](h_t, cos, sin, 0, t_acts)
        h_s = functional_call(self.skeleton.layers[i], weights, (h_s, cos, sin, 0, s_acts))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.alpha != 0):  # alpha 0: logged, no backward
            terms = [self.clone_mse(s_acts[t], self.clone_target(i, t, t_acts)) for t in self.clone_terms]
        return h_t, h_s, torch.stack(terms) if terms else h_s.new_zeros(0, dtype=torch.float32)

    def clone_target(self, i: int, term: str, t_acts: dict) -> torch.Tensor:
        """q, k, v, gate, up have the teacher's width in both models: compared directly (Eq. 5).
        The layer outputs live in d_T vs d_S: the teacher's is mapped by the projection the student's
        own o/down weights were made with (alignment-free, Eq. 6; Lemma 1) or, in the ablation, by a
        separate alignment matrix. (The official code compares attention outputs in teacher space;
        we follow the paper.)"""
        if term not in OUTPUT_TERMS:
            return t_acts[term]
        P = (self.align if self.align is not None else self.proj)[i][OUTPUT_TERMS[term]]
        return t_acts[term] @ P

    def clone_mse(self, s, t):
        """MSE of one clone term (Eq. 5), with the optional normalisation and sink skipping."""
        s, t = s[:, self.clone_skip:], t[:, self.clone_skip:]
        loss = mse(s, t)
        return loss / t.float().square().mean().clamp(min=1e-12).detach() if self.clone_norm == "target" else loss

    # -- 5. the student as a plain model and its export ----------------------------------------
    @torch.no_grad()
    def student(self, dtype=None) -> Transformer:
        """Materialise the student as an ordinary model.Transformer (for evaluation, sampling, export).
        A bf16 teacher is trained under bf16 autocast, so the weights are generated the same way here."""
        t_dtype = self.teacher.embed_tokens.weight.dtype
        with torch.autocast(self.p_emb.device.type, dtype=t_dtype, enabled=t_dtype != torch.float32):
            w = self.generate()
        sd = {"embed_tokens.weight": w["emb"], "norm.weight": self.norm.weight, "lm_head.weight": w["head"]}
        for i, layer in enumerate(w["layers"]):
            sd.update({f"layers.{i}.{k}": v for k, v in layer.items()})
        sd = {k: v.detach().to(dtype or t_dtype).clone() for k, v in sd.items()}
        with torch.device("meta"):
            model = Transformer(self.config)
        model.load_state_dict(sd, strict=True, assign=True)  # every weight generated: none left on meta
        if self.config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = self.teacher.inv_freq.clone()
        return model.eval()

    def export(self, path: str, dtype=torch.float32, tokenizer_dir: str | None = None):
        """Write the student as an HF dir: config.json with hidden_size = d_S, explicit head_dim, the
        teacher's eps and tying; safetensors; the teacher's tokenizer files. Written into a temporary sibling,
        then renamed over path (model.atomic_dir): a failed export never leaves half a student."""
        c = self.config
        if c.model_type == "llama" and c.hidden_size % c.num_attention_heads:
            warnings.warn(f"exporting a Llama student with hidden_size {c.hidden_size} not a multiple of "
                          f"{c.num_attention_heads} heads: model.py and vLLM load it, transformers 5 refuses it")
        with atomic_dir(path) as tmp:  # a failed export leaves an earlier student at path as it was
            self.student(dtype).save_pretrained(tmp, dtype=dtype)
            if tokenizer_dir:
                for name in TOKENIZER_FILES:
                    if os.path.exists(os.path.join(tokenizer_dir, name)):
                        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "chat_template.jinja")


def mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error, averaged in fp32. Written out rather than F.mse_loss, which would keep the teacher
    tensor alive for backward; here only the difference is saved, in the activations' dtype (bf16 under
    autocast: half the memory of an fp32 copy, for 7 terms x every layer). d * d, not d.square(): CUDA's
    autocast runs square as pow in fp32 and would save an fp32 copy of d (7 GiB more at the Qwen recipe)."""
    d = s - t.to(s.dtype)
    return (d * d).mean(dtype=torch.float32)


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
    1, 1 in LRC (Eq. 7); VanillaKD mixes them (baselines.py)."""
    kl_div = h_s.shape[0] if kl_reduction == "batchmean" else targets.numel()
    return FusedDistillHead.apply(h_s.flatten(0, 1), w_s, h_t.flatten(0, 1), w_t, targets.flatten(),
                                  temperature, kl_div, *weights)


class FusedDistillHead(torch.autograd.Function):
    """L_KL + L_LM, chunk by chunk over tokens. The loss is a scalar, so its gradients with respect to
    the student's hidden states and head are formed in the same pass as the loss (the gradient of
    KL(p_T || softmax(z/T)) w.r.t. the logits z is (softmax(z/T) - p_T) / T; of CE it is
    softmax(z) - onehot) and backward only scales them. Exact: no approximation is involved."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, temperature, kl_div, w_kl, w_lm):
        N, V = targets.numel(), w_s.shape[0]
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1)
        grad_h, grad_w = torch.empty_like(h_s, dtype=torch.float32), torch.zeros_like(w_s, dtype=torch.float32)
        kl, lm = h_s.new_zeros((), dtype=torch.float32), h_s.new_zeros((), dtype=torch.float32)
        chunk = head_chunk(V, h_s.device)
        for i in range(0, N, chunk):
            hs, tgt, ok = h_s[i:i + chunk], targets[i:i + chunk], valid[i:i + chunk]
            z = (hs @ w_s.T).float()  # (c, V) student logits
            t = (h_t[i:i + chunk] @ w_t.T).float() / temperature  # (c, V) teacher logits / T
            # L_LM: cross-entropy; d/dz = softmax(z) - onehot, for valid targets, averaged over them
            lse = z.logsumexp(-1, keepdim=True)
            lm += ((lse[:, 0] - z.gather(1, tgt.clamp(min=0)[:, None])[:, 0]) * ok).sum()
            g = (z - lse).exp_().mul_((ok * w_lm / n_valid)[:, None])
            g[torch.arange(len(tgt), device=g.device), tgt.clamp(min=0)] -= ok * w_lm / n_valid
            # L_KL: sum_v p_T (log p_T - log q_S) = sum_v p_T (t - z/T) - lse(t) + lse(z/T)
            zT = z.div_(temperature)
            lse_s, lse_t = zT.logsumexp(-1, keepdim=True), t.logsumexp(-1, keepdim=True)
            p_t = (t - lse_t).exp_()
            kl += (p_t * (t - zT)).sum() + (lse_s - lse_t).sum()
            g += (zT - lse_s).exp_().sub_(p_t).mul_(w_kl / (temperature * kl_div))
            grad_h[i:i + chunk] = g.to(w_s.dtype) @ w_s
            grad_w += (g.T.to(hs.dtype) @ hs).float()
        lm, kl = lm / n_valid, kl / kl_div
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = h_s.dtype, w_s.dtype
        ctx.mark_non_differentiable(kl, lm)
        return w_kl * kl + w_lm * lm, kl, lm

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_lm):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h.mul(grad_loss).to(ctx.dtypes[0]), grad_w.mul(grad_loss).to(ctx.dtypes[1]),
                None, None, None, None, None, None, None)


def distill_losses(s_logits, t_logits, targets, temperature, kl_reduction="batchmean"):
    """(L_KL, L_LM) from whole logits (the plain computation; evaluation uses it at T=1 per token),
    both in fp32. L_KL = KL(p_T || p_S) of logits / temperature. 'batchmean' is the
    official code's scaling: summed over tokens and vocabulary, divided by the number of sequences, no
    T^2 (the published alpha, T and lr were tuned with it); 'token' divides by the number of tokens."""
    s, t = s_logits.float() / temperature, t_logits.float() / temperature
    s_logp, t_logp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum()
    kl = kl / (s_logits.shape[0] if kl_reduction == "batchmean" else s_logits.shape[:-1].numel())
    lm = F.cross_entropy(s_logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    return kl, lm


def check_args(teacher, d_student, clone_terms, kl_reduction, alignment, init, clone_norm="none"):
    if not isinstance(teacher, Transformer):
        raise TypeError(f"teacher must be a model.Transformer (load it with Transformer.from_pretrained), "
                        f"got {type(teacher).__name__}")
    tc = teacher.config
    if tc.model_type != "qwen2" and tc.attention_bias:
        raise ValueError(f"teachers with an o_proj bias ({tc.model_type} attention_bias=true) are not supported by LRC")
    d_t = tc.hidden_size
    if not 0 < d_student <= d_t or (d_student == d_t and init == "normal"):
        raise ValueError(f"d_student must be in [1, {d_t - 1}] (the teacher's hidden_size is {d_t}), "
                         f"got {d_student}; a student as wide as the teacher only makes sense with init "
                         "'identity' or 'pca'")
    bad = [t for t in clone_terms if t not in CLONE_TERMS]
    if bad:
        raise ValueError(f"unknown clone term(s) {bad}; choose from {list(CLONE_TERMS)}")
    for name, value, allowed in (("kl_reduction", kl_reduction, ("batchmean", "token")),
                                 ("alignment", alignment, ("reuse", "explicit")), ("init", init, INITS),
                                 ("clone_norm", clone_norm, ("none", "target"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
