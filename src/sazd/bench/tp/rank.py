"""One rank of PyTorch tensor parallelism: ``python -m sazd.bench.tp.rank SPEC.json RANK``.

Started by ``sazd.bench.tp.launch`` with torchrun's environment (``MASTER_ADDR``, ``MASTER_PORT``,
``WORLD_SIZE``, ``RANK``). The rank joins a gloo (CPU) or NCCL (GPU) process group, builds the
model of the spec with sazd's own builder and seed, shards it with ``parallelize_module`` over a 1-D
``DeviceMesh`` and trains it with ``torch.optim.SGD`` on the spec's batches:

- MLP ``flatten -> fc1 -> relu -> fc2 -> relu -> fc3``: fc1 ``ColwiseParallel`` (each rank W/k
  output features), fc2 ``RowwiseParallel`` (its W/k input features, partial sums all-reduced);
  fc3 (W -> 10) stays replicated.
- gpt: per block, ``attn.c_attn`` and ``mlp.c_fc`` colwise, ``attn.c_proj`` and ``mlp.c_proj``
  rowwise (Megatron's layout: one all-reduce after attention and one after the MLP, forward and
  backward). The fused q/k/v rows are reordered first so that rank r's contiguous shard holds q, k
  and v of its own n_head/k heads (``order_qkv``), and attention runs on those local heads.

The spec's ``phases`` (one straggler each, ``steps`` batches each, training going on from phase to
phase) run one after another. Stragglers (``sazd.stragglers``): before the first phase the rank
measures its compute, the median time of one step's forward and backward on its local shards alone
(``local_copy``). In a phase its call ``t`` (= the phase's step t) is slowed by the shared latency
model's factor ``slowdown(rank, t)`` (a sleep of ``(factor - 1) x compute`` after the step's
backward), it exits at the call the model says it dies, and a noisy neighbour takes CPU from it.
With a ``target`` in the spec (``sazd.bench.tp.target``) every phase starts from a fresh model and
optimizer (the ``prewarm`` steps before the first phase train one thrown away) and is evaluated on
the held-out set every ``every`` steps: a forward of the sharded model on every rank, rank 0's
metric broadcast so that all ranks stop at the same step, then a barrier, so the evaluation stays
out of the next step's time. Each step records its CPU time: ``cpu_s`` of this thread (forward,
backward, optimizer step; a straggler's sleep and the wait in a collective take none) and
``process_cpu_s`` of the whole process (gloo's own threads too). Results go to
``<out>/rank<R>.json`` (and, if asked, the trained parameters, gathered and in the plain model's
layout, to ``params.safetensors`` by rank 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sazd.bench.tp.target import Schedule, Target
from sazd.data import batches, load_dataset, num_batches
from sazd.measure.training import synthetic_data
from sazd.models import build_model, task_of
from sazd.stragglers import from_dict, straggle

DIED_EXIT = 17  # a rank the latency model kills exits with this code


# ------------------------------------------------------------------ the model and its plan
def build(spec: dict[str, Any]) -> nn.Module:
    """The spec's model exactly as sazd builds it (same builder, seed and dtype)."""
    return build_model(spec["model"], spec["in_shape"], spec["num_classes"], tuple(spec["hidden"]),
                       seed=spec["seed"], dtype=getattr(torch, spec["dtype"]))


