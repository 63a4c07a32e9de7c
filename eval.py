"""
Evaluate a student beside its teacher: zero-shot lm-evaluation-harness tasks, or held-out text
files.

    pip install lm-eval==0.4.13 accelerate  # the optional extra (in requirements-dev.txt); needs
                                            # the hub's datasets
    python eval.py --model=out/lrc_qwen/student --teacher=/models/Qwen2.5-3B-Instruct --tasks=paper
    python eval.py --model=out/lrc_qwen --tasks=arc_easy,piqa --limit=200  # a training out_dir or
                                                                           # ckpt.pt too
    python eval.py --model=out/demo --tasks=my_task --include_path=tasks/  # local task YAML, JSONL
    python eval.py --model=out/demo --teacher=~/.cache/nanolrc/SmolLM2-135M-Instruct \
        --text=a.txt,b.txt
    python eval.py --model=DIR --tasks=my_task --include_path=tasks/ --check_hf=True  # parity and
                                                                    # speed against lm-eval's hf

--model is what sample.py takes (an HF dir, a training out_dir or a ckpt.pt: the student is
materialised from teacher + projections). The models run as nanoLRC's own model.Transformer behind
lm-eval's `LM` interface (NanoLM below): no transformers needed, batched, a question's context run
once for all its choices (KV cache). --tasks=paper is the seeds' nine tasks (lm-eval 0.4.x,
zero-shot; acc_norm for arc_challenge and logiqa, acc elsewhere); they download their datasets from
the HF hub. The table goes to stdout and, as JSON, to --output_path (default: eval_results.json next
to the model); with --output_path it also holds lm-eval's own results of each model. --text reports
per-token loss, bits per byte, and with --teacher KL(teacher||student) and top-1 agreement, over
windows of --block_size tokens.
"""
import difflib
import functools
import gc
import json
import logging
import math
import os
import statistics
import sys
import time

import torch

from configurator import AT_LEAST_1, NON_NEGATIVE, check_ranges, configure_or_exit, run_or_exit
from model import checkpoint_files, read_json
from sample import load, resolve_model
from common import resolve_system

DEFAULTS = dict(
    model="",  # the student: HF dir, training out_dir or ckpt.pt; "" = the newest out/*/student
    teacher="",  # HF dir of the teacher, evaluated on the same items ("" = the student alone)
    tasks="",  # comma-separated lm-eval task names, or "paper" (the seeds' nine tasks)
    include_path="",  # a dir of extra lm-eval task YAMLs (local tasks)
    limit=0,  # > 0: the first N items of each task
    batch_size=32,  # rows (a question's choices) per forward
    output_path="",  # the JSON written; "" = eval_results.json next to the model
    text="",  # comma-separated text files: loss, bits per byte, KL and agreement with the teacher
    block_size=1024,  # --text: tokens per window (capped at the model's context)
    check_hf=False,  # also run lm-eval's own hf backend on --model: per-item differences, items/s
    check_rounds=3,  # --check_hf: rounds of ours then hf, timed alternately; the median ratio is
                     # reported
    compile=False,  # generate_until tasks: torch.compile the one-token decode step (as sample.py)
    device="auto",  # auto: cuda if available, else cpu
    dtype="auto",  # auto: bfloat16 on cuda, float32 on cpu
)

# The seeds' zero-shot table (model cards, paper Table 1/13): task -> the metric they report
PAPER_TASKS = {"arc_easy": "acc", "arc_challenge": "acc_norm", "logiqa": "acc_norm",
               "commonsense_qa": "acc", "piqa": "acc", "winogrande": "acc", "boolq": "acc",
               "sciq": "acc", "mmlu": "acc"}


def import_lm_eval():
    try:
        import lm_eval  # noqa: F401  (an optional extra: only eval.py needs it)
        from lm_eval.api.model import TemplateLM  # noqa: F401
    except ImportError:
        raise ImportError("lm-evaluation-harness is not installed: "
                          "pip install lm-eval==0.4.13 accelerate") from None
    # its per-task INFO lines drown the table
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    return lm_eval


