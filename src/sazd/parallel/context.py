"""What the coded weights of one model share: the code, the cluster, the counters and the rounds.

A ``CodedContext`` runs the coded rounds of every coded weight of one model (``product``), sends
fire-and-forget calls (``send``, batched per worker inside ``batched()``), encodes and decodes with the
model's code and keeps the phase counters. The coded weights themselves: ``sazd.parallel.coded``.
Several models may share one cluster: each context's block keys carry its own prefix.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from sazd.codes.base import Code
from sazd.runtime.cluster import Answers, Broadcast, Cluster, ClusterError, PerWorker, resolve_args

if TYPE_CHECKING:
    from sazd.parallel.coded import CodedLayer
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
    backwards: set[int] = field(default_factory=set)  # the graph tasks the factors came from

    def __bool__(self) -> bool:
        return bool(self.factors)

    def scaled(self, t: Tensor) -> Tensor:
        """``t`` (a factor or the formed gradient) times ``scale``; ``t`` itself when it is 1."""
        return t if isinstance(self.scale, float) and self.scale == 1.0 else t * self.scale

    def stacked(self) -> tuple[Tensor, Tensor]:
        """(X, dY) of every use, stacked: dW = dY^T X."""
        if len(self.factors) == 1:
            return self.factors[0]
        return torch.cat([x for x, _ in self.factors]), torch.cat([d for _, d in self.factors])

    def clear(self) -> None:
        self.factors.clear()
        self.scale = 1.0
        self.rounds.clear()
        self.backwards.clear()


class PreferredWait:
    """How long a round waits, once k answers are in, for those of the preferred workers 0..k-1 in
    place of spares' (a systematic code then decodes by a copy): per block key, how much longer the
    decodes from other sets took than those from the preferred, both measured (moving averages);
    no wait until both kinds were seen.

    A wait pays only when it usually brings the answers (waiting in vain costs as much as it could
    save): the share of waits that did is a moving average, and below one half (a straggler among
    the preferred) waiting pauses for 1, 2, 4, ... rounds, up to ``MAX_PAUSE``, each wait after a
    pause a probe. A wait that brings them ends the pause."""

    SMOOTHING = 0.2  # weight of the newest decode (and of the newest wait) in the averages
    MAX_PAUSE = 64  # rounds

    def __init__(self, k: int) -> None:
        self.preferred = frozenset(range(k))
        self._seconds: dict[tuple[str, bool], float] = {}  # (key, from the preferred) -> average
        self._paid = 1.0  # moving average of the waits that brought the preferred answers
        self._rounds = 0
        self._pause = 0
        self._resume_at = 0

    def patience_s(self, key: str) -> float:
        copy, other = self._seconds.get((key, True)), self._seconds.get((key, False))
        if copy is None or other is None or self._rounds < self._resume_at:
            return 0.0
        return max(0.0, other - copy)

    def record(self, key: str, answers: Answers, patience_s: float, seconds: float) -> None:
        """One round of ``key``: its answers, the patience it was given, its decode's seconds."""
        self._rounds += 1
        from_preferred = self.preferred <= set(answers.results)
        kind = (key, from_preferred)
        old = self._seconds.get(kind)
        self._seconds[kind] = seconds if old is None else old + self.SMOOTHING * (seconds - old)
        if not (patience_s > 0 and self.preferred <= answers.workers):
            return  # no wait for all of them: nothing learnt
        self._paid += self.SMOOTHING * (from_preferred - self._paid)
        if from_preferred:
            self._paid = max(self._paid, 0.5)
            self._pause = self._resume_at = 0
        elif self._paid < 0.5:
            self._pause = min(2 * self._pause or 1, self.MAX_PAUSE)
            self._resume_at = self._rounds + self._pause


