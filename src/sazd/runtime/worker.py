"""One worker's state and compute. The same class runs in-process and inside a Ray actor.

A worker holds named coded weight blocks (for a coded layer ``fc1``: ``"fc1.row"`` = C_j(W) and
``"fc1.col"`` = C_j(W^T)) and, under DEU, their momentum buffers. It answers products and applies
SGD updates from encoded gradient factors. Every operation is linear in the weights, so the blocks
stay the encoding of the true weights after each update.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sazd.runtime.wire import record


@record
@dataclass(frozen=True)
class SGDStep:
    """One SGD step with PyTorch's exact semantics (``torch.optim.SGD``)."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0


def sgd_apply(weight: Tensor, grad: Tensor, buffer: Tensor | None, step: SGDStep) -> Tensor | None:
    """Apply one SGD step to ``weight`` in place and return the new momentum buffer (or None).

    Mirrors torch.optim.SGD: d = g + wd*w; buf = d (first step) or mu*buf + (1-dampening)*d;
    d = d + mu*buf (Nesterov) or buf; w -= lr*d. Each line is linear in (w, g, buf).
    """
    if step.weight_decay:
        grad = grad.add(weight, alpha=step.weight_decay)
    if step.momentum:
        if buffer is None:
            buffer = grad.clone()
        else:
            buffer.mul_(step.momentum).add_(grad, alpha=1 - step.dampening)
        grad = grad.add(buffer, alpha=step.momentum) if step.nesterov else buffer
    weight.add_(grad, alpha=-step.lr)
    return buffer


def check_method(method: str, nested: bool = False) -> None:
    """Refuse anything but a public ``Worker`` method (``nested``: inside ``batch``, not ``batch``)."""
    if not isinstance(method, str) or method not in METHODS or (nested and method == "batch"):
        raise ValueError(f"method {method!r} is not a public Worker method")