def adds_bos(tok_dir) -> bool:
    """Whether the HF tokenizer puts BOS in front of every encoding (a TemplateProcessing
    post-processor that starts with a special token, as Llama-3's); lm-eval's hf backend encodes
    with it, so we must too."""
    path = os.path.join(tok_dir, "tokenizer.json")
    post = read_json(path).get("post_processor") if os.path.isfile(path) else None
    sequence = (post or {}).get("type") == "Sequence"
    steps = (post or {}).get("processors", [post]) if sequence else [post]
    return any(p and p.get("type") == "TemplateProcessing" and "SpecialToken" in p["single"][0]
               for p in steps)


def load_checked(path, device, dtype):
    """sample.load plus the checks a benchmark needs: the tokenizer's ids must exist in the
    model."""
    model, tok, eos = load(path, device, dtype)
    V = model.config.vocab_size
    if tok.vocab_size > V:
        raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{V} embedding rows: the tokenizer does not belong to this model")
    cfg = model.config
    for name, ids in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id)):
        wrong = sorted((set(ids) if isinstance(ids, list) else {ids} - {None}) - tok.special_ids)
        if wrong:  # e.g. a tokenizer.json of another model with the same vocabulary size
            raise ValueError(f"{path}: the model's {name} {wrong[0]} is not a special token of its "
                             f"tokenizer ({tok.decode([wrong[0]])!r}): the tokenizer does not "
                             "belong to this model")
    return model, tok, eos


