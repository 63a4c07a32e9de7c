"""
Training data for nanoLRC: preparation (sources -> token bins) and loading (reproducible batches).

Tokenize sources into train.bin / val.bin (uint32 token ids, documents each followed by EOS) and
meta.json:

    python data.py --tokenizer=$HOME/.cache/nanolrc/SmolLM2-135M-Instruct --out=data/kjv \
        --source=kjv.txt
    python data.py --tokenizer=TEACHER_DIR --out=data/mix \
        --source=fineweb-edu.parquet:filter=int_score>=4:budget=18B \
        --source=openhermes.jsonl:field=conversations:budget=2B --num_proc=8
    python data.py --tokenizer=TEACHER_DIR --out=data/sft --source=ultrachat.jsonl:field=messages \
        --mask=True
    python data.py ... --out=data/kjv --overwrite=True  # replace prepared data (kept until the new
                                                        # is complete)

Keys are set as in every script (configurator.py; python data.py --help lists them); each --source
adds one source. A source is PATH[:field=NAME][:budget=N][:filter=EXPR]:
  .txt               documents are blocks separated by blank lines (a file without blank lines is
                     one document)
  .jsonl, .jsonl.gz  one record per line; the document is record[field] (default "text", else
                     "messages")
  .parquet           the same records, read with pyarrow
  A field holding a list of messages ({role, content} or ShareGPT's {from, value}) is a chat,
  rendered with the tokenizer's chat template. budget: stop the source after the document that
  reaches N tokens (1.5M, 2B). filter: keep records where a numeric field passes a comparison, e.g.
  int_score>=4 (FineWeb-Edu in the paper).

Training reads the bins through `Batches` (random windows or one pass in a seeded order,
reproducible per step; see below). The tokenizer (the teacher's, as tiktoken) is tokenizer.py's.

In this file, in order:
  preparation  parse_source, iter_documents (txt / jsonl / parquet, filters, chats), prepare:
               tokenize into train.bin / val.bin (+ masks) + meta.json, written whole or not at all
  loading      check_compatible (the data's tokenizer and size against the run's), Batches (random
               windows or one seeded pass per epoch, each batch a pure function of the step)
  main         the command line above
"""
import gzip
import itertools
import json
import operator
import os
import re
from multiprocessing import Pool

import numpy as np
import torch
from tqdm import tqdm

from configurator import ConfigError, configure_or_exit, run_or_exit
from model import atomic_dir, read_json
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# Data preparation: sources -> train.bin / val.bin (+ masks) + meta.json

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
       "!=": operator.ne}


def parse_source(spec):
    """'PATH[:field=F][:budget=N][:filter=EXPR]' -> dict(path, field, budget, filter)."""
    path, *opts = spec.split(":")
    src = {"path": path}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in ("field", "budget", "filter"):
            raise ValueError(f"source {spec!r}: unknown option {opt!r} "
                             "(use field=, budget=, filter=)")
        if key == "budget":
            m = re.fullmatch(r"(\d+\.?\d*|\.\d+)([KMB]?)", value.upper())
            scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}
            value = int(float(m.group(1)) * scale[m.group(2)]) if m else 0
            if value < 1:
                raise ValueError(f"source {spec!r}: budget must be a token count of at least 1, "
                                 "like 500000, 1.5M or 2B")
        src[key] = value
    return src


def _record_filter(expr):
    if not expr:
        return lambda rec: True
    m = re.fullmatch(r"\s*(\w+)\s*(>=|<=|==|!=|>|<)\s*(-?[\d.eE+-]+)\s*", expr)
    if not m:
        raise ValueError(f"filter {expr!r}: expected FIELD OP NUMBER, e.g. int_score>=4")
    key, op, value = m.group(1), OPS[m.group(2)], float(m.group(3))

    def keep(rec):
        if key not in rec:
            raise KeyError(f"filter {expr!r}: record has no field {key!r} (fields: {sorted(rec)})")
        return op(float(rec[key]), value)
    return keep


