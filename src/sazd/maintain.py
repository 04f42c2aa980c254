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
workers are alive. ``stragglers()`` says which workers lag behind. ``state()`` / ``load_state()``
read (in one round of the workers) and restore the plain weights, the DEU momentum kept on the
workers and DEU's column copies; ``save`` / ``load`` put them and the optimizer's state in one file.
The Trainer uses the same object (its checkpoints: ``sazd.train.checkpoint``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sazd.parallel.plan import by_weight_name, coded_layers, context, load_weights, read_matrices, repair
from sazd.runtime.cluster import ClusterError

CHECKPOINT_FORMAT = "sazd-maintainer-1"


class Maintainer:
    """Repair, the alive check, stragglers and checkpoints of one parallelized ``model``."""

    def __init__(self, model: nn.Module, repair: bool = True) -> None:
        self.model = model
        self.ctx = context(model)
        self.repair = repair
        self.steps = 0
        self.repairs: list[dict[str, Any]] = []  # one record per repaired worker

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
        DEU: the state also keeps the coded blocks of the first k workers that answered; a frozen
        worker never stalls it)."""
        states, raw = None, {}
        if blocks and self.ctx.scheme.decodes_weight:
            keys = [key for layer in coded_layers(self.model) for key in layer.keys]
            states = self.ctx.fetch_state(keys)
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

    def save(self, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> Path:
        """Write the model's ``state()`` (one round of the workers) and ``optimizer.state_dict()`` to
        ``path`` with ``torch.save``; ``load`` reads it back."""
        state = self.state()
        payload = {"format": CHECKPOINT_FORMAT, "steps": self.steps, "model": state.model,
                   "momentum": state.momentum, "columns": state.columns,
                   "optimizer": None if optimizer is None else optimizer.state_dict()}
        path = Path(path)
        torch.save(payload, path)
        return path

    def load(self, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore what ``save`` wrote (read with ``weights_only=True``: tensors and plain data only;
        anything else is a ValueError naming the problem)."""
        try:
            payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as err:  # unreadable, truncated, or not tensors and plain data
            raise ValueError(f"{path} is not a checkpoint sazd.Maintainer.save wrote ({err})") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a checkpoint of format {CHECKPOINT_FORMAT!r}")
        for part in ("model", "momentum", "columns"):
            tensors = payload.get(part)
            if not isinstance(tensors, dict) or not all(
                    isinstance(k, str) and isinstance(t, Tensor) for k, t in tensors.items()):
                raise ValueError(f"{path}: {part!r} must map names to tensors")
        if not isinstance(payload.get("steps"), int):
            raise ValueError(f"{path}: 'steps' must be an integer")
        self.load_state(CodedState(payload["model"], payload["momentum"], payload["columns"]))
        if optimizer is not None:
            if payload["optimizer"] is None:
                raise ValueError(f"{path} holds no optimizer state; save it with save(path, optimizer)")
            optimizer.load_state_dict(payload["optimizer"])
        self.steps = payload["steps"]


class CodedState:
    """The plain ``state_dict`` of a coded model, its DEU momentum by weight name, DEU's column copies
    ({"fc1.col": W^T, "fc1.col/momentum_buffer": ...}) and, when asked for, every worker's coded
    blocks ({"<j>/fc1.row": C_j, "<j>/fc1.row/momentum_buffer": ...})."""

    def __init__(self, model: dict[str, Tensor], momentum: dict[str, Tensor],
                 columns: dict[str, Tensor], blocks: dict[str, Tensor] | None = None) -> None:
        self.model, self.momentum, self.columns = model, momentum, columns
        self.blocks = blocks or {}
