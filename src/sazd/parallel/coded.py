"""A coded weight stays its module's parameter: ``CodedParameter`` and the algebra of its products.

``parallelize`` swaps the class of a planned weight, in place, to ``CodedParameter`` (as PyTorch's
tensor parallelism swaps parameters for ``DTensor``s): the module, its ``forward``, the parameter
object, its name and its place in ``model.parameters()`` all stay what they were. The parameter's
products go to the workers as coded rounds, through one autograd Function (``_CodedProduct``):

    F.linear(x, W, b)           x W^T + b     (nn.Linear, nn.MultiheadAttention's out_proj)
    torch.addmm(b, x, W)        x W + b       (transformers' Conv1D: W stored (in, out))
    x @ W, torch.matmul, mm     either layout, and with ``W.T`` (a ``CodedTranspose``: ``x @ W.T``)
    F.conv2d(x, W, b, ...)      on unfolded patches (groups=1); F.conv1d as a Conv2d of height 1
    F.multi_head_attention_forward: its in-projection (``in_proj_weight``) and out-projection

Each coded weight is one matrix M (out, in) (Conv1D: M = W^T; Conv2d/Conv1d: W flattened to (out, in*kernel))
and two coded copies live on the workers:

- forward:        worker j returns X C_j(M)^T            -> decode X M^T       (copy "<name>.row")
- input gradient: worker j returns dY C_j(M^T)^T         -> decode dY M        (copy "<name>.col")
- weight update:  the layer's ``Scheme`` (``sazd.parallel.schemes``).

Answers and products are row-major (N, out), as ``F.linear``'s: the decode lays the k answers side
by side (``Code.decode(..., transposed=True)``), so what runs downstream sees plain PyTorch's layout.

Every other use of the parameter (an embedding lookup of a tied weight, ``print``, ``.to``) runs on
the master's copy, which DEU refreshes from k workers first; a one-time warning per weight names the
operation when DEU decodes for it or when its result is differentiated (a forward computation that
is no coded round). DEU keeps the weight gradient as factors; reading ``W.grad`` forms it.
In-place writes (``w.zero_()``, ``w.data += d``, ``w.copy_``, an optimizer's step) are seen through
torch's version counters and re-encoded and shipped before the next product; ``model.to(dtype)``
re-encodes the blocks in the new dtype. Widths not divisible by k are padded with zero rows.
"""

from __future__ import annotations

import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sazd.parallel.context import CodedContext, PendingUpdate, RoundRecord, StagedUse, round_up
from sazd.runtime.cluster import ClusterError, PerWorker

if TYPE_CHECKING:
    from sazd.parallel.schemes import Scheme

_no_subclass = torch._C.DisableTorchFunctionSubclass
KEPT_FACTORS_LIMIT = 2  # DEU keeps a gradient as factors up to this many times the weight's size


def _graph_task() -> int:
    """The id of the backward running in this thread (-1 outside any)."""
    return torch._C._current_graph_task_id()