def tokenizer_dir_of(path):
    """The dir whose tokenizer.json sample.load used for `path` (an HF dir, or a checkpoint's
    teacher)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from common import load_checkpoint, tokenizer_dir
    return tokenizer_dir(load_checkpoint(path)["config"])


# -----------------------------------------------------------------------------
# nanoLRC's Transformer as an lm-eval LM

def make_lm(model, tok, eos, add_bos, batch_size, compile=False):
    """A lm_eval TemplateLM over model.Transformer. Built in a function so that lm-eval stays an
    optional import."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from tqdm import tqdm

    class NanoLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.model, self.tok, self.eos = model, tok, eos
            self.add_bos, self.bs = add_bos, batch_size
            self.max_length = model.config.max_position_embeddings
            self.device_ = next(model.parameters()).device
            enc = tok.enc
            self.special_ids = {enc.encode_single_token(s) for s in enc.special_tokens_set}

        @property
        def eot_token_id(self):
            return self.tok.eos_id

        @property
        def prefix_token_id(self):  # what an empty context is conditioned on (hf: BOS, else EOS)
            return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

        def tok_encode(self, string, add_special_tokens=None, **kw):
            bos = self.add_bos if add_special_tokens is None else add_special_tokens
            if add_special_tokens is None and self.tok.bos and string.startswith(self.tok.bos):
                bos = False  # the text carries its BOS already (a chat-templated prompt)
            return self.tok.encode(string, bos=bos)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kw):
            return score(self.model, [(ctx, cont) for _, ctx, cont in requests], self.bs,
                         self.max_length, disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            """Each text scored whole in windows of the model's context, every token once (as
            lm-eval's hf)."""
            windows, owner = [], []
            for i, req in enumerate(requests):
                for w in get_rolling_token_windows(token_list=self.tok_encode(req.args[0]),
                                                   prefix_token=self.prefix_token_id,
                                                   max_seq_len=self.max_length, context_len=1):
                    windows.append(make_disjoint_window(w))
                    owner.append(i)
            out = [0.0] * len(requests)
            scores = score(self.model, windows, self.bs, self.max_length, disable_tqdm)
            for i, (lp, _) in zip(owner, scores):
                out[i] += lp
            return out

        def generate_until(self, requests, disable_tqdm=False):
            """Greedy, one request at a time with the KV cache; stops at EOS or any `until`
            string."""
            res = []
            eos_text = self.tok.decode([self.eot_token_id])
            for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
                context, kw = req.args
                kw = dict(kw)
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                until = until + [eos_text] if eos_text not in until else until
                if kw.get("do_sample") and kw.get("temperature", 1.0) > 0:
                    raise ValueError(f"task {req.task_name}: sampling (do_sample) is not "
                                     "supported, only greedy")
                ids = self.tok_encode(context)
                room = self.max_length - len(ids)
                if room <= 0:
                    raise ValueError(f"task {req.task_name}: a prompt of {len(ids)} tokens does "
                                     f"not fit the model's context of {self.max_length} tokens "
                                     "(max_position_embeddings)")
                new, text = [], ""
                steps = self.model.generate(torch.tensor([ids], device=self.device_),
                                            min(int(kw.get("max_gen_toks", 256)), room),
                                            eos_id=self.eos, compile=compile)
                for nxt in steps:
                    if nxt.item() in self.eos:
                        break
                    new.append(nxt.item())
                    text = self.tok.decode([t for t in new if t not in self.special_ids])
                    if any(u in text for u in until):
                        break
                steps.close()  # drops the KV cache
                for u in until:  # the text up to the first stop string, as lm-eval's hf returns it
                    text = text.split(u)[0]
                res.append(text)
            return res

    return NanoLM()


@torch.no_grad()
def score(model, pairs, batch_size, max_length, disable_tqdm=True):
    """[(context ids, continuation ids)] -> [(log p(continuation | context), continuation is
    greedy)]. Pairs with the same context (a question's choices) share one forward of it: up to
    batch_size contexts run at once (right-padded, longest first, a batch ending before a context
    20% shorter than its first: bounded padding), and their KV caches are kept. The continuations
    then run in batches of batch_size rows sorted by length (little padding) across many contexts of
    any lengths, each row on a copy of its context's cache (model.hidden's pos and mask); the head
    runs only where a token is scored."""
    from tqdm import tqdm
    groups = {}
    for i, (ctx, cont) in enumerate(pairs):
        n = len(ctx) + len(cont) - 1  # the last continuation token is predicted, never fed
        if n > max_length:
            raise ValueError(f"an item needs {n} tokens but the model's context is {max_length} "
                             "tokens (max_position_embeddings): shorten the task's items or use a "
                             "model with a longer context")
        groups.setdefault(tuple(ctx), []).append(i)
    order = sorted(groups, key=lambda c: (-len(c), c))
    out = [None] * len(pairs)
    bar = tqdm(total=len(pairs), disable=disable_tqdm, desc="loglikelihood")
    batch, pool = [], []  # pool: rows whose contexts ran, waiting for their continuations
    for k, ctx in enumerate(order):
        batch.append(ctx)
        nxt = order[k + 1] if k + 1 < len(order) else None
        if nxt is None or len(batch) == batch_size or len(nxt) < 0.8 * len(batch[0]):
            pool += _run_contexts(model, batch, [groups[c] for c in batch], pairs, out)
            batch = []
            # enough rows to sort into batches of like length
            if len(pool) >= 4 * batch_size or nxt is None:
                _run_continuations(model, pool, pairs, out, batch_size)
                bar.update(sum(o is not None for o in out) - bar.n)
                pool = []
    bar.close()
    return out


def _run_contexts(model, ctxs, members, pairs, out):
    """One forward of G contexts (right padding is harmless: attention is causal): each
    continuation's first token is scored from it. Returns the rows still to run, (pair index, log p
    and greedy of token 0, context length, the contexts' KV cache (per layer (k, v), each
    (G, nkv, L_max, hs)), context g)."""
    device = model.inv_freq.device
    G, Lmax = len(ctxs), len(ctxs[0])
    lens = torch.tensor([len(c) for c in ctxs], device=device)  # (G,)
    model.setup_cache(G, Lmax)
    try:
        pad = [list(c) + [0] * (Lmax - len(c)) for c in ctxs]
        x = torch.tensor(pad, device=device)  # (G, L_max)
        h = model.hidden(x)  # (G, L_max, C); fills the cache
        # (G, V): predicts token 0
        first = model.lm_head(h[torch.arange(G, device=device), lens - 1]).float()
        kv = [layer.self_attn.cache for layer in model.layers]
    finally:
        model.setup_cache(None, 0)
    rows = [(i, g) for g, idx in enumerate(members) for i in idx]
    owner = torch.tensor([g for _, g in rows], device=device)
    token0 = torch.tensor([pairs[i][1][0] for i, _ in rows], device=device)
    lp0, greedy0 = _logprob(first[owner], token0)
    pool = []
    for r, (i, g) in enumerate(rows):
        if len(pairs[i][1]) == 1:
            out[i] = (lp0[r].item(), bool(greedy0[r]))
        else:
            pool.append((i, lp0[r], greedy0[r], len(ctxs[g]), kv, g))
    return pool


def _run_continuations(model, pool, pairs, out, batch_size):
    """The continuations of pooled rows (_run_contexts), batch_size rows at a time sorted by length:
    each row's context KV copied to cache slots 0.., its continuation in slots from L = the longest
    context of the batch on, at positions from its own context's length, the slots between masked
    out."""
    device = model.inv_freq.device
    pool = sorted(pool, key=lambda r: len(pairs[r[0]][1]))
    for s in range(0, len(pool), batch_size):
        chunk = pool[s:s + batch_size]
        conts = [pairs[r[0]][1] for r in chunk]
        R, m = len(chunk), max(map(len, conts))
        lens = torch.tensor([r[3] for r in chunk], device=device)  # (R,) context lengths
        L = int(lens.max())
        model.setup_cache(R, L + m - 1)
        try:
            sources = {}  # each context batch's cache -> (rows of this batch, their contexts)
            for r, (_, _, _, _, kv, g) in enumerate(chunk):
                rows, gs = sources.setdefault(id(kv), (kv, [], []))[1:]
                rows.append(r), gs.append(g)
            for kv, rows, gs in sources.values():
                rows, gs = torch.tensor(rows, device=device), torch.tensor(gs, device=device)
                n = min(kv[0][0].shape[2], L)
                for layer, src in zip(model.layers, kv):
                    for c, c0 in zip(layer.self_attn.cache, src):
                        c[rows, :, :n] = c0[gs, :, :n]
            target = torch.tensor([c + [0] * (m - len(c)) for c in conts], device=device)  # (R, m)
            cont_lens = torch.tensor([len(c) for c in conts], device=device)
            valid = torch.arange(m, device=device) < cont_lens[:, None]  # (R, m)
            t = torch.arange(m - 1, device=device)
            pos = lens[:, None] + t  # (R, m-1): each row goes on from its own context's length
            slot = torch.arange(L + m - 1, device=device)
            # (R, m-1, L+m-1)
            mask = (slot < lens[:, None, None]) | ((slot >= L) & (slot <= L + t[:, None]))
            # (R, m-1, C)
            hc = model.hidden(target[:, :-1], start_pos=L, pos=pos, mask=mask[:, None])
            # the continuations less their last token, right-padded; the head on scored ones
            v = valid[:, 1:]
            lp = torch.zeros(R, m - 1, device=device)
            greedy = torch.ones(R, m - 1, dtype=torch.bool, device=device)  # True on padding
            lp[v], greedy[v] = _logprob(model.lm_head(hc[v]).float(), target[:, 1:][v])
        finally:
            model.setup_cache(None, 0)
        for r, (i, lp0, greedy0, *_) in enumerate(chunk):
            out[i] = ((lp0 + lp[r].sum()).item(), bool(greedy0) and bool(greedy[r].all()))


def _logprob(logits, target):
    """logits (N, V) fp32, target (N,) -> log p(target) (N,), target is the argmax (N,)."""
    logp = logits.gather(-1, target[:, None])[:, 0] - logits.logsumexp(-1)
    return logp, logits.argmax(-1) == target


# -----------------------------------------------------------------------------
# tasks

def task_names(cfg, task_manager):
    names = (list(PAPER_TASKS) if cfg["tasks"] == "paper"
             else [t for t in cfg["tasks"].split(",") if t])
    known = set(task_manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown task {name!r}{hint} "
                             "(local tasks: --include_path=DIR of task YAMLs)")
    return names


def metric_of(task, results):
    """The metric the seeds report for a task: PAPER_TASKS, else acc, else the first metric lm-eval
    gives."""
    r = results[task]
    for m in (PAPER_TASKS.get(task), "acc", "exact_match"):
        if m and f"{m},none" in r:
            return m
    return next(k.split(",")[0] for k in r if "," in k and not k.split(",")[0].endswith("_stderr"))


def run_tasks(lm, names, cfg, task_manager):
    """lm-eval's zero-shot run of `names` on an LM; returns (results dict, seconds)."""
    from lm_eval import simple_evaluate
    t0 = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=names, num_fewshot=0, limit=cfg["limit"] or None,
                          task_manager=task_manager, log_samples=True, bootstrap_iters=0,
                          batch_size=cfg["batch_size"])
    return res, time.perf_counter() - t0


