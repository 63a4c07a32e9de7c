"""
The Qwen2 / Qwen3 / Llama decoder, written by hand, reading and writing HuggingFace safetensors
directly.

    from model import Transformer
    model = Transformer.from_pretrained("path/to/hf_dir", dtype=torch.bfloat16)
    logits, loss = model(idx, targets)                      # idx: (B, T) token ids
    for tok in model.generate(idx, max_new_tokens=32): ...  # greedy at temperature 0, KV cache
    model.save_pretrained("out/student")                    # loads in transformers as well

Names mirror HF (embed_tokens, layers[i].self_attn.q_proj, mlp.gate_proj, ...), so an HF checkpoint
maps onto this module by stripping "model.". RoPE uses HF's rotate-half layout (no q/k permutation).
"""
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64  # explicit: LRC students keep the teacher's head_dim, hidden_size shrinks
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3" | "linear", ...}
    attention_bias: bool = False  # bias on q/k/v (Qwen2 always); on q/k/v/o (Llama, Qwen3) when set
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from an HF config.json dict; anything we do not implement is a clear error."""
        mt = d.get("model_type")
        if mt not in ARCHITECTURES:
            if "moe" in str(mt) or d.get("num_experts") or d.get("num_local_experts"):
                raise ValueError(f"config.json: model_type {mt!r} is a mixture of experts; only "
                                 f"dense models are supported ({sorted(ARCHITECTURES)})")
            raise ValueError(f"config.json: model_type {mt!r} is not supported "
                             f"(only {sorted(ARCHITECTURES)})")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {d['hidden_act']!r} is not supported "
                             "(only 'silu')")
        if d.get("mlp_bias"):
            raise ValueError("config.json: mlp_bias=true is not supported")
        if mt in ("qwen2", "qwen3") and d.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true (an active sliding window) "
                             "is not supported")
        # transformers 5 moved rope_theta / rope_scaling into rope_parameters; read both forms.
        rope = {**(d.get("rope_parameters") or {}), **(d.get("rope_scaling") or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported "
                             "(default, llama3, linear)")
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        heads = d["num_attention_heads"]
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            attention_bias=mt == "qwen2" or bool(d.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        )

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        """The config.json that transformers (and vLLM) read; head_dim is always written."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(architectures=[ARCHITECTURES[self.model_type]], hidden_act="silu",
                 torch_dtype=str(dtype).removeprefix("torch."))
        if self.rope_scaling is None:
            d.pop("rope_scaling")
        if self.model_type == "qwen2":  # qwen2 has bias on q/k/v by definition and no such key
            d.pop("attention_bias")
        if self.model_type in ("qwen2", "qwen3"):
            d.update(use_sliding_window=False, sliding_window=None)
        return d


# -----------------------------------------------------------------------------
# RoPE

def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with 'llama3' or 'linear' scaling if configured."""
    # fp32 arithmetic in HF's order, so angles at long positions match transformers to the last bit
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    factor = rs["factor"]
    if rs["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, start, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, hs) at positions start .. start+T-1."""
    return rope_at(inv_freq, torch.arange(T, device=inv_freq.device) + start)


