"""
Training data for nanoLRC: preparation (sources -> token bins) and loading (reproducible batches).

Tokenize sources into train.bin / val.bin (uint32 token ids, documents each followed by EOS) and
meta.json, the data card:

    python data.py --tokenizer=$HOME/.cache/nanolrc/SmolLM2-135M-Instruct --out=data/kjv \
        --source=kjv.txt
    python data.py --tokenizer=TEACHER_DIR --out=data/mix --num_proc=16 --resume=True \
        '--source=fineweb-edu/data/*/*.parquet:filter=int_score>=4:budget=20B' \
        --source=openhermes2_5.json:field=conversations:budget=450M
    python data.py --tokenizer=TEACHER_DIR --out=data/sft --mask=True \
        '--source=ultrachat_200k/data/train_sft-*.parquet:field=messages'
    python data.py --info=data/mix   # the card: tokenizer, splits, per source files, kept, dropped
    python data.py ... --out=data/kjv --overwrite=True  # replace prepared data (kept until the new
                                                        # is complete)

Keys are set as in every script (configurator.py; python data.py --help lists them); each --source
adds one source: PATH[:field=NAME][:budget=N][:filter=EXPR], PATH a file, a directory or a glob of
.txt, .json (an array of records, or one a line), .jsonl(.gz) and .parquet files (sources.py). The
budget and the filter apply to the source as a whole: budget stops it after the document that
reaches N tokens (1.5M, 2B); filter keeps records where a numeric field passes a comparison.

The work is done in OUT.partial beside OUT, which saves its progress after every file and every
64M tokens; a run that was stopped (kill -9, a crash, a lost node) continues with the same command
and --resume=True, to the bytes an uninterrupted run writes, and OUT appears only when complete.
Memory does not grow with the corpus: files are streamed, documents written as they are tokenized.

Training reads the bins through `Batches` (random windows or one pass in a seeded order,
reproducible per step; see below). The tokenizer (the teacher's, as tiktoken) is tokenizer.py's.

In this file, in order:
  preparation  prepare: tokenize sources (sources.py reads them) into OUT.partial, resumable, then
               rename it to OUT with meta.json; check_out_dir refuses what may not be replaced
  loading      check_compatible (the data's tokenizer and size against the run's), Batches (random
               windows or one seeded pass per epoch, each batch a pure function of the step)
  main         the command line above; --info prints a data card
"""
import itertools
import os
import shutil
import signal
from multiprocessing import Pool

import numpy as np
import torch
from tqdm import tqdm

from configurator import ConfigError, configure_or_exit, run_or_exit
from model import atomic_dir, read_json, write_json
from sources import document, parse_source, read_records, source_files
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# Data preparation: sources -> train.bin / val.bin (+ masks) + meta.json, resumable

# each Pool worker's tokenizer, set once by _init_worker instead of pickled with every task
_worker_tok = None


def _init_worker(tok):
    global _worker_tok
    _worker_tok = tok


def _tokenize_docs(docs, tok=None):
    """Token ids of each document followed by EOS, and the loss mask: all of a text, the assistant
    turns of a chat. A document the filter dropped (None) stays None, so that every record of a
    file has its result in order."""
    tok = tok or _worker_tok
    out = []
    for doc in docs:
        if doc is None:
            out.append(None)
            continue
        if isinstance(doc, str):
            ids = tok.encode(doc)
            ids.append(tok.eos_id)
            out.append((np.array(ids, np.uint32), np.ones(len(ids), np.uint8)))
        else:  # the chat already ends with its end-of-turn token; the joining EOS is not a target
            ids, mask = tok.encode_chat(doc)
            out.append((np.array(ids + [tok.eos_id], np.uint32), np.array(mask + [0], np.uint8)))
    return out


PREPARED_FILES = ("meta.json", "train.bin", "val.bin", "train_mask.bin", "val_mask.bin")
PROGRESS = "progress.json"
CHECKPOINT_TOKENS = 1 << 26  # progress is saved every 64M tokens (256 MB of ids) and every file


def partial_dir(out_dir):
    """Where an unfinished preparation of out_dir lives, beside it, until it is complete."""
    return os.path.normpath(out_dir) + ".partial"


