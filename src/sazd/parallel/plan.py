"""Make an unchanged ``nn.Module`` coded (``parallelize``), read its plain weights back, and the
traffic formula of one iteration.

Like ``torch.distributed.tensor.parallel.parallelize_module``, a plan maps submodule names, or
fnmatch patterns of them, to a style object: ``{"fc1": Coded(), "transformer.h.*.attn.c_attn":
Coded(scheme="naive"), "lm_head": Master()}`` (the strings "coded" and "master" mean ``Coded()`` and
``Master()``). Without a plan, every weight matrix that a product reads is coded when both of its
coded axes (output features, and input features x kernel size) are at least ``min_features`` wide:
the weights of ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` (subclasses included), transformers'
``Conv1D`` (stored transposed) and ``nn.MultiheadAttention``'s ``in_proj_weight``. Narrower weights
cost a round trip per product and save nothing, so they stay on the master with the biases,
activations and loss. What stays on the master is said, with why (``UserWarning`` and
``context(model).left_on_master``).
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sazd.codes.base import Code
from sazd.parallel.attached import attach, detach
from sazd.parallel.coded import CodedLayer, coded_parameters, same_padding
from sazd.parallel.context import CodedContext, round_up
from sazd.parallel.schemes import DEFAULT_SCHEME, Scheme, States, get_scheme
from sazd.runtime.cluster import Cluster, ClusterError

DEFAULT_MIN_FEATURES = 64


@dataclass(frozen=True)
class Coded:
    """Plan style: code the module's weight matrices (``scheme``: this weight's own; default: the
    model's)."""

    scheme: str | Scheme | None = None


@dataclass(frozen=True)
class Master:
    """Plan style: keep the module on the master."""


Style = Coded | Master | str


def as_style(style: Style, name: str) -> Coded | Master:
    if isinstance(style, (Coded, Master)):
        return style
    if style == "coded":
        return Coded()
    if style == "master":
        return Master()
    raise ValueError(f"plan[{name!r}] = {style!r}; a style is Coded(), Master(), 'coded' or 'master'")


@dataclass(frozen=True)
class Target:
    """One weight matrix to code: the module holding it, the parameter's attribute, its layout."""

    module: str
    attr: str
    transposed: bool = False

    @property
    def weight_name(self) -> str:
        return f"{self.module}.{self.attr}" if self.module else self.attr

    @property
    def name(self) -> str:
        return self.module if self.attr == "weight" and self.module else self.weight_name


def parallelize(
    model: nn.Module,
    code: Code,
    cluster: Cluster,
    plan: Mapping[str, Style] | None = None,
    scheme: str | Scheme = DEFAULT_SCHEME,
    min_features: int = DEFAULT_MIN_FEATURES,
    decode_device: str | torch.device | None = None,
) -> nn.Module:
    """Code the planned weights of ``model`` (in place): each stays its module's parameter (same
    object, name and place in ``model.parameters()``; an optimizer made before works), its class
    becomes ``CodedParameter`` and its value lives, encoded by ``code``, on the ``cluster``'s
    workers, where its products run. Returns ``model``.

    ``scheme``: a ``Scheme`` or its name. ``Naive`` keeps each weight on the master too (any torch
    optimizer works; the weights are re-encoded and shipped after each change); ``DEU`` (default)
    lets the workers update their coded weights (the master's copy is decoded when read). Either way,
    step with ``sazd.coded_optimizer(torch.optim.SGD(model.parameters(), ...))`` (naive: any optimizer).
    ``decode_device``: where the master decodes the workers' answers (e.g. ``"cuda"`` on a master with
    a GPU; default: the device of the activations); decoded products return to the activations' device.
    """
    scheme = get_scheme(scheme)
    decode_device = check_decode_device(decode_device)
    if cluster.n != code.n:
        raise ValueError(f"cluster has n={cluster.n} workers but the code needs n={code.n}; make them equal")
    if not code.can_decode(cluster.alive()):
        raise ClusterError(f"only workers {cluster.alive()} are alive; the code needs k={code.k} of {code.n}")
    if coded_parameters(model):
        raise ValueError("model is already parallelized (it holds coded weights); parallelize a plain model")
    targets, left = plan_weights(model, plan, min_features)
    refused = {name: why for name, why in left.items() if not why.startswith(("narrower", "plan says"))}
    if refused:
        warnings.warn("left on the master: " + "; ".join(f"{n}: {w}" for n, w in refused.items()),
                      UserWarning, stacklevel=2)
    ctx = CodedContext(code, cluster, scheme, model, decode_device)
    ctx.left_on_master = left
    slots = []  # (module, attribute, layer) of every coded weight
    with ctx.batched():
        for target, style in targets:
            owner = model.get_submodule(target.module)
            param = getattr(owner, target.attr)
            own = scheme if style.scheme is None else get_scheme(style.scheme)
            layer = CodedLayer(target.name, target.weight_name, param, ctx, own, target.transposed)
            ctx.add(layer)
            own.hold(layer)
            slots.append((owner, target.attr, layer))
    attach(model, ctx, slots)
    return model


