"""Your own model, data, optimizer and loop on a coded cluster; a worker dies mid-run and is repaired.

    python examples/custom_loop.py

The model is an ordinary nn.Module; ``sazd.parallelize`` codes its wide layers over 6 workers (any 4
answers suffice), ``sazd.coded_optimizer`` lets torch.optim.SGD step the coded weights, and
``sazd.Maintainer.step()`` after each step respawns and repairs dead workers. At the end the weights
are compared with the same training in plain PyTorch.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import sazd
from sazd.codes import SAZD
from sazd.runtime.inproc import InProcessCluster


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10)).double()


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def main(steps: int = 40, kill_at: int = 5, victim: int = 3) -> dict:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0)
    y = torch.tensor(digits.target)
    starts = [64 * i % (len(x) - 64) for i in range(steps)]
    batches = [(x[i:i + 64], y[i:i + 64]) for i in starts]

    plain = make_model()
    model = copy.deepcopy(plain)
    cluster = InProcessCluster(6)
    sazd.parallelize(model, SAZD(n=6, k=4), cluster, scheme="deu")  # the two 128-wide layers
    optimizer = sazd.coded_optimizer(make_optimizer(model))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    keeper = sazd.Maintainer(model)

    losses = []
    for step, (xb, yb) in enumerate(batches):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step == kill_at:
            cluster.kill(victim)  # the worker dies; the next rounds use the others
        for info in keeper.step():  # respawn and repair dead workers; raise if fewer than k live
            print(f"step {step}: repaired worker {info['worker']} ({', '.join(info['layers'])})")
        losses.append(float(loss.detach()))

    reference_opt = make_optimizer(plain)  # the same training in plain PyTorch
    reference_sched = torch.optim.lr_scheduler.StepLR(reference_opt, step_size=10, gamma=0.5)
    for xb, yb in batches:
        reference_opt.zero_grad()
        F.cross_entropy(plain(xb), yb).backward()
        reference_opt.step()
        reference_sched.step()
    coded, ref = model.state_dict(), plain.state_dict()
    error = max(float((coded[k] - ref[k]).norm() / ref[k].norm()) for k in ref)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; weights vs plain PyTorch: {error:.1e} relative")
    return {"repairs": [r["worker"] for r in keeper.repairs], "first_loss": losses[0],
            "final_loss": losses[-1], "max_weight_error": error}


if __name__ == "__main__":
    main()
