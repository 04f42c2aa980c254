"""The Ray actor: a ``Worker`` that answers the master's calls on its own sealed connection."""

from __future__ import annotations

import gc
import os
from typing import Any

import ray
import torch

from sazd.runtime import channel
from sazd.runtime.arena import ANSWER_ARENA_BYTES, ArenaError, MappedArena, open_arena
from sazd.runtime.placement import usable_cores
from sazd.runtime.ray.processes import boot_id
from sazd.runtime.tls import Identity
from sazd.runtime.worker import METHODS, Worker


class RayWorker(Worker):
    """The actor: a ``Worker`` answering calls on its channel (``Worker.call``, each with the task's
    slowdown factor)."""

    def __init__(self, index: int, device: str = "cpu", torch_threads: int | None = None,
                 compute_dtype: str | None = None) -> None:
        super().__init__(index, device, compute_dtype)
        if torch_threads:
            torch.set_num_threads(torch_threads)

    def open_channel(self, key: bytes, identity: Identity | None,
                     arena: dict | None = None) -> dict[str, Any]:
        """Listen for the master's connection (proving ``key``; TLS with ``identity`` if given); map
        the master's shared-memory ``arena`` if this actor runs on its machine, and then open one of
        its own for its answers; say where this actor runs (node, device, its process, for killing
        it by PID), whether it maps the arena (and why not), its own arena's description and the
        address to connect to.

        This ends the actor's start-up: what it built so far (Ray, torch, its modules) lives as long
        as the process, so it is frozen out of the garbage collector's passes, which then walk only
        what calls allocate (full passes over Ray's objects took 3-5 % of a worker's CPU)."""
        context = ray.get_runtime_context()
        node_ip = ray.util.get_node_ip_address()
        mapped, refused, answers = None, "not offered", None
        if arena is not None:
            try:
                mapped, refused = MappedArena(arena), None
            except ArenaError as err:
                refused = str(err)
            else:
                answers = open_arena(ANSWER_ARENA_BYTES)
        return {"index": self.index, "node_id": context.get_node_id(), "node_ip": node_ip,
                "device": str(self.device), "pid": os.getpid(), "boot_id": boot_id(),
                "threads": torch.get_num_threads(), "cores": usable_cores(),
                "shared_memory": mapped is not None, "shared_memory_refused": refused,
                "answer_arena": None if answers is None else answers.spec(),
                "address": channel.serve(node_ip, key, self.call, METHODS, identity, mapped, answers),
                "frozen_objects": _freeze_start_up()}


def _freeze_start_up() -> int:
    """Move every object alive now out of the garbage collector's sight; returns how many are."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


ACTOR = ray.remote(RayWorker)
