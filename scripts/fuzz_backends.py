"""Differential fuzzing of a fused backend against `reference`: random losses, hyper-
parameters, distances, reducers, Metrix / EE / miner options, references and index tuples,
odd shapes and label layouts (singletons, one class, pairs, duplicates, empty batches);
value and every gradient (embeddings, ref_emb, proxies) compared. Not a test (its cases are
drawn, not chosen): a tool that finds the cases tests then pin down.

    python scripts/fuzz_backends.py --seed 1 --iters 500                # fp64, rtol 1e-6
    python scripts/fuzz_backends.py --seed 1 --iters 500 --dtype float32  # rtol 1e-4
    python scripts/fuzz_backends.py --seed 1 --iters 500 --only 271     # one case, all ways

A call both backends refuse counts as agreement; one the backend does not cover (its
NotImplementedError) is counted apart. Known disagreements that are not bugs: exact ties of
an argmax (duplicate rows in EE's hard-negative pairs, D = 1) split a gradient otherwise
(the total over the tied rows agrees); the L2 distance of two duplicate rows, which
torch.cdist's product form (the reference's, PML's) gives as √ε-level noise (2.1e-8 in fp64)
where the fused ops give their own rounding of √(2 − 2s), so a mean over few positive pairs
moves by that much (seed 3111, case 152); a synthetic or mixed point at the origin (D = 1,
antipodal positives) has no direction: the reference's normalisation gives a huge gradient
there, the engines a huge one too or 0 (seed 3202, case 49: MS with EE, where for D = 1 the
gradient through x / ‖x‖ is 0 wherever it is defined); fp32 against the fp64
reference differs where PML's own rules depend on the precision (ProxyNCA's underflow mask,
seed 3806 case 155; AvgNonZero's count of terms that fp32 rounds to 0, seed 3806 case 249:
ProxyAnchor at D = 1 gives 84.22 in fp32 and 52.90 in fp64, the same on both backends at
either precision).
"""
from __future__ import annotations

import argparse
import copy
import random
import warnings

import torch

import metrix_ops as mo

LOSSES = ["ContrastiveLoss", "MultiSimilarityLoss", "TripletMarginLoss", "ProxyAnchorLoss",
          "ProxyNCALoss", "NTXentLoss", "SupConLoss", "CircleLoss", "LiftedStructureLoss",
          "GeneralizedLiftedStructureLoss", "NPairsLoss", "HPHNTripletLoss"]


def hyper(r, name):
    c = r.choice
    return {"ContrastiveLoss": lambda: {"pos_margin": c([0, 0.1]), "neg_margin": c([1, 0.5, 0.3])},
            "MultiSimilarityLoss": lambda: {"alpha": c([2, 1]), "beta": c([50, 10]),
                                            "base": c([0.5, 0.3])},
            "TripletMarginLoss": lambda: {"margin": c([0.05, 0.2, 1.0])},
            "ProxyAnchorLoss": lambda: {"margin": c([0.1, 0.3]), "alpha": c([32, 8])},
            "ProxyNCALoss": lambda: {"softmax_scale": c([1, 10, 30])},
            "NTXentLoss": lambda: {"temperature": c([0.07, 0.5])},
            "SupConLoss": lambda: {"temperature": c([0.1, 0.5])},
            "CircleLoss": lambda: {"m": c([0.4, 0.25]), "gamma": c([80, 10])},
            "LiftedStructureLoss": lambda: {"neg_margin": c([1, 0.5]), "pos_margin": c([0, 0.2])},
            "GeneralizedLiftedStructureLoss": lambda: {"neg_margin": c([1, 0.5]),
                                                       "pos_margin": c([0, 0.2])},
            "NPairsLoss": lambda: {},
            "HPHNTripletLoss": lambda: {"margin": c([0.2, 1e-5])}}[name]()


