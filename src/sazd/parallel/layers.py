"""Coded Linear and Conv2d layers: the forward / backward / update algebra.

Every coded layer is one matrix product ``Y = X W^T`` with ``W`` of shape (out, in) and ``X`` of shape
(N, in) (Linear: N = batch; Conv2d: W is (out_ch, in_ch*kh*kw) and X holds the N = batch*positions
unfolded patches). Rows are the coded axis:

- forward:        worker j returns C_j(W) X^T            -> decode W X^T       (copy "<name>.row")
- input gradient: worker j returns C_j(W^T) dY^T         -> decode W^T dY^T    (copy "<name>.col")
- weight update:  the layer's ``Scheme`` (``sazd.parallel.schemes``): ``Naive`` hands dW = dY^T X
                  to autograd and ships the re-encoded W after the optimizer step; ``DEU`` keeps
                  (X, dY) and, at the step, sends the encoded factors for worker j to apply
                            C_j(W)   <- SGD(C_j(W),   C_j(dY^T) X)
                            C_j(W^T) <- SGD(C_j(W^T), C_j(X^T) dY)
Widths not divisible by k are padded with zero rows; padded gradient rows are zero, so the padding
stays zero under SGD and is sliced off every decoded result.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sazd.codes.base import Code
from sazd.runtime.cluster import Broadcast, Cluster, ClusterError, PerWorker, resolve_args

if TYPE_CHECKING:
    from sazd.parallel.schemes import Scheme


@dataclass
class PhaseStats:
    """Master-side counters of the coded layers, accumulated; diff two snapshots for one iteration."""

    encode_s: float = 0.0
    decode_s: float = 0.0
    worker_s: float = 0.0  # in cluster calls: submit + waiting for answers (in-process: the workers' work)
    update_s: float = 0.0  # the optimizer's own step (naive: every weight; DEU: biases, uncoded layers)
    rows_encoded: int = 0
    rows_decoded: int = 0
    rounds: int = 0

    def snapshot(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, eq=False)
class RoundRecord:
    """One coded round of a block: the workers asked and the inputs they multiplied (and keep, in
    ``Worker.last_input``, until the block's next round). DEU reuses them for the step's update."""

    key: str
    workers: frozenset[int]
    inputs: Tensor


@dataclass(eq=False)
class PendingUpdate:
    """What a DEU layer's next optimizer step sends, in one place: the factors (X, dY) of
    dW = dY^T X of every use since the last step, the factor on them (clipping), and the rounds of
    the last use (forward, input gradient), whose inputs the workers they asked still hold."""

    factors: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    scale: float | Tensor = 1.0
    rounds: dict[str, RoundRecord] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.factors)

    def stacked(self) -> tuple[Tensor, Tensor]:
        """(X, dY) of every use, stacked: dW = dY^T X."""
        if len(self.factors) == 1:
            return self.factors[0]
        return torch.cat([x for x, _ in self.factors]), torch.cat([d for _, d in self.factors])

    def clear(self) -> None:
        self.factors.clear()
        self.scale = 1.0
        self.rounds.clear()


class CodedContext:
    """What all coded layers of one model share: the code, the cluster, the scheme, the counters and
    the latest round of every block."""

    live: ClassVar[weakref.WeakSet[CodedContext]] = weakref.WeakSet()  # every model's, while it lives

    def __init__(self, code: Code, cluster: Cluster, scheme: Scheme, model: nn.Module | None = None,
                 decode_device: torch.device | None = None) -> None:
        self.code = code
        self.decode_device = decode_device  # where the master decodes (None: where the activations are)
        self.cluster = cluster
        self.scheme = scheme
        self.model = None if model is None else weakref.ref(model)  # the parallelized model
        self.left_on_master: dict[str, str] = {}  # layers the plan did not code: why
        self.stats = PhaseStats()
        self.layers: dict[str, CodedLayer] = {}
        CodedContext.live.add(self)
        self.rounds: dict[str, RoundRecord] = {}  # block key -> its latest round
        self._queued: dict[int, list[tuple[str, tuple]]] | None = None  # inside batched(): per worker

    # ------------------------------------------------------------ encoding
    def encode(self, T: Tensor, rows: int) -> list[Tensor]:
        """Pad ``T`` with zero rows to ``rows`` (a multiple of k) and encode it into n blocks."""
        start = time.perf_counter()
        coded = self.code.encode(pad_rows(T, rows))
        self.stats.encode_s += time.perf_counter() - start
        self.stats.rows_encoded += rows
        return coded

    def decode(self, results: dict[int, Tensor], rows: int, device: torch.device,
               dtype: torch.dtype | None = None) -> Tensor:
        """The product from the workers' ``results``, on ``device`` in ``dtype`` (default: the results'),
        decoded on ``decode_device`` when set."""
        start = time.perf_counter()
        where = device if self.decode_device is None else self.decode_device
        out = self.code.decode({j: r.to(where) for j, r in results.items()}, rows=rows, out_dtype=dtype)
        out = out.to(device)
        self.stats.decode_s += time.perf_counter() - start
        self.stats.rows_decoded += rows
        return out

    # -------------------------------------------------------------- rounds
    def product(self, key: str, x: Tensor, rows: int) -> tuple[Tensor, RoundRecord]:
        """One coded round: the workers multiply their block ``key`` by ``x``; the first k answers
        decode into the (padded) product with ``rows`` rows. Returns it with the round's record."""
        start = time.perf_counter()
        answers = self.cluster.compute("matmul", Broadcast((key, x)), self.code.k, self.code.can_decode)
        self.stats.worker_s += time.perf_counter() - start
        self.stats.rounds += 1
        record = self.rounds[key] = RoundRecord(key, answers.workers, x)
        return self.decode(answers.results, rows, x.device, x.dtype), record

    def send(self, method: str, args: Broadcast | PerWorker, workers: Sequence[int] | None = None) -> None:
        """Fire-and-forget call to ``workers`` (default: every live one); calls to a worker run in order.
        Inside ``batched()`` the call is queued and goes out with the others when the block ends."""
        workers = self.cluster.alive() if workers is None else list(workers)
        if self._queued is not None:
            per_worker, _ = resolve_args(args, workers, self.code.n)
            for j in workers:
                self._queued.setdefault(j, []).append((method, per_worker[j]))
            return
        start = time.perf_counter()
        self.cluster.submit(method, args, workers)
        self.stats.worker_s += time.perf_counter() - start

    @contextmanager
    def batched(self) -> Iterator[None]:
        """Send the calls made inside as one ``Worker.batch`` call per worker (fewer messages; e.g. all
        layers' DEU updates of a step). Nothing is sent if the block raises."""
        if self._queued is not None:
            yield
            return
        self._queued = {}
        try:
            yield
            alive = set(self.cluster.alive())
            queued = {j: calls for j, calls in self._queued.items() if j in alive}
        finally:
            self._queued = None
        if queued:
            self.send("batch", PerWorker({j: (calls,) for j, calls in queued.items()}), sorted(queued))

    def check_alive(self) -> None:
        alive = self.cluster.alive()
        if not self.code.can_decode(alive):
            raise ClusterError(f"only workers {alive} are alive, too few to decode (k={self.code.k})")

    def fetch_state(
        self, keys: list[str], exclude: Sequence[int] = (), every: bool = False
    ) -> dict[int, dict[str, dict[str, Tensor]]]:
        """Coded weights and momentum of ``keys`` from the first decodable set of live workers
        (``every``: from every live one, e.g. to keep each worker's blocks)."""
        start = time.perf_counter()
        rnd = self.cluster.submit("state", Broadcast((keys,)),
                                  [j for j in self.cluster.alive() if j not in exclude])
        if every:
            states = self.cluster.wait_all(rnd)
            if not self.code.can_decode(list(states)):
                raise ClusterError(f"only workers {sorted(states)} answered, too few to decode "
                                   f"(k={self.code.k})")
        else:
            states = self.cluster.first_k(rnd, self.code.k, enough=self.code.can_decode)
        self.stats.worker_s += time.perf_counter() - start
        return states


