"""A site of several processes (under torchrun or accelerate launch): rank 0 takes part, every rank trains.

Rank 0 runs the worker daemon as a single process would: it alone talks to the coordinator and
holds the secure-aggregation session. When it loads the base model or trains, it first tells the
other ranks over a control channel (a gloo group with a long timeout, whatever the training
backend), sending each round's plan and global state. Then all ranks train together: every
process reads the site's files, draws the same batches and takes its rows of each
(`training.Replicas`), and DistributedDataParallel averages the gradients, scaled so that the
update is the one a single process makes on the whole batch. The other ranks run `SiteGroup.follow`
and open no connection beyond the group.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fedlora_common.manifest import flatten, unflatten
from fedlora_common.plans import RunSpec, TrainingPlan
from fedlora_worker.config import WorkerSettings
from fedlora_worker.data import TokenizedData, load_records, tokenize
from fedlora_worker.modeling import LoadedModel, SiteModel, global_state, load_model, set_global_state
from fedlora_worker.training import Replicas, TrainResult, check_plan, train_locally

__all__ = ["CLOSE_TIMEOUT", "IDLE_TIMEOUT", "Launch", "SiteGroup", "Trainer", "site_model", "train_in_process"]

log = structlog.get_logger()

IDLE_TIMEOUT = timedelta(days=7)
"""How long the other ranks wait for rank 0's next message (a round may wait long on other sites)."""

CLOSE_TIMEOUT = timedelta(minutes=2)
"""How long a closing rank waits for the others to close too (they only have the stop message to read)."""

Trainer = Callable[..., TrainResult]
"""(loaded, data, plan, *, on_step) -> TrainResult: how the daemon trains one round."""


def train_in_process(
    loaded: LoadedModel, data: TokenizedData, plan: TrainingPlan, *, on_step: Callable[[int, float], None]
) -> TrainResult:
    """A site of one process: train here, alone."""
    return train_locally(loaded.model, data, plan, pad_id=loaded.pad_id, on_step=on_step)


@dataclass(frozen=True)
class Launch:
    """This process's place in its site, as torchrun (or accelerate launch) tells it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Launch:
        """RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; one process when they are absent."""

        def number(name: str, default: int) -> int:
            return int(environ.get(name, default))

        world = number("WORLD_SIZE", 1)
        return cls(
            rank=number("RANK", 0),
            world_size=world,
            local_rank=number("LOCAL_RANK", 0),
            local_world_size=number("LOCAL_WORLD_SIZE", world),
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def site_model(settings: WorkerSettings, launch: Launch | None = None) -> SiteModel:
    """This process's share of the site's hardware.

    With several processes, `device: cuda` is the local rank's GPU, and with several on a node
    `device_map: auto` spreads the base over the local rank's equal slice of the node's GPUs.
    """
    launch = launch or Launch()
    device = settings.device
    gpus: tuple[int, ...] = ()
    if launch.local_world_size > 1 and settings.device_map == "auto":
        per_process = torch.cuda.device_count() // launch.local_world_size
        if per_process == 0:
            raise ValueError(
                f"device_map: auto with {launch.local_world_size} processes on a node of "
                f"{torch.cuda.device_count()} GPU(s) leaves a process without one"
            )
        gpus = tuple(range(launch.local_rank * per_process, (launch.local_rank + 1) * per_process))
    elif launch.distributed and device == "cuda":
        device = f"cuda:{launch.local_rank}"
    return SiteModel(
        path=settings.base_model,
        device=device,
        dtype=settings.dtype,
        device_map=settings.device_map,
        gpus=gpus,
        max_memory_per_gpu=settings.max_memory_per_gpu,
        base_precision=settings.base_precision,
        max_rank=settings.lora.max_rank,
    )


@dataclass(frozen=True)
class _Load:
    run: RunSpec


@dataclass(frozen=True)
class _Train:
    plan: TrainingPlan
    numel: int
    """Elements of the global state (float32, manifest order), sent right after this message."""
    data: str
    """A digest of rank 0's training windows: every rank must train on the same ones."""


@dataclass(frozen=True)
class _Stop:
    reason: str


