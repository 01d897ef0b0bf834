"""`meld-dali` command line (typer + rich). Exit 0 ok, 1 user error (one line), 2 bad usage.

Only argument parsing and printing live here; the work is in the modules it calls.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from meld_dali.config import BACKENDS, SPLITS
from meld_dali.errors import UserError
from meld_dali.signals import Interrupted, install_cli_handlers, stop_with_launcher

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="GPU-fed (NVIDIA DALI) SlowFast training for video emotion recognition "
                       "on MELD.")
bench_app = typer.Typer(no_args_is_help=True, help="Throughput benchmarks.")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)
out = Console()


class Codec(str, Enum):
    h264 = "h264"
    vp9 = "vp9"
    mjpeg = "mjpeg"


class CacheCodec(str, Enum):
    auto = "auto"
    h264 = "h264"
    mjpeg = "mjpeg"


# loader.backend's choices, from the config's Literal (one source)
Backend = Enum("Backend", {n.replace("-", "_"): n for n in ("auto", *BACKENDS)}, type=str)


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


@app.command()
def synth(out_dir: Path = typer.Argument(..., help="folder to write the dataset into"),
          clips: int = typer.Option(300, min=21, help="labelled clips over all splits "
                                    "(at least 21: every class in every split)"),
          codec: Codec = typer.Option(Codec.h264, help="video codec"),
          size: str = typer.Option("64x48", help="frame size WxH (even numbers)"),
          seed: int = typer.Option(0, help="random seed (same seed, same dataset)"),
          faults: bool = typer.Option(False, "--faults", help="add MELD's kinds of defects")):
    """Write a synthetic dataset in MELD's raw layout."""
    from meld_dali.synth import SynthSpec
    from meld_dali.synth import synth as make

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {size!r}: expected WxH, e.g. 64x48") from None
    if w % 2 or h % 2 or w < 16 or h < 16:
        raise UserError(f"--size {size}: width and height must be even and at least 16")
    with progress() as p:
        info = make(out_dir, SynthSpec(clips=clips, codec=codec.value, width=w, height=h,
                                       seed=seed, faults=faults), progress=p)
    n = {s: sum(c.values()) for s, c in info["splits"].items()}
    console.print(f"wrote {sum(n.values())} clips ({n}) to {out_dir}"
                  + (f"; faults: {', '.join(info['faults'])}" if faults else ""))


@app.command("prepare")
def prepare_cmd(root: Path = typer.Argument(..., help="MELD root (MELD.Raw unpacked)"),
                out_dir: Path = typer.Option(None, "--out", help="manifest folder (default ROOT)"),
                frames: Path = typer.Option(None, help="extract JPEG frame folders here"),
                short_side: int = typer.Option(256, min=16, help="frame folders and cache: "
                                               "shorter side in px"),
                workers: int = typer.Option(2, min=1,
                                            help="parallel probe/extract/encode processes"),
                cache: Path = typer.Option(None, help="build a train-ready clip cache here "
                                           "(every clip re-encoded at --short-side)"),
                cache_codec: CacheCodec = typer.Option(
                    CacheCodec.auto, help="cache codec: h264 (what NVDEC reads) or mjpeg (what "
                    "the CPU loaders read fastest, 8x the disk); auto = h264 where dali-gpu "
                    "runs, else mjpeg")):
    """Probe every labelled clip and write the manifest (and optionally frame folders
    and a re-encoded clip cache)."""
    from meld_dali.prepare import prepare
    from meld_dali.tables import print_report

    with progress() as p:
        _, report = prepare(root, out_dir, frames, short_side, workers, progress=p,
                            cache=cache, cache_codec=cache_codec.value)
    print_report(report, out)