def pad_rows(T: Tensor, rows: int) -> Tensor:
    """``T`` with zero rows appended up to ``rows`` rows (no copy when nothing to pad)."""
    extra = rows - T.shape[0]
    if extra == 0:
        return T
    return torch.cat([T, T.new_zeros((extra, *T.shape[1:]))])


def round_up(x: int, k: int) -> int:
    return -(-x // k) * k


class _CodedMatmul(torch.autograd.Function):
    """``Xm (N, in) -> Xm W^T (N, out)`` through the workers. ``weight`` is the parameter autograd
    hands the weight gradient to (``Scheme.autograd_weight``: naive W, DEU an empty handle)."""

    @staticmethod
    def forward(ctx: Any, xm: Tensor, weight: Tensor, layer: CodedLayer) -> Tensor:
        ctx.layer = layer
        ctx.save_for_backward(xm)
        out, ctx.round = layer.forward_product(xm)
        return out

    @staticmethod
    def backward(ctx: Any, dym: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        (xm,) = ctx.saved_tensors
        layer: CodedLayer = ctx.layer
        dym = dym.contiguous()
        rounds = {ctx.round.key: ctx.round}  # the rounds of this use of the layer
        dx = None
        if ctx.needs_input_grad[0]:
            dx, back = layer.input_grad(dym)
            rounds[back.key] = back
        dw = layer.ctx.scheme.weight_grad(layer, xm, dym, rounds) if ctx.needs_input_grad[1] else None
        return dx, dw, None


class CodedLayer(nn.Module):
    """A layer whose weight lives, encoded, on the workers. Subclasses map their input to ``Xm``.

    ``layer.weight`` reads the plain weight (naive: the master's parameter; DEU: decoded from k
    workers, cached until the next update); ``state_dict`` / ``load_state_dict`` speak plain
    weights. A weight with ``requires_grad=False`` is frozen: never updated nor shipped again.
    """

    def __init__(self, name: str, module: nn.Module, ctx: CodedContext) -> None:
        super().__init__()
        weight = module.weight.detach()
        self.name = name
        self.ctx = ctx
        self.weight_shape = tuple(weight.shape)
        self.out_features = weight.shape[0]
        self.in_features = weight[0].numel()
        k = ctx.code.k
        self.out_pad, self.in_pad = round_up(self.out_features, k), round_up(self.in_features, k)
        self.bias = None if module.bias is None else nn.Parameter(
            module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        self.frozen = not module.weight.requires_grad
        self.element_size = weight.element_size()
        self.pending = PendingUpdate()  # DEU: what the next optimizer step sends
        self.stepped = False  # whether an optimizer made by ``coded_optimizer`` holds the weight
        self.last_rows, self.last_input_grad = 0, False  # shape of the last batch, for the bytes formula
        # The column copy serves only the input gradient. A layer whose input needs none (the first
        # layer) stops shipping/updating it; it is marked stale and rebuilt from W if ever needed.
        self.col_stale = False
        ctx.scheme.hold(self, weight)

    @property
    def keys(self) -> tuple[str, str]:
        return f"{self.name}.row", f"{self.name}.col"

    @property
    def padded(self) -> dict[str, tuple[int, int]]:
        """Per copy: (padded rows, real rows)."""
        row, col = self.keys
        return {row: (self.out_pad, self.out_features), col: (self.in_pad, self.in_features)}

    # ------------------------------------------------------ the plain weight
    def __getattr__(self, name: str) -> Any:
        if name == "weight" and self.ctx.scheme.decodes_weight:
            return self.ctx.scheme.read_weight(self)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            raise AttributeError(
                f"{self.name}.weight is coded on the workers and cannot be assigned; set weights with "
                f"model.load_state_dict(...), which encodes and ships them")
        super().__setattr__(name, value)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        weight = self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        names = {"weight": self.weight_shape}
        if self.bias is not None:
            names["bias"] = tuple(self.bias.shape)
        values = {}
        for name, shape in names.items():
            if prefix + name not in state_dict:
                missing_keys.append(prefix + name)
            elif tuple(state_dict[prefix + name].shape) != shape:
                error_msgs.append(f"size mismatch for {prefix + name}: copying a param with shape "
                                  f"{tuple(state_dict[prefix + name].shape)}, the model's is {shape}")
            else:
                values[name] = state_dict[prefix + name]
        if strict:
            unexpected_keys.extend(key for key in state_dict if key.startswith(prefix)
                                   and "." not in key[len(prefix):] and key[len(prefix):] not in names)
        if "bias" in values:
            with torch.no_grad():
                self.bias.copy_(values["bias"])
        if "weight" in values:
            self.ctx.scheme.load_weight(self, values["weight"])

    # ---------------------------------------------------------- the algebra
    def forward_product(self, xm: Tensor) -> tuple[Tensor, RoundRecord]:
        """``Xm W^T`` and the record of its round."""
        self.ctx.scheme.before_product(self)
        out, record = self.ctx.product(self.keys[0], xm.T.contiguous(), self.out_pad)  # W X^T
        return out[: self.out_features].T, record

    def input_grad(self, dym: Tensor) -> tuple[Tensor, RoundRecord]:
        """``dYm W`` and the record of its round."""
        if self.col_stale:
            self.refresh_col()
        out, record = self.ctx.product(self.keys[1], dym.T.contiguous(), self.in_pad)  # W^T dY^T
        return out[: self.in_features].T, record

    def matmul(self, xm: Tensor) -> Tensor:
        self.last_rows = xm.shape[0]
        self.last_input_grad = xm.requires_grad and torch.is_grad_enabled()
        return _CodedMatmul.apply(xm, self.ctx.scheme.autograd_weight(self), self)

    # ------------------------------------------------------------ loading
    def matrices(self, W: Tensor) -> dict[str, Tensor]:
        """The two plain matrices the coded copies encode: {"<name>.row": W (out, in), "<name>.col": W^T}."""
        W2 = W.reshape(self.out_features, self.in_features)
        return {self.keys[0]: W2, self.keys[1]: W2.T}

    plain_copies = matrices  # the earlier name

    def encode_plain(self, W: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Both coded copies of the plain weight ``W`` (any shape with ``out`` rows): n blocks each."""
        copies = self.matrices(W)
        return tuple(self.ctx.encode(copies[key], self.padded[key][0]) for key in self.keys)

    def load_matrices(self, weights: dict[str, Tensor], momentum: dict[str, Tensor] | None = None,
                      workers: Sequence[int] | None = None) -> None:
        """Encode plain row/column matrices ({key: matrix}; momentum likewise) and load them on
        ``workers`` (default: every live one)."""
        coded = {key: self.ctx.encode(weights[key], self.padded[key][0]) for key in weights}
        buffers = {key: self.ctx.encode(m, self.padded[key][0]) for key, m in (momentum or {}).items()}
        args = {j: ({key: coded[key][j] for key in coded},
                    {key: buffers[key][j] for key in buffers} if momentum is not None else None)
                for j in range(self.ctx.code.n)}
        self.ctx.send("load", PerWorker(args), workers)
        self.ctx.scheme.forget_weight(self)
        if workers is None and self.keys[1] in weights:
            self.col_stale = False

    def refresh_col(self) -> None:
        """Rebuild a stale column copy on every live worker from the row copy (with its momentum)."""
        W, M = self.ctx.scheme.row_state(self)
        col = self.keys[1]
        self.load_matrices({col: self.matrices(W)[col]}, None if M is None else {col: self.matrices(M)[col]})

    def grad_norm_sq(self) -> Tensor:
        """||dW||_F^2 of the pending DEU gradient dW = dY^T X without forming dW when the N x N Gram
        matrices are smaller: ||dY^T X||^2 = sum((dY dY^T) * (X X^T))."""
        X, dY = self.pending.stacked()
        if X.shape[0] ** 2 <= self.out_features * self.in_features:
            return ((dY @ dY.T) * (X @ X.T)).sum()
        return (dY.T @ X).square().sum()

    # --------------------------------------------------- decoding state
    def decode_matrices(
        self, states: dict[int, dict[str, dict[str, Tensor]]], part: str
    ) -> dict[str, Tensor] | None:
        """Decode both plain matrices {"<name>.row": W, "<name>.col": W^T} of part="weights" (or the
        momentum buffers, part="momentum"; None when there are none) from worker states. The coded
        blocks are products with the identity, so decoding them gives the matrices themselves."""
        row, col = self.keys
        out = {}
        for key in (row,) if self.col_stale else self.keys:
            out[key] = self._decode_key(states, key, part)
            if out[key] is None:
                return None
        if self.col_stale:  # the workers' column copy is not maintained: W^T from the row copy
            out[col] = out[row].T.contiguous()
        return out

    def _decode_key(
        self, states: dict[int, dict[str, dict[str, Tensor]]], key: str, part: str
    ) -> Tensor | None:
        rows, keep = self.padded[key]
        blocks = {j: s[part][key] for j, s in states.items() if key in s[part]}
        if part == "momentum" and len(blocks) < len(states):
            if blocks:
                raise ClusterError(f"workers disagree on whether {key} has a momentum buffer")
            return None
        return self.ctx.decode(blocks, rows, self.ctx.scheme.autograd_weight(self).device)[:keep]

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, out={self.out_features} (padded {self.out_pad}), "
            f"in={self.in_features} (padded {self.in_pad}), scheme={self.ctx.scheme}, code={self.ctx.code}"
        )


class CodedLinear(CodedLayer):
    """``nn.Linear`` with its weight coded on the workers; any leading batch dimensions."""

    def __init__(self, name: str, module: nn.Linear, ctx: CodedContext) -> None:
        super().__init__(name, module, ctx)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: input has {x.shape[-1]} features, expected {self.in_features}")
        y = self.matmul(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def to_plain(self, weight: Tensor) -> nn.Linear:
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        return _fill(plain, weight, self.bias)


class CodedConv2d(CodedLayer):
    """``nn.Conv2d`` (groups=1, zero padding) as a coded product on unfolded patches."""

    def __init__(self, name: str, module: nn.Conv2d, ctx: CodedContext) -> None:
        super().__init__(name, module, ctx)
        self.in_channels, self.out_channels = module.in_channels, module.out_channels
        self.kernel_size, self.stride = module.kernel_size, module.stride
        self.padding, self.dilation = module.padding, module.dilation

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            want = f"(B, {self.in_channels}, H, W)"
            raise ValueError(f"{self.name}: input of shape {tuple(x.shape)}, expected {want}")
        B = x.shape[0]
        ho, wo = (self._out_size(x.shape[2 + i], i) for i in (0, 1))
        geometry = dict(kernel_size=self.kernel_size, dilation=self.dilation, padding=self.padding,
                        stride=self.stride)
        cols = F.unfold(x, **geometry)  # (B, C*kh*kw, L) patches; autograd's backward is F.fold
        xm = cols.transpose(1, 2).reshape(B * ho * wo, self.in_features)  # (N, in)
        ym = self.matmul(xm)  # (N, out)
        y = ym.reshape(B, ho, wo, self.out_features).permute(0, 3, 1, 2)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def _out_size(self, size: int, i: int) -> int:
        span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
        return (size + 2 * self.padding[i] - span) // self.stride[i] + 1

    def to_plain(self, weight: Tensor) -> nn.Conv2d:
        plain = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                          padding=self.padding, dilation=self.dilation, bias=self.bias is not None)
        return _fill(plain, weight, self.bias)


def _fill(plain: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    plain = plain.to(dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias.detach())
    return plain
