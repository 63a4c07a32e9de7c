"""
The methods LRC is compared with, in the same training loop (train.py's
method = kd | tinybert | lm | sft):

  VanillaKD  a student from scratch, token-level KD mixed with the LM loss (MiniPLM's VanillaKD
             baseline),
  TinyBERT   a student from scratch, KD + LM + hidden-state and attention-map MSE (the paper's
             Fig. 3),
  LMOnly     plain next-token training of a whole model: pre-training from scratch, or SFT of an HF
             dir.

    python train.py config/kd_qwen.py --teacher=/models/Qwen1.5-1.8B --data_dir=data/pile_qwen
    python train.py config/lrc_llama.py --method=tinybert --teacher=/models/Llama-3.2-3B-Instruct \
        --data_dir=...
    python train.py config/sft_llama.py --init_from=out/lrc_llama/student --data_dir=data/ultrachat

    kd = VanillaKD(teacher, student_config(teacher.config, 256), alpha_kl=0.5, temperature=1.0)
    loss, parts = kd(idx, targets)         # parts: kl, lm (detached)
    kd.export("out/kd/student", tokenizer_dir="teacher_dir")

Each module has lrc.LowRankClone's interface: forward(idx, targets) -> (loss, parts); .teacher,
frozen and kept out of the module tree (None for LMOnly); .config, the student's ModelConfig;
.student(dtype) and .export(path, dtype, tokenizer_dir). Every registered parameter is trained. A
student from scratch is initialised by Transformer.init_weights: every Linear and the embedding ~
N(0, init_std = 0.02), biases 0, RMSNorm weights 1.
"""
import copy
import dataclasses
import os
from contextlib import nullcontext

import torch
import torch.nn as nn

from losses import distill_head, mse
from lrc import LowRankClone
from model import ModelConfig, Transformer, read_json, rope_cos_sin

KL_REDUCTIONS = ("batchmean", "token")


def student_config(teacher_config: ModelConfig, d_student: int, path: str = "") -> ModelConfig:
    """The architecture of a student from scratch: a config.json (or an HF dir holding one) when
    path is set; else the teacher's with hidden_size = d_student, which is exactly the LRC student's
    shape (same depth, heads, head_dim, FFN, vocabulary), so a baseline and LRC are compared at the
    same size."""
    if path:
        config_json = os.path.join(path, "config.json") if os.path.isdir(path) else path
        return ModelConfig.from_hf(read_json(config_json))
    return dataclasses.replace(teacher_config, hidden_size=d_student)


class Student(nn.Module):
    """What the baselines share: the trained model is self.model, an ordinary model.Transformer."""

    def __init__(self, model: Transformer, teacher: Transformer | None = None):
        super().__init__()
        self.model, self.config = model, model.config
        # like LRC: the frozen teacher is no submodule, so never in parameters(), state_dict(),
        # DDP
        frozen = teacher if teacher is None else teacher.requires_grad_(False).eval()
        object.__setattr__(self, "teacher", frozen)

    @torch.no_grad()
    def student(self, dtype=None) -> Transformer:
        """The trained model itself (evaluation, sampling), or a copy with weights in dtype (RoPE
        stays fp32)."""
        if dtype is None or dtype == self.model.lm_head.weight.dtype:
            return self.model
        model = copy.deepcopy(self.model).to(dtype)
        model.inv_freq = self.model.inv_freq.clone()
        return model

    def accumulate(self):
        """Gradient accumulation needs nothing special here (LRC generates its weights once per
        step)."""
        return nullcontext()

    # the same HF dir as LRC's: config.json, safetensors, the tokenizer files
    export = LowRankClone.export


def from_scratch(config: ModelConfig, teacher: Transformer, init_std: float) -> Transformer:
    """A randomly initialised student on the teacher's device, for distillation from that
    teacher."""
    check_vocab(config, teacher)
    with torch.device(teacher.embed_tokens.weight.device):
        return Transformer(config).init_weights(init_std)


def check_vocab(config: ModelConfig, teacher: Transformer):
    if config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student vocab_size {config.vocab_size} != the teacher's "
                         f"{teacher.config.vocab_size}: token-level KD needs the same vocabulary")


