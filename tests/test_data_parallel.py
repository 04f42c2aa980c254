"""A coded model inside torch's DistributedDataParallel, two real ranks over gloo, each rank's coded
layers on its own in-process cluster: DDP averages ``.grad`` across the ranks in its backward hooks,
so DEU hands autograd the weight gradient itself inside a DDP forward (its kept factors would escape
the averaging). Oracle: plain DDP with the same ranks, data and seeds, float64."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

RANK_SCRIPT = r'''
import copy, json, os, sys, warnings
import torch, torch.distributed as dist
from torch import nn
import sazd
from sazd.codes import get_code
from sazd.runtime.inproc import InProcessCluster
warnings.simplefilter("ignore")
rank, port, scheme, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
torch.manual_seed(0)
plain = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 4)).double()
coded = sazd.parallelize(copy.deepcopy(plain), get_code("sazd", n=6, k=4), InProcessCluster(6),
                         scheme=scheme, min_features=4)
g = torch.Generator().manual_seed(100 + rank)  # each rank its own batches: the averaging matters
f64 = torch.float64
data = [(torch.randn(8, 16, generator=g, dtype=f64), torch.randn(8, 4, generator=g, dtype=f64))
        for _ in range(3)]
weights = {}
for name, model in (("plain", plain), ("coded", coded)):
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    optimizer = sazd.coded_optimizer(optimizer) if name == "coded" else optimizer
    for x, y in data:
        optimizer.zero_grad()
        (ddp(x) - y).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        weights[name] = [p.detach().clone().tolist() for p in model.parameters()]
weights["coded_layers"] = len(sazd.parallel.coded_layers(coded))
json.dump(weights, open(out, "w"))
dist.destroy_process_group()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_ddp_over_coded_models_averages_every_gradient_as_plain_ddp(scheme: str, tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = str(free_port())
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), port, scheme, str(outs[r])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for rank in ranks:
        output, _ = rank.communicate(timeout=240)
        assert rank.returncode == 0, output[-2000:]
    results = [json.loads(out.read_text()) for out in outs]
    assert results[0]["coded_layers"] == 2
    for result in results:
        for got, want in zip(result["coded"], result["plain"], strict=True):
            gap = max(abs(a - b) for a, b in zip(_flat(got), _flat(want), strict=True))
            assert gap < 1e-12
    assert results[0]["plain"] == results[1]["plain"]  # DDP kept the replicas equal


def _flat(values: list | float) -> list[float]:
    if isinstance(values, float):
        return [values]
    return [v for item in values for v in _flat(item)]
