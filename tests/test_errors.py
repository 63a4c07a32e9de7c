"""
Bad inputs at every command-line entry point, as a new user types them (subprocesses, CPU, ≈2 s each):

    python -m pytest -q tests/test_errors.py

Each case asserts: the exit status, no traceback, exactly one `error: ...` line that names the problem (the key,
the file, what to do), and that what the user already had on disk (a checkpoint, an exported student, a prepared
data dir) is byte-for-byte as it was, with no temporary dir left beside it. Then the two atomic writers on their
own: data.py --overwrite and LowRankClone.export replace a dir only with a complete new one.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from test_train import ROOT, write_text

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")


def tree_state(path):
    """{relative path: sha256} of every file under path (or of the file), and the dirs: a byte-for-byte snapshot."""
    if os.path.isfile(path):
        return {".": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    state = {}
    for root, dirs, files in os.walk(path):
        rel = os.path.relpath(root, path)
        state[rel + "/"] = sorted(dirs)
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                state[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
    return state


def run(script, *args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_refused(r, code, message, kept):
    """Exit status, no traceback, one error line holding message; kept: {path: tree_state before}."""
    assert r.returncode == code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-3000:]
    for path, before in kept.items():
        assert tree_state(path) == before, path
        parent, name = os.path.split(os.path.abspath(path))
        assert not [n for n in os.listdir(parent) if n.startswith(f".{name}.")], "a temporary dir was left behind"


# -----------------------------------------------------------------------------
# files a user may hand over broken

def broken_copy(src, dst, name, how):
    """A copy of the HF dir src with file `name` broken: 'truncate' (half its bytes), 'garbage' (not JSON),
    or 'drop:KEY' (a JSON file without KEY)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, name)
    if how == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif how == "garbage":
        open(path, "w").write('{"model_type": "qwen2", "hidden_size": 48,')  # cut short
    else:
        obj = json.load(open(path))
        del obj[how.removeprefix("drop:")]
        json.dump(obj, open(path, "w"))
    return str(dst)


@pytest.fixture
def finished(runs, tmp_path):
    """A copy of a finished tiny run: ckpt.pt, metrics.jsonl, student/."""
    out = str(tmp_path / "out")
    shutil.copytree(runs(), out)
    return out


# -----------------------------------------------------------------------------
# train.py: against a finished run, resumed with one bad input; the run's files stay as they were

TRAIN_CASES = [
    # (arguments, exit status, message)
    ("--batch_size=0", 2, "batch_size must be at least 1"),
    ("--eval_interval=0", 2, "eval_interval must be at least 1"),
    ("--temperature=-1", 2, "temperature must be > 0"),
    ("--warmup_ratio=1.5", 2, "warmup_ratio must be in [0, 1]"),
    ("--decay=exponential", 2, "decay must be one of ['linear', 'cosine']"),
    ("--dtype=float16", 2, "dtype must be one of ['auto', 'float32', 'bfloat16']"),
    ("--device=tpu", 2, "--device=tpu is not a device"),
    pytest.param("--device=cuda", 2, "--device=cuda: CUDA is not available on this machine", marks=NO_CUDA),
    ("--d_student=0", 1, "d_student must be in [1, 47]"),
    ("--clone_terms=q,qq", 1, "unknown clone term(s) ['qq']"),
    ("--resume=False", 1, "ckpt.pt exists: pass --resume=True"),
    ("--clone_skip=32", 2, "--clone_skip=32: must be below block_size 32"),
    ("--out_dir={tmp}/file", 2, "--out_dir={tmp}/file is a file: choose a dir"),
    ("--data_dir=", 1, "no --data_dir set: prepare one with python data.py"),
    ("teacher:model.safetensors:truncate", 1, "model.safetensors is unreadable"),
    ("teacher:config.json:garbage", 1, "config.json is not valid JSON"),
    ("teacher:config.json:drop:hidden_size", 1, "config.json lacks the key 'hidden_size'"),
    ("teacher:tokenizer.json:garbage", 1, "tokenizer.json is not valid JSON"),
    ("data:meta.json:garbage", 1, "meta.json is not valid JSON"),
    ("data:train.bin:truncate", 1, "train.bin has"),  # "... N bytes where meta.json says M: ... prepare it again"
]


