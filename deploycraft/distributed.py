"""Data-parallel runs with PyTorch's own engine: torch.distributed and DistributedDataParallel, launched by torchrun.

``torchrun --nproc-per-node N -m deploycraft run RECIPE`` starts N copies of the command; torchrun sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each (docs/design.md, "Data-parallel runs").

- Rank 0 alone touches the run folder: it decides whether a stage is reused or run (its verified record,
  as in a single process) and tells the other ranks; stages that train (``Stage.data_parallel``) run on
  every rank, the others on rank 0 while the rest wait idle.
- Control messages (those decisions, stage records, the final outcome, the first failure) go through
  the launcher's key-value store, which needs no collective and so no timeout while rank 0 works alone;
  tensors and model bytes go through collectives: gloo on CPU, NCCL between GPUs.
- A failure on any rank is claimed in the store: the first rank to fail prints the one error line,
  the others stop without a message of their own.

A plain ``deploycraft run`` is a world of one process: every method here is then a pass-through and no
process group exists, so single-process runs are exactly what they were.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from deploycraft.errors import UserError

# Ranks waiting for rank 0 poll the store this often: short against any stage, long enough to stay idle.
POLL_S = 0.2
# A rank that sees another rank's failure waits this long for the launcher to stop it, so that the
# launcher names the failing rank, not this one, as the first to exit (torchrun's "root cause").
LINGER_S = 30.0
# Collectives inside data-parallel stages (gradients, model bytes, evaluation counts) are short; a peer
# that stops answering for this long has hung.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class PeerFailure(Exception):
    """Another rank failed first (its line is in the store): this rank stops without a message of its own."""

    exit_code = 1

    def __init__(self, line: str | None):
        super().__init__(line or "another rank stopped")
        self.line = line


class Terminated(KeyboardInterrupt):
    """SIGTERM from the launcher (torchrun stops every rank when one fails): unwinds like Ctrl-C, so the
    run folder is left resumable."""


def launched() -> bool:
    """Whether a launcher such as torchrun started this process as one rank of a group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class World:
    """The processes of one run: their count, this one's rank, and the ways they talk."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    store: Any = None  # the launcher's key-value store; None for a single process
    backend: str | None = None  # set once the process group exists
    _seq: int = 0
    _bytes_group: Any = field(default=None, repr=False)  # gloo group for bytes (the default one unless NCCL)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        """Whether a process group exists (torchrun started us, even as a world of one)."""
        return self.backend is not None

    @property
    def label(self) -> str:
        """The prefix of this rank's messages: empty for a single process."""
        return f"rank {self.rank}: " if self.size > 1 else ""

    @property
    def shard(self) -> tuple[int, int] | None:
        """(rank, world size) for sharding data; None for one process (the unsharded path)."""
        return (self.rank, self.size) if self.size > 1 else None

    # --- the process group -----------------------------------------------------------------------
    def start(self, device: str) -> None:
        """Create the process group: NCCL between GPUs, gloo on CPU. Idempotent; nothing for one process."""
        if self.store is None or self.backend is not None:
            return
        import torch.distributed as dist

        backend = "gloo"
        if device.startswith("cuda"):
            if not dist.is_nccl_available():
                raise UserError(
                    "training on cuda with several processes needs NCCL, which this torch build lacks",
                    field="device",
                    fix="install a CUDA build of torch (it ships NCCL), or set device: cpu (gloo)",
                )
            if self.local_rank >= torch.cuda.device_count():
                raise UserError(
                    f"process {self.local_rank} on this machine has no GPU of its own "
                    f"({torch.cuda.device_count()} visible)",
                    field="device",
                    fix="start at most one process per GPU (torchrun --nproc-per-node), or set device: cpu",
                )
            torch.cuda.set_device(self.local_rank)  # "cuda" now means this rank's GPU
            backend = "nccl"
        dist.init_process_group(
            backend, store=self.store, rank=self.rank, world_size=self.size, timeout=COLLECTIVE_TIMEOUT
        )
        self.backend = backend
        # Model and checkpoint bytes travel as CPU tensors: NCCL carries only GPU tensors.
        self._bytes_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD

    def stop(self) -> None:
        if self.backend is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.backend = None

    # --- control messages through the store (no collective: nobody times out while rank 0 works) -------
    def _key(self, name: str) -> str:
        return f"deploycraft/{name}"

    def publish(self, obj: Any) -> Any:
        """Rank 0 sends ``obj`` (JSON) to every rank; each rank returns it. Ranks call this in the same order."""
        if self.size == 1:
            return obj
        self._seq += 1
        key = self._key(f"msg/{self._seq}")
        if self.is_main:
            self.store.set(key, json.dumps(obj, default=str))
            return obj
        while True:
            if self.store.check([key]):
                return json.loads(self.store.get(key))
            line = self.failure()
            if line is not None:
                raise PeerFailure(line)
            time.sleep(POLL_S)

    def claim_failure(self, line: str) -> bool:
        """Record this rank's failure; True if it is the first (that rank prints the one error line)."""
        if self.size == 1:
            return True
        try:
            first = self.store.add(self._key("failures"), 1) == 1
            if first:
                self.store.set(self._key("failure"), self.label + line)
            return first
        except Exception:  # noqa: BLE001 - the store died with rank 0: say it here rather than not at all
            return True

    def failure(self) -> str | None:
        """The line of the rank that failed first, if any rank has."""
        if self.size == 1:
            return None
        try:
            key = self._key("failure")
            return self.store.get(key).decode() if self.store.check([key]) else None
        except Exception:  # noqa: BLE001 - an unreachable store means rank 0 is gone
            return None

    def linger(self) -> None:
        """After another rank's failure: wait for the launcher to stop this process (SIGTERM ends the wait)."""
        disarm()
        deadline = time.monotonic() + LINGER_S
        while self.size > 1 and not _signals["received"] and time.monotonic() < deadline:
            time.sleep(0.1)

    # --- collectives (inside data-parallel stages, where every rank takes part) -----------------------
    def broadcast_bytes(self, payload: bytes | None) -> bytes:
        """Rank 0's bytes on every rank."""
        if self.size == 1:
            return payload or b""
        import torch.distributed as dist

        n = torch.tensor([len(payload or b"") if self.is_main else 0], dtype=torch.int64)
        dist.broadcast(n, 0, group=self._bytes_group)
        if int(n) == 0:
            return b""
        buf = (
            torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            if self.is_main
            else torch.empty(int(n), dtype=torch.uint8)
        )
        dist.broadcast(buf, 0, group=self._bytes_group)
        return payload if self.is_main else buf.numpy().tobytes()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums over the ranks (float64 on the CPU, exact for counts)."""
        if self.size == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self._bytes_group)
        return t.tolist()

    def sync_module(self, module: nn.Module, buffers_only: bool = False) -> None:
        """Give every rank rank 0's parameters and buffers (or buffers only) of ``module``, in place."""
        if self.size == 1:
            return
        import torch.distributed as dist

        tensors = list(module.buffers()) + ([] if buffers_only else [p.data for p in module.parameters()])
        for t in tensors:
            dist.broadcast(t, 0)

    def average_gradients(self, module: nn.Module) -> None:
        """Average the gradients of a module that DDP does not wrap (distillation adapters), as DDP does."""
        if self.size == 1:
            return
        import torch.distributed as dist

        for p in module.parameters():
            if p.requires_grad:
                if p.grad is None:  # an empty shard on this rank: it contributes zeros
                    p.grad = torch.zeros_like(p)
                p.grad.div_(self.size)
                dist.all_reduce(p.grad)

    def wrap(self, model: nn.Module, device: str) -> nn.Module:
        """The model DDP trains (it averages gradients over the ranks and keeps rank 0's buffers)."""
        if not self.parallel:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.cuda.current_device()] if device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)

    # --- models and checkpoints: rank 0 reads the run folder, every rank gets the bytes ---------------
    def share_model(
        self, make: Callable[[], nn.Module | None], spec_of: Callable[[nn.Module], dict]
    ) -> nn.Module | None:
        """``make`` runs on rank 0 alone (it may read files) and returns a model or None; every rank gets that
        model (or None), rebuilt from ``spec_of(model)`` (models/io.py) and a weights_only state dict."""
        if self.size == 1:
            return make()
        from deploycraft.models.io import build_from_spec

        model = None
        payload = None
        if self.is_main:
            model = make()
            if model is not None:
                buf = io.BytesIO()
                torch.save({"spec": spec_of(model), "state": model.state_dict()}, buf)
                payload = buf.getvalue()
        payload = self.broadcast_bytes(payload)
        if self.is_main or not payload:
            return model
        obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        model = build_from_spec(obj["spec"])
        model.load_state_dict(obj["state"], strict=True)
        return model.eval()

    def load_model(self, folder: Path) -> nn.Module:
        """The saved model in ``folder`` (spec.json + weights.pt) on every rank, read by rank 0."""
        from deploycraft.models.io import load_model, read_spec

        return self.share_model(lambda: load_model(folder), lambda _: read_spec(folder))

    def load_checkpoint(self, read: Callable[[], dict | None]) -> dict | None:
        """A training checkpoint read (and checked) by rank 0, on every rank."""
        if self.size == 1:
            return read()
        payload = None
        if self.is_main:
            state = read()
            if state is not None:
                buf = io.BytesIO()
                torch.save(state, buf)
                payload = buf.getvalue()
        payload = self.broadcast_bytes(payload)
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True) if payload else None


