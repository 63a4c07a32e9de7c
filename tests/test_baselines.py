"""
The baselines (baselines.py) against plain computations, and in train.py's loop as users run them (subprocesses,
CPU, fp32, config/tiny.py): VanillaKD, TinyBERT, LM-only from scratch and SFT with the loss mask.

    python -m pytest tests/test_baselines.py          # ≈20 s on 2 idle cores, most of it four short runs
"""
import dataclasses
import json
import math
import os
import random

import pytest
import torch

import common
import train
from baselines import LMOnly, TinyBERT, VanillaKD, layer_map, student_config
from data import Batches, prepare
from losses import distill_losses
from lrc import LowRankClone
from model import ModelConfig, Transformer, rope_cos_sin
from test_train import metrics, train_py, write_text
from tokenizer import load_tokenizer

TEACHER = ModelConfig(model_type="qwen2", vocab_size=120, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                      tie_word_embeddings=True)


def make_teacher(cfg=TEACHER, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).init_weights(std=0.2)


def batch(seed=1, B=2, T=12, V=120):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def all_trained(module):
    """Every parameter got a gradient (DDP refuses dead ones) and the teacher is not part of the module."""
    return all(p.grad is not None for p in module.parameters()) and \
        not any(k.startswith("teacher") for k in module.state_dict())


# -----------------------------------------------------------------------------
# the modules

@pytest.mark.parametrize("alpha_kl", [0.3, 0.0, 1.0])  # 0: pure LM (the fused head once divided by it)
def test_vanilla_kd_is_the_weighted_plain_loss(alpha_kl):
    """alpha_kl * KL + (1 - alpha_kl) * LM through the fused head = the same from whole logits, gradients too."""
    teacher = make_teacher()
    kd = VanillaKD(teacher, student_config(TEACHER, 16), alpha_kl=alpha_kl, temperature=2.0,
                   kl_reduction="token")
    idx, tgt = batch()
    tgt[0, 4] = -100
    loss, parts = kd(idx, tgt)
    grads = torch.autograd.grad(loss, list(kd.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    kl, lm = distill_losses(kd.model(idx)[0], teacher(idx)[0].detach(), tgt, 2.0, "token")
    ref = alpha_kl * kl + (1 - alpha_kl) * lm
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(parts["kl"], kl.detach())
    torch.testing.assert_close(parts["lm"], lm.detach())
    for (n, _), g, r in zip(kd.named_parameters(), grads, torch.autograd.grad(ref, list(kd.parameters()))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=n)
    kd.zero_grad()
    kd(idx, tgt)[0].backward()
    assert all_trained(kd) and kd.config.hidden_size == 16


def test_attention_probs_path_equals_sdpa():
    """The explicit softmax path TinyBERT asks for gives SDPA's outputs: full causal, and a prefill after cached
    tokens (the mask offset); its probabilities are causal and sum to 1."""
    model = make_teacher()
    x = torch.randn(2, 12, 48)
    cos, sin = rope_cos_sin(model.inv_freq, 0, 12)
    with torch.no_grad():
        for layer in model.layers:
            acts = {"attn_probs": None}
            torch.testing.assert_close(layer(x, cos, sin, 0, acts), layer(x, cos, sin, 0))
            p = acts["attn_probs"]
            assert p.shape == (2, 4, 12, 12) and torch.equal(p, p.tril())
            torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 12))
        attn, outs = model.layers[0].self_attn, []
        for acts in (None, {"attn_probs": None}):
            model.setup_cache(2, 12)
            attn(x[:, :5], *rope_cos_sin(model.inv_freq, 0, 5), 0)
            outs.append(attn(x[:, 5:], *rope_cos_sin(model.inv_freq, 5, 7), 5, acts))
        model.setup_cache(None, 0)
    torch.testing.assert_close(outs[1], outs[0])
    assert acts["attn_probs"].shape == (2, 4, 7, 12)


def test_tinybert_student_equal_to_the_teacher_has_zero_feature_losses():
    teacher = make_teacher()
    tb = TinyBERT(teacher, student_config(TEACHER, 48), temperature=2.0)
    assert tb.layer_map == [0, 1, 2] and len(tb.hidden_maps) == 4  # the embeddings and every layer
    with torch.no_grad():
        tb.model.load_state_dict(teacher.state_dict())
        for m in tb.hidden_maps:
            m.weight.copy_(torch.eye(48))
    idx, tgt = batch()
    _, parts = tb(idx, tgt)
    assert parts["hidden"] < 1e-10 and parts["attn"] < 1e-10 and abs(parts["kl"]) < 1e-5
    torch.testing.assert_close(parts["lm"], teacher(idx, tgt)[1].detach())