def labels_for(r, g, b):
    kind = r.choice(["rand", "rand", "arange", "one", "pairs", "few"])
    if kind == "rand":
        return torch.randint(0, r.randint(1, 6), (b,), generator=g)
    if kind == "arange":
        return torch.arange(b)
    if kind == "one":
        return torch.zeros(b, dtype=torch.long)
    if kind == "pairs":
        return (torch.arange(b) // 2) % max(1, r.randint(1, 5))
    return torch.randint(0, 2, (b,), generator=g)


DISTANCES = {"cos": lambda: mo.distances.CosineSimilarity(), "l2": lambda: mo.distances.LpDistance(),
             "l2_raw": lambda: mo.distances.LpDistance(normalize_embeddings=False),
             "l2sq": lambda: mo.distances.LpDistance(power=2),
             "l2sq_raw": lambda: mo.distances.LpDistance(normalize_embeddings=False, power=2)}
REDUCERS = {"mean": lambda: mo.reducers.MeanReducer(), "sum": lambda: mo.reducers.SumReducer(),
            "avgnz": lambda: mo.reducers.AvgNonZeroReducer(),
            "thr": lambda: mo.reducers.ThresholdReducer(low=0.05)}


def draw(r, g):
    """(loss name, x, labels, constructor kwargs, call kwargs) of one random case."""
    name = r.choice(LOSSES)
    b, d = r.choice([0, 1, 2, 3, 5, 8, 13, 17, 24, 31]), r.choice([1, 2, 3, 5, 7, 16])
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = labels_for(r, g, b)
    if b >= 4 and r.random() < 0.3:  # duplicate rows, of one label or two
        x[1], x[3] = x[0], x[2]
        if r.random() < 0.5:
            y[1] = y[0]
    kw = hyper(r, name)
    if name == "HPHNTripletLoss":
        if r.random() < 0.3:
            kw["reduction"] = "sum"
    else:
        dist, red = r.choice([None, None, *DISTANCES]), r.choice([None, None, *REDUCERS])
        if dist:
            kw["distance"] = DISTANCES[dist]()
        if red:
            kw["reducer"] = REDUCERS[red]()
    aug = r.choice(["none", "none", "metrix", "ee", "miner"])
    if aug == "metrix":
        kw["metrix"] = mo.Metrix(lam=r.choice([0.0, 0.3, 0.5, 1.0]),
                                 pairs=r.choice(["pos_neg", "anchor_neg", "pos_pos"]),
                                 weight=r.choice([0.4, 1.0]))
    elif aug == "ee":
        kw["expansion"] = mo.Expansion(n_points=r.choice([0, 1, 2, 3, 8]),
                                       pairs=r.choice(["all", "all", "adjacent"]),
                                       normalize=r.random() < 0.8)
    elif aug == "miner":
        kw["miner"] = r.choice([
            mo.miners.MultiSimilarityMiner(r.choice([0.1, 0.5])), mo.miners.BatchHardMiner(),
            mo.miners.TripletMarginMiner(0.2, type_of_triplets=r.choice(
                ["all", "hard", "semihard", "easy"]))])
    call = {}
    extra = r.choice(["none", "none", "none", "ref", "tuple"])
    if extra == "ref":
        m = r.choice([1, 4, 9, 20])
        call["ref_emb"] = torch.randn(m, d, generator=g, dtype=torch.float64)
        call["ref_labels"] = torch.randint(0, 5, (m,), generator=g)
    elif extra == "tuple" and b > 0:
        miner = r.choice([mo.miners.MultiSimilarityMiner(0.3), mo.miners.TripletMarginMiner(0.3)])
        call["indices_tuple"] = miner(x, y)
    if name.startswith("Proxy"):
        tops = [int(t.max()) + 1 for t in (y, call.get("ref_labels")) if t is not None and len(t)]
        top = max(tops, default=1)
        kw.update(num_classes=top + r.choice([0, 2]), embedding_size=d)
    return name, x, y, kw, call


def run(backend, name, kw, x, y, call, state, dtype):
    """(value, gradients, state_dict) of the loss on `backend` in `dtype`; `state`: the
    proxies to load (the reference's), so both backends see the same."""
    torch.manual_seed(0)
    loss = getattr(mo.losses, name)(backend=backend, **copy.deepcopy(kw))
    if state is not None:
        loss.load_state_dict(state)
    loss = loss.to(dtype)
    e = x.detach().to(dtype).requires_grad_()
    c = {k: (v.detach().to(dtype).requires_grad_() if k == "ref_emb" else v)
         for k, v in call.items()}
    torch.manual_seed(1)  # the Metrix λ draw
    v = loss(e, y, **c)
    leaves = [e] + ([c["ref_emb"]] if "ref_emb" in c else []) + list(loss.parameters())
    grads = (torch.autograd.grad(v, leaves, allow_unused=True) if v.requires_grad
             else [None] * len(leaves))
    return (v.detach().double(), [None if q is None else q.double() for q in grads],
            loss.state_dict())


def differences(a, b, rtol, atol):
    (va, ga), (vb, gb) = a, b
    bad = []
    if not torch.allclose(va, vb, rtol=rtol, atol=atol, equal_nan=True):
        bad.append(f"value {va.item():.10g} vs {vb.item():.10g}")
    for k, (p, q) in enumerate(zip(ga, gb)):
        p = torch.zeros_like(q) if p is None and q is not None else p
        q = torch.zeros_like(p) if q is None and p is not None else q
        if p is not None and not torch.allclose(p, q, rtol=rtol, atol=10 * atol, equal_nan=True):
            bad.append(f"gradient {k}: max error {(p - q).abs().max().item():.3g}")
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    ap.add_argument("--only", type=int, default=-1, help="replay case ONLY of this seed")
    ap.add_argument("--small-blocks", action="store_true",
                    help="Triton Metrix: the cut layout (KB = 16) whenever a class has over 8 "
                         "rows, so that drawn batches (B ≤ 31) reach the cut-class kernels "
                         "when a class has 17 rows or more (its blocks of 16)")
    args = ap.parse_args()
    if args.small_blocks:
        import metrix_ops.triton.metrix_tiles as tiles
        tiles.MAX_CLASS, tiles.SPLIT_KB = 8, 16
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    rtol, atol = (1e-6, 1e-9) if dtype == torch.float64 else (1e-4, 1e-5)
    r, g = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    stats = {"agree": 0, "both_refuse": 0, "not_covered": 0, "differ": 0}
    for it in range(args.iters):
        name, x, y, kw, call = draw(r, g)
        if 0 <= args.only != it:
            continue
        desc = (f"case {it}: {name} B={len(x)} D={x.shape[1]} labels={y.tolist()} kw={kw} "
                f"call={ {k: tuple(v.shape) if torch.is_tensor(v) else 'tuple' for k, v in call.items()} }")
        if args.only >= 0:
            print(desc)
            for be, dt in [("reference", torch.float64), (args.backend, torch.float64),
                           ("reference", torch.float32), (args.backend, torch.float32)]:
                try:
                    st = run("reference", name, kw, x, y, call, None, torch.float64)[2]
                    v, gr, _ = run(be, name, kw, x, y, call, st, dt)
                    print(be, dt, v.item(), [None if q is None else q.abs().max().item() for q in gr])
                except Exception as ex:  # noqa: BLE001 (a report, not a test)
                    print(be, dt, "raises", repr(ex)[:200])
            continue
        try:
            vr, gr, st = run("reference", name, kw, x, y, call, None, torch.float64)
        except Exception:  # noqa: BLE001
            try:
                run(args.backend, name, kw, x, y, call, None, dtype)
            except Exception:  # noqa: BLE001
                stats["both_refuse"] += 1
            else:
                stats["differ"] += 1
                print("reference refuses, the backend does not:", desc, flush=True)
            continue
        try:
            vb, gb, _ = run(args.backend, name, kw, x, y, call, st, dtype)
        except NotImplementedError:
            stats["not_covered"] += 1
            continue
        except Exception as ex:  # noqa: BLE001
            stats["differ"] += 1
            print("the backend raises:", desc, repr(ex)[:300], flush=True)
            continue
        bad = differences((vb, gb), (vr, gr), rtol, atol)
        stats["differ" if bad else "agree"] += 1
        if bad:
            print("differs:", desc, bad, flush=True)
    print("seed", args.seed, stats, flush=True)


if __name__ == "__main__":
    main()
