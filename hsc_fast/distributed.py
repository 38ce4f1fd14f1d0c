"""Process-group set-up for every way hsc-fast is started, plus dead-rank detection.

Launch modes (all end in one `torch.distributed` default group, created through DeepSpeed):

* `deepspeed --num_gpus N ...` / `deepspeed --hostfile ...` / one `deepspeed --no_ssh --node_rank R`
  per node, and `torchrun ...`: the launcher exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT; we read them.
* plain `python launch/train_cam.py ...`: none are set, so we declare a 1-process group on
  127.0.0.1 and a free port ourselves -- otherwise DeepSpeed falls back to MPI discovery (mpi4py).

Backend: nccl when CUDA is available, gloo otherwise (CPU training and tests). Every collective
has a timeout (`train.dist_timeout_s`).

Dead ranks: a killed process can leave its peers blocked inside a collective forever (nccl) or
for the whole timeout (gloo). `Heartbeat` runs a daemon thread per rank that bumps a counter in
the rendezvous store every second and watches the others' counters; when a peer's counter stops
moving for `timeout_s` (or the store itself -- hosted by rank 0 or the launcher -- goes away) it
logs "rank R lost" and ends this process with `EXIT_RANK_LOST`, so no rank hangs. When a
collective fails first (gloo notices a closed socket at once), `Heartbeat.lost_ranks()` names the
peers that went silent for the error message. Each stage run in a process group (the pipeline runs
CAM training, then DeepLab, in one group) watches its own store keys (`stage_namespace`): a
stage's clean end marks its ranks "done" only within its namespace, so the next stage still
detects a dead peer.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("hsc_fast.distributed")

EXIT_RANK_LOST = 75  # exit status of a rank that stops because a peer died (EX_TEMPFAIL)
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launched_by: str        # "deepspeed" | "torchrun" | "env" | "single"
    created_group: bool     # we initialised the group (and destroy it in shutdown())

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1 (for single-process groups and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_launcher(environ=os.environ) -> str:
    if "TORCHELASTIC_RUN_ID" in environ or "TORCHELASTIC_RESTART_COUNT" in environ:
        return "torchrun"
    if "RANK" in environ and "WORLD_SIZE" in environ:
        # The deepspeed launcher exports CROSS_RANK / LOCAL_SIZE beside the usual variables.
        return "deepspeed" if ("CROSS_RANK" in environ or "LOCAL_SIZE" in environ) else "env"
    return "single"


def ensure_launch_env(local_rank_arg: Optional[int] = None, environ=os.environ) -> str:
    """Fill in the variables a launcher would export; returns the detected launch mode.

    `local_rank_arg` is DeepSpeed's `--local_rank` command-line value (older launchers pass only
    that). A plain python start becomes rank 0 of a 1-process group on a free local port.
    """
    mode = detect_launcher(environ)
    if mode == "single":
        environ.setdefault("RANK", "0")
        environ.setdefault("WORLD_SIZE", "1")
        environ.setdefault("LOCAL_RANK", "0")
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        environ.setdefault("MASTER_PORT", str(free_port()))
    if local_rank_arg is not None and local_rank_arg >= 0 and "LOCAL_RANK" not in environ:
        environ["LOCAL_RANK"] = str(local_rank_arg)
    missing = [k for k in LAUNCHER_ENV if k not in environ]
    if missing:
        from hsc_fast.errors import ConfigError
        raise ConfigError(f"distributed launch: environment variable(s) {', '.join(missing)} not set "
                          f"(start with deepspeed, torchrun, or plain python without RANK/WORLD_SIZE)")
    return mode


def pick_device(local_rank: int) -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


def init_distributed(timeout_s: float = 120, local_rank_arg: Optional[int] = None,
                     use_deepspeed: bool = True) -> DistInfo:
    """Create (or join) the default process group for any launch mode; see the module doc."""
    mode = ensure_launch_env(local_rank_arg)
    local_rank = int(os.environ["LOCAL_RANK"])
    device, backend = pick_device(local_rank)
    timeout = datetime.timedelta(seconds=float(timeout_s))
    created = False
    if not dist.is_initialized():
        # nccl: turn a stuck collective into an error instead of a hang.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if use_deepspeed:
            import deepspeed
            if device.type == "cpu":
                # Skip the ~25 s JIT build of DeepSpeed's shared-memory inference all-reduce
                # (training never uses it): mark that one op as incompatible.
                from deepspeed.accelerator import get_accelerator
                builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
                if builder is not None:
                    deepspeed.ops.__compatible_ops__ = dict(deepspeed.ops.__compatible_ops__,
                                                            **{builder.NAME: False})
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout,
                                       auto_mpi_discovery=False, init_method="env://")
        else:
            dist.init_process_group(backend=backend, timeout=timeout, init_method="env://")
        created = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=device, backend=backend, launched_by=mode, created_group=created)


_DS_GROUP_CACHES = {"_WORLD_GROUP": None, "_DATA_PARALLEL_GROUP": None, "_MODEL_PARALLEL_GROUP": None,
                    "_TENSOR_MODEL_PARALLEL_GROUP": None, "_ZERO_PARAM_INTRA_PARALLEL_GROUP": None,
                    "mpu": None, "_EXPERT_PARALLEL_GROUP": {}, "_EXPERT_PARALLEL_GROUP_RANKS": {},
                    "_EXPERT_DATA_PARALLEL_GROUP": {}, "_EXPERT_DATA_PARALLEL_GROUP_RANKS": {},
                    "_ALL_TO_ALL_GROUP": {}}


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals; after destroying the default group a
    later `init_distributed` in the same process must not reuse them (several runs per test)."""
    import sys as _sys
    groups = _sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name, empty in _DS_GROUP_CACHES.items():
            if hasattr(groups, name):
                setattr(groups, name, type(empty)() if isinstance(empty, dict) else None)
    comm = _sys.modules.get("deepspeed.comm.comm")
    if comm is not None and hasattr(comm, "cdb"):
        comm.cdb = None


