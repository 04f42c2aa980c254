"""The Ray backend's old import path (the code lives in ``sazd.runtime.ray``)."""

from sazd.runtime.ray import RayCluster, join_ray, process_tree, start_local_ray, wait_until

__all__ = ["RayCluster", "join_ray", "process_tree", "start_local_ray", "wait_until"]
