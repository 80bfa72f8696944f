"""Forward throughput and peak memory of every model at its paper config (256 x 256 input).

Usage::

    python benchmarks/bench_models.py                 # CPU (or CUDA when present), batch 1 and 8
    python benchmarks/bench_models.py --device cpu --threads 1 --models b_tae dc_tae

Each model runs in its own subprocess so that the CPU peak memory (peak resident set size of that
process, ``ru_maxrss``) belongs to one model only; on CUDA the peak is ``max_memory_allocated``.
The allocator limits of inference are set (``napari_tae._allocator``); ``bench_inference.py``
measures what they and the other CPU choices bring.
CUDA runs use bf16 autocast, as inference does. The last columns give the time to reconstruct a
155-slice 256 x 256 volume at the larger batch size and whether it meets the 60 s CPU target.
Not a test: numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

_logger = logging.getLogger("bench_models")
TARGET_S = 60.0


def _rss_mib() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_forward(model, bs: int, device: str, repeats: int, min_time: float, warmup: int = 2,
                 run=None) -> dict:
    """Time ``model(x)`` under inference_mode, as the program runs it, after ``warmup`` passes.

    Two warm-up passes by default: on glibc with the allocator limits the first passes still
    grow the heap (page faults), the later ones reuse it. ``minflt_per_forward`` counts the minor
    page faults of the timed passes, ``cpu_per_wall`` the cores they kept busy (process CPU time
    over wall time). ``run(x)``, when given, replaces ``model(x)`` (the program's own batch path).
    """
    import torch

    dev = torch.device(device)
    img_size = int(model.img_size)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    x = torch.rand(bs, 1, img_size, img_size, device=dev)
    run = run or model
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), amp:
        for _ in range(warmup):  # allocator, kernels
            run(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        n, cpu0, t0 = 0, time.process_time(), time.perf_counter()
        while n < repeats or time.perf_counter() - t0 < min_time:
            run(x)
            n += 1
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        cpu_per_wall = (time.process_time() - cpu0) / wall
        dt = wall / n
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else _rss_mib()
    return {"batch": bs, "threads": torch.get_num_threads(), "s_per_batch": dt, "slices_per_s": bs / dt,
            "peak_mib": peak, "minflt_per_forward": faults, "cpu_per_wall": cpu_per_wall}


def bench_one(name: str, batch_sizes: list[int], img_size: int, device: str, repeats: int, min_time: float) -> dict:
    """:func:`time_forward` for each batch size; returns a JSON-able dict."""
    import torch

    from napari_tae.models import build_model, count_parameters

    model = build_model(name, img_size=img_size).eval().to(torch.device(device))
    out = {"model": name, "params": count_parameters(model), "device": device,
           "threads": torch.get_num_threads(), "base_mib": _rss_mib(), "runs": []}
    for bs in batch_sizes:
        out["runs"].append(time_forward(model, bs, device, repeats, min_time))
    return out


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("what to run")
    group.add_argument("--models", nargs="*", default=None, help="model names (default: all)")
    group.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    group.add_argument("--img-size", type=int, default=256)
    group.add_argument("--slices", type=int, default=155, help="slices of the reference volume")
    group = parser.add_argument_group("how")
    group.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    group.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    group.add_argument("--repeats", type=int, default=2, help="timed forwards per batch size (at least)")
    group.add_argument("--min-time", type=float, default=1.0, help="seconds to keep timing (at least)")
    group.add_argument("--json", default=None, help="also write the results to this file")
    group.add_argument("--_single", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def format_table(rows: list[list[str]]) -> str:
    """Rows of text cells as aligned columns (the first left, the others right) under a rule."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _format(results: list[dict], slices: int) -> str:
    bs_list = [r["batch"] for r in results[0]["runs"]]
    head = ["model", "params"]
    for bs in bs_list:
        head += [f"b{bs} slices/s", f"b{bs} peak MiB"]
    head += [f"{slices} slices (s)", f"<{TARGET_S:.0f} s"]
    rows = [head]
    for r in results:
        row = [r["model"], f"{r['params'] / 1e6:.2f} M"]
        for run in r["runs"]:
            row += [f"{run['slices_per_s']:.1f}", f"{run['peak_mib']:.0f}"]
        best = max(run["slices_per_s"] for run in r["runs"])
        vol = slices / best
        row += [f"{vol:.1f}", "yes" if vol < TARGET_S else "NO"]
        rows.append(row)
    return format_table(rows)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args._single:
        from napari_tae._allocator import keep_freed_memory

        keep_freed_memory()  # as inference does (docs/speed.md)
        print(json.dumps(bench_one(args._single, args.batch_sizes, args.img_size, device, args.repeats, args.min_time)))
        return

    from napari_tae.models import list_models

    names = args.models or list_models()
    results = []
    for name in names:
        cmd = [sys.executable, __file__, "--_single", name, "--device", device, "--img-size", str(args.img_size),
               "--repeats", str(args.repeats), "--min-time", str(args.min_time),
               "--batch-sizes", *map(str, args.batch_sizes)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            _logger.error("%s failed:\n%s", name, proc.stderr[-2000:])
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        _logger.info("%s: %s", name, ", ".join(f"b{r['batch']} {r['slices_per_s']:.1f} slices/s" for r in res["runs"]))
    if not results:
        raise SystemExit("no model ran")
    r0 = results[0]
    print(f"\ndevice={r0['device']} threads={r0['threads']} img_size={args.img_size} "
          f"{'bf16 autocast' if r0['device'].startswith('cuda') else 'float32'}; "
          f"peak = {'max_memory_allocated' if r0['device'].startswith('cuda') else 'process peak RSS (incl. ~' + format(r0['base_mib'], '.0f') + ' MiB of imports and weights)'}")
    print(_format(results, args.slices))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
