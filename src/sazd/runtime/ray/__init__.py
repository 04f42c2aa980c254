"""The Ray backend: each worker is a Ray actor wrapping ``Worker``; calls travel over direct connections.

- ``RayCluster(n)`` starts a local Ray on loopback by itself (usage statistics off, no dashboard;
  its workers at the master's nice level, not Ray's default 15);
  ``address=...`` joins an existing cluster (a cluster that does not answer within ``connect_timeout_s``
  is a ``ClusterError``); an already initialised Ray is reused. ``close()`` kills the actors and shuts
  Ray down only if this object started it; every step is bounded, and processes of ours that outlive
  it are killed by PID.
- Placement (``sazd.runtime.placement``): the actors live in one placement group, spread over nodes
  by default (``placement="pack"`` packs them); ``workers_info()`` says where each one runs. While
  the cluster is open, the master's torch threads are lowered to the cores its workers on the same
  machine leave (``master_threads``; given back at ``close``): a master that computes on the cores
  its own workers need slows both.
- Ray starts, places, watches and kills the actors. The calls of training and their answers travel
  over one sealed TCP connection per worker (``sazd.runtime.channel``: HMAC on every message, TLS
  1.3 with ``tls=True``; the master writes each call on its own thread and one selector thread
  reads every answer), not through Ray's task path and object store, whose per-call cost
  dominated small rounds. A local Ray we start has a reaper process: a killed or interrupted driver
  leaves none of its processes nor its session directory. ``submit`` copies its tensor
  arguments once (a broadcast once for every worker), so the master may change them afterwards.
- ``first_k`` takes answers in arrival order: a broken connection (the actor died, was killed or lost
  its node) answers every unanswered call of that worker as an erasure, and another answer is
  awaited. Late answers are read by the master's data-plane thread and dropped at the next round
  (their status checked); queued calls are never cancelled. An argument that cannot be sent is a
  TypeError at ``submit``, before any worker is asked.
- Every wait is bounded. A worker with unfinished calls that has not finished any call for
  ``worker_timeout_s`` is silent: it is killed (an erasure; the master respawns and repairs it). Every
  2 s while the master works or waits, the control plane is checked: its loss (the head's GCS, our
  raylet) is a ``ClusterError``, and a worker on a node Ray declared dead is killed (an erasure).
- Every call is answered with a status and a value. Fire-and-forget calls (loads, updates) and late
  answers are never used, but their status is checked at the next round: an exception
  raised in any worker call is recorded (``counters.worker_errors``, naming worker and method) and
  makes that worker an erasure; a round in which every asked worker raised re-raises the worker's
  exception (rebuilt from its type name and message, with the worker and method in a note).
- Calls to one actor run in submission order, so a slow actor applies every update in order. The
  cluster tracks each actor's unfinished calls: ``ready_workers`` avoids actors still working on
  calls sent before the last gather (``choose_ready``: one merely late, a single call of the latest
  round, is asked too where only k are idle, so a stall within the round is never waited for), and
  an actor with more than ``max_backlog`` unfinished calls is killed (its queue would only grow) so
  that the master can respawn and repair it.
- Stragglers are real: the latency model's factor for each task is sent with the call and the actor
  sleeps ``(factor - 1)`` times its compute time (``Worker._timed``: products and updates; loads
  and state fetches are not slowed, unlike the in-process simulation which slows every call);
  ``set_delay`` on an actor multiplies in. A ``DeadWorkers`` model really kills the actor when its task comes.
- Actors have ``max_restarts=0``: a restarted actor would hold no blocks while the master believed
  it repaired; the master respawns and repairs instead.

Modules: ``bootstrap`` (start or join Ray, bounded; the wrapped private Ray API), ``processes`` (our
processes by PID), ``actor`` (the worker process), ``rounds`` (the round engine), ``liveness``
(silent, backlogged and lost workers; Ray's control plane), ``cluster`` (``RayCluster``).

Counters follow the in-process conventions (see ``sazd.runtime.inproc``): a broadcast argument's
bytes count once per worker called; only collected answers count as bytes from workers. ``sim_time_s``
stays 0: time is real here.
"""

from sazd.runtime.ray.bootstrap import join_ray, start_local_ray
from sazd.runtime.ray.cluster import RayCluster
from sazd.runtime.ray.processes import process_tree, wait_until

__all__ = ["RayCluster", "join_ray", "process_tree", "start_local_ray", "wait_until"]
