"""Make an unchanged ``nn.Module`` coded (``parallelize``), read its plain weights back, and the
traffic formula of one iteration.

Like ``torch.distributed.tensor.parallel.parallelize_module``, a plan maps submodule names to a
style: ``{"fc1": "coded", "fc2": "coded"}``. Without a plan, every ``nn.Linear`` / ``nn.Conv2d``
(subclasses included) whose two coded axes (output features, and input features x kernel size) are
both at least ``min_features`` wide is coded: narrower layers cost a round trip per product and save
nothing, so they stay on the master with the biases, activations and loss. Layers that cannot be
coded (a weight shared with another module, a grouped convolution, the projections inside
``nn.MultiheadAttention``, which reads them without calling them...) also stay on the master; the
automatic plan says which and why (``UserWarning``, and ``context(model).left_on_master``), and an
explicit plan naming one is an error.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from sazd.codes.base import Code
from sazd.parallel.layers import CodedContext, CodedConv2d, CodedLayer, CodedLinear, round_up
from sazd.parallel.schemes import DEFAULT_SCHEME, Scheme, States, get_scheme
from sazd.runtime.cluster import Cluster, ClusterError

STYLES = ("coded", "master")
DEFAULT_MIN_FEATURES = 64
CODABLE = (nn.Linear, nn.Conv2d)


def parallelize(
    model: nn.Module,
    code: Code,
    cluster: Cluster,
    plan: Mapping[str, str] | None = None,
    scheme: str | Scheme = DEFAULT_SCHEME,
    min_features: int = DEFAULT_MIN_FEATURES,
    decode_device: str | torch.device | None = None,
) -> nn.Module:
    """Replace the planned layers of ``model`` (in place) by coded layers whose weights live, encoded
    by ``code``, on the ``cluster``'s workers; returns ``model``.

    ``scheme``: a ``Scheme`` or its name. ``Naive`` keeps each weight as a master parameter (any torch
    optimizer works; the weights are re-encoded and shipped after each change); ``DEU`` (default)
    keeps no plain weight on the master: the workers update their coded weights. Either way, step with
    ``sazd.coded_optimizer(torch.optim.SGD(model.parameters(), ...))`` (naive: any optimizer).
    ``decode_device``: where the master decodes the workers' answers (e.g. ``"cuda"`` on a master with
    a GPU; default: the device of the activations); decoded products return to the activations' device.
    """
    scheme = get_scheme(scheme)
    decode_device = check_decode_device(decode_device)
    if cluster.n != code.n:
        raise ValueError(f"cluster has n={cluster.n} workers but the code needs n={code.n}; make them equal")
    if not code.can_decode(cluster.alive()):
        raise ClusterError(f"only workers {cluster.alive()} are alive; the code needs k={code.k} of {code.n}")
    if coded_layers(model):
        raise ValueError("model is already parallelized (it holds coded layers); parallelize a plain model")
    targets, left = plan_layers(model, plan, min_features)
    refused = {name: why for name, why in left.items() if not why.startswith("narrower")}
    if refused:
        warnings.warn("left on the master: " + "; ".join(f"{n}: {w}" for n, w in refused.items()),
                      UserWarning, stacklevel=2)
    ctx = CodedContext(code, cluster, scheme, model, decode_device)
    ctx.left_on_master = left
    for name, module in targets.items():
        cls = CodedConv2d if isinstance(module, nn.Conv2d) else CodedLinear
        ctx.layers[name] = layer = cls(name, module, ctx)
        _replace(model, name, layer)
    return model


def resolve_plan(model: nn.Module, plan: Mapping[str, str] | None, min_features: int) -> dict[str, nn.Module]:
    """The submodules to code, checked: every name exists and every layer can be coded."""
    return plan_layers(model, plan, min_features)[0]


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


def plan_layers(model: nn.Module, plan: Mapping[str, str] | None, min_features: int,
                ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(the submodules to code, {Linear/Conv2d left on the master: why}). An explicit plan entry
    that cannot be coded is a ValueError naming the layer and the reason."""
    modules = dict(model.named_modules())
    shared = _shared_weights(model)
    if plan is None:
        if not isinstance(min_features, int) or min_features < 1:
            raise ValueError(f"min_features must be an integer >= 1, got {min_features!r}")
        chosen, left = {}, {}
        for name, m in modules.items():
            if not isinstance(m, CODABLE):
                continue
            why = why_not_codable(name, m, modules, shared)
            if why is None and min(_widths(m)) < min_features:
                why = f"narrower than min_features={min_features} (widths {_widths(m)})"
            if why is None:
                chosen[name] = m
            else:
                left[name] = why
        if not chosen:
            raise ValueError(
                f"no Linear/Conv2d layer can be coded with both widths (out, in*kernel) >= min_features="
                f"{min_features} ({left}); pass plan={{'name': 'coded'}} or a smaller min_features"
            )
        return chosen, left
    if not isinstance(plan, Mapping):
        raise ValueError(f"plan must map layer names to 'coded' or 'master', got {type(plan).__name__}")
    chosen = {}
    for name, style in plan.items():
        if name not in modules or name == "":
            codable = [n for n, m in modules.items() if isinstance(m, CODABLE)]
            raise ValueError(f"plan names layer {name!r}, which the model lacks; its layers: {codable}")
        if style not in STYLES:
            raise ValueError(f"plan[{name!r}] = {style!r}; a style is one of {list(STYLES)}")
        if style == "coded":
            why = why_not_codable(name, modules[name], modules, shared)
            if why is not None:
                raise ValueError(f"layer {name!r} cannot be coded: {why}; set plan[{name!r}] = 'master' "
                                 "or drop it from the plan")
            chosen[name] = modules[name]
    return chosen, {name: "plan says 'master'" for name, s in plan.items() if s == "master"}