@app.command()
def train(config: Path = typer.Option(None, help="YAML recipe (or built-in: seed, demo)"),
          data: Path = typer.Option(None, help="prepared MELD root or manifest"),
          demo: bool = typer.Option(False, "--demo", help="small recipe on synthetic data"),
          set_: list[str] = typer.Option([], "--set", help="override: section.key=value"),
          resume: str = typer.Option(None, help="auto (latest in --out) or a checkpoint path"),
          out_dir: Path = typer.Option(None, "--out", help="run folder (default runs/<time>)"),
          backend: Backend = typer.Option(None, help="loader backend (overrides config)")):
    """Train SlowFast R50 on MELD (or, with --demo, on synthetic data)."""
    from meld_dali.config import load_config

    overrides = list(set_)
    if backend is not None:
        overrides.append(f"loader.backend={backend.value}")
    if data is not None:
        overrides.append(f"data.root={data}")
    cfg = load_config(config if config else ("demo" if demo else None), overrides)
    from meld_dali.launch import run_training  # after the config is checked: torch is slow

    if demo and not cfg.data.root:
        cfg.data.root = str(demo_data(Path("runs") / "demo-data"))
    run_dir = out_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    # no --config named: a resumed run takes its checkpoint's config (with these overrides),
    # so the resume command the trainer prints always works
    result = run_training(cfg, run_dir, resume=resume, console=console,
                          overrides=None if config else overrides)
    if result["interrupted"] or os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 says it
        raise typer.Exit(0)
    console.print(f"done in {result['seconds']:.0f}s: best dev weighted F1 "
                  f"{result['best_weighted_f1']:.4f}; run folder {result['run_dir']}")
    from meld_dali.tables import run_summary

    for part in run_summary(result["history"], result["run_dir"]):
        console.print(part, highlight=False)


def demo_data(root: Path) -> Path:
    """Synthesize (once) and prepare the demo dataset (under torchrun: rank 0 only)."""
    from meld_dali.distributed import from_env
    from meld_dali.launch import open_manifest, wait_for_manifest
    from meld_dali.synth import SynthSpec
    from meld_dali.synth import synth as make

    if not from_env().main:  # the other ranks wait for rank 0's data
        wait_for_manifest(root)
        return root
    if not (root / "synth.json").exists():
        console.print(f"[bold]demo: synthesizing a small MELD-shaped dataset in {root}")
        with progress() as p:
            make(root, SynthSpec(clips=400, seed=0), progress=p)
    open_manifest(root, console)
    return root


@app.command()
def evaluate(checkpoint: Path = typer.Argument(..., help="checkpoint file"),
             data: Path = typer.Option(None, help="prepared MELD root (default: the run's)"),
             split: str = typer.Option("dev", help="dev or test (or train)"),
             backend: Backend = typer.Option(Backend.auto, help="loader backend"),
             views: str = typer.Option("", help="multi-view testing TEMPORALxSPATIAL, e.g. 3x3"),
             device: str = typer.Option("auto", help="auto | cpu | cuda"),
             json_out: Path = typer.Option(None, "--json", help="write results as JSON"),
             png: Path = typer.Option(None, help="confusion matrix PNG")):
    """Score a checkpoint on a split (accuracy, F1s, per class, confusion, baseline)."""
    from meld_dali.bench.common import write_json
    from meld_dali.inference import evaluate as run
    from meld_dali.inference import load_for_inference
    from meld_dali.metrics import plot_confusion
    from meld_dali.tables import evaluation_table

    if split not in SPLITS:
        raise UserError(f"--split {split!r}: choose dev or test (or train)")
    from meld_dali.inference import parse_views

    mv = parse_views(views) if views else None
    from meld_dali.progress import PassProgress

    loaded = load_for_inference(checkpoint, device)
    bar = PassProgress(console, loaded.cfg.tracking.progress_every)
    result = run(loaded, data, split, backend.value, mv, progress=bar)
    out.print(evaluation_table(result))
    if json_out:
        write_json(result, json_out)
        console.print(f"wrote {json_out}")
    if png:
        plot_confusion(result["confusion"], png, f"{split}, {checkpoint.name}")
        console.print(f"wrote {png}")