def rope_at(inv_freq: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (*pos.shape, hs) at integer positions of any shape: a (B, T) pos gives each row its
    own."""
    freqs = pos.float()[..., None] * inv_freq  # (..., hs/2): the same fp32 products as HF's
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., hs): rotate-half layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    # fp32 for bf16/fp32 as HF; fp64 stays fp64 (a reference)
    f = torch.promote_types(x.dtype, torch.float32)
    return (x.to(f) * cos + rotated.to(f) * sin).to(x.dtype)


# -----------------------------------------------------------------------------
# Modules

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 as HF (fp64 stays), then scale in the weight's dtype
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear. One row compiled on CPU (a batch-1 decode step) is a multiply-and-sum in fp32:
    decoding reads every weight once per token, and inductor streams that from memory faster than
    torch's CPU matrix-vector kernels (see results/speed.md)."""

    def forward(self, x):
        if x.numel() == x.shape[-1] and x.device.type == "cpu" and torch.compiler.is_compiling():
            # (..., 1, in) * (out, in) -> (..., out)
            y = (x.unsqueeze(-2).float() * self.weight.float()).sum(-1)
            return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
        return super().forward(x)


# Compiled on CPU, causal attention over up to this many slots is two matmuls around a softmax that
# inductor fuses, the scores in fp32 as SDPA keeps them: faster than SDPA's CPU kernel while the
# scores stay in cache, at the cost of the [T, S] probabilities kept for backward. Beyond it SDPA is
# faster (see results/speed.md).
COMPILED_CPU_MATH_SLOTS = 256


def attention_probs(q, k, mask, scale):
    """softmax(q k^T * scale) in fp32 over the key slots mask allows:
    (..., T, hs), (..., S, hs) -> (..., T, S)."""
    return ((q @ k.transpose(-2, -1)) * scale).float().masked_fill(~mask, float("-inf")).softmax(-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hs = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # Llama's and Qwen3's attention_bias cover o_proj too
        o_bias = cfg.attention_bias and cfg.model_type != "qwen2"
        self.q_proj = Linear(cfg.hidden_size, self.nh * self.hs, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, self.nkv * self.hs, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, self.nkv * self.hs, bias=cfg.attention_bias)
        self.o_proj = Linear(self.nh * self.hs, cfg.hidden_size, bias=o_bias)
        # Qwen3: RMSNorm over each head's head_dim features of q and of k, before RoPE (one weight
        # for all heads)
        qk_norm = cfg.model_type == "qwen3"
        self.q_norm = RMSNorm(self.hs, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.hs, cfg.rms_norm_eps) if qk_norm else None
        self.cache = None  # (k, v), each (B, nkv, max_len, hs), set by Transformer.setup_cache

    def forward(self, x, cos, sin, start_pos=0, acts=None, mask=None):
        """x (B, T, C); cos, sin (T, hs), or (B, 1, T, hs) for a position per row. With the KV
        cache, x's keys and values go to cache slots start_pos .. start_pos+T-1 (start_pos an int,
        or a 0-d tensor for a compiled step). mask (B|1, 1, T, S), True where a query may attend: it
        sees cache slots 0 .. S-1 (empty slots, other rows' padding masked out); without a mask, the
        slots before its own and itself (causal)."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # LRC clones the projections' outputs: before RoPE (paper Sec. 4.2), before q/k_norm
        if acts is not None:
            acts["q"], acts["k"], acts["v"] = q, k, v
        q, k = q.view(B, T, self.nh, self.hs), k.view(B, T, self.nkv, self.hs)  # (B, T, nh|nkv, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, nh, T, hs)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, nkv, T, hs)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.cache is not None:
            ck, cv = self.cache
            if isinstance(start_pos, int):
                ck[:B, :, start_pos:start_pos + T] = k
                cv[:B, :, start_pos:start_pos + T] = v
            else:  # a tensor: the same write with static shapes
                slots = torch.arange(T, device=x.device) + start_pos
                ck[:B].index_copy_(2, slots, k)
                cv[:B].index_copy_(2, slots, v)
            S = start_pos + T if mask is None else mask.shape[-1]
            k, v = ck[:B, :, :S], cv[:B, :, :S]  # (B, nkv, S, hs)
        rep = self.nh // self.nkv  # GQA: each kv head serves `rep` query heads
        if T == 1 and acts is None:  # one new token: each kv head's query heads as rows, no copy
            q = q.reshape(B, self.nkv, rep, self.hs)
            if B > 1 and mask is not None:  # two matmuls: SDPA's CPU kernel is slow for many rows
                # of one query; probs (B, nkv, rep, S)
                y = attention_probs(q, k, mask, self.hs ** -0.5).to(v.dtype) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            # (B, nkv, rep, hs) -> (B, 1, nh*hs)
            return self.o_proj(y.reshape(B, 1, self.nh * self.hs))
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, S, hs)
        S = k.shape[2]
        if mask is None and (S != T or acts is not None and "attn_probs" in acts):
            # query t sees slots up to S-T+t
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        if acts is not None and "attn_probs" in acts:  # asked for (TinyBERT): the probabilities
            acts["attn_probs"] = attention_probs(q, k, mask, self.hs ** -0.5)  # (B, nh, T, S)
            y = acts["attn_probs"].to(v.dtype) @ v  # (B, nh, T, hs)
        elif (mask is None and S <= COMPILED_CPU_MATH_SLOTS and x.device.type == "cpu"
              and torch.compiler.is_compiling()):
            # inductor fuses the softmax between the matmuls
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril()
            y = attention_probs(q.float(), k.float(), causal, self.hs ** -0.5).to(v.dtype) @ v
        elif mask is None:  # a full prefill is plain causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:  # after earlier tokens (query t sits at slot S - T + t), or an explicit mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hs)  # (B, T, nh*hs)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, acts=None):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if acts is not None:  # gate is cloned before SiLU
            acts["gate"], acts["up"] = gate, up
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, start_pos=0, acts=None, mask=None):
        """acts: an optional dict the block fills with q, k, v, gate, up, attn_out and ffn_out; if
        it already holds the key "attn_probs", attention is computed explicitly and its
        probabilities stored there. start_pos, mask: as Attention.forward."""
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, start_pos, acts, mask)
        x = x + attn_out
        ffn_out = self.mlp(self.post_attention_layernorm(x), acts)
        if acts is not None:
            acts["attn_out"], acts["ffn_out"] = attn_out, ffn_out
        return x + ffn_out


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def init_weights(self, std: float = 0.02):
        """Random init for training from scratch: every Linear and the embedding ~ N(0, std),
        biases 0, norms 1. (LRC students are never initialised this way: their weights come from
        the teacher.)"""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        return self

    def forward(self, idx, targets=None, start_pos=0, acts=None, pos=None, mask=None):
        """idx (B, T) -> logits (B, T, V) and the mean next-token loss (ignore_index -100) when
        targets are given. acts: an optional list that receives one dict of block activations per
        layer. pos, mask: rows of different lengths in one batch (see hidden)."""
        logits = self.lm_head(self.hidden(idx, start_pos, acts, pos, mask))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   ignore_index=-100)
        return logits, loss

    def hidden(self, idx, start_pos=0, acts=None, pos=None, mask=None):
        """The final normalised hidden states (B, T, C): forward without the head, for losses that
        apply the head chunk by chunk (losses.distill_head) instead of building [B, T, V] logits.
        With the KV cache, idx goes to cache slots start_pos.. . pos (B, T): each token's position,
        when rows are not at start_pos, start_pos+1, ... (a row that continues a shorter context);
        mask (B, 1, T, S): which cache slots each query sees (Attention.forward), so that rows of
        different lengths share a batch."""
        x = self.embed_tokens(idx)  # (B, T, C)
        if pos is None:
            cos, sin = rope_cos_sin(self.inv_freq, start_pos, idx.shape[1])  # (T, hs)
        else:
            cos, sin = (c[:, None] for c in rope_at(self.inv_freq, pos))  # (B, 1, T, hs)
        for layer in self.layers:
            a = None if acts is None else {}
            x = layer(x, cos, sin, start_pos, a, mask)
            if a is not None:
                acts.append(a)
        return self.norm(x)

    # --- generation -----------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int):
        """A static KV cache indexed by position; pass None as batch_size to drop it."""
        p = self.lm_head.weight
        for layer in self.layers:
            a = layer.self_attn
            shape = (batch_size, a.nkv, max_len, a.hs)
            a.cache = None if batch_size is None else (p.new_zeros(shape), p.new_zeros(shape))

    def decode_step(self, tok, pos):
        """One new token per row over the whole static cache: tok (B, 1) at position pos (a 0-d
        tensor) -> logits (B, V). Every shape is fixed by the cache, so torch.compile builds it once
        per cache size."""
        S = self.layers[0].self_attn.cache[0].shape[2]
        # (1, 1, 1, S): the slots up to pos
        mask = (torch.arange(S, device=tok.device) <= pos)[None, None, None]
        x = self.embed_tokens(tok)  # (B, 1, C)
        cos, sin = rope_at(self.inv_freq, pos[None])  # (1, hs)
        for layer in self.layers:
            x = layer(x, cos, sin, pos, None, mask)
        return self.lm_head(self.norm(x))[:, -1]  # (B, V)

    def compiled_step(self):
        """decode_step compiled (torch.compile, static shapes), built on first use and kept with the
        model."""
        if getattr(self, "_compiled_step", None) is None:
            self._compiled_step = torch.compile(self.decode_step, fullgraph=True, dynamic=False)
        return self._compiled_step

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_id=None,
                 use_cache=True, generator=None, vocab_size=None, compile=False,
                 repetition_penalty=1.0):
        """Yield (B,) next tokens one step at a time (so callers can stream). Greedy at
        temperature 0. repetition_penalty: transformers' (see penalise), over the prompt and the
        tokens made so far. Stops early when every row has produced eos_id (an int or a
        collection of ints). vocab_size: ids from there on are never drawn (an embedding's padding
        rows that no token has, e.g. Qwen2.5's 151,665 tokens in 151,936 rows: an undertrained
        student can put mass there).
        With the cache (the fast path), the prompt runs in one forward, then each token in
        decode_step over a cache of a power-of-two length (so a compiled step is reused across
        calls); compile: torch.compile that step (the first call per cache size compiles: worth it
        for long generations)."""
        B, T = idx.shape
        eos = torch.tensor(sorted(eos_id) if isinstance(eos_id, (list, set, tuple)) else
                           [] if eos_id is None else [eos_id], device=idx.device)
        if use_cache:
            # a power of two: a few sizes, few compilations
            size = max(256, 1 << (T + max_new_tokens - 1).bit_length())
            longest = max(T + max_new_tokens, self.config.max_position_embeddings)
            self.setup_cache(B, min(size, longest))
            step = self.compiled_step() if compile else self.decode_step
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        seen = idx  # (B, t): the tokens so far, for the repetition penalty
        try:
            # (B, V): the prompt at once
            logits = self.lm_head(self.hidden(idx)[:, -1]) if use_cache else None
            for i in range(max_new_tokens):
                if not use_cache:
                    logits = self(idx)[0][:, -1]
                logits = penalise(logits[:, :vocab_size].float(), seen, repetition_penalty)
                nxt = sample_next(logits, temperature, top_k, top_p, generator)
                yield nxt
                if repetition_penalty != 1.0:
                    seen = torch.cat((seen, nxt[:, None]), dim=1)
                idx = idx if use_cache else torch.cat((idx, nxt[:, None]), dim=1)
                done |= torch.isin(nxt, eos)
                if done.all() or i == max_new_tokens - 1:
                    break
                if use_cache:
                    logits = step(nxt[:, None], torch.tensor(T + i, device=idx.device))
        finally:
            if use_cache:
                self.setup_cache(None, 0)

    # --- HF checkpoints -----------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=None) -> "Transformer":
        """Load an HF dir (model.safetensors, or shards listed in model.safetensors.index.json).
        The module is built on the meta device and the loaded tensors are assigned, not copied."""
        config_path = os.path.join(path, "config.json")
        try:
            cfg = ModelConfig.from_hf(read_json(config_path))
        except KeyError as e:
            raise ValueError(f"{config_path} lacks the key {e}: not an HF config.json of a "
                             "Qwen2/Llama model") from None
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k for k in model.state_dict()
                    if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        sd = {}
        for file in checkpoint_files(path):
            try:
                with safe_open(file, framework="pt", device=str(device)) as f:
                    for key in f.keys():
                        name = key.removeprefix("model.")
                        if cfg.tie_word_embeddings and name == "lm_head.weight":
                            continue  # some tied checkpoints store the head too; the embedding wins
                        t = f.get_tensor(key)
                        sd[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            except SafetensorError as e:  # safetensors' own message names no file
                raise ValueError(f"{file} is unreadable ({e}): the file is truncated or corrupt; "
                                 "copy or download it again") from None
        missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match config.json: missing {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")
        model.load_state_dict(sd, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(cfg).to(device)
        return model

    def save_pretrained(self, path: str, dtype=None, max_shard_bytes: int = 4 << 30):
        """Write config.json + safetensors (sharded with an index above max_shard_bytes)."""
        dtype = dtype or self.lm_head.weight.dtype
        sd = {("" if k == "lm_head.weight" else "model.") + k: v.detach().to(dtype).contiguous()
              for k, v in self.state_dict().items()
              if not (self.config.tie_word_embeddings and k == "lm_head.weight")}
        os.makedirs(path, exist_ok=True)
        shards, size = [{}], 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k], size = v, size + nbytes
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                  for i in range(len(shards))])
        for name, shard in zip(names, shards):
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(v.numel() * v.element_size() for v in sd.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            write_json(os.path.join(path, "model.safetensors.index.json"), index)
        write_json(os.path.join(path, "config.json"), self.config.to_hf(dtype))


def penalise(logits, ids, penalty):
    """CTRL's repetition penalty (Keskar et al. 2019), as transformers applies it: the logit of
    every token in ids (B, t) divided by penalty where positive, multiplied where negative, so that
    a penalty above 1 makes every token seen so far less likely."""
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, ids)
    return logits.scatter(1, ids, torch.where(seen > 0, seen / penalty, seen * penalty))


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B,) tokens: argmax at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest set whose mass reaches top_p
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    # inverse CDF: the first token whose cumulative probability passes u (torch.multinomial draws an
    # exponential per vocabulary entry, far slower on CPU for large batches)
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)


def checkpoint_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model dir {path!r} does not exist "
                                "(expected an HF dir with config.json)")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    files = [os.path.join(path, f) for f in files]
    for f in files:
        if not os.path.exists(f):
            raise FileNotFoundError(f"{path}: shard {os.path.basename(f)} listed in the index is "
                                    "missing")
    return files


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: their messages name no file
        raise ValueError(f"{path} is not valid JSON ({e}): fix the file or copy it again") from None


@contextmanager
def atomic_dir(path: str, overwrite: bool = True):
    """Write a directory all at once: yields a fresh temporary sibling of path to fill; when the
    block ends without an error, the sibling is renamed to path (an existing path is replaced only
    if overwrite); on an error it is deleted and path is left exactly as it was. A kill mid-write
    leaves a hidden '.NAME.tmp-*' sibling behind, never a half-written path."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final dir should read like any other
    try:
        yield tmp
        if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
            if not overwrite:
                raise FileExistsError(f"{path} exists and would be replaced")
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            # out of the way; deleted once the new one is in place
            os.replace(path, os.path.join(old, name))
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(os.path.join(old, name), path)  # put the old one back
                os.rmdir(old)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)  # renames onto an empty dir as well
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str, obj: dict):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