def check_decode_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a usable ``torch.device`` (None stays None); a clear error for a bad or absent one."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"decode_device must be a device name or torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"decode_device {device!r} is not a device ({err}); use 'cpu' or 'cuda'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"decode_device {device}: this machine has {count} usable CUDA device(s); "
                             "decode on 'cpu'")
    elif device.type != "cpu":
        raise ValueError(f"decode_device {device}: only cpu and cuda are supported")
    return device


def plan_weights(model: nn.Module, plan: Mapping[str, Style] | None, min_features: int,
                 ) -> tuple[list[tuple[Target, Coded]], dict[str, str]]:
    """([(weight to code, its style)], {module left on the master: why}). An explicit plan entry that
    matches no module, or names one that cannot be coded, is a ValueError naming it and the reason."""
    modules = dict(model.named_modules())
    owners = _owners(model)
    if plan is None:
        if not isinstance(min_features, int) or min_features < 1:
            raise ValueError(f"min_features must be an integer >= 1, got {min_features!r}")
        chosen, left = [], {}
        for name, m in modules.items():
            targets = product_weights(name, m)
            if not targets:
                continue
            why = why_not_codable(name, m, modules, owners)
            if why is None and min(min(_widths(getattr(m, t.attr), t)) for t in targets) < min_features:
                widths = [_widths(getattr(m, t.attr), t) for t in targets]
                shown = widths[0] if len(widths) == 1 else widths
                why = f"narrower than min_features={min_features} (widths {shown})"
            if why is None:
                chosen += [(t, Coded()) for t in targets]
            else:
                left[name] = why
        left.update(_unknown_matrices(model, left, min_features))
        if not chosen:
            raise ValueError(
                f"no weight matrix can be coded with both widths (out, in*kernel) >= min_features="
                f"{min_features} ({left}); pass plan={{'name': Coded()}} or a smaller min_features"
            )
        return _dedupe(model, chosen), left
    if not isinstance(plan, Mapping):
        raise ValueError(f"plan must map layer names (or patterns) to Coded() or Master(), got "
                         f"{type(plan).__name__}")
    styles: dict[str, Coded | Master] = {}
    for pattern, style in plan.items():
        style = as_style(style, pattern)
        matched = [n for n in modules if n and (n == pattern or fnmatch.fnmatchcase(n, pattern))]
        if not matched:
            codable = [n for n, m in modules.items() if product_weights(n, m)]
            raise ValueError(f"plan names layer {pattern!r}, which matches no module of the model; its "
                             f"layers with weight matrices: {codable}")
        for name in matched:
            styles[name] = style
    chosen, left = [], {}
    for name, style in styles.items():
        if isinstance(style, Master):
            left[name] = "plan says Master()"
            continue
        why = why_not_codable(name, modules[name], modules, owners, explicit=True)
        if why is not None:
            raise ValueError(f"layer {name!r} cannot be coded: {why}; set plan[{name!r}] = Master() "
                             "or drop it from the plan")
        chosen += [(t, style) for t in product_weights(name, modules[name], explicit=True)]
    return _dedupe(model, chosen), left