@app.command()
def predict(checkpoint: Path = typer.Argument(..., help="checkpoint file"),
            videos: list[Path] = typer.Argument(..., help="video files (mp4, avi, webm, ...)"),
            device: str = typer.Option("auto", help="auto | cpu | cuda"),
            as_json: bool = typer.Option(False, "--json", help="print a JSON list")):
    """Predict the emotion of video files. Exit 1 if any file could not be read."""
    import json

    from meld_dali.inference import load_for_inference, predict_file
    from meld_dali.progress import PassProgress, iterate
    from meld_dali.tables import prediction_table

    loaded = load_for_inference(checkpoint, device)
    bar = PassProgress(console, loaded.cfg.tracking.progress_every) if len(videos) > 1 else None
    results = [predict_file(loaded, v) for v in iterate(videos, bar, "predict")]
    if as_json:
        print(json.dumps(results, indent=1))
    else:
        out.print(prediction_table(results, f"predictions of {checkpoint.name}", out.width))
    for r in results:
        if "error" in r:
            console.print(f"[red]error:[/red] {r['path']}: {r['error']}", highlight=False,
                          soft_wrap=True)
    if any("error" in r for r in results):
        raise typer.Exit(1)


@app.command()
def doctor(data: Path = typer.Option(None, help="a prepared MELD root: verify its first clips"),
           out_dir: Path = typer.Option(Path("runs"), "--out", help="where runs would go"),
           json_out: Path = typer.Option(None, "--json", help="write everything as JSON")):
    """What this machine can run, and proof that each loader backend delivers what the
    CPU reference does. Exit 1 with one line per failure."""
    from meld_dali.bench.common import write_json
    from meld_dali.doctor import render, run_doctor

    with console.status("doctor") as status:
        rep = run_doctor(data, out_dir, say=status.update)
    for part in render(rep):
        out.print(part, highlight=False)
    if json_out:
        console.print(f"wrote {write_json(rep, json_out)}")
    for line in rep["failures"]:
        console.print(f"[red]failed:[/red] {escape(line)}", highlight=False, soft_wrap=True)
    if not rep["ok"]:
        raise typer.Exit(1)


def save_report(report: dict, kind: str, precision: str, json_out: Path | None,
                save: bool) -> None:
    from meld_dali.bench.common import result_path, write_json

    paths = []
    if json_out:
        paths.append(write_json(report, json_out))
    if save:
        paths.append(write_json(report, result_path(kind, precision, report["env"])))
    for p in paths:
        console.print(f"wrote {p}")


PEERS_HELP = ("other tools doing the same work, side by side: all, none or any of seed, "
              "pytorchvideo, torchcodec (extras: pip install -e \".\\[peers]\")")


@bench_app.command("loader")
def bench_loader(data: Path = typer.Option(None, help="prepared root (default: synth data)"),
                 backends: str = typer.Option("dali-gpu,dali-cpu,torch", help="comma list"),
                 sources: str = typer.Option("video,frames,cache",
                                             help="any of video, frames, cache"),
                 batches: int = typer.Option(10, min=1, help="timed batches per repeat"),
                 repeats: int = typer.Option(3, min=1, help="timed repeats (median reported)"),
                 batch_size: int = typer.Option(8, min=1, help="clips per batch"),
                 workers: int = typer.Option(2, min=0, help="DataLoader workers = DALI threads"),
                 config: Path = typer.Option(None, help="recipe for data settings (seed)"),
                 set_: list[str] = typer.Option([], "--set", help="override: section.key=v"),
                 json_out: Path = typer.Option(None, "--json", help="write results as JSON"),
                 plot: Path = typer.Option(None, help="write a bar chart PNG"),
                 save: bool = typer.Option(False, "--save", help="also write bench/results/"),
                 soak_epochs: int = typer.Option(0, min=0, help="memory soak: full epochs per "
                                                 "backend, memory per epoch"),
                 warmup: int = typer.Option(None, min=0, help="least warm-up batches "
                                            "(default: what the loader prefetches, plus 1)"),
                 quick: bool = typer.Option(False, "--quick", help="small fast data set "
                                            "(smoke tests, CI) instead of MELD-shaped 720p"),
                 peers: str = typer.Option("all", help=PEERS_HELP),
                 views_per_decode: str = typer.Option("1", help="comma list: training "
                                                      "samples per decoded clip, e.g. 1,2")):
    """Loader throughput per backend on the same manifest, beside the peers."""
    from meld_dali.bench.data import bench_manifest
    from meld_dali.bench.loader import bench_loader as run
    from meld_dali.bench.loader import plot as draw
    from meld_dali.bench.loader import render_table
    from meld_dali.config import load_config

    peer_list = _peers(peers)
    cfg = load_config(config or "seed", [*set_, f"loader.workers={workers}"])
    manifest, dataset = bench_manifest(data, cfg.data.short_side, quick, console, progress)
    with progress() as p:
        report = run(manifest, cfg.data, cfg.loader, _split(backends), _split(sources),
                     batches=batches, repeats=repeats, batch_size=batch_size, progress=p,
                     soak_epochs=soak_epochs, warmup=warmup, dataset=dataset,
                     peers=peer_list, views=_counts(views_per_decode, "--views-per-decode"))
    out.print(render_table(report))
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)
    save_report(report, "loader", "uint8-fp32", json_out, save)
    if plot:
        draw(report, plot)
        console.print(f"wrote {plot}")


