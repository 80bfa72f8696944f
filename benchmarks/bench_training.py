"""Training throughput per model at its paper config (slices/s), CPU and CUDA when present.

Runs the real training step (:func:`training.train.train_one_epoch`: batch gathering from the
in-memory float16 slice store, forward_train, MAE + extra terms, Adam step; bf16 autocast on CUDA)
for a few steps after a warm-up, and reports the data pipeline's share of step time and the
projected time of one epoch of the paper's 16,896 training slices (target on one modern GPU: under
a minute for every model).

    python benchmarks/bench_training.py                       # every trainable model, CPU (+ CUDA)
    python benchmarks/bench_training.py --models ae_dense b_tae --steps 5 --device cuda
    python benchmarks/bench_training.py --img-size 64 --batch-size 4   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_tae.models import build_model, count_parameters, list_models  # noqa: E402
from training.data import SliceDataset  # noqa: E402
from training.train import Runtime, _TrainForward, amp_setup, train_one_epoch  # noqa: E402

PAPER_SLICES = 16_896

_logger = logging.getLogger("bench_training")


def bench_model(name: str, device: torch.device, *, batch_size: int, steps: int, warmup: int,
                img_size: int | None, amp: str) -> dict:
    torch.manual_seed(0)
    overrides = {} if img_size is None else {"img_size": img_size}
    model = build_model(name, **overrides).to(device)
    size = model.img_size
    n = batch_size * (steps + warmup)
    # random slices in [0, 1], stored like the training set (float16, in host memory)
    dataset = SliceDataset(torch.rand(n, size, size).to(torch.float16))
    if device.type == "cuda":  # as in training: the slice store lives on the GPU when it fits
        dataset = dataset.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.9, 0.999))
    runtime = Runtime.single(device)
    runtime.amp_ctx, runtime.scaler = amp_setup(device, amp)
    step = _TrainForward(model)
    kwargs = dict(optimizer=optimizer, batch_size=batch_size, runtime=runtime, log_interval=10**9)
    train_one_epoch(step, dataset, epoch=0, max_steps=warmup, **kwargs)  # allocator, cudnn autotune
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    metrics = train_one_epoch(step, dataset, epoch=1, max_steps=steps, **kwargs)
    rate = metrics["slices_per_s"]
    return {
        "model": name, "device": str(device), "img_size": size, "batch_size": batch_size,
        "params_m": count_parameters(model) / 1e6, "steps": steps,
        "step_s": metrics["epoch_time_s"] / steps, "slices_per_s": rate,
        "data_share": metrics["data_fraction"],
        "epoch_s": PAPER_SLICES / rate,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    trainable = [m for m in list_models() if any(True for _ in build_model(m, img_size=64).parameters())]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=trainable, choices=trainable, metavar="NAME")
    parser.add_argument("--device", nargs="+", default=None,
                        help="devices to run on (default: cpu, plus cuda when available)")
    parser.add_argument("--batch-size", type=int, default=12, help="paper: 12")
    parser.add_argument("--img-size", type=int, default=None, help="default: the paper's 256")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 2 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    header = (f"{'model':<11} {'device':<7} {'size':>4} {'batch':>5} {'params':>8} {'step s':>8} "
              f"{'slices/s':>9} {'data %':>7} {'epoch of 16,896':>16}")
    print(header)
    print("-" * len(header))
    rows = []
    for dev in devices:
        device = torch.device(dev)
        steps = args.steps or (20 if device.type == "cuda" else 2)
        for name in args.models:
            t0 = time.perf_counter()
            try:
                row = bench_model(name, device, batch_size=args.batch_size, steps=steps,
                                  warmup=args.warmup, img_size=args.img_size, amp=args.amp)
            except torch.OutOfMemoryError:
                print(f"{name:<11} {dev:<7} out of memory at batch {args.batch_size}")
                continue
            rows.append(row)
            minutes, seconds = divmod(row["epoch_s"], 60)
            print(f"{name:<11} {dev:<7} {row['img_size']:>4} {row['batch_size']:>5} "
                  f"{row['params_m']:>7.2f}M {row['step_s']:>8.3f} {row['slices_per_s']:>9.1f} "
                  f"{100 * row['data_share']:>6.1f}% {int(minutes):>9d} min {seconds:4.1f}s"
                  f"   ({time.perf_counter() - t0:.0f}s)", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