def check_out_dir(out_dir, overwrite=False, resume=False):
    """Refuse, before any work, an out_dir that prepare could not or may not replace: one holding
    other files than prepared data (never replaced), prepared data without overwrite, or an
    unfinished preparation beside it without resume."""
    work = partial_dir(out_dir)
    if os.path.isfile(os.path.join(work, PROGRESS)) and not resume:
        raise FileExistsError(f"{work} holds an unfinished preparation: pass --resume=True to "
                              "continue it (with the same sources and keys), or delete it to "
                              "start again")
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
            docs_per_task=64, overwrite=False, resume=False, checkpoint_tokens=CHECKPOINT_TOKENS):
    """Tokenize sources (parse_source dicts) into out_dir; each document goes to val with
    probability val_fraction. Returns meta.
    The work is done in partial_dir(out_dir), which records its progress after every file and
    every checkpoint_tokens tokens; resume=True continues an interrupted run from there, to the
    same bytes an uninterrupted run writes. Once complete, the data is renamed to out_dir
    (model.atomic_dir): a failed run leaves no out_dir, or the previous one exactly as it was. An
    out_dir holding prepared data is replaced only with overwrite=True (check_out_dir)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if num_proc < 1:
        raise ValueError(f"--num_proc must be at least 1, got {num_proc}")
    # every source is listed now: a typo in the last one is found before hours on the first
    files = [source_files(src) for src in sources]
    check_out_dir(out_dir, overwrite, resume)
    work = partial_dir(out_dir)
    # what an interrupted run must share with this one to be continued by it
    settings = {"tokenizer_fingerprint": tokenizer.fingerprint, "sources": sources,
                "files": [[[f, os.path.getsize(f)] for f in fs] for fs in files],
                "val_fraction": val_fraction, "seed": seed, "mask": mask}
    progress = _start(work, settings, [f"{s}.bin" for s in SPLITS] +
                      ([f"{s}_mask.bin" for s in SPLITS] if mask else []))
    pool = Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,)) if num_proc > 1 else None
    try:
        _prepare_into(work, progress, tokenizer, sources, files, mask, pool, 4 * num_proc,
                      docs_per_task, checkpoint_tokens)
    except BaseException:
        if not os.path.isfile(os.path.join(work, PROGRESS)):  # nothing saved, nothing to resume
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if pool:
            pool.terminate()
    tokens, docs = progress["tokens"], progress["documents"]
    if tokens["train"] == 0 or (val_fraction > 0 and tokens["val"] == 0):
        shutil.rmtree(work)  # nothing worth resuming
        empty = "train" if tokens["train"] == 0 else "val"
        raise ValueError(f"no document went to {empty} ({sum(docs.values())} documents in all): "
                         "add data" + (" or raise --val_fraction" if empty == "val"
                                       else " or lower --val_fraction"))
    meta = {"tokenizer_fingerprint": tokenizer.fingerprint, "tokenizer": tokenizer.enc.name,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "dtype": "uint32",
            "mask": mask, "documents": docs, "tokens": tokens, "val_fraction": val_fraction,
            "seed": seed, "sources": progress["sources"]}
    write_json(os.path.join(work, "meta.json"), meta)
    with atomic_dir(out_dir) as tmp:
        for name in progress["bins"] + ["meta.json"]:
            os.replace(os.path.join(work, name), os.path.join(tmp, name))
    shutil.rmtree(work)
    return meta


SPLITS = ("train", "val")


def _start(work, settings, names):
    """The progress of the run in work: fresh, or an interrupted run's after its bins are cut back
    to their last saved sizes."""
    path = os.path.join(work, PROGRESS)
    if os.path.isfile(path):
        progress = read_json(path)
        if progress["settings"] != settings:
            changed = [k for k in settings if progress["settings"].get(k) != settings[k]]
            raise ValueError(f"{work} was started with other {', '.join(changed)} (or the "
                             "sources' files changed since): rerun its command, or delete it to "
                             "start again")
        for name, size in progress["sizes"].items():
            p = os.path.join(work, name)
            if not os.path.isfile(p) or os.path.getsize(p) < size:
                raise ValueError(f"{p} is shorter than its saved progress: delete {work} and "
                                 "start again")
            os.truncate(p, size)  # what was written after the last checkpoint is written again
        return progress
    if os.path.exists(work):  # killed before its first checkpoint: nothing to keep
        others = set(os.listdir(work)) - {*PREPARED_FILES, PROGRESS + ".tmp"}
        if others:
            raise FileExistsError(f"{work} holds files data.py did not write ({sorted(others)[0]}"
                                  f"{', ...' if len(others) > 1 else ''}): move it away")
        shutil.rmtree(work)
    os.makedirs(work)
    for name in names:
        open(os.path.join(work, name), "wb").close()
    # "position": the next record to read, as (source, file of the source, record of the file)
    return {"settings": settings, "bins": names, "position": [0, 0, 0],
            "sizes": dict.fromkeys(names, 0), "tokens": dict.fromkeys(SPLITS, 0),
            "documents": dict.fromkeys(SPLITS, 0), "sources": [],
            # drawn once per document in source order: the split is reproducible
            "rng": np.random.default_rng(settings["seed"]).bit_generator.state}


def _prepare_into(work, progress, tokenizer, sources, files, mask, pool, group, docs_per_task,
                  checkpoint_tokens):
    """Tokenize from progress["position"] on, saving progress after every file and every
    checkpoint_tokens tokens."""
    run = _Run(work, progress, mask, checkpoint_tokens)
    s0, f0, r0 = progress["position"]
    try:
        for si in range(s0, len(sources)):
            src = sources[si]
            if si == len(progress["sources"]):
                progress["sources"].append({**src, "files": [], "documents": 0, "dropped": 0,
                                            "tokens": 0})
            card = progress["sources"][si]
            # closed on an error too: the error message then starts a line of its own
            with tqdm(total=src.get("budget"), initial=card["tokens"], unit="tok",
                      unit_scale=True, desc=os.path.basename(src["path"])) as bar:
                for fi in range(f0 if si == s0 else 0, len(files[si])):
                    path, record = files[si][fi], r0 if (si, fi) == (s0, f0) else 0
                    if path not in card["files"]:
                        card["files"].append(path)
                    docs = (document(rec, src) for rec in
                            itertools.islice(read_records(path, src), record, None))
                    results = _tokenized(_batched(docs, docs_per_task), tokenizer, pool, group)
                    if run.write(results, [si, fi, record], card, src.get("budget"), bar):
                        break  # the budget is spent
                    run.checkpoint([si, fi + 1, 0])
            run.checkpoint([si + 1, 0, 0])
    finally:
        for f in run.out.values():
            f.close()


class _Run:
    """The bins being written and the split's rng, whose state progress.json saves at every
    checkpoint."""

    def __init__(self, work, progress, mask, checkpoint_tokens):
        self.work, self.progress, self.mask = work, progress, mask
        self.out = {n: open(os.path.join(work, n), "ab") for n in progress["bins"]}
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = progress["rng"]
        self.checkpoint_tokens, self.since, self.checkpoints = checkpoint_tokens, 0, 0

    def write(self, results, position, card, budget, bar):
        """Write one file's tokenized records (from position on); True if the budget stopped it."""
        tokens, docs = self.progress["tokens"], self.progress["documents"]
        val_fraction = self.progress["settings"]["val_fraction"]
        for task in results:
            for result in task:
                position[2] += 1
                if result is None:
                    card["dropped"] += 1
                    continue
                ids, m = result
                split = "val" if self.rng.random() < val_fraction else "train"
                ids.tofile(self.out[f"{split}.bin"])
                if self.mask:
                    m.tofile(self.out[f"{split}_mask.bin"])
                tokens[split] += len(ids)
                docs[split] += 1
                card["documents"] += 1
                card["tokens"] += len(ids)
                self.since += len(ids)
                bar.update(len(ids))
                if self.checkpoints and self.checkpoints == KILL_AFTER:
                    os.kill(os.getpid(), signal.SIGKILL)
                if budget and card["tokens"] >= budget:
                    return True
            if self.since >= self.checkpoint_tokens:
                self.checkpoint(position)
        return False

    def checkpoint(self, position):
        for f in self.out.values():
            f.flush()
            os.fsync(f.fileno())
        self.progress.update(position=list(position), rng=self.rng.bit_generator.state,
                             sizes={n: f.tell() for n, f in self.out.items()})
        path = os.path.join(self.work, PROGRESS)
        write_json(path + ".tmp", self.progress)
        os.replace(path + ".tmp", path)
        self.checkpoints, self.since = self.checkpoints + 1, 0


