"""Make an unchanged ``nn.Module`` coded (``parallelize``), and read its plain weights back.

Like ``torch.distributed.tensor.parallel.parallelize_module``, a plan maps submodule names to a
style: ``{"fc1": "coded", "fc2": "coded"}``. Without a plan, every ``nn.Linear`` / ``nn.Conv2d``
whose two coded axes (output features, and input features x kernel size) are both at least
``min_features`` wide is coded: narrower layers cost a round trip per product and save nothing, so
they stay on the master with the biases, activations and loss.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from sazd.codes.base import Code
from sazd.parallel.layers import SCHEMES, CodedContext, CodedConv2d, CodedLayer, CodedLinear, ships_gradient
from sazd.runtime.cluster import Cluster, ClusterError

STYLES = ("coded", "master")
DEFAULT_MIN_FEATURES = 64
CODABLE = (nn.Linear, nn.Conv2d)


def parallelize(
    model: nn.Module,
    code: Code,
    cluster: Cluster,
    plan: Mapping[str, str] | None = None,
    scheme: str = "deu",
    min_features: int = DEFAULT_MIN_FEATURES,
) -> nn.Module:
    """Replace the planned layers of ``model`` (in place) by coded layers whose weights live, encoded
    by ``code``, on the ``cluster``'s workers; returns ``model``.

    ``scheme="naive"`` keeps each weight as a master ``nn.Parameter`` (any torch optimizer works; the
    weights are re-encoded and shipped after each change); ``scheme="deu"`` keeps no plain weight on
    the master: the workers update their coded weights (``sazd.train.optim.CodedOptimizer``).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    if cluster.n != code.n:
        raise ValueError(f"cluster has n={cluster.n} workers but the code needs n={code.n}; make them equal")
    if not code.can_decode(cluster.alive()):
        raise ClusterError(f"only workers {cluster.alive()} are alive; the code needs k={code.k} of {code.n}")
    if coded_layers(model):
        raise ValueError("model is already parallelized (it holds coded layers); parallelize a plain model")
    targets = resolve_plan(model, plan, min_features)
    ctx = CodedContext(code, cluster, scheme)
    for name, module in targets.items():
        cls = CodedLinear if isinstance(module, nn.Linear) else CodedConv2d
        ctx.layers[name] = layer = cls(name, module, ctx)
        _replace(model, name, layer)
    return model


def resolve_plan(model: nn.Module, plan: Mapping[str, str] | None, min_features: int) -> dict[str, nn.Module]:
    """The submodules to code, checked: every name exists and every layer can be coded."""
    modules = dict(model.named_modules())
    if plan is None:
        if not isinstance(min_features, int) or min_features < 1:
            raise ValueError(f"min_features must be an integer >= 1, got {min_features!r}")
        chosen = {
            name: m for name, m in modules.items()
            if isinstance(m, CODABLE) and min(_widths(m)) >= min_features
        }
        if not chosen:
            widths = {name: _widths(m) for name, m in modules.items() if isinstance(m, CODABLE)}
            raise ValueError(
                f"no Linear/Conv2d layer has both widths (out, in*kernel) >= min_features={min_features} "
                f"(layers: {widths}); pass plan={{'name': 'coded'}} or a smaller min_features"
            )
    else:
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
                chosen[name] = modules[name]
    for name, module in chosen.items():
        _check_codable(name, module)
    return chosen


def _widths(m: nn.Module) -> tuple[int, int]:
    return m.weight.shape[0], m.weight[0].numel()


def _check_codable(name: str, m: nn.Module) -> None:
    if type(m) not in (nn.Linear, nn.Conv2d):
        raise ValueError(
            f"layer {name!r} is a {type(m).__name__}; only nn.Linear and nn.Conv2d can be coded (their "
            f"weight is a matrix product's rows); set plan[{name!r}] = 'master' or drop it from the plan"
        )
    if not m.weight.is_floating_point():
        raise ValueError(f"layer {name!r} has a {m.weight.dtype} weight; coded layers need floating point")
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            raise ValueError(f"layer {name!r} is a grouped Conv2d (groups={m.groups}); only groups=1 codes")
        if m.padding_mode != "zeros":
            raise ValueError(
                f"layer {name!r} has padding_mode={m.padding_mode!r}; only 'zeros' can be coded"
            )
        if isinstance(m.padding, str):
            raise ValueError(
                f"layer {name!r} has padding={m.padding!r}; give the padding as integers to code it"
            )


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


