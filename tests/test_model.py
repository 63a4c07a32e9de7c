"""model.py against transformers: logits, generation, checkpoints in and out, bad input."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

CONFIGS = {
    # Qwen2: q/k/v bias, head_dim != hidden/heads, tied and untied
    "qwen2_tied": dict(model_type="qwen2", head_dim=24, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2_untied": dict(model_type="qwen2", head_dim=24, tie_word_embeddings=False),
    # Qwen3: q_norm/k_norm over head_dim, no q/k/v bias, heads * head_dim (96) != hidden (64), GQA, tied and untied
    "qwen3_tied": dict(model_type="qwen3", head_dim=24, tie_word_embeddings=True, rope_theta=1e6),
    "qwen3_untied": dict(model_type="qwen3", head_dim=24, tie_word_embeddings=False),
    "qwen3_bias": dict(model_type="qwen3", head_dim=24, attention_bias=True),  # bias on q/k/v/o, as Llama's
    # Llama: GQA and llama3 rope scaling, tested past original_max_position_embeddings
    "llama3_scaled": dict(model_type="llama", tie_word_embeddings=False, rope_theta=5e5, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)),
    "llama_bias_tied": dict(model_type="llama", attention_bias=True, tie_word_embeddings=True),
}


def make_hf(name, tmp_path):
    """A random transformers model of the named tiny config, saved to tmp_path/name."""
    torch.manual_seed(0)
    kw = {**TINY, **CONFIGS[name]}
    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}.get(kw["model_type"],
                                                                                   transformers.LlamaConfig)
    kw.pop("model_type")
    hf = transformers.AutoModelForCausalLM.from_config(cls(**kw), dtype=torch.float32).eval()
    with torch.no_grad():  # biases and norms are zero/one at init; randomise them so the test sees them
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / name
    hf.save_pretrained(path)
    return hf, str(path)


def assert_logits_close(ours, ref):
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-4 * max(scale, 1.0), (ours - ref).abs().max()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name, tmp_path):
    hf, path = make_hf(name, tmp_path)
    model = Transformer.from_pretrained(path).eval()
    T = 80  # > original_max_position_embeddings (32) of the llama3 config: scaling is exercised
    idx = torch.randint(0, TINY["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        ref = hf(idx).logits
    assert_logits_close(ours, ref)
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize("name", ["qwen2_tied", "llama3_scaled", "qwen3_tied", "qwen3_untied"])
def test_greedy_generation_cache_and_transformers(name, tmp_path):
    hf, path = make_hf(name, tmp_path)
    model = Transformer.from_pretrained(path).eval()
    idx = torch.randint(0, TINY["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(2))
    n = 40
    cached = torch.stack(list(model.generate(idx, n, use_cache=True)), 1)
    uncached = torch.stack(list(model.generate(idx, n, use_cache=False)), 1)
    ref = hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)[:, 7:]
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ref)


def test_chunked_prefill_matches_full_forward(tmp_path):
    _, path = make_hf("qwen2_untied", tmp_path)
    model = Transformer.from_pretrained(path).eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_cache(2, 32)
        a, _ = model(idx[:, :12], start_pos=0)
        b, _ = model(idx[:, 12:], start_pos=12)
        model.setup_cache(None, 0)
    assert_logits_close(torch.cat((a, b), 1), full)


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen3_untied"])
def test_rows_of_different_lengths_share_a_batch(name, tmp_path):
    """eval.py's layout: contexts of different lengths right-padded in cache slots 0..L_max-1, then each row's
    continuation in slots L_max.. at positions from its own context's length (pos), the slots between masked.
    Every row's logits must be those transformers gives for its context + continuation alone."""
    hf, path = make_hf(name, tmp_path)
    model = Transformer.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(3)
    ctx_lens, cont_lens = [9, 4, 1], [5, 2, 5]
    ctxs = [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in ctx_lens]
    conts = [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in cont_lens]
    L, m = max(ctx_lens), max(cont_lens)
    lens = torch.tensor(ctx_lens)
    with torch.no_grad():
        model.setup_cache(3, L + m)
        model(torch.stack([F.pad(c, (0, L - len(c))) for c in ctxs]))  # (3, L): the contexts, right-padded
        t, slot = torch.arange(m), torch.arange(L + m)
        mask = (slot < lens[:, None, None]) | ((slot >= L) & (slot <= L + t[:, None]))  # (3, m, L+m)
        ours, _ = model(torch.stack([F.pad(c, (0, m - len(c))) for c in conts]), start_pos=L,
                        pos=lens[:, None] + t, mask=mask[:, None])  # (3, m, V)
        model.setup_cache(None, 0)
        for r in range(3):
            ref = hf(torch.cat((ctxs[r], conts[r]))[None]).logits[0, ctx_lens[r]:]  # (cont_len, V)
            assert_logits_close(ours[r, :cont_lens[r]], ref)


