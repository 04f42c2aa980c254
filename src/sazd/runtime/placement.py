"""Where Ray puts the n worker actors: one placement group of n bundles, spread over nodes or packed.

``spread`` (the default) asks Ray for a placement group with the ``SPREAD`` strategy: each bundle
(one worker's CPUs and GPUs) goes to a different node while there are nodes left, then nodes are
shared. ``pack`` (``PACK``) fills as few nodes as possible. Worker j lives in bundle j; a respawned
worker goes back into its bundle, which Ray moves to a surviving node when its node is lost.

Reserving the group is bounded by a timeout: a cluster without the resources raises
``ClusterError`` instead of waiting for ever.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator, Sequence

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sazd.runtime.cluster import ClusterError

PLACEMENTS = {"spread": "SPREAD", "pack": "PACK"}


def check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    return placement


def reserve(n: int, bundle: dict[str, float], placement: str, timeout_s: float) -> PlacementGroup:
    """A ready placement group of ``n`` copies of ``bundle``; ClusterError if Ray cannot place it in time."""
    group = placement_group([dict(bundle) for _ in range(n)], strategy=PLACEMENTS[check_placement(placement)])
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ClusterError(
            f"placement: Ray could not reserve {n} bundles of {bundle} within {timeout_s:g} s; the cluster "
            f"has {ray.available_resources()} free; use fewer resources per worker or a bigger cluster"
        )
    return group


def strategy(group: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    """Worker ``index``'s place: bundle ``index`` of ``group``."""
    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)


def release(group: PlacementGroup | None) -> None:
    if group is not None:
        remove_placement_group(group)


def alive_nodes() -> dict[str, str]:
    """node id -> IP address of every alive node."""
    return {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}


def sharing(node_ids: Sequence[str], nodes_alive: int, placement: str) -> str | None:
    """A warning when ``spread`` placed workers on shared nodes of a multi-node cluster, else None."""
    per_node = Counter(node_ids)
    shared = sum(count for count in per_node.values() if count > 1)
    if placement != "spread" or nodes_alive <= 1 or not shared:
        return None
    return (f"placement spread: {len(node_ids)} workers on {len(per_node)} of {nodes_alive} alive nodes; "
            f"{shared} workers share a node (the cluster has fewer free nodes than workers)")


def usable_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


SPARE_NICE = 19  # the lowest CPU priority: a spare worker runs only on cycles nobody else wants


def spare_nice(cores: int, processes: int, spares: int) -> int | None:
    """The CPU niceness of the spare workers (those whose answers are needed only when others are
    late) on a machine with ``cores`` cores running ``processes`` of the cluster's processes (workers
    and, there, the master), ``spares`` of them spares; None where each process has a core of its
    own, as on a real cluster. On shared cores every round's redundant products would otherwise be
    computed at the expense of the k that are needed: on 2 cores with six workers, two of them spare,
    a W=1024 DEU iteration was 15-25 % shorter at the lowest priority, and no slower with a straggler,
    the spares being left out of the rounds they are busy for. With fewer spares than cores they keep
    their priority: a spare a slow worker makes necessary would start only once the others finished
    and then leave cores idle (SAZD(5,4) on 2 cores, its one spare lowered, crossed TP in a sweep at
    a 6.45x straggler; at equal priority, the day before, at 3.83x)."""
    return SPARE_NICE if processes > cores and spares >= cores else None


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """This process's torch intra-op threads set to ``threads`` for a while, then given back."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def master_threads(cores: int, worker_threads_here: int, current: int) -> int:
    """The master's intra-op threads beside workers on its own machine: the cores they leave, at least
    one, never more than it has now. More threads than cores make every thread wait for the others:
    on 2 cores with 6 workers, a 2-thread master slows a W=1024 iteration by about a third."""
    return max(1, min(current, cores - worker_threads_here))
