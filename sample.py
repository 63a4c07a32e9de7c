"""
Sample from a model: an HF dir (a teacher, an exported student) or a training checkpoint.

    python sample.py  # the newest out/*/student (right after python demo.py)
    python sample.py --model=out/demo --prompt="The capital of France is" --temperature=0  # greedy
    python sample.py --prompt="Once upon a time" --top_p=0.95 --repetition_penalty=1.0 --seed=7
    python sample.py --model=out/lrc/ckpt.pt --prompt=FILE:prompt.txt --num_samples=3
    echo "In the beginning" | python sample.py --prompt=-
    python sample.py --chat=True --prompt="Name three colours."  # the prompt as a chat's user turn
    python sample.py --model=~/.cache/nanolrc/SmolLM2-135M-Instruct  # no prompt on a terminal: chat
    python sample.py --dtype=bfloat16 --compile=True --max_new_tokens=1024  # the fastest decode
                                                                           # (bench.py model)

--model is an HF dir (config.json, safetensors, tokenizer.json), a training out_dir (its student/
once exported, else its ckpt.pt, with the teacher's tokenizer) or a ckpt.pt file. Text streams as it
is made; generation stops at EOS (the tokenizer's and those in config.json /
generation_config.json); the speed goes to stderr. Without a prompt, stdin a terminal: an
interactive chat that keeps the history.
"""
import codecs
import glob
import os
import sys
import time

import torch

from configurator import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, PROBABILITY, check_ranges,
                          configure_or_exit, run_or_exit)
from tokenizer import load_tokenizer
from model import Transformer, read_json
from common import load_student, resolve_system, tokenizer_dir

DEFAULTS = dict(
    model="",  # HF dir, training out_dir or ckpt.pt; "" = the newest out/*/student
    prompt="",  # the text, FILE:path or - (stdin); "" = interactive chat on a terminal, else start
                # a document
    chat=False,  # render the prompt as a user message with the model's chat template
    num_samples=1,
    max_new_tokens=256,
    # Sampling as users of small chat models expect it (their generation_config.json files ship
    # values of this size, e.g. Qwen2.5-Instruct's temperature 0.7, top_p 0.8, repetition_penalty
    # 1.05): below-1 temperature and nucleus sampling keep a 0.1-2B model out of its unreliable
    # tail of tokens, and a mild penalty breaks the loops small models fall into.
    temperature=0.7,  # 0 = greedy: the model's own most likely text, comparable across runs (the
    # three settings below are for sampling only)
    top_k=0,  # sample among the k most likely tokens; 0 = off
    top_p=0.9,  # nucleus: among the fewest most likely tokens holding this much mass; 1 = off
    repetition_penalty=1.1,  # transformers' repetition_penalty over the prompt and reply; 1 = off
    seed=1337,  # printed to stderr with the settings, so a sample can be drawn again
    compile=False,  # torch.compile the one-token decode step (model.Transformer.decode_step):
    # compiles once per cache size (tens of seconds on a CPU), then faster per token; worth it for
    # long or many generations
    device="auto",  # auto: cuda if available, else cpu
    dtype="auto",  # auto: bfloat16 on cuda, float32 on cpu
)


def resolve_model(path, out_root="out"):
    """The HF dir or checkpoint that `path` names; with no path, the newest out_root/*/student."""
    if not path:
        found = glob.glob(os.path.join(out_root, "*", "student", "config.json"))
        if not found:
            raise FileNotFoundError(f"no trained student under {out_root}/*/student: run python "
                                    "demo.py first, or pass --model=HF_DIR (or a training "
                                    "out_dir / ckpt.pt)")
        # config.json is rewritten by every export
        return os.path.dirname(max(found, key=os.path.getmtime))
    path = os.path.expanduser(path)
    if os.path.isfile(os.path.join(path, "student", "config.json")):
        return os.path.join(path, "student")  # a finished training run
    if (os.path.isfile(os.path.join(path, "config.json"))
            or os.path.isfile(os.path.join(path, "ckpt.pt"))
            or (os.path.isfile(path) and path.endswith(".pt"))):
        return path
    what = "does not exist" if not os.path.exists(path) else \
        "is neither an HF dir (no config.json) nor a training checkpoint (no ckpt.pt, no student/)"
    raise FileNotFoundError(f"--model={path} {what}: pass an HF model dir, a training out_dir or a "
                            "ckpt.pt")


