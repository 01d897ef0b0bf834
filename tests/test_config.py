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


@pytest.mark.slow  # real processes end to end: seconds each
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


# ----------------------------------------------------------------------------- validation
# Every case goes through the real CLI (`meld_dali.cli.main`, in-process for speed) on
# `train --demo`: exit 1, one line on stderr naming the key, no traceback, and nothing
# synthesized or trained (the config fails in load_config).

BAD_VALUES = [
    # data
    ("data.num_frames", "0"), ("data.crop_size", "0"), ("data.flip_p", "2"),
    ("data.rotate_deg", "-5"), ("data.brightness", "[1.2, 0.8]"), ("data.contrast", "[0.9]"),
    ("data.brightness", "[0, 1]"), ("data.mean", "[0.5, 0.5]"), ("data.std", "[0.2, 0, 0.2]"),
    ("data.source", "webm"), ("data.rotate_interp", "cubic"), ("data.train_split", "val"),
    ("data.crop_size", "40"),  # > data.short_side (36 in demo)
    ("data.num_frames", "6"),  # not a multiple of model.alpha (4)
    # loader
    ("loader.backend", "cuda"), ("loader.workers", "-1"), ("loader.workers", "1.5"),
    ("loader.workers", "many"), ("loader.verify", "maybe"), ("loader.prefetch", "0"),
    ("loader.channels_last", "maybe"), ("loader.dtype", "int8"),
    # model
    ("model.alpha", "0"), ("model.hidden", "[32]"), ("model.dropout", "[0.5, 1.0]"),
    ("model.num_classes", "8"), ("model.name", "resnet"),
    # optim
    ("optim.max_lr", "-1"), ("optim.warmup_pct", "1.5"), ("optim.warmup_pct", "0"),
    ("optim.base_lr", "0.1"),  # > optim.max_lr (5e-3 in demo)
    ("optim.focal_gamma", "-1"), ("optim.betas", "[0.9, 1.5]"), ("optim.grad_clip", "0"),
    ("optim.weight_decay", "-1"), ("optim.anneal", "step"), ("optim.class_weights", "x"),
    ("optim.max_lr", ".nan"),
    # train
    ("train.accum_steps", "0"), ("train.batch_size", "0"), ("train.epochs", "0"),
    ("train.epochs", "1.5"), ("train.unfreeze", "{-1: res5}"), ("train.unfreeze", "{1: res9}"),
    ("train.unfreeze", "{1: res5, 2: res5}"), ("train.min_epochs", "-1"),
    ("train.patience", "0"), ("train.amp", "fp8"), ("train.amp", "on"),
    ("train.compile", "maybe"), ("train.device", "gpu"), ("train.seed", "-1"),
    ("train.freeze_backbone", "3"), ("train.keep_last", "-1"),
    # tracking, hub
    ("tracking.log_every", "0"), ("tracking.progress_every", "0"), ("tracking.mode", "cloud"),
    ("tracking.wandb", "3"),
    ("tracking.sample_predictions", "-1"), ("hub.retries", "-1"), ("hub.push", "always"),
    ("hub.repo_id", "a b"),
    # unknown names
    ("train.nope", "1"), ("nope.epochs", "1"),
]


def run_main(capfd, *args) -> tuple[int, str]:
    from meld_dali.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capfd.readouterr().err


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_bad_value_is_one_line_naming_the_key(key, value, capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run that got through would write runs/ here
    code, err = run_main(capfd, "train", "--demo", "--set", f"{key}={value}",
                         "--out", str(tmp_path / "run"))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert key.split(".")[0] in lines[0] and "Traceback" not in err
    if not key.startswith("nope"):
        assert f"'{key}" in lines[0], lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "run").exists()


def test_errors_say_value_and_what_is_allowed():
    for override, needle in [
        ("train.accum_steps=0", "--set: config key 'train.accum_steps' = 0: must be greater "
                                "than or equal to 1"),
        ("optim.base_lr=0.1", "config key 'optim.base_lr' = 0.1: must be <= optim.max_lr"),
        ("data.crop_size=300", "'data.crop_size' = 300: must be <= data.short_side (256)"),
        ("data.num_frames=30", "'data.num_frames' = 30: must be a multiple of model.alpha (4)"),
        ("loader.backend=cuda", "must be 'auto', 'dali-gpu', 'dali-cpu' or 'torch'"),
        ("train.unfreeze={1: res6}", "'train.unfreeze[1]' = 'res6': must be 'stem', 'res2'"),
        ("train.unfreeze={-1: res5}", "'train.unfreeze' has key -1"),
        ("data.brightness=[1.2]", "'data.brightness' = [1.2]: must have exactly 2 items"),
    ]:
        with pytest.raises(UserError) as e:
            load_config(None, [override])
        assert needle in str(e.value), str(e.value)


