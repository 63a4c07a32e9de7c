"""
Test assets written on the spot, no download: a byte-level BPE tokenizer as HF files, and random
teachers of any shape beside it. The tests import them as `from fixtures import ...` (pytest puts
tests/ on sys.path, as for conftest.py).
"""
import json
import os

import torch

from model import ModelConfig, Transformer
from tokenizer import bytes_to_unicode


def write_tokenizer(path, merges=(), specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                    pre_tokenizer=None, chat_template=None):
    """A byte-level BPE tokenizer as HF files (tokenizer.json, tokenizer_config.json): the 256 byte
    tokens, then one token per merge, then the specials; EOS <|im_end|> (258 without merges)."""
    os.makedirs(path, exist_ok=True)
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    added = [{"id": len(vocab) + i, "content": t, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}
             for i, t in enumerate(specials)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                 "normalizer": None, "pre_tokenizer": pre_tokenizer or byte_level,
                 "post_processor": None, "decoder": byte_level,
                 "model": {"type": "BPE", "dropout": None, "unk_token": None,
                           "continuing_subword_prefix": None, "end_of_word_suffix": None,
                           "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                           "vocab": vocab, "merges": list(merges)}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
              "eos_token": "<|im_end|>"}
    if chat_template:
        config["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return path


def write_random_teacher(path, cfg: ModelConfig, device="cpu", dtype=torch.float32, seed=0):
    """An HF dir with random weights of any shape (a real model's config.json, say) and the byte
    tokenizer."""
    write_tokenizer(path)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        Transformer(cfg).to(dtype).init_weights(0.05).save_pretrained(path, dtype=dtype)
    return path


def tiny_teacher_config(hidden=256, layers=4, heads=4, kv_heads=2, ffn=768):
    """A small Qwen2 (q/k/v bias, tied) for the byte tokenizer: enough to exercise every path of the
    training loop."""
    return ModelConfig(model_type="qwen2", vocab_size=320, hidden_size=hidden,
                       intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=hidden // heads, attention_bias=True,
                       tie_word_embeddings=True, eos_token_id=258)