class CodedLayer:
    """The state of one coded weight: its shapes, block keys, scheme and DEU's pending update.

    ``name`` is the weight's name without a trailing ``.weight`` ("fc1", "attn.in_proj_weight");
    ``weight_name`` its full parameter name; ``transposed``: the parameter stores M^T (Conv1D)."""

    def __init__(self, name: str, weight_name: str, param: nn.Parameter, ctx: CodedContext,
                 scheme: Scheme, transposed: bool = False) -> None:
        W = param.detach()
        self.name, self.weight_name = name, weight_name
        self.ctx, self.scheme, self.transposed = ctx, scheme, transposed
        self.weight_shape = tuple(W.shape)
        self.out_features, self.in_features = (W.shape[1], W.shape[0]) if transposed else (
            W.shape[0], W[0].numel())
        k = ctx.code.k
        self.out_pad, self.in_pad = round_up(self.out_features, k), round_up(self.in_features, k)
        # Every round reads the block keys and their padding: made once (name and prefix never change)
        row, col = f"{ctx.prefix}{name}.row", f"{ctx.prefix}{name}.col"
        self._keys = (row, col)
        self._padded = {row: (self.out_pad, self.out_features), col: (self.in_pad, self.in_features)}
        self.pending = PendingUpdate()  # DEU: what the next optimizer step sends
        self.spent = PendingUpdate()  # DEU: what the last step sent, the ``.grad`` until zero_grad
        self.staged: list[StagedUse] = []  # DEU: uses of backwards still running
        self.wanted = 0  # ``torch.autograd.grad`` calls under way that ask for this weight's gradient
        self._watching = False  # whether the weight's gradient accumulation calls ``commit_staged``
        self.warned: set[str] = set()  # the operations already said to run on the master's copy
        self.data_parallel = False  # the last forward ran inside DistributedDataParallel
        self.whole_grad: Tensor | None = None  # DEU: a ``.grad`` this step sends, hidden from torch's step
        self.stepped_by: weakref.ref | None = None  # the optimizer made by ``coded_optimizer`` holding it
        self.last_rows, self.last_input_grad = 0, False  # shape of the last batch, for the bytes formula
        # The column copy serves only the input gradient. A weight whose input needs none (the first
        # layer) stops shipping/updating it; it is marked stale and rebuilt from M if ever needed.
        self.col_stale = False
        self.fresh = True  # the master's copy equals the workers' blocks (DEU: False after a step)
        self.clean_version = -1  # param._version when master copy and blocks last agreed
        self._aliases: list[tuple[Any, int]] = []  # ``.data`` handed out: (tensor or weakref, version)
        param.__class__ = CodedParameter
        param.layer = self
        self._param = param

    @property
    def param(self) -> CodedParameter:
        return self._param

    @property
    def frozen(self) -> bool:
        return not self._param.requires_grad

    @property
    def stepped(self) -> bool:
        return self.stepped_by is not None and self.stepped_by() is not None

    @property
    def element_size(self) -> int:
        return self._param.element_size()

    @property
    def keys(self) -> tuple[str, str]:
        """The worker block keys of the two coded copies."""
        return self._keys

    @property
    def checkpoint_keys(self) -> tuple[str, str]:
        """The names of the two copies in checkpoints (no per-model prefix)."""
        return f"{self.name}.row", f"{self.name}.col"

    @property
    def padded(self) -> dict[str, tuple[int, int]]:
        """Per copy: (padded rows, real rows). Read only."""
        return self._padded

    # ------------------------------------------------------ the master's copy
    def plain(self) -> Tensor:
        """The master's copy of the weight as a plain tensor (no refresh)."""
        with _no_subclass():
            return self._param.detach()

    def refresh(self, operation: str | None = None) -> None:
        """Make the master's copy current (DEU: decode it from k workers after an update);
        ``operation``: the use that needs it, warned about once."""
        if self.fresh:
            return
        if operation is not None:
            warn_once(operation, self)
        self.scheme.refresh(self)

    def show(self, M: Tensor) -> None:
        """Write the plain matrix ``M`` (out, in) into the master's copy as the blocks' value."""
        with torch.no_grad(), _no_subclass():
            self._param.copy_(self.to_param(M))
        self.fresh, self.clean_version = True, self._param._version

    def handed_out(self, alias: Tensor) -> None:
        """``alias`` (``param.data``) shares the weight's storage with a version counter of its own."""
        self._aliases.append((alias, alias._version))

    def written(self) -> bool:
        """Whether the master's copy was written since it last agreed with the blocks."""
        changed = self._param._version != self.clean_version
        kept = []
        for ref, version in self._aliases:
            alias = ref if isinstance(ref, Tensor) else ref()
            if alias is None:
                continue
            changed = changed or alias._version != version
            kept.append((weakref.ref(alias), alias._version))
        self._aliases = kept
        return changed

    def sync(self) -> None:
        """Ship the master's copy when something wrote it (in-place edit, optimizer, ``load_state_dict``)."""
        if self.written():
            self.scheme.reship(self)

    def mark_shipped(self) -> None:
        self.fresh, self.clean_version = True, self._param._version
        self._aliases = [(weakref.ref(a), a._version) for a in self._live_aliases()]

    def _live_aliases(self) -> list[Tensor]:
        out = []
        for ref, _ in self._aliases:
            alias = ref if isinstance(ref, Tensor) else ref()
            if alias is not None:
                out.append(alias)
        return out

    # ---------------------------------------------------------- the algebra
    def matrices(self, W: Tensor, row_major: bool = True) -> dict[str, Tensor]:
        """The two matrices the coded copies encode, from a weight in the parameter's layout:
        {row key: M (out, in), col key: M^T}; ``row_major``: each laid out row-major (the workers keep
        blocks as they come: kept for steps and resumes, they are then laid out alike), else views."""
        M = W.T if self.transposed else W.reshape(self.out_features, self.in_features)
        if not row_major:
            return {self.keys[0]: M, self.keys[1]: M.T}
        return {self.keys[0]: M.contiguous(), self.keys[1]: M.T.contiguous()}

    def encode_plain(self, W: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Both coded copies of the weight ``W`` (parameter layout): n blocks each."""
        copies = self.matrices(W)
        return tuple(self.ctx.encode(copies[key], self.padded[key][0]) for key in self.keys)

    def to_param(self, M: Tensor) -> Tensor:
        """The parameter-layout weight of the matrix M (out, in)."""
        return M.T if self.transposed else M.reshape(self.weight_shape)

    def round(self, key: str, xm: Tensor) -> tuple[Tensor, RoundRecord]:
        """``xm (N, fan) -> xm A^T (N, rows)`` with A the copy ``key``, through the workers."""
        if key == self.keys[1] and self.col_stale:
            self.refresh_col()
        rows, keep = self.padded[key]
        out, record = self.ctx.product(key, xm, rows)
        return out[:keep].T, record

    def product(self, xm: Tensor, transpose: bool = False, bias: Tensor | None = None,
                raw: bool = False) -> Tensor:
        """``xm M^T + bias`` (``transpose``: ``xm M + bias``) of a 2-D ``xm`` through the coded copies,
        differentiable, laid out as ``F.linear``'s; ``raw``: the decode's (transposed) layout, no bias."""
        if torch.jit.is_tracing():
            raise RuntimeError(
                f"{self.weight_name}: torch.jit.trace cannot record a coded product: the trace would replay "
                "the master's copy of the weight, out of sazd's sight (no coded round; under DEU a stale "
                "copy); trace a plain copy, sazd.parallel.plain_model(model), or use torch.compile(model), "
                "which keeps the coded rounds")
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                f"{self.weight_name}: a coded product cannot run under a torch.func transform (vmap, grad, "
                "jacrev, ...): the workers compute it outside them; use torch.autograd.grad or "
                "torch.autograd.functional, or transform a plain copy, sazd.parallel.plain_model(model)")
        self.sync()
        self.drop_unfinished()
        self.last_rows = xm.shape[0]
        # DistributedDataParallel averages ``.grad`` across ranks: DEU's kept factors would escape it
        self.data_parallel = nn.parallel.DistributedDataParallel._active_ddp_module is not None
        self.last_input_grad = xm.requires_grad and torch.is_grad_enabled()
        return _CodedProduct.apply(xm, self._param, self, transpose, bias, raw)

    # ------------------------------------------------------------ loading
    def load_matrices(self, weights: dict[str, Tensor], momentum: dict[str, Tensor] | None = None,
                      workers: Sequence[int] | None = None, keep_momentum: bool = False) -> None:
        """Encode plain row/column matrices ({key: matrix}; momentum likewise) and load them on
        ``workers`` (default: every live one); ``keep_momentum``: the workers keep (cast) theirs."""
        coded = {key: self.ctx.encode(weights[key], self.padded[key][0]) for key in weights}
        buffers = {key: self.ctx.encode(m, self.padded[key][0]) for key, m in (momentum or {}).items()}
        args = {j: ({key: coded[key][j] for key in coded},
                    {key: buffers[key][j] for key in buffers} if momentum is not None else None,
                    keep_momentum)
                for j in range(self.ctx.code.n)}
        self.ctx.send("load", PerWorker(args), workers)
        if workers is None and self.keys[1] in weights:
            self.col_stale = False

    def refresh_col(self) -> None:
        """Rebuild a stale column copy on every live worker from the row copy (with its momentum)."""
        M, mom = self.scheme.row_state(self)
        col = self.keys[1]
        self.load_matrices({col: M.T.contiguous()}, None if mom is None else {col: mom.T.contiguous()})

    # ------------------------------------------------- DEU's kept gradient
    def forms_gradient(self) -> bool:
        """Whether a backward must hand autograd dW itself rather than keep its factors: a hook on the
        weight (``W.register_hook``), ``torch.autograd.grad`` asking for it, ``create_graph=True``, or a
        forward inside ``DistributedDataParallel`` (whose hooks average ``.grad`` across ranks)."""
        with _no_subclass():
            hooked = bool(self._param._backward_hooks)
        return hooked or self.wanted > 0 or torch.is_grad_enabled() or self.data_parallel

    def stage(self, X: Tensor, dY: Tensor, rounds: dict[str, RoundRecord]) -> None:
        if not self._watching:  # hooked at the first backward: a frozen weight takes no hook
            self.watch_accumulation()
        self.staged.append(StagedUse(_graph_task(), X.detach(), dY.detach(), rounds))

    def watch_accumulation(self) -> None:
        """Hook the weight's gradient accumulation, ahead of any hook of the user's (a weak reference:
        torch keeps hooks out of the garbage collector's sight, and a strong one would keep the whole
        model alive)."""
        ref = weakref.ref(self)

        def accumulated(param: Tensor) -> None:
            layer = ref()
            if layer is not None:
                layer.commit_staged()

        handle = self._param.register_post_accumulate_grad_hook(accumulated)
        with _no_subclass():  # first, before the user's own (an optimizer stepped in backward reads them)
            hooks = self._param._post_accumulate_grad_hooks
            others = [(key, hook) for key, hook in hooks.items() if key != handle.id]
            hooks.clear()  # torch runs them in the dict's insertion order: insert again, ours first
            hooks[handle.id] = accumulated
            hooks.update(others)
        self._watching = True

    def commit_staged(self) -> None:
        """This backward accumulates gradients (``backward()``, not ``torch.autograd.grad``): its uses'
        factors join the next step's update."""
        task = _graph_task()
        for use in self.staged:
            if use.graph_task == task:
                self.pending.factors.append((use.X, use.dY))
                self.pending.rounds = use.rounds
                self.pending.backwards.add(task)
        self.staged = [use for use in self.staged if use.graph_task != task]
        if len(self.pending.backwards) > 1 and self._factors_outgrow_weight():
            self.fold_gradient()  # backwards with no step between: torch's one .grad, not a growing list

    def _factors_outgrow_weight(self) -> bool:
        kept_rows = sum(x.shape[0] for x, _ in self.pending.factors)
        return kept_rows * (self.in_features + self.out_features) > (
            KEPT_FACTORS_LIMIT * self.in_features * self.out_features)

    def drop_unfinished(self) -> None:
        """Outside any backward: uses staged by ``torch.autograd.grad`` calls are no gradient."""
        if self.staged and _graph_task() < 0:
            self.staged.clear()

    @property
    def keeps_gradient(self) -> bool:
        """Whether DEU keeps a gradient of this weight as factors (pending, or sent by the last step)."""
        return bool(self.pending) or bool(self.spent)

    def spend(self) -> None:
        """The step sent the pending update: it stays the weight's ``.grad`` until zero_grad."""
        self.spent, self.pending = self.pending, PendingUpdate()
        self.spent.rounds = {}

    def drop_gradient(self) -> None:
        """``W.grad = None`` / zero_grad: the kept gradient is gone."""
        self.pending.clear()
        self.spent.clear()

    def fold_gradient(self) -> None:
        """Add DEU's kept gradient dM = scale * dY^T X (the last step's, unless zero_grad dropped it,
        and the pending one) to the parameter's ``.grad``, in the parameter's layout, as autograd would
        have (read by ``W.grad``, ``torch.nn.utils.clip_grad_norm_``); the step then sends the encoded
        ``.grad`` whole."""
        for kept in (self.spent, self.pending):
            if not kept:
                continue
            X, dY = kept.stacked()
            grad = kept.scaled(self.to_param(dY.T @ X))
            held = raw_grad(self._param)
            if held is None:
                set_raw_grad(self._param, grad.to(self._param.dtype))
            else:
                held.add_(grad)
            kept.clear()

    def grad_norm_sq(self) -> Tensor:
        """||dM||_F^2 of the pending DEU gradient dM = dY^T X without forming dM when the N x N Gram
        matrices are smaller: ||dY^T X||^2 = sum((dY dY^T) * (X X^T))."""
        X, dY = self.pending.stacked()
        if X.shape[0] ** 2 <= self.out_features * self.in_features:
            norm_sq = ((dY @ dY.T) * (X @ X.T)).sum()
        else:
            norm_sq = (dY.T @ X).square().sum()
        return norm_sq * self.pending.scale ** 2

    # --------------------------------------------------- decoding state
    def decode_matrices(self, states: dict[int, dict[str, dict[str, Tensor]]], part: str,
                        ) -> dict[str, Tensor] | None:
        """Decode both plain matrices {row key: M, col key: M^T} of part="weights" (or the momentum
        buffers, part="momentum"; None when there are none) from worker states."""
        row, col = self.keys
        out = {}
        for key in (row,) if self.col_stale else self.keys:
            out[key] = self.decode_key(states, key, part)
            if out[key] is None:
                return None
        if self.col_stale:  # the workers' column copy is not maintained: M^T from the row copy
            out[col] = out[row].T.contiguous()
        return out

    def decode_key(self, states: dict[int, dict[str, dict[str, Tensor]]], key: str, part: str,
                   ) -> Tensor | None:
        rows, keep = self.padded[key]
        blocks = {j: s[part][key] for j, s in states.items() if key in s[part]}
        if part == "momentum" and len(blocks) < len(states):
            if blocks:
                raise ClusterError(f"workers disagree on whether {key} has a momentum buffer")
            return None
        return self.ctx.decode(blocks, rows, self._param.device)[:keep]

    def __repr__(self) -> str:
        return (f"CodedLayer({self.weight_name!r}, out={self.out_features} (padded {self.out_pad}), "
                f"in={self.in_features} (padded {self.in_pad}), scheme={self.scheme}, code={self.ctx.code})")


# ----------------------------------------------------------------- the parameter
_METADATA = {"size", "dim", "numel", "is_floating_point", "is_complex", "element_size", "stride",
             "is_contiguous", "data_ptr", "__len__", "requires_grad_", "__hash__", "get_device",
             "_has_compatible_shallow_copy_type", "untyped_storage", "nelement", "ndimension",
             "is_signed", "_is_view", "__format__", "is_conj", "is_neg", "storage_offset",
             "is_inference", "is_sparse", "is_quantized", "is_meta", "is_nested", "register_hook",
             "register_post_accumulate_grad_hook"}
_VALUE_PROPERTIES = {"T", "mT", "H", "mH", "real", "imag"}  # properties that read the values
_OVERWRITES = {"copy_", "zero_", "fill_", "normal_", "uniform_", "set_", "trunc_normal_"}
_SILENT = {"detach", "to", "double", "float", "half", "bfloat16", "cpu", "cuda", "clone", "__reduce_ex__",
           "__deepcopy__", "__repr__", "type"}


class CodedParameter(nn.Parameter):
    """A weight coded on the workers that stays its module's parameter. ``layer``: its ``CodedLayer``."""

    layer: CodedLayer

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        return _dispatch(func, args, kwargs or {})

    def __deepcopy__(self, memo: dict) -> nn.Parameter:
        """A copy is a plain parameter with the current value (a copied model is a plain model)."""
        self.layer.refresh()
        copied = nn.Parameter(self.layer.plain().clone(), requires_grad=self.requires_grad)
        memo[id(self)] = copied
        return copied

    def __reduce_ex__(self, protocol: Any) -> Any:
        self.layer.refresh()
        return nn.Parameter, (self.layer.plain().clone(), self.requires_grad)

    @property
    def holds_transpose(self) -> bool:
        """Whether this tensor is M^T (transformers' Conv1D stores its weight so)."""
        return self.layer.transposed


class CodedTranspose(Tensor):
    """``W.T`` of a coded weight (also ``W.t()``, ``W.mT``, ``W.transpose(0, 1)``, ``W.permute(1, 0)``):
    the master's copy transposed, whose products (``x @ W.T``, ``F.linear(x, W.T)``, ``torch.mm``) are
    coded rounds like the weight's own; any other use reads the master's copy, as the weight's does."""

    layer: CodedLayer

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        return _dispatch(func, args, kwargs or {})

    @property
    def holds_transpose(self) -> bool:
        return not self.layer.transposed


CODED = (CodedParameter, CodedTranspose)
_TRANSPOSES = {"t", "transpose", "swapaxes", "swapdims", "permute", "T", "mT"}


def _transposes(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether this call swaps the two axes of a 2-D tensor (``args[0]``) and nothing else."""
    if name in ("t", "T", "mT"):
        return True
    rest = list(args[1:]) + list(kwargs.values())
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return [d % 2 for d in dims] == [1, 0] if all(isinstance(d, int) for d in dims) else False
    return len(rest) == 2 and all(isinstance(d, int) for d in rest) and rest[0] % 2 != rest[1] % 2


_reads_no_values: set[Any] = set()  # functions found to read metadata only (``W.dtype``, ``W.size``)
_GRAD_GET, _GRAD_SET = Tensor.grad.__get__, Tensor.grad.__set__


def raw_grad(param: Tensor) -> Tensor | None:
    """``param.grad`` as autograd left it (for a DEU weight: without the gradient the scheme keeps)."""
    with _no_subclass():
        return param.grad


def set_raw_grad(param: Tensor, grad: Tensor | None) -> None:
    with _no_subclass():
        param.grad = grad


@torch.compiler.disable
def _dispatch(func: Callable, args: tuple, kwargs: dict) -> Any:
    if func == _GRAD_GET and isinstance(args[0], CodedParameter):  # ``W.grad``: DEU's, made whole
        return args[0].layer.scheme.grad(args[0].layer)
    if func == _GRAD_SET and isinstance(args[0], CodedParameter):  # ``W.grad = g`` replaces DEU's too
        args[0].layer.drop_gradient()
        set_raw_grad(args[0], args[1])
        return None
    if func is torch.autograd.grad:
        return _autograd_grad(args, kwargs)
    if func is torch.autograd.backward:  # ``backward(inputs=[W, ...])``: no value of W is read
        with _no_subclass():
            return func(*args, **kwargs)
    if func in _reads_no_values:
        with _no_subclass():
            return func(*args, **kwargs)
    product = _PRODUCTS.get(func)
    if product is not None:
        out = product(args, kwargs)
        if out is not NotImplemented:
            return out
    name = getattr(func, "__name__", None) or str(func)
    owner = getattr(func, "__self__", None)  # a property's getter/setter: its descriptor
    if name in ("__get__", "__set__") and owner is not None and getattr(owner, "__name__", "") == "data":
        return _data_access(name, args)
    if ((name in ("__get__", "__set__") and getattr(owner, "__name__", "") not in _VALUE_PROPERTIES)
            or name in _METADATA):
        _reads_no_values.add(func)
        with _no_subclass():
            return func(*args, **kwargs)
    if name == "__get__":  # a property that reads the values: name it after the property
        name = getattr(owner, "__name__", name)
    first = args[0] if args else None
    if name == "detach" and isinstance(first, CodedParameter) and _making_a_parameter():
        raise RuntimeError(
            f"nn.Parameter({first.layer.weight_name}) of a coded weight: a new parameter made from it would "
            "leave the code (torch.nn.utils.parametrize, weight_norm and spectral_norm parametrizations "
            "make one); make it from a plain copy, nn.Parameter(w.detach().clone()), parametrize the plain "
            "model before sazd.parallelize, or leave the module on the master (plan={name: 'master'})")
    if (name in _TRANSPOSES and isinstance(first, CODED) and first.dim() == 2
            and _transposes(name, args, kwargs)):
        return _transposed(first, func, args, kwargs)
    layers = [a.layer for a in _flat(args, kwargs) if isinstance(a, CODED)]
    target = first if isinstance(first, CodedParameter) else None
    quiet = []  # read without a decode (naive, or DEU before a step): said only if it computes
    for layer in layers:
        if layer is not (target.layer if target is not None else None) or name not in _OVERWRITES:
            operation = None if name in _SILENT else name
            if operation is not None and layer.fresh:
                quiet.append(layer)
            layer.refresh(operation)
    with _no_subclass():
        out = func(*args, **kwargs)
    if isinstance(first, (list, tuple)) and name.endswith("_") and not name.endswith("__"):
        _count_list_write(first)
    if quiet and _differentiable(name, out, quiet):
        for layer in quiet:
            warn_once(name, layer)
    if target is not None and name in _OVERWRITES:
        target.layer.fresh = True  # fully overwritten: the master's copy is the new value (shipped next)
    return out


def _count_list_write(written: Sequence[Any]) -> None:
    """An in-place kernel over a list of tensors (``torch._fused_adam_``, ``_foreach_add_``) wrote the
    coded weights among its first list: torch's fused optimizer kernels leave the version counters
    as they were, and a naive weight is re-encoded and shipped only when its counter moved."""
    coded = [t for t in written if isinstance(t, CodedParameter)]
    if coded:
        with _no_subclass():
            torch.autograd.graph.increment_version(coded)


_PARAMETER_NEW = nn.Parameter.__new__.__code__


def _making_a_parameter() -> bool:
    """Whether this ``detach`` is ``nn.Parameter(data)``'s own (a few frames up: the dispatch's)."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        if frame.f_code is _PARAMETER_NEW:
            return True
        frame = frame.f_back
    return False


def _autograd_grad(args: tuple, kwargs: dict) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs)`` with coded weights among ``inputs``: their uses hand
    autograd dW itself (DEU keeps factors otherwise), and no use of any weight joins a step's update."""
    inputs = args[1] if len(args) > 1 else kwargs["inputs"]
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    layers = list({id(t.layer): t.layer for t in inputs if isinstance(t, CODED)}.values())
    for layer in layers:
        layer.wanted += 1
    try:
        with _no_subclass():
            return torch.autograd.grad(*args, **kwargs)
    finally:
        for layer in layers:
            layer.wanted -= 1


