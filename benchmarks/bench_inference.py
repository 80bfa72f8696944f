"""CPU inference: throughput, memory, what the allocator limits, channels-last, the slice workers and
fused window attention bring, cost growth, a real volume.

Usage::

    python benchmarks/bench_inference.py              # about 5 minutes on a 2-core CPU, one core busy
    python benchmarks/bench_inference.py --quick      # smoke test, under a minute
    python benchmarks/bench_inference.py --models ae_spatial h_tae_s --ab-models ae_spatial dc_tae h_tae_s
    python benchmarks/bench_inference.py --plot /tmp/cost_growth.png

Every measurement runs in its own subprocess, so that peak memory (the process's peak resident
set size, imports and weights included) belongs to it alone. Five parts:

1. Throughput of every model at its paper config (256 x 256), as the program runs it (allocator
   limits set, channels-last CNN blocks, a batch split over the threads): slices/s at batch 1 and 16 with 1 and 2 torch threads,
   peak RSS, minor page faults per forward pass, and the time of a 155-slice volume at the largest
   batch from each thread count's rate.
2. Speed-ups, measured in the same run, at 1 thread and ``--ab-batch`` (8, the CLI's and the
   widget's default): each ``--ab-models`` model in a process without the allocator limits
   (glibc's defaults), then in one with them (the two runs adjacent in time); in the latter, for
   models with CNN blocks, NCHW blocks and channels-last ones alternate ``--rounds`` times.
3. CPU bfloat16 (``--precision bfloat16``): each ``--bf16-models`` model at ``--ab-batch`` and the
   largest ``--threads``, float32 and bfloat16 alternated ``--rounds`` times through the program's
   forward pass, and the largest difference of their outputs on one random batch.
   Likewise for each ``--split-models`` model, float32: the whole batch in one forward pass on
   every thread, against one chunk per thread at the same time (``SliceWorkers``, the program's way);
   and for each ``--window-models`` model, timm's explicit softmax window attention against the
   fused one (``scaled_dot_product_attention``, the program's way).
4. Cost growth: :func:`napari_tae.inference.reconstruct` (the program's path: preprocessing,
   batches of 16, back to the native grid) on random volumes of 16, 64 and 155 slices at 256 x 256
   and of 155 slices at 64 and 128, for ``--growth-models``; time and peak RSS (reset before each
   point), plotted to ``--plot`` (matplotlib, Agg).
5. A real volume (``--real-volume``, by default the real MS case when present): each
   ``--real-models`` paper config through ``reconstruct`` at ``--ab-batch`` and the largest
   ``--threads``, as the CLI runs it (slices without brain are not sent to the model): the time,
   and the slices the model saw; then again with each batch in one forward pass (no slice workers).

Not a test: the figures depend on the machine and its load (docs/speed.md has measured ones).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import _rss_mib, format_table, time_forward  # noqa: E402

_logger = logging.getLogger("bench_inference")
ROOT = Path(__file__).resolve().parents[1]
NETWORKS = ["b_tae", "sc_tae", "dc_tae", "h_tae", "h_tae_s", "ae_dense", "ae_spatial", "vae", "vq_vae"]
WITH_CNN_BLOCKS = {"sc_tae", "dc_tae", "ae_dense", "ae_spatial", "vae", "vq_vae"}
VOLUME_SLICES = 155
REAL_VOLUME = ROOT.parent / "shared" / "data" / "real" / "mslub_patient07" / "FLAIR.nii.gz"


# --------------------------------------------------------------------------------------------
# subprocess side
# --------------------------------------------------------------------------------------------
def _configure(allocator: bool) -> None:
    if allocator:
        from napari_tae._allocator import keep_freed_memory

        keep_freed_memory()


def _throughput(args: argparse.Namespace) -> dict:

    from napari_tae.models import build_model

    model = build_model(args.model, img_size=args.img_size).eval()
    runs = []
    # batch sizes in increasing order, so that the peak RSS after each is that batch size's; the
    # first thread count warms the heap and kernels up for the next
    for bs in sorted(args.batch_sizes):
        for i, threads in enumerate(args.threads):
            with _program_batches(model, threads, "float32") as run:
                runs.append(time_forward(model, bs, "cpu", args.repeats, args.min_time,
                                         warmup=2 if i == 0 else 1, run=lambda x: run(x.numpy()[:, 0])))
    return {"model": args.model, "runs": runs}


def _compare(args: argparse.Namespace) -> dict:
    """1 thread, ``--ab-batch``: as the program runs, then (CNN blocks) NCHW and channels-last in turn."""
    import torch
    from torch import nn

    from napari_tae.models import blocks, build_model

    torch.set_num_threads(1)
    model = build_model(args.model, img_size=args.img_size).eval()
    runs: dict[str, list[dict]] = {"nhwc": [time_forward(model, args.ab_batch, "cpu", args.repeats, args.min_time)]}
    if args.allocator == "on" and args.model in WITH_CNN_BLOCKS:
        channels_last = blocks._ChannelsLastSequential.forward
        for _ in range(args.rounds):
            for layout, forward in (("nchw", nn.Sequential.forward), ("nhwc", channels_last)):
                # nchw: the blocks as they were, plain nn.Sequential on the layout that comes in
                blocks._ChannelsLastSequential.forward = forward
                runs.setdefault(layout, []).append(
                    time_forward(model, args.ab_batch, "cpu", args.repeats, args.min_time, warmup=1))
    return {"model": args.model, "allocator": args.allocator, "runs": runs}


@contextlib.contextmanager
def _program_batches(model, threads: int, precision: str, split: bool = True):
    """``run(batch)``: one batch (B, S, S) as ``iter_reconstruct`` runs it on the CPU (its
    ``_forward_batch``, the batch split by ``SliceWorkers`` when ``threads`` > 1); with ``split``
    False, the whole batch in one forward pass on torch's threads, as before SliceWorkers."""
    import torch

    from napari_tae._slice_workers import SliceWorkers
    from napari_tae.inference import _forward_batch

    torch.set_num_threads(threads)
    forward = functools.partial(_forward_batch, model, device=torch.device("cpu"), precision=precision)
    with SliceWorkers(threads if split else 1) as workers:
        yield lambda batch: workers.map(forward, batch)