def _chat_messages(turns):
    # ShareGPT-style turns (OpenHermes-2.5) name roles differently
    roles = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
             "assistant": "assistant"}
    return [{"role": t["role"], "content": t["content"]} if "role" in t else
            {"role": roles[t["from"]], "content": t["value"]} for t in turns]


SOURCE_TYPES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


def check_source(src):
    path = src["path"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source {path!r} does not exist")
    if not path.endswith(SOURCE_TYPES):
        raise ValueError(f"source {path!r}: unknown file type "
                         "(use .txt, .jsonl, .jsonl.gz or .parquet)")


def iter_documents(src):
    """Yield a source's documents: a str, or a list of chat messages."""
    path = src["path"]
    check_source(src)
    try:
        yield from _read_documents(src)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:  # their messages name no file
        raise ValueError(f"source {path!r} cannot be read ({e}): is it "
                         f"{os.path.splitext(path)[1]}, in UTF-8, and complete?") from None


def _read_documents(src):
    path = src["path"]
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            for block in re.split(r"\n[ \t]*\n", f.read()):
                if block.strip():
                    yield block.strip("\n")
        return
    if path.endswith((".jsonl", ".jsonl.gz")):
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            records = (_json_line(line, path, n) for n, line in enumerate(f, 1) if line.strip())
            yield from _documents_of(records, src)
    else:  # .parquet
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RuntimeError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        pf = pq.ParquetFile(path)
        records = (rec for b in pf.iter_batches(batch_size=1024) for rec in b.to_pylist())
        yield from _documents_of(records, src)


def _json_line(line, path, n):
    try:
        return json.loads(line)
    except ValueError as e:
        raise ValueError(f"{path}:{n} is not a JSON record ({e}): fix or drop that line") from None


def _documents_of(records, src):
    keep, field = _record_filter(src.get("filter")), src.get("field")
    for rec in records:
        if not keep(rec):
            continue
        name = field or next((k for k in ("text", "messages", "conversations") if k in rec), None)
        if name not in rec:
            raise KeyError(f"source {src['path']!r}: record has no field {name or 'text'!r} "
                           f"(fields: {sorted(rec)}); pick one with :field=NAME")
        doc = rec[name]
        yield _chat_messages(doc) if isinstance(doc, list) else doc


# each Pool worker's tokenizer, set once by _init_worker instead of pickled with every task
_worker_tok = None


def _init_worker(tok):
    global _worker_tok
    _worker_tok = tok


def _tokenize_docs(docs, tok=None):
    """Token ids of each document followed by EOS, and the loss mask: all of a text, the assistant
    turns of a chat."""
    tok = tok or _worker_tok
    out = []
    for doc in docs:
        if isinstance(doc, str):
            ids = tok.encode(doc) + [tok.eos_id]
            mask = [1] * len(ids)
        else:  # the chat already ends with its end-of-turn token; the joining EOS is not a target
            ids, mask = tok.encode_chat(doc)
            ids, mask = ids + [tok.eos_id], mask + [0]
        out.append((np.array(ids, np.uint32), np.array(mask, np.uint8)))
    return out


PREPARED_FILES = ("meta.json", "train.bin", "val.bin", "train_mask.bin", "val_mask.bin")


def check_out_dir(out_dir, overwrite=False):
    """Refuse, before any work, an out_dir that prepare could not or may not replace: one holding
    other files than prepared data (never replaced), or prepared data without overwrite."""
    if not os.path.exists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        return
    if not os.path.isdir(out_dir):
        raise FileExistsError(f"--out={out_dir} is a file: choose a dir for the prepared data")
    others = sorted(set(os.listdir(out_dir)) - set(PREPARED_FILES))
    if others:
        raise FileExistsError(f"--out={out_dir} holds files data.py did not write "
                              f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): "
                              "choose another --out")
    if not overwrite:
        raise FileExistsError(f"--out={out_dir} holds prepared data: pass --overwrite=True to "
                              "replace it (it is kept until the new data is complete), or choose "
                              "another --out")