# tests set it to kill -9 the run (SIGKILL) in the middle of the work after its K-th saved
# progress, to check that resume=True continues it exactly
KILL_AFTER = int(os.environ.get("NANOLRC_DATA_KILL_AFTER", 0))


def _tokenized(tasks, tokenizer, pool, group):
    """_tokenize_docs of each task, in order. With a pool, the next group of tasks is read and
    tokenized while this one is written; a stop before the end (a budget) waits for the tasks in
    flight, as Pool.terminate can hang with tasks still being sent."""
    if pool is None:
        for task in tasks:
            yield _tokenize_docs(task, tokenizer)
        return
    def submit():
        g = list(itertools.islice(tasks, group))
        return pool.map_async(_tokenize_docs, g) if g else None

    ahead = submit()
    try:
        while ahead:
            after = submit()  # read while the pool tokenizes the group ahead
            results, ahead = ahead.get(), after
            yield from results
    finally:
        if ahead:
            ahead.wait()


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
    resume=False,  # continue the unfinished preparation in OUT.partial (same sources and keys)
    info="",  # print the data card (meta.json) of a prepared dir, and do nothing else
)


def print_card(data_dir):
    """The data card of a prepared dir: its tokenizer, splits, and what each source gave."""
    meta = read_json(os.path.join(data_dir, "meta.json"))
    print(f"{data_dir}: tokenizer {meta.get('tokenizer', '?')} (fingerprint "
          f"{meta['tokenizer_fingerprint'][:12]}, vocab {meta['vocab_size']:,}, eos "
          f"{meta['eos_id']}), {meta['dtype']} ids{', loss mask' if meta['mask'] else ''}")
    for split in ("train", "val"):
        print(f"  {split:5} {meta['tokens'][split]:>15,} tokens {meta['documents'][split]:>12,} "
              "documents")
    print(f"  val_fraction {meta['val_fraction']}, seed {meta['seed']}")
    for src in meta["sources"]:
        opts = "".join(f":{k}={src[k]}" for k in ("field", "filter", "budget") if src.get(k))
        print(f"source {src['path']}{opts}")
        print(f"  {src['tokens']:,} tokens, {src['documents']:,} documents kept, "
              f"{src.get('dropped', 0):,} dropped by the filter, from {len(src.get('files', []))} "
              "files:")
        for path in src.get("files", []):
            print(f"    {path}")


