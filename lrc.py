"""
Low-Rank Clone (Hao et al. 2025, "A Token is Worth over 1,000 Tokens"), Sec. 4 in the paper's order:

  1. projections: the trainable set, one P per teacher matrix, the student's RMSNorms   (Sec. 4.2.1)
  2. generated weights: every student weight W^S = W^T W^p from the frozen teacher's    (Sec. 4.2.1)
  3. the interleaved forward: teacher and student layer by layer through the same model.py code,
     with the activation clone: MSE between student and teacher q, k, v, gate, up and the two
     module outputs, the teacher's mapped through the student's own P_o, P_down  (Sec. 4.2.2, 4.2.4)
  4. the loss L = L_KL + L_LM + alpha * L_clone (KL and LM in losses.py)                (Sec. 4.2.3)
  5. the student as a plain model.Transformer, and its export as an HF checkpoint
  6. one projection pass per optimizer step (accumulate): exact, for gradient accumulation
The projections start as the paper's, P ~ N(0, 0.02) (or the identity, a check); inits.py holds the
calibrated starts beyond the paper (pca, prune, clone).

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

from losses import distill_head, mse
from model import RMSNorm, Transformer, atomic_dir, rope_cos_sin

# Sec. 4.2.1 writes one formula for the seven matrices m of layer i:
#     W^S_{m,i} = W^T_{m,i} W^p_{m,i},
# with the hidden size as the last axis of W^T (d_m x d_T) and W^p = P in R^{d_T x d_S}. An nn.Linear
# weight is [out, in]. q, k, v, gate, up read the residual stream: the hidden size is `in`, the last
# axis, and W_S = W_T @ P as written.
INPUT_SIDE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj"}
# o, down write the residual stream: the hidden size is `out`, the first axis, so the paper's W^T is
# our W_T^T; its W^S = W_T^T @ P, turned back into [out, in], is W_S = P^T @ W_T.
OUTPUT_SIDE = {"o": "self_attn.o_proj", "down": "mlp.down_proj"}
# Clone terms (Sec. 4.2.2): the five linear outputs compared directly, the module outputs through P.
CLONE_TERMS = ("q", "k", "v", "gate", "up", "attn_out", "ffn_out")
OUTPUT_TERMS = {"attn_out": "o", "ffn_out": "down"}  # the projection that maps the teacher's output
# see init_projections; None: left uninitialised, for loaded weights
INITS = ("normal", "identity", "pca", "prune", "clone", None)
CALIBRATED_INITS = ("pca", "prune", "clone")  # inits.py: they read calibration tokens


class LowRankClone(nn.Module):
    """The trainable part of LRC: projections, the student's RMSNorm weights and (ablation)
    alignment matrices. Everything registered in this module is trained; the teacher is deliberately
    kept out of the module tree, so it is never in parameters(), state_dict(), the optimizer or
    DDP's buckets."""

    # -- 1. projections (Sec. 4.2.1) ---------------------------------------------------------------
    def __init__(self, teacher: Transformer, d_student: int, clone_terms=CLONE_TERMS, alpha=0.5,
                 temperature=40.0, kl_reduction="batchmean", alignment="reuse", init="normal",
                 init_std=0.02, clone_norm="none", clone_skip=0, recompute=False, calibration=None):
        super().__init__()
        check_args(teacher, d_student, clone_terms, kl_reduction, alignment, init, clone_norm)
        tc = teacher.config
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())
        self.clone_terms, self.alpha, self.temperature = tuple(clone_terms), alpha, temperature
        self.kl_reduction, self.alignment = kl_reduction, alignment
        # Not in the paper: clone_norm="target" divides each term by its target's mean square,
        # making the loss scale-free against the teacher's massive activations; clone_skip leaves
        # the first positions of each window (the attention sink) out of the clone loss.
        self.clone_norm, self.clone_skip = clone_norm, clone_skip
        self.recompute = recompute  # activation checkpointing per (teacher, student) layer pair
        # (accumulate() keeps its gradient sums in self.grad_sums while inside, and only there)
        # Same depth, heads, head_dim, FFN, vocabulary and RoPE; only the residual width shrinks.
        self.config = dataclasses.replace(tc, hidden_size=d_student)
        with torch.device("meta"):  # the student's architecture only; its weights are generated (2.)
            object.__setattr__(self, "skeleton", Transformer(self.config))
        dev, dT, dS = teacher.embed_tokens.weight.device, tc.hidden_size, d_student

        def proj():
            return nn.Parameter(torch.empty(dT, dS, device=dev))
        self.proj = nn.ModuleList(nn.ParameterDict({m: proj() for m in (*INPUT_SIDE, *OUTPUT_SIDE)})
                                  for _ in teacher.layers)  # W^p_{m,i}
        self.p_emb = proj()  # W^p_emb
        self.p_lm = None if tc.tie_word_embeddings else proj()  # W^p_lm; a tied head reuses W^p_emb
        # Student RMSNorms: new weights (init 1.0), the teacher's eps; modules, so trainable.
        eps = tc.rms_norm_eps
        self.norms = nn.ModuleList(nn.ModuleDict({"input_layernorm": RMSNorm(dS, eps),
                                                  "post_attention_layernorm": RMSNorm(dS, eps)})
                                   for _ in teacher.layers).to(dev)
        self.norm = RMSNorm(dS, eps).to(dev)
        # Ablation "explicit alignment": separate matrices map the teacher outputs instead of P_o,
        # P_down (only for the output terms in use).
        outputs = [OUTPUT_TERMS[t] for t in self.clone_terms if t in OUTPUT_TERMS]
        self.align = None if alignment == "reuse" else nn.ModuleList(
            nn.ParameterDict({m: proj() for m in outputs}) for _ in teacher.layers)
        if init is not None:
            self.init_projections(init, init_std, calibration)

    def projections(self) -> list:
        """Every projection and alignment matrix: all trainable parameters but the norm weights."""
        extra = [self.p_emb] + ([self.p_lm] if self.p_lm is not None else [])
        align = self.align.parameters() if self.align is not None else []
        return [*self.proj.parameters(), *extra, *align]

    @torch.no_grad()
    def init_projections(self, init="normal", std=0.02, calibration=None):
        """The paper's start (init_normal), the identity (a check) or a calibrated init (inits.py)."""
        if init in CALIBRATED_INITS:
            import inits  # imported here: inits.py builds on this module
            return getattr(inits, f"init_{init}")(self, calibration)
        getattr(self, f"init_{init}")(std)

    @torch.no_grad()
    def init_normal(self, std=0.02):
        """The paper's and official code's: every P ~ N(0, std), norms 1.0 (as built)."""
        for p in self.projections():
            nn.init.normal_(p, std=std)

    @torch.no_grad()
    def init_identity(self, std=None):
        """P = the first d_S columns of I and the teacher's norm weights sliced alike, i.e. the
        student keeps the teacher's first d_S residual coordinates (with d_S = d_T the student *is*
        the teacher: a check of the whole construction)."""
        for p in self.projections():
            p.copy_(torch.eye(*p.shape))
        dS = self.config.hidden_size
        for t, s in zip(self.teacher.layers, self.norms):
            for name, norm in s.items():
                norm.weight.copy_(t.get_submodule(name).weight[:dS])
        self.norm.weight.copy_(self.teacher.norm.weight[:dS])

    # -- 2. generated weights (Sec. 4.2.1, Algorithm 1 step 1) -------------------------------------
    def layer_weights(self, i: int) -> dict:
        """Student weights of layer i, named as in model.Block: W^S = W^T W^p, [out, in]."""
        t, P, n = self.teacher.layers[i], self.proj[i], self.norms[i]
        w = {f"{name}.weight": n[name].weight for name in n}
        for m, name in (*INPUT_SIDE.items(), *OUTPUT_SIDE.items()):
            lin = t.get_submodule(name)
            w[f"{name}.weight"] = lin.weight @ P[m] if m in INPUT_SIDE else P[m].T @ lin.weight
            if lin.bias is not None:  # Qwen2's q/k/v biases: copied from the teacher, frozen
                w[f"{name}.bias"] = lin.bias
        for name in ("q_norm", "k_norm"):  # Qwen3's RMSNorms over head_dim, kept: copied, frozen
            if getattr(t.self_attn, name) is not None:
                w[f"self_attn.{name}.weight"] = getattr(t.self_attn, name).weight
        return w

    def embedding(self) -> torch.Tensor:
        return self.teacher.embed_tokens.weight @ self.p_emb  # W^S_emb = W^T_emb W^p_emb: [V, d_S]

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return emb if self.p_lm is None else self.teacher.lm_head.weight @ self.p_lm  # W^T_lm W^p_lm

    def generate(self) -> dict:
        """Every student weight of a step, generated from the teacher's."""
        emb = self.embedding()
        layers = [self.layer_weights(i) for i in range(len(self.proj))]
        return {"emb": emb, "head": self.head(emb), "layers": layers}

    # -- 3. the interleaved forward and the activation clone (Sec. 4.2.2, Algorithm 1 step 2) ------
    def forward(self, idx, targets, weights=None):
        """Returns (loss, parts). Teacher and student advance one layer at a time, and each teacher
        layer's activations become clone-loss terms at once, so only one layer's are ever alive.
        weights: the step's generated weights, as accumulate() yields them; None: generated here."""
        teacher, T = self.teacher, idx.shape[1]
        w = weights if weights is not None else self.generate()
        cos, sin = rope_cos_sin(teacher.inv_freq, 0, T)
        with torch.no_grad():
            h_t = teacher.embed_tokens(idx)  # (B, T, d_T)
        h_s = F.embedding(idx, w["emb"])  # (B, T, d_S)
        clone = h_s.new_zeros(len(self.clone_terms), dtype=torch.float32)
        for i in range(len(teacher.layers)):
            args = (i, h_t, h_s, cos, sin, w["layers"][i])
            if self.recompute and torch.is_grad_enabled():  # keep the inputs; recompute in backward
                h_t, h_s, terms = checkpoint(self.layer_pair, *args, use_reentrant=False)
            else:
                h_t, h_s, terms = self.layer_pair(*args)
            clone = clone + terms
        return self.loss(h_t, h_s, w["head"], clone, targets)

    def layer_pair(self, i, h_t, h_s, cos, sin, weights):
        """Teacher layer i (no autograd) and student layer i (the same model.Block code, generated
        weights), and the layer's clone terms as a vector: E(h^S_m, h^T_m) for the terms in use."""
        t_acts, s_acts = {}, {}
        with torch.no_grad():
            h_t = self.teacher.layers[i](h_t, cos, sin, 0, t_acts)
        h_s = functional_call(self.skeleton.layers[i], weights, (h_s, cos, sin, 0, s_acts))
        # alpha 0: logged, no backward
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.alpha != 0):
            terms = [self.clone_mse(s_acts[t], self.clone_target(i, t, t_acts))
                     for t in self.clone_terms]
        return h_t, h_s, torch.stack(terms) if terms else h_s.new_zeros(0, dtype=torch.float32)

    def clone_target(self, i: int, term: str, t_acts: dict) -> torch.Tensor:
        """q, k, v, gate, up have the teacher's width in both models: compared directly. The module
        outputs live in d_T vs d_S: the teacher's is mapped by the projection the student's own
        o/down weights were made with, sigma^T W^p_o and sigma^T W^p_down (alignment-free, Sec.
        4.2.4, Lemma 1) or, in the ablation, by a separate alignment matrix. (The official code
        compares attention outputs in teacher space; we follow the paper.)"""
        if term not in OUTPUT_TERMS:
            return t_acts[term]
        P = (self.align if self.align is not None else self.proj)[i][OUTPUT_TERMS[term]]
        return t_acts[term] @ P

    def clone_mse(self, s, t):
        """E(s, t) of one clone term, with the optional normalisation and sink skipping."""
        s, t = s[:, self.clone_skip:], t[:, self.clone_skip:]
        loss = mse(s, t)
        if self.clone_norm == "target":
            return loss / t.float().square().mean().clamp(min=1e-12).detach()
        return loss

    # -- 4. the loss (Sec. 4.2.3) ------------------------------------------------------------------
    def loss(self, h_t, h_s, head, clone, targets):
        """(L, parts) from the last layer's hidden states, the student's head and the clone terms
        summed over layers. L_KL and L_LM come from the fused head (losses.distill_head), which
        never forms [B, T, V] logits."""
        with torch.no_grad():
            h_t = self.teacher.norm(h_t)
        kl_lm, kl, lm = distill_head(self.norm(h_s), head, h_t, self.teacher.lm_head.weight, targets,
                                     self.temperature, self.kl_reduction)
        loss = kl_lm + self.alpha * clone.sum()  # L_KL + L_LM + alpha * L_clone
        parts = {"kl": kl, "lm": lm, "clone": clone.sum(),
                 **{f"clone/{k}": v for k, v in zip(self.clone_terms, clone)}}
        return loss, {k: v.detach() for k, v in parts.items()}

    # -- 5. the student as a plain model and its export --------------------------------------------
    @torch.no_grad()
    def student(self, dtype=None) -> Transformer:
        """Materialise the student as an ordinary model.Transformer (for evaluation, sampling,
        export). A bf16 teacher is trained under bf16 autocast, so the weights are generated the
        same way here."""
        t_dtype = self.teacher.embed_tokens.weight.dtype
        bf16 = t_dtype != torch.float32
        with torch.autocast(self.p_emb.device.type, dtype=t_dtype, enabled=bf16):
            w = self.generate()
        sd = {"embed_tokens.weight": w["emb"], "norm.weight": self.norm.weight,
              "lm_head.weight": w["head"]}
        for i, layer in enumerate(w["layers"]):
            sd.update({f"layers.{i}.{k}": v for k, v in layer.items()})
        sd = {k: v.detach().to(dtype or t_dtype).clone() for k, v in sd.items()}
        with torch.device("meta"):
            model = Transformer(self.config)
        # every weight generated: none left on meta
        model.load_state_dict(sd, strict=True, assign=True)
        if self.config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = self.teacher.inv_freq.clone()
        return model.eval()

    def export(self, path: str, dtype=torch.float32, tokenizer_dir: str | None = None):
        """Write the student as an HF dir: config.json with hidden_size = d_S, explicit head_dim,
        the teacher's eps and tying; safetensors; the teacher's tokenizer files. Written into a
        temporary sibling, then renamed over path (model.atomic_dir): a failed export never leaves
        half a student."""
        c = self.config
        if c.model_type == "llama" and c.hidden_size % c.num_attention_heads:
            warnings.warn(f"exporting a Llama student with hidden_size {c.hidden_size} not a multiple "
                          f"of {c.num_attention_heads} heads: model.py and vLLM load it, transformers 5 "
                          "refuses it")
        with atomic_dir(path) as tmp:  # a failed export leaves an earlier student at path as it was
            self.student(dtype).save_pretrained(tmp, dtype=dtype)
            if tokenizer_dir:
                for name in TOKENIZER_FILES:
                    if os.path.exists(os.path.join(tokenizer_dir, name)):
                        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))

    # -- 6. one projection pass per optimizer step -------------------------------------------------
    @contextmanager
    def accumulate(self):
        """Gradient accumulation with the weights generated once per optimizer step, not once per
        micro-batch:

            with lrc.accumulate() as weights:
                for idx, targets in micro_batches:
                    lrc(idx, targets, weights)[0].backward()
            # here the projections hold the step's gradients

        Inside, every forward uses the same generated student weights, as leaves where backward
        stops; on exit their summed gradients flow into the projections once. Exact, not an
        approximation: W_S is linear in P, so sum_m dL_m/dP = J^T (sum_m dL_m/dW_S). The clone
        targets t_acts @ P_o, P_down read P itself (no generated weight in between), so their
        gradient reaches P at each micro-batch's backward; gradients add, so the step's total is the
        same. Memory: the leaves are made without a graph, which is rebuilt by generating the
        weights again on exit (a few GEMMs), and each micro-batch's gradient is added into a sum
        (self.grad_sums, only while inside) kept in fp32 from the second micro-batch on, as AMP sums
        a parameter's: under bf16 autocast the leaves are bf16, and bf16 sums would lose the small
        updates."""
        with torch.no_grad():
            flat, spec = tree_flatten(self.generate())
        # Qwen2's biases, Qwen3's q/k norms are the teacher's own: no leaves
        frozen = {id(p) for p in self.teacher.parameters()}
        leaves = [w if id(w) in frozen else w.detach().requires_grad_() for w in flat]
        self.grad_sums = [None] * len(leaves)

        def add_grad(i, leaf):
            total = self.grad_sums[i]
            self.grad_sums[i] = leaf.grad if total is None else total.float().add_(leaf.grad)
            leaf.grad = None
        hooks = [leaf.register_post_accumulate_grad_hook(lambda leaf, i=i: add_grad(i, leaf))
                 for i, leaf in enumerate(leaves) if leaf.requires_grad]
        try:
            yield tree_unflatten(leaves, spec)
        finally:
            for h in hooks:
                h.remove()
        flat, _ = tree_flatten(self.generate())  # the same weights again, now with the graph into P
        done = [(w, g.to(w.dtype)) for w, g in zip(flat, self.grad_sums) if g is not None]
        self.grad_sums = None
        if done:
            torch.autograd.backward([w for w, _ in done], [g for _, g in done])


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "chat_template.jinja")