def load(path, device, dtype):
    """(model, tokenizer, eos ids) from an HF dir or a training checkpoint (with its teacher's
    tokenizer)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        model, tok_dir = Transformer.from_pretrained(path, device, getattr(torch, dtype)), path
    else:  # the student is materialised from teacher + projections, as train.py evaluates it
        model, cfg = load_student(path, device)
        model, tok_dir = model.to(getattr(torch, dtype)), tokenizer_dir(cfg)
    tok = load_tokenizer(tok_dir)
    gen = os.path.join(tok_dir, "generation_config.json")
    # the chat models' end of turn (e.g. <|im_end|>) plus any other id the configs call EOS
    eos = {tok.eos_id}
    gen_eos = read_json(gen).get("eos_token_id") if os.path.isfile(gen) else None
    for ids in (model.config.eos_token_id, gen_eos):
        eos |= set(ids) if isinstance(ids, list) else {ids} - {None}
    return model.eval(), tok, eos


def read_prompt(prompt):
    """--prompt as text: FILE:path reads a file (as nanoGPT does), - reads stdin."""
    if prompt.startswith("FILE:"):
        if not os.path.isfile(prompt[5:]):
            raise FileNotFoundError(f"--prompt=FILE:{prompt[5:]}: no such file "
                                    "(FILE:path reads the prompt from it)")
        with open(prompt[5:], encoding="utf-8") as f:
            return f.read()
    return sys.stdin.read() if prompt == "-" else prompt


def prompt_ids(tok, text, chat):
    """Token ids of a prompt; chat: as a user turn followed by the assistant header, exactly as HF
    renders it. A plain prompt gets no BOS: training packs documents joined by EOS, so an empty one
    starts after EOS."""
    if chat:
        return tok.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)[0]
    return tok.encode(text) if text else [tok.eos_id]


def stream(model, tok, ids, eos, cfg, generator=None, out=None):
    """Generate after `ids`, writing text to `out` as it becomes final; return the new ids (EOS left
    out)."""
    # a byte-level token can end inside a multi-byte character: the incremental decoder holds such
    # bytes back until the character is complete, so only final text is printed (and nothing printed
    # changes)
    out = sys.stdout if out is None else out
    utf8, new = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    t0 = time.perf_counter()
    greedy = cfg["temperature"] == 0
    for nxt in model.generate(idx, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"] or None,
                              cfg["top_p"], eos_id=eos, generator=generator,
                              vocab_size=tok.vocab_size, compile=cfg["compile"],
                              repetition_penalty=1.0 if greedy else cfg["repetition_penalty"]):
        if nxt.item() in eos:
            break
        new.append(nxt.item())
        out.write(utf8.decode(tok.enc.decode_single_token_bytes(new[-1])))
        out.flush()
    out.write(utf8.decode(b"", final=True) + "\n")
    out.flush()
    dt = time.perf_counter() - t0
    print(f"[{len(new)} tokens in {dt:.2f} s, {len(new) / dt:.1f} tokens/s]", file=sys.stderr)
    return new


def chat_loop(model, tok, eos, cfg, generator):
    """Interactive chat on a terminal; the whole history is encoded again each turn. Ctrl-D
    quits."""
    if tok.chat_format is None:
        raise ValueError("this model's tokenizer has no chat template: give a --prompt to complete "
                         "instead")
    history = []
    while True:
        try:
            history.append({"role": "user", "content": input("> ")})
        except EOFError:  # Ctrl-D
            print()
            return
        ids = tok.encode_chat(history, add_generation_prompt=True)[0]
        reply = stream(model, tok, ids, eos, cfg, generator)
        history.append({"role": "assistant", "content": tok.decode(reply)})


def sample(cfg, out_root="out"):
    check_ranges(cfg, {"num_samples": AT_LEAST_1, "max_new_tokens": AT_LEAST_1,
                       "temperature": NON_NEGATIVE, "top_k": NON_NEGATIVE, "top_p": PROBABILITY,
                       "repetition_penalty": POSITIVE})
    device, dtype = resolve_system(cfg)
    model, tok, eos = load(resolve_model(cfg["model"], out_root), device, dtype)
    print("[greedy]" if cfg["temperature"] == 0 else
          "[sampling: " + ", ".join(f"{k} {cfg[k]}" for k in ("temperature", "top_k", "top_p",
                                                               "repetition_penalty", "seed")) + "]",
          file=sys.stderr)
    generator = torch.Generator(device).manual_seed(cfg["seed"])
    if not cfg["prompt"] and sys.stdin is not None and sys.stdin.isatty():
        return chat_loop(model, tok, eos, cfg, generator)
    text = read_prompt(cfg["prompt"])
    ids = prompt_ids(tok, text, cfg["chat"])
    for k in range(cfg["num_samples"]):
        if k:
            print("---------------")
        if not cfg["chat"]:  # a completion reads on from its prompt
            sys.stdout.write(text)
        stream(model, tok, ids, eos, cfg, generator)


def main(argv=None, out_root="out"):
    # a bad path or setting: one line and exit 1 (2 for a bad key or value); Ctrl-C ends a chat
    # quietly (130)
    run_or_exit(sample, configure_or_exit(DEFAULTS, argv), out_root)


if __name__ == "__main__":
    main()
