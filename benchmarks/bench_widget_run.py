"""A model run through the widget against the same run headless, not a unit test.

The widget runs the model in napari's worker thread (and, on the CPU, each batch's other chunks
in the slice workers' pool threads); the command line runs it on the main thread. This measures
whether that costs time: for each model, ``--rounds`` alternations of

* widget, napari's progress: ``AnomalyWidget.run()`` in a shown viewer (a worker thread, as in
  use) with its progress in napari's activity dock, as on a display with OpenGL hardware, from the
  click until its worker returns the reconstruction, and (shown apart) until the three result
  layers are there, post-processing and the lesion table included. While a napari progress bar is
  open, its status bar animates an "in progress" GIF; under Xvfb the window is composited by
  software OpenGL (Mesa's llvmpipe threads, in this process) for every frame of it;
* widget, the dock's progress: the same with the progress on the dock's own bar, which the widget
  chooses on a software-rendered display (``napari_tae/plugin/_opengl.py``);
* headless: :func:`napari_tae.inference.inference_job`, the generator the widget's worker runs,
  consumed on the main thread with the same arguments (the CLI's path).

Also the process's minor page faults during each run, and the CPU time of the software-OpenGL
threads during the widget's inference. Models: bundled checkpoint names, or
``paper:<name>`` for a paper config at 256 x 256 with untrained weights (saved to a temporary
checkpoint with the bundled default's preprocessing and calibration).

Run under a display: ``xvfb-run -a -s "-screen 0 1280x800x24" python benchmarks/bench_widget_run.py``
(about 6 minutes on a 2-core CPU with the defaults; the real MS case when present, else a
synthetic head).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import REAL_VOLUME  # noqa: E402
from bench_models import format_table  # noqa: E402


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _volume(path: Path) -> tuple[np.ndarray, tuple[float, ...], str]:
    from napari_tae.io import load_volume

    if path.is_file():
        volume = load_volume(path)
        return volume.data.astype(np.float32), tuple(volume.geometry.spacing), str(path)
    from napari_tae.synthetic import healthy_subject
    from napari_tae.synthetic_head import add_head

    head = add_head(healthy_subject(0), seed=0)
    return head.data.astype(np.float32), tuple(head.spacing), "a synthetic head (seed 0)"


def _checkpoint(name: str, folder: Path) -> str:
    """A bundled name as it is; ``paper:<model>`` saved with untrained weights."""
    if not name.startswith("paper:"):
        return name
    from napari_tae.checkpoint import bundled_checkpoints, read_metadata, save_checkpoint
    from napari_tae.models import build_model

    like = read_metadata(bundled_checkpoints()["h_tae_s_synthetic"])
    model = build_model(name.split(":", 1)[1], img_size=256)
    path = folder / f"{name.replace(':', '_')}.safetensors"
    save_checkpoint(path, model, preprocessing=like.preprocessing, calibration=like.calibration,
                    scores=like.scores)
    return str(path)


def _run_event_loop_until(condition, status, timeout: float) -> None:
    """Qt's own event loop (it sleeps until an event comes, as in use), checked every 50 ms."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    timer = QTimer()
    timer.timeout.connect(lambda: loop.quit() if condition() else None)
    timer.start(50)
    QTimer.singleShot(int(timeout * 1000), loop.quit)
    loop.exec()
    timer.stop()
    if not condition():
        raise TimeoutError(f"the widget's run did not finish: {status()}")


def _gl_thread_seconds() -> float:
    """CPU seconds so far of this process's software-OpenGL threads (Mesa llvmpipe; Linux)."""
    total = 0.0
    for task in Path("/proc/self/task").iterdir():
        try:
            if not (task / "comm").read_text().startswith("llvmpipe"):
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _widget_run(widget, viewer, source: str, timeout: float, in_dock: bool) -> tuple[float, float, float]:
    """(seconds until the worker returned its reconstruction, until the result layers were there,
    software-OpenGL CPU seconds until the reconstruction)."""
    kinds = [f"{source} {k}" for k in ("reconstruction", "residual", "anomaly mask")]
    for kind in kinds:  # a fresh run each time: no mask edits to ask about
        if kind in viewer.layers:
            viewer.layers.remove(kind)
    from napari_tae import inference

    returned: list[float] = []
    gl: list[float] = []
    job = inference.inference_job

    def timed_job(*args, **kwargs):  # the moment the worker thread has its result
        result = yield from job(*args, **kwargs)
        returned.append(time.perf_counter())
        gl.append(_gl_thread_seconds())
        return result

    inference.inference_job = timed_job  # the widget imports it when a run starts
    try:
        widget.progress_in_dock = in_dock
        gl0, t0 = _gl_thread_seconds(), time.perf_counter()
        widget.run()
        _run_event_loop_until(lambda: not widget.is_running and all(k in viewer.layers for k in kinds),
                              widget.status.text, timeout)
    finally:
        inference.inference_job = job
    return returned[0] - t0, time.perf_counter() - t0, gl[0] - gl0


