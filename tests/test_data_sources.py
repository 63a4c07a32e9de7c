"""data.py on sources as they are downloaded (sources.py): the readers against json.loads and
re.split, replicas of FineWeb-Edu, OpenHermes-2.5 and UltraChat-200k run through README's commands,
resume after kill -9, peak memory flat in the corpus size, bad inputs."""
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
import sources
from configurator import run_or_exit
from data import prepare
from sources import parse_source, read_records, source_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the world and in or God heaven earth light a b c 1 2 , . ! ? \" \\ [ ] { } é 中 🙂"
         .split())


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def run_data_py(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def data_py(capsys, *argv):
    """data.py's command line in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        run_or_exit(data.main, list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def bins(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}


def read_docs(tok, out, split="train"):
    eos = tok.decode([tok.eos_id])
    text = tok.decode(np.fromfile(os.path.join(out, f"{split}.bin"), np.uint32))
    return text[:-len(eos)].split(eos) if text else []


# -----------------------------------------------------------------------------
# the readers

def test_json_array_matches_json_loads(tmp_path):
    rng = random.Random(0)
    records = [{"text": words(rng, rng.randint(0, 30)), "n": i, "nested": {"a": [1, "]", "\\\""]},
                "conversations": [{"from": "human", "value": 'say "[{]}" \\n'}]} for i in range(60)]
    records[3]["text"] = "x" * 5000  # longer than a block: the window grows
    path = tmp_path / "a.json"
    # indented, one line, and tight separators: every split of a record across blocks comes up
    for text in (json.dumps(records, indent=2), json.dumps(records),
                 json.dumps(records, separators=(",", ":"), ensure_ascii=False), " [ ] ", "[]"):
        path.write_text(text, encoding="utf-8")
        for block in (1, 7, 64, 1 << 20):
            got = list(sources._json_array(open(path, encoding="utf-8"), str(path), block))
            assert got == json.loads(text), (block, text[:40])
    # a .json of one record per line is read too
    path.write_text("\n".join(json.dumps(r) for r in records[:5]) + "\n")
    assert list(read_records(str(path))) == records[:5]


@pytest.mark.parametrize("text, message", [
    ('[{"text": "a"}, {"text": "b"', "item 2 of the JSON array is not valid JSON"),
    ('[{"text": "a"} {"text": "b"}]', "after item 1 of the JSON array comes '{'"),
    ('[{"text": "a"},', "item 2 of the JSON array is not valid JSON"),
    ('[{"text": "a"}, 3]', "item 2 of the JSON array is a int, not a record"),
    ('[{"text": "a"}] x', "text follows the JSON array's closing ']'"),
])
def test_json_array_errors(tmp_path, text, message):
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        list(read_records(str(path)))
    assert str(path) in str(e.value)


def test_txt_blocks_match_splitting_the_whole_text(tmp_path):
    rng = random.Random(1)
    pieces = ["\n", "\n\n", "\n \t\n", "  ", "\r\n\r\n", "word", "\n\n\n", " \n", "x y"]
    for trial in range(40):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        path = tmp_path / "a.txt"
        path.write_bytes(text.encode())
        whole = open(path, encoding="utf-8").read()  # newlines translated, as the reader does
        expected = [b.strip("\n") for b in re.split(r"\n[ \t]*\n", whole) if b.strip()]
        for block in (1, 2, 3, 5, 1 << 20):
            assert list(sources._txt_blocks(str(path), block)) == expected, (text, block)


def test_source_files(tmp_path):
    tree = ["b/2.parquet", "b/1.parquet", "a/x.jsonl", "a/README.md", "a/.cache/y.jsonl",
            ".gitattributes", "top.json"]
    for name in tree:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    root = str(tmp_path)
    assert source_files({"path": root}) == [f"{root}/a/x.jsonl", f"{root}/b/1.parquet",
                                            f"{root}/b/2.parquet", f"{root}/top.json"]
    assert source_files({"path": f"{root}/b/*.parquet"}) == [f"{root}/b/1.parquet",
                                                             f"{root}/b/2.parquet"]
    assert source_files({"path": f"{root}/**/*.jsonl"}) == [f"{root}/a/x.jsonl"]
    with pytest.raises(FileNotFoundError, match="matches no files"):
        source_files({"path": f"{root}/c/*.parquet"})
    with pytest.raises(ValueError, match="holds no .txt, .json, .jsonl, .jsonl.gz or .parquet"):
        source_files({"path": f"{root}/a/README.*"})
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("")
    with pytest.raises(ValueError, match="holds no .txt"):
        source_files({"path": f"{root}/docs"})
    with pytest.raises(ValueError, match="unknown file type"):
        source_files({"path": f"{root}/a/README.md"})
    assert parse_source("d/*.parquet:filter=int_score>=4:budget=18B") == {
        "path": "d/*.parquet", "filter": "int_score>=4", "budget": 18_000_000_000}


# -----------------------------------------------------------------------------
# the three datasets of the paper, as downloaded

def fineweb_edu(root, rng, shards=3, rows=40):
    """FineWeb-Edu's layout: data/CC-MAIN-*/000_0000*.parquet and sample/10BT/*.parquet, with the
    columns of the real shards."""
    texts = []
    for k in range(shards):
        for where in (f"data/CC-MAIN-2024-1{k}/000_0000{k}.parquet", f"sample/10BT/00{k}_00000.parquet"):
            path = os.path.join(root, where)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            text = [words(rng, rng.randint(1, 25)) for _ in range(rows)]
            score = [rng.randint(1, 5) for _ in range(rows)]
            pq.write_table(pa.table({"text": text, "id": [f"<urn:{i}>" for i in range(rows)],
                                     "url": ["https://x"] * rows, "score": [s + 0.1 for s in score],
                                     "int_score": score}), path, row_group_size=16)
            texts.append((path, text, score))
    return texts


def openhermes(path, rng, n=50):
    """OpenHermes-2.5's openhermes2_5.json: one JSON array of ShareGPT conversations."""
    recs = [{"conversations": [{"from": "system", "value": words(rng, 3)}] * (i % 2) +
             [{"from": "human", "value": words(rng, 8)}, {"from": "gpt", "value": words(rng, 12)}],
             "source": "glaive", "category": None} for i in range(n)]
    with open(path, "w") as f:
        json.dump(recs, f, indent=4)
    return [[{"role": {"human": "user", "gpt": "assistant", "system": "system"}[t["from"]],
              "content": t["value"]} for t in r["conversations"]] for r in recs]


def ultrachat(root, rng, n=30):
    """UltraChat-200k's data/train_sft-*.parquet with a messages column (and test_sft beside)."""
    chats = []
    for k, split in enumerate(["train_sft-00000-of-00002", "train_sft-00001-of-00002",
                               "test_sft-00000-of-00001"]):
        msgs = [[{"content": words(rng, 6), "role": "user"},
                 {"content": words(rng, 9), "role": "assistant"}] for _ in range(n)]
        os.makedirs(os.path.join(root, "data"), exist_ok=True)
        pq.write_table(pa.table({"prompt": [m[0]["content"] for m in msgs], "messages": msgs,
                                 "prompt_id": ["p"] * n}), os.path.join(root, "data", split + ".parquet"))
        chats += msgs if split.startswith("train") else []
    return chats


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("hub"), random.Random(0)
    return (root, fineweb_edu(str(root / "fineweb-edu"), rng),
            openhermes(str(root / "openhermes2_5.json"), rng), ultrachat(str(root / "ultrachat_200k"), rng))


def test_readme_commands_on_the_real_layouts(replicas, tiny_teacher, tiny_tok, tmp_path, capsys):
    root, fineweb, hermes, chats = replicas
    kept = [t for path, text, score in sorted(fineweb) if "/fineweb-edu/data/" in path
            for t, s in zip(text, score) if s >= 4]
    budget = sum(len(tiny_tok.encode(t)) + 1 for t in kept[:len(kept) // 2])  # half the source
    out = tmp_path / "mix"
    # README's pretraining mix: a glob of shards with a filter and one budget, and the JSON array
    code, _, err = data_py(capsys, f"--tokenizer={tiny_teacher}", f"--out={out}", "--num_proc=2",
                           "--val_fraction=0",
                           f"--source={root}/fineweb-edu/data/*/*.parquet:filter=int_score>=4:budget={budget}",
                           f"--source={root}/openhermes2_5.json:field=conversations")
    assert code == 0, err[-3000:]
    eos = "<|im_end|>"
    text = tiny_tok.decode(np.fromfile(out / "train.bin", np.uint32))
    assert text == "".join(t + eos for t in kept[:len(kept) // 2]) + \
        "".join(tiny_tok.render_chat(c) + eos for c in hermes)
    meta = json.loads((out / "meta.json").read_text())
    fw, oh = meta["sources"]
    shards = sorted(p for p, _, _ in fineweb if "/fineweb-edu/data/" in p)
    # the data card: files read (the budget stops inside the second shard), kept and dropped
    read = shards[:2]
    assert fw["files"] == read and fw["tokens"] == budget and fw["documents"] == len(kept) // 2
    rows = [s for p, _, score in fineweb if p in read for s in score]
    last_kept = [i for i, s in enumerate(rows) if s >= 4][len(kept) // 2 - 1]
    assert fw["dropped"] == sum(s < 4 for s in rows[:last_kept])
    assert oh["files"] == [f"{root}/openhermes2_5.json"] and oh["documents"] == len(hermes) and oh["dropped"] == 0
    assert meta["tokenizer"] == os.path.basename(tiny_teacher) and meta["tokens"]["train"] == len(
        np.fromfile(out / "train.bin", np.uint32))
    r = run_data_py(f"--info={out}")  # a subprocess: the card as a user sees it
    assert r.returncode == 0 and f"{budget:,} tokens, {len(kept) // 2} documents kept, {fw['dropped']} dropped" \
        in r.stdout and shards[1] in r.stdout and shards[2] not in r.stdout, r.stdout + r.stderr
    # README's SFT data: UltraChat's train shards by glob, loss on the assistant turns
    code, _, err = data_py(capsys, f"--tokenizer={tiny_teacher}", f"--out={tmp_path / 'sft'}", "--mask=True",
                           "--num_proc=1", "--val_fraction=0",
                           f"--source={root}/ultrachat_200k/data/train_sft-*.parquet:field=messages")
    assert code == 0, err[-3000:]
    ids = np.fromfile(tmp_path / "sft" / "train.bin", np.uint32)
    mask = np.fromfile(tmp_path / "sft" / "train_mask.bin", np.uint8)
    assert tiny_tok.decode(ids) == "".join(tiny_tok.render_chat(c) + eos for c in chats)
    assert tiny_tok.decode(ids[mask == 1]) == "".join(c[1]["content"] + eos for c in chats)


def test_a_dir_source_and_a_budget_across_shards(replicas, tiny_tok, tmp_path):
    root, fineweb, _, _ = replicas
    everything = [t for _, text, _ in sorted(fineweb) for t in text]  # data/ before sample/
    meta = prepare(tiny_tok, [{"path": f"{root}/fineweb-edu"}], str(tmp_path / "a"), val_fraction=0)
    assert read_docs(tiny_tok, str(tmp_path / "a")) == everything
    assert meta["sources"][0]["files"] == sorted(p for p, _, _ in fineweb)


# -----------------------------------------------------------------------------
# resume after kill -9

def test_resume_after_kill_is_byte_identical(replicas, tiny_teacher, tmp_path, capsys):
    root, _, _, _ = replicas
    args = [f"--tokenizer={tiny_teacher}", "--val_fraction=0.2", "--num_proc=2", "--mask=True",
            f"--source={root}/fineweb-edu/sample/10BT/*.parquet:filter=int_score>=3",
            f"--source={root}/openhermes2_5.json"]
    assert data_py(capsys, f"--out={tmp_path / 'whole'}", *args)[0] == 0
    out = tmp_path / "out"
    # killed in the middle of the second shard, after the first one's progress was saved
    r = run_data_py(f"--out={out}", *args, "--resume=True", env={"NANOLRC_DATA_KILL_AFTER": "1"})
    assert r.returncode == -9 and not out.exists(), r.stderr[-3000:]
    progress = json.loads((tmp_path / "out.partial" / "progress.json").read_text())
    assert progress["position"] == [0, 1, 0]
    assert os.path.getsize(tmp_path / "out.partial" / "train.bin") + os.path.getsize(
        tmp_path / "out.partial" / "val.bin") > sum(progress["sizes"][n] for n in ("train.bin", "val.bin"))
    code, _, err = data_py(capsys, f"--out={out}", *args)  # without --resume: refused, the work kept
    assert code == 1 and "out.partial holds an unfinished preparation: pass --resume=True" in err
    code, _, err = data_py(capsys, f"--out={out}", *args[:-1], "--resume=True")  # another command
    assert code == 1 and "was started with other sources" in err, err
    assert data_py(capsys, f"--out={out}", *args, "--resume=True")[0] == 0
    assert bins(out) == bins(tmp_path / "whole") and not (tmp_path / "out.partial").exists()


def test_resume_inside_a_file(replicas, tiny_teacher, tiny_tok, tmp_path):
    """Progress saved every few tokens: the run is killed inside the JSON array and resumes there."""
    root, _, _, _ = replicas
    opts = dict(val_fraction=0.3, resume=True, checkpoint_tokens=200, docs_per_task=4)
    src, out = [{"path": f"{root}/openhermes2_5.json"}], str(tmp_path / "out")
    prepare(tiny_tok, src, str(tmp_path / "whole"), **opts)
    script = (f"import data, tokenizer; data.prepare(tokenizer.load_tokenizer({tiny_teacher!r}), {src!r}, "
              f"{out!r}, **{opts!r})")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "NANOLRC_DATA_KILL_AFTER": "3"})
    assert r.returncode == -9, r.stderr[-3000:]
    si, fi, record = json.loads((tmp_path / "out.partial" / "progress.json").read_text())["position"]
    assert (si, fi) == (0, 0) and 0 < record < 50
    prepare(tiny_tok, src, out, **opts)
    assert bins(tmp_path / "out") == bins(tmp_path / "whole")


# -----------------------------------------------------------------------------
# memory

def peak_rss_mb(tiny_teacher, out, *sources):
    """Peak RSS of data.py (VmHWM of its own process) preparing the sources."""
    # blocks of 4096 characters: the corpora below are many blocks long, as real ones are
    script = ("import runpy, sys, sources\nsources.BLOCK = 4096\nsys.argv = sys.argv[1:]\ntry:\n"
              "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
              "finally:\n    print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", script, os.path.join(ROOT, "data.py"), f"--tokenizer={tiny_teacher}",
                        f"--out={out}", "--num_proc=1", *[f"--source={s}" for s in sources]],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stderr.split()[-1]) / 1024


def test_peak_memory_flat_in_the_corpus_size(tiny_teacher, tmp_path):
    rng = random.Random(0)
    docs = [words(rng, 60) for _ in range(600)]  # ~0.12 MB of text
    for n in (1, 10):
        (tmp_path / f"{n}.txt").write_text("\n\n".join(docs * n))
        (tmp_path / f"{n}.json").write_text(json.dumps([{"text": d} for d in docs * n]))
    small = peak_rss_mb(tiny_teacher, tmp_path / "s", tmp_path / "1.txt", tmp_path / "1.json")
    large = peak_rss_mb(tiny_teacher, tmp_path / "l", tmp_path / "10.txt", tmp_path / "10.json")
    extra = (os.path.getsize(tmp_path / "10.txt") + os.path.getsize(tmp_path / "10.json")) * 0.9 / 2 ** 20
    # read whole, the 9x more text (as str, and as Python objects for the JSON) would add > extra
    assert large - small < extra / 4, (small, large, extra)


# -----------------------------------------------------------------------------
# bad inputs: one line, and prepared data kept

def test_bad_sources_are_one_line_errors(replicas, tiny_teacher, tiny_tok, tmp_path, capsys):
    root, fineweb, _, _ = replicas
    out = tmp_path / "out"
    prepare(tiny_tok, [{"path": f"{root}/openhermes2_5.json"}], str(out), val_fraction=0.2)
    before = bins(out)
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, (p, _, _) in enumerate(fineweb[:2]):
        os.link(p, shards / f"{k + 1}.parquet")
    (shards / "0_broken.parquet").write_bytes(open(fineweb[0][0], "rb").read()[:300])  # cut short
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("")
    for source, message in [
            (f"{tmp_path}/nothing/*.parquet", f"source '{tmp_path}/nothing/*.parquet' matches no files"),
            (f"{tmp_path}/empty", f"source '{tmp_path}/empty' holds no .txt, .json"),
            (f"{shards}", f"source '{shards}/0_broken.parquet' cannot be read"),
            (f"{root}/fineweb-edu/**/*.parquet:filter=int_score>>4", "filter 'int_score>>4': expected FIELD OP NUMBER")]:
        code, _, err = data_py(capsys, f"--tokenizer={tiny_teacher}", f"--out={out}", "--overwrite=True",
                               f"--source={source}")
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 1 and len(errors) == 1 and message in errors[0], err[-2000:]
        assert bins(out) == before and not (tmp_path / "out.partial").exists()


def test_a_run_killed_before_its_first_progress_starts_again(replicas, tiny_tok, tmp_path):
    root, _, hermes, _ = replicas
    src = [{"path": f"{root}/openhermes2_5.json"}]
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "train.bin").write_bytes(b"\0" * 12)  # no progress.json: nothing saved
    meta = prepare(tiny_tok, src, str(tmp_path / "out"), val_fraction=0)
    assert meta["documents"]["train"] == len(hermes) and not (tmp_path / "out.partial").exists()
    (tmp_path / "o2.partial").mkdir()
    (tmp_path / "o2.partial" / "mine.txt").write_text("not data.py's")
    with pytest.raises(FileExistsError, match="holds files data.py did not write"):
        prepare(tiny_tok, src, str(tmp_path / "o2"), val_fraction=0)
    assert (tmp_path / "o2.partial" / "mine.txt").read_text() == "not data.py's"