def summary(names, results):
    """{task: {"metric": m, "teacher": x, "student": y, "ratio": y / x}} plus the average, from
    lm-eval results."""
    rows = {}
    for task in names:
        s = results["student"]["results"]
        m = metric_of(task, s)
        row = {"metric": m, "student": s[task][f"{m},none"]}
        if "teacher" in results:
            row["teacher"] = results["teacher"]["results"][task][f"{m},none"]
        rows[task] = row
    avg = {k: sum(r[k] for r in rows.values()) / len(rows)
           for k in ("teacher", "student") if k in rows[names[0]]}
    rows["average"] = {"metric": "", **avg}
    for r in rows.values():
        if r.get("teacher"):
            r["ratio"] = r["student"] / r["teacher"]
    return rows


def table(rows, header=("task", "metric", "teacher", "student", "student/teacher")):
    """The seeds' layout: one row per task and the average; scores in percent."""
    cell = lambda r, k: "" if r.get(k) is None else f"{100 * r[k]:.2f}"  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, r in rows.items():
        ratio = f"{100 * r['ratio']:.1f}%" if "ratio" in r else ""
        name = f"**{task}**" if task == "average" else task
        lines.append(f"| {name} | {r['metric']} | {cell(r, 'teacher')} | {cell(r, 'student')} | "
                     f"{ratio} |")
    return "\n".join(lines)