@dataclass(eq=False)
class StagedUse:
    """One use's factors of dW = dY^T X from a backward that may not accumulate gradients (the
    ``graph_task`` of ``torch.autograd.grad`` never does): they join the pending update only when the
    weight's gradient accumulation runs in that same backward."""

    graph_task: int
    X: Tensor
    dY: Tensor
    rounds: dict[str, RoundRecord]


# The code of the wrapper torch puts around every optimizer's ``step`` (it runs the step hooks)
_OPTIMIZER_STEP = torch.optim.Optimizer.profile_hook_step(lambda optimizer: None).__code__


def optimizer_step_under_way() -> bool:
    """Whether an optimizer's ``step`` is running on this thread: its frame is on the stack. (A step
    that raised is over, and a step on another thread is not this one's.)"""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _OPTIMIZER_STEP:
            return True
        frame = frame.f_back
    return False


HeldLayers = tuple["Scheme", list[tuple["CodedLayer", dict]]]  # a scheme and its weights in one optimizer


class CodedContext:
    """What all coded weights of one model share: the code, the cluster, the default scheme, the
    counters, the latest round of every block and the prefix of the model's block keys."""

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
        self.layers: dict[str, CodedLayer] = {}  # by coded weight name ("fc1", "attn.in_proj_weight")
        self.block_keys: set[str] = set()  # of every layer; the workers drop them once this model is gone
        self.prefix = _claim_prefix(cluster, self)
        cluster.spare(range(code.k, code.n))  # preferred: workers 0..k-1 (systematic: a decode is a copy)
        self.preferred_wait = PreferredWait(code.k)
        CodedContext.live.add(self)
        self.rounds: dict[str, RoundRecord] = {}  # block key -> its latest round
        self._queued: dict[int, list[tuple[str, tuple]]] | None = None  # inside batched(): per worker
        self.forward_hook = -1  # the id of the model's forward pre-hook (``attached.ForwardWatch``)

    def add(self, layer: CodedLayer) -> None:
        """A coded weight of this model."""
        self.layers[layer.name] = layer
        self.block_keys.update(layer.keys)

    # ------------------------------------------------------------ encoding
    def encode(self, T: Tensor, rows: int) -> list[Tensor]:
        """Pad ``T`` with zero rows to ``rows`` (a multiple of k) and encode it into n blocks, those
        that are T's rows unchanged as views of it: every caller sends them on at once (a worker
        copies what it keeps)."""
        start = time.perf_counter()
        coded = self.code.encode(pad_rows(T, rows), copy=False)
        self.stats.encode_s += time.perf_counter() - start
        self.stats.rows_encoded += rows
        return coded

    def decode(self, results: dict[int, Tensor], rows: int, device: torch.device,
               dtype: torch.dtype | None = None, transposed: bool = False) -> Tensor:
        """The product from the workers' ``results``, on ``device`` in ``dtype`` (default: the results'),
        decoded on ``decode_device`` when set; ``transposed``: laid out as the view of its transpose's
        row-major tensor (``Code.decode``)."""
        start = time.perf_counter()
        where = device if self.decode_device is None else self.decode_device
        if any(r.device != where for r in results.values()):
            results = {j: r.to(where) for j, r in results.items()}
        out = self.code.decode(results, rows=rows, out_dtype=dtype, transposed=transposed)
        if out.device != device:
            out = out.to(device)
        self.stats.decode_s += time.perf_counter() - start
        self.stats.rows_decoded += rows
        return out

    # -------------------------------------------------------------- rounds
    def product(self, key: str, x: Tensor, rows: int) -> tuple[Tensor, RoundRecord]:
        """One coded round: the workers multiply ``x`` (N, cols) by their block ``key`` (``Worker.linear``);
        the first k answers decode into the (padded) product A x^T with ``rows`` rows, the view of its
        row-major transpose x A^T (the layout F.linear answers in). Returns it with the round's record."""
        x = x.detach()  # the workers keep it: an activation's view would keep its graph (and model) alive
        start = time.perf_counter()
        code = self.code  # which answers decode: any k of an MDS code (no test per answer), else its own
        enough = None if type(code).can_decode is Code.can_decode else code.can_decode
        patience_s = self.preferred_wait.patience_s(key)
        answers = self.cluster.compute("linear", Broadcast((key, x)), code.k, enough, patience_s)
        decoding = time.perf_counter()
        self.stats.worker_s += decoding - start
        self.stats.rounds += 1
        record = self.rounds[key] = RoundRecord(key, answers.workers, x)
        results = {j: answer.T for j, answer in answers.results.items()}  # (rows, N) views of (N, rows)
        product = self.decode(results, rows, x.device, x.dtype, transposed=True)
        self.preferred_wait.record(key, answers, patience_s, time.perf_counter() - decoding)
        return product, record

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

    # ------------------------------------------------------- optimizer steps (``coded_optimizer``)
    def before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """The step pre-hook ``coded_optimizer`` gives ``optimizer`` for this model's coded weights."""
        for scheme, stepped in self._held_by(optimizer).values():
            scheme.before_step(self, [layer for layer, _ in stepped])

    def after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """The step post-hook: the coded weights of this model that ``optimizer`` holds go to their
        schemes, each scheme's in one message per worker."""
        for scheme, stepped in self._held_by(optimizer).values():
            scheme.after_step(self, stepped)

    def _held_by(self, optimizer: torch.optim.Optimizer) -> dict[int, HeldLayers]:
        """This model's coded weights that ``optimizer`` holds, with their groups, by scheme."""
        mine = {id(layer.param): layer for layer in self.layers.values()}
        by_scheme: dict[int, HeldLayers] = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                layer = mine.get(id(param))
                if layer is not None:
                    layer.scheme.check_optimizer(optimizer, group, layer)  # groups may have changed
                    by_scheme.setdefault(id(layer.scheme), (layer.scheme, []))[1].append((layer, group))
        return by_scheme

    def check_alive(self) -> None:
        alive = self.cluster.alive()
        if not self.code.can_decode(alive):
            raise ClusterError(f"only workers {alive} are alive, too few to decode (k={self.code.k})")

    def fetch_state(self, keys: list[str], exclude: Sequence[int] = ()
                    ) -> dict[int, dict[str, dict[str, Tensor]]]:
        """Coded weights and momentum of ``keys`` from the first decodable set of live workers."""
        start = time.perf_counter()
        rnd = self.cluster.submit("state", Broadcast((keys,)),
                                  [j for j in self.cluster.alive() if j not in exclude])
        states = self.cluster.first_k(rnd, self.code.k, enough=self.code.can_decode)
        self.stats.worker_s += time.perf_counter() - start
        return states


def _claim_prefix(cluster: Cluster, ctx: CodedContext) -> str:
    """A block-key prefix no other live model on ``cluster`` uses: "" for the first, "m1:", "m2:"...
    after it, so two models with the same layer names never read each other's blocks. The workers
    first drop the blocks of the models that are gone."""
    owners: dict[str, tuple[weakref.ref, set[str]]] = cluster.__dict__.setdefault("_sazd_models", {})
    gone = [prefix for prefix, (owner, _) in owners.items() if owner() is None]
    keys = sorted(key for prefix in gone for key in owners.pop(prefix)[1])
    if keys and cluster.alive():
        cluster.submit("drop", Broadcast((keys,)))
    prefix, index = "", 0
    while prefix in owners:
        index += 1
        prefix = f"m{index}:"
    owners[prefix] = (weakref.ref(ctx), ctx.block_keys)
    return prefix


def pad_rows(T: Tensor, rows: int) -> Tensor:
    """``T`` with zero rows appended up to ``rows`` rows (no copy when nothing to pad)."""
    extra = rows - T.shape[0]
    if extra == 0:
        return T
    return torch.cat([T, T.new_zeros((extra, *T.shape[1:]))])


def round_up(x: int, k: int) -> int:
    return -(-x // k) * k