def check_kl(temperature, kl_reduction):
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {list(KL_REDUCTIONS)}, got {kl_reduction!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


class VanillaKD(Student):
    """Token-level KD of a student from scratch:
        L = alpha_kl * KL(p_T || p_S) + (1 - alpha_kl) * L_LM,
    with the KL on logits / temperature. MiniPLM's VanillaKD-Pretrain-Qwen-500M
    (thu-coai/MiniPLM, pretrain/kd_trainer.py): kd_ratio = alpha_kl = 0.5, T = 1, both terms means
    over tokens (kl_reduction="token"). Its KD term is the cross-entropy -sum p_T log p_S, i.e. this
    KL plus the teacher's entropy: the same gradient, a loss higher by that constant."""

    def __init__(self, teacher: Transformer, student_config: ModelConfig, alpha_kl=0.5,
                 temperature=1.0, kl_reduction="token", init_std=0.02,
                 model: Transformer | None = None):
        check_kl(temperature, kl_reduction)
        if not 0.0 <= alpha_kl <= 1.0:
            raise ValueError(f"alpha_kl must be in [0, 1], got {alpha_kl}")
        if model is None:
            model = from_scratch(student_config, teacher, init_std)
        else:  # a given starting point (e.g. an exported student), checked like a new one
            check_vocab(model.config, teacher)
        super().__init__(model, teacher)
        self.alpha_kl, self.temperature, self.kl_reduction = alpha_kl, temperature, kl_reduction

    def forward(self, idx, targets):
        with torch.no_grad():
            h_t = self.teacher.hidden(idx)  # (B, T, d_T)
        h_s = self.model.hidden(idx)  # (B, T, d_S)
        # the fused chunked head: no [B, T, V] logits of either model
        loss, kl, lm = distill_head(h_s, self.model.lm_head.weight,
                                    h_t, self.teacher.lm_head.weight, targets, self.temperature,
                                    self.kl_reduction, (self.alpha_kl, 1.0 - self.alpha_kl))
        return loss, {"kl": kl, "lm": lm}


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """The teacher layer each student layer learns from: round((i + 1) L_T / L_S) - 1 (halves
    rounded up), uniform over depth, last to last; i -> i at equal depth."""
    return [max(0, int((i + 1) * n_teacher / n_student + 0.5) - 1) for i in range(n_student)]


class TinyBERT(Student):
    """TinyBERT (Jiao et al., 2020), the LRC paper's feature-distillation baseline (Fig. 3), from
    scratch:
        L = L_KL + L_LM + w_hidden * sum_i MSE(H_i^S W_i, H_m(i)^T)
                        + w_attn * sum_i MSE(A_i^S, A_m(i)^T)
    H_i: the residual stream after layer i (i = 0: the embeddings, as in TinyBERT's embedding term);
    W_i: a learned Linear(d_S -> d_T) per hidden state -- the alignment matrices LRC does without;
    A_i: attention probabilities (B, heads, T, T), so both models need the same number of heads;
    m(i): layer_map. TinyBERT fits the attention scores before softmax; here the probabilities are
    compared, which causal masking leaves finite (the upper triangle is 0 in both and counts in the
    mean)."""

    def __init__(self, teacher: Transformer, student_config: ModelConfig, temperature=40.0,
                 kl_reduction="batchmean", w_hidden=1.0, w_attn=1.0, init_std=0.02):
        check_kl(temperature, kl_reduction)
        tc, sc = teacher.config, student_config
        if sc.num_attention_heads != tc.num_attention_heads:
            raise ValueError(f"TinyBERT compares attention maps head by head: the student has "
                             f"{sc.num_attention_heads} heads, the teacher "
                             f"{tc.num_attention_heads}")
        super().__init__(from_scratch(sc, teacher, init_std), teacher)
        self.temperature, self.kl_reduction = temperature, kl_reduction
        self.w_hidden, self.w_attn = w_hidden, w_attn
        self.layer_map = layer_map(sc.num_hidden_layers, tc.num_hidden_layers)
        with torch.device(teacher.embed_tokens.weight.device):
            # W_0 (embeddings) .. W_L
            self.hidden_maps = nn.ModuleList(nn.Linear(sc.hidden_size, tc.hidden_size, bias=False)
                                             for _ in range(sc.num_hidden_layers + 1))
        for m in self.hidden_maps:
            nn.init.normal_(m.weight, std=init_std)

    def forward(self, idx, targets):
        """Teacher and student advance together, as in LRC: only one teacher layer's activations are
        alive."""
        teacher, student, T = self.teacher, self.model, idx.shape[1]
        t_rope, s_rope = rope_cos_sin(teacher.inv_freq, 0, T), rope_cos_sin(student.inv_freq, 0, T)
        with torch.no_grad():
            h_t = teacher.embed_tokens(idx)  # (B, T, d_T)
        h_s = student.embed_tokens(idx)  # (B, T, d_S)
        hidden, attn = mse(self.hidden_maps[0](h_s), h_t), h_s.new_zeros((), dtype=torch.float32)
        j = 0  # teacher layers run so far
        for i, layer in enumerate(student.layers):
            with torch.no_grad():
                # run the teacher up to layer m(i), keeping its attention map
                while j <= self.layer_map[i]:
                    t_acts = {"attn_probs": None}
                    h_t, j = teacher.layers[j](h_t, *t_rope, 0, t_acts), j + 1
            # asks model.Attention for the probabilities (explicit softmax)
            s_acts = {"attn_probs": None}
            h_s = layer(h_s, *s_rope, 0, s_acts)
            hidden = hidden + mse(self.hidden_maps[i + 1](h_s), h_t)
            attn = attn + mse(s_acts["attn_probs"], t_acts["attn_probs"])
        with torch.no_grad():
            h_t = teacher.norm(h_t)
        kl_lm, kl, lm = distill_head(student.norm(h_s), student.lm_head.weight, h_t,
                                     teacher.lm_head.weight, targets, self.temperature,
                                     self.kl_reduction)
        loss = kl_lm + self.w_hidden * hidden + self.w_attn * attn
        return loss, {"kl": kl, "lm": lm, "hidden": hidden.detach(), "attn": attn.detach()}


class LMOnly(Student):
    """Next-token cross-entropy on every weight of a Transformer, no teacher: pre-training from
    scratch (the conventional baseline) or supervised fine-tuning of an HF dir. For SFT train.py
    sets the targets to -100 where the data's loss mask is 0, so only assistant tokens count. (The
    plain head builds [B, T, V] logits: there is no teacher to fuse with.)"""

    def __init__(self, model: Transformer):
        super().__init__(model.requires_grad_(True))

    def forward(self, idx, targets):
        _, lm = self.model(idx, targets)
        return lm, {"lm": lm.detach()}