def plan_layers(model: nn.Module, plan: Mapping[str, Style] | None, min_features: int,
                ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(the modules whose weights would be coded, {module left on the master: why})."""
    targets, left = plan_weights(model, plan, min_features)
    return {t.module: model.get_submodule(t.module) for t, _ in targets}, left


def resolve_plan(model: nn.Module, plan: Mapping[str, Style] | None, min_features: int,
                 ) -> dict[str, nn.Module]:
    """The submodules whose weights would be coded, checked: every name exists and can be coded."""
    return plan_layers(model, plan, min_features)[0]


def product_weights(name: str, m: nn.Module | None, explicit: bool = False) -> list[Target]:
    """The weight matrices of module ``m`` that its forward reads through a product; ``explicit`` (a
    plan names the module): also the own 2-D parameters of a module of another kind, whose forward
    the user says multiplies by them (x @ W, x @ W.T, F.linear, torch.mm: each a coded round)."""
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)):
        return [Target(name, "weight")]
    weight = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2:
        return [Target(name, "weight", transposed=True)]  # transformers' Conv1D: x @ W + b, W (in, out)
    if isinstance(m, nn.MultiheadAttention):
        attrs = ("in_proj_weight",) if m.in_proj_weight is not None else (
            "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return [Target(name, attr) for attr in attrs]
    if explicit and m is not None and not isinstance(m, LOOKUPS):
        return [Target(name, attr) for attr, p in m._parameters.items()
                if p is not None and p.dim() == 2 and p.is_floating_point()]
    return []


LOOKUPS = (nn.Embedding, nn.EmbeddingBag)  # their weight is indexed, never multiplied
CODED_KINDS = ("nn.Linear, nn.Conv1d and nn.Conv2d (groups=1), transformers' Conv1D and "
               "nn.MultiheadAttention's in_proj_weight")  # what the automatic plan codes, for messages


def _is_wide_matrix(p: Tensor | None, min_features: int) -> bool:
    """A floating matrix (or a stack of several) with both axes at least ``min_features`` wide; a
    stack of one, (1, L, D), is a learned table such as a position embedding."""
    if p is None or p.dim() < 2 or not p.is_floating_point() or min(p.shape[-2:]) < min_features:
        return False
    return p.dim() == 2 or p.shape[:-2].numel() > 1


def _unknown_matrices(model: nn.Module, left: Mapping[str, str], min_features: int) -> dict[str, str]:
    """Modules of kinds the automatic plan does not code that hold wide matrices of their own (a
    custom layer's ``W``, a mixture of experts' stacked weights): {module: why they stay, and the fix}."""
    out = {}
    for name, m in model.named_modules():
        if name in left or product_weights(name, m) or isinstance(m, LOOKUPS):
            continue
        if isinstance(m, parametrize.ParametrizationList):  # its module is listed with the reason
            continue
        if isinstance(m, nn.modules.conv._ConvNd):  # Conv3d, ConvTranspose*: a matrix, not coded
            weight = m.weight
            if min(weight.shape[0], weight[0].numel()) >= min_features:
                out[name] = (f"it is a {type(m).__name__}; sazd codes the weights of {CODED_KINDS}, so it "
                             "stays on the master")
            continue
        wide = {attr: tuple(p.shape) for attr, p in m._parameters.items() if _is_wide_matrix(p, min_features)}
        stacks = {attr: shape for attr, shape in wide.items() if len(shape) > 2}
        if stacks:
            out[name] = (f"its parameters {stacks} are stacks of matrices (e.g. a mixture of experts' "
                         f"weights) that {type(m).__name__}'s own forward uses; sazd codes 2-D weight "
                         "matrices read by products, so they stay on the master (to code experts, give "
                         "each its own nn.Linear)")
        elif wide:
            out[name] = (f"its 2-D parameters {wide} are used by {type(m).__name__}'s own forward, which "
                         "the automatic plan does not know; if that forward only multiplies by them "
                         f"(x @ W, x @ W.T, F.linear, torch.mm), code them with plan={{{name!r}: Coded()}}")
    return out


def why_not_codable(name: str, m: nn.Module, modules: Mapping[str, nn.Module],
                    owners: Mapping[int, list[str]], explicit: bool = False) -> str | None:
    """Why module ``name``'s weights cannot be coded, or None when they can."""
    targets = product_weights(name, m, explicit)
    if not targets:
        return (f"it is a {type(m).__name__}, which holds no weight matrix a product reads (coded: "
                f"{CODED_KINDS}; named in a plan, any module's own 2-D parameters)")
    structure = _conv_refusal(m)  # first: removing a parametrization would not help these
    if structure is not None:
        return structure
    for t in targets:
        param = getattr(m, t.attr)
        if parametrize.is_parametrized(m, t.attr):
            kinds = ", ".join(type(f).__name__ for f in getattr(m.parametrizations, t.attr))
            return (f"its {t.attr} is computed by a parametrization ({kinds}) on the master, and products "
                    "read that tensor, not a coded one; to code it, remove the parametrization first, "
                    f"torch.nn.utils.parametrize.remove_parametrizations(module, {t.attr!r})")
        if not isinstance(param, nn.Parameter):
            return (f"its {t.attr} is a {type(param).__name__}, not a parameter; make it an nn.Parameter "
                    "to code it")
        if not param.is_floating_point():
            return f"its {t.attr} is {param.dtype}; coded weights need floating point"
        users = owners.get(id(param), [t.weight_name])
        others = [u for u in users if u != t.weight_name]
        if others and not explicit:
            non_products = [u for u in others if not product_weights(u.rpartition(".")[0],
                                                                     modules.get(u.rpartition(".")[0]))]
            if non_products:
                return (f"its {t.attr} is tied to {non_products}, whose use is not a product (each such use "
                        "would decode it from the workers); code it anyway with plan={"
                        f"{name!r}: Coded()}} (naive: free; DEU: one decode round per step)")
    return None


def _conv_refusal(m: nn.Module) -> str | None:
    """Why a convolution cannot be coded whatever its weight: groups, or a padding no integers say."""
    if not isinstance(m, (nn.Conv2d, nn.Conv1d)):
        return None
    if m.groups != 1:
        kind = "Conv1d" if isinstance(m, nn.Conv1d) else "Conv2d"  # a parametrized one is a subclass of it
        return f"it is a grouped {kind} (groups={m.groups}); only groups=1 codes"
    if m.padding == "same" and same_padding(m.kernel_size, m.dilation) is None:
        return ("it has padding='same' with an even kernel span, which pads one side more; give the "
                "padding as integers (and pad the input yourself) to code it")
    return None


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has (more than one: tied, or one module under several names)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                full = f"{name}.{attr}" if name else attr
                if full not in owners.setdefault(id(param), []):
                    owners[id(param)].append(full)
    return owners


def _dedupe(model: nn.Module, chosen: list[tuple[Target, Coded]]) -> list[tuple[Target, Coded]]:
    """One entry per parameter (a tied weight, or a module under several names, is coded once)."""
    seen, out = set(), []
    for target, style in chosen:
        param = getattr(model.get_submodule(target.module), target.attr)
        if id(param) not in seen:
            seen.add(id(param))
            out.append((target, style))
    return out


def _widths(W: Tensor, target: Target) -> tuple[int, int]:
    return (W.shape[1], W.shape[0]) if target.transposed else (W.shape[0], W[0].numel())


# --------------------------------------------------------------- reading back
def coded_layers(model: nn.Module) -> list[CodedLayer]:
    """The ``CodedLayer`` of every coded weight of ``model``, in parameter order."""
    return [p.layer for p in coded_parameters(model)]


def context(model: nn.Module) -> CodedContext:
    layers = coded_layers(model)
    if not layers:
        raise ValueError("model has no coded weights; call sazd.parallelize(model, code, cluster) first")
    return layers[0].ctx


def read_matrices(
    model: nn.Module, momentum: bool = False, exclude: Sequence[int] = (), states: States | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Both plain matrices of every coded weight, {"fc1.row": M, "fc1.col": M^T} (by block key), and
    with ``momentum`` the workers' SGD momentum buffers, in one round per scheme (DEU; naive: the
    master's weights). Never reads from workers in ``exclude``; ``states``: decode these, already
    fetched. A read of its own (no ``states``) also refreshes the master's copies."""
    ctx = context(model)
    layers = coded_layers(model)
    weights: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = {}
    for scheme in {id(m.scheme): m.scheme for m in layers}.values():
        own = [m for m in layers if m.scheme is scheme]
        w, b = scheme.read_matrices(ctx, own, momentum, exclude, states)
        weights.update(w)
        buffers.update(b)
        if states is None:
            for layer in own:
                if not layer.fresh:
                    layer.show(w[layer.keys[0]])
    return weights, buffers


def plain_weights(
    model: nn.Module, momentum: bool = False, exclude: Sequence[int] = ()
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The plain weight of every coded weight ({"fc1.weight": W}, decoded from the row copy in DEU)
    and, with ``momentum``, its workers' SGD momentum buffer (DEU only: naive keeps momentum in the
    optimizer)."""
    return by_weight_name(model, *read_matrices(model, momentum, exclude))


def by_weight_name(model: nn.Module, matrices: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                   ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``read_matrices``' row copies as plain weights and momentum by parameter name ("fc1.weight")."""
    weights, moms = {}, {}
    for layer in coded_layers(model):
        weights[layer.weight_name] = layer.to_param(matrices[layer.keys[0]])
        if layer.keys[0] in buffers:
            moms[layer.weight_name] = layer.to_param(buffers[layer.keys[0]])
    return weights, moms


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``model.state_dict()``: the keys, shapes and values of the plain model."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def plain_model(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` on the master: every coded weight a plain parameter again."""
    layers = coded_layers(model)
    if layers:
        read_matrices(model)  # every master copy current, in one round
    plain = copy.deepcopy(model)
    if layers:
        detach(plain, layers[0].ctx.forward_hook)
    return plain


def load_weights(model: nn.Module, weights: Mapping[str, Tensor],
                 momentum: Mapping[str, Tensor] | None = None,
                 columns: Mapping[str, Tensor] | None = None) -> None:
    """Set every coded weight (and, DEU, the workers' momentum) from plain tensors and ship them.
    Everything is checked before anything is shipped.

    DEU: ``columns`` may give the column copies ({"fc1.col": M^T, "fc1.col/momentum_buffer": ...}, as
    ``Maintainer.state`` keeps them) so both copies continue bit for bit; otherwise M^T is used."""
    check_weights(model, weights, momentum, columns)
    layers = coded_layers(model)
    for layer in layers:
        W = weights[layer.weight_name]
        M = None if momentum is None else momentum.get(layer.weight_name)
        col = layer.checkpoint_keys[1]
        if columns is None or col not in columns:
            layer.scheme.load_weight(layer, W, M)
            continue
        device = layer.plain()
        W = W.detach().to(device)
        layer.show(layer.matrices(W)[layer.keys[0]])
        copies = {**layer.matrices(W), layer.keys[1]: columns[col].to(device).contiguous()}
        buffers = None if M is None else layer.matrices(M.to(device))
        if buffers is not None and f"{col}/momentum_buffer" in columns:
            buffers[layer.keys[1]] = columns[f"{col}/momentum_buffer"].to(device)
        layer.load_matrices(copies, buffers)
        layer.mark_shipped()


def check_weights(model: nn.Module, weights: Mapping[str, Tensor],
                  momentum: Mapping[str, Tensor] | None = None,
                  columns: Mapping[str, Tensor] | None = None) -> None:
    """Raise ValueError when ``load_weights`` could not load these tensors (a missing weight, a shape,
    momentum or a column copy of a weight the model does not code)."""
    layers = coded_layers(model)
    names = {layer.weight_name for layer in layers}
    cols = {f"{layer.checkpoint_keys[1]}{suffix}" for layer in layers for suffix in ("", "/momentum_buffer")}
    unknown = sorted(set(momentum or {}) - names) + sorted(set(columns or {}) - cols)
    if unknown:
        raise ValueError(f"momentum or column copies of weights the model does not code: {unknown[:5]}")
    for layer in layers:
        key = layer.weight_name
        if key not in weights:
            raise ValueError(f"weights has no entry {key!r}; it must hold every coded weight")
        for what, t in (("weights", weights[key]), ("momentum", (momentum or {}).get(key))):
            if t is not None and tuple(t.shape) != layer.weight_shape:
                raise ValueError(f"{what}[{key!r}] has shape {tuple(t.shape)}, expected {layer.weight_shape}")
        col = layer.checkpoint_keys[1]
        for name in (col, f"{col}/momentum_buffer"):
            t = (columns or {}).get(name)
            if t is not None and tuple(t.shape) != (layer.in_features, layer.out_features):
                raise ValueError(f"columns[{name!r}] has shape {tuple(t.shape)}, expected "
                                 f"{(layer.in_features, layer.out_features)}")


# A saved coded block matches the encoding of the saved plain weight to within this, relative to the
# block's largest entry: codes amplify rounding by their conditioning, while a block of another
# weight, another worker or a corrupted one is off by O(1).
BLOCK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-2}
OTHER_DTYPE_TOLERANCE = 5e-2


def block_mismatch(block: Tensor, encoded: Tensor) -> str | None:
    """Why a coded ``block`` read back (a checkpoint's) is not ``encoded``, the encoding of the plain
    weight it claims to hold, beyond rounding (its shape, or its largest difference); None when it is."""
    if tuple(block.shape) != tuple(encoded.shape):
        return f"shape {tuple(block.shape)}, the encoding has {tuple(encoded.shape)}"
    if not block.numel():
        return None
    encoded = encoded.to(block.dtype)
    allowed = BLOCK_TOLERANCE.get(block.dtype, OTHER_DTYPE_TOLERANCE) * float(encoded.abs().max())
    diff = float((block - encoded).abs().max())
    return None if diff <= allowed else f"largest difference {diff:.3g}, allowed {allowed:.3g}"


def check_blocks(model: nn.Module, blocks: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> None:
    """Raise ValueError, naming worker and block, when a coded block read from a checkpoint
    (``blocks``: {"<j>/fc1.row": C_j, ...}) is not the encoding of the checkpoint's plain weight
    (``weights`` by parameter name) (``block_mismatch``). The row copies are checked: they are what
    the weight is decoded from (a column copy may be stale by design: the first layer's)."""
    for layer in coded_layers(model):
        name = layer.checkpoint_keys[0]
        held = {int(key.split("/", 1)[0]): t for key, t in blocks.items()
                if key.split("/", 1)[1:] == [name] and key.split("/", 1)[0].isdigit()}
        if not held:
            continue
        M = layer.matrices(weights[layer.weight_name].detach())[layer.keys[0]]
        encoded = layer.ctx.encode(M.to(next(iter(held.values())).dtype), layer.out_pad)
        for j, block in sorted(held.items()):
            why = block_mismatch(block, encoded[j])
            if why is not None:
                raise ValueError(f"checkpoint block {name} of worker {j} does not encode the checkpoint's "
                                 f"plain {layer.weight_name} ({why}); the checkpoint is corrupt or of "
                                 "another model")


def repair(model: nn.Module, *workers: int) -> dict[str, object]:
    """Reload the (respawned, empty) ``workers`` with their coded blocks, all from one read: the plain
    weights (and DEU momentum) come from the master (naive) or are decoded once from k live workers
    outside ``workers`` (DEU)."""
    layers = coded_layers(model)
    ctx = context(model)
    workers = tuple(dict.fromkeys(workers))
    live = [j for j in ctx.cluster.alive() if j not in workers]
    if not workers or not ctx.code.can_decode(live):
        raise ClusterError(f"cannot repair workers {list(workers)}: only workers {live} are alive "
                           "besides them")
    weights, buffers = read_matrices(model, momentum=True, exclude=workers)
    for layer in layers:
        mom = {key: buffers[key] for key in layer.keys} if layer.keys[0] in buffers else None
        layer.load_matrices({key: weights[key] for key in layer.keys}, mom, workers=list(workers))
    return {"workers": list(workers), "layers": [layer.name for layer in layers], "momentum": bool(buffers)}


# --------------------------------------------------------------- traffic
def layer_traffic(code: Code, scheme: str | Scheme, fan_in: int, fan_out: int, batch_rows: int,
                  element_size: int, input_grad: bool = True, trainable: bool = True,
                  answer_size: int | None = None) -> dict[str, int]:
    """Bytes of one training iteration of one coded layer (``docs/architecture.md``, traffic).

    N = ``batch_rows`` rows of X (batch, or batch x positions for Conv2d), s = element size, a = the
    answers' element size (``answer_size``: the workers' product precision, default s), R_row and
    R_col = total coded rows of the two copies over all n workers, assuming every live worker is asked
    and k answers of r rows each come back (exact for systematic codes without stragglers):
      forward:        to n*in*N*s,          from out_pad*N*a
      input gradient: to n*out*N*s,         from in_pad*N*a      (only when X needs a gradient)
      update:         to (R_row*c(in) + R_col*c(out))*s          c = ``Scheme.update_columns``:
                      naive c(fan) = fan (O(n*out*in)), DEU c(fan) = min(N, fan) (O(n*N*(out+in)))
    Workers reuse the X^T and dY^T of this step's rounds, and a layer whose input needs no gradient
    neither ships (naive) nor updates (DEU) its column copy (R_col = 0). A frozen layer sends no update.
    ``bytes_sent_once`` counts a broadcast (X^T, dY^T) once and per-worker blocks per worker.
    """
    scheme = get_scheme(scheme)
    n, k, N, s = code.n, code.k, batch_rows, element_size
    a = s if answer_size is None else answer_size
    out_pad, in_pad = round_up(fan_out, k), round_up(fan_in, k)
    R_row = sum(code.block_rows(out_pad // k))
    R_col = sum(code.block_rows(in_pad // k)) if input_grad else 0
    to_w, once, from_w = n * fan_in * N * s, fan_in * N * s, out_pad * N * a
    if input_grad:
        to_w, once, from_w = to_w + n * fan_out * N * s, once + fan_out * N * s, from_w + in_pad * N * a
    update = (R_row * scheme.update_columns(fan_in, N) + R_col * scheme.update_columns(fan_out, N)) * s
    update *= trainable
    return {"bytes_to_workers": to_w + update, "bytes_from_workers": from_w, "bytes_sent_once": once + update}


def predicted_traffic(model: nn.Module, scheme: str | Scheme | None = None) -> dict[str, int]:
    """``layer_traffic`` summed over the coded layers, each at its last batch (``scheme``: predict
    for that scheme instead of the model's own), answers in the cluster's product precision."""
    total = {"bytes_to_workers": 0, "bytes_from_workers": 0, "bytes_sent_once": 0}
    for layer in coded_layers(model):
        products = getattr(layer.ctx.cluster, "compute_dtype", None)
        part = layer_traffic(layer.ctx.code, scheme or layer.scheme, layer.in_features,
                             layer.out_features, layer.last_rows, layer.element_size,
                             layer.last_input_grad, not layer.frozen,
                             None if products is None else getattr(torch, products).itemsize)
        total = {key: total[key] + part[key] for key in total}
    return total


