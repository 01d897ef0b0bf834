"""Issue 15: FLOPs, the lazily read loss, regional compilation without recompiles, flags,
and `bench train --stages`."""

import pytest
import torch
from meld_dali.bench.train import (
    STAGE_TRAINABLE,
    bench_train,
    forward_flops,
    parse_stages,
    peak_tflops,
)

from meld_dali.config import load_config
from meld_dali.data.base import SyntheticLoader
from meld_dali.model import build_model
from meld_dali.recipe import EpochStats
from meld_dali.runtime import Runtime, compile_regional
from meld_dali.trainer import Trainer

TINY = ["data.num_frames=4", "data.crop_size=32", "data.short_side=36", "train.batch_size=4",
        "loader.workers=0", "model.hidden=[32, 16]", "tracking.wandb=false"]


@pytest.mark.slow
def test_forward_flops_match_pytorchvideo_zoo():
    """pytorchvideo's zoo: SlowFast R50 8x8 = 65.7 GMACs per view, counted by fvcore (1 per
    MAC) at its test size, 32 frames of 256x256 (3-crop testing). FlopCounterMode counts 2
    FLOPs per MAC: ~131 GFLOPs there. At the training crop (224 px) it is (224/256)^2 of
    that: ~50 GMACs, ~101 GFLOPs. Our head differs slightly from the zoo's."""
    model = build_model(load_config("seed", ["model.pretrained="]).model)
    flops = forward_flops(model, 32, 256, torch.device("cpu"))
    assert flops / 2 / 1e9 == pytest.approx(65.7, rel=0.10)


@pytest.mark.slow
def test_lazy_loss_gives_the_same_epoch_average():
    cfg = load_config("demo", [*TINY, "train.accum_steps=2", "train.epochs=1"])
    loader = SyntheticLoader.random(22, 4, 32, 4)  # 6 batches, the last one short (2 clips)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    trainer = Trainer(cfg, model, loader, loader, [1] * 7, Runtime.resolve(cfg))
    seen = []
    original = trainer.forward_backward

    def spy(batch, scale):
        loss = original(batch, scale)
        assert isinstance(loss, torch.Tensor) and not loss.requires_grad  # no .item() here
        seen.append((loss.item(), len(batch)))
        return loss

    trainer.forward_backward = spy
    trainer.train_one_epoch()
    stats = trainer.take_stats()
    direct = sum(v * n for v, n in seen) / sum(n for _, n in seen)
    assert stats.clips == 22 and stats.pending is None  # flushed at the end of the epoch
    assert stats.as_dict()["train_loss"] == pytest.approx(direct, rel=1e-12)
    state = stats.state_dict()  # checkpoints hold plain data
    assert set(state) == {"loss_sum", "clips", "data_wait", "step_time", "backend_batches",
                          "cpu_redone_batches"}
    assert all(isinstance(v, (int, float)) for v in state.values())
    restored = EpochStats()
    restored.load_state_dict(state)
    assert restored.as_dict() == stats.as_dict()