def _alternated(args: argparse.Namespace, variants: dict) -> dict:
    """Each ``variants`` entry (name: context manager factory giving ``run(batch)``) timed in turn,
    ``--rounds`` times, at ``--ab-batch`` and the largest ``--threads``, and the largest difference
    of the first two variants' outputs on one random batch."""
    import numpy as np
    import torch

    from napari_tae.models import build_model

    threads = max(args.threads)
    torch.set_num_threads(threads)
    model = build_model(args.model, img_size=args.img_size).eval()
    batch = np.random.default_rng(0).random((args.ab_batch, args.img_size, args.img_size), dtype=np.float32)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    for _ in range(args.rounds):
        for name, make in variants.items():
            with make(model, threads) as run:
                outputs[name] = run(batch)  # warm-up
                n, t0 = 0, time.perf_counter()
                while n < args.repeats or time.perf_counter() - t0 < args.min_time:
                    run(batch)
                    n += 1
                rates[name].append(n * args.ab_batch / (time.perf_counter() - t0))
    first, second = (outputs[name] for name in variants)
    return {"model": args.model, "threads": threads, "rates": rates,
            "max_abs_difference": float(np.abs(second - first).max())}


def _bf16(args: argparse.Namespace) -> dict:
    """float32 and bfloat16 alternated, as ``iter_reconstruct`` runs them."""
    return _alternated(args, {precision: functools.partial(_program_batches, precision=precision)
                              for precision in ("float32", "bfloat16")})


def _split(args: argparse.Namespace) -> dict:
    """One batch on every thread against one chunk per thread (SliceWorkers), alternated."""
    return _alternated(args, {"one batch": functools.partial(_program_batches, precision="float32", split=False),
                              "slice workers": functools.partial(_program_batches, precision="float32")})


