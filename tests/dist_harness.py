"""Running a test scenario in several processes with torch.distributed on gloo (the CPU): the tests of expert
parallelism and of its checkpoints share it. A scenario is a function `(rank, world)` found by name in a test
module's SCENARIOS; a failing rank writes its traceback to a file, which the test reports."""
from __future__ import annotations

import datetime
import importlib
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, module: str, scenario: str, errors: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        importlib.import_module(module).SCENARIOS[scenario](rank, world)
    except BaseException:
        # a file, not a queue: the other ranks are killed when one fails, maybe half-way through writing
        (Path(errors) / f"rank{rank}.txt").write_text(f"rank {rank}: {traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def spawn(world: int, module: str, scenario: str, tmp_path: Path) -> None:
    """Run `module`.SCENARIOS[scenario](rank, world) in `world` processes; fail the test with the ranks' errors."""
    try:
        mp.start_processes(_worker, args=(world, free_port(), module, scenario, str(tmp_path)), nprocs=world,
                           start_method="spawn")
    except Exception as exc:
        found = [f.read_text() for f in sorted(tmp_path.glob("rank*.txt"))]
        pytest.fail("\n".join(found) or f"a rank failed without a Python error: {exc}", pytrace=False)