def main(argv=None):
    cfg = configure_or_exit(DEFAULTS, argv)
    if cfg["info"]:
        if not os.path.isfile(os.path.join(cfg["info"], "meta.json")):
            raise FileNotFoundError(f"--info={cfg['info']}: no meta.json there (prepare data "
                                    "with python data.py --out=DIR ...)")
        return print_card(cfg["info"])
    for key, what in (("tokenizer", "TEACHER_DIR"), ("out", "DIR"), ("source", "PATH")):
        if not cfg[key]:
            raise ConfigError(f"no --{key} set: pass --{key}={what} "
                              "(python data.py --help lists the keys)")
    sources = [parse_source(s) for s in cfg["source"]]
    # before the tokenizer loads: refuse at once
    check_out_dir(cfg["out"], cfg["overwrite"], cfg["resume"])
    meta = prepare(load_tokenizer(cfg["tokenizer"]), sources, cfg["out"],
                   val_fraction=cfg["val_fraction"], seed=cfg["seed"], mask=cfg["mask"],
                   num_proc=cfg["num_proc"], overwrite=cfg["overwrite"], resume=cfg["resume"])
    print(f"{cfg['out']}: train {meta['tokens']['train']:,} tokens in "
          f"{meta['documents']['train']:,} documents, val {meta['tokens']['val']:,} tokens in "
          f"{meta['documents']['val']:,} documents")


if __name__ == "__main__":
    run_or_exit(main)