SINGLE = World()


# SIGTERM (torchrun stops every rank when one fails) interrupts the work like Ctrl-C, once, and only while
# armed: a run that is already failing finishes writing its status and its one line.
_signals = {"armed": False, "received": False}


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
    _signals["received"] = True
    if _signals["armed"]:
        _signals["armed"] = False
        raise Terminated()


def disarm() -> None:
    """From here on a SIGTERM is noted, not raised: the failure being handled is reported first."""
    _signals["armed"] = False


@contextmanager
def interruptible() -> Iterator[None]:
    """The work a SIGTERM may interrupt (a run's stages); one that came before it starts stops it at once."""
    if _signals["received"]:
        raise Terminated()
    _signals["armed"] = True
    try:
        yield
    finally:
        _signals["armed"] = False


@contextmanager
def launch() -> Iterator[World]:
    """The world of this process: joined through the launcher's store when torchrun started it, else one
    process. The process group itself is created by ``World.start`` once the recipe names the device."""
    if not launched():
        # alone, a SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C too: run.json says interrupted
        # (only the main thread may set a handler; elsewhere SIGTERM keeps its default)
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
        try:
            yield World()
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
            _signals["received"] = False
        return
    import torch.distributed as dist

    from deploycraft import progress

    store, rank, size = next(dist.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
    world = World(rank=rank, size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")), store=store)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    progress.set_quiet(not world.is_main)  # one console: rank 0's
    try:
        yield world
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.set_quiet(False)
        world.stop()


@contextmanager
def sync_batchnorm(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Train with torch's SyncBatchNorm (batch statistics over every rank's shard), then put the model's
    own BatchNorm modules back: they share their parameters and buffers with the synced ones, so they
    hold the trained values, and saving, pruning and export see the model's usual layer types."""
    if not enabled:
        yield
        return
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if converted is not model:
        raise ValueError("the model itself is a BatchNorm layer")
    try:
        yield
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)