def shutdown(info: Optional[DistInfo]) -> None:
    """Destroy the group if we made it (lets tests run several trainings in one process)."""
    if info is not None and info.created_group and dist.is_initialized():
        dist.destroy_process_group()
        _forget_deepspeed_groups()


# ----------------------------------------------------------------------------------------------
# Small collective helpers (all no-ops on a 1-process group)
# ----------------------------------------------------------------------------------------------
def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_max_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. 'my loss was non-finite')."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of scalar metrics over ranks (one collective for the whole dict)."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_reduce_sum_int(value: int, device: torch.device) -> int:
    if world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable object on every rank (small control values only, never user data)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main_first(fn: Callable[[], object]):
    """Run `fn` on rank 0, then on the others (e.g. creating shared folders)."""
    if is_main():
        result = fn()
        barrier()
        return result
    barrier()
    return fn()


# ----------------------------------------------------------------------------------------------
# Heartbeat / dead-rank monitor
# ----------------------------------------------------------------------------------------------
def _default_store():
    from torch.distributed import distributed_c10d as c10d
    return c10d._get_default_store()


_STAGE_RUNS: dict[str, int] = {}


def stage_namespace(stage: str) -> str:
    """Heartbeat namespace of the next run of `stage` in this process ("train_cam.1", ...): the
    run number keeps even a repeated stage apart from the finished one. Same on every rank, as
    all ranks run the same sequence of stages."""
    _STAGE_RUNS[stage] = _STAGE_RUNS.get(stage, 0) + 1
    return f"{stage}.{_STAGE_RUNS[stage]}"