def test_compiled_decode_step_matches_eager_and_transformers(tmp_path):
    """The fast path: a compiled one-token step over the static cache gives the greedy tokens of the eager step
    and of transformers, for two rows at once, and is reused by a second call of another prompt length."""
    hf, path = make_hf("qwen2_tied", tmp_path)
    model = Transformer.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(4)
    for T in (7, 11):
        idx = torch.randint(0, TINY["vocab_size"], (2, T), generator=g)
        fast = torch.stack(list(model.generate(idx, 24, compile=True)), 1)
        eager = torch.stack(list(model.generate(idx, 24)), 1)
        ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=24, min_new_tokens=24,
                          do_sample=False, pad_token_id=0)[:, T:]  # no mask: transformers would hide token 0
        assert torch.equal(fast, eager) and torch.equal(fast, ref)


def test_compiled_cpu_decode_of_one_row_is_a_multiply_and_sum(tmp_path, monkeypatch):
    """Compiled on CPU, a batch-1 step's projections and head are multiply-and-sums (model.Linear), with biases: no
    F.linear runs in the step, its logits are transformers', and greedy decoding gives transformers' tokens."""
    hf, path = make_hf("llama_bias_tied", tmp_path)  # q/k/v/o biases, tied head
    model = Transformer.from_pretrained(path).eval()
    idx = torch.randint(0, TINY["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(7))
    calls, linear = [], F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    with torch.no_grad():
        model.setup_cache(1, 16)
        nxt = model(idx)[0][:, -1:].argmax(-1)  # the prompt, eager: (1, 1)
        calls.clear()
        logits = model.compiled_step()(nxt, torch.tensor(9))  # (1, V)
        model.setup_cache(None, 0)
        assert not calls
        assert_logits_close(logits, hf(torch.cat((idx, nxt), 1)).logits[:, -1])
        fast = torch.stack(list(model.generate(idx, 24, compile=True)), 1)
        ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=24, min_new_tokens=24,
                          do_sample=False, pad_token_id=0)[:, 9:]
    assert torch.equal(fast, ref)


def test_compiled_cpu_attention_is_two_matmuls_with_transformers_logits(tmp_path, monkeypatch):
    """Compiled on CPU, causal attention over up to COMPILED_CPU_MATH_SLOTS slots is two matmuls around a fused softmax
    (faster than SDPA's CPU kernel there): SDPA is not called, the logits are transformers', and the gradients those
    of the eager model, which runs SDPA."""
    import model as model_py
    hf, path = make_hf("llama3_scaled", tmp_path)  # GQA
    model = Transformer.from_pretrained(path)
    idx = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(5))
    w = torch.randn(2, 40, TINY["vocab_size"], generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf(idx).logits
    (model(idx)[0] * w).sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(model_py.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    logits = torch.compile(model)(idx)[0]
    (logits * w).sum().backward()
    assert not calls
    assert_logits_close(logits.detach(), ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-4, atol=1e-4 * eager[n].abs().max().item(), msg=n)


@pytest.mark.parametrize("name", ["qwen2_untied", "llama_bias_tied", "qwen3_tied", "qwen3_untied"])
def test_save_pretrained_loads_in_transformers(name, tmp_path):
    hf, path = make_hf(name, tmp_path)
    model = Transformer.from_pretrained(path)
    out = tmp_path / "ours"
    model.save_pretrained(out, max_shard_bytes=20_000)  # small limit: forces a sharded checkpoint
    assert (out / "model.safetensors.index.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dim"] == model.config.head_dim
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours_again = Transformer.from_pretrained(str(out))
    idx = torch.randint(0, TINY["vocab_size"], (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(idx).logits, hf(idx).logits)
        assert torch.equal(ours_again(idx)[0], model(idx)[0])


def test_loads_transformers_sharded_checkpoint(tmp_path):
    hf, path = make_hf("llama3_scaled", tmp_path)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").exists()
    model = Transformer.from_pretrained(str(sharded))
    idx = torch.randint(0, TINY["vocab_size"], (1, 16))
    with torch.no_grad():
        assert_logits_close(model(idx)[0], hf(idx).logits)


def test_rope_parameters_form_of_transformers5():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2)
    a = ModelConfig.from_hf({**base, "rope_theta": 123.0})
    b = ModelConfig.from_hf({**base, "rope_parameters": {"rope_theta": 123.0, "rope_type": "default"}})
    assert a == b and a.rope_theta == 123.0 and a.head_dim == 4


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Transformer.from_pretrained(str(tmp_path / "nope"))
    _, path = make_hf("qwen2_tied", tmp_path)
    sharded = tmp_path / "sharded"
    Transformer.from_pretrained(path).save_pretrained(sharded, max_shard_bytes=20_000)
    shard = sorted(p for p in os.listdir(sharded) if p.endswith(".safetensors"))[1]
    os.remove(sharded / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        Transformer.from_pretrained(str(sharded))
    cfg_path = tmp_path / "qwen2_tied" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        Transformer.from_pretrained(path)
    cfg_path.write_text(json.dumps({**cfg, "use_sliding_window": True}))
    with pytest.raises(ValueError, match="sliding"):
        Transformer.from_pretrained(path)
    cfg_path.write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ValueError, match="yarn"):
        Transformer.from_pretrained(path)


def test_unsupported_qwen3_variants_are_named(tmp_path):
    hf, path = make_hf("qwen3_tied", tmp_path)
    assert hf.config.rope_parameters["rope_theta"] == 1e6  # the config kwarg reached transformers' RoPE
    cfg_path = tmp_path / "qwen3_tied" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "model_type": "qwen3_moe", "num_experts": 8}))
    with pytest.raises(ValueError, match="qwen3_moe.*mixture of experts"):
        Transformer.from_pretrained(path)
    cfg_path.write_text(json.dumps({**cfg, "use_sliding_window": True, "sliding_window": 16}))
    with pytest.raises(ValueError, match="sliding"):
        Transformer.from_pretrained(path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = make_hf("qwen2_untied", tmp_path)
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight"):
        Transformer.from_pretrained(path)


# A page of ordinary English prose, written for this test (so no licence question arises). The converted
# teacher (Q4_1-quantised SmolLM2-135M) scores perplexity 18.5 on it; a wrong q/k permutation gives ~450.
PROSE = ("Water boils at one hundred degrees Celsius at sea level, but the temperature is lower at high altitude, "
         "because the air pressure is lower. This is why cooking instructions sometimes change for people who live "
         "in the mountains. Pasta, for example, may need a few more minutes to become soft. Bakers also adjust "
         "their recipes, using a little less sugar or a little more flour so that cakes do not rise too quickly "
         "and then collapse. Many people never notice these small differences until they travel, and then they "
         "are surprised that a familiar dish does not turn out the way it does at home. Scientists have studied "
         "the effect for a long time, and it is now well understood. The same principle explains why pressure "
         "cookers work: by raising the pressure inside the pot, they raise the boiling point of water, so food "
         "cooks faster.")


@pytest.mark.asset
def test_real_teacher_matches_transformers(smollm2_dir):
    from tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    idx = torch.tensor([tok.encode(PROSE)])
    ours = Transformer.from_pretrained(smollm2_dir).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits, loss = ours(idx[:, :-1], idx[:, 1:])
        assert_logits_close(logits, hf(idx[:, :-1]).logits)
    assert loss.exp().item() < 20, loss.exp().item()  # perplexity of the converted teacher on the page above
    prompt = torch.tensor([tok.encode("The capital of France is")])
    out = tok.decode(torch.stack(list(ours.generate(prompt, 4)), 1)[0].tolist())
    assert out.startswith(" Paris"), out