def qkv_order(n_embd: int, k: int) -> Tensor:
    """Row order of a fused q/k/v projection that puts rank r's q, k, v rows (its heads) in its chunk."""
    rows = torch.arange(3 * n_embd).view(3, k, n_embd // k)  # (q|k|v, rank, that rank's head channels)
    return rows.transpose(0, 1).reshape(-1)


def order_qkv(model: nn.Module, k: int, inverse: bool = False) -> None:
    """Reorder every gpt block's ``c_attn`` rows for ``k`` ranks (``inverse``: back), in place."""
    for block in _gpt_blocks(model):
        attn = block.attn
        if attn.n_head % k:
            raise ValueError(f"tensor parallelism: {attn.n_head} heads do not split over {k} ranks; "
                             "use a head count divisible by k")
        order = qkv_order(attn.c_attn.in_features, k)
        if inverse:
            order = torch.argsort(order)
        with torch.no_grad():
            attn.c_attn.weight.copy_(attn.c_attn.weight[order])
            attn.c_attn.bias.copy_(attn.c_attn.bias[order])


def _gpt_blocks(model: nn.Module) -> list[nn.Module]:
    return list(getattr(model, "h", []))


def _local_attention(self: nn.Module, x: Tensor) -> Tensor:
    """``CausalSelfAttention.forward`` on this rank's heads: c_attn's local output is (q|k|v) of them."""
    B, T, _ = x.shape
    qkv = self.c_attn(x)
    local = qkv.shape[-1] // 3
    q, k, v = (t.view(B, T, self.local_heads, local // self.local_heads).transpose(1, 2)
               for t in qkv.split(local, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, local)))


def local_heads(model: nn.Module, k: int) -> None:
    """Make every gpt attention compute on n_head/k heads of its local q/k/v shard."""
    for block in _gpt_blocks(model):
        block.attn.local_heads = block.attn.n_head // k
        block.attn.forward = types.MethodType(_local_attention, block.attn)


def tp_plan(model: nn.Module) -> dict[str, Any]:
    """``parallelize_module`` plan: colwise in, rowwise out (MLP: fc1/fc2; gpt: attention and MLP)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if _gpt_blocks(model):
        plan: dict[str, Any] = {}
        for i in range(len(model.h)):
            plan.update({f"h.{i}.attn.c_attn": ColwiseParallel(), f"h.{i}.attn.c_proj": RowwiseParallel(),
                         f"h.{i}.mlp.c_fc": ColwiseParallel(), f"h.{i}.mlp.c_proj": RowwiseParallel()})
        return plan
    return {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}


def parallelize(model: nn.Module, mesh: Any, k: int) -> nn.Module:
    """Shard ``model`` (built as sazd builds it) over ``mesh`` of ``k`` ranks, in place."""
    from torch.distributed.tensor.parallel import parallelize_module

    order_qkv(model, k)
    local_heads(model, k)
    return parallelize_module(model, mesh, tp_plan(model))


def plain_state(model: nn.Module, k: int) -> dict[str, Tensor]:
    """The full parameters (a collective: every rank calls it) in the plain model's layout."""
    from torch.distributed.tensor import DTensor

    full = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}
    for name in [n for n in full if n.endswith("attn.c_attn.weight") or n.endswith("attn.c_attn.bias")]:
        channels = full[name].shape[0] // 3
        full[name] = full[name][torch.argsort(qkv_order(channels, k))]
    return full


def local_copy(spec: dict[str, Any], model: nn.Module, k: int) -> nn.Module:
    """A plain module computing what this rank computes, with no collectives: every sharded
    parameter replaced by this rank's local shard (for measuring the rank's own compute)."""
    from torch.distributed.tensor import DTensor

    copy = build(spec)
    local_heads(copy, k)
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            owner_name, _, attr = name.rpartition(".")
            setattr(copy.get_submodule(owner_name), attr, nn.Parameter(p.to_local().detach().clone()))
    return copy


