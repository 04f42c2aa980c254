"""Training schemes: how a coded layer holds its weight, how an optimizer step reaches the workers,
and what the update costs. One class per scheme; a new scheme is one more subclass of ``Scheme``.

- ``Naive``: the master keeps W as a parameter; any torch optimizer steps it and the changed W is
  re-encoded and shipped (both coded copies, ``O(n * out * in)`` bytes).
- ``DEU``: the master keeps no plain weight; worker j applies ``C_j(W) <- SGD(C_j(W), C_j(dY^T) X)``
  itself. The code is linear, so its blocks stay the encoding of the true weights for any update
  linear in (weights, gradient, momentum): SGD with momentum, dampening, Nesterov and weight decay.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sazd.parallel.layers import CodedContext, CodedLayer, RoundRecord
from sazd.runtime.cluster import PerWorker
from sazd.runtime.worker import SGDStep

States = dict[int, dict[str, dict[str, Tensor]]]  # worker -> {"weights"|"momentum": {key: block}}


class CodedWeight(nn.Parameter):
    """The parameter through which a coded layer's weight meets autograd and the optimizer: the plain
    W under naive, an empty handle under DEU (the weight itself lives on the workers)."""

    layer: CodedLayer


def coded_weight(data: Tensor, layer: CodedLayer, requires_grad: bool) -> CodedWeight:
    param = CodedWeight(data, requires_grad=requires_grad)
    param.layer = layer
    return param


class Scheme(ABC):
    """The behaviour of one training scheme; every method takes the coded layer it acts on."""

    name: str
    decodes_weight: bool  # whether ``layer.weight`` is decoded from the workers
    sgd_only: bool  # whether only (linear) SGD can step the coded weights

    # ------------------------------------------------------------ holding
    @abstractmethod
    def hold(self, layer: CodedLayer, weight: Tensor) -> None:
        """Set the layer up with its initial plain ``weight`` and ship it, encoded."""

    @abstractmethod
    def autograd_weight(self, layer: CodedLayer) -> CodedWeight:
        """The parameter autograd hands the layer's weight gradient to."""

    def before_product(self, layer: CodedLayer) -> None:
        """Called before each forward round of the layer."""
        return None

    @abstractmethod
    def weight_grad(self, layer: CodedLayer, xm: Tensor, dym: Tensor,
                    rounds: dict[str, RoundRecord]) -> Tensor | None:
        """Backward of one use of the layer (``rounds``: its forward and input-gradient rounds): the
        weight gradient for autograd, or None when the scheme keeps it itself."""

    @abstractmethod
    def load_weight(self, layer: CodedLayer, W: Tensor, momentum: Tensor | None = None) -> None:
        """Set the plain weight (and DEU momentum) of the layer and ship it, encoded."""

    @abstractmethod
    def read_weight(self, layer: CodedLayer) -> Tensor:
        """The plain weight, as ``layer.weight`` shows it."""

    @abstractmethod
    def row_state(self, layer: CodedLayer) -> tuple[Tensor, Tensor | None]:
        """The plain W of the row copy and its momentum buffer (None: the master keeps it)."""

    def forget_weight(self, layer: CodedLayer) -> None:
        """The workers' blocks of the layer changed: drop what was decoded of them."""
        return None

    @abstractmethod
    def read_matrices(self, ctx: CodedContext, layers: Sequence[CodedLayer], momentum: bool,
                      exclude: Sequence[int] = (), states: States | None = None,
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Both plain matrices of ``layers`` ({"fc1.row": W, "fc1.col": W^T}) and, with ``momentum``,
        the workers' momentum buffers; never read from workers in ``exclude`` (``states``: decode
        these workers' states, already fetched)."""

    # ------------------------------------------------------------ stepping
    def check_optimizer(self, optimizer: torch.optim.Optimizer, group: dict[str, Any],
                        layer: CodedLayer) -> None:
        """Raise if ``optimizer`` cannot step the layer's coded weight in this scheme."""
        return None

    def before_step(self, ctx: CodedContext) -> None:
        """Before an optimizer step that holds coded weights of ``ctx``."""
        return None

    @abstractmethod
    def after_step(self, layer: CodedLayer, group: dict[str, Any]) -> None:
        """After the optimizer stepped (``group``: the layer's parameter group): bring the workers'
        blocks to the new weight."""

    @abstractmethod
    def update_columns(self, fan: int, batch_rows: int) -> int:
        """Columns per coded row that one update of a coded copy sends (``fan`` = its width)."""

    def __repr__(self) -> str:
        return self.name


class Naive(Scheme):
    """The master keeps W; after each change it re-encodes and ships both coded copies."""

    name = "naive"
    decodes_weight = False
    sgd_only = False

    def hold(self, layer: CodedLayer, weight: Tensor) -> None:
        layer.register_parameter("weight", coded_weight(weight.clone(), layer, not layer.frozen))
        layer.shipped_version = -1
        self.ship(layer)

    def autograd_weight(self, layer: CodedLayer) -> CodedWeight:
        return layer._parameters["weight"]

    def before_product(self, layer: CodedLayer) -> None:
        self.ship(layer, with_col=layer.last_input_grad)

    def weight_grad(self, layer: CodedLayer, xm: Tensor, dym: Tensor,
                    rounds: dict[str, RoundRecord]) -> Tensor:
        return (dym.T @ xm).reshape(layer.weight_shape)

    def load_weight(self, layer: CodedLayer, W: Tensor, momentum: Tensor | None = None) -> None:
        with torch.no_grad():
            layer.weight.copy_(W)
        self.ship(layer)

    def read_weight(self, layer: CodedLayer) -> Tensor:
        return layer._parameters["weight"]

    def row_state(self, layer: CodedLayer) -> tuple[Tensor, Tensor | None]:
        return layer.weight.detach(), None

    def read_matrices(self, ctx: CodedContext, layers: Sequence[CodedLayer], momentum: bool,
                      exclude: Sequence[int] = (), states: States | None = None,
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        copies = [layer.matrices(layer.weight.detach()) for layer in layers]
        return {key: t.clone() for c in copies for key, t in c.items()}, {}

    def after_step(self, layer: CodedLayer, group: dict[str, Any]) -> None:
        self.ship(layer, with_col=layer.last_input_grad)  # as the last step needed

    def ship(self, layer: CodedLayer, with_col: bool = True) -> None:
        """Re-encode and ship W when it changed since the last shipment (the column copy only when a
        step needs the input gradient). A change is any in-place write: torch counts them per tensor."""
        W = layer.weight
        if W._version == layer.shipped_version:
            return
        copies = layer.matrices(W.detach())
        if not with_col:
            del copies[layer.keys[1]]
            layer.col_stale = True
        layer.load_matrices(copies)
        layer.shipped_version = W._version

    def update_columns(self, fan: int, batch_rows: int) -> int:
        return fan


class DEU(Scheme):
    """Workers update their coded weights with SGD from the encoded gradient factors."""

    name = "deu"
    decodes_weight = True
    sgd_only = True

    def hold(self, layer: CodedLayer, weight: Tensor) -> None:
        layer.register_parameter("coded_weight", coded_weight(weight.new_empty(0), layer, not layer.frozen))
        layer.decoded = None
        self.load_weight(layer, weight)

    def autograd_weight(self, layer: CodedLayer) -> CodedWeight:
        return layer.coded_weight

    def weight_grad(self, layer: CodedLayer, xm: Tensor, dym: Tensor,
                    rounds: dict[str, RoundRecord]) -> None:
        layer.pending.factors.append((xm.detach(), dym.detach()))
        layer.pending.rounds = rounds
        return None

    def load_weight(self, layer: CodedLayer, W: Tensor, momentum: Tensor | None = None) -> None:
        W = W.detach().to(layer.coded_weight)
        layer.load_matrices(layer.matrices(W), None if momentum is None else layer.matrices(momentum.to(W)))

    def read_weight(self, layer: CodedLayer) -> Tensor:
        """The plain W decoded from k workers; one round decodes every layer of the model not yet
        decoded since its last update (``state_dict`` costs one round)."""
        if layer.decoded is None:
            stale = [m for m in layer.ctx.layers.values() if m.decoded is None]
            weights, _ = self.read_matrices(layer.ctx, stale, momentum=False, row_only=True)
            for m in stale:
                m.decoded = weights[m.keys[0]].reshape(m.weight_shape)
        return layer.decoded.clone()

    def forget_weight(self, layer: CodedLayer) -> None:
        layer.decoded = None

    def row_state(self, layer: CodedLayer) -> tuple[Tensor, Tensor | None]:
        row = layer.keys[0]
        states = layer.ctx.fetch_state([row])
        return layer._decode_key(states, row, "weights"), layer._decode_key(states, row, "momentum")

    def read_matrices(self, ctx: CodedContext, layers: Sequence[CodedLayer], momentum: bool,
                      exclude: Sequence[int] = (), states: States | None = None, row_only: bool = False,
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """In DEU the two copies are updated separately, so W^T of the column copy equals the row
        copy's W only to rounding; ``row_only`` reads the row copies alone."""
        keys = [layer.keys[0] for layer in layers] if row_only else [k for m in layers for k in m.keys]
        if states is None:
            states = ctx.fetch_state(keys, exclude)
        weights, buffers = {}, {}
        for layer in layers:
            if row_only:
                weights[layer.keys[0]] = layer._decode_key(states, layer.keys[0], "weights")
                continue
            weights.update(layer.decode_matrices(states, "weights"))
            if momentum:
                buffers.update(layer.decode_matrices(states, "momentum") or {})
        return weights, buffers

    # ------------------------------------------------------------ stepping
    def check_optimizer(self, optimizer: torch.optim.Optimizer, group: dict[str, Any],
                        layer: CodedLayer) -> None:
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(
                f"{type(optimizer).__name__} cannot step the DEU-coded weight of {layer.name!r}: DEU workers "
                "update their coded weights themselves, which keeps them the encoding of the true weights "
                "only for an update linear in the weights (torch.optim.SGD with momentum, dampening, "
                "Nesterov, weight decay); Adam's division by sqrt(v) is elementwise and nonlinear. Use "
                "torch.optim.SGD, or parallelize with scheme='naive' for any optimizer")
        if group.get("maximize"):
            raise ValueError(f"SGD(maximize=True) is not supported for the coded weight of {layer.name!r}")

    def before_step(self, ctx: CodedContext) -> None:
        ctx.check_alive()  # all layers' updates go out, or none

    def after_step(self, layer: CodedLayer, group: dict[str, Any]) -> None:
        """Send the pending dW = dY^T X, encoded (and scaled), to the workers:
        worker j's row copy takes C_j(dW) = C_j(dY^T) X, its column copy C_j(dW^T) = C_j(X^T) dY.

        Per copy the master sends whichever is smaller: the encoded left factor (N columns; the right
        one is the input of this step's round of the block, which the workers asked still hold), or
        the encoded gradient itself (``fan`` columns) when N exceeds the fan (convolutions, whose N
        is batch x positions). Either way the update is the same linear map of the coded weights.
        """
        if not layer.pending:
            return
        step = SGDStep(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                       nesterov=group["nesterov"], weight_decay=group["weight_decay"])
        pending = layer.pending
        X, dY = pending.stacked()
        row, col = layer.keys
        updates = {row: (dY.T, X.T, layer.out_pad)}  # per copy: (left factor, right^T, padded rows)
        if col in pending.rounds:  # the column copy served this step: keep it current
            updates[col] = (X.T, dY.T, layer.in_pad)
        else:
            layer.col_stale = True
        n = layer.ctx.code.n
        for key, (left, inputs, rows) in updates.items():
            if not (isinstance(pending.scale, float) and pending.scale == 1.0):
                left = left * pending.scale
            record = pending.rounds.get(key)
            if self.ships_gradient(X.shape[0], inputs.shape[0]):
                coded = layer.ctx.encode(left @ inputs.T, rows)
                layer.ctx.send("sgd_step", PerWorker({j: (key, coded[j], step) for j in range(n)}))
                continue
            coded = layer.ctx.encode(left, rows)
            # The workers this step's round asked still hold its inputs when it is the block's latest
            # round and the layer was used once: they get None. The others (stragglers the round
            # skipped) get the very tensor the round sent, which a store-backed cluster sends once.
            fresh = record is not None and len(pending.factors) == 1 and layer.ctx.rounds.get(key) is record
            cached = record.workers if fresh else frozenset()
            inputs = record.inputs if fresh else inputs.contiguous()
            layer.ctx.send("sgd_update", PerWorker(
                {j: (key, coded[j], None if j in cached else inputs, step) for j in range(n)}))
        pending.clear()
        layer.decoded = None

    def update_columns(self, fan: int, batch_rows: int) -> int:
        return fan if self.ships_gradient(batch_rows, fan) else batch_rows

    @staticmethod
    def ships_gradient(batch_rows: int, fan: int) -> bool:
        """Whether a coded copy's update travels as the encoded gradient (``fan`` columns per coded
        row) rather than the encoded left factor (``batch_rows`` = N columns): whichever is smaller."""
        return fan < batch_rows


SCHEMES: dict[str, Scheme] = {scheme.name: scheme for scheme in (Naive(), DEU())}
DEFAULT_SCHEME = SCHEMES["deu"]


def get_scheme(scheme: str | Scheme) -> Scheme:
    """The scheme object of a name in ``SCHEMES`` (or the object itself)."""
    if isinstance(scheme, Scheme):
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    return SCHEMES[scheme]


__all__ = ["DEFAULT_SCHEME", "DEU", "SCHEMES", "CodedWeight", "Naive", "Scheme", "get_scheme"]
