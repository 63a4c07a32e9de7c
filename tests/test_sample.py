"""sample.py: greedy parity with transformers, sampling settings against transformers' logits processors, chat
prompts as HF renders them, streaming, model lookup, errors."""
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
import common
import train
from tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_model_dir(request, make_tokenizer_dir, tmp_path_factory):
    """A random transformers model with the tiny ChatML tokenizer, saved as an ordinary HF dir."""
    transformers = pytest.importorskip("transformers")
    tok_dir = make_tokenizer_dir()
    tok = load_tokenizer(tok_dir)
    kw = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              initializer_range=0.2, eos_token_id=tok.eos_id)  # large init: clear argmax margins
    torch.manual_seed(0)
    if request.param == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw, tie_word_embeddings=True))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), path)
    return str(path)


def cfg(**kw):
    return {**sample.DEFAULTS, "temperature": 0.0, "max_new_tokens": 16, **kw}


def test_greedy_matches_transformers(tiny_model_dir, capsys):
    transformers = pytest.importorskip("transformers")
    model, tok, eos = sample.load(tiny_model_dir, "cpu", "float32")
    ids = sample.prompt_ids(tok, "the world and", chat=False)
    new = sample.stream(model, tok, ids, eos, cfg(), out=io.StringIO())

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=sorted(eos),
                      pad_token_id=tok.eos_id)[0, len(ids):].tolist()
    ref = ref[:-1] if ref[-1] in eos else ref  # sample.py leaves the EOS out
    assert new == ref and len(new) > 0

    # the command line prints the prompt, then the same text
    sample.main([f"--model={tiny_model_dir}", "--prompt=the world and", "--temperature=0", "--max_new_tokens=16"])
    out = capsys.readouterr()
    assert out.out == "the world and" + tok.decode(ref) + "\n"
    assert "tokens/s" in out.err


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_model_dir):
    model, tok, eos = sample.load(tiny_model_dir, "cpu", "float32")
    ids = sample.prompt_ids(tok, "", chat=False)
    assert ids == [tok.eos_id]  # an empty prompt starts a document, as packed training data does
    run = lambda seed, **kw: sample.stream(model, tok, ids, eos, cfg(temperature=1.0, **kw),  # noqa: E731
                                           torch.Generator().manual_seed(seed), out=io.StringIO())
    assert run(1) == run(1)
    # top_k 1 without the repetition penalty (which greedy leaves out) is greedy
    assert run(1, top_k=1, repetition_penalty=1.0) == sample.stream(model, tok, ids, eos, cfg(), out=io.StringIO())
    # and with it, greedy under the penalty: sample.py passes --repetition_penalty on
    ids = repeating_prompt(model, tok)
    penalised = [t.item() for t in model.generate(torch.tensor([ids]), 16, repetition_penalty=2.0)]
    penalised = penalised[:next((i for i, t in enumerate(penalised) if t in eos), len(penalised))]
    assert run(1, top_k=1, repetition_penalty=2.0) == penalised != run(1, top_k=1, repetition_penalty=1.0)


def test_chat_prompt_is_rendered_as_hf_does(tiny_model_dir, capsys):
    model, tok, eos = sample.load(tiny_model_dir, "cpu", "float32")
    messages = [{"role": "user", "content": "the world and"}]
    ids = sample.prompt_ids(tok, "the world and", chat=True)
    text = tok.render_chat(messages, add_generation_prompt=True)
    assert tok.decode(ids) == text and text.endswith("<|im_start|>assistant\n")
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids

    # in chat mode only the reply is printed, and it ends at <|im_end|>
    sample.main([f"--model={tiny_model_dir}", "--prompt=the world and", "--chat=True", "--temperature=0",
                 "--max_new_tokens=16"])
    reply = sample.stream(model, tok, ids, eos, cfg(), out=io.StringIO())
    assert capsys.readouterr().out == tok.decode(reply) + "\n"