@contextlib.contextmanager
def _window_attention(model, threads: int, fused: bool):
    """The program's batches with the model's window attention fused or as timm's explicit softmax."""
    from timm.models.swin_transformer import WindowAttention

    windows = {m: m.fused_attn for m in model.modules() if isinstance(m, WindowAttention)}
    for m in windows:
        m.fused_attn = fused
    try:
        with _program_batches(model, threads, "float32") as run:
            yield run
    finally:
        for m, as_built in windows.items():
            m.fused_attn = as_built


def _window(args: argparse.Namespace) -> dict:
    """Explicit-softmax and fused window attention, alternated."""
    return _alternated(args, {"explicit softmax": functools.partial(_window_attention, fused=False),
                              "fused": functools.partial(_window_attention, fused=True)})


def _growth(args: argparse.Namespace) -> dict:
    """Every growth point in this process, the peak RSS reset before each (Linux)."""
    import numpy as np
    import torch

    from napari_tae.inference import reconstruct
    from napari_tae.models import build_model

    torch.set_num_threads(1)
    points = []
    for size, slices in _growth_points(args.quick):
        model = build_model(args.model, img_size=size).eval()
        volume = np.random.default_rng(0).random((slices, size, size), dtype=np.float32)
        brain = np.ones(volume.shape, bool)  # every slice goes through the model
        base = _status_mib("VmRSS")
        reset = _reset_peak()
        t0 = time.perf_counter()
        reconstruct(model, volume, brain=brain, device="cpu", batch_size=16)
        points.append({"model": args.model, "img_size": size, "slices": slices, "time_s": time.perf_counter() - t0,
                       "peak_mib": _status_mib("VmHWM") if reset else _rss_mib(), "base_mib": base})
        del model, volume, brain
    return {"model": args.model, "points": points}


def _real(args: argparse.Namespace) -> dict:
    """A real volume through :func:`napari_tae.inference.reconstruct` as the CLI runs it: slices
    without brain are not sent to the model; a forward hook counts those that are."""
    import torch

    from napari_tae import inference
    from napari_tae._slice_workers import SliceWorkers
    from napari_tae.inference import reconstruct
    from napari_tae.io import load_volume
    from napari_tae.models import build_model

    threads = max(args.threads)
    torch.set_num_threads(threads)
    volume = load_volume(args.real_volume)
    model = build_model(args.model, img_size=args.img_size).eval()
    with torch.inference_mode():  # kernels and heap warmed up, as the second volume of a batch run
        model(torch.rand(args.ab_batch, 1, args.img_size, args.img_size))
    sent = []
    model.register_forward_hook(lambda _module, inputs, _output: sent.append(inputs[0].shape[0]))
    times = {}
    for mode in ("slice workers", "one batch"):
        # one batch: the program's run with its slice workers replaced by a single one
        inference.SliceWorkers = SliceWorkers if mode == "slice workers" else lambda _threads: SliceWorkers(1)
        sent.clear()
        t0 = time.perf_counter()
        reconstruct(model, volume.data, spacing=volume.geometry.spacing, device="cpu", batch_size=args.ab_batch)
        times[mode] = time.perf_counter() - t0
    return {"model": args.model, "threads": threads, "batch": args.ab_batch, "slices": int(volume.data.shape[0]),
            "slices_to_model": int(sum(sent)), "time_s": times["slice workers"], "one_batch_time_s": times["one batch"]}


