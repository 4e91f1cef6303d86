"""Runs a script of ``tests/scripts`` under Lightning's ``strategy="ddp"`` with 2 CPU processes (gloo).

``strategy="ddp"`` re-launches ``sys.argv`` for rank 1, which inside pytest would re-run pytest; a script in a
subprocess launches cleanly. Scripts write ``rank{r}.pt`` files into the output folder they are given.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

SCRIPTS = Path(__file__).parent / "scripts"


def run_ddp(script: str, out: Path, *args: str, timeout: float = 300) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent))
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # left by earlier tests
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=out,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def ddp_trainer_kwargs(**overrides) -> dict:
    """Trainer arguments of the DDP scripts: 2 CPU processes under ``strategy="ddp"``, nothing written."""
    kwargs = dict(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return kwargs | overrides


def save_rank(trainer, out: str, result: dict) -> None:
    """Write this rank's ``result`` for :func:`run_ddp`, then destroy the process group (see
    :class:`DestroyProcessGroup`)."""
    torch.save(result, f"{out}/rank{trainer.global_rank}.pt")
    destroy_process_group()


def destroy_process_group() -> None:
    """Destroy the process group after a barrier. Waiting there releases the GIL, which lets gloo's worker threads
    free the tensors of the last collectives: torch 2.4's group destructor joins those threads while holding the GIL,
    and deadlocked with a worker that still needed it (under pytest, in each of three runs)."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


class DestroyProcessGroup(Callback):
    """Destroys the process group when ``fit`` ends (its teardown hook is the last): Lightning leaves a gloo group
    to the interpreter's exit, where its worker threads can abort the process ("terminate called without an active
    exception", in one run in six to four in ten here; pytorch/pytorch#190489). For ``ddp_spawn``/``ddp_fork``
    workers."""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            destroy_process_group()
