"""Every recipe in config/ trains the same global batch and the same number of tokens on 1, 2, 4 and 8
ranks: it states tokens_per_step and max_tokens, and train.resolve_batch derives grad_accum and
max_steps from them for the world size at hand. Config files are read as train.py reads them
(configurator over train.DEFAULTS); ablation overlays are read on top of each LRC recipe. A demo
recipe (lrc_demo_gpu.py) is read as demo.py reads it: on top of lrc_demo.py, with demo.py's keys."""
import glob
import os

import pytest

import train
from configurator import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "config", "*.py")))
OVERLAYS = [c for c in CONFIGS if os.path.basename(c).startswith("ablation_")]
NOT_RECIPES = {"tiny.py"}  # the tests' fixture, which sets grad_accum on purpose (its header says why)
RECIPES = [c for c in CONFIGS if c not in OVERLAYS and os.path.basename(c) not in NOT_RECIPES]
WORLDS = (1, 2, 4, 8)
DEMO_OVERLAYS = {"lrc_demo_gpu.py"}  # read on top of lrc_demo.py, by demo.py


def read(recipe):
    """A recipe's config as the script that runs it reads it."""
    if os.path.basename(recipe) in DEMO_OVERLAYS:
        import demo
        return configure({**train.DEFAULTS, **demo.DEMO_KEYS},
                         [os.path.join(ROOT, "config", "lrc_demo.py"), recipe])
    return configure(train.DEFAULTS, [recipe])


def budget(cfg, world, name):
    """(tokens per optimizer step, total tokens) that train.py runs cfg with on `world` ranks. A recipe
    whose micro-batch is more than one rank's share of a step (the CPU demo's 8 sequences on 2+ ranks) is
    refused there with what to do, and runs the same budget once batch_size is lowered as it asks."""
    share = cfg["tokens_per_step"] // (cfg["block_size"] * world)  # sequences per rank per step
    if 0 < share < cfg["batch_size"]:
        with pytest.raises(ValueError, match="choose a batch_size or a number of processes"):
            train.resolve_batch(cfg, world)
        cfg = {**cfg, "batch_size": share}
    try:
        resolved, tokens_per_step = train.resolve_batch(cfg, world)
    except ValueError as e:
        pytest.fail(f"{name} cannot run on {world} ranks: {e}")
    return tokens_per_step, tokens_per_step * resolved["max_steps"]


def test_the_glob_sees_the_recipes():
    names = {os.path.basename(c) for c in RECIPES}
    assert {"lrc_qwen.py", "lrc_llama.py", "kd_qwen.py", "sft_llama.py"} <= names, names
    assert OVERLAYS


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_a_recipe_trains_the_same_tokens_on_any_number_of_ranks(recipe):
    name = os.path.basename(recipe)
    cfg = read(recipe)
    stated, total = cfg["tokens_per_step"], cfg["max_tokens"]
    assert stated > 0 and total > 0, f"{name}: state tokens_per_step and max_tokens, not grad_accum " \
                                     "and max_steps (those change with the number of ranks)"
    for world in WORLDS:
        # the stated batch, and the stated total rounded down to whole steps (max_tokens // step)
        assert budget(cfg, world, name) == (stated, total - total % stated), (name, world)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=os.path.basename)
def test_an_ablation_keeps_its_recipes_budget(overlay):
    recipes = [r for r in RECIPES if os.path.basename(r) not in DEMO_OVERLAYS
               and configure(train.DEFAULTS, [r])["method"] == "lrc"]
    assert recipes
    for recipe in recipes:
        name = f"{os.path.basename(recipe)} + {os.path.basename(overlay)}"
        alone, both = configure(train.DEFAULTS, [recipe]), configure(train.DEFAULTS, [recipe, overlay])
        assert both["out_dir"] != alone["out_dir"], name  # an ablation never writes over its recipe's run
        for world in WORLDS:
            assert budget(both, world, name) == budget(alone, world, name), (name, world)
