"""eval.py: our lm-eval LM against lm-eval's own hf backend on a local task, text metrics, one-line errors."""
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

import eval as ev  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["the", "world", "and", "an", "or", "he", "in", "a", "ant", "tower", "hand", "word", "wind"]


@pytest.fixture(scope="module")
def hf_dir(make_tokenizer_dir, tmp_path_factory):
    """A random transformers Qwen2 (q/k/v bias, tied) with the tiny ChatML tokenizer, saved as an HF dir."""
    import transformers
    tok_dir = make_tokenizer_dir()
    tok = load_tokenizer(tok_dir)
    cfg = transformers.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, initializer_range=0.2, eos_token_id=tok.eos_id,
                                   tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf = transformers.Qwen2ForCausalLM(cfg)
    path = tmp_path_factory.mktemp("qwen2")
    hf.save_pretrained(path)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), path)
    return str(path)


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three local lm-eval tasks (YAML + JSONL, dataset_path json): multiple choice with 4 choices of 1-4 words,
    whole texts (loglikelihood_rolling, some longer than the model's context of 128), greedy generation."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("tasks")
    mc = [{"question": sentence(rng, rng.randint(3, 12)) + ":",
           "choices": [" " + sentence(rng, rng.randint(1, 4)) for _ in range(4)], "answer": rng.randrange(4)}
          for _ in range(24)]
    texts = [{"text": sentence(rng, rng.choice([5, 40, 150]))} for _ in range(6)]
    gen = [{"question": sentence(rng, rng.randint(2, 8)), "answer": "the"} for _ in range(6)]
    too_long = [{"question": sentence(rng, 200) + ":", "choices": [" the", " and"], "answer": 0}]
    for name, rows in (("mc", mc), ("text", texts), ("gen", gen), ("long", too_long)):
        (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path / name}.jsonl\n"  # noqa
                         "test_split: test\n")
    mc_yaml = ("output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
               "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (path / "mc.yaml").write_text("task: tiny_mc\n" + data("mc") + mc_yaml)
    (path / "long.yaml").write_text("task: tiny_long\n" + data("long") + mc_yaml)
    (path / "text.yaml").write_text("task: tiny_text\n" + data("text") + "output_type: loglikelihood_rolling\n"
                                    "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
                                    "  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (path / "gen.yaml").write_text("task: tiny_gen\n" + data("gen") + "output_type: generate_until\n"
                                   "doc_to_text: '{{question}}'\ndoc_to_target: answer\n"
                                   "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 12\n  do_sample: false\n"
                                   "metric_list:\n  - metric: exact_match\n")
    return str(path)


def run_both(hf_dir, task_dir, task, batch_size=8):
    """The same task through our LM and lm-eval's hf backend: (ours, hf) lm-eval results."""
    from lm_eval.models.huggingface import HFLM
    cfg = {**ev.DEFAULTS, "include_path": task_dir, "batch_size": batch_size}
    tm = ev._task_manager(cfg)
    model, tok, eos = ev.load_checked(hf_dir, "cpu", "float32")
    ours, _ = ev.run_tasks(ev.make_lm(model, tok, eos, ev.adds_bos(hf_dir), batch_size), [task], cfg, tm)
    hf = HFLM(pretrained=hf_dir, device="cpu", dtype="float32", batch_size=batch_size)
    theirs, _ = ev.run_tasks(hf, [task], cfg, tm)
    return ours, theirs


def test_multiple_choice_matches_lm_eval_hf(hf_dir, task_dir):
    ours, theirs = run_both(hf_dir, task_dir, "tiny_mc")
    a, b = ev.per_item(ours, "tiny_mc"), ev.per_item(theirs, "tiny_mc")
    assert len(a) == len(b) == 24 and all(len(x) == 4 for x in a)
    diff = ev.max_loglik_diff(a, b)
    print(f"tiny_mc: max |loglik diff| {diff:.2e}, acc {ours['results']['tiny_mc']['acc,none']:.4f}")
    assert diff <= 1e-4
    assert [[x[1] for x in r] for r in a] == [[y[1] for y in r] for r in b]  # is_greedy too
    for m in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][m] == theirs["results"]["tiny_mc"][m]


