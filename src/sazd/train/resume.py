"""Taking a running trainer's checkpoint, and resuming from one.

``take(trainer)``: the plain weights and optimizer state decoded from the first k workers that answer
(a frozen worker never stalls a checkpoint), each of those workers' DEU blocks as they are, RNG, data
position, config and the cluster's schedule; checked as a resume would check it before it is written,
so every checkpoint sazd writes is complete and loadable.

``open_checkpoint(cfg)`` -> ``check(trainer, ckpt)`` -> ``restore(trainer, ckpt)``: a checkpoint is an
untrusted input. It is found and verified (checksums), its config must be resumable under the run's
settings, every tensor and field is checked against this model, optimizer and data, and each saved
DEU block is compared with the encoding of the saved plain weights (within ``block_mismatch``'s tolerance):
a block that does not encode those weights is refused, naming the worker and the block. Workers
whose blocks were not saved are rebuilt from the plain weights. Nothing read chooses a path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sazd.maintain import CodedState
from sazd.parallel import coded_layers, load_weights
from sazd.parallel.plan import block_mismatch
from sazd.train import checkpoint
from sazd.train.checkpoint import Checkpoint, CheckpointError
from sazd.train.config import RESUME_FIELDS, TrainConfig
from sazd.train.report import to_jsonable
from sazd.train.rundir import RunDir

if TYPE_CHECKING:
    from sazd.train.trainer import Trainer

# How far a saved DEU block may be from the encoding of the saved plain weights, relative to the
# block's largest entry: the decode error of those weights plus the rounding an in-place update adds.


# ------------------------------------------------------------------------------------ saving
def take(trainer: Trainer) -> Checkpoint:
    """The checkpoint of ``trainer`` now (one round of the workers, which leaves the schedule as it
    was), checked like a resume will check it."""
    schedule = trainer.cluster.schedule_state()
    state = trainer.maintainer.state(blocks=True)  # the first k workers' blocks and decoded state
    trainer.cluster.load_schedule_state(schedule)  # saving's own rounds leave no trace in the schedule
    optim_tensors, optim_meta = trainer.opt.plain_state(state.momentum)
    meta = to_jsonable({"run_id": trainer.run_id, "position": dataclasses.asdict(trainer.position),
                        "optim": optim_meta, "config": trainer.cfg.to_dict(), "code": repr(trainer.code),
                        "data": trainer.data_summary, "schedule": schedule})  # as a resume reads it
    ckpt = Checkpoint(model=state.model, optim=optim_tensors, meta=meta, rng=torch.get_rng_state(),
                      columns=state.columns, coded=_maintained(trainer, state.blocks))
    try:
        check(trainer, ckpt)
    except CheckpointError as err:
        raise CheckpointError(f"refusing to write an incomplete checkpoint ({err})") from None
    return ckpt


def _maintained(trainer: Trainer, blocks: dict[str, Tensor]) -> dict[str, Tensor]:
    """The blocks a resume should load as they are: without the column copies the workers no longer
    keep current (a layer whose input needs no gradient); those are rebuilt from the plain weights."""
    stale = {layer.keys[1] for layer in coded_layers(trainer.model) if getattr(layer, "col_stale", False)}
    return {key: t for key, t in blocks.items() if key.split("/")[1] not in stale}


# ---------------------------------------------------------------------------------- resuming
def open_checkpoint(cfg: TrainConfig) -> Checkpoint | None:
    """The verified checkpoint ``cfg.resume`` names (None without ``--resume``), its settings checked
    against the run's; output directories default to where it was found."""
    if not cfg.resume:
        return None
    found = checkpoint.find(cfg.resume)
    ckpt = checkpoint.load(found)
    check_resumable(cfg, TrainConfig.from_checkpoint(ckpt.meta["config"]))
    if cfg.run_dir is None:  # where the user pointed: the directory resumed from
        run_dir, ckpt_dir = resume_dirs(cfg.resume)
        cfg.run_dir = run_dir and str(run_dir)
        cfg.checkpoint_dir = cfg.checkpoint_dir or (ckpt_dir and str(ckpt_dir))
    return ckpt