@pytest.mark.parametrize("arg, code, message", TRAIN_CASES)
def test_train_py(finished, tiny_teacher, tiny_data, tmp_path, arg, code, message):
    teacher, data = tiny_teacher, tiny_data
    if arg.startswith(("teacher:", "data:")):
        which, name, how = arg.split(":", 2)
        broken = broken_copy(teacher if which == "teacher" else data, tmp_path / which, name, how)
        teacher, data = (broken, data) if which == "teacher" else (teacher, broken)
        message = os.path.join(broken, message)  # the message names the file with its path
        arg = "--seed=1337"  # nothing else wrong
    (tmp_path / "file").write_text("not a dir")
    kept = {finished: tree_state(finished)}
    r = run("train.py", "config/tiny.py", f"--teacher={teacher}", f"--data_dir={data}", f"--out_dir={finished}",
            "--resume=True", arg.format(tmp=tmp_path))
    assert_refused(r, code, message.format(tmp=tmp_path), kept)


def test_debug_switch_shows_the_traceback(finished, tiny_teacher, tiny_data):
    r = run("train.py", "config/tiny.py", f"--teacher={tiny_teacher}", f"--data_dir={tiny_data}",
            f"--out_dir={finished}", "--resume=True", "--eval_interval=0", env={"NANOLRC_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "eval_interval must be at least 1" in r.stderr


# -----------------------------------------------------------------------------
# data.py: against a dir of prepared data, which only a complete new one may replace (--overwrite)

@pytest.fixture
def prepared(tiny_data, tmp_path):
    """A copy of the session's prepared data, and a dir of sources (a.txt good, the rest bad)."""
    out = str(tmp_path / "bin")
    shutil.copytree(tiny_data, out)
    src = tmp_path / "src"
    src.mkdir()
    write_text(src / "a.txt")
    (src / "empty.txt").write_text("\n\n")
    (src / "a.csv").write_text("text\nhello\n")
    (src / "a.jsonl").write_text('{"text": "hello", "score": 3}\n{"text": "world"\n')
    (src / "b.jsonl").write_text('{"text": "hello", "score": 3}\n')
    (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (src / "c.jsonl.gz").write_text('{"text": "not gzipped"}\n')
    (src / "other").mkdir()
    (src / "other" / "notes.md").write_text("my notes")
    return out, str(src)


DATA_CASES = [
    ("--source={src}/a.txt", 1, "holds prepared data: pass --overwrite=True to replace it"),
    ("--overwrite=True --source={src}/empty.txt", 1, "no document went to train (0 documents in all)"),
    ("--overwrite=True --source={src}/missing.txt", 1, "source '{src}/missing.txt' does not exist"),
    ("--overwrite=True --source={src}/a.csv", 1, "unknown file type (use .txt, .json, .jsonl, .jsonl.gz or .parquet)"),
    ("--overwrite=True --source={src}/a.jsonl", 1, "{src}/a.jsonl:2 is not a JSON record"),
    ("--overwrite=True --source={src}/b.jsonl:filter=int_score>=4", 1, "record has no field 'int_score'"),
    ("--overwrite=True --source={src}/latin1.txt", 1, "source '{src}/latin1.txt' cannot be read ('utf-8' codec"),
    ("--overwrite=True --source={src}/c.jsonl.gz", 1, "source '{src}/c.jsonl.gz' cannot be read (Not a gzipped"),
    ("--overwrite=True --source={src}/a.txt:budgt=5", 1, "unknown option 'budgt=5'"),
    ("--overwrite=True --source={src}/a.txt:budget=0", 1, "budget must be a token count of at least 1"),
    ("--overwrite=True --source={src}/a.txt --val_fraction=1.5", 1, "--val_fraction must be in [0, 1)"),
    ("--overwrite=True --source={src}/a.txt --tokenizer={src}/missing", 1,
     "tokenizer dir '{src}/missing' does not exist"),
    ("--overwrite=True --source={src}/a.txt --tokenizer=garbage", 1, "tokenizer.json is not valid JSON"),
    ("--overwrite=True --source={src}/a.txt --out={src}/other", 1, "holds files data.py did not write (notes.md)"),
    ("--overwrite=True", 2, "no --source set: pass --source=PATH"),
    ("--overwrite=yes --source={src}/a.txt", 2, "config key 'overwrite' expects bool"),
    ("--overwrit=True --source={src}/a.txt", 2, "unknown config key 'overwrit'; did you mean 'overwrite'?"),
]


@pytest.mark.parametrize("args, code, message", DATA_CASES)
def test_data_py(prepared, tiny_teacher, tmp_path, args, code, message):
    out, src = prepared
    tokenizer = tiny_teacher
    args = args.format(src=src).split()
    if "--tokenizer=garbage" in args:
        tokenizer = broken_copy(tiny_teacher, tmp_path / "tok", "tokenizer.json", "garbage")
        args.remove("--tokenizer=garbage")
    kept = {out: tree_state(out), os.path.join(src, "other"): tree_state(os.path.join(src, "other"))}
    r = run("data.py", f"--tokenizer={tokenizer}", f"--out={out}", *args)
    assert_refused(r, code, message.format(src=src), kept)


def test_data_py_overwrite_replaces_with_complete_data(prepared, tiny_teacher):
    out, src = prepared
    before = json.load(open(os.path.join(out, "meta.json")))
    r = run("data.py", f"--tokenizer={tiny_teacher}", f"--out={out}", f"--source={src}/a.txt:budget=1K",
            "--val_fraction=0.2", "--num_proc=1", "--overwrite=True")
    assert r.returncode == 0, r.stderr[-3000:]
    after = json.load(open(os.path.join(out, "meta.json")))
    assert after["val_fraction"] == 0.2 != before["val_fraction"]
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".bin.")]


# -----------------------------------------------------------------------------
# sample.py: from an exported student, which stays as it was

SAMPLE_CASES = [
    ("--temperature=-0.5", 2, "temperature must be >= 0"),
    ("--top_p=1.5", 2, "top_p must be in (0, 1]"),
    ("--top_k=-1", 2, "top_k must be >= 0"),
    ("--max_new_tokens=0", 2, "max_new_tokens must be at least 1"),
    pytest.param("--device=cuda", 2, "--device=cuda: CUDA is not available on this machine", marks=NO_CUDA),
    ("--prompt=FILE:{tmp}/missing.txt", 1, "--prompt=FILE:{tmp}/missing.txt: no such file"),
    ("student:model.safetensors:truncate", 1, "model.safetensors is unreadable"),
    ("student:config.json:garbage", 1, "config.json is not valid JSON"),
    ("ckpt:teacher-moved", 1, "ckpt.pt: the teacher dir of this run, '{tmp}/moved', is gone"),
]


@pytest.mark.parametrize("arg, code, message", SAMPLE_CASES)
def test_sample_py(finished, tmp_path, arg, code, message):
    model = os.path.join(finished, "student")
    if arg.startswith("student:"):
        _, name, how = arg.split(":", 2)
        model = broken_copy(model, tmp_path / "broken", name, how)
        message, arg = os.path.join(model, message), "--seed=0"
    if arg == "ckpt:teacher-moved":  # a checkpoint whose teacher dir has moved since
        ckpt = torch.load(os.path.join(finished, "ckpt.pt"), weights_only=True)
        ckpt["config"]["teacher"] = str(tmp_path / "moved")
        model = str(tmp_path / "ckpt.pt")
        torch.save(ckpt, model)
        arg = "--seed=0"
    kept = {finished: tree_state(finished)}
    r = run("sample.py", f"--model={model}", "--prompt=the", "--max_new_tokens=4", arg.format(tmp=tmp_path))
    assert_refused(r, code, message.format(tmp=tmp_path), kept)


# -----------------------------------------------------------------------------
# demo.py, bench.py, experiments.py: refused before any conversion, download or run

@pytest.mark.parametrize("arg, code, message", [
    ("--batch_size=0", 2, "batch_size must be at least 1"),
    ("--resume=True --teacher={tmp}/missing", 1, "teacher dir '{tmp}/missing' does not exist"),
    ("", 1, "ckpt.pt exists: pass --resume=True"),
    ("--resume=True --corpus={tmp}/corpus.txt", 1, "a demo corpus is a .jsonl.gz file"),
    ("--resume=True --corpus={tmp}/c.jsonl.gz", 1, "c.json does not exist: give --corpus=FILE.jsonl.gz"),
    ("--resume=True --corpus= --corpus_chats=5000", 1, "--corpus_chats=5000: at least 1 text, and 0 to 1376"),
])
def test_demo_py(finished, tiny_data, tmp_path, arg, code, message):
    kept = {finished: tree_state(finished)}
    r = run("demo.py", f"--out_dir={finished}", f"--data_dir={tiny_data}", "--compile=False",
            *arg.format(tmp=tmp_path).split(), env={"NANOLRC_CACHE": str(tmp_path / "cache")})
    assert_refused(r, code, message.format(tmp=tmp_path), kept)
    assert not os.path.exists(tmp_path / "cache")  # nothing converted or tokenised


@pytest.mark.parametrize("args, code, message", [
    ("nosuch", 2, "unknown command 'nosuch'"),
    ("head --tokens=0", 2, "tokens must be at least 1"),
    pytest.param("model --device=cuda", 2, "CUDA is not available", marks=NO_CUDA),
    ("memory config/lrc_qwen.py --recompute=True", 2, "the dry run cannot predict activation checkpointing"),
])
def test_bench_py(finished, args, code, message):
    kept = {finished: tree_state(finished)}
    r = run("bench.py", *args.format(out=finished).split())
    assert_refused(r, code, message, kept)


@pytest.mark.parametrize("args, code, message", [
    ("--set=baselines --tokens=100", 1, "--tokens=100: at least 2048"),
    ("--set=baselines --only=LRC,LCR", 1, "--only: no run named 'LCR' in the set 'baselines'"),
    ("--set=comparison --seeds=0", 1, "--seeds=0: at least 1"),
    ("--set=baseline", 2, "set must be one of ['baselines', 'efficiency', 'comparison']"),
    ("--tokens=4096", 2, "no --set given: pass --set=NAME, one of ['baselines', 'efficiency', 'comparison']"),
])
def test_experiments_py(tmp_path, args, code, message):
    r = run("experiments.py", *args.split(), cwd=tmp_path, env={"NANOLRC_CACHE": str(tmp_path / "cache")})
    assert_refused(r, code, message, {})
    assert os.listdir(tmp_path) == []  # nothing written: no out/, no results/, no cache


# -----------------------------------------------------------------------------
# the atomic writers

def test_export_replaces_the_student_only_when_complete(tiny_teacher, tmp_path, monkeypatch):
    import model
    from lrc import LowRankClone
    teacher = model.Transformer.from_pretrained(tiny_teacher)
    torch.manual_seed(0)
    lrc = LowRankClone(teacher, 16)
    out = str(tmp_path / "student")
    lrc.export(out, tokenizer_dir=tiny_teacher)
    before = tree_state(out)

    def full_disk(tensors, path, metadata=None):  # half a file written, then the disk is full
        open(path, "wb").write(b"\0" * 100)
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(model, "save_file", full_disk)
        with torch.no_grad():
            next(lrc.parameters()).mul_(2)  # a student that differs from the exported one
        with pytest.raises(OSError, match="No space left"):
            lrc.export(out, tokenizer_dir=tiny_teacher)
    assert tree_state(out) == before and os.listdir(tmp_path) == ["student"]
    lrc.export(out, tokenizer_dir=tiny_teacher)  # now it goes through, replacing the old student whole
    after = tree_state(out)
    assert after.keys() == before.keys() and after["./model.safetensors"] != before["./model.safetensors"]
    assert os.listdir(tmp_path) == ["student"]