def prepare(tokenizer, sources, out_dir, val_fraction=0.005, seed=1337, mask=False, num_proc=1,
            docs_per_task=64, overwrite=False):
    """Tokenize sources into out_dir; each document goes to val with probability val_fraction.
    Returns meta. The data is written into a temporary sibling dir and renamed to out_dir once
    complete (model.atomic_dir): a failed run leaves no out_dir, or the previous one exactly as it
    was. An out_dir holding prepared data is replaced only with overwrite=True (check_out_dir)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if num_proc < 1:
        raise ValueError(f"--num_proc must be at least 1, got {num_proc}")
    for src in sources:  # a typo in the last source is found now, not after hours on the first
        check_source(src)
    check_out_dir(out_dir, overwrite)
    with atomic_dir(out_dir) as tmp:
        return _prepare_into(tmp, tokenizer, sources, val_fraction, seed, mask, num_proc,
                             docs_per_task)


def _prepare_into(out_dir, tokenizer, sources, val_fraction, seed, mask, num_proc, docs_per_task):
    meta_path = os.path.join(out_dir, "meta.json")
    splits = ("train", "val")
    bins = {s: open(os.path.join(out_dir, f"{s}.bin"), "wb") for s in splits}
    masks = ({s: open(os.path.join(out_dir, f"{s}_mask.bin"), "wb") for s in splits}
             if mask else None)
    tokens, docs = dict.fromkeys(splits, 0), dict.fromkeys(splits, 0)
    # drawn once per document in source order: the split is reproducible
    rng = np.random.default_rng(seed)
    pool = Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,)) if num_proc > 1 else None
    source_meta, bars = [], []
    try:
        for src in sources:
            budget, n_tok, n_doc = src.get("budget"), 0, 0
            tasks = _batched(iter_documents(src), docs_per_task)
            bar = tqdm(total=budget, unit="tok", unit_scale=True,
                       desc=os.path.basename(src["path"]))
            bars.append(bar)
            # hand the pool a bounded group of tasks at a time, so a budget stops reading a huge
            # source early; the group is finished (map) before its documents are written, so no
            # task is in flight when a budget stops early: Pool.terminate can hang with tasks still
            # being sent
            while (not (budget and n_tok >= budget)
                   and (group := list(itertools.islice(tasks, 4 * num_proc)))):
                results = (pool.map(_tokenize_docs, group) if pool
                           else (_tokenize_docs(g, tokenizer) for g in group))
                for ids, m in itertools.chain.from_iterable(results):
                    split = "val" if rng.random() < val_fraction else "train"
                    ids.tofile(bins[split])
                    if mask:
                        m.tofile(masks[split])
                    tokens[split] += len(ids)
                    docs[split] += 1
                    n_tok, n_doc = n_tok + len(ids), n_doc + 1
                    bar.update(len(ids))
                    if budget and n_tok >= budget:
                        break
            bar.close()
            source_meta.append({**src, "documents": n_doc, "tokens": n_tok})
    finally:
        for bar in bars:  # ends the bar's line, so that an error message starts a line of its own
            bar.close()
        if pool:
            pool.terminate()
        for f in [*bins.values(), *(masks or {}).values()]:
            f.close()
    if tokens["train"] == 0 or (val_fraction > 0 and tokens["val"] == 0):
        empty = "train" if tokens["train"] == 0 else "val"
        raise ValueError(f"no document went to {empty} ({sum(docs.values())} documents in all): "
                         "add data" + (" or raise --val_fraction" if empty == "val"
                                       else " or lower --val_fraction"))
    meta = {"tokenizer_fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "dtype": "uint32", "mask": mask, "documents": docs,
            "tokens": tokens, "val_fraction": val_fraction, "seed": seed, "sources": source_meta}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def _batched(it, n):
    while chunk := list(itertools.islice(it, n)):
        yield chunk


# -----------------------------------------------------------------------------
# Loading: reproducible windows (random, or one pass per epoch) from memory-mapped bins

def check_compatible(data_dir, tokenizer, block_size=1):
    """meta.json of data_dir, after refusing data made by another tokenizer or too short for one
    block."""
    if not data_dir:
        raise FileNotFoundError("no --data_dir set: prepare one with python data.py "
                                "--tokenizer=TEACHER_DIR --out=DIR --source=..., then pass "
                                "--data_dir=DIR")
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{data_dir} holds no prepared data (no meta.json): "
                                f"run python data.py --tokenizer=TEACHER_DIR --out={data_dir} "
                                "--source=...")
    meta = read_json(meta_path)
    if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise ValueError(f"{data_dir} was tokenized with a different tokenizer (fingerprint "
                         f"{str(meta.get('tokenizer_fingerprint'))[:12]} vs the teacher's "
                         f"{tokenizer.fingerprint[:12]}): "
                         "prepare it again with --tokenizer pointing at this teacher, into a new "
                         "--out dir")
    _check_lengths(meta, data_dir, block_size)
    return meta


def _check_lengths(meta, data_dir, block_size):
    for split, n in meta["tokens"].items():
        sizes = [(f"{split}.bin", 4 * n), *([(f"{split}_mask.bin", n)] if meta.get("mask") else [])]
        for name, size in sizes:
            path = os.path.join(data_dir, name)
            found = os.path.getsize(path) if os.path.isfile(path) else None
            if found != size:
                what = "is missing" if found is None else f"has {found:,} bytes"
                raise ValueError(f"{path} {what} where meta.json says {size:,}: the dir is "
                                 "incomplete or was changed; prepare it again")
        if n < block_size + 1:  # a window is block_size inputs plus the next token as last target
            raise ValueError(f"{data_dir}: the {split} split has {n} tokens, fewer than one block "
                             f"of {block_size}+1; add data, raise --val_fraction, or lower "
                             "block_size")


class Batches:
    """
    Batches of [batch_size, block_size] windows: x = tokens, y = the next tokens, mask (if the data
    has one) = 1 where y is a loss target. Every batch is a pure function of (step, micro_step,
    rank), so a resumed run sees exactly the batches the uninterrupted run saw. Micro-batch
    micro_step of rank r is micro-batch micro_step * world_size + r of the step's global batch:
    W ranks x A micro-batches see the same step as 1 rank x W*A micro-batches (DDP equivalence).
    Train windows come from one of two samplers:
      sampling="random": windows start anywhere, drawn from an rng seeded by (seed, step,
        micro_step * world_size + rank). Drawn with replacement, so a corpus-sized budget leaves
        ~1/e of the tokens unseen.
      sampling="epoch": one pass over the packed data, as in the LRC paper. train.bin is cut into
        n = windows_per_epoch non-overlapping windows (window i: x = tokens [i*T, i*T+T), y one
        token later); the g-th sequence of the run is window perm_e[g % n] of epoch e = g // n,
        perm_e a permutation seeded by (seed, e). Row b of a micro-batch (micro_step < grad_accum)
        is sequence g = (step * world_size * grad_accum + micro_step * world_size + rank)
        * batch_size + b, so each epoch visits every window exactly once, in an order that does
        not depend on the world size.
    Val batch k is the k-th run of consecutive non-overlapping windows from the start of val.bin,
    the same on every rank; under DDP let rank r evaluate k = r, r + world_size, ... (eval_steps).
    """

    def __init__(self, data_dir, batch_size, block_size, seed=1337, rank=0, world_size=1,
                 device="cpu", sampling="random", grad_accum=1):
        if sampling not in ("random", "epoch"):
            raise ValueError(f"sampling must be 'random' or 'epoch', not {sampling!r}")
        self.meta = read_json(os.path.join(data_dir, "meta.json"))
        _check_lengths(self.meta, data_dir, block_size)
        self.data_dir, self.B, self.T = data_dir, batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.sampling = sampling
        self.grad_accum = grad_accum  # micro-batches per step per rank
        self._epoch, self._order = None, None  # the permutation of the epoch last read ("epoch")

    @property
    def windows_per_epoch(self):
        """Non-overlapping train windows in train.bin: one epoch is this many sequences
        (sampling="epoch")."""
        # the last window needs one more token for y
        return (self.meta["tokens"]["train"] - 1) // self.T

    def _memmap(self, name, dtype):
        # a fresh memmap per batch: a long-lived one keeps every page it touched resident
        # (nanoGPT's leak)
        return np.memmap(os.path.join(self.data_dir, name), dtype=dtype, mode="r")

    def get_batch(self, split, step, micro_step=0):
        data, T = self._memmap(f"{split}.bin", np.uint32), self.T
        if split == "train" and self.sampling == "random":
            rng = np.random.default_rng([self.seed, step, micro_step * self.world_size + self.rank])
            starts = rng.integers(0, len(data) - T, size=self.B)
        elif split == "train":
            starts = self._epoch_windows(step, micro_step) * T
        else:
            n_windows = (len(data) - 1) // T
            starts = (step * self.B + np.arange(self.B)) % n_windows * T
        x = torch.from_numpy(np.stack([data[i:i + T] for i in starts]).astype(np.int64))  # (B, T)
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + T] for i in starts])
                             .astype(np.int64))  # (B, T)
        batch = [x, y]
        if self.meta["mask"]:
            m = self._memmap(f"{split}_mask.bin", np.uint8)
            targets = np.stack([m[i + 1:i + 1 + T] for i in starts]).astype(bool)  # (B, T)
            batch.append(torch.from_numpy(targets))
        if self.device.type == "cuda":
            batch = [t.pin_memory().to(self.device, non_blocking=True) for t in batch]
        return tuple(batch)

    def _epoch_windows(self, step, micro_step):
        """Indices of this micro-batch's train windows under sampling="epoch" (see the class
        docstring)."""
        per_step = self.world_size * self.grad_accum * self.B  # sequences in one global batch
        first = step * per_step + (micro_step * self.world_size + self.rank) * self.B
        g = first + np.arange(self.B)  # (B,)
        epochs, i = np.divmod(g, self.windows_per_epoch)
        windows = np.empty(self.B, np.int64)
        for e in np.unique(epochs):  # a batch may straddle the end of an epoch
            windows[epochs == e] = self._permutation(int(e))[i[epochs == e]]
        return windows

    def _permutation(self, epoch):
        """The order in which epoch visits the windows. Kept until the next epoch: drawing it is
        O(n), and at 20B tokens / 2048 it is ~10M windows (80 MB of int64), too slow to draw for
        every batch."""
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(self.windows_per_epoch)
            self._epoch = epoch
        return self._order

    def eval_steps(self, n):
        """Which of the n fixed val batches this rank evaluates."""
        return range(self.rank, n, self.world_size)


# -----------------------------------------------------------------------------

DEFAULTS = dict(
    tokenizer="",  # HF model dir with tokenizer.json (the teacher's)
    out="",  # output dir for train.bin, val.bin, meta.json
    source=[],  # PATH[:field=F][:budget=N][:filter=EXPR]; each --source=... adds one
    val_fraction=0.005,  # share of documents held out for val
    seed=1337,  # the train/val split's rng
    mask=False,  # also write *_mask.bin: loss only on assistant turns (SFT)
    num_proc=max(1, (os.cpu_count() or 1) - 1),  # tokenizer processes
    overwrite=False,  # replace an --out dir of prepared data (only once the new data is complete)
)


def main(argv=None):
    cfg = configure_or_exit(DEFAULTS, argv)
    for key, what in (("tokenizer", "TEACHER_DIR"), ("out", "DIR"), ("source", "PATH")):
        if not cfg[key]:
            raise ConfigError(f"no --{key} set: pass --{key}={what} "
                              "(python data.py --help lists the keys)")
    sources = [parse_source(s) for s in cfg["source"]]
    check_out_dir(cfg["out"], cfg["overwrite"])  # before the tokenizer loads: refuse at once
    meta = prepare(load_tokenizer(cfg["tokenizer"]), sources, cfg["out"],
                   val_fraction=cfg["val_fraction"], seed=cfg["seed"], mask=cfg["mask"],
                   num_proc=cfg["num_proc"], overwrite=cfg["overwrite"])
    print(f"{cfg['out']}: train {meta['tokens']['train']:,} tokens in "
          f"{meta['documents']['train']:,} documents, val {meta['tokens']['val']:,} tokens in "
          f"{meta['documents']['val']:,} documents")


if __name__ == "__main__":
    run_or_exit(main)