def check_resumable(cfg: TrainConfig, saved: TrainConfig) -> None:
    """The run's settings that fix the model, data order and update rule equal the checkpoint's."""
    ours, theirs = to_jsonable(cfg.to_dict()), to_jsonable(saved.to_dict())
    if cfg.optim.total_steps is None:  # filled in from the run's length when the checkpoint's run began
        ours["optim"]["total_steps"] = theirs["optim"]["total_steps"]
    diff = [f"{name}: run {ours[name]!r} vs checkpoint {theirs[name]!r}"
            for name in RESUME_FIELDS if ours[name] != theirs[name]]
    if diff:
        raise ValueError("cannot resume: the run's settings differ from the checkpoint's (" + "; ".join(diff)
                         + "); resume with the checkpoint's settings")


def plain_template(model: torch.nn.Module) -> Checkpoint:
    """The names, shapes and dtypes a checkpoint of the plain ``model`` holds (meta tensors: no memory);
    taken before the model is parallelized."""
    def shape(t: Tensor) -> Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    return Checkpoint(model={k: shape(v) for k, v in model.state_dict().items()},
                      optim={name: shape(p) for name, p in model.named_parameters() if p.requires_grad},
                      meta={}, rng=torch.get_rng_state())


def check(trainer: Trainer, ckpt: Checkpoint) -> None:
    """Every tensor and field of ``ckpt`` against this model, optimizer, data and config."""
    cfg, plain = trainer.cfg, trainer.plain
    template = dataclasses.replace(plain, meta={"data": to_jsonable(trainer.data_summary)},
                                   columns=ckpt.columns)  # the columns: checked in restore
    checkpoint.check(ckpt, template, trainer.steps_per_epoch, cfg.optim.name, cfg.optim.momentum)


def restore(trainer: Trainer, ckpt: Checkpoint) -> None:
    """Load a checkpoint that ``check`` accepted: weights, optimizer, RNG, position and the cluster's
    schedule (latency models and faults continue where they were)."""
    layers = coded_layers(trainer.model)
    coded = {layer.weight_name for layer in layers}
    momentum = {key.split("/")[0]: t for key, t in ckpt.optim.items()
                if key.split("/")[0] in coded and key.endswith("/momentum_buffer")}
    columns = {}
    for scheme in {id(layer.scheme): layer.scheme for layer in layers}.values():
        own = [layer for layer in layers if layer.scheme is scheme]
        columns.update(scheme.column_shapes(own, trainer.dtype, bool(momentum)))
    if not columns:
        momentum = {}  # no scheme keeps momentum on the workers: the torch optimizer holds it
    checkpoint.check_tensors("columns", ckpt.columns, columns)
    trainer.maintainer.load_state(CodedState(ckpt.model, momentum, ckpt.columns))  # encoded, shipped
    trainer.opt.load_master_state(ckpt.optim, ckpt.meta["optim"])
    torch.set_rng_state(ckpt.rng)
    trainer.position = type(trainer.position)(**ckpt.meta["position"])
    cluster = trainer.cluster
    try:
        schedule = ckpt.meta["schedule"]
        cluster.load_schedule_state(schedule)
    except ValueError as err:
        raise CheckpointError(f"checkpoint field {err}") from None
    load_blocks(trainer, ckpt.coded, alive=[j for j in range(trainer.code.n) if j not in schedule["dead"]])
    if not trainer.code.can_decode(cluster.alive()):  # lost past decoding when it was saved:
        state = cluster.schedule_state()  # those workers come back as fresh ones, weights shipped
        cluster.respawn(*state["dead"])
        for j in state["dead"]:
            state["incarnation"][j], state["tasks"][j] = state["incarnation"][j] + 1, 0
        load_weights(trainer.model, ckpt.model, momentum or None, columns=ckpt.columns or None)
        load_blocks(trainer, ckpt.coded, alive=[j for j in range(trainer.code.n) if j not in state["dead"]])
        cluster.load_schedule_state({**state, "dead": []})
    else:
        cluster.load_schedule_state(schedule)  # the loads above leave no trace in the schedule