class Heartbeat:
    """Per-rank liveness counters in the rendezvous store; ends this process if a peer dies.

    The monitor never calls a collective, so it keeps running while the main thread is blocked
    inside one. `stop()` marks this rank as finished so that peers do not mistake a clean exit
    for a death. `namespace` prefixes the store keys ("" = the un-namespaced keys): every rank of
    one stage must use the same one, and a new stage a new one (see `stage_namespace`).
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float, interval_s: float = 1.0,
                 store=None, on_lost: Optional[Callable[[str], None]] = None, namespace: str = ""):
        self.rank, self.world_size = rank, world_size
        self.prefix = f"hsc_fast/{namespace}/" if namespace else "hsc_fast/"
        self.timeout_s, self.interval_s = float(timeout_s), float(interval_s)
        self.store = store if store is not None else _default_store()
        self.on_lost = on_lost or self._exit_lost
        self._stop = threading.Event()
        self._last_seen: dict[int, tuple[int, float]] = {}
        self._thread: Optional[threading.Thread] = None

    # Store keys -----------------------------------------------------------------------------
    def _beat_key(self, rank: int) -> str:
        return f"{self.prefix}heartbeat/{rank}"

    def _done_key(self, rank: int) -> str:
        return f"{self.prefix}done/{rank}"

    def start(self) -> "Heartbeat":
        if self.world_size > 1:
            self.store.add(self._beat_key(self.rank), 1)
            self._thread = threading.Thread(target=self._run, name="hsc-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self, finished: bool = True) -> None:
        """Stop watching; `finished` marks a clean end so peers do not take the silence for a death
        (a failing rank stays unmarked: its peers must notice it)."""
        self._stop.set()
        if self.world_size > 1 and finished:
            try:
                self.store.add(self._done_key(self.rank), 1)
            except Exception:  # the store may already be gone at the very end of a run
                pass
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 1)

    def _peer_done(self, r: int) -> bool:
        return self.store.add(self._done_key(r), 0) > 0

    def silent_ranks(self, silent_for_s: float) -> list[int]:
        """Peers whose counter has not moved for `silent_for_s` seconds (and did not finish)."""
        now = time.monotonic()
        return sorted(r for r, (_, t) in self._last_seen.items()
                      if now - t >= silent_for_s and not self._peer_done(r))

    def lost_ranks(self, wait_s: Optional[float] = None) -> list[int]:
        """After a failed collective: wait up to `wait_s` for the dead peer's counter to go stale."""
        wait_s = 5 * self.interval_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        while True:
            try:
                lost = self.silent_ranks(3 * self.interval_s)
            except Exception:
                return [0]  # the store (hosted by rank 0 / the launcher) is gone
            if lost or time.monotonic() >= deadline:
                return lost
            time.sleep(self.interval_s / 2)

    def _poll_once(self) -> Optional[str]:
        self.store.add(self._beat_key(self.rank), 1)
        now = time.monotonic()
        for r in range(self.world_size):
            if r == self.rank:
                continue
            count = self.store.add(self._beat_key(r), 0)
            prev = self._last_seen.get(r)
            if prev is None or prev[0] != count:
                self._last_seen[r] = (count, now)
            elif now - prev[1] >= self.timeout_s and not self._peer_done(r):
                return f"rank {r} lost: no heartbeat for {now - prev[1]:.0f} s (train.dist_timeout_s={self.timeout_s:g})"
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                problem = self._poll_once()
            except Exception as e:  # store unreachable: its host (rank 0 or the launcher) died
                if self._stop.is_set():
                    return
                problem = f"rank 0 lost: rendezvous store unreachable ({type(e).__name__}: {e})"
            if problem and not self._stop.is_set():
                self.on_lost(problem)
                return

    def _exit_lost(self, message: str) -> None:
        text = f"[rank {self.rank}] {message}; exiting with status {EXIT_RANK_LOST}"
        log.error(text)
        for h in logging.getLogger().handlers + log.handlers:
            try:
                h.flush()
            except Exception:
                pass
        print(text, file=sys.stderr, flush=True)
        os._exit(EXIT_RANK_LOST)