def per_item(results, task):
    """A task's per-item responses (lm-eval's logged samples) in doc order: one list per item, one
    entry per request: (loglikelihood, is_greedy) for multiple choice, a float for rolling
    loglikelihoods, or text."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [list(s["filtered_resps"]) for s in samples]


def max_loglik_diff(a, b):
    """The largest |difference| between the log-likelihoods of two per_item lists (None: they hold
    text)."""
    ll = lambda x: x[0] if isinstance(x, (tuple, list)) else x  # noqa: E731
    d = [abs(ll(x) - ll(y)) for ra, rb in zip(a, b) for x, y in zip(ra, rb)
         if not isinstance(x, str)]
    return max(d) if d else None


def check_hf(path, names, cfg, task_manager, device, dtype):
    """lm-eval's own hf backend (transformers) against ours on the same model, items and dtype: the
    largest per-item log-likelihood difference, each backend's score, and items/s over check_rounds
    rounds run alternately (ours, hf, ours, hf, ...: drift in a shared machine hits both alike) with
    the median of the per-round ratios. A check that our LM scores what lm-eval would, and how much
    faster."""
    from lm_eval.models.huggingface import HFLM
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError("--check_hf needs --model to be an HF dir (an exported student), not a "
                         "checkpoint")
    model, tok, eos = load_checked(path, device, dtype)
    lms = {"ours": make_lm(model, tok, eos, adds_bos(path), cfg["batch_size"], cfg["compile"]),
           "hf": HFLM(pretrained=path, device=device, dtype=dtype, batch_size=cfg["batch_size"])}
    res, secs = {}, {"ours": [], "hf": []}
    for _ in range(cfg["check_rounds"]):
        for who, lm in lms.items():
            res[who], t = run_tasks(lm, names, cfg, task_manager)
            secs[who].append(t)
    ours, theirs = res["ours"], res["hf"]
    rows = {}
    for task in names:
        if task not in theirs.get("samples", {}):
            continue  # a group (mmlu): its subtasks are compared
        a, b = per_item(ours, task), per_item(theirs, task)
        m = metric_of(task, ours["results"])
        rows[task] = {"metric": m, "ours": ours["results"][task][f"{m},none"],
                      "hf": theirs["results"][task][f"{m},none"],
                      "max_abs_diff": max_loglik_diff(a, b), "same_items": a == b}
    n = n_items(ours)
    ratios = [h / o for o, h in zip(secs["ours"], secs["hf"])]
    speed = {"items": n, "rounds": len(ratios), "ours_s": secs["ours"], "hf_s": secs["hf"],
             "ours_items_per_s": n / statistics.median(secs["ours"]),
             "hf_items_per_s": n / statistics.median(secs["hf"]),
             "speedup": statistics.median(ratios), "speedup_per_round": ratios}
    print(f"\ncheck against lm-eval's hf backend ({n} items, {dtype}, {len(ratios)} alternating "
          f"rounds, medians): nanoLRC {speed['ours_items_per_s']:.2f} items/s, "
          f"hf {speed['hf_items_per_s']:.2f} items/s, {speed['speedup']:.2f}x "
          f"(per round {', '.join(f'{r:.2f}' for r in ratios)})")
    for task, r in rows.items():
        diff = ("" if r["max_abs_diff"] is None
                else f", max |loglik diff| {r['max_abs_diff']:.2e}")
        print(f"  {task}: {r['metric']} {r['ours']:.4f} (ours) vs {r['hf']:.4f} (hf){diff}, "
              f"{'identical' if r['same_items'] else 'different'} per-item outputs")
    return {"tasks": rows, **speed}


def n_items(results):
    return sum(v["effective"] for v in results["n-samples"].values())


def _task_manager(cfg):
    inc = os.path.expanduser(cfg["include_path"])
    if inc and not os.path.isdir(inc):
        raise FileNotFoundError(f"--include_path={inc} is not a directory of task YAMLs")
    return task_manager(inc)


@functools.lru_cache(maxsize=4)
def task_manager(include_path):
    """lm-eval's index of its ~15k task YAMLs (plus include_path's): slow to build (seconds), so
    built once."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=include_path or None)


