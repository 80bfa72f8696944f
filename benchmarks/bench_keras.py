"""Our models against the same architectures in Keras (TensorFlow), side by side on this CPU.

Usage::

    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu     # once; not a dependency
    python benchmarks/bench_keras.py --tf-python /tmp/tf/bin/python       # about 6 minutes
    python benchmarks/bench_keras.py --tf-python /tmp/tf/bin/python --models ae_spatial --rounds 1

``keras_twins.py`` builds each model's paper config in Keras: the same layers and widths, so the
parameter counts are equal (checked: no ratio is printed where they differ) and both do the same
arithmetic. ``h_tae_s`` runs with global attention on both sides, as the paper's TensorFlow code
has it. Each measurement is a fresh process (ours as the program runs it: allocator limits set,
channels-last CNN blocks, float32); ours and Keras alternate ``--rounds`` times, the one that goes
first swapping each round, so a drift of the machine's speed does not favour either. ``cpu/wall``
(process CPU time over wall time) shows how many cores each really used.

Not a test: the figures depend on the machine and its load (docs/speed.md has measured ones).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import format_table, time_forward  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = ["ae_spatial", "b_tae", "dc_tae", "h_tae_s"]
OUR_OVERRIDES = {"h_tae_s": {"attention": "global"}}


def _ours(args: argparse.Namespace) -> dict:
    import torch

    from napari_tae._allocator import keep_freed_memory
    from napari_tae.models import build_model, count_parameters

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    model = build_model(args.ours, **OUR_OVERRIDES.get(args.ours, {})).eval()
    runs = [time_forward(model, bs, "cpu", args.repeats, args.min_time) for bs in args.batch_sizes]
    return {"model": args.ours, "params": count_parameters(model), "runs": runs}


def _run(command: list[str]) -> dict | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as exc:
        print(f"{command[0]}: {exc.strerror}", file=sys.stderr)
        return None
    if done.returncode:
        print(f"{' '.join(command[:4])}...: {(done.stderr.strip().splitlines() or ['failed'])[-1]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(side: str, model: str, args: argparse.Namespace) -> dict | None:
    common = ["--batch-sizes", *map(str, args.batch_sizes), "--threads", str(args.threads),
              "--min-time", str(args.min_time), "--repeats", str(args.repeats)]
    if side == "ours":
        return _run([sys.executable, str(Path(__file__).resolve()), "--ours", model, *common])
    return _run([args.tf_python, str(HERE / "keras_twins.py"), "--model", model, *common])


def _rows(results: dict[str, dict[str, list[dict]]]) -> list[list[str]]:
    head = ["model", "params ours / keras", "batch", "ours slices/s", "keras slices/s", "ours / keras",
            "cpu/wall ours / keras"]
    rows = [head]
    for model, sides in results.items():
        if not sides["ours"] or not sides["keras"]:
            continue
        params = (sides["ours"][0]["params"], sides["keras"][0]["params"])
        for i, bs in enumerate(r["batch"] for r in sides["ours"][0]["runs"]):
            ours = [res["runs"][i]["slices_per_s"] for res in sides["ours"]]
            keras = [res["runs"][i]["slices_per_s"] for res in sides["keras"]]
            ratio = (f"{statistics.median(o / k for o, k in zip(ours, keras)):.2f}x" if params[0] == params[1]
                     else "params differ")
            cpu = (statistics.median(res["runs"][i]["cpu_per_wall"] for res in sides[side]) for side in ("ours", "keras"))
            rows.append([model, f"{params[0] / 1e6:.2f} / {params[1] / 1e6:.2f} M", str(bs),
                         ", ".join(f"{v:.2f}" for v in ours), ", ".join(f"{v:.2f}" for v in keras), ratio,
                         " / ".join(f"{v:.2f}" for v in cpu)])
    return rows


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-python", help="a Python interpreter that has tensorflow (or tensorflow-cpu)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of ours and Keras per model")
    parser.add_argument("--min-time", type=float, default=5.0, help="seconds timed per batch size")
    parser.add_argument("--repeats", type=int, default=2, help="at least this many timed passes")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--ours", choices=MODELS, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.ours is None and not args.tf_python:
        parser.error("--tf-python is required: a Python with tensorflow, e.g. after "
                     "python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.ours:
        print(json.dumps(_ours(args)))
        return
    if _run([args.tf_python, "-c", "import tensorflow, json; print(json.dumps(tensorflow.__version__))"]) is None:
        raise SystemExit(f"{args.tf_python}: cannot import tensorflow")
    started = time.perf_counter()
    results: dict[str, dict[str, list[dict]]] = {}
    for model in args.models:
        results[model] = {"ours": [], "keras": []}
        for round_ in range(args.rounds):
            for side in (("ours", "keras") if round_ % 2 == 0 else ("keras", "ours")):
                res = _measure(side, model, args)
                if res is not None:
                    results[model][side].append(res)
        for line in format_table(_rows({model: results[model]})).splitlines()[2:]:
            print(line, file=sys.stderr, flush=True)
    print(f"\nCPU float32, 256 x 256, {args.threads} thread(s); each figure one process, rounds in time order; "
          f"ours / keras: the median of the rounds' ratios")
    print(format_table(_rows(results)))
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
