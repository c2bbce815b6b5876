"""The main job until the training script lands: every loss against PML on random data.

    python -m metrix_ops.demo [--batch 512] [--dim 128] [--classes 32] [--backend auto]

Prints, per loss, the relative difference of value and gradient to PML (float64) and
the forward+backward time of both (float32), then the Metrix and EE variants' values.
"""
from __future__ import annotations

import argparse
import inspect
import time

import torch

import metrix_ops as mo
from metrix_ops.losses.base import BaseMetricLoss


def _build(name, dim, classes, backend, pml_module):
    ours_cls = getattr(mo.losses, name)
    kw = {}
    if "num_classes" in inspect.signature(ours_cls.__init__).parameters:
        kw = {"num_classes": classes, "embedding_size": dim}
    ours = ours_cls(backend=backend, **kw)
    pml = getattr(pml_module, name)(**kw) if hasattr(pml_module, name) else None
    if pml is not None and hasattr(ours, "proxies"):
        with torch.no_grad():
            ours.proxies.copy_(pml.proxies)
    return ours, pml


def _value_grad(fn, x, y, params):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, y)
    grads = torch.autograd.grad(loss, [x] + params, allow_unused=True)
    return loss.detach(), torch.cat([g.flatten() for g in grads if g is not None])


def _time(fn, x, y, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        xx = x.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        fn(xx, y).backward()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--classes", type=int, default=32)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        from pytorch_metric_learning import losses as pml_losses
    except ImportError:  # the demo still shows our numbers without the oracle
        pml_losses = None

    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, args.dim, dtype=torch.float64)
    y = torch.randint(0, args.classes, (args.batch,))
    names = sorted(n for n, c in vars(mo.losses).items() if inspect.isclass(c)
                   and issubclass(c, BaseMetricLoss) and c.loss_name)
    print(f"B={args.batch} D={args.dim} classes={args.classes} backend={args.backend} "
          f"torch={torch.__version__}")
    print(f"{'loss':34s} {'value':>12s} {'rel.err value':>14s} {'rel.err grad':>13s} "
          f"{'ours fp32 s':>12s} {'PML fp32 s':>11s}")
    for name in names:
        ours, pml = _build(name, args.dim, args.classes, args.backend, pml_losses)
        params = [p for p in ours.parameters()]
        v, g = _value_grad(ours, x, y, params)
        t_ours = _time(ours.float(), x.float(), y)
        ours.double()
        if pml is not None:
            pml.double()
            pv, pg = _value_grad(pml, x, y, list(pml.parameters()))
            ev = float((v - pv).abs() / pv.abs().clamp_min(1e-12))
            eg = float((g - pg).norm() / pg.norm().clamp_min(1e-12))
            t_pml = _time(pml.float(), x.float(), y)
            print(f"{name:34s} {float(v):12.6f} {ev:14.2e} {eg:13.2e} {t_ours:12.4f} {t_pml:11.4f}")
        else:
            print(f"{name:34s} {float(v):12.6f} {'(no PML twin)':>14s} {'':>13s} {t_ours:12.4f}")
    _augmented(x.float(), y, args)


def _augmented(x, y, args):
    print("\nAugmentations (float32, fixed λ=0.3):")
    cases = [
        ("ContrastiveLoss + Metrix(pos_neg)", lambda: mo.losses.ContrastiveLoss(
            neg_margin=0.5, backend=args.backend, metrix=mo.Metrix())),
        ("MultiSimilarityLoss + Metrix(pos_neg)", lambda: mo.losses.MultiSimilarityLoss(
            backend=args.backend, metrix=mo.Metrix())),
        ("MultiSimilarityLoss + EE(n=2)", lambda: mo.losses.MultiSimilarityLoss(
            backend=args.backend, expansion=mo.Expansion(n_points=2))),
        ("HPHNTripletLoss + EE(n=2)", lambda: mo.losses.HPHNTripletLoss(
            backend=args.backend, expansion=mo.Expansion(n_points=2))),
    ]
    for label, make in cases:
        try:
            loss_fn = make()
        except AttributeError as e:  # a loss not in this build
            print(f"  {label:40s} unavailable ({e})")
            continue
        t = _time(lambda a, b: loss_fn(a, b, lam=0.3) if loss_fn.metrix else loss_fn(a, b), x, y)
        value = loss_fn(x, y, lam=0.3) if loss_fn.metrix else loss_fn(x, y)
        print(f"  {label:40s} value {float(value):10.6f}   fwd+bwd {t:.4f} s")


if __name__ == "__main__":
    main()