def test_prompt_from_a_file_or_stdin(tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("In the beginning\n", encoding="utf-8")
    assert sample.read_prompt(f"FILE:{tmp_path / 'p.txt'}") == "In the beginning\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    assert sample.read_prompt("-") == "from stdin" and sample.read_prompt("plain") == "plain"


class Chunks(list):
    def write(self, s):
        self.append(s)

    def flush(self):
        pass


class Replay:
    """Stands in for a model: generate() yields a fixed token sequence."""
    def __init__(self, ids):
        self.ids = ids

    def parameters(self):
        yield torch.zeros(1)

    def generate(self, idx, max_new_tokens, *args, **kw):
        yield from (torch.tensor([i]) for i in self.ids[:max_new_tokens])


def test_stream_prints_only_whole_utf8_characters(tiny_tok):
    text = "the wörld 🙂 and ñ"
    ids = tiny_tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters are split over byte tokens
    out = Chunks()
    new = sample.stream(Replay(ids + [tiny_tok.eos_id, 5]), tiny_tok, [0], {tiny_tok.eos_id}, cfg(), out=out)
    assert new == ids  # stops at EOS, which is not printed
    assert "".join(out) == text + "\n" and not any("\ufffd" in c for c in out)
    assert "" in out  # a token ending inside a character printed nothing until the character was whole


def test_default_is_the_newest_student(tiny_model_dir, tmp_path, monkeypatch, capsys):
    for run, age in (("a", 0), ("b", 100)):  # "a" was exported last
        student = tmp_path / "out" / run / "student"
        shutil.copytree(tiny_model_dir, student)
        os.utime(student / "config.json", (1e9 - age, 1e9 - age))
    monkeypatch.chdir(tmp_path)
    assert sample.resolve_model("") == os.path.join("out", "a", "student")
    assert sample.resolve_model("out/b") == os.path.join("out", "b", "student")  # a finished run's out_dir
    sample.main(["--prompt=the", "--max_new_tokens=4"])
    assert capsys.readouterr().out.startswith("the")


def test_training_checkpoint_samples_as_its_export(tiny_model_dir, tmp_path, capsys):
    c = {**train.DEFAULTS, "teacher": tiny_model_dir, "d_student": 32, "out_dir": str(tmp_path)}
    torch.manual_seed(0)
    lrc = common.build_model(c, "cpu", "float32")
    torch.save({"model": lrc.state_dict(), "config": c, "step": 0}, tmp_path / "ckpt.pt")
    argv = ["--prompt=the world", "--temperature=0", "--max_new_tokens=12"]
    assert sample.resolve_model(str(tmp_path)) == str(tmp_path)  # no student/ yet: the checkpoint
    sample.main([f"--model={tmp_path}"] + argv)
    from_ckpt = capsys.readouterr().out
    lrc.export(str(tmp_path / "student"), tokenizer_dir=tiny_model_dir)
    sample.main([f"--model={tmp_path}"] + argv)  # now the exported student
    assert capsys.readouterr().out == from_ckpt
    sample.main([f"--model={tmp_path / 'ckpt.pt'}"] + argv)
    assert capsys.readouterr().out == from_ckpt


def test_bad_paths_are_clear_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv, msg in (([], "run python demo.py first"), (["--model=nope"], "nope does not exist"),
                      ([f"--model={tmp_path}"], "neither an HF dir")):
        with pytest.raises(SystemExit) as e:
            sample.main(argv + ["--prompt=x"])
        assert e.value.code == 1 and msg in capsys.readouterr().err
    # and from the command line: exit status 1 and one line, no traceback
    r = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--model=nope"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: --model=nope does not exist")
    assert "Traceback" not in r.stderr


@pytest.mark.asset
def test_smollm2_knows_the_capital_of_france(smollm2_dir, capsys):
    sample.main([f"--model={smollm2_dir}", "--prompt=The capital of France is", "--temperature=0",
                 "--max_new_tokens=3"])
    assert capsys.readouterr().out.startswith("The capital of France is Paris")


def test_embedding_rows_beyond_the_tokenizer_are_never_sampled(tiny_tok):
    """Qwen2.5 has 151,936 embedding rows for 151,665 tokens; an undertrained student can put mass on the padding
    rows. Here they get the highest logits of all: sampling and greedy still draw only the tokenizer's ids."""
    from model import ModelConfig, Transformer
    V = tiny_tok.vocab_size
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V + 16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16)).init_weights(0.2)

    class PaddedHead(torch.nn.Module):  # the tokenizer's logits, then 16 padding rows above all of them
        def __init__(self, head):
            super().__init__()
            self.head, self.weight = head, head.weight

        def forward(self, h):
            logits = self.head(h)[..., :V]
            return torch.cat([logits, logits.new_full((*logits.shape[:-1], 16), 1e4)], -1)
    model.lm_head = PaddedHead(model.lm_head)
    assert model(torch.tensor([[1, 2]]))[0][0, -1].argmax() >= V  # the padding rows would win unmasked
    for temperature in (0.0, 1.0):
        new = sample.stream(model, tiny_tok, [tiny_tok.eos_id], {tiny_tok.eos_id}, cfg(temperature=temperature),
                            torch.Generator().manual_seed(0), out=io.StringIO())
        assert new and max(new) < V