def _counts(text: str, option: str) -> list[int]:
    try:
        counts = [int(x) for x in _split(text)]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"{option} {text!r}: expected a comma list of counts >= 1, e.g. 1,2")
    return counts


@bench_app.command("train")
def bench_train(data: Path = typer.Option(None, help="prepared root (default: synth data)"),
                backends: str = typer.Option("synthetic,dali-gpu,dali-cpu,torch"),
                steps: int = typer.Option(5, min=1, help="timed optimizer steps"),
                warmup: int = typer.Option(2, min=1,  # 0 would mean a full epoch
                                           help="warm-up steps (compilation included)"),
                source: str = typer.Option("auto", help="auto|video|frames|cache"),
                config: Path = typer.Option(None, help="recipe (default: seed)"),
                set_: list[str] = typer.Option([], "--set", help="override: section.key=v, "
                                               "e.g. train.amp=bf16 train.compile=false"),
                json_out: Path = typer.Option(None, "--json", help="write results as JSON"),
                save: bool = typer.Option(False, "--save", help="also write bench/results/"),
                quick: bool = typer.Option(False, "--quick", help="small fast data set "
                                           "(smoke tests, CI) instead of MELD-shaped 720p"),
                stages: str = typer.Option("res3", help="recipe stages: all, or any of "
                                           "head,res5,res4,res3 (one row per loader and stage)"),
                ab: bool = typer.Option(False, "--ab", help="side by side: eager vs compiled, "
                                        "channels_last vs contiguous, fp16 vs bf16"),
                peers: str = typer.Option("none", help=PEERS_HELP)):
    """Trainer step throughput, TFLOP/s, MFU and data-wait share per loader and stage."""
    from meld_dali.bench.train import bench_train as run
    from meld_dali.bench.train import bench_train_ab, parse_stages, render_table
    from meld_dali.config import load_config

    try:
        stage_list = parse_stages(stages)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--stages") from None
    peer_list = _peers(peers)
    cfg = load_config(config or "seed", [*set_, "model.pretrained="])
    from meld_dali.bench.data import bench_manifest

    manifest, dataset = (bench_manifest(data, cfg.data.short_side, quick, console, progress)
                         if set(_split(backends)) - {"synthetic"} or peer_list
                         else (None, None))
    with progress() as p:
        report = (bench_train_ab if ab else run)(
            cfg, manifest, _split(backends), steps=steps, warmup=warmup, source=source,
            progress=p, dataset=dataset, stages=stage_list, peers=peer_list,
            **({"quick": quick} if ab else {}))
    out.print(render_table(report))
    save_report(report, "train", report["settings"]["amp"], json_out, save)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _peers(text: str) -> list:
    from meld_dali.bench.peers import parse_peers

    try:
        return parse_peers(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--peers") from None


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("wandb", "urllib3", "matplotlib", "PIL", "fsspec", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # SIGINT/SIGTERM outside training (prepare, synth, bench, a run being assembled): one
    # line, finished work kept; training installs its own (finish the step, save, exit 0)
    install_cli_handlers()
    stop_with_launcher()  # a rank under torchrun: a stop when the launcher dies
    try:
        app(args=argv, standalone_mode=True)
    except UserError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Interrupted as e:  # what was finished is kept: the same command resumes
        console.print(f"interrupted ({e}): finished work is kept; run the same command to "
                      "continue", highlight=False, soft_wrap=True)
        sys.exit(130 if str(e) == "SIGINT" else 143)


if __name__ == "__main__":
    main()