def test_yaml_error_names_file_and_line(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text("data:\n  num_frames: 8\n  crop_size: 300\ntrain:\n  epochs: 3\n")
    with pytest.raises(UserError) as e:
        load_config(f)
    assert str(e.value).startswith(f"{f}:3: config key 'data.crop_size' = 300")
    f.write_text("train:\n  epochs: 3\n")  # the file is fine; the override is not
    with pytest.raises(UserError, match="^--set: config key 'train.epochs' = 0"):
        load_config(f, ["train.epochs=0"])


def test_yaml_1_1_quirks(tmp_path):
    f = tmp_path / "q.yaml"
    f.write_text("train:\n  amp: off\n  compile: false\n  unfreeze:\nloader:\n"
                 "  channels_last: true\noptim:\n  max_lr: 2e-3\nhub:\n  repo_id: 123\n"
                 "tracking:\n")
    c = load_config(f, ["hub.repo_id=456"])
    assert (c.train.amp, c.train.compile, c.loader.channels_last) == ("off", "false", "true")
    assert c.optim.max_lr == 2e-3 and c.hub.repo_id == "456" and c.train.unfreeze == {}
    assert load_config(f).hub.repo_id == "123"


def test_shipped_recipes_and_fixture_validate(tiny_cfg):
    from meld_dali.config import builtin_config_path, config_from_saved

    names = [p.stem for p in builtin_config_path("seed").parent.glob("*.yaml")]
    assert {"seed", "demo"} <= set(names)
    for name in names:
        c = load_config(name)
        assert config_from_saved(c.to_dict()) == c
    assert config_from_saved(tiny_cfg.to_dict()) == tiny_cfg
    assert Config().model_dump() == Config().to_dict()


def test_to_dict_keeps_the_saved_format():
    d = Config().to_dict()
    assert list(d) == ["data", "loader", "model", "optim", "train", "tracking", "hub"]
    assert d["train"]["unfreeze"] == {3: "res5", 6: "res4", 9: "res3"}
    assert all(type(k) is int for k in d["train"]["unfreeze"])
    assert type(d["data"]["brightness"]) is list and type(d["optim"]["base_lr"]) is float
    assert d["loader"]["channels_last"] == "auto" and d["train"]["compile"] == "auto"
    assert d["train"]["amp"] == "fp16" and d["tracking"]["wandb"] is True


def test_saved_configs_load(tmp_path):
    from meld_dali.checkpoint import config_mismatch
    from meld_dali.config import config_from_saved

    cur = Config().to_dict()
    assert config_from_saved(cur) == Config()
    old = Config().to_dict()
    old["train"].update(amp=False, compile=True)  # YAML 1.1 style, as an old run saved it
    old["loader"]["channels_last"] = False
    old["optim"]["max_lr"] = "2e-3"
    del old["hub"]  # a section this version added: defaults
    old["train"]["retired_key"] = 1  # a key this version dropped: ignored
    c = config_from_saved(old)
    assert (c.train.amp, c.train.compile, c.loader.channels_last) == ("off", "true", "false")
    assert c.optim.max_lr == 2e-3 and c.hub == Config().hub
    assert config_mismatch(config_from_saved(cur).to_dict(), cur) == []
    bad = Config().to_dict()
    bad["train"]["batch_size"] = 0
    with pytest.raises(UserError, match="^ck.pt: config key 'train.batch_size' = 0"):
        config_from_saved(bad, where="ck.pt")


def test_assignment_is_validated_and_copies_stay_mutable():
    import copy

    from pydantic import ValidationError

    c = Config()
    c.data.root = "/some/where"
    with pytest.raises(ValidationError):
        c.train.batch_size = 0
    with pytest.raises(ValidationError):
        c.data.crop_size = 300  # > short_side 256
    d = copy.deepcopy(c)
    d.train.max_steps_per_epoch, d.train.accum_steps, d.tracking.wandb = 3, 1, False
    assert c.train.accum_steps == 4 and d.train.accum_steps == 1 and d.data.root == "/some/where"


def test_short_runs_are_allowed_with_a_note(caplog):
    """train.epochs may grow on resume (checkpoint.RESUMABLE_CHANGES), so a stage scheduled
    past the end, or min_epochs past the end, is valid: it is said, not refused."""
    c = load_config("seed", ["train.epochs=2"])
    assert c.train.unfreeze == {3: "res5", 6: "res4", 9: "res3"}
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "never unfreeze" in said and "early stopping cannot act" in said


def test_choices_have_one_source():
    from meld_dali import config, meld, model
    from meld_dali.cli import Backend
    from meld_dali.data import select

    assert config.BACKENDS == ("dali-gpu", "dali-cpu", "torch") == select.BACKENDS
    assert config.SOURCES == ("video", "frames", "cache")
    assert config.STAGES == model.STAGES and config.SPLITS == meld.SPLITS
    assert [b.value for b in Backend] == ["auto", *config.BACKENDS]


@pytest.mark.parametrize("args, code", [
    (["bench", "loader", "--batch-size", "0"], 2),
    (["bench", "loader", "--workers", "-1"], 2),
    (["bench", "loader", "--batches", "0"], 2),
    (["bench", "loader", "--repeats", "0"], 2),
    (["bench", "loader", "--soak-epochs", "-1"], 2),
    (["bench", "train", "--steps", "0"], 2),
    (["bench", "train", "--warmup", "0"], 2),
    (["synth", "OUT", "--clips", "3"], 2),
    (["prepare", "ROOT", "--workers", "0"], 2),
    (["prepare", "ROOT", "--short-side", "0"], 2),
    (["evaluate", "CKPT", "--views", "0x3"], 1),
    (["evaluate", "CKPT", "--views", "3"], 1),
    (["evaluate", "CKPT", "--split", "val"], 1),
    (["synth", "OUT", "--size", "15x16"], 1),
])
def test_cli_options_are_checked(args, code, capfd, tmp_path):
    args = [str(tmp_path / a) if a.isupper() else a for a in args]
    got, err = run_main(capfd, *args)
    assert got == code and "Traceback" not in err, err
    if code == 1:
        assert len(err.strip().splitlines()) == 1 and args[-2] in err
    assert not any(tmp_path.iterdir())


def test_cli_usage_error_in_a_real_process():
    r = cli("bench", "loader", "--batch-size", "0")
    assert r.returncode == 2 and "--batch-size" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", "--demo", "--set", "optim.warmup_pct=1.5")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --set: config key 'optim.warmup_pct' = 1.5: must be less than 1"]