def decoded_copies(
    model: nn.Module, momentum: bool = False, exclude: Sequence[int] = ()
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Both plain matrices of every coded layer, {"fc1.row": W, "fc1.col": W^T}, and with ``momentum``
    their SGD momentum buffers. Naive: from the master's weights. DEU: decoded from the first k
    workers' state (one round for all layers, never from workers in ``exclude``). In DEU the two copies
    are updated separately, so W^T of the column copy equals the row copy's W only to rounding."""
    layers = coded_layers(model)
    ctx = context(model)
    if ctx.scheme == "naive":
        copies = [layer.plain_copies(layer.weight.detach()) for layer in layers]
        return {key: t.clone() for c in copies for key, t in c.items()}, {}
    states = ctx.fetch_state([key for layer in layers for key in layer.keys], exclude)
    weights, buffers = {}, {}
    for layer in layers:
        weights.update(layer.decode_copies(states, "weights"))
        if momentum:
            buffers.update(layer.decode_copies(states, "momentum") or {})
    return weights, buffers


def plain_weights(
    model: nn.Module, momentum: bool = False, exclude: Sequence[int] = ()
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The plain weight of every coded layer ({"fc1.weight": W}, decoded from the row copy in DEU) and,
    with ``momentum``, its SGD momentum buffer (DEU only: naive keeps momentum in the master optimizer)."""
    copies, buffers = decoded_copies(model, momentum, exclude)
    weights, moms = {}, {}
    for layer in coded_layers(model):
        weights[f"{layer.name}.weight"] = copies[layer.keys[0]].reshape(layer.weight_shape)
        if layer.keys[0] in buffers:
            moms[f"{layer.name}.weight"] = buffers[layer.keys[0]].reshape(layer.weight_shape)
    return weights, moms


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``state_dict`` of the plain model: the same keys as before ``parallelize``."""
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    state.update(plain_weights(model)[0])
    return state


def plain_model(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` on the master, coded layers replaced by nn.Linear / nn.Conv2d."""
    ctx = context(model)
    weights = plain_weights(model)[0]
    plain = copy.deepcopy(model, memo={id(ctx): ctx})
    for layer in coded_layers(plain):
        _replace(plain, layer.name, layer.to_plain(weights[f"{layer.name}.weight"]))
    return plain


def load_plain_weights(model: nn.Module, weights: Mapping[str, Tensor],
                       momentum: Mapping[str, Tensor] | None = None,
                       columns: Mapping[str, Tensor] | None = None) -> None:
    """Set every coded layer's weight (and, DEU, momentum) from plain tensors and ship them.

    DEU: ``columns`` may give the column copies ({"fc1.col": W^T, "fc1.col/momentum_buffer": ...}, as
    ``decoded_copies`` returns them) so both copies continue bit for bit; otherwise W^T is used."""
    for layer in coded_layers(model):
        key = f"{layer.name}.weight"
        if key not in weights:
            raise ValueError(f"weights has no entry {key!r}; it must hold every coded layer's weight")
        W = weights[key]
        if tuple(W.shape) != layer.weight_shape:
            raise ValueError(f"weights[{key!r}] has shape {tuple(W.shape)}, expected {layer.weight_shape}")
        if layer.ctx.scheme == "naive":
            with torch.no_grad():
                layer.weight.copy_(W)
            layer.sync()
        else:
            M = None if momentum is None else momentum.get(key)
            copies = layer.plain_copies(W.to(layer._handle))
            buffers = None if M is None else layer.plain_copies(M.to(layer._handle))
            col = layer.keys[1]
            if columns is not None and col in columns:
                copies[col] = columns[col].to(layer._handle)
                if buffers is not None and f"{col}/momentum_buffer" in columns:
                    buffers[col] = columns[f"{col}/momentum_buffer"].to(layer._handle)
            layer.load_copies(copies, buffers)


def repair(model: nn.Module, worker: int) -> dict[str, object]:
    """Reload the (respawned, empty) ``worker`` with its coded blocks: the plain weights (and DEU
    momentum) come from the master (naive) or are decoded from k live workers (DEU)."""
    layers = coded_layers(model)
    ctx = context(model)
    live = [j for j in ctx.cluster.alive() if j != worker]
    if not ctx.code.can_decode(live):
        raise ClusterError(f"cannot repair worker {worker}: only workers {live} are alive besides it")
    weights, buffers = decoded_copies(model, momentum=True, exclude=[worker])
    for layer in layers:
        mom = {key: buffers[key] for key in layer.keys} if layer.keys[0] in buffers else None
        layer.load_copies({key: weights[key] for key in layer.keys}, mom, workers=[worker])
    return {"worker": worker, "layers": [layer.name for layer in layers], "momentum": bool(buffers)}


def predicted_traffic(model: nn.Module, scheme: str | None = None) -> dict[str, int]:
    """Bytes of one training iteration by the DESIGN.md formula, from each coded layer's last batch
    (``scheme``: predict for that scheme instead of the model's own).

    Per coded layer with N rows of X (batch, or batch x positions for Conv2d), element size s, R_row
    and R_col = total coded rows of the two copies over all n workers, assuming every live worker is
    asked and k answers of r rows each come back (exact for systematic codes without stragglers):
      forward:        to n*in*N*s,          from out_pad*N*s
      input gradient: to n*out*N*s,         from in_pad*N*s     (skipped when X needs no gradient)
      naive update:   to (R_row*in + R_col*out)*s                  -- O(n*out*in)
      DEU update:     to (R_row*min(N, in) + R_col*min(N, out))*s  -- O(n*N*(out+in)) at most
    (DEU sends per copy the smaller of the encoded factor, N columns, and the encoded gradient,
    in or out columns: ``layers.ships_gradient``.)
    Workers reuse the X^T and dY^T of this step's rounds (``Worker.sgd_update``), and a layer whose
    input needs no gradient neither ships (naive) nor updates (DEU) its column copy (R_col terms drop).
    """
    to_w = from_w = 0
    for layer in coded_layers(model):
        ctx, N = layer.ctx, layer.last_rows
        n, k, s = ctx.code.n, ctx.code.k, layer.element_size
        R_row = sum(ctx.code.block_rows(layer.out_pad // k))
        R_col = sum(ctx.code.block_rows(layer.in_pad // k))
        to_w += n * layer.in_features * N * s
        from_w += layer.out_pad * N * s
        if layer.last_input_grad:
            to_w += n * layer.out_features * N * s
            from_w += layer.in_pad * N * s
        if not layer.last_input_grad:
            R_col = 0
        to_w += update_bytes(scheme or ctx.scheme, R_row, R_col, layer.in_features, layer.out_features, N, s)
    return {"bytes_to_workers": to_w, "bytes_from_workers": from_w}


def update_bytes(scheme: str, rows_row: int, rows_col: int, fan_in: int, fan_out: int, batch_rows: int,
                 element_size: int) -> int:
    """Bytes to the workers of one coded layer's weight update, the coded rows of the row and column
    copies summed over the workers: naive ships both copies (fan columns each); DEU the smaller of
    the encoded factor (``batch_rows`` columns) and the encoded gradient per copy (``ships_gradient``)."""
    def columns(fan: int) -> int:  # per coded row
        return fan if scheme == "naive" or ships_gradient(batch_rows, fan) else batch_rows

    return (rows_row * columns(fan_in) + rows_col * columns(fan_out)) * element_size