@torch.no_grad()
def evaluate(model: nn.Module, task: Any, x: Tensor, y: Tensor, chunk: int = 2048) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` on a held-out set, as ``Trainer.evaluate`` computes them."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, x.shape[0], chunk):
        logits = model(x[i:i + chunk])
        loss_sum += float(task.loss(logits, y[i:i + chunk], reduction="sum"))
        correct += int(task.correct(logits, y[i:i + chunk]))
    model.train()
    n = max(y.numel(), 1)
    return loss_sum / n, correct / n


def measure_compute(module: nn.Module, task: Any, xb: Tensor, yb: Tensor, repeats: int = 5) -> float:
    """Median seconds of one forward + backward of ``module`` on a batch (the first call unmeasured)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        task.loss(module(xb), yb).backward()
        if i:
            times.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
    return statistics.median(times)


# ------------------------------------------------------------------ data
def data(spec: dict[str, Any]) -> Any:
    if spec["dataset"] == "synthetic":
        bundle = synthetic_data(spec["train_limit"], spec["seed"])
        bundle.train_x = bundle.train_x.to(getattr(torch, spec["dtype"]))
        return bundle
    return load_dataset(spec["dataset"], train_limit=spec["train_limit"],
                        test_limit=spec.get("eval_limit", 64), seed=spec["seed"],
                        dtype=getattr(torch, spec["dtype"]))


def spec_batches(spec: dict[str, Any], bundle: Any) -> list[tuple[Tensor, Tensor]]:
    """The spec's ``steps`` batches, in sazd's order (epochs follow one another)."""
    out: list[tuple[Tensor, Tensor]] = []
    per_epoch = num_batches(bundle.n_train, spec["batch_size"], True)
    epoch = 0
    while len(out) < spec["steps"]:
        out.extend(batches(bundle.train_x, bundle.train_y, spec["batch_size"], spec["seed"], epoch))
        epoch += 1
        if per_epoch == 0:
            raise ValueError(f"batch size {spec['batch_size']} exceeds the {bundle.n_train} training samples")
    return out[:spec["steps"]]


# ------------------------------------------------------------------ one rank
def run(spec: dict[str, Any], rank: int, world: int, out: Path) -> dict[str, Any]:
    """Train on this rank; returns (and writes) its record."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh


    torch.set_num_threads(spec.get("threads", 1))
    device = "cuda" if spec.get("device") == "cuda" else "cpu"
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=spec.get("collective_timeout_s", 60)))
    try:
        mesh = init_device_mesh(device, (world,))
        target = None if spec.get("target") is None else Target(**spec["target"])
        task = task_of(build(spec))

        def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
            model = parallelize(build(spec).to(device), mesh, world)
            return model, torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"])

        model, optimizer = fresh()
        bundle = data(spec)
        steps = spec_batches(spec, bundle)
        held_out = (bundle.test_x.to(device), bundle.test_y.to(device))
        xb0, yb0 = (t.to(device) for t in steps[0])
        compute_s = measure_compute(local_copy(spec, model, world).to(device), task, xb0, yb0)
        record: dict[str, Any] = {"rank": rank, "world": world, "backend": backend, "compute_s": compute_s,
                                  "pid": os.getpid(), "phases": []}
        for xb, yb in steps[:spec.get("prewarm", 0)]:  # the first collectives' set-up, on a model thrown away
            optimizer.zero_grad(set_to_none=True)
            task.loss(model(xb.to(device)), yb.to(device)).backward()
            optimizer.step()
        for straggler in (from_dict(d) for d in spec["phases"]):
            latency = straggler.latency().bind(world)
            if target is not None:  # time to the target: every phase from the seed's initial weights
                model, optimizer = fresh()
            schedule = Schedule(target, spec.get("min_steps", len(steps)))
            phase: dict[str, Any] = {"straggler": straggler.to_dict(), "iteration_s": [], "loss": [],
                                     "slept_s": [], "cpu_s": [], "process_cpu_s": [], "slowed_steps": [],
                                     "died_at": None, "neighbour": None,
                                     "error": None, "evals": schedule.evals, "complete": False}
            record["phases"].append(phase)
            dist.barrier()
            with straggler.around({rank: os.getpid()}) as neighbour, _recorded(out, rank, record, phase):
                phase["neighbour"] = None if neighbour is None else neighbour.method
                last = time.perf_counter()
                for step, (xb, yb) in enumerate(steps):
                    if latency.fails(rank, step):
                        phase["died_at"] = step
                        _write(out, rank, record)
                        os._exit(DIED_EXIT)  # a crash: no goodbye to the other ranks
                    cpu, process_cpu = time.thread_time(), time.process_time()
                    xb, yb = xb.to(device), yb.to(device)
                    optimizer.zero_grad(set_to_none=True)
                    loss = task.loss(model(xb), yb)
                    loss.backward()
                    factor = latency.slowdown(rank, step)
                    phase["slept_s"].append(straggle(factor, compute_s))
                    if factor > 1:
                        phase["slowed_steps"].append(step)
                    optimizer.step()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    phase["cpu_s"].append(time.thread_time() - cpu)  # the sleep above takes none
                    phase["process_cpu_s"].append(time.process_time() - process_cpu)
                    phase["iteration_s"].append(now - last)
                    phase["loss"].append(float(loss.detach()))
                    last = now
                    if schedule.evaluates(step + 1):
                        schedule.record(step + 1, *_agreed(evaluate(model, task, *held_out), device))
                        dist.barrier()  # every rank done evaluating before the next step's clock starts
                        last = time.perf_counter()
                    if schedule.done(step + 1):
                        break
                phase["complete"] = True
            _write(out, rank, record)
        if spec.get("save_params"):
            state = plain_state(model, world)
            if rank == 0:
                from safetensors.torch import save_file

                save_file({k: v.contiguous().cpu() for k, v in state.items()},
                          str(out / "params.safetensors"))
        dist.barrier()
        _write(out, rank, record)
        return record
    finally:
        dist.destroy_process_group()


def _agreed(metrics: tuple[float, float], device: str) -> tuple[float, float]:
    """Rank 0's (loss, accuracy) on every rank, so that all ranks stop at the same step."""
    import torch.distributed as dist

    values = torch.tensor(metrics, dtype=torch.float64, device=device)
    dist.broadcast(values, 0)
    return float(values[0]), float(values[1])


@contextlib.contextmanager
def _recorded(out: Path, rank: int, record: dict[str, Any], phase: dict[str, Any]) -> Iterator[None]:
    """Write the record also when a collective fails (a peer died): the error, in one line, in the phase."""
    try:
        yield
    except Exception as err:
        phase["error"] = " ".join(f"{type(err).__name__}: {err}".split())[:500]
        _write(out, rank, record)
        raise


def _write(out: Path, rank: int, record: dict[str, Any]) -> None:
    path = out / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m sazd.bench.tp.rank SPEC.json (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in "
              "the environment)", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    run(spec, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), spec_path.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