def _reset_peak() -> bool:
    """Reset the process's peak RSS (Linux: clear_refs 5); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status in MiB (NaN where there is none)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# --------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------
def _child(*argv: str, args: argparse.Namespace) -> dict | None:
    common = ["--img-size", str(args.img_size), "--repeats", str(args.repeats), "--min-time", str(args.min_time),
              "--rounds", str(args.rounds), "--ab-batch", str(args.ab_batch)]
    cmd = [sys.executable, __file__, *argv, *common, *(["--quick"] if args.quick else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        _logger.error("%s failed:\n%s", " ".join(argv), proc.stderr[-2000:])
        return None
    _logger.info("  (%s: %.0f s)", " ".join(argv), time.perf_counter() - t0)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _by(result: dict, bs: int, threads: int) -> dict:
    return next(r for r in result["runs"] if r["batch"] == bs and r["threads"] == threads)


def _throughput_table(results: list[dict], args: argparse.Namespace) -> str:
    big = max(args.batch_sizes)
    head = ["model"]
    for bs in args.batch_sizes:
        head += [f"b{bs} t{t} slices/s" for t in args.threads] + [f"b{bs} peak MiB", f"b{bs} faults/pass"]
    head += [f"{VOLUME_SLICES} slices b{big} t{t} (s)" for t in args.threads]
    rows = [head]
    for res in results:
        row = [res["model"]]
        for bs in args.batch_sizes:
            runs = [_by(res, bs, t) for t in args.threads]
            row += [f"{r['slices_per_s']:.1f}" for r in runs]
            row += [f"{max(r['peak_mib'] for r in runs):.0f}", f"{runs[0]['minflt_per_forward']:.0f}"]
        row += [f"{VOLUME_SLICES / _by(res, big, t)['slices_per_s']:.1f}" for t in args.threads]
        rows.append(row)
    return format_table(rows)


def _speedup_rows(model: str, with_: dict, without: dict) -> list[list[str]]:
    """Allocator limits: the first run of each process (adjacent in time); channels-last: the
    alternated runs of the process with the limits."""
    on, off = with_["runs"]["nhwc"][0], without["runs"]["nhwc"][0]
    rows = [[model, "allocator limits", f"{on['slices_per_s']:.1f}", f"{off['slices_per_s']:.1f}",
             f"{on['slices_per_s'] / off['slices_per_s']:.2f}x",
             f"{on['minflt_per_forward']:.0f} / {off['minflt_per_forward']:.0f}",
             f"{on['peak_mib']:.0f} / {off['peak_mib']:.0f}"]]
    nchw = with_["runs"].get("nchw")
    if nchw:
        nhwc = with_["runs"]["nhwc"][1:]
        ratios = sorted(a["slices_per_s"] / b["slices_per_s"] for a, b in zip(nhwc, nchw))
        rows.append([model, "channels-last", " ".join(f"{r['slices_per_s']:.1f}" for r in nhwc),
                     " ".join(f"{r['slices_per_s']:.1f}" for r in nchw),
                     " ".join(f"{r:.2f}x" for r in ratios), "", ""])
    return rows


def _alternation_table(items: list[dict], before: str, after: str) -> str:
    rows = [["model", before, after, "ratio", "max |difference|"]]
    for item in items:
        old, new = item["rates"][before], item["rates"][after]
        rows.append([item["model"], " ".join(f"{r:.1f}" for r in old), " ".join(f"{r:.1f}" for r in new),
                     " ".join(f"{b / a:.2f}x" for a, b in zip(old, new)), f"{item['max_abs_difference']:.2g}"])
    return format_table(rows)


def _growth_points(quick: bool) -> list[tuple[int, int]]:
    """(img_size, slices): slices at the largest size, sizes at the most slices."""
    sizes, slices = ([64, 128], [8, 32]) if quick else ([64, 128, 256], [16, 64, VOLUME_SLICES])
    points = [(sizes[-1], n) for n in slices]
    return points + [(s, slices[-1]) for s in sizes[:-1]]


def _plot(growth: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(7.5, 5.5), sharex="col")
    big = max(g["img_size"] for g in growth)
    most = max(g["slices"] for g in growth)
    for model in dict.fromkeys(g["model"] for g in growth):
        by_slices = sorted((g["slices"], g) for g in growth if g["model"] == model and g["img_size"] == big)
        by_size = sorted((g["img_size"], g) for g in growth if g["model"] == model and g["slices"] == most)
        for col, points in enumerate((by_slices, by_size)):
            xs = [x for x, _ in points]
            axes[0, col].plot(xs, [g["time_s"] for _, g in points], "o-", label=model)
            axes[1, col].plot(xs, [g["peak_mib"] - g["base_mib"] for _, g in points], "o-", label=model)
            axes[1, col].set_xticks(xs)
    axes[0, 0].set_ylabel("time (s)")
    axes[1, 0].set_ylabel("peak RSS above the\nloaded model (MiB)")
    axes[1, 0].set_xlabel(f"slices ({big} x {big})")
    axes[1, 1].set_xlabel(f"input size ({most} slices)")
    axes[0, 0].set_title("against number of slices", fontsize=10)
    axes[0, 1].set_title("against input size", fontsize=10)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("reconstruct() on the CPU, batch 16, 1 thread", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="throughput part (default: every network; none when given empty)")
    parser.add_argument("--ab-models", nargs="*", default=["ae_spatial", "h_tae_s"],
                        help="speed-up part: models run with and without each change")
    parser.add_argument("--bf16-models", nargs="*", default=["ae_spatial", "dc_tae", "h_tae_s"],
                        help="CPU bfloat16 part")
    parser.add_argument("--split-models", nargs="*", default=["ae_spatial", "b_tae", "dc_tae", "h_tae_s"],
                        help="slice-workers part")
    parser.add_argument("--window-models", nargs="*", default=["h_tae", "h_tae_s"],
                        help="window-attention part (fused against explicit softmax)")
    parser.add_argument("--growth-models", nargs="*", default=["ae_spatial", "b_tae"], help="cost-growth part")
    parser.add_argument("--real-models", nargs="*", default=["dc_tae", "h_tae", "h_tae_s"],
                        help="real-volume part: reconstruct() of --real-volume at --ab-batch, largest --threads")
    parser.add_argument("--real-volume", type=Path, default=REAL_VOLUME,
                        help="a FLAIR NIfTI for the real-volume part (default: the real case, when present)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--ab-batch", type=int, default=8, help="batch of the speed-up part (the CLI's default)")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per setting (at least)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds to keep timing (at least)")
    parser.add_argument("--rounds", type=int, default=2, help="NCHW / channels-last alternations")
    parser.add_argument("--plot", type=Path, default=None,
                        help="cost-growth plot (default docs/img/cost_growth.png; with --quick, the temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write every result to this file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: two small models at 128, batch 1 and 4, small growth points")
    parser.add_argument("--_throughput", dest="model_throughput", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_compare", dest="model_compare", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_growth", dest="model_growth", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_bf16", dest="model_bf16", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_split", dest="model_split", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_window", dest="model_window", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_real", dest="model_real", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plot is None:  # a smoke test must not replace the committed figure
        args.plot = (Path(tempfile.gettempdir()) / "cost_growth_quick.png" if args.quick
                     else ROOT / "docs" / "img" / "cost_growth.png")
    if args.quick:
        args.models = args.models or ["ae_spatial", "b_tae"]
        args.ab_models = [m for m in args.ab_models if m in args.models] or ["ae_spatial"]
        args.growth_models = args.growth_models[:1]
        args.bf16_models = [m for m in args.bf16_models if m in args.models] or ["ae_spatial"]
        args.split_models = [m for m in args.split_models if m in args.models] or ["ae_spatial"]
        args.window_models = args.window_models[-1:]
        args.real_models = args.real_models[-1:]
        args.batch_sizes, args.ab_batch, args.img_size, args.min_time, args.rounds = [1, 4], 4, 128, 0.2, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    child_work = {"model_throughput": _throughput, "model_compare": _compare, "model_growth": _growth,
                  "model_bf16": _bf16, "model_split": _split, "model_window": _window,
                  "model_real": _real}
    for dest, work in child_work.items():
        if getattr(args, dest):
            args.model = getattr(args, dest)
            _configure(args.allocator == "on")
            print(json.dumps(work(args)))
            return

    started = time.perf_counter()
    results, speedups, growth, bf16, split, window, real = [], [], [], [], [], [], []
    for model in NETWORKS if args.models is None else args.models:
        res = _child("--_throughput", model, "--batch-sizes", *map(str, args.batch_sizes),
                     "--threads", *map(str, args.threads), args=args)
        if res is not None:
            results.append(res)
            _logger.info("%s: %s", model, ", ".join(
                f"b{r['batch']} t{r['threads']} {r['slices_per_s']:.1f}/s" for r in res["runs"]))
    for model in args.ab_models:
        # without first, so that its run and the first one with the limits are adjacent in time
        without = _child("--_compare", model, "--allocator", "off", args=args)
        with_ = _child("--_compare", model, args=args)
        if with_ is not None and without is not None:
            speedups.append({"model": model, "with": with_, "without": without})
            _logger.info("%s", "; ".join(" ".join(row[:5]) for row in _speedup_rows(model, with_, without)))
    for model in args.bf16_models:
        res = _child("--_bf16", model, "--threads", *map(str, args.threads), args=args)
        if res is not None:
            bf16.append(res)
    for model in args.split_models:
        res = _child("--_split", model, "--threads", *map(str, args.threads), args=args)
        if res is not None:
            split.append(res)
    for model in args.window_models:
        res = _child("--_window", model, "--threads", *map(str, args.threads), args=args)
        if res is not None:
            window.append(res)
    for model in args.growth_models:
        res = _child("--_growth", model, args=args)
        if res is not None:
            growth += res["points"]

    if not args.real_volume.is_file():
        _logger.info("real-volume part skipped: %s not found", args.real_volume)
    for model in args.real_models if args.real_volume.is_file() else []:
        res = _child("--_real", model, "--real-volume", str(args.real_volume),
                     "--threads", *map(str, args.threads), args=args)
        if res is not None:
            real.append(res)

    if not results:
        raise SystemExit("no model ran")
    print(f"\nCPU float32, img_size={args.img_size}; peak = process peak RSS (imports and weights "
          f"included); faults = minor page faults per timed forward at {args.threads[0]} thread(s)")
    print(_throughput_table(results, args))
    if speedups:
        print(f"\nspeed-ups at batch {args.ab_batch}, 1 thread, slices/s with the change and without it:")
        rows = [["model", "change", "with", "without", "ratio", "faults/pass with / without",
                 "peak MiB with / without"]]
        for item in speedups:
            rows += _speedup_rows(item["model"], item["with"], item["without"])
        print(format_table(rows))
    if bf16:
        print(f"\nCPU bfloat16 against float32, batch {args.ab_batch}, {max(args.threads)} threads, slices/s "
              "(alternated), and the largest output difference (untrained weights, random input):")
        print(_alternation_table(bf16, "float32", "bfloat16"))
    if split:
        print(f"\none chunk of the batch per thread (SliceWorkers) against the whole batch on every thread, "
              f"batch {args.ab_batch}, {max(args.threads)} threads, float32, slices/s (alternated), and the "
              "largest output difference:")
        print(_alternation_table(split, "one batch", "slice workers"))
    if window:
        print(f"\nfused window attention against timm's explicit softmax, batch {args.ab_batch}, "
              f"{max(args.threads)} threads, float32, slices/s (alternated), and the largest output difference:")
        print(_alternation_table(window, "explicit softmax", "fused"))
    if growth:
        print(f"\ncost growth, reconstruct() at batch 16, 1 thread ({args.plot}):")
        print(format_table([["model", "size", "slices", "time (s)", "slices/s", "peak MiB", "above model MiB"]] + [
            [g["model"], str(g["img_size"]), str(g["slices"]), f"{g['time_s']:.1f}",
             f"{g['slices'] / g['time_s']:.1f}", f"{g['peak_mib']:.0f}", f"{g['peak_mib'] - g['base_mib']:.0f}"]
            for g in growth]))
        _plot(growth, args.plot)
    if real:
        print(f"\n{args.real_volume}, reconstruct() as the CLI runs it (slices without brain skipped), "
              f"batch {args.ab_batch}:")
        rows = [["model", "threads", "slices", "to the model", "time (s)", f"per {VOLUME_SLICES} model slices (s)",
                 "one batch (s)", "ratio"]]
        rows += [[r["model"], str(r["threads"]), str(r["slices"]), str(r["slices_to_model"]), f"{r['time_s']:.1f}",
                  f"{r['time_s'] * VOLUME_SLICES / max(r['slices_to_model'], 1):.1f}", f"{r['one_batch_time_s']:.1f}",
                  f"{r['one_batch_time_s'] / r['time_s']:.2f}x"] for r in real]
        print(format_table(rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; largest child peak RSS "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"throughput": results, "speedups": speedups, "growth": growth,
                                         "bf16": bf16, "split": split, "window": window,
                                         "real_volume": real}, indent=2))


if __name__ == "__main__":
    main()