def test_sampling_draws_tokens_with_the_softmax_probabilities():
    from model import sample_next
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    p = np.exp(logits.numpy() - logits.numpy().max())
    p /= p.sum()  # the reference distribution, computed apart from torch
    n = 20000
    draws = sample_next(logits.expand(n, -1), temperature=1.0, generator=torch.Generator().manual_seed(0))
    freq = np.bincount(draws.numpy(), minlength=6) / n
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-3), (freq, p)
    top3 = sample_next(logits.expand(n, -1), temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    freq3 = np.bincount(top3.numpy(), minlength=6) / n
    assert freq3[3:].sum() == 0 and np.all(np.abs(freq3[:3] - p[:3] / p[:3].sum()) < 0.02)


def test_repetition_penalty_is_transformers():
    """model.penalise against transformers' RepetitionPenaltyLogitsProcessor: random logits of both signs,
    histories with repeated tokens, penalties above and below 1."""
    transformers = pytest.importorskip("transformers")
    from model import penalise
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 40, generator=g)
    ids = torch.randint(0, 40, (6, 15), generator=g)  # 15 draws of 40: repeats in every row
    for penalty in (1.1, 1.5, 0.8):
        ref = transformers.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        torch.testing.assert_close(penalise(logits, ids, penalty), ref, rtol=0, atol=0)
        changed = penalise(logits, ids, penalty) != logits
        assert changed.sum() == sum(len(set(r.tolist())) for r in ids)  # exactly the seen tokens
    assert penalise(logits, ids, 1.0) is logits


def test_sampling_draws_from_transformers_temperature_and_top_p():
    """sample.py's defaults (repetition penalty, temperature, top_p; top_k off) through model.py's penalise and
    sample_next: the draws' frequencies are the probabilities transformers' RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper and TopPLogitsWarper give, applied in transformers' order; tokens they cut are
    never drawn."""
    transformers = pytest.importorskip("transformers")
    from model import penalise, sample_next
    c = sample.DEFAULTS
    assert (c["temperature"], c["top_k"], c["top_p"], c["repetition_penalty"]) == (0.7, 0, 0.9, 1.1)
    g = torch.Generator().manual_seed(3)
    n, V = 20000, 12
    for row in range(3):
        logits, ids = 1.5 * torch.randn(1, V, generator=g), torch.randint(0, V, (1, 5), generator=g)
        ref = transformers.RepetitionPenaltyLogitsProcessor(c["repetition_penalty"])(ids, logits.clone())
        ref = transformers.TemperatureLogitsWarper(c["temperature"])(ids, ref)
        ref = transformers.TopPLogitsWarper(c["top_p"])(ids, ref)
        p = ref.softmax(-1)[0].double().numpy()
        assert 1 < (p > 0).sum() < V  # the nucleus cuts some tokens and keeps several
        draws = sample_next(penalise(logits, ids, c["repetition_penalty"]).expand(n, -1), c["temperature"],
                            c["top_k"] or None, c["top_p"], torch.Generator().manual_seed(row))
        freq = np.bincount(draws.numpy(), minlength=V) / n
        assert np.all(freq[p == 0] == 0), (freq, p)
        assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-3), (freq, p)


def repeating_prompt(model, tok):
    """A prompt after which plain greedy repeats one of the prompt's own tokens (a prompt, then the model's
    greedy text up to its first repeat): there the penalty acts on the first new token, through the prompt."""
    for base in ([tok.eos_id], sample.prompt_ids(tok, "the world and the world", chat=False)):
        g = torch.cat(list(model.generate(torch.tensor([base]), 16))).tolist()
        k = next((k for k in range(len(g)) if g[k] in base + g[:k]), None)
        if k is not None:
            return base + g[:k]
    raise AssertionError("no repeat in greedy text: choose another prompt")


def test_generate_with_a_repetition_penalty_matches_transformers(tiny_model_dir):
    """The penalty covers the prompt and every token made so far, as in transformers' generate."""
    transformers = pytest.importorskip("transformers")
    model, tok, eos = sample.load(tiny_model_dir, "cpu", "float32")
    ids = repeating_prompt(model, tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    runs = {}
    for penalty in (1.0, 2.0):
        ours = torch.cat(list(model.generate(torch.tensor([ids]), 16, repetition_penalty=penalty))).tolist()
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=16, do_sample=False, repetition_penalty=penalty, eos_token_id=None,
                          pad_token_id=tok.eos_id)[0, len(ids):].tolist()  # the mask: the prompt's EOS is no pad
        assert ours == ref, penalty
        runs[penalty] = ours
    assert runs[1.0][0] in ids and runs[2.0][0] != runs[1.0][0]  # the prompt's tokens were penalised


def test_settings_and_seed_are_printed(tiny_model_dir, capsys):
    argv = [f"--model={tiny_model_dir}", "--prompt=the world and", "--max_new_tokens=8"]
    sample.main(argv + ["--seed=5"])
    first = capsys.readouterr()
    assert first.err.startswith("[sampling: temperature 0.7, top_k 0, top_p 0.9, repetition_penalty 1.1, "
                                "seed 5]\n"), first.err
    sample.main(argv + ["--seed=5"])
    assert capsys.readouterr().out == first.out  # the printed seed draws the same sample again
    sample.main(argv + ["--temperature=0"])
    assert capsys.readouterr().err.startswith("[greedy]\n")
