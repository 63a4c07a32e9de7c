"""Config errors are caught before a run starts: python -m pytest -q tests/test_configurator.py"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from configurator import ConfigError, configure, configure_or_exit

DEFAULTS = dict(batch_size=8, block_size=256, learning_rate=6.7e-5, grad_clip=1.0,
                compile=False, out_dir="out", init_from=None, betas=(0.9, 0.999))


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_untouched_and_copied():
    config = configure(DEFAULTS, [])
    assert config == DEFAULTS and config is not DEFAULTS


def test_command_line_values():
    config = configure(DEFAULTS, ["--batch_size=4", "--learning_rate=1e-4", "--betas=(0.9, 0.95)",
                                  "--init_from=resume", "--out_dir=2024"])
    assert config["batch_size"] == 4 and config["learning_rate"] == 1e-4
    assert config["betas"] == (0.9, 0.95)
    assert config["init_from"] == "resume"  # None default: anything, bare word kept as str
    assert config["out_dir"] == "2024"  # str default: the text as given
    assert DEFAULTS["batch_size"] == 8  # the caller's dict is never modified


def test_unknown_key_on_command_line_suggests_closest():
    with pytest.raises(ConfigError, match="learning_rate"):
        configure(DEFAULTS, ["--learning_rat=1e-4"])


def test_unknown_key_in_config_file_suggests_closest(tmp_path):
    path = write(tmp_path, "batch_sise = 16\n")
    with pytest.raises(ConfigError) as e:
        configure(DEFAULTS, [path])
    assert "batch_sise" in str(e.value) and "batch_size" in str(e.value) and path in str(e.value)


def test_wrong_type_names_key_and_types(tmp_path):
    with pytest.raises(ConfigError) as e:
        configure(DEFAULTS, ["--batch_size=2.5"])
    assert "batch_size" in str(e.value) and "int" in str(e.value) and "float" in str(e.value)
    with pytest.raises(ConfigError, match="block_size.*int.*str"):
        configure(DEFAULTS, [write(tmp_path, "block_size = '1024'\n")])
    with pytest.raises(ConfigError, match="batch_size.*int.*bool"):
        configure(DEFAULTS, ["--batch_size=True"])  # bool is an int subclass, but not a batch size


def test_int_for_float_is_converted():
    config = configure(DEFAULTS, ["--grad_clip=1", "--learning_rate=0"])
    assert config["grad_clip"] == 1.0 and isinstance(config["grad_clip"], float)
    assert isinstance(config["learning_rate"], float)


@pytest.mark.parametrize("text, expected", [("true", True), ("True", True), ("1", True),
                                            ("false", False), ("False", False), ("0", False)])
def test_bool_parsing(text, expected):
    assert configure(DEFAULTS, [f"--compile={text}"])["compile"] is expected


def test_bool_rejects_other_values():
    with pytest.raises(ConfigError, match="compile"):
        configure(DEFAULTS, ["--compile=yes"])


def test_list_key_collects_repeated_values(tmp_path):
    defaults = dict(source=[], seed=1)
    config = configure(defaults, ["--source=a.txt", "--seed=2", "--source=b.jsonl:budget=2B"])
    assert config["source"] == ["a.txt", "b.jsonl:budget=2B"]  # in order, each text as given
    assert defaults["source"] == []  # the default's list is never appended to
    assert configure(defaults, ["--source=1e3"])["source"] == ["1e3"]  # not parsed as a number
    path = write(tmp_path, "source = ['x.txt', 'y.txt']\n")
    assert configure(defaults, [path, "--source=z.txt"])["source"] == ["x.txt", "y.txt", "z.txt"]
    with pytest.raises(ConfigError, match="source.*list.*str"):
        configure(defaults, [write(tmp_path, "source = 'x.txt'\n", name="one.py")])
    grow = write(tmp_path, "source += ['w.txt']\n", name="grow.py")  # in place, in the file
    assert configure(defaults, [grow])["source"] == ["w.txt"] and defaults["source"] == []


def test_config_file_computes_from_other_keys_and_argv_order(tmp_path):
    path = write(tmp_path, """
        import math
        _tokens_per_step = 8192
        block_size = 1024
        batch_size = _tokens_per_step // block_size  # sees the value set on the line above
        learning_rate = learning_rate * math.sqrt(4)  # and the value before this file ran
    """)
    config = configure(DEFAULTS, ["--block_size=64", path, "--compile=true"])
    assert config["batch_size"] == 8 and config["block_size"] == 1024
    assert config["learning_rate"] == pytest.approx(2 * 6.7e-5) and config["compile"] is True
    assert configure(DEFAULTS, [path, "--block_size=64"])["block_size"] == 64  # later wins


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.py")
    with pytest.raises(ConfigError, match="nope.py"):
        configure(DEFAULTS, [missing])


def test_error_inside_config_file_reports_its_line(tmp_path):
    path = write(tmp_path, "batch_size = 4\nblock_size = undefined_name\n")
    with pytest.raises(ConfigError, match=r"cfg\.py:2: NameError"):
        configure(DEFAULTS, [path])


def test_malformed_argument():
    with pytest.raises(ConfigError, match="--key=value"):
        configure(DEFAULTS, ["--batch_size", "4"])


def test_configure_or_exit_prints_and_exits_2(tmp_path):
    script = write(tmp_path, "from configurator import configure_or_exit\n"
                             "print(configure_or_exit(dict(warmup=0.1)))\n", name="script.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, script, "--warmup=0.5"], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0 and run.stdout.strip() == "{'warmup': 0.5}"
    run = subprocess.run([sys.executable, script, "--warmpu=0.5"], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 2 and "did you mean 'warmup'" in run.stderr and run.stdout == ""


def test_help_lists_every_key_and_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        configure_or_exit(DEFAULTS, ["config/x.py", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f"--{k}={v!r}" in out for k, v in DEFAULTS.items())