def test_rolling_loglikelihood_matches_lm_eval_hf(hf_dir, task_dir):
    ours, theirs = run_both(hf_dir, task_dir, "tiny_text", batch_size=4)
    a, b = ev.per_item(ours, "tiny_text"), ev.per_item(theirs, "tiny_text")
    diff = ev.max_loglik_diff(a, b)
    print(f"tiny_text: max |loglik diff| {diff:.2e} (texts of up to ~300 tokens, context 128)")
    assert diff <= 1e-3  # sums over hundreds of tokens: 1e-4 per token-sized item
    assert ours["results"]["tiny_text"]["bits_per_byte,none"] == pytest.approx(
        theirs["results"]["tiny_text"]["bits_per_byte,none"], rel=1e-5)


def test_greedy_generation_matches_lm_eval_hf(hf_dir, task_dir):
    ours, theirs = run_both(hf_dir, task_dir, "tiny_gen", batch_size=1)
    a, b = ev.per_item(ours, "tiny_gen"), ev.per_item(theirs, "tiny_gen")
    assert a == b and any(r[0] for r in a)  # the same text, not all empty


def test_shared_context_scoring_equals_one_pair_at_a_time(hf_dir):
    """score() runs a question's context once for all its choices; the result must not depend on the batching."""
    model, tok, _ = ev.load_checked(hf_dir, "cpu", "float32")
    rng = random.Random(1)
    pairs = []
    for _ in range(6):
        ctx = tok.encode(sentence(rng, rng.randint(1, 6)))
        pairs += [(ctx, tok.encode(" " + sentence(rng, rng.randint(1, 3)))) for _ in range(3)]
    batched = ev.score(model, pairs, batch_size=64, max_length=128)
    alone = [ev.score(model, [p], batch_size=1, max_length=128)[0] for p in pairs]
    full = []
    for ctx, cont in pairs:  # the plain way: one forward of context + continuation
        logits = model(torch.tensor([ctx + cont[:-1]]))[0][0, len(ctx) - 1:].float().log_softmax(-1)
        full.append(logits.gather(-1, torch.tensor(cont)[:, None]).sum().item())
    for (x, gx), (y, gy), z in zip(batched, alone, full):
        assert abs(x - y) < 1e-4 and abs(x - z) < 1e-4 and gx == gy


