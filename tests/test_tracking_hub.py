"""W&B (real, offline) and HF Hub (a recording stand-in for HfApi: the Hub is unreachable)."""

import hashlib
import io
import logging
import shutil

import pytest
import torch

from meld_dali import hub
from meld_dali.checkpoint import load_checkpoint
from meld_dali.config import HubConfig
from meld_dali.launch import run_training


@pytest.fixture(scope="module")
def trained_run(synth_root, tmp_path_factory):
    from meld_dali.config import load_config

    cfg = load_config("demo", [
        "data.num_frames=4", "train.batch_size=4", "train.epochs=2", "loader.workers=0",
        "model.hidden=[32, 16]", "loader.backend=torch", "train.max_steps_per_epoch=2",
        f"data.root={synth_root}", "tracking.wandb=true", "tracking.mode=offline",
        "train.keep_last=2"])
    run = tmp_path_factory.mktemp("wb") / "run"
    result = run_training(cfg, run)
    yield run, result
    shutil.rmtree(run.parent)  # five ~400 MB checkpoints: gone once the module is done


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics(trained_run):
    run, _ = trained_run
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (b"train/loss_avg", b"train/lr", b"train/grad_norm", b"dev/weighted_f1",
                b"dev/confusion", b"dev/predictions", b"curves"):
        assert key in data, key
    assert b"focal_gamma" in data  # the config went in too


@pytest.mark.slow
def test_keep_last_keeps_k_step_copies(trained_run):
    run, _ = trained_run
    assert len(list((run / "checkpoints").glob("step*.pt"))) == 2


class RecordingApi:
    """Stands in for huggingface_hub.HfApi (no Hub here); fails the first `fail` calls."""

    def __init__(self, fail=0, token="hf_test"):
        self.token, self.fail = token, fail
        self.commits, self.repos = [], []

    def create_repo(self, repo_id, private, exist_ok):
        self.repos.append((repo_id, private))

    def create_commit(self, repo_id, operations, commit_message):
        if self.fail:
            self.fail -= 1
            raise ConnectionError("network down")
        files = {}
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                files[op.path_in_repo] = f.read()
        self.commits.append((repo_id, files, commit_message))


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_hub_push_is_one_commit_with_the_expected_files(trained_run):
    run, _ = trained_run
    api = RecordingApi(fail=1)
    waits = []
    ok = hub.push(HubConfig(repo_id="me/meld-sf"), run, api=api, sleep=waits.append)
    assert ok and waits == [2] and len(api.commits) == 1
    repo, files, msg = api.commits[0]
    assert repo == "me/meld-sf" and set(files) == {"model.pt", "config.yaml", "metrics.json",
                                                   "README.md"}
    card = files["README.md"].decode()
    assert "weighted F1" in card and "all-neutral" in card and "neutral" in card
    model = torch.load(io.BytesIO(files["model.pt"]), weights_only=True)  # plain data
    assert "optimizer" not in model and "rng" not in model and model["emotions"][0] == "neutral"
    assert set(model["model"]) == set(load_checkpoint(run / "checkpoints" / "best.pt")["model"])
    # nothing local is published: no data root, no run folder, no home
    data_root = load_checkpoint(run / "checkpoints" / "best.pt")["config"]["data"]["root"]
    assert data_root and model["config"]["data"]["root"] == ""
    for name, content in files.items():
        for local in (data_root, str(run), str(run.parents[2])):
            assert local.encode() not in content, (name, local)


@pytest.mark.slow
def test_hub_failure_never_touches_local_files(trained_run, caplog):
    run, _ = trained_run
    before = {p.name: digest(p) for p in (run / "checkpoints").glob("*.pt")}
    with caplog.at_level(logging.WARNING):
        ok = hub.push(HubConfig(repo_id="me/x", retries=3), run, api=RecordingApi(fail=9),
                      sleep=lambda s: None)
    assert not ok and "failed after 3 tries" in caplog.text
    assert before == {p.name: digest(p) for p in (run / "checkpoints").glob("*.pt")}


@pytest.mark.slow
def test_hub_without_token_is_skipped_with_one_line(trained_run, caplog, monkeypatch):
    run, _ = trained_run
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(run / "no-hf-home"))
    api = RecordingApi(token=None)
    with caplog.at_level(logging.WARNING):
        assert hub.push(HubConfig(repo_id="me/x"), run, api=api) is False
    assert "no Hugging Face token" in caplog.text and not api.commits


def test_best_push_runs_in_the_background_and_coalesces():
    """hub.push=best: the push runs in a worker thread (rank 0 never blocks in end_epoch
    while other ranks wait in a collective); a best arriving while a push is queued rides
    on it; join() waits for the pushes; a failing push never raises into training."""
    import threading

    started, release, calls = threading.Event(), threading.Event(), []

    def slow_push():
        calls.append(threading.current_thread().name)
        started.set()
        assert release.wait(10)
        return True

    bg = hub.BackgroundPush(slow_push)
    bg()  # returns at once although the push blocks
    assert started.wait(10) and not release.is_set()
    bg()  # queued behind the running push
    bg()  # coalesced: the queued push will read the newest best.pt
    release.set()
    bg.join()
    assert bg.results == [True, True] and all(n.startswith("hub-push") for n in calls)
    failing = hub.BackgroundPush(lambda: 1 / 0)
    failing()
    failing.join()
    assert failing.results == [False]