@pytest.mark.slow
def test_regional_compile_no_recompile_on_short_batch_or_after_unfreeze():
    """aot_eager (traces forward and backward like inductor, no C++ build): an unfreezing
    compiles the graphs whose gradients change once (a new backward is genuinely needed),
    then nothing recompiles; the short last batch never does (dynamic batch dim)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    cfg = load_config("demo", TINY)
    model = build_model(cfg.model)
    model.set_trainable(set())
    keys = set(model.state_dict())
    assert compile_regional(model, "aot_eager") == 32 and compile_regional(model) == 0
    assert set(model.state_dict()) == keys  # checkpoints unaffected

    def step(b):
        video, mask = torch.randn(b, 3, 4, 32, 32), torch.ones(b, 4, dtype=torch.bool)
        model(video, mask).sum().backward()

    def graphs():
        return counters["stats"]["unique_graphs"]

    step(4)
    first = graphs()
    assert first > 0
    step(3)  # the short last batch
    assert graphs() == first
    model.set_trainable({"res5"})
    step(4)
    after = graphs()
    assert 0 < after - first <= 4  # res5's blocks only (2 shapes x 2 pathways)
    step(4)
    step(2)
    assert graphs() == after
    assert "recompile_limit" not in str(dict(counters["unimplemented"]))  # none fell to eager


def test_flags_resolve_on_cpu():
    cpu = torch.device("cpu")
    cfg = load_config("seed")
    assert (cfg.train.compile, cfg.train.cudnn_benchmark) == ("auto", "auto")
    rt = Runtime.resolve(cfg, cpu)
    assert (rt.compile, rt.cudnn_benchmark, rt.channels_last, rt.amp) == (False, False, False, None)
    assert rt.video_dtype == torch.float32 and not rt.fp16_scaling
    rt.apply()
    assert torch.backends.cudnn.benchmark is False
    on = load_config("seed", ["train.compile=true", "train.cudnn_benchmark=true"])
    rt = Runtime.resolve(on, cpu)
    assert rt.compile is True and rt.cudnn_benchmark is False  # no cuDNN on CPU
    # on a GPU (resolving touches no CUDA with compile given): the recipe's AMP everywhere
    cuda = torch.device("cuda")
    for amp, dtype, scaled in (("fp16", torch.float16, True), ("bf16", torch.bfloat16, False)):
        rt = Runtime.resolve(load_config("seed", ["train.compile=false", f"train.amp={amp}"]),
                             cuda)
        assert (rt.amp, rt.video_dtype, rt.fp16_scaling) == (dtype, dtype, scaled)
        assert rt.channels_last and rt.cudnn_benchmark
    off = Runtime.resolve(load_config("seed", ["train.compile=false", "train.amp=off",
                                               "loader.channels_last=false"]), cuda)
    assert (off.amp, off.video_dtype, off.channels_last) == (None, torch.float32, False)
    # a GPU run's half-precision video, evaluated where no autocast runs: fp32 for the model
    half = load_config("seed", ["train.compile=false", "loader.dtype=float16"])
    assert Runtime.resolve(half, cuda).video_dtype == torch.float16
    assert Runtime.resolve(half, cpu).video_dtype == torch.float32
    assert peak_tflops(cpu) is None
    assert parse_stages("all") == ["head", "res5", "res4", "res3"]
    assert STAGE_TRAINABLE["res4"] == {"res4", "res5"} and STAGE_TRAINABLE["head"] == set()
    with pytest.raises(ValueError):
        parse_stages("res2")


@pytest.mark.slow
def test_bench_train_stages_all(synth_root):
    from meld_dali.manifest import Manifest

    cfg = load_config("demo", [*TINY, "train.batch_size=2"])
    report = bench_train(cfg, Manifest.load(synth_root), ["synthetic", "torch"], steps=3,
                         warmup=1, stages=parse_stages("all"))
    rows = report["results"]
    for backend in ("synthetic", "torch"):
        assert [r["stage"] for r in rows if r["backend"] == backend] == list(STAGE_TRAINABLE)
    for r in rows:
        for key in ("clips_per_s", "data_wait_share", "verdict", "fwd_gflops_per_clip",
                    "train_gflops_per_clip", "achieved_tflops", "mfu", "compile_s",
                    "recompiles", "epochs_in_window", "nvdec_util", "nvjpg_util"):
            assert key in r
        assert r["mfu"] is None and r["nvdec_util"] is None  # CPU: no peak, no NVML
        assert 0 < r["epochs_in_window"] <= 1
        assert r["clips"] == 3 * 2 and r["clips_per_s"] > 0  # 3 timed steps of 2 clips
        assert 0 <= r["data_wait_share"] <= 1
    syn = {r["stage"]: r for r in rows if r["backend"] == "synthetic"}
    # head only: no backward through the backbone, fewer FLOPs per clip (exact counts, not
    # timings: which stage runs faster is `meld-dali bench`'s to measure, not a shared CPU's)
    assert syn["head"]["train_gflops_per_clip"] < 0.6 * syn["res3"]["train_gflops_per_clip"]
    # the wait is bounded, not the speed: in-memory batches keep the loop compute-bound
    # (a share, so a busy machine slows both sides of it alike)
    for r in syn.values():
        assert r["data_wait_share"] < 0.5, r