def test_command_prints_the_table_and_writes_json(hf_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    ev.main([f"--model={hf_dir}", f"--teacher={hf_dir}", "--tasks=tiny_mc", f"--include_path={task_dir}",
             "--limit=8", f"--output_path={out}"])
    text = capsys.readouterr().out
    assert "| task | metric | teacher | student | student/teacher |" in text
    assert "| tiny_mc | acc |" in text and "| **average** |" in text and "100.0%" in text
    report = json.loads(out.read_text())
    assert report["tasks"]["tiny_mc"]["student"] == report["tasks"]["tiny_mc"]["teacher"]
    assert report["lm_eval"]["student"]["n-samples"]["tiny_mc"]["effective"] == 8


def test_check_hf_alternates_rounds(hf_dir, task_dir, tmp_path, capsys):
    report = ev.main([f"--model={hf_dir}", "--tasks=tiny_mc", f"--include_path={task_dir}", "--limit=8",
                      "--check_hf=True", "--check_rounds=2", f"--output_path={tmp_path / 'r.json'}"])["check_hf"]
    assert report["rounds"] == 2 and len(report["ours_s"]) == len(report["hf_s"]) == 2
    assert report["speedup"] == pytest.approx(sum(report["speedup_per_round"]) / 2)  # the median of two
    assert report["tasks"]["tiny_mc"]["max_abs_diff"] <= 1e-4
    assert "2 alternating rounds, medians" in capsys.readouterr().out


def test_text_metrics(hf_dir, tmp_path, capsys):
    f = tmp_path / "held_out.txt"
    f.write_text(sentence(random.Random(2), 300))
    report = ev.main([f"--model={hf_dir}", f"--teacher={hf_dir}", f"--text={f}", "--block_size=64",
                      f"--output_path={tmp_path / 'r.json'}"])
    row = report["text"][str(f)]
    assert row["kl"] == pytest.approx(0.0, abs=1e-5) and row["agreement"] == 1.0  # a model against itself
    assert row["student_loss"] == pytest.approx(row["teacher_loss"])
    assert row["student_bpb"] == pytest.approx(row["student_loss"] * row["tokens"] / math.log(2) / row["bytes"])
    # the loss equals the model's own loss over the same windows
    model, tok, _ = ev.load_checked(hf_dir, "cpu", "float32")
    ids = torch.tensor([tok.eos_id] + tok.encode(f.read_text()))
    nll = sum(model(ids[None, i:i + 65][:, :-1], ids[None, i + 1:i + 65])[1].item() * len(ids[i + 1:i + 65])
              for i in range(0, len(ids) - 1, 64))
    assert row["student_loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert "held_out.txt" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors(hf_dir, task_dir, tmp_path, capsys):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(hf_dir, "config.json"), no_weights)
    small = tmp_path / "small_vocab"  # a model whose embedding has fewer rows than the tokenizer has tokens
    shutil.copytree(hf_dir, small)
    from model import Transformer
    m = Transformer.from_pretrained(hf_dir)
    m.embed_tokens.weight.data = m.embed_tokens.weight.data[:200]
    m.config.vocab_size = 200
    m.lm_head.weight = m.embed_tokens.weight
    m.save_pretrained(str(small))
    foreign = tmp_path / "foreign_tokenizer"  # same vocabulary size, but the model's EOS id is an ordinary token
    shutil.copytree(hf_dir, foreign)
    cfg = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 7}))
    inc = f"--include_path={task_dir}"
    cases = [
        ([f"--model={foreign}", "--tasks=tiny_mc", inc], "is not a special token of its tokenizer"),
        ([f"--model={no_weights}", "--tasks=tiny_mc", inc], "no model.safetensors"),
        ([f"--model={small}", "--tasks=tiny_mc", inc], "the tokenizer does not belong to this model"),
        ([f"--model={hf_dir}", "--tasks=tiny_long", inc], "but the model's context is 128 tokens"),
        ([f"--model={hf_dir}", "--tasks=tiny_mc", f"--include_path={tmp_path / 'nope'}"], "is not a directory"),
        ([f"--model={hf_dir}"], "nothing to evaluate"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and err[-1].startswith("error: ") and msg in err[-1], err
    # from the command line: exit status 1, the error as the last line, no traceback
    r = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), f"--model={hf_dir}", "--tasks=tiny_mcq", inc],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown task 'tiny_mcq'; did you mean tiny_mc")


def test_training_checkpoint_evaluates_as_its_export(hf_dir, task_dir, tmp_path):
    import common
    import train
    c = {**train.DEFAULTS, "teacher": hf_dir, "d_student": 32, "out_dir": str(tmp_path)}
    torch.manual_seed(0)
    lrc = common.build_model(c, "cpu", "float32")
    torch.save({"model": lrc.state_dict(), "config": c, "step": 0}, tmp_path / "ckpt.pt")
    argv = ["--tasks=tiny_mc", f"--include_path={task_dir}", "--limit=6", f"--output_path={tmp_path / 'r.json'}"]
    from_ckpt = ev.main([f"--model={tmp_path / 'ckpt.pt'}"] + argv)["lm_eval"]["student"]["results"]
    lrc.export(str(tmp_path / "student"), tokenizer_dir=hf_dir)
    from_export = ev.main([f"--model={tmp_path}"] + argv)  # a finished run: its student/
    assert from_export["model"] == str(tmp_path / "student")
    assert from_export["lm_eval"]["student"]["results"]["tiny_mc"]["acc,none"] == from_ckpt["tiny_mc"]["acc,none"]