def load_blocks(trainer: Trainer, coded: dict[str, Tensor], alive: list[int]) -> None:
    """DEU: give each worker whose blocks were saved (and that was alive then) those blocks exactly as
    saved, after comparing them with the encoding of the saved plain weights that every worker has
    just received; the other workers keep that encoding."""
    workers = sorted(_saved_workers(coded, trainer.code.n))
    dead = [j for j in workers if j not in alive]
    if dead:
        raise CheckpointError(f"checkpoint tensors coded/ hold blocks of workers {dead}, which were dead "
                              "when it was saved; the checkpoint is inconsistent")
    if not workers:
        return
    cluster = trainer.cluster
    fresh = cluster.wait_all(cluster.submit("state", (None,), workers))
    want = {f"{j}/{key}{suffix}": t for j in workers
            for part, suffix in (("weights", ""), ("momentum", "/momentum_buffer"))
            for key, t in fresh[j][part].items()}
    _check_blocks(coded, want)
    args = {j: ({key: coded[f"{j}/{key}"] for key in fresh[j]["weights"] if f"{j}/{key}" in coded},
                {key: coded[f"{j}/{key}/momentum_buffer"] for key in fresh[j]["weights"]
                 if f"{j}/{key}/momentum_buffer" in coded}) for j in workers}
    cluster.wait_all(cluster.submit("load", args, workers))


def _saved_workers(coded: dict[str, Tensor], n: int) -> set[int]:
    workers = set()
    for key in coded:
        head = key.split("/")[0]
        if not (head.isdigit() and int(head) < n):
            raise CheckpointError(f"checkpoint tensor coded/{key} names no worker of 0..{n - 1}; the "
                                  "checkpoint does not fit this run")
        workers.add(int(head))
    return workers


def _check_blocks(coded: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    """Each saved block is one a worker holds (name, shape, dtype, finite; with its momentum when the
    worker keeps one) and encodes the saved plain weights to within ``block_mismatch``'s tolerance."""
    unknown = sorted(set(coded) - set(want))
    if unknown:
        raise CheckpointError(f"checkpoint tensor coded/{unknown[0]} is no block of this run's workers; the "
                              "checkpoint does not fit this run or was edited")
    checkpoint.check_tensors("coded", coded, {key: want[key] for key in coded})
    for key in coded:
        if f"{key}/momentum_buffer" in want and f"{key}/momentum_buffer" not in coded:
            raise CheckpointError(f"checkpoint tensor coded/{key} was saved without its momentum buffer; "
                                  "the checkpoint is incomplete")
    for key, got in coded.items():
        why = block_mismatch(got, want[key])
        if why is not None:
            worker, _, block = key.partition("/")
            raise CheckpointError(f"checkpoint block {block} of worker {worker} does not encode the "
                                  f"checkpoint's plain weights ({why}); the checkpoint was edited or is "
                                  "damaged: resume from another checkpoint")


def resume_dirs(resume: str | Path) -> tuple[Path | None, Path | None]:
    """Where a run resumed from ``resume`` writes unless told otherwise: (run directory, checkpoint
    directory or None for RUN_DIR/checkpoint). A run directory resumes into itself; a checkpoint
    directory keeps its checkpoints, with its parent as run directory when that holds the same run.
    Never a path read from the checkpoint."""
    given, found = Path(resume), checkpoint.find(resume)
    if found.parent == given:  # given a run directory (found: its checkpoint, or a crash leftover)
        return given, None
    canonical = found.with_name(found.name.removesuffix(".tmp").removesuffix(".old"))
    owner = RunDir.owner(found.parent)
    return (found.parent if owner is not None and owner == checkpoint.run_id_of(found) else None), canonical

