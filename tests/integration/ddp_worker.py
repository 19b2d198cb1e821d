"""One rank of a test's torchrun launch: `deploycraft` with hooks the tests observe it through.

- umask 022 on rank 0 and 077 on the others, so a file any other rank creates is told apart by its mode;
- DEPLOYCRAFT_TEST_PIDS=<folder>: each rank writes its pid to <folder>/rank<N>.pid (to kill one);
- DEPLOYCRAFT_TEST_FAULT=<rank>:<epoch>:<step>: that rank raises in that training step (epochs from 0).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

rank = int(os.environ["RANK"])
os.umask(0o022 if rank == 0 else 0o077)
if os.environ.get("DEPLOYCRAFT_TEST_PIDS"):
    Path(os.environ["DEPLOYCRAFT_TEST_PIDS"], f"rank{rank}.pid").write_text(str(os.getpid()))
fault = os.environ.get("DEPLOYCRAFT_TEST_FAULT")
if fault and int(fault.split(":")[0]) == rank:
    from deploycraft.data import DataModule

    fault_epoch, fault_step = (int(v) for v in fault.split(":")[1:])
    train_epoch = DataModule.train_epoch

    def failing_epoch(self, batch_size, epoch, augment, shard=None, device=None):
        for step, batch in enumerate(train_epoch(self, batch_size, epoch, augment, shard, device)):
            if (epoch, step) == (fault_epoch, fault_step):
                raise RuntimeError(f"injected fault on rank {rank}")
            yield batch

    DataModule.train_epoch = failing_epoch
sys.argv = ["deploycraft", *sys.argv[1:]]
runpy.run_module("deploycraft", run_name="__main__", alter_sys=True)
