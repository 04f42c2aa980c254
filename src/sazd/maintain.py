"""Keeping a coded model trainable in any training loop: ``Maintainer``.

```python
keeper = sazd.Maintainer(model)                 # model: parallelized
for xb, yb in loader:
    optimizer.zero_grad(); loss_fn(model(xb), yb).backward(); optimizer.step()
    keeper.step()                               # repair dead workers, check k are alive
    if keeper.spare == 0: keeper.save(path, optimizer)   # no redundancy left: save while we can
```

``step()`` respawns each dead worker and repairs it (its coded blocks re-encoded from the weights
decoded from k live workers, DEU momentum included), and raises ``ClusterError`` when fewer than k
workers are alive. ``stragglers()`` says which workers lag behind. ``save`` / ``load`` write and
read a checkpoint of the plain weights, the DEU momentum kept on the workers and the optimizer state;
the Trainer uses the same object.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sazd.parallel.plan import by_weight_name, coded_layers, context, load_weights, read_matrices, repair
from sazd.runtime.cluster import ClusterError


class Maintainer:
    """Repair, the alive check, stragglers and checkpoints of one parallelized ``model``."""

    def __init__(self, model: nn.Module, repair: bool = True) -> None:
        self.model = model
        self.ctx = context(model)
        self.repair = repair
        self.steps = 0
        self.repairs: list[dict[str, Any]] = []  # one record per repaired worker
        self.run_id = uuid.uuid4().hex  # names this run's checkpoints (``load`` takes the saved one's)

    @property
    def cluster(self) -> Any:
        return self.ctx.cluster

    @property
    def spare(self) -> int:
        """Live workers beyond the k a round needs (0: the next death stops training)."""
        return len(self.cluster.alive()) - self.ctx.code.k

    def step(self) -> list[dict[str, Any]]:
        """After each optimizer step: repair dead workers (when enabled), then check that enough
        workers are alive to decode. Returns this step's repair records."""
        done = self.repair_dead() if self.repair else []
        self.check_alive()
        self.steps += 1
        return done

    def check_alive(self) -> None:
        alive = self.cluster.alive()
        if not self.ctx.code.can_decode(alive):
            raise ClusterError(f"fewer than k={self.ctx.code.k} workers alive ({alive})")

    def repair_dead(self) -> list[dict[str, Any]]:
        """Respawn and repair every dead worker while k live ones can decode; one record each."""
        done = []
        for j in range(self.ctx.code.n):
            if j in self.cluster.alive() or not self.ctx.code.can_decode(self.cluster.alive()):
                continue
            try:
                self.cluster.respawn(j)
            except (ClusterError, NotImplementedError):
                continue
            start = time.perf_counter()
            info = repair(self.model, j)
            info.update(iteration=self.steps, seconds=time.perf_counter() - start)
            done.append(info)
        self.repairs.extend(done)
        return done

    def stragglers(self) -> list[int]:
        """Live workers still busy with older work: the next compute round leaves them out."""
        ready = set(self.cluster.ready_workers(self.ctx.code.k))
        return [j for j in self.cluster.alive() if j not in ready]

    # ------------------------------------------------------------ checkpoints
    def state(self, blocks: bool = False) -> CodedState:
        """Everything of the model's coded state, decoded in one round of the workers (``blocks``,
        DEU: that round asks every live worker and the state keeps each one's coded blocks too)."""
        states, raw = None, {}
        if blocks and self.ctx.scheme.decodes_weight:
            keys = [key for layer in coded_layers(self.model) for key in layer.keys]
            states = self.ctx.fetch_state(keys, every=True)
            raw = {f"{j}/{key}{suffix}": t for j, state in states.items()
                   for part, suffix in (("weights", ""), ("momentum", "/momentum_buffer"))
                   for key, t in state[part].items()}
        matrices, buffers = read_matrices(self.model, momentum=True, states=states)
        _, momentum = by_weight_name(self.model, matrices, buffers)
        columns: dict[str, Tensor] = {}
        if self.ctx.scheme.decodes_weight:  # DEU's two copies drift apart by rounding: keep both
            for layer in coded_layers(self.model):
                col = layer.keys[1]
                columns[col] = matrices[col]
                if col in buffers:
                    columns[f"{col}/momentum_buffer"] = buffers[col]
        with self._showing(matrices):
            model = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        return CodedState(model, momentum, columns, raw)

    @contextlib.contextmanager
    def _showing(self, matrices: dict[str, Tensor]) -> Iterator[None]:
        """``state_dict`` shows ``matrices``' row copies for the layers it would decode anew, and
        only inside the block (a decode of every worker's blocks rounds differently from the first
        k's, which is what ``layer.weight`` shows)."""
        layers = [m for m in coded_layers(self.model) if getattr(m, "decoded", False) is None]
        for m in layers:
            m.decoded = matrices[m.keys[0]].reshape(m.weight_shape)
        try:
            yield
        finally:
            for m in layers:
                m.decoded = None

    def load_state(self, state: CodedState) -> None:
        """Load a ``state()`` (plain weights, DEU momentum and column copies) and ship it once."""
        coded = {f"{layer.name}.weight" for layer in coded_layers(self.model)}
        missing, unexpected = self.model.load_state_dict(
            {key: t for key, t in state.model.items() if key not in coded}, strict=False)
        wrong = sorted({*unexpected, *(key for key in missing if key not in coded)})
        if wrong:
            raise ValueError(f"the state does not fit the model: {wrong[:5]} missing or unexpected")
        load_weights(self.model, state.model, state.momentum or None, columns=state.columns or None)

    def save(self, path: str | Path, optimizer: torch.optim.Optimizer | None = None,
             meta: dict[str, Any] | None = None) -> Path:
        """A checkpoint (``sazd.train.checkpoint``: safetensors + JSON with checksums) of the model's
        plain weights, the DEU momentum and ``optimizer.state_dict()``."""
        from sazd.train import checkpoint

        state = self.state()
        optim = {f"{name}/momentum_buffer": t for name, t in state.momentum.items()}
        meta = {"steps": self.steps, "run_id": self.run_id, **(meta or {})}
        if optimizer is not None:
            tensors, meta["optimizer"] = _split_tensors(optimizer.state_dict())
            optim.update(tensors)
        return checkpoint.save(path, checkpoint.Checkpoint(model=state.model, optim=optim, meta=meta,
                                                           columns=state.columns))

    def load(self, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """Restore what ``save`` wrote; returns the checkpoint's metadata."""
        from sazd.train import checkpoint

        ckpt = checkpoint.load(path)
        momentum = {key.split("/")[0]: t for key, t in ckpt.optim.items()
                    if "/" in key and not key.startswith("#") and key.endswith("/momentum_buffer")}
        self.load_state(CodedState(ckpt.model, momentum, ckpt.columns))
        if optimizer is not None and "optimizer" in ckpt.meta:
            optimizer.load_state_dict(_join_tensors(ckpt.meta["optimizer"], ckpt.optim))
        self.steps = int(ckpt.meta.get("steps", 0))
        self.run_id = str(ckpt.meta.get("run_id", self.run_id))
        return ckpt.meta


class CodedState:
    """The plain ``state_dict`` of a coded model, its DEU momentum by weight name, DEU's column copies
    ({"fc1.col": W^T, "fc1.col/momentum_buffer": ...}) and, when asked for, every worker's coded
    blocks ({"<j>/fc1.row": C_j, "<j>/fc1.row/momentum_buffer": ...})."""

    def __init__(self, model: dict[str, Tensor], momentum: dict[str, Tensor],
                 columns: dict[str, Tensor], blocks: dict[str, Tensor] | None = None) -> None:
        self.model, self.momentum, self.columns = model, momentum, columns
        self.blocks = blocks or {}


def _split_tensors(state: Any, path: str = "#optimizer") -> tuple[dict[str, Tensor], Any]:
    """(tensors by path, the JSON-able rest with each tensor replaced by {"tensor": path})."""
    if isinstance(state, Tensor):
        return {path: state.detach().clone()}, {"tensor": path}
    if isinstance(state, dict):
        tensors, out = {}, {}
        for key, value in state.items():
            t, out[str(key)] = _split_tensors(value, f"{path}/{key}")
            tensors.update(t)
        return tensors, {"dict": out, "int_keys": [str(k) for k in state if isinstance(k, int)]}
    if isinstance(state, (list, tuple)):
        tensors, out = {}, []
        for i, value in enumerate(state):
            t, v = _split_tensors(value, f"{path}/{i}")
            tensors.update(t)
            out.append(v)
        return tensors, {"list": out}
    return {}, {"value": state}


def _join_tensors(meta: Any, tensors: dict[str, Tensor]) -> Any:
    if "tensor" in meta:
        return tensors[meta["tensor"]]
    if "dict" in meta:
        ints = set(meta["int_keys"])
        return {(int(k) if k in ints else k): _join_tensors(v, tensors) for k, v in meta["dict"].items()}
    if "list" in meta:
        return [_join_tensors(v, tensors) for v in meta["list"]]
    return meta["value"]
