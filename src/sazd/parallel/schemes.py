"""Training schemes: everything that differs between naive and DEU coded weights — where the
weight's truth lives, how an optimizer step reaches the workers, what a checkpoint keeps, what a new
optimizer resets and what the update costs. One class per scheme; a new scheme is one more subclass
of ``Scheme``, and nothing outside ``sazd.parallel`` asks which scheme a weight has.

- ``Naive``: the master's parameter is the truth; any torch optimizer steps it and the changed W is
  re-encoded and shipped (both coded copies, ``O(n * out * in)`` bytes).
- ``DEU``: the workers' blocks are the truth; worker j applies ``C_j(W) <- SGD(C_j(W), C_j(dY^T) X)``
  itself and the master's copy is a cache, decoded when read. The code is linear, so the blocks stay
  the encoding of the true weights for any update linear in (weights, gradient, momentum): SGD with
  momentum, dampening, Nesterov and weight decay.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sazd.parallel.coded import CodedLayer, raw_grad, set_raw_grad
from sazd.parallel.context import CodedContext, RoundRecord, optimizer_step_under_way
from sazd.runtime.cluster import PerWorker
from sazd.runtime.worker import SGDStep

States = dict[int, dict[str, dict[str, Tensor]]]  # worker -> {"weights"|"momentum": {key: block}}


class Scheme(ABC):
    """The behaviour of one training scheme; every method takes the coded weight (``CodedLayer``) it
    acts on. Nothing outside ``sazd.parallel`` asks which scheme a weight has: it calls these."""

    name: str
    sgd_only: bool  # whether only (linear) SGD can step the coded weights
    decodes_weight: bool  # whether the master's copy must be decoded from the workers after a step

    # ------------------------------------------------------------ holding
    def hold(self, layer: CodedLayer) -> None:
        """Ship the weight's initial value (the parameter's data), encoded."""
        self.load_weight(layer, layer.plain())

    @abstractmethod
    def reship(self, layer: CodedLayer, keep_momentum: bool = True) -> None:
        """The master's copy was written (in place, by an optimizer, ``.to(dtype)``): encode and ship it
        (DEU: the workers keep their momentum, as torch's SGD keeps its buffer)."""

    def refresh(self, layer: CodedLayer) -> None:
        """Make the master's copy of ``layer`` current (it is, unless the workers updated it)."""
        layer.fresh = True

    def grad(self, layer: CodedLayer) -> Tensor | None:
        """``W.grad`` as the plain model would have it (autograd's, here)."""
        return raw_grad(layer.param)

    @abstractmethod
    def weight_grad(self, layer: CodedLayer, xm: Tensor, dym: Tensor,
                    rounds: dict[str, RoundRecord]) -> Tensor | None:
        """Backward of one use of the weight (``rounds``: its forward and input-gradient rounds), with
        dM = dym^T xm: the gradient for autograd (parameter layout), or None when the scheme keeps it."""

    def load_weight(self, layer: CodedLayer, W: Tensor, momentum: Tensor | None = None) -> None:
        """Set the plain weight (parameter layout; DEU: and the workers' momentum) and ship it."""
        W = W.detach().to(layer.plain())
        layer.show(layer.matrices(W)[layer.keys[0]])
        moms = None if momentum is None else layer.matrices(momentum.detach().to(W))
        layer.load_matrices(layer.matrices(W), moms)
        layer.mark_shipped()

    @abstractmethod
    def row_state(self, layer: CodedLayer) -> tuple[Tensor, Tensor | None]:
        """M of the row copy and its momentum buffer (None: the master's optimizer keeps it)."""

    @abstractmethod
    def read_matrices(self, ctx: CodedContext, layers: Sequence[CodedLayer], momentum: bool,
                      exclude: Sequence[int] = (), states: States | None = None,
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Both plain matrices of ``layers`` ({row key: M, col key: M^T}) and, with ``momentum``, the
        workers' momentum buffers; never read from workers in ``exclude`` (``states``: decode these
        workers' states, already fetched)."""

    # ------------------------------------------------------------ checkpoints
    def fetch_blocks(self, ctx: CodedContext, layers: Sequence[CodedLayer]) -> States | None:
        """The blocks of ``layers`` of the first k workers that answer, when a checkpoint must keep them
        (None: it need not)."""
        return None

    def checkpoint_columns(self, layers: Sequence[CodedLayer], matrices: dict[str, Tensor],
                           buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        """The column copies a checkpoint keeps, by checkpoint key ("fc1.col", "fc1.col/momentum_buffer")."""
        return {}

    def column_shapes(self, layers: Sequence[CodedLayer], dtype: torch.dtype, momentum: bool,
                      ) -> dict[str, Tensor]:
        """Zero tensors shaped as ``checkpoint_columns`` writes them, to check a checkpoint against."""
        return {}

    # ------------------------------------------------------------ stepping
    def check_optimizer(self, optimizer: torch.optim.Optimizer, group: dict[str, Any],
                        layer: CodedLayer) -> None:
        """Raise if ``optimizer`` cannot step the layer's coded weight in this scheme."""
        return None

    def new_optimizer(self, layer: CodedLayer) -> None:
        """A new optimizer takes over the weight: state an earlier one left on the workers goes."""
        return None

    def take_optimizer_state(self, layer: CodedLayer, state: dict[str, Any]) -> None:
        """An optimizer loaded ``state`` for the weight: move what the workers keep to them."""
        return None

    def optimizer_states(self, ctx: CodedContext, layers: Sequence[CodedLayer]
                         ) -> dict[CodedLayer, dict[str, Tensor]]:
        """The optimizer state the workers keep for these weights of ``ctx``, in the parameters' layout,
        as the plain model's optimizer would save it (``optimizer.state_dict()``)."""
        return {}

    def before_step(self, ctx: CodedContext, layers: Sequence[CodedLayer]) -> None:
        """Before an optimizer step that holds these coded weights of ``ctx`` (in this scheme)."""
        return None

    @abstractmethod
    def after_step(self, ctx: CodedContext, stepped: Sequence[tuple[CodedLayer, dict[str, Any]]]) -> None:
        """After the optimizer stepped the coded weights of ``ctx`` in this scheme (each with its
        parameter group): bring the workers' blocks to the new weights, one message per worker."""

    @abstractmethod
    def update_columns(self, fan: int, batch_rows: int) -> int:
        """Columns per coded row that one update of a coded copy sends (``fan`` = its width)."""

    def __repr__(self) -> str:
        return self.name


class Naive(Scheme):
    """The master keeps W (the parameter); after each change it re-encodes and ships the coded copies."""

    name = "naive"
    sgd_only = False
    decodes_weight = False

    def reship(self, layer: CodedLayer, keep_momentum: bool = True) -> None:
        """Re-encode and ship W (the column copy only when the last step needed the input gradient),
        M^T as a view of M: sent every step, never transposed on the master."""
        copies = layer.matrices(layer.plain(), row_major=False)
        if not layer.last_input_grad:
            del copies[layer.keys[1]]
            layer.col_stale = True
        layer.load_matrices(copies)
        layer.mark_shipped()

    def weight_grad(self, layer: CodedLayer, xm: Tensor, dym: Tensor,
                    rounds: dict[str, RoundRecord]) -> Tensor:
        return layer.to_param(dym.T @ xm)

    def row_state(self, layer: CodedLayer) -> tuple[Tensor, Tensor | None]:
        return layer.matrices(layer.plain())[layer.keys[0]], None

    def read_matrices(self, ctx: CodedContext, layers: Sequence[CodedLayer], momentum: bool,
                      exclude: Sequence[int] = (), states: States | None = None,
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        copies = [layer.matrices(layer.plain()) for layer in layers]
        return {key: t.clone() for c in copies for key, t in c.items()}, {}

    def after_step(self, ctx: CodedContext, stepped: Sequence[tuple[CodedLayer, dict[str, Any]]]) -> None:
        with ctx.batched():  # one message per worker for every weight the optimizer wrote
            for layer, _ in stepped:
                layer.sync()

    def update_columns(self, fan: int, batch_rows: int) -> int:
        return fan


class DEU(Scheme):
    """Workers update their coded weights with SGD from the encoded gradient factors; the master's copy
    of W is a cache, decoded from k workers when something reads it after an update."""

    name = "deu"
    sgd_only = True
    decodes_weight = True

    def reship(self, layer: CodedLayer, keep_momentum: bool = True) -> None:
        layer.load_matrices(layer.matrices(layer.plain()), keep_momentum=keep_momentum)
        layer.mark_shipped()

    def refresh(self, layer: CodedLayer) -> None:
        """Decode the master's copy from k workers; one round decodes every DEU weight of the model
        not decoded since its last update (``state_dict`` costs one round)."""
        stale = [m for m in layer.ctx.layers.values() if m.scheme is self and not m.fresh]
        weights, _ = self.read_matrices(layer.ctx, stale, momentum=False, row_only=True)
        for m in stale:
            m.show(weights[m.keys[0]])

    def weight_grad(self, layer: CodedLayer, xm: Tensor, dym: Tensor,
                    rounds: dict[str, RoundRecord]) -> Tensor | None:
        """The factors are staged, and kept if this backward accumulates gradients; dW itself only
        when something asks for it (a hook, ``torch.autograd.grad``, ``create_graph``)."""
        if layer.forms_gradient():
            return layer.to_param(dym.T @ xm)
        layer.stage(xm, dym, rounds)
        return None

    def grad(self, layer: CodedLayer) -> Tensor | None:
        """``W.grad`` read by the user (or ``torch.nn.utils.clip_grad_norm_``): the kept factors are
        formed into it, as autograd would have (outside the optimizer's own step, which must not step
        a DEU weight on the master)."""
        if layer.keeps_gradient and not optimizer_step_under_way():
            layer.fold_gradient()
        return raw_grad(layer.param)

    def row_state(self, layer: CodedLayer) -> tuple[Tensor, Tensor | None]:
        layer.sync()
        row = layer.keys[0]
        states = layer.ctx.fetch_state([row])
        return layer.decode_key(states, row, "weights"), layer.decode_key(states, row, "momentum")

    def read_matrices(self, ctx: CodedContext, layers: Sequence[CodedLayer], momentum: bool,
                      exclude: Sequence[int] = (), states: States | None = None, row_only: bool = False,
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """In DEU the two copies are updated separately, so M^T of the column copy equals the row
        copy's M only to rounding; ``row_only`` reads the row copies alone."""
        for layer in layers:
            layer.sync()  # an edit not yet shipped
        keys = [layer.keys[0] for layer in layers] if row_only else [k for m in layers for k in m.keys]
        if states is None:
            states = ctx.fetch_state(keys, exclude)
        weights, buffers = {}, {}
        for layer in layers:
            if row_only:
                weights[layer.keys[0]] = layer.decode_key(states, layer.keys[0], "weights")
                continue
            weights.update(layer.decode_matrices(states, "weights"))
            if momentum:
                buffers.update(layer.decode_matrices(states, "momentum") or {})
        return weights, buffers

    def fetch_blocks(self, ctx: CodedContext, layers: Sequence[CodedLayer]) -> States:
        for layer in layers:
            layer.sync()
        return ctx.fetch_state([key for layer in layers for key in layer.keys])  # first k: none stalls it

    def checkpoint_columns(self, layers: Sequence[CodedLayer], matrices: dict[str, Tensor],
                           buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        """DEU's two copies drift apart by rounding: a checkpoint keeps the column copy too."""
        columns = {}
        for layer in layers:
            col, name = layer.keys[1], layer.checkpoint_keys[1]
            columns[name] = matrices[col]
            if col in buffers:
                columns[f"{name}/momentum_buffer"] = buffers[col]
        return columns

    def column_shapes(self, layers: Sequence[CodedLayer], dtype: torch.dtype, momentum: bool,
                      ) -> dict[str, Tensor]:
        columns = {}
        for layer in layers:
            name = layer.checkpoint_keys[1]
            columns[name] = torch.zeros(layer.in_features, layer.out_features, dtype=dtype)
            if momentum:
                columns[f"{name}/momentum_buffer"] = columns[name]
        return columns

    def new_optimizer(self, layer: CodedLayer) -> None:
        """torch's optimizers start without momentum: so do the workers' blocks under a new one."""
        layer.ctx.send("drop_momentum", (list(layer.keys),))

    def take_optimizer_state(self, layer: CodedLayer, state: dict[str, Any]) -> None:
        """SGD's momentum buffer of a coded weight lives on the workers, encoded."""
        buffer = state.pop("momentum_buffer", None)
        if buffer is not None:
            layer.sync()
            layer.load_matrices({}, layer.matrices(buffer.detach().to(layer.plain())))

    def optimizer_states(self, ctx: CodedContext, layers: Sequence[CodedLayer]
                         ) -> dict[CodedLayer, dict[str, Tensor]]:
        """SGD's momentum buffers, decoded from the workers' row copies in one round (none before
        momentum's first step)."""
        for layer in layers:
            layer.sync()
        states = ctx.fetch_state([layer.keys[0] for layer in layers])
        out = {}
        for layer in layers:
            momentum = layer.decode_key(states, layer.keys[0], "momentum")
            if momentum is not None:
                out[layer] = {"momentum_buffer": layer.to_param(momentum).to(layer.plain())}
        return out

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

    def before_step(self, ctx: CodedContext, layers: Sequence[CodedLayer]) -> None:
        """A weight with a ``.grad`` (read by the user, so formed; or autograd's, from a use that is no
        coded product, such as a tied embedding's lookup) sends it whole, kept factors added; torch's
        step must not see it (it would step the master's copy), so it is hidden until the step ends."""
        ctx.check_alive()  # all layers' updates go out, or none
        for layer in layers:
            if raw_grad(layer.param) is None and not layer.spent:
                continue  # the kept factors go out as they are
            layer.fold_gradient()  # the last step's gradient too, when no zero_grad came between
            layer.whole_grad = raw_grad(layer.param)
            set_raw_grad(layer.param, None)

    def after_step(self, ctx: CodedContext, stepped: Sequence[tuple[CodedLayer, dict[str, Any]]]) -> None:
        """Send every layer's pending dW = dY^T X, encoded (and scaled), in one ``Worker.sgd`` call per
        worker: worker j's row copy takes C_j(dW) = C_j(dY^T) X, its column copy C_j(dW^T) = C_j(X^T) dY.

        Per copy the master sends whichever is smaller: the encoded left factor (N columns; the right
        one is the input of this step's round of the block, which the workers asked still hold), or
        the encoded gradient itself (``fan`` columns) when N exceeds the fan (convolutions, whose N
        is batch x positions). Either way the update is the same linear map of the coded weights.
        """
        updates: dict[int, list[tuple]] = {j: [] for j in range(ctx.code.n)}
        for layer, group in stepped:
            layer.sync()  # an edit since the last product goes out before the update
            if layer.whole_grad is not None:
                self._add_whole_gradient(layer, group, updates)
            elif layer.pending:
                self._add_updates(layer, group, updates)
        if any(updates.values()):
            ctx.send("sgd", PerWorker({j: (calls,) for j, calls in updates.items()}))
        for layer, _ in stepped:
            if layer.whole_grad is not None:  # ``.grad`` stays, as after torch's step
                set_raw_grad(layer.param, layer.whole_grad)
                layer.whole_grad = None

    def _add_whole_gradient(self, layer: CodedLayer, group: dict[str, Any], updates: dict[int, list[tuple]],
                            ) -> None:
        """Append each worker's updates of ``layer``'s coded copies from its formed ``.grad``: worker
        j's copies take C_j(dM) and C_j(dM^T) (a stale column copy stays stale)."""
        step = self._sgd_step(group)
        matrices = layer.matrices(self._ascending(group, layer.whole_grad))
        for key in layer.keys if not layer.col_stale else layer.keys[:1]:
            coded = layer.ctx.encode(matrices[key].contiguous(), layer.padded[key][0])
            for j, calls in updates.items():
                calls.append((key, step, coded[j]))
        layer.fresh = False

    @staticmethod
    def _sgd_step(group: dict[str, Any]) -> SGDStep:
        return SGDStep(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                       nesterov=group["nesterov"], weight_decay=group["weight_decay"])

    @staticmethod
    def _ascending(group: dict[str, Any], gradient: Tensor) -> Tensor:
        """The gradient torch's SGD steps with: negated under ``maximize=True`` (before weight decay)."""
        return -gradient if group.get("maximize") else gradient

    def _add_updates(self, layer: CodedLayer, group: dict[str, Any], updates: dict[int, list[tuple]]) -> None:
        """Append each worker's updates of ``layer``'s coded copies (see ``Worker.sgd``)."""
        step = self._sgd_step(group)
        pending = layer.pending
        X, dY = pending.stacked()
        row, col = layer.keys
        factors = {row: (dY.T, X, layer.out_pad)}  # per copy: (left factor, right factor, padded rows)
        if col in pending.rounds:  # the column copy served this step: keep it current
            factors[col] = (X.T, dY, layer.in_pad)
        else:
            layer.col_stale = True
        for key, (left, inputs, rows) in factors.items():
            left = self._ascending(group, pending.scaled(left))
            if self.ships_gradient(X.shape[0], inputs.shape[1]):
                with layer.ctx.cluster.between_rounds():  # the product of the step, no round in flight
                    gradient = left @ inputs
                coded = layer.ctx.encode(gradient, rows)
                for j, calls in updates.items():
                    calls.append((key, step, coded[j]))
                continue
            coded = layer.ctx.encode(left, rows)
            # The workers this step's round asked still hold its inputs when it is the block's latest
            # round and the layer was used once: they get None. The others (stragglers the round
            # skipped) get the very tensor the round sent, which a store-backed cluster sends once.
            record = pending.rounds.get(key)
            fresh = record is not None and len(pending.factors) == 1 and layer.ctx.rounds.get(key) is record
            cached = record.workers if fresh else frozenset()
            inputs = record.inputs if fresh else inputs.contiguous()
            for j, calls in updates.items():  # the coded factor as rows (N, rows), as ``Worker.sgd`` takes it
                calls.append((key, step, coded[j].T, None if j in cached else inputs))
        layer.spend()
        layer.fresh = False

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


__all__ = ["DEFAULT_SCHEME", "DEU", "SCHEMES", "Naive", "Scheme", "States", "get_scheme"]