def why_not_codable(name: str, m: nn.Module, modules: Mapping[str, nn.Module],
                    shared: Mapping[int, list[str]]) -> str | None:
    """Why module ``name`` cannot be coded, or None when it can."""
    if not isinstance(m, CODABLE):
        return (f"it is a {type(m).__name__}; only nn.Linear and nn.Conv2d (and subclasses that keep their "
                "forward) can be coded")
    base = nn.Linear if isinstance(m, nn.Linear) else nn.Conv2d
    overridden = [f for f in ("forward", "_conv_forward") if hasattr(base, f)
                  and getattr(type(m), f) is not getattr(base, f)]
    if overridden:
        return f"its class {type(m).__name__} overrides {overridden[0]}, which a coded layer would not run"
    parent = modules.get(name.rpartition(".")[0])
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads this projection's weight directly instead of calling it"
    owners = shared.get(id(m.weight), [name])
    if len(owners) > 1:
        return (f"its weight is shared by {owners} (tied, or one module under several names); one coded "
                "copy cannot serve the other uses")
    if not m.weight.is_floating_point():
        return f"its weight is {m.weight.dtype}; coded layers need floating point"
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return f"it is a grouped Conv2d (groups={m.groups}); only groups=1 codes"
        if m.padding_mode != "zeros":
            return f"it has padding_mode={m.padding_mode!r}; only 'zeros' can be coded"
        if isinstance(m.padding, str):
            return f"it has padding={m.padding!r}; give the padding as integers to code it"
    return None


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every module name that holds it (more than one: a tie)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(name)
    return owners


def _widths(m: nn.Module) -> tuple[int, int]:
    return m.weight.shape[0], m.weight[0].numel()


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


# --------------------------------------------------------------- reading back
def coded_layers(model: nn.Module) -> list[CodedLayer]:
    return [m for m in model.modules() if isinstance(m, CodedLayer)]


def context(model: nn.Module) -> CodedContext:
    layers = coded_layers(model)
    if not layers:
        raise ValueError("model has no coded layers; call sazd.parallelize(model, code, cluster) first")
    return layers[0].ctx


def read_matrices(
    model: nn.Module, momentum: bool = False, exclude: Sequence[int] = (), states: States | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Both plain matrices of every coded layer, {"fc1.row": W, "fc1.col": W^T}, and with ``momentum``
    the workers' SGD momentum buffers, in one round (DEU; naive: the master's weights). Never reads
    from workers in ``exclude``; ``states``: decode these, already fetched. A read of its own (no
    ``states``) also refreshes what ``layer.weight`` shows."""
    ctx = context(model)
    layers = coded_layers(model)
    weights, buffers = ctx.scheme.read_matrices(ctx, layers, momentum, exclude, states)
    if ctx.scheme.decodes_weight and states is None:
        for layer in layers:
            layer.decoded = weights[layer.keys[0]].reshape(layer.weight_shape)
    return weights, buffers


def plain_weights(
    model: nn.Module, momentum: bool = False, exclude: Sequence[int] = ()
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The plain weight of every coded layer ({"fc1.weight": W}, decoded from the row copy in DEU) and,
    with ``momentum``, its SGD momentum buffer (DEU only: naive keeps momentum in the optimizer)."""
    return by_weight_name(model, *read_matrices(model, momentum, exclude))


