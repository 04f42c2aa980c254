"""Keeping a coded model trainable in any training loop: ``Maintainer``.

```python
keeper = sazd.Maintainer(model)                 # model: parallelized
for xb, yb in loader:
    optimizer.zero_grad(); loss_fn(model(xb), yb).backward(); optimizer.step()
    keeper.step()                               # repair dead workers, check k are alive
    if keeper.spare == 0: keeper.save(path, optimizer)   # no redundancy left: save while we can
```

``step()`` respawns the dead workers together and repairs them (their coded blocks re-encoded from
the weights decoded once from k live workers, DEU momentum included), and raises ``ClusterError``
when fewer than k workers are alive. ``stragglers()`` says which workers lag behind. ``state()`` /
``load_state()`` read (in one round of the workers) and restore the plain weights, the DEU momentum
kept on the workers and DEU's column copies; ``save`` / ``load`` put them and the optimizer's state
in one file. The Trainer uses the same object (its checkpoints: ``sazd.train.checkpoint``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sazd.parallel.coded import CodedLayer
from sazd.parallel.optimizer import workers_state_left_out
from sazd.parallel.plan import (
    by_weight_name,
    check_blocks,
    check_weights,
    coded_layers,
    context,
    load_weights,
    read_matrices,
    repair,
)
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
        """Respawn every dead worker while k live ones can decode, all together, and repair them from
        one read of the weights; one record per repaired worker."""
        alive = self.cluster.alive()
        dead = [j for j in range(self.ctx.code.n) if j not in alive]
        if not dead or not self.ctx.code.can_decode(alive):
            return []
        try:
            self.cluster.respawn(*dead)
        except (ClusterError, NotImplementedError):  # one could not start: try each alone
            for j in dead:
                with contextlib.suppress(ClusterError, NotImplementedError):
                    self.cluster.respawn(j)
        renewed = [j for j in dead if j in self.cluster.alive()]
        if not renewed:
            return []
        start = time.perf_counter()
        info = repair(self.model, *renewed)
        seconds = time.perf_counter() - start
        done = [{"worker": j, "layers": info["layers"], "momentum": info["momentum"],
                 "iteration": self.steps, "seconds": seconds} for j in renewed]
        self.repairs.extend(done)
        return done

    def stragglers(self) -> list[int]:
        """Live workers still busy with older work: the next compute round leaves them out."""
        ready = set(self.cluster.ready_workers(self.ctx.code.k))
        return [j for j in self.cluster.alive() if j not in ready]

    # ------------------------------------------------------------ checkpoints
    def state(self, blocks: bool = False) -> CodedState:
        """Everything of the model's coded state, decoded in one round of the workers (``blocks``: the
        state keeps the coded blocks of the first k workers that answered too, where the scheme needs
        them to continue exactly; a frozen worker never stalls it)."""
        layers = coded_layers(self.model)
        schemes = {id(m.scheme): m.scheme for m in layers}.values()
        states, raw = None, {}
        if blocks:
            for scheme in schemes:
                fetched = scheme.fetch_blocks(self.ctx, [m for m in layers if m.scheme is scheme])
                for j, state in (fetched or {}).items():
                    merged = (states := states or {}).setdefault(j, {"weights": {}, "momentum": {}})
                    merged["weights"].update(state["weights"])
                    merged["momentum"].update(state["momentum"])
            prefix = len(self.ctx.prefix)
            raw = {f"{j}/{key[prefix:]}{suffix}": t for j, state in (states or {}).items()
                   for part, suffix in (("weights", ""), ("momentum", "/momentum_buffer"))
                   for key, t in state[part].items()}
        matrices, buffers = read_matrices(self.model, momentum=True, states=states)
        _, momentum = by_weight_name(self.model, matrices, buffers)
        columns: dict[str, Tensor] = {}
        for scheme in schemes:
            own = [m for m in layers if m.scheme is scheme]
            columns.update(scheme.checkpoint_columns(own, matrices, buffers))
        with _showing(layers, matrices):
            model = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        return CodedState(model, momentum, columns, raw)

    def load_state(self, state: CodedState) -> None:
        """Load a ``state()`` (plain weights, DEU momentum and column copies) and ship it once. Every
        part is checked against the model before anything changes (all or nothing)."""
        check_state(self.model, state)
        if state.blocks:
            check_blocks(self.model, state.blocks, state.model)
        coded = {layer.weight_name for layer in coded_layers(self.model)}
        plain = {key: t for key, t in state.model.items() if key not in coded}
        self.model.load_state_dict(plain, strict=False)
        load_weights(self.model, state.model, state.momentum or None, columns=state.columns or None)

    def save(self, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> Path:
        """Write the model's ``state()`` (one round of the workers) and ``optimizer.state_dict()`` to
        ``path`` with ``torch.save``; ``load`` reads it back."""
        state = self.state()
        saved = None
        if optimizer is not None:
            with workers_state_left_out(optimizer):  # the workers' momentum is in ``state``
                saved = optimizer.state_dict()
        payload = {"format": CHECKPOINT_FORMAT, "steps": self.steps, "model": state.model,
                   "momentum": state.momentum, "columns": state.columns, "optimizer": saved}
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
        state = CodedState(payload["model"], payload["momentum"], payload["columns"])
        try:
            check_state(self.model, state)
            if optimizer is not None:
                if payload["optimizer"] is None:
                    raise ValueError("it holds no optimizer state; save it with save(path, optimizer)")
                check_optimizer_state(optimizer, payload["optimizer"])
        except ValueError as err:
            raise ValueError(f"{path}: {err}; nothing was loaded") from None
        self.load_state(state)
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        self.steps = payload["steps"]


@contextlib.contextmanager
def _showing(layers: list[CodedLayer], matrices: dict[str, Tensor]) -> Iterator[None]:
    """``state_dict`` shows ``matrices``' row copies for the weights it would decode anew, and only
    inside the block (a decode of every worker's blocks rounds differently from the first k's, which
    is what the weight shows)."""
    stale = [m for m in layers if not m.fresh]
    for m in stale:
        m.show(matrices[m.keys[0]])
    try:
        yield
    finally:
        for m in stale:
            m.fresh = False


def check_state(model: nn.Module, state: CodedState) -> None:
    """Raise ValueError naming the first part of ``state`` that does not fit ``model``: its keys,
    shapes and dtypes (plain weights, DEU momentum, column copies)."""
    want = model.state_dict(keep_vars=True)  # the live tensors: no decode round
    missing = sorted(set(want) - set(state.model))
    unexpected = sorted(set(state.model) - set(want))
    if missing or unexpected:
        raise ValueError(f"the state does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for key, t in state.model.items():
        if tuple(t.shape) != tuple(want[key].shape):
            raise ValueError(f"the state's {key!r} has shape {tuple(t.shape)}, the model's is "
                             f"{tuple(want[key].shape)}")
    check_weights(model, state.model, state.momentum or None, state.columns or None)


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """Raise ValueError when ``saved`` (an ``optimizer.state_dict()``) does not fit ``optimizer``."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        raise ValueError("its optimizer state is not an optimizer.state_dict()")
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    saved_sizes = [len(g.get("params", ())) for g in saved["param_groups"]]
    if sizes != saved_sizes:
        raise ValueError(f"its optimizer state has parameter groups of sizes {saved_sizes}, the optimizer's "
                         f"are {sizes} (another model's or another optimizer's state)")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    for index, entry in saved.get("state", {}).items():
        if index not in ids:
            continue
        param = params[ids.index(index)]
        for name, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"its optimizer state {name!r} of parameter {ids.index(index)} has shape "
                                 f"{tuple(value.shape)}, the parameter's is {tuple(param.shape)}")


class CodedState:
    """The plain ``state_dict`` of a coded model, its DEU momentum by weight name, DEU's column copies
    ({"fc1.col": W^T, "fc1.col/momentum_buffer": ...}) and, when asked for, every worker's coded
    blocks ({"<j>/fc1.row": C_j, "<j>/fc1.row/momentum_buffer": ...})."""

    def __init__(self, model: dict[str, Tensor], momentum: dict[str, Tensor],
                 columns: dict[str, Tensor], blocks: dict[str, Tensor] | None = None) -> None:
        self.model, self.momentum, self.columns = model, momentum, columns
        self.blocks = blocks or {}
