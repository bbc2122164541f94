"""--tensor-parallel-size N: start the ranks of one engine and hold their process groups (torch.distributed).

Rank 0, the leader, is the process that builds LLMEngine: it keeps the scheduler, the sampler and the block
manager. Ranks 1..N-1, the followers, are child processes it starts (engine/tp_follower.py), one per device, on
consecutive devices from the configured one (cuda:2 with N=2: cuda:2, cuda:3; cpu: every rank on the CPU). Each
holds a shard of the model (engine/models/llama.py says which) and runs the leader's every forward pass on it.

Two process groups:
- the control group (gloo, over the host, the world group): the leader's per-step message (what to run) and the
  start-up exchange (the load spec, the KV-cache size). Gloo because these are host objects and a follower may wait
  for the next step for as long as the service is idle: its timeout is long, and a follower whose leader is gone
  ends by itself (it watches its parent).
- the device group (NCCL on CUDA, XCCL on Intel GPUs, gloo on the CPU): the all-reduces inside the forward pass
  (captured in device graphs on CUDA) and the async-scheduling path's token ids, still a device tensor. Its
  timeout is short: a rank that stops answering fails the step instead of hanging it.

The leader watches its followers: one that dies fails the next step (and the one in flight: gloo's collective
errors when its peer's socket closes; an NCCL or XCCL collective is aborted) with a TensorParallelError naming it.
One tensor-parallel engine per process: torch.distributed's world group is per process.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

FLAG = "--tensor-parallel-size"
# NVLink multicast (NVLS, symmetric memory's multicast objects) can put a shared host's GPUs out of service for
# every user of the host: never let NCCL, torch's symmetric memory or NVSHMEM use it. Set before any process group
# exists, here and in every follower's environment.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# A step's all-reduce waits for the slowest rank; longer than any kernel compile skew, short enough to fail a hung
# step within minutes rather than never.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("INFERQ_TP_TIMEOUT_S", "300"))
# Followers wait on the control group between steps for as long as the engine is idle.
IDLE_TIMEOUT = datetime.timedelta(days=365)
START_TIMEOUT_S = 900.0  # as engine/engine_process.py: loading a large checkpoint takes minutes
WATCH_INTERVAL_S = 0.2


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group died or stopped answering: the engine cannot step any more."""


def disable_multicast() -> None:
    os.environ.update(MULTICAST_OFF)


def device_backend(device: torch.device) -> str:
    """The collective library of a device type: NCCL, XCCL (where this torch has it), gloo on the CPU."""
    if device.type == "cuda":
        return "nccl"
    if device.type == "xpu":
        if not getattr(dist, "is_xccl_available", lambda: False)():
            raise ValueError(f"{FLAG} on xpu needs a torch build with XCCL (torch.distributed.is_xccl_available())")
        return "xccl"
    return "gloo"


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """The device of every rank: consecutive cards from `device`, or the CPU for all. ValueError naming the flag
    where there are not enough."""
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if size > cores:
            raise ValueError(f"{FLAG} {size} exceeds the {cores} CPU cores present (one rank per core at least)")
        return [device] * size
    count = torch.accelerator.device_count()
    first = device.index or 0
    if first + size > count:
        raise ValueError(f"{FLAG} {size} from {device} needs {device.type}:{first}..{first + size - 1}, but torch "
                         f"sees {count} {device.type} devices")
    return [torch.device(device.type, first + i) for i in range(size)]