def by_weight_name(model: nn.Module, matrices: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                   ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``read_matrices``' row copies as plain weights and momentum by parameter name ("fc1.weight")."""
    weights, moms = {}, {}
    for layer in coded_layers(model):
        weights[f"{layer.name}.weight"] = matrices[layer.keys[0]].reshape(layer.weight_shape)
        if layer.keys[0] in buffers:
            moms[f"{layer.name}.weight"] = buffers[layer.keys[0]].reshape(layer.weight_shape)
    return weights, moms


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``model.state_dict()``: the keys, shapes and values of the plain model."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def plain_model(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` on the master, coded layers replaced by nn.Linear / nn.Conv2d."""
    layers = coded_layers(model)
    weights = plain_weights(model)[0]
    plain_layers = {layer.name: layer.to_plain(weights[f"{layer.name}.weight"]) for layer in layers}
    for layer in layers:  # copy the model with its plain layers in place of the coded ones
        _replace(model, layer.name, plain_layers[layer.name])
    try:
        plain = copy.deepcopy(model)
    finally:
        for layer in layers:
            _replace(model, layer.name, layer)
    return plain


def load_weights(model: nn.Module, weights: Mapping[str, Tensor],
                 momentum: Mapping[str, Tensor] | None = None,
                 columns: Mapping[str, Tensor] | None = None) -> None:
    """Set every coded layer's weight (and, DEU, momentum) from plain tensors and ship them.

    DEU: ``columns`` may give the column copies ({"fc1.col": W^T, "fc1.col/momentum_buffer": ...}, as
    ``read_matrices`` returns them) so both copies continue bit for bit; otherwise W^T is used."""
    for layer in coded_layers(model):
        key = f"{layer.name}.weight"
        if key not in weights:
            raise ValueError(f"weights has no entry {key!r}; it must hold every coded layer's weight")
        W = weights[key]
        if tuple(W.shape) != layer.weight_shape:
            raise ValueError(f"weights[{key!r}] has shape {tuple(W.shape)}, expected {layer.weight_shape}")
        M = None if momentum is None else momentum.get(key)
        if not layer.ctx.scheme.decodes_weight or columns is None or layer.keys[1] not in columns:
            layer.ctx.scheme.load_weight(layer, W, M)
            continue
        device = layer.coded_weight
        col = layer.keys[1]
        copies = {**layer.matrices(W.to(device)), col: columns[col].to(device)}
        buffers = None if M is None else layer.matrices(M.to(device))
        if buffers is not None and f"{col}/momentum_buffer" in columns:
            buffers[col] = columns[f"{col}/momentum_buffer"].to(device)
        layer.load_matrices(copies, buffers)


def repair(model: nn.Module, worker: int) -> dict[str, object]:
    """Reload the (respawned, empty) ``worker`` with its coded blocks: the plain weights (and DEU
    momentum) come from the master (naive) or are decoded from k live workers (DEU)."""
    layers = coded_layers(model)
    ctx = context(model)
    live = [j for j in ctx.cluster.alive() if j != worker]
    if not ctx.code.can_decode(live):
        raise ClusterError(f"cannot repair worker {worker}: only workers {live} are alive besides it")
    weights, buffers = read_matrices(model, momentum=True, exclude=[worker])
    for layer in layers:
        mom = {key: buffers[key] for key in layer.keys} if layer.keys[0] in buffers else None
        layer.load_matrices({key: weights[key] for key in layer.keys}, mom, workers=[worker])
    return {"worker": worker, "layers": [layer.name for layer in layers], "momentum": bool(buffers)}


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
        part = layer_traffic(layer.ctx.code, scheme or layer.ctx.scheme, layer.in_features,
                             layer.out_features, layer.last_rows, layer.element_size,
                             layer.last_input_grad, not layer.frozen,
                             None if products is None else getattr(torch, products).itemsize)
        total = {key: total[key] + part[key] for key in total}
    return total


# Earlier names, kept for callers that use them.
decoded_copies = read_matrices
load_plain_weights = load_weights