def _transposed(W: Tensor, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    """The transpose of a coded weight (or of its transpose: the weight itself, as a view)."""
    if isinstance(W, CodedTranspose):
        return W.layer.param  # transposed back: the weight itself
    with _no_subclass():
        out = func(*args, **kwargs)
    view = out.as_subclass(CodedTranspose)
    view.layer = W.layer
    return view


def _differentiable(name: str, out: Any, layers: list[CodedLayer]) -> bool:
    """Whether a use of these weights computed, on the master, something autograd will differentiate
    (the forward's own arithmetic). Not: an in-place write (shipped to the workers) or a view of a
    weight (``W[:8]``, computing nothing)."""
    if (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name == "__setitem__":
        return False
    with _no_subclass():
        own = {layer.param.untyped_storage().data_ptr() for layer in layers}
    return any(isinstance(t, Tensor) and t.requires_grad and t.untyped_storage().data_ptr() not in own
               for t in _flat(out, {}))


def _data_access(name: str, args: tuple) -> Any:
    param = args[0]
    layer: CodedLayer = param.layer
    if name == "__get__":
        layer.refresh()
        with _no_subclass():
            alias = param.data
        layer.handed_out(alias)
        return alias
    value = args[1]
    with _no_subclass():
        old = param.data
        if tuple(value.shape) != layer.weight_shape:
            raise ValueError(f"{layer.weight_name} is coded with shape {layer.weight_shape}; assigning "
                             f".data of shape {tuple(value.shape)} would not fit its blocks; "
                             "re-parallelize a plain model instead")
        param.data = value
    if value.dtype != old.dtype or value.device != old.device or value.data_ptr() != old.data_ptr():
        layer.scheme.reship(layer, keep_momentum=True)  # e.g. model.to(dtype): blocks in the new dtype
    return None


def _flat(args: Any, kwargs: dict) -> list[Any]:
    out: list[Any] = []
    stack = [args, list(kwargs.values())]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        else:
            out.append(item)
    return out


def warn_once(operation: str, layer: CodedLayer, message: str | None = None) -> None:
    """Say once per weight that ``operation`` on it runs on the master's copy (or ``message``)."""
    if operation in layer.warned:
        return
    layer.warned.add(operation)
    weight = layer.weight_name
    warnings.warn(message or (
        f"{operation} on the coded weight {weight} is not a coded product: it runs on the master's copy of "
        "the weight (no straggler tolerance; DEU decodes that copy from the workers after each update); use "
        "the weight through a product (its module, x @ W, x @ W.T, F.linear) or leave it on the master "
        "(plan={...: 'master'})"), UserWarning, stacklevel=4)


# ----------------------------------------------------------------- products
def _out_dtype(x: Tensor, W: Tensor) -> torch.dtype:
    """The dtype plain PyTorch's product would answer in (autocast's, or the operands' common one)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if x.dtype != W.dtype:
        raise RuntimeError(f"expected both operands of the coded product with {W.layer.weight_name} to "
                           f"have the same dtype, got {x.dtype} and {W.dtype}; cast the input (or the "
                           "model with model.to(dtype)), or run under torch.autocast")
    return W.dtype


def coded_matmul(x: Tensor, W: CodedParameter, bias: Tensor | None, transposed_use: bool,
                 raw: bool = False) -> Tensor:
    """``x M^T + bias`` over the last axis of ``x`` (``transposed_use``: ``x M + bias``); ``raw``: in
    the decode's layout (for a caller that lays it out itself), no bias."""
    layer = W.layer
    out_dtype = _out_dtype(x, W)
    fan_in = layer.out_features if transposed_use else layer.in_features
    fan_out = layer.in_features if transposed_use else layer.out_features
    if x.shape[-1] != fan_in:
        raise RuntimeError(f"{layer.weight_name}: input has {x.shape[-1]} features, the coded product "
                           f"takes {fan_in}")
    if not torch.is_autocast_enabled(x.device.type):  # nothing to step out of (entering costs)
        return _product_plus_bias(x, W, bias, transposed_use, fan_in, fan_out, raw)
    with torch.autocast(x.device.type, enabled=False):
        y = _product_plus_bias(x, W, bias, transposed_use, fan_in, fan_out, raw)
    return y.to(out_dtype)


def _product_plus_bias(x: Tensor, W: CodedParameter, bias: Tensor | None, transposed_use: bool,
                       fan_in: int, fan_out: int, raw: bool) -> Tensor:
    xm = x.reshape(-1, fan_in).to(W.dtype)
    bias = None if bias is None else bias.to(W.dtype)
    return W.layer.product(xm, transposed_use, None if raw else bias, raw).reshape(*x.shape[:-1], fan_out)


def _linear(args: tuple, kwargs: dict) -> Any:
    x, W, bias = _bind(F.linear, ("input", "weight", "bias"), args, kwargs)
    if not isinstance(W, CODED) or isinstance(x, CODED) or isinstance(bias, CODED):
        return NotImplemented
    return coded_matmul(x, W, bias, transposed_use=W.holds_transpose)  # x (M^T)^T = x M


def _addmm(args: tuple, kwargs: dict) -> Any:
    bias, x, W = _bind(torch.addmm, ("input", "mat1", "mat2"), args, kwargs)
    if (not isinstance(W, CODED) or isinstance(x, CODED)
            or isinstance(bias, CODED) or kwargs.get("beta", 1) != 1
            or kwargs.get("alpha", 1) != 1 or "out" in kwargs):
        return NotImplemented
    return coded_matmul(x, W, bias, transposed_use=not W.holds_transpose)


def _matmul(args: tuple, kwargs: dict, max_dim: int | None = None) -> Any:
    if len(args) != 2 or kwargs or isinstance(args[0], CODED) or not isinstance(args[1], CODED):
        return NotImplemented
    x, W = args
    if W.dim() != 2 or x.dim() < 2 or (max_dim is not None and x.dim() > max_dim):
        return NotImplemented
    return coded_matmul(x, W, None, transposed_use=not W.holds_transpose)


def _mm(args: tuple, kwargs: dict) -> Any:
    return _matmul(args, kwargs, max_dim=2)


def _conv(func: Callable, spatial: int) -> Callable[[tuple, dict], Any]:
    """The coded product of ``func``: ``F.conv2d``, or ``F.conv1d`` as a Conv2d of height 1
    ((B, C, L) -> (B, C, 1, L), kernel (1, k))."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    expand, height = nn.modules.utils._ntuple(spatial), 2 - spatial  # height: leading axes of size 1

    def product(args: tuple, kwargs: dict) -> Any:
        x, W, bias, stride, padding, dilation, groups = _bind(func, names, args, kwargs)
        dilation = expand(1 if dilation is None else dilation)
        if padding == "same":
            padding = same_padding(tuple(W.shape[2:]), dilation)
        if (not isinstance(W, CodedParameter) or isinstance(x, CodedParameter) or groups not in (None, 1)
                or padding is None or (isinstance(padding, str) and padding != "valid")
                or x.dim() != spatial + 2):
            return NotImplemented
        geometry = dict(kernel_size=(1,) * height + tuple(W.shape[2:]), dilation=(1,) * height + dilation,
                        padding=(0,) * height + expand(0 if padding == "valid" else padding),
                        stride=(1,) * height + expand(1 if stride is None else stride))
        layout = _conv_memory_format(x, W) if spatial == 2 else torch.contiguous_format  # conv1d: always
        y = _coded_conv(x.reshape(*x.shape[:2], *(1,) * height, *x.shape[2:]), W, bias, geometry, layout)
        return y.reshape(*y.shape[:2], *y.shape[2 + height:])

    return product


def same_padding(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...] | None:
    """``padding="same"`` (stride 1) as integers: half of ``dilation * (kernel - 1)`` on each side, or None
    where that is odd (torch then pads one side more, which no integer padding says)."""
    total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)


def _coded_conv(x: Tensor, W: CodedParameter, bias: Tensor | None, geometry: dict[str, tuple[int, int]],
                layout: torch.memory_format) -> Tensor:
    """``F.conv2d(x, W, bias, **geometry)``: a coded product on the unfolded patches of x (B, C, H, W),
    laid out in ``layout`` as conv2d's output."""
    layer = W.layer
    B = x.shape[0]
    ho, wo = (_conv_out(x.shape[2 + i], i, geometry) for i in (0, 1))
    cols = F.unfold(x, **geometry)  # (B, C*kh*kw, L) patches; autograd's backward is F.fold
    xm = cols.transpose(1, 2).reshape(B * ho * wo, layer.in_features)
    ym = coded_matmul(xm, W, None, transposed_use=False, raw=True)  # (N, out), row-major
    y = ym.reshape(B, ho, wo, layer.out_features).permute(0, 3, 1, 2)
    y = y.contiguous(memory_format=layout)
    return y if bias is None else y + bias.to(y.dtype).view(1, -1, 1, 1)


def _conv_memory_format(x: Tensor, W: Tensor) -> torch.memory_format:
    """The layout of ``F.conv2d``'s output on the CPU: channels-last when the input or the weight is."""
    channels_last = torch.channels_last
    with _no_subclass():
        last = any(t.is_contiguous(memory_format=channels_last) and not t.is_contiguous() for t in (x, W))
    return channels_last if last else torch.contiguous_format


def _conv_out(size: int, i: int, g: dict[str, tuple[int, int]]) -> int:
    span = g["dilation"][i] * (g["kernel_size"][i] - 1) + 1
    return (size + 2 * g["padding"][i] - span) // g["stride"][i] + 1


_MHA = inspect.signature(F.multi_head_attention_forward)


def _attention(args: tuple, kwargs: dict) -> Any:
    """``F.multi_head_attention_forward`` with coded in- and out-projections: the projections are coded
    products, and torch's own function runs the attention between them with identity projections
    (exact: a product by the identity adds only zeros)."""
    bound = _MHA.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    coded = [name for name in ("in_proj_weight", "out_proj_weight", "q_proj_weight", "k_proj_weight",
                                "v_proj_weight") if isinstance(a[name], CodedParameter)]
    if not coded or any(isinstance(a[n], CodedParameter) for n in ("query", "key", "value")):
        return NotImplemented
    E = a["embed_dim_to_check"]
    q, k, v = a["query"], a["key"], a["value"]
    if a["use_separate_proj_weight"]:
        weights = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
    else:
        W = a["in_proj_weight"]
        weights = [W, W, W] if not isinstance(W, CodedParameter) else [W] * 3
    biases = [None] * 3 if a["in_proj_bias"] is None else list(a["in_proj_bias"].chunk(3))
    if isinstance(weights[0], CodedParameter) and weights[0] is weights[1] is weights[2]:
        W = weights[0]
        if q is k and k is v:  # self-attention: one product for q, k and v
            qkv = coded_matmul(q, W, a["in_proj_bias"], transposed_use=W.layer.transposed)
            q, k, v = qkv.chunk(3, dim=-1)
        else:
            full = [coded_matmul(t, W, None, transposed_use=W.layer.transposed) for t in (q, k, v)]
            q, k, v = (f[..., i * E:(i + 1) * E] + (0 if b is None else b) for i, (f, b) in
                       enumerate(zip(full, biases, strict=True)))
    else:
        projected = []
        for i, (t, w, b) in enumerate(zip((q, k, v), weights, biases, strict=True)):
            if isinstance(w, CodedParameter):
                projected.append(coded_matmul(t, w, b, transposed_use=w.layer.transposed))
            else:
                rows = w if a["use_separate_proj_weight"] else w[i * E:(i + 1) * E]
                projected.append(F.linear(t, rows, b))
        q, k, v = projected
    eye = torch.eye(E, dtype=q.dtype, device=q.device)
    out_w, out_b = a["out_proj_weight"], a["out_proj_bias"]
    coded_out = isinstance(out_w, CodedParameter)
    a.update(query=q, key=k, value=v, in_proj_bias=None, use_separate_proj_weight=True, q_proj_weight=eye,
             k_proj_weight=eye, v_proj_weight=eye, in_proj_weight=None)
    if coded_out:
        a.update(out_proj_weight=eye, out_proj_bias=None)
    with _no_subclass():
        out, weights_ = F.multi_head_attention_forward(**a)
    if coded_out:
        out = coded_matmul(out, out_w, out_b, transposed_use=out_w.layer.transposed)
    return out, weights_


def _bind(func: Callable, names: tuple[str, ...], args: tuple, kwargs: dict) -> list[Any]:
    values = list(args[: len(names)]) + [None] * max(0, len(names) - len(args))
    for i, name in enumerate(names):
        if name in kwargs:
            values[i] = kwargs[name]
    return values


_PRODUCTS: dict[Any, Callable[[tuple, dict], Any]] = {
    F.linear: _linear,
    torch.addmm: _addmm,
    Tensor.addmm: _addmm,
    torch.matmul: _matmul,
    Tensor.matmul: _matmul,
    Tensor.__matmul__: _matmul,
    torch.mm: _mm,
    Tensor.mm: _mm,
    F.conv2d: _conv(F.conv2d, 2),
    torch.conv2d: _conv(F.conv2d, 2),
    F.conv1d: _conv(F.conv1d, 1),
    torch.conv1d: _conv(F.conv1d, 1),
    F.multi_head_attention_forward: _attention,
}


class _CodedProduct(torch.autograd.Function):
    """``xm (N, fan) -> xm M^T`` (or ``xm M``) through the workers. ``weight`` is the parameter autograd
    hands the weight gradient to (naive: dW; DEU: None, the scheme keeps the factors of dW)."""

    @staticmethod
    def forward(ctx: Any, xm: Tensor, weight: Tensor, layer: CodedLayer, transpose: bool,
                bias: Tensor | None, raw: bool) -> Tensor:
        ctx.layer, ctx.transpose = layer, transpose
        ctx.save_for_backward(xm)
        row, col = layer.keys
        out, ctx.round = layer.round(col if transpose else row, xm)
        # Row-major (N, out), as F.linear's: a view or a reduction downstream, and dropout's mask (drawn
        # in memory order), see what they see on the plain model. The decode lays it out so, in a buffer
        # of its own; rows padded for the code leave a gap that one copy closes.
        y = _unviewed(out)
        return y if raw or bias is None else y.add_(bias)

    @staticmethod
    def backward(ctx: Any, dym: Tensor) -> tuple[Tensor | None, ...]:
        (xm,) = ctx.saved_tensors
        layer: CodedLayer = ctx.layer
        rounds = {ctx.round.key: ctx.round}  # the rounds of this use of the weight
        row, col = layer.keys
        dx = None
        if ctx.needs_input_grad[0] and torch.is_grad_enabled():  # create_graph: dx differentiable too
            dx = _CodedProduct.apply(dym, layer.param, layer, not ctx.transpose, None, False)
        elif ctx.needs_input_grad[0]:
            dx, back = layer.round(row if ctx.transpose else col, dym)
            dx = dx.contiguous()  # row-major, as F.linear's input gradient
            rounds[back.key] = back
        dw = None
        if ctx.needs_input_grad[1]:
            X, dY = (dym, xm) if ctx.transpose else (xm, dym)  # dM = dY^T X
            dw = layer.scheme.weight_grad(layer, X, dY, rounds)
        dbias = dym.sum(0) if ctx.needs_input_grad[4] else None
        return dx, dw, None, None, dbias, None


def _unviewed(t: Tensor) -> Tensor:
    """``t`` as a tensor that is no view (autograd refuses in-place edits of a custom Function's output
    that is one): the tensor it views when that has its very layout, else a row-major copy."""
    base = t._base
    if base is None:
        return t
    if base.shape == t.shape and base.stride() == t.stride() and base.data_ptr() == t.data_ptr():
        return base
    return t.clone(memory_format=torch.contiguous_format)


def _refuse_replacing(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    """Assigning a new parameter over a coded weight would leave the model silently half uncoded."""
    held = module._parameters.get(name)
    if isinstance(held, CodedParameter) and param is not held:
        raise AttributeError(
            f"{held.layer.weight_name} is coded on the workers and cannot be replaced by another parameter "
            "(an assignment, register_parameter or load_state_dict(..., assign=True)); set its value with "
            "model.load_state_dict(state) (assign=False) or in place (with torch.no_grad(): w.copy_(value)), "
            "which encodes and ships it")


nn.modules.module.register_module_parameter_registration_hook(_refuse_replacing)


def coded_parameters(model: nn.Module) -> list[CodedParameter]:
    seen: dict[int, CodedParameter] = {}
    for p in model.parameters():
        if isinstance(p, CodedParameter):
            seen.setdefault(id(p), p)
    return list(seen.values())


__all__ = ["CODED", "CodedLayer", "CodedParameter", "CodedTranspose", "coded_matmul", "coded_parameters",
           "raw_grad", "same_padding", "set_raw_grad", "warn_once"]
