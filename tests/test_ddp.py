"""DistributedDataParallel training: 2 CPU processes (gloo) must end with identical weights.

The processes are started with ``torch.multiprocessing.spawn`` and given the environment
``torchrun`` would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so they run the same code
path as ``torchrun --nproc_per_node 2 -m training train ...``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, argv: list[str], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a small CPU
    import torch.distributed as dist

    from training import train

    _, args = train.parse_args(argv)
    try:
        model = train.run_training(args)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    from training.__main__ import main as cli

    out = tmp_path_factory.mktemp("ddp_synth")
    assert cli(["synth", "--out", str(out), "--n-train", "2", "--n-val", "1", "--n-test", "0",
                "--n-test-healthy", "0", "--shape", "48", "56", "48"]) == 0
    return out


def test_two_gloo_processes_agree(tiny_dataset: Path, tmp_path: Path):
    out = tmp_path / "ddp.safetensors"
    argv = ["--data", str(tiny_dataset / "train"), "--val-data", str(tiny_dataset / "val"),
            "--model", "dc_tae", "--img-size", "64", "--patch-size", "8", "--depth", "1",
            "--num-heads", "2", "--epochs", "2", "--batch-size", "4", "--lr", "1e-3",
            "--seed", "0", "--min-brain-fraction", "0.3", "--device", "cpu", "--out", str(out)]
    mp.spawn(_worker, args=(_free_port(), argv, str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    # only rank 0 wrote, and it wrote the model both ranks hold
    shipped = load_file(str(out))
    assert all(torch.equal(shipped[k], states[0][k]) for k in shipped)
    from napari_tae.checkpoint import read_metadata

    meta = read_metadata(out)
    assert meta.training["world_size"] == WORLD_SIZE and meta.calibration
    state = torch.load(out.with_name("ddp.resume.pt"), weights_only=True)
    assert len(state["rng"]["per_rank"]) == WORLD_SIZE and state["epoch"] == 2
    # weights moved away from the initialisation (the all-reduced gradients were applied)
    from napari_tae.models import build_model

    torch.manual_seed(0)
    init = build_model("dc_tae", img_size=64, patch_size=8, depth=1, num_heads=2).state_dict()
    assert any(not torch.equal(init[k], states[0][k]) for k in init)