# -----------------------------------------------------------------------------
# held-out text

@torch.no_grad()
def text_stats(student, teacher, ids, block_size):
    """Sums over every predicted token of `ids`: student (and teacher) nll, KL(teacher||student) at
    T=1, top-1 agreement. Windows of block_size tokens overlap by one, so each token after the first
    is predicted once."""
    device = student.inv_freq.device
    s = dict(tokens=0, student_nll=0.0, teacher_nll=0.0, kl=0.0, agree=0)
    for i in range(0, len(ids) - 1, block_size):
        x = torch.tensor([ids[i:i + block_size + 1]], device=device)
        inp, tgt = x[:, :-1], x[:, 1:]  # (1, T)
        ls = student(inp)[0].float().log_softmax(-1)  # (1, T, V)
        s["tokens"] += tgt.numel()
        s["student_nll"] -= ls.gather(-1, tgt[..., None]).sum().item()
        if teacher is not None:
            lt = teacher(inp)[0].float().log_softmax(-1)
            s["teacher_nll"] -= lt.gather(-1, tgt[..., None]).sum().item()
            s["kl"] += (lt.exp() * (lt - ls)).sum().item()
            s["agree"] += (lt.argmax(-1) == ls.argmax(-1)).sum().item()
    return s


def text_metrics(student, teacher, tok, text, block_size=1024):
    """Held-out text metrics of loaded models (demo.py's report calls this): {tokens, bytes,
    student_loss, student_bpb} and with a teacher (same tokenizer) also teacher_loss, teacher_bpb,
    kl (KL(teacher||student) per token, T=1) and agreement (top-1). Losses in nats per token; bits
    per byte over the text's UTF-8 bytes."""
    ids = [tok.eos_id] + tok.encode(text)  # a document starts after EOS, as training packs them
    s = text_stats(student, teacher, ids, min(block_size, student.config.max_position_embeddings))
    n, nbytes = max(s["tokens"], 1), len(text.encode("utf-8"))
    row = {"tokens": s["tokens"], "bytes": nbytes, "student_loss": s["student_nll"] / n,
           "student_bpb": s["student_nll"] / math.log(2) / nbytes}
    if teacher is not None:
        row.update(teacher_loss=s["teacher_nll"] / n,
                   teacher_bpb=s["teacher_nll"] / math.log(2) / nbytes,
                   kl=s["kl"] / n, agreement=s["agree"] / n)
    return row


