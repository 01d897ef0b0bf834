import subprocess
import sys

import pytest
import yaml

from meld_dali.config import Config, apply_overrides, dump_config, load_config
from meld_dali.errors import UserError


def test_seed_defaults_are_the_recipe():
    c = Config()
    assert (c.data.num_frames, c.data.crop_size, c.train.batch_size) == (32, 224, 16)
    assert (c.optim.base_lr, c.optim.max_lr, c.optim.weight_decay) == (1e-5, 1e-3, 1e-4)
    assert (c.train.accum_steps, c.optim.grad_clip, c.optim.focal_gamma) == (4, 1.0, 2.0)
    assert c.model.dropout == [0.3, 0.2]
    assert c.train.unfreeze == {3: "res5", 6: "res4", 9: "res3"}
    assert (c.train.patience, c.train.min_epochs, c.train.min_delta) == (10, 25, 0.005)
    # the shipped seed recipe says the same as the defaults
    seed = load_config("seed")
    assert seed.train.unfreeze == c.train.unfreeze and seed.optim == c.optim


def test_overrides_are_typed():
    c = apply_overrides(Config(), ["train.epochs=5", "optim.max_lr=2e-3", "optim.focal_gamma=1",
                                   "tracking.wandb=false", "hub.repo_id=me/meld",
                                   "train.unfreeze={1: res5}", "data.brightness=[0.9, 1.1]",
                                   "train.amp=off", "loader.channels_last=true"])
    assert c.train.epochs == 5 and c.optim.max_lr == 2e-3
    assert isinstance(c.optim.focal_gamma, float) and c.optim.focal_gamma == 1.0
    assert c.tracking.wandb is False and c.hub.repo_id == "me/meld"
    assert c.train.unfreeze == {1: "res5"} and c.data.brightness == [0.9, 1.1]
    assert c.train.amp == "off" and c.loader.channels_last == "true"  # YAML 1.1 booleans


@pytest.mark.parametrize("override, needle", [
    ("train.epochs=five", "train.epochs"),
    ("train.epochs=1.5", "train.epochs"),
    ("tracking.wandb=3", "tracking.wandb"),
    ("train.nope=1", "unknown config key 'train.nope'"),
    ("nope.epochs=1", "unknown config section 'nope'"),
    ("loader.backend=cuda", "loader.backend"),
    ("epochs=1", "section.key"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(UserError, match=None) as e:
        apply_overrides(Config(), [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_yaml_file_and_dump_roundtrip(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  epochs: 3\nmodel:\n  dropout: [0.1, 0.1]\n")
    c = load_config(f, ["train.seed=7"])
    assert (c.train.epochs, c.train.seed, c.model.dropout) == (3, 7, [0.1, 0.1])
    dump_config(c, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again == c
    assert yaml.safe_load((tmp_path / "out.yaml").read_text())["train"]["epochs"] == 3


def test_yaml_unknown_key_names_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epoks: 3\n")
    with pytest.raises(UserError) as e:
        load_config(f)
    assert "bad.yaml" in str(e.value) and "train.epoks" in str(e.value)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "meld_dali", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_cli_surface_and_exit_codes(tmp_path):
    r = cli("--help")
    assert r.returncode == 0
    for cmd in ("synth", "prepare", "train", "evaluate", "predict", "bench"):
        assert cmd in r.stdout
    r = cli("bench", "--help")
    assert "loader" in r.stdout and "train" in r.stdout
    r = cli("train", "--set", "train.epochs=x", "--data", str(tmp_path))
    assert r.returncode == 1 and "train.epochs" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "run"))
    assert r.returncode == 1 and "absent" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", "--no-such-flag")
    assert r.returncode == 2