class TensorParallel:
    """One rank's view of the group: its rank, the group's size, the all-reduce of its forward pass; the leader's
    also the followers' processes and the step messages it sends them."""

    def __init__(self, rank: int, size: int, device: torch.device, device_group) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.device_group = device_group
        self.followers: list[subprocess.Popen] = []
        self._failure: str | None = None
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()
        self.ready = False  # set by the leader's engine once the followers run steps (they then take a stop message)

    # ---- the forward pass ----

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks, in place (a row-parallel projection's partial outputs)."""
        try:
            dist.all_reduce(x, group=self.device_group)
        except Exception as exc:  # noqa: BLE001 - gloo's error for a peer that died mid-step: say which
            raise self.failed(exc) from exc
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum over the ranks, in place (at load: a sliced row's largest weight)."""
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.device_group)
        return x

    # ---- the control group: the leader sends, the followers receive ----

    def send(self, message: Any, tokens: torch.Tensor | None = None) -> None:
        """Leader: hand every follower `message` (host objects) and, when given, `tokens` (a device tensor of int64
        ids, such as the previous step's sampled tokens: it travels on the device group, without a host sync)."""
        self.check()
        try:
            dist.broadcast_object_list([message], src=0)
            if tokens is not None:
                dist.broadcast(tokens.contiguous(), src=0, group=self.device_group)
        except Exception as exc:  # noqa: BLE001 - a peer's death reads as a backend error: say which
            raise self.failed(exc) from exc

    def receive(self) -> tuple[Any, torch.Tensor | None]:
        """Follower: the leader's next message, and its tokens where the message says how many (`num_on_device`)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
        count = getattr(message, "num_on_device", 0) or 0
        if not count:
            return message, None
        tokens = torch.empty(count, dtype=torch.long, device=self.device)
        dist.broadcast(tokens, src=0, group=self.device_group)
        return message, tokens

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` at the leader (None on the followers)."""
        out = [None] * self.size if self.rank == 0 else None
        with self._named_failure():
            dist.gather_object(value, out, dst=0)
        return out

    def broadcast(self, value: Any = None) -> Any:
        """The leader's `value` on every rank (start-up exchanges)."""
        box = [value]
        with self._named_failure():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def _named_failure(self):
        """The leader's start-up exchanges fail naming the follower that died (one that failed to load, say)."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - a peer's death reads as a backend error
            if self.rank != 0:
                raise
            raise self.failed(exc) from exc

    # ---- the leader's watch over its followers ----

    def check(self) -> None:
        if self._failure is not None:
            raise TensorParallelError(self._failure)

    def failed(self, exc: BaseException) -> TensorParallelError:
        """The error to raise for a collective that failed: the dead follower's, once the watcher has seen it."""
        deadline = time.monotonic() + 2.0
        while self._failure is None and time.monotonic() < deadline and self.followers:
            time.sleep(WATCH_INTERVAL_S / 2)
        return TensorParallelError(self._failure or f"a tensor-parallel collective failed: {exc}")

    def _watch(self) -> None:
        while not self._closed.wait(WATCH_INTERVAL_S):
            for rank, process in enumerate(self.followers, start=1):
                code = process.poll()
                if code is not None:
                    self._failure = (f"tensor-parallel rank {rank} (pid {process.pid}) exited with code {code}: "
                                     f"the engine cannot step without it")
                    log.error("%s", self._failure)
                    self._abort()
                    return

    def _abort(self) -> None:
        """Wake a collective that waits for a dead rank: NCCL and XCCL would wait for their timeout (gloo errors
        by itself when the peer's socket closes)."""
        if self.device.type == "cpu":
            return
        try:
            dist.distributed_c10d._abort_process_group(self.device_group)
        except Exception:  # noqa: BLE001 - best effort: the collective's own timeout still ends it
            log.exception("could not abort the tensor-parallel device group")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Leader: stop the followers (a stop message, then SIGTERM, then SIGKILL) and leave the process groups."""
        if self._closed.is_set():
            return
        self._closed.set()
        graceful = self.ready and self._failure is None and all(p.poll() is None for p in self.followers)
        if graceful:
            try:
                dist.broadcast_object_list([None], src=0)  # the followers' stop message
            except Exception:  # noqa: BLE001 - they are stopped below anyway
                graceful = False
        # A follower still starting waits in another collective: it is terminated at once.
        _stop_processes(self.followers, timeout if graceful else 0.0)
        _destroy_groups()


def start_leader(config, device: torch.device) -> TensorParallel:
    """Leader: start the followers (engine/tp_follower.py) and join the process groups with them. The followers
    then wait for the load spec (LLMEngine sends it)."""
    size = config.tensor_parallel_size
    devices = rank_devices(device, size)
    backend = device_backend(device)
    disable_multicast()
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    env = os.environ | MULTICAST_OFF
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # A follower's share of the cores; the leader keeps its process' threads.
        env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // size))
    followers = []
    try:
        for rank in range(1, size):
            command = [sys.executable, "-m", "engine.tp_follower", "--rank", str(rank), "--size", str(size),
                       "--port", str(store.port), "--device", str(devices[rank]), "--backend", backend,
                       "--parent", str(os.getpid()), "--log-level", str(logging.getLogger().getEffectiveLevel())]
            followers.append(subprocess.Popen(command, env=env))
        tp = join(0, size, devices[0], backend, store)
    except BaseException:
        _stop_processes(followers, 5.0)
        raise
    tp.followers = followers
    tp._watcher = threading.Thread(target=tp._watch, name="inferq-tp-watch", daemon=True)
    tp._watcher.start()
    log.info("tensor parallel: %d ranks on %s (%s), followers %s", size, ", ".join(map(str, devices)), backend,
             [p.pid for p in followers])
    return tp


def join(rank: int, size: int, device: torch.device, backend: str, store) -> TensorParallel:
    """Join the world (control) group and the device group as `rank`."""
    disable_multicast()
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=IDLE_TIMEOUT)
    group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return TensorParallel(rank, size, device, group)


def _stop_processes(processes: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.terminate()
    for process in processes:
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _destroy_groups() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving is best effort
            log.exception("leaving the tensor-parallel process groups failed")