def run_text(files, student_path, teacher_path, cfg, device, dtype):
    """Per file: tokens, loss per token and bits per byte (student, teacher), KL(teacher||student),
    agreement."""
    texts = {}
    for f in files:
        with open(f, encoding="utf-8") as fh:
            texts[f] = fh.read()
    student, tok, _ = load_checked(student_path, device, dtype)
    teacher = None
    if teacher_path:
        teacher, ttok, _ = load_checked(teacher_path, device, dtype)
        if (ttok.fingerprint != tok.fingerprint
                or teacher.config.vocab_size != student.config.vocab_size):
            raise ValueError("--text: teacher and student have different tokenizers or "
                             "vocabularies; KL and agreement need the same ones")
    rows = {f: text_metrics(student, teacher, tok, text, cfg["block_size"])
            for f, text in texts.items()}
    cols = ["tokens", "student_loss", "student_bpb"] + \
        (["teacher_loss", "teacher_bpb", "kl", "agreement"] if teacher is not None else [])
    fmt = lambda k, v: (f"{v:,}" if k == "tokens" else  # noqa: E731
                        f"{100 * v:.1f}%" if k == "agreement" else f"{v:.3f}")
    print("| file | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for f, row in rows.items():
        print(f"| {os.path.basename(f)} | " + " | ".join(fmt(k, row[k]) for k in cols) + " |")
    return rows


# -----------------------------------------------------------------------------

def evaluate(cfg):
    """Everything eval.py does for a resolved config; returns the report written as JSON."""
    check_ranges(cfg, {"batch_size": AT_LEAST_1, "block_size": AT_LEAST_1,
                       "check_rounds": AT_LEAST_1, "limit": NON_NEGATIVE})
    device, dtype = resolve_system(cfg)
    if not cfg["tasks"] and not cfg["text"]:
        raise ValueError("nothing to evaluate: give --tasks=NAMES (or paper) and/or "
                         "--text=FILE,...")
    student_path = resolve_model(cfg["model"])
    teacher_path = os.path.expanduser(cfg["teacher"]) if cfg["teacher"] else ""
    if teacher_path and not os.path.isfile(os.path.join(teacher_path, "config.json")):
        raise FileNotFoundError(f"--teacher={teacher_path} is not an HF model dir "
                                "(no config.json)")
    # a dir without weights fails now, not after the task index is built
    for path in (student_path, teacher_path):
        if path and os.path.isfile(os.path.join(path, "config.json")):
            checkpoint_files(path)
    report = {"model": student_path, "teacher": teacher_path or None}
    if cfg["tasks"]:
        import_lm_eval()
        tm = _task_manager(cfg)
        names = task_names(cfg, tm)
        results, secs = {}, {}
        for role, path in (("student", student_path), ("teacher", teacher_path)):
            if not path:
                continue
            model, tok, eos = load_checked(path, device, dtype)
            lm = make_lm(model, tok, eos, adds_bos(tokenizer_dir_of(path)), cfg["batch_size"],
                         cfg["compile"])
            results[role], secs[role] = run_tasks(lm, names, cfg, tm)
            n = n_items(results[role])
            print(f"{role} {path}: {n} items in {secs[role]:.1f} s ({n / secs[role]:.1f} items/s)",
                  file=sys.stderr)
            del model, lm
            gc.collect()
        rows = summary(names, results)
        print(table(rows))
        report["tasks"] = rows
        if cfg["check_hf"]:
            report["check_hf"] = check_hf(student_path, names, cfg, tm, device, dtype)
        report["lm_eval"] = {role: {k: v for k, v in r.items() if k != "samples"}
                             for role, r in results.items()}
    if cfg["text"]:
        files = [os.path.expanduser(f) for f in cfg["text"].split(",") if f]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"--text: {f} does not exist")
        report["text"] = run_text(files, student_path, teacher_path, cfg, device, dtype)
    model_dir = student_path if os.path.isdir(student_path) else os.path.dirname(student_path)
    out = cfg["output_path"] or os.path.join(model_dir, "eval_results.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=2, default=str)  # lm-eval's configs hold a few non-JSON values
    print(f"wrote {out}", file=sys.stderr)
    return report


def main(argv=None):
    return run_or_exit(evaluate, configure_or_exit(DEFAULTS, argv))


if __name__ == "__main__":
    main()