class Worker:
    """Coded state of worker ``index`` and the operations the master may ask of it."""

    COMPUTE_DTYPES = ("bfloat16", "float16")

    def __init__(self, index: int, device: str = "cpu", compute_dtype: str | None = None) -> None:
        self.index = index
        self.device = torch.device(device)
        # products in this precision (e.g. bfloat16 on a GPU), answered in it: the master's decode
        # certifies them at that precision and decodes in float32
        self.check_dtype(compute_dtype)
        self.compute_dtype = None if compute_dtype is None else getattr(torch, compute_dtype)
        self.weights: dict[str, Tensor] = {}
        self.momentum: dict[str, Tensor] = {}
        self.last_input: dict[str, Tensor] = {}  # per block: the rows its last product multiplied (DEU)
        self.delay_factor = 1.0  # straggler injection: compute takes delay_factor times longer
        self.slowdown = 1.0  # and the running call's own factor (``call``) times that
        self.updates_applied = 0
        self.compute_s = 0.0  # seconds of compute: CPU time of the computing thread (GPU: synchronized wall)

    @classmethod
    def check_dtype(cls, compute_dtype: str | None) -> str | None:
        if compute_dtype is not None and compute_dtype not in cls.COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {list(cls.COMPUTE_DTYPES)} (or None for the "
                             f"blocks' own dtype), got {compute_dtype!r}")
        return compute_dtype

    # ------------------------------------------------------------------ state
    def load(self, blocks: dict[str, Tensor], momentum: dict[str, Tensor] | None = None,
             keep_momentum: bool = False) -> int:
        """Replace (or add) coded blocks, and optionally their momentum buffers. A replaced block's
        momentum goes, unless ``keep_momentum`` (an edit of the weight, a new dtype): then it stays,
        cast to the new block's dtype."""
        # Blocks as they come (DEU's row-major, as a checkpoint's are, so that a resume rounds as the run;
        # naive's column copy a view of M^T, re-sent every step); momentum buffers row-major, as the
        # updates make them.
        for key, block in blocks.items():
            self.weights[key] = block.to(self.device).clone()
            kept = self.momentum.pop(key, None)
            if keep_momentum and kept is not None:
                self.momentum[key] = kept.to(self.weights[key].dtype)
        for key, buf in (momentum or {}).items():
            self.momentum[key] = buf.to(self.device).clone(memory_format=torch.contiguous_format)
        return self.index

    def drop(self, keys: list[str]) -> int:
        """Forget the blocks of ``keys``, their momentum and last inputs (their model is gone)."""
        for key in keys:
            for held in (self.weights, self.momentum, self.last_input):
                held.pop(key, None)
        return self.index

    def drop_momentum(self, keys: list[str]) -> int:
        """Forget the momentum buffers of ``keys`` (a new optimizer starts without momentum)."""
        for key in keys:
            self.momentum.pop(key, None)
        return self.index

    def state(self, keys: list[str] | None = None) -> dict[str, dict[str, Tensor]]:
        """Copies of the coded weights and momentum buffers (on CPU) for decoding, checkpoints and
        repair. (Every answer of a worker is a tensor it does not keep: an in-process master may hold
        it without a copy.)"""
        keys = list(self.weights) if keys is None else keys
        return {
            "weights": {key: self.weights[key].to("cpu", copy=True) for key in keys},
            "momentum": {key: self.momentum[key].to("cpu", copy=True)
                         for key in keys if key in self.momentum},
        }

    def set_delay(self, factor: float) -> int:
        if factor < 1:
            raise ValueError(f"delay factor must be >= 1, got {factor}")
        self.delay_factor = float(factor)
        return self.index

    def counters(self) -> dict[str, float]:
        """What this worker did so far: its seconds of compute (products and updates, without any
        straggler stall), the updates it applied, and its process's CPU seconds (every thread:
        compute and the overhead around it; an in-process worker shares the master's process)."""
        return {"compute_s": self.compute_s, "updates_applied": self.updates_applied,
                "process_s": time.process_time()}

    def ping(self) -> int:
        return self.index

    def lower_cpu_priority(self, nice: int) -> int:
        """Run this worker's process (every thread) at CPU niceness ``nice`` or lower priority: a spare
        worker on shared cores then takes only the cores the others leave. Never raises a thread's
        priority (that needs privileges, and would undo someone else's choice). Returns the niceness
        of the answering thread afterwards (0 where the system has no niceness)."""
        if type(nice) is not int or not 1 <= nice <= 19:
            raise ValueError(f"nice must be an integer in 1..19, got {nice!r}")
        if not hasattr(os, "setpriority"):
            return 0
        threads = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
        for tid in threads:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
            except (ProcessLookupError, PermissionError):  # a thread that ended, or one not ours to set
                continue
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    # ---------------------------------------------------------------- compute
    def matmul(self, key: str, x: Tensor) -> Tensor:
        """This worker's coded product: ``weights[key] @ x`` (x: (cols, N)); it keeps x^T (N, cols) as
        the block's last input (see ``sgd``)."""
        return self._multiply(key, x, rows_first=False)

    def linear(self, key: str, x: Tensor) -> Tensor:
        """The coded product in ``F.linear``'s orientation: ``x @ weights[key]^T`` (N, rows) for x
        (N, cols), row-major, which the master lays side by side into X W^T without transposing; it
        keeps x as the block's last input (see ``sgd``)."""
        return self._multiply(key, x, rows_first=True)

    def _multiply(self, key: str, x: Tensor, rows_first: bool) -> Tensor:
        if key not in self.weights:
            raise KeyError(f"worker {self.index} holds no block {key!r} (blocks: {sorted(self.weights)})")
        start = self._clock()
        x, w = x.to(self.device), self.weights[key]
        self.last_input[key] = x if rows_first else x.T
        a, b = (x, w.T) if rows_first else (w, x)
        if self.compute_dtype is not None and self.compute_dtype != a.dtype:  # the master decodes in float32
            a, b = a.to(self.compute_dtype), b.to(self.compute_dtype)
        out = a @ b
        self._stall(start)
        return out

    def sgd(self, updates: list[tuple]) -> int:
        """One DEU step of this worker's blocks, every layer's update in this one call.

        An update is ``(key, step, left, inputs)``: the coded gradient of block ``key`` is
        ``left^T @ inputs``, where ``inputs`` (N, cols) holds as rows what the block multiplied in the
        step's round (X for the row copy; dY for the column copy) or is None for the block's last input,
        which this worker keeps, and ``left`` (N, rows) holds as rows the coded left factor (C_j(dY^T)^T
        for the row copy, C_j(X^T)^T for the column copy): both row-major as the activations are, so
        neither is transposed on its way; or ``(key, step, grad)`` with the coded gradient C_j(dW) sent
        whole. Per block, torch.optim.SGD's step: with a momentum buffer (not Nesterov) the product
        accumulates straight into it, buf = mu*buf + (1 - dampening) * (left^T @ inputs + wd*w); plain
        SGD adds it straight into the weight. Each line is linear in (w, gradient, buf), so the blocks
        stay the encoding of the true weights."""
        start = self._clock()
        for update in updates:
            key, step, left, *inputs = update
            if key not in self.weights:
                raise KeyError(f"worker {self.index} holds no block {key!r} (blocks: {sorted(self.weights)})")
            weight, buffer = self.weights[key], self.momentum.get(key)
            left = left.to(self.device)
            if not inputs:  # the gradient itself
                buffer = sgd_apply(weight, left, buffer, step)
            else:
                right = self.last_input.get(key) if inputs[0] is None else inputs[0].to(self.device)
                if right is None:
                    raise ValueError(f"worker {self.index}: no cached input for {key!r}; send `inputs`")
                if step.momentum and not step.nesterov and buffer is not None:
                    buffer.addmm_(left.T, right, beta=step.momentum, alpha=1 - step.dampening)
                    if step.weight_decay:
                        buffer.add_(weight, alpha=(1 - step.dampening) * step.weight_decay)
                    weight.add_(buffer, alpha=-step.lr)
                elif not step.momentum and not step.weight_decay:
                    weight.addmm_(left.T, right, alpha=-step.lr)
                else:  # the first step with momentum (its buffer is the gradient), Nesterov, decay
                    buffer = sgd_apply(weight, left.T @ right, buffer, step)
            if buffer is None:
                self.momentum.pop(key, None)
            else:
                self.momentum[key] = buffer
            self.updates_applied += 1
        self._stall(start)
        return self.updates_applied

    def batch(self, calls: list[tuple[str, tuple]]) -> list:
        """Run several calls ``(method, args)`` in order as one task (one message per worker)."""
        for method, _ in calls:
            check_method(method, nested=True)
        return [getattr(self, method)(*args) for method, args in calls]

    def call(self, method: str, slowdown: float, args: tuple) -> Any:
        """Run the master's call ``method(*args)`` ``slowdown`` times slower than this worker's own
        delay factor (the answer's tensors leave through ``wire.pack``, which moves them to CPU)."""
        check_method(method)
        self.slowdown = slowdown
        try:
            return getattr(self, method)(*args)
        finally:
            self.slowdown = 1.0

    def _clock(self) -> tuple[float, float]:
        """Where a computation starts: (wall, compute) clocks."""
        return time.perf_counter(), self._compute_clock()

    def _compute_clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.thread_time()  # not the time other processes on a shared core took

    def _stall(self, start: tuple[float, float]) -> None:
        """Count the compute since ``start``; straggler injection: make it take ``delay_factor x
        slowdown`` times as long (wall)."""
        wall, compute = start
        self.compute_s += self._compute_clock() - compute
        factor = self.delay_factor * self.slowdown
        if factor > 1:
            time.sleep((factor - 1) * (time.perf_counter() - wall))


# The closed set of calls a master may make (and a worker's connection accepts): every public method
# of Worker but the dispatcher ``call`` itself, found here so that a new method joins without another edit.
METHODS = frozenset(name for name in dir(Worker)
                    if not name.startswith("_") and name != "call" and callable(getattr(Worker, name)))