class SiteGroup:
    """One process's membership of a multi-process site: the control channel, and DDP around the model."""

    def __init__(
        self,
        launch: Launch,
        site: SiteModel,
        *,
        idle_timeout: timedelta = IDLE_TIMEOUT,
        close_timeout: timedelta = CLOSE_TIMEOUT,
    ) -> None:
        if not launch.distributed:
            raise ValueError("a site group needs several processes (WORLD_SIZE > 1)")
        self.launch = launch
        self.site = site
        on_gpu = site.device.startswith("cuda") or (site.device_map == "auto" and torch.cuda.is_available())
        first_gpu = site.gpus[0] if site.gpus else torch.device(site.device).index
        if on_gpu and first_gpu is not None:  # NCCL's collectives run on the current device
            torch.cuda.set_device(first_gpu)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if on_gpu else "gloo")
        self._control: dist.ProcessGroup | None = dist.new_group(backend="gloo", timeout=idle_timeout)
        self._close_timeout = close_timeout
        self._ddp: tuple[torch.nn.Module, DistributedDataParallel] | None = None
        self._stopped = False

    # ---- rank 0: the daemon's hooks ------------------------------------------------------------

    def worker_hooks(self) -> dict[str, Any]:
        """What rank 0's `Worker` takes: this process's site model, and loading and training as a group."""
        return {"site": self.site, "load": self.load, "train": self.train}

    def load(self, run: RunSpec, site: SiteModel) -> LoadedModel:
        """Rank 0: every rank loads the run's model (each on its own devices)."""
        self._send(_Load(run))
        return load_model(run, site)

    def train(
        self, loaded: LoadedModel, data: TokenizedData, plan: TrainingPlan, *, on_step: Callable[[int, float], None]
    ) -> TrainResult:
        """Rank 0: send the plan and the global state the model holds, then train with every rank."""
        check_plan(plan, world_size=self.launch.world_size)  # refused here, before any rank starts
        state = torch.from_numpy(flatten(loaded.manifest, global_state(loaded)))
        self._send(_Train(plan, state.numel(), _digest(data)))
        dist.broadcast(state, src=0, group=self._channel())
        return train_locally(
            loaded.model, data, plan, pad_id=loaded.pad_id, on_step=on_step, replicas=self._replicas(loaded)
        )

    def stop(self, reason: str = "finished") -> None:
        """Rank 0: release the other ranks (safe to call twice)."""
        if not self._stopped and self.launch.rank == 0:
            self._stopped = True
            self._send(_Stop(reason))

    # ---- the other ranks ---------------------------------------------------------------------------

    def follow(self, settings: WorkerSettings) -> None:
        """Ranks > 0: load and train as rank 0 says until it says stop.

        A round that fails in training fails alike on rank 0, which decides what follows; so it is
        logged here and the rank waits for the next message.
        """
        records = load_records(list(settings.data.train))
        loaded: LoadedModel | None = None
        windows: dict[int, TokenizedData] = {}
        while True:
            message = self._receive()
            if isinstance(message, _Stop):
                log.info("site_stopped", reason=message.reason)
                return
            if isinstance(message, _Load):
                loaded = load_model(message.run, self.site)
                continue
            assert loaded is not None, "rank 0 trains only after it loaded"
            state = torch.empty(message.numel, dtype=torch.float32)
            dist.broadcast(state, src=0, group=self._channel())
            set_global_state(loaded, unflatten(loaded.manifest, state.numpy()))
            seq_len = message.plan.max_seq_len
            if seq_len not in windows:
                windows[seq_len] = tokenize(records, loaded.tokenizer, max_seq_len=seq_len)
            if _digest(windows[seq_len]) != message.data:
                raise ValueError(
                    f"rank {self.launch.rank} reads other training records than rank 0: every process of a site "
                    "must see the same data.train files"
                )
            try:
                train_locally(
                    loaded.model, windows[seq_len], message.plan, pad_id=loaded.pad_id, replicas=self._replicas(loaded)
                )
            except Exception as exc:
                log.error("training_failed", reason=f"{type(exc).__name__}: {exc}"[:300])

    def close(self) -> None:
        """Every rank: release the others (rank 0), meet them, and take the process groups down now.

        The ranks meet at a barrier of the control channel (at most close_timeout, so a rank that is
        gone cannot hold the others), so none tears down while another still reads the stop message.
        The groups are then destroyed with no reference to them left here: only then does torch join
        gloo's threads. A gloo thread still alive at interpreter exit, releasing an operation's tensors,
        takes the GIL during finalization and aborts the process ("terminate called without an active
        exception"). Safe to call twice.
        """
        if self._control is None:
            return
        try:
            self.stop()
            dist.monitored_barrier(group=self._control, timeout=self._close_timeout)
        except RuntimeError as exc:  # a rank that is gone or late: nothing is left to tell it
            log.warning("site_closed_alone", reason=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300])
        finally:
            self._control = None
            self._ddp = None
            if dist.is_initialized():
                dist.destroy_process_group()

    # ---- both --------------------------------------------------------------------------------------

    def _replicas(self, loaded: LoadedModel) -> Replicas:
        """DDP around the model, made once (every rank at its first training: the constructor is collective)."""
        if self._ddp is None or self._ddp[0] is not loaded.model:
            devices = {p.device for p in loaded.model.parameters()}
            device = next(iter(devices))
            one_gpu = len(devices) == 1 and device.type == "cuda"
            ddp = DistributedDataParallel(
                loaded.model,
                device_ids=[device] if one_gpu else None,
                forward_sync_buffers=False,  # buffers (rotary tables) are the same everywhere
                init_sync=False,  # and so are parameters: every rank holds the global state rank 0 sent
            )
            self._ddp = (loaded.model, ddp)
        return Replicas(model=self._ddp[1], rank=self.launch.rank, world_size=self.launch.world_size)

    def _channel(self) -> dist.ProcessGroup:
        if self._control is None:
            raise RuntimeError("this site group is closed")
        return self._control

    def _send(self, message: _Load | _Train | _Stop) -> None:
        dist.broadcast_object_list([message], src=0, group=self._channel())

    def _receive(self) -> _Load | _Train | _Stop:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self._channel())
        message = box[0]
        assert isinstance(message, _Load | _Train | _Stop), type(message)
        return message


def _digest(data: TokenizedData) -> str:
    """SHA-256 over every window's token ids and labels, and their lengths."""
    digest = hashlib.sha256()
    for rows in (data.input_ids, data.labels):
        digest.update(np.asarray([len(row) for row in rows], dtype=np.int64).tobytes())
        flat: npt.NDArray[np.int64] = np.fromiter((t for row in rows for t in row), dtype=np.int64)
        digest.update(flat.tobytes())
    return digest.hexdigest()