def _headless_run(spec: str, data: np.ndarray, spacing, batch_size: int) -> float:
    from napari_tae.inference import inference_job

    t0 = time.perf_counter()
    for _progress in inference_job(spec, data, spacing=spacing, device="cpu", batch_size=batch_size,
                                   precision="float32"):
        pass
    return time.perf_counter() - t0


def _ratio(times: list[float], reference: list[float]) -> str:
    ratios = [t / r for t, r in zip(times, reference)]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["h_tae_s_synthetic", "paper:h_tae_s"])
    parser.add_argument("--volume", type=Path, default=REAL_VOLUME)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take")
    args = parser.parse_args()
    from napari_tae.plugin._demo import display_problem

    problem = display_problem()
    if problem is not None:  # Qt would abort the process without a display
        raise SystemExit("bench_widget_run: " + problem.replace("napari-tae demo", "python benchmarks/bench_widget_run.py"))
    os.environ.setdefault("NAPARI_TAE_CONFIG_DIR", tempfile.mkdtemp())  # not the user's settings

    import napari
    import torch

    from napari_tae.plugin._widget import AnomalyWidget

    data, spacing, described = _volume(args.volume)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1280, 800)
    viewer.add_image(data, name="flair", scale=spacing)
    widget = AnomalyWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.image_combo.setCurrentText("flair")
    widget.device_combo.setCurrentText("cpu")
    widget.precision_combo.setCurrentText("float32")
    widget.settings.batch_size = args.batch_size
    chosen = "the dock's" if widget.progress_in_dock else "napari's"
    print(f"OpenGL renderer: {widget.renderer}; the widget shows its progress in {chosen} bar", flush=True)
    ways = ("napari's progress", "the dock's progress", "headless")
    rows = [["model", *(f"{way} (s)" for way in ways), "napari's / headless", "dock's / headless",
             "GL CPU s napari's / dock's", "faults napari's / headless", "napari's with result layers (s)"]]
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            spec = _checkpoint(name, Path(folder))
            if spec.endswith(".safetensors"):
                widget.load_checkpoint_file(spec)
            else:
                widget.models.select(spec)
            if widget.checkpoint_spec() != spec:
                raise SystemExit(f"bench_widget_run: {name}: could not be selected ({widget.status.text()})")
            _headless_run(spec, data, spacing, args.batch_size)  # warm-up: weights read, kernels chosen
            times: dict[str, list[float]] = {way: [] for way in (*ways, "layers")}
            faults: dict[str, list[int]] = {way: [] for way in ways}
            gl: dict[str, list[float]] = {way: [] for way in ways[:2]}
            for r in range(args.rounds):
                for way in (ways if r % 2 == 0 else ways[::-1]):
                    f0 = _faults()
                    if way == "headless":
                        times[way].append(_headless_run(spec, data, spacing, args.batch_size))
                    else:
                        inference, shown, gl_s = _widget_run(widget, viewer, "flair", args.timeout,
                                                             in_dock=way == ways[1])
                        times[way].append(inference)
                        gl[way].append(gl_s)
                        if way == ways[0]:
                            times["layers"].append(shown)
                    faults[way].append(_faults() - f0)
            rows.append([name, *(" ".join(f"{t:.2f}" for t in times[way]) for way in ways),
                         *(_ratio(times[way], times["headless"]) for way in ways[:2]),
                         " / ".join(f"{statistics.median(gl[way]):.1f}" for way in ways[:2]),
                         f"{statistics.median(faults[ways[0]]):.0f} / {statistics.median(faults['headless']):.0f}",
                         " ".join(f"{t:.2f}" for t in times["layers"])])
            print(f"{name}: {times}", flush=True)
    print(f"\n{described}, {data.shape[0]} slices, batch {args.batch_size}, {torch.get_num_threads()} torch "
          f"threads, float32, CPU; {args.rounds} alternations (headless: the widget's own inference "
          "generator on the main thread; faults: the whole process's, result layers included):")
    print(format_table(rows))
    viewer.close()


if __name__ == "__main__":
    main()
