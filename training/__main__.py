"""``python -m training {train,evaluate,synth,calibrate} ...``: one entry point, one sub-command per module."""

from __future__ import annotations

import sys

_COMMANDS = {
    "train": "training.train",
    "evaluate": "training.evaluate",
    "synth": "training.synth",
    "calibrate": "training.calibrate",
}
_USAGE = ("usage: python -m training {train,evaluate,synth,calibrate} [-h] ...\n"
          "  train     train a model on healthy FLAIR volumes (writes a calibrated .safetensors)\n"
          "  evaluate  score a checkpoint (or --model intensity) on labelled test volumes\n"
          "  synth     write a synthetic dataset (healthy train/val, anomalous test with labels)\n"
          "  calibrate recalibrate a checkpoint's scores and thresholds (or the intensity baseline's)\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        sys.stderr.write(_USAGE + f"python -m training: error: unknown command {command!r}\n")
        return 2
    import importlib

    return importlib.import_module(_COMMANDS[command]).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
