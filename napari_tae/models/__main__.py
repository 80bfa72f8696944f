"""``python -m napari_tae.models [--img-size N]``: table of models, configs and parameter counts."""
from __future__ import annotations

import argparse

from . import format_model_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m napari_tae.models", description=__doc__)
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: each model's paper config, 256)")
    args = parser.parse_args(argv)
    print(format_model_table(args.img_size))


if __name__ == "__main__":
    main()
