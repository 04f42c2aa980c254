"""The checks and figures of scripts/gpu-check.sh (see there). Exit status: 0 all checks passed, 1 a
check failed, 2 no CUDA device."""

from __future__ import annotations

import sys
import time

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to PyTorch (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}); run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch",
              file=sys.stderr)
        return 2
    from sazd.runtime import SGDStep, Worker

    print(f"device: {torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s), "
          f"torch {torch.__version__}")
    failures = 0

    def check(name: str, error: float, tol: float) -> None:
        nonlocal failures
        ok = error <= tol
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: relative error {error:.2e} (tolerance {tol:.0e})")

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double().cpu(), b.double().cpu()
        return float((a - b).norm() / b.norm().clamp_min(1e-300))

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 1024, generator=gen)
    x = torch.randn(1024, 128, generator=gen)
    exact = w.double() @ x.double()
    for dtype, tol in ((None, 1e-5), ("bfloat16", 2e-2), ("float16", 2e-3)):
        worker = Worker(0, "cuda", dtype)
        worker.load({"w": w})
        out = worker.matmul("w", x)
        check(f"worker product on cuda ({dtype or 'float32'})", rel(out, exact), tol)
        assert out.dtype == torch.float32

    step = SGDStep(lr=0.1, momentum=0.9, weight_decay=1e-3)
    cpu, gpu = Worker(0, "cpu"), Worker(1, "cuda")
    for wk in (cpu, gpu):
        wk.load({"w": w.double()})
    for _ in range(3):
        left = torch.randn(1024, 128, generator=gen, dtype=torch.float64)
        right = torch.randn(1024, 128, generator=gen, dtype=torch.float64)
        for wk in (cpu, gpu):
            wk.sgd([("w", step, left, right)])
    updated = {wk.device.type: wk.state()["weights"]["w"] for wk in (cpu, gpu)}
    check("DEU updates on cuda vs cpu (float64)", rel(updated["cuda"], updated["cpu"]), 1e-12)

    from sazd.data import load_dataset
    from sazd.parallel import plain_state_dict
    from sazd.train.optim import OptimConfig
    from sazd.train.reference import reference_run, relative_weight_error
    from sazd.train.trainer import TrainConfig, Trainer

    data = load_dataset("digits", dtype=torch.float64)
    cfg = TrainConfig(model="mlp", dataset="digits", hidden=(64, 64), min_features=16, backend="inproc",
                      device="cuda", dtype="float64", max_steps=10, optim=OptimConfig(lr=0.1, momentum=0.9),
                      show_progress=False)
    with Trainer(cfg, data=data) as trainer:
        trainer.train()
        err = relative_weight_error(plain_state_dict(trainer.model), reference_run(cfg, trainer.data, 10))
    check("in-process training with cuda workers vs plain PyTorch (float64)", err, 1e-9)

    try:
        import ray  # noqa: F401
    except ImportError:
        print("SKIP Ray --gpus-per-worker run: Ray is not installed")
    else:
        failures += ray_run(data)

    print("figures (median of 20, after 3 warm-up calls; one GPU):")
    for n in (4096, 8192):
        a = torch.randn(n, n, device="cuda")
        b = torch.randn(n, 512, device="cuda")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            aa, bb = a.to(dtype), b.to(dtype)
            print(f"  block product {n}x{n} @ {n}x512 {str(dtype).removeprefix('torch.')}: "
                  f"{1000 * timed(lambda aa=aa, bb=bb: aa @ bb):.3f} ms")
    for device in ("cuda", "cpu"):
        print(f"  in-process DEU iteration, MLP 784-4096-4096-10, SAZD(6,4), workers on {device}: "
              f"{1000 * deu_iteration(device):.1f} ms (wall, all six workers in this process)")
    print("gpu-check: all checks passed" if not failures else f"gpu-check: {failures} check(s) FAILED")
    return 1 if failures else 0


def ray_run(data) -> int:
    import ray  # noqa: F401

    from sazd.train.optim import OptimConfig
    from sazd.train.trainer import TrainConfig, Trainer

    gpus = torch.cuda.device_count()
    per_worker = min(1.0, gpus / 6)
    cfg = TrainConfig(model="mlp", dataset="digits", hidden=(64, 64), min_features=16, backend="ray",
                      gpus_per_worker=per_worker, dtype="float64", max_steps=5,
                      optim=OptimConfig(lr=0.1, momentum=0.9), show_progress=False)
    with Trainer(cfg, data=data) as trainer:
        report = trainer.train()
    devices = [w["device"] for w in report["workers"]]
    ok = report["iterations"] == 5 and all(d.startswith("cuda") for d in devices)
    print(f"{'PASS' if ok else 'FAIL'} Ray run with --gpus-per-worker {per_worker:g}: workers on {devices}, "
          f"test accuracy {report['test_accuracy']:.3f}")
    return 0 if ok else 1


def timed(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def deu_iteration(device: str) -> float:
    import itertools

    from sazd.data import batches
    from sazd.measure.training import synthetic_data
    from sazd.train.optim import OptimConfig
    from sazd.train.trainer import TrainConfig, Trainer

    data = synthetic_data(128 * 6)
    cfg = TrainConfig(model="mlp", dataset="synthetic", hidden=(4096, 4096), backend="inproc", device=device,
                      optim=OptimConfig(lr=0.01, momentum=0.9), show_progress=False)
    with Trainer(cfg, data=data) as trainer:
        for xb, yb in itertools.islice(batches(data.train_x, data.train_y, 128, 0, 0), 6):
            trainer.step(xb, yb)
        return sorted(r["wall_s"] for r in trainer.history[2:])[2]


if __name__ == "__main__":
    raise SystemExit(main())
