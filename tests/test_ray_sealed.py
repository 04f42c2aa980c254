"""The sealed data plane inside a real Ray cluster: an on-path relay process between the master and
one worker tampers with a call after the handshake. The connection breaks, nothing the relay sent
runs, the worker is an erasure, the round is answered by the others, and the respawned worker is
repaired; with TLS no tensor byte crosses the relay in clear."""

from __future__ import annotations

import contextlib

import pytest
import torch

from relay import relay
from sazd.runtime.ray import RayCluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

N, K = 3, 2


@pytest.mark.parametrize("tls", [False, True], ids=["hmac", "tls"])
def test_tampering_with_a_worker_s_calls_makes_it_an_erasure_that_is_repaired(ray_session, tls, tmp_path,
                                                                                monkeypatch):
    import sazd.runtime.ray.cluster as ray_cluster

    touched = tmp_path / "touched"
    relays: list = []
    real_open = ray_cluster.open_channels

    with contextlib.ExitStack() as stack:
        def through_relay(addresses, keys, notify, identity=None, answers=None):
            if 0 in addresses and not relays:  # the first start of worker 0 only, not its replacement
                path = stack.enter_context(relay(addresses[0], "tls" if tls else "sazd", "inject",
                                                 str(tmp_path / "seen"), str(touched)))
                relays.append(path)
                addresses = {**addresses, 0: path.address}
            return real_open(addresses, keys, notify, identity, answers)

        monkeypatch.setattr(ray_cluster, "open_channels", through_relay)
        cluster = stack.enter_context(RayCluster(N, worker_timeout_s=60, tls=tls))
        assert cluster.describe()["data_plane"] == ("tls" if tls else "hmac")
        gen = torch.Generator().manual_seed(0)
        blocks = [torch.randn(32, 16, generator=gen) for _ in range(N)]
        assert sorted(cluster.wait_all(cluster.submit("load", [({"w": b},) for b in blocks]))) == [0, 1, 2]
        x = torch.randn(16, 8, generator=gen)
        got = cluster.wait_all(cluster.submit("matmul", ("w", x)))
        assert sorted(got) == [0, 1, 2]  # through the relay, untouched

        relays[0].arm()
        got = cluster.first_k(cluster.submit("matmul", ("w", x)), K)
        assert sorted(got) == [1, 2]
        for j, y in got.items():
            torch.testing.assert_close(y, blocks[j] @ x)
        # the broken connection fails worker 0's call: an erasure (noticed by the cluster's next look)
        assert wait_until(lambda: cluster.ready_workers(K) and cluster.alive() == [1, 2], timeout_s=60)
        assert cluster.counters.failed_results >= 1

        cluster.respawn(0)  # repaired: a fresh process gets its block again
        assert cluster.wait_all(cluster.submit("load", [({"w": b},) for b in blocks], [0])) == {0: 0}
        got = cluster.wait_all(cluster.submit("matmul", ("w", x)))
        assert sorted(got) == [0, 1, 2]
        for j, y in got.items():
            torch.testing.assert_close(y, blocks[j] @ x)
        seen = relays[0].seen()
    assert not touched.exists()
    needle = blocks[0].numpy().tobytes()[:64]
    assert (needle in seen) is not tls  # the block crossed the relay: in clear only without TLS