def check_args(teacher, d_student, clone_terms, kl_reduction, alignment, init, clone_norm="none"):
    if not isinstance(teacher, Transformer):
        raise TypeError("teacher must be a model.Transformer (load it with Transformer.from_pretrained), "
                        f"got {type(teacher).__name__}")
    tc = teacher.config
    if tc.model_type != "qwen2" and tc.attention_bias:
        raise ValueError(f"teachers with an o_proj bias ({tc.model_type} attention_bias=true) "
                         "are not supported by LRC")
    d_t = tc.hidden_size
    if not 0 < d_student <= d_t or (d_student == d_t and init == "normal"):
        raise ValueError(f"d_student must be in [1, {d_t - 1}] (the teacher's hidden_size is "
                         f"{d_t}), got {d_student}; a student as wide as the teacher only makes sense "
                         "with init 'identity' or 'pca'")
    bad = [t for t in clone_terms if t not in CLONE_TERMS]
    if bad:
        raise ValueError(f"unknown clone term(s) {bad}; choose from {list(CLONE_TERMS)}")
    for name, value, allowed in (("kl_reduction", kl_reduction, ("batchmean", "token")),
                                 ("alignment", alignment, ("reuse", "explicit")),
                                 ("init", init, INITS), ("clone_norm", clone_norm, ("none", "target"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