def test_tinybert_shallower_student_trains_every_parameter():
    teacher = make_teacher(dataclasses.replace(TEACHER, num_hidden_layers=6))
    tb = TinyBERT(teacher, dataclasses.replace(TEACHER, hidden_size=16, num_hidden_layers=3))
    assert tb.layer_map == [1, 3, 5]
    loss, parts = tb(*batch())
    loss.backward()
    assert set(parts) == {"kl", "lm", "hidden", "attn"} and all(torch.isfinite(v) for v in parts.values())
    assert all_trained(tb)
    assert layer_map(8, 28) == [3, 6, 10, 13, 17, 20, 24, 27] and layer_map(4, 2) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="heads"):
        TinyBERT(teacher, dataclasses.replace(TEACHER, hidden_size=16, num_attention_heads=2, num_key_value_heads=2))


def test_lrc_without_clone_terms():
    """The no-clone ablation: L = L_KL + L_LM, and every projection still trained."""
    lrc = LowRankClone(make_teacher(), 16, clone_terms=())
    loss, parts = lrc(*batch())
    loss.backward()
    assert set(parts) == {"kl", "lm", "clone"} and parts["clone"] == 0
    torch.testing.assert_close(loss.detach(), parts["kl"] + parts["lm"])
    assert all(p.grad is not None for p in lrc.parameters())


def test_student_configs_and_bad_input(tmp_path):
    assert student_config(TEACHER, 24) == dataclasses.replace(TEACHER, hidden_size=24)
    Transformer(dataclasses.replace(TEACHER, hidden_size=24)).save_pretrained(str(tmp_path / "s"))
    for path in (tmp_path / "s", tmp_path / "s" / "config.json"):
        assert student_config(TEACHER, 999, str(path)) == dataclasses.replace(TEACHER, hidden_size=24)
    teacher = make_teacher()
    with pytest.raises(ValueError, match="vocab"):
        VanillaKD(teacher, dataclasses.replace(TEACHER, vocab_size=100))
    with pytest.raises(ValueError, match="alpha_kl"):
        VanillaKD(teacher, TEACHER, alpha_kl=1.5)
    with pytest.raises(ValueError, match="kl_reduction"):
        TinyBERT(teacher, TEACHER, kl_reduction="mean")


def test_sft_loss_is_the_cross_entropy_of_assistant_tokens(tiny_teacher, tmp_path):
    """A two-turn chat prepared with --mask: train.xy masks the targets, and LMOnly's loss is the mean CE over
    exactly the assistant tokens (content and end-of-turn), found here from the rendered prefixes."""
    tok = load_tokenizer(tiny_teacher)
    chat = [{"role": "user", "content": "the world"}, {"role": "assistant", "content": "and the light"},
            {"role": "user", "content": "or the night"}, {"role": "assistant", "content": "water"}]
    (tmp_path / "chat.jsonl").write_text(2 * (json.dumps({"messages": chat}) + "\n"))
    prepare(tok, [{"path": str(tmp_path / "chat.jsonl"), "field": "messages"}], str(tmp_path / "bin"),
            val_fraction=0.5, seed=0, mask=True)  # seed 0 sends one copy to each split
    ids = tok.encode(tok.render_chat(chat)) + [tok.eos_id]
    targets = set()  # positions t whose target ids[t + 1] is an assistant token
    for k in (1, 3):
        start = len(tok.encode(tok.render_chat(chat[:k], add_generation_prompt=True)))
        n = len(tok.encode(chat[k]["content"])) + 1  # + <|im_end|>
        assert tok.decode(ids[start:start + n]) == chat[k]["content"] + "<|im_end|>"
        targets |= set(range(start - 1, start - 1 + n))
    T = len(ids) - 1  # one window: the whole chat
    x, y = train.xy(Batches(str(tmp_path / "bin"), 1, T, seed=0).get_batch("train", 0))
    assert x[0].tolist() == ids[:-1] and [t for t in range(T) if y[0, t] != -100] == sorted(targets)
    model = Transformer.from_pretrained(tiny_teacher)
    with torch.no_grad():
        logits = model(x)[0][0].double()
        loss, _ = LMOnly(model)(x, y)
    by_hand = sum(math.log(logits[t].exp().sum()) - logits[t, ids[t + 1]] for t in targets) / len(targets)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


# -----------------------------------------------------------------------------
# in train.py's loop

@pytest.fixture(scope="module")
def text_data(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    prepare(load_tokenizer(tiny_teacher), [{"path": write_text(root / "a.txt")}], str(root / "bin"), val_fraction=0.1)
    return str(root / "bin")


@pytest.fixture(scope="module")
def chat_data(tiny_teacher, tmp_path_factory):
    """60 two-turn chats prepared with the loss mask (SFT)."""
    root, rnd = tmp_path_factory.mktemp("chat"), random.Random(0)
    words = "the and world in a or he an light day night earth water heaven".split()
    say = lambda: " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12)))  # noqa: E731
    with open(root / "chat.jsonl", "w") as f:
        for _ in range(60):
            f.write(json.dumps({"messages": [{"role": r, "content": say()} for r in ("user", "assistant") * 2]}) + "\n")
    prepare(load_tokenizer(tiny_teacher), [{"path": str(root / "chat.jsonl"), "field": "messages"}],
            str(root / "bin"), val_fraction=0.1, mask=True)
    return str(root / "bin")


RUNS = {"kd": ["--method=kd", "--alpha_kl=0.5", "--temperature=1.0", "--kl_reduction=token"],
        "tinybert": ["--method=tinybert"],
        "lm": ["--method=lm"],
        "sft": ["--method=sft", "--init_from={teacher}", "--teacher=", "--lr=1e-3"]}


@pytest.fixture(scope="module")
def run(tiny_teacher, text_data, chat_data, tmp_path_factory):
    """run(method) -> out_dir of a finished 6-step run of config/tiny.py, once per module."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def go(method):
        if method not in done:
            out = str(root / method)
            data = chat_data if method == "sft" else text_data
            args = [a.format(teacher=tiny_teacher) for a in RUNS[method]]
            r = train_py(f"--teacher={tiny_teacher}", f"--data_dir={data}", f"--out_dir={out}", *args)
            assert r.returncode == 0, r.stderr[-3000:]
            done[method] = out
        return done[method]
    return go


@pytest.mark.parametrize("method", RUNS)
def test_runs_and_learns(run, method):
    rows = metrics(run(method))
    evals = [r for r in rows if "val_loss" in r]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6] and [r["step"] for r in steps] == [2, 4, 6]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # the same val batches before and after
    assert steps[-1]["loss"] < steps[0]["loss"]
    # no teacher, no teacher metrics
    assert ("teacher_val_loss" in evals[0]) == (method in ("kd", "tinybert"))
    if method == "tinybert":
        assert {"kl", "lm", "hidden", "attn"} <= steps[0].keys()


@pytest.mark.parametrize("method", ["kd", "sft"])
def test_export_reloads_with_the_same_logits(run, tiny_teacher, method):
    out = run(method)
    exported = Transformer.from_pretrained(os.path.join(out, "student"))
    rebuilt, cfg = common.load_student(out)
    assert exported.config == rebuilt.config and exported.config.hidden_size == (16 if method == "kd" else 48)
    idx = torch.randint(0, 271, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(idx)[0], rebuilt(idx)[0])
    assert load_tokenizer(os.path.join(out, "student")).vocab_size == 271  # the tokenizer travels along


def test_sft_needs_masked_data_and_a_model(tiny_teacher, text_data, tmp_path):
    r = train_py(f"--data_dir={text_data}", f"--out_dir={tmp_path}/a", "--method=sft", f"--init_from={tiny_teacher}")
    assert r.returncode == 1 and "with data.py --mask" in r.stderr and "Traceback" not in r.stderr
    r = train_py(f"--teacher={tiny_teacher}", f"--data_dir={text_data}", f"--out_dir={tmp_path}/b", "--method=sft")
    assert r.returncode == 1 and "set --init_from" in r.stderr and "Traceback" not in r.stderr


def test_kd_from_a_given_student(tmp_path):
    """kd with init_from: the student starts as the given model (here LRC's init 'pca' student, exported), not
    from scratch; a student of another vocabulary is refused."""
    teacher = make_teacher()
    start = LowRankClone(teacher, 24, init="pca", calibration=batch(seed=3, B=4)[0]).student(torch.float32)
    kd = VanillaKD(teacher, start.config, model=start)
    idx, tgt = batch()
    with torch.no_grad():
        assert torch.equal(kd.student()(idx)[0], start(idx)[0])
    kd(idx, tgt)[0].backward()
    assert all_trained(kd)
    other = Transformer(dataclasses.replace(start.config, vocab_size=100))
    with pytest.raises(ValueError, match="vocab"):
        VanillaKD(teacher, other.config, model=other)
