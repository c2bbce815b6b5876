"""Forward+backward time and peak memory of a loss: metrix_ops (cpu / cuda / triton /
reference) vs PML vs the matrix-product floor (the products the loss needs, timed alone).

On the CPU each case runs in its own process, so that its peak memory (RSS growth) is its own.
On a GPU (`--device cuda`) the cases share one process: CUDA's peak counter is reset per case,
and one process keeps Triton's compiled kernels across cases (the device time is short).
`--dtype bfloat16` feeds bf16 embeddings to every impl, the losses under bf16 autocast (as a
mixed-precision training step would), and times the floor's products in bf16.

    python benchmarks/bench_losses.py --sizes 1024,4096 --dims 128,512 \
        --out benchmarks/results/cpu_ms.json
    python benchmarks/bench_losses.py --loss contrastive --sizes 1024,4096 --dims 128,512 \
        --out benchmarks/results/cpu_contrastive.json
    python benchmarks/bench_losses.py --loss triplet --sizes 1024,4096 --dims 128,512 \
        --out benchmarks/results/cpu_triplet.json
    python benchmarks/bench_losses.py --loss proxy_anchor --sizes 1024,4096 --dims 128,512 \
        --out benchmarks/results/cpu_proxy_anchor.json
    python benchmarks/bench_losses.py --loss metrix_ms --impls cpu,clean,pml,floor \
        --sizes 1024,4096 --dims 128,512 --out benchmarks/results/cpu_metrix_ms.json
    python benchmarks/bench_losses.py --loss ee_hphn --impls cpu,clean,pml,floor \
        --sizes 1024,4096 --dims 128,512 --out benchmarks/results/cpu_ee_hphn.json
    python benchmarks/bench_losses.py --loss ms_miner --impls cpu,clean,pml,floor \
        --sizes 1024,4096 --dims 128,512 --out benchmarks/results/cpu_ms_miner.json
    python benchmarks/bench_losses.py --device cuda --impls triton,cuda,pml,floor \
        --sizes 8192,65536 --dims 128,512 --dtype bfloat16 --out benchmarks/results/gpu_ms_bf16.json

impl "clean" is our fused loss without its augmentation (Metrix or EE), on the device's
first fused backend: the time the augmented loss is compared against (`cpu_over_clean`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# --loss name -> (PML class, metrix_ops class, floor). "gram": S = X Xᵀ, G X and Gᵀ X, the
# three products every exact loss of the Gram matrix needs; "proxy": S = X Pᵀ, G P and Gᵀ X
# against C = B // 8 proxies (the label range below; --classes sets C), whose gradient is
# timed too.
LOSSES = {"multi_similarity": ("MultiSimilarityLoss", "MultiSimilarityLoss", "gram"),
          "contrastive": ("ContrastiveLoss", "ContrastiveLoss", "gram"),
          "triplet": ("TripletMarginLoss", "TripletMarginLoss", "gram"),
          "proxy_anchor": ("ProxyAnchorLoss", "ProxyAnchorLoss", "proxy"),
          "proxy_nca": ("ProxyNCALoss", "ProxyNCALoss", "proxy"),
          # MS + embedding-level Metrix (pos_neg, λ drawn per call, weight 0.4). PML has no
          # Metrix: its column is PML's clean MS, the loss a user would run without us.
          "metrix_ms": ("MultiSimilarityLoss", "MultiSimilarityLoss", "gram"),
          # the same with classes of 128 rows (B // 128 labels): on the Triton engine classes
          # over 64 rows are cut into blocks (metrix_tiles.chunk_table); "clean" and "pml" as
          # for metrix_ms, on the same labels
          "metrix_ms_big_classes": ("MultiSimilarityLoss", "MultiSimilarityLoss", "gram"),
          # HPHN triplet with Embedding Expansion (n_points=8, pairs="all"). PML has no EE:
          # its "pml" column is the clean loss, TripletMarginLoss on BatchHardMiner triplets
          # (= HPHN without expansion).
          "ee_hphn": ("TripletMarginLoss", "HPHNTripletLoss", "gram"),
          # the clean HPHN triplet (batch hard); "pml" as for ee_hphn
          "hphn": ("TripletMarginLoss", "HPHNTripletLoss", "gram"),
          # ContrastiveLoss + embedding-level Metrix (pos_neg, λ drawn, weight 0.4); "pml" is
          # PML's clean contrastive
          "metrix_contrastive": ("ContrastiveLoss", "ContrastiveLoss", "gram"),
          # MultiSimilarityLoss with MultiSimilarityMiner(0.1), the PML recipe: PML's two
          # calls loss(x, y, miner(x, y)) against our miner= option (mined inside the op);
          # "clean" is our MS without the miner
          "ms_miner": ("MultiSimilarityLoss", "MultiSimilarityLoss", "gram"),
          "ntxent": ("NTXentLoss", "NTXentLoss", "gram"),
          "supcon": ("SupConLoss", "SupConLoss", "gram"),
          "circle": ("CircleLoss", "CircleLoss", "gram"),
          "generalized_lifted": ("GeneralizedLiftedStructureLoss",
                                 "GeneralizedLiftedStructureLoss", "gram"),
          "lifted": ("LiftedStructureLoss", "LiftedStructureLoss", "gram"),
          # NPairs uses one pair per class (B/4 rows here): the "gram" floor overstates it
          "npairs": ("NPairsLoss", "NPairsLoss", "gram"),
          # embedding-level Metrix (pos_neg, λ drawn, weight 0.4) on more losses; "pml" is
          # PML's clean loss. The proxy losses' mixed term is every ordered pair against
          # every proxy (B²·C terms), far beyond the clean loss's B·C.
          "metrix_proxy_anchor": ("ProxyAnchorLoss", "ProxyAnchorLoss", "proxy"),
          "metrix_proxy_nca": ("ProxyNCALoss", "ProxyNCALoss", "proxy"),
          "metrix_circle": ("CircleLoss", "CircleLoss", "gram"),
          "metrix_generalized_lifted": ("GeneralizedLiftedStructureLoss",
                                        "GeneralizedLiftedStructureLoss", "gram"),
          # MultiSimilarityLoss with Embedding Expansion (n_points=2, pairs="all"): every
          # (anchor, negative point) pair scored by its closest pair; "pml" is PML's clean MS
          "ee_ms": ("MultiSimilarityLoss", "MultiSimilarityLoss", "gram"),
          # the same with n_points=8, the n of DESIGN §7's EE target
          "ee_ms_n8": ("MultiSimilarityLoss", "MultiSimilarityLoss", "gram"),
          # TripletMarginLoss ("all") with EE (n_points=2, pairs="all"); "pml" is PML's clean
          # triplet "all"
          "ee_triplet": ("TripletMarginLoss", "TripletMarginLoss", "gram"),
          # MS + embedding-level Metrix with pairs="pos_pos" (class blocks beside the clean
          # op); "pml" is PML's clean MS
          "metrix_ms_pos_pos": ("MultiSimilarityLoss", "MultiSimilarityLoss", "gram"),
          # ... and with pairs="neg_neg": B·B² candidates (every ordered pair of an anchor's
          # negatives), the anchor chunks against the reference's B × B × B tensor
          "metrix_ms_neg_neg": ("MultiSimilarityLoss", "MultiSimilarityLoss", "gram"),
          # MS + Metrix (pos_neg) against references: ref_emb a second set of B rows (labels
          # from the same classes), both with gradient; "pml"/"clean" the clean loss so called
          "metrix_ms_refs": ("MultiSimilarityLoss", "MultiSimilarityLoss", "gram"),
          # the same for the other losses with a Metrix op against references
          "metrix_contrastive_refs": ("ContrastiveLoss", "ContrastiveLoss", "gram"),
          "metrix_circle_refs": ("CircleLoss", "CircleLoss", "gram"),
          "metrix_generalized_lifted_refs": ("GeneralizedLiftedStructureLoss",
                                             "GeneralizedLiftedStructureLoss", "gram"),
          # EE with n = 8 on the official code's pairing, pairs="adjacent" (rows 2t, 2t+1:
          # the labels are drawn per row pair): one segment per anchor instead of K − 1
          "ee_hphn_adjacent": ("TripletMarginLoss", "HPHNTripletLoss", "gram"),
          "ee_ms_n8_adjacent": ("MultiSimilarityLoss", "MultiSimilarityLoss", "gram"),
          # TripletMarginLoss with TripletMarginMiner(0.2, "semihard"): PML's two calls
          # against our miner= option (counted inside the op); "clean" is our triplet "all"
          "triplet_semihard": ("TripletMarginLoss", "TripletMarginLoss", "gram"),
          # TripletMarginLoss with BatchHardMiner (the batch-hard recipe): PML's two calls
          # against our miner= option (mined by streamed row blocks, PML's exact values)
          "triplet_batch_hard": ("TripletMarginLoss", "TripletMarginLoss", "gram"),
          # the L2 of unnormalised rows (LpDistance(normalize_embeddings=False)), ours and
          # PML's: the batch-hard recipe of person re-identification, the triplet "all" and
          # the contrastive loss (fused/raw_l2.py)
          "triplet_batch_hard_raw": ("TripletMarginLoss", "TripletMarginLoss", "gram"),
          "triplet_raw": ("TripletMarginLoss", "TripletMarginLoss", "gram"),
          "contrastive_raw": ("ContrastiveLoss", "ContrastiveLoss", "gram"),
          "generalized_lifted_raw": ("GeneralizedLiftedStructureLoss",
                                     "GeneralizedLiftedStructureLoss", "gram"),
          "lifted_raw": ("LiftedStructureLoss", "LiftedStructureLoss", "gram"),
          # ... against references (ref_emb a second set of B rows, both with gradient)
          "contrastive_raw_refs": ("ContrastiveLoss", "ContrastiveLoss", "gram"),
          "generalized_lifted_raw_refs": ("GeneralizedLiftedStructureLoss",
                                          "GeneralizedLiftedStructureLoss", "gram"),
          "lifted_raw_refs": ("LiftedStructureLoss", "LiftedStructureLoss", "gram")}
RAW = ("triplet_batch_hard_raw", "triplet_raw", "contrastive_raw", "generalized_lifted_raw",
       "lifted_raw", "contrastive_raw_refs", "generalized_lifted_raw_refs", "lifted_raw_refs")

# --loss name -> the options that make our module the augmented loss
AUGMENT = {"metrix_ms": lambda mo: {"metrix": mo.Metrix()},
           "metrix_ms_big_classes": lambda mo: {"metrix": mo.Metrix()},
           "metrix_contrastive": lambda mo: {"metrix": mo.Metrix()},
           "ms_miner": lambda mo: {"miner": mo.miners.MultiSimilarityMiner(0.1)},
           "ee_hphn": lambda mo: {"expansion": mo.Expansion(n_points=8, pairs="all")},
           "metrix_proxy_anchor": lambda mo: {"metrix": mo.Metrix()},
           "metrix_proxy_nca": lambda mo: {"metrix": mo.Metrix()},
           "metrix_circle": lambda mo: {"metrix": mo.Metrix()},
           "metrix_generalized_lifted": lambda mo: {"metrix": mo.Metrix()},
           "ee_ms": lambda mo: {"expansion": mo.Expansion(n_points=2, pairs="all")},
           "ee_ms_n8": lambda mo: {"expansion": mo.Expansion(n_points=8, pairs="all")},
           "ee_triplet": lambda mo: {"expansion": mo.Expansion(n_points=2, pairs="all")},
           "metrix_ms_pos_pos": lambda mo: {"metrix": mo.Metrix(pairs="pos_pos")},
           "metrix_ms_neg_neg": lambda mo: {"metrix": mo.Metrix(pairs="neg_neg")},
           "metrix_ms_refs": lambda mo: {"metrix": mo.Metrix()},
           "metrix_contrastive_refs": lambda mo: {"metrix": mo.Metrix()},
           "metrix_circle_refs": lambda mo: {"metrix": mo.Metrix()},
           "metrix_generalized_lifted_refs": lambda mo: {"metrix": mo.Metrix()},
           "ee_hphn_adjacent": lambda mo: {"expansion": mo.Expansion(n_points=8,
                                                                     pairs="adjacent")},
           "ee_ms_n8_adjacent": lambda mo: {"expansion": mo.Expansion(n_points=8,
                                                                      pairs="adjacent")},
           "triplet_semihard": lambda mo: {
               "miner": mo.miners.TripletMarginMiner(0.2, type_of_triplets="semihard")},
           "triplet_batch_hard": lambda mo: {"miner": mo.miners.BatchHardMiner()},
           "triplet_batch_hard_raw": lambda mo: {"miner": mo.miners.BatchHardMiner(
               distance=mo.distances.LpDistance(normalize_embeddings=False))}}


FUSED_IMPLS = ("cpu", "cuda", "triton", "cuda-general")


def raw_distance(loss, distances) -> dict:
    """{"distance": the L2 of unnormalised rows} for the RAW losses (ours or PML's
    `distances` module), else {}."""
    return ({"distance": distances.LpDistance(normalize_embeddings=False)} if loss in RAW
            else {})


def make_loss(loss, impl, ctor_args=(), clean_backend="cpu"):
    """The loss module of `impl` (pml, cpu, cuda, triton, reference, clean) for --loss `loss`."""
    if impl == "pml":
        from pytorch_metric_learning import distances as pd
        from pytorch_metric_learning import losses as pl
        if loss.startswith("ee_hphn") or loss == "hphn":
            from pytorch_metric_learning import miners as pm
            from pytorch_metric_learning import reducers as pr
            fn, miner = pl.TripletMarginLoss(margin=0.2, reducer=pr.MeanReducer()), pm.BatchHardMiner()
            return lambda x, y: fn(x, y, miner(x, y))
        if loss == "ms_miner":
            from pytorch_metric_learning import miners as pm
            fn, miner = pl.MultiSimilarityLoss(), pm.MultiSimilarityMiner(0.1)
            return lambda x, y: fn(x, y, miner(x, y))
        if loss == "triplet_semihard":
            from pytorch_metric_learning import miners as pm
            fn, miner = pl.TripletMarginLoss(), pm.TripletMarginMiner(0.2, type_of_triplets="semihard")
            return lambda x, y: fn(x, y, miner(x, y))
        if loss in ("triplet_batch_hard", "triplet_batch_hard_raw"):
            from pytorch_metric_learning import miners as pm
            dist = raw_distance(loss, pd)
            fn, miner = pl.TripletMarginLoss(**dist), pm.BatchHardMiner(**dist)
            return lambda x, y: fn(x, y, miner(x, y))
        return getattr(pl, LOSSES[loss][0])(*ctor_args, **raw_distance(loss, pd))
    import metrix_ops as mo
    kw = AUGMENT[loss](mo) if loss in AUGMENT and impl != "clean" else {}
    kw.update(raw_distance(loss, mo.distances))
    # "cuda-general": the CUDA engine with the batch against itself on the general ops (r = x),
    # as before the self ops (case_step turns them off around each step)
    backend = clean_backend if impl == "clean" else impl.removesuffix("-general")
    return getattr(mo.losses, LOSSES[loss][1])(*ctor_args, backend=backend, **kw)


def run_case(loss, impl, b, d, repeats, device="cpu", dtype="float32", classes=0):
    import torch

    sys.path.insert(0, HERE)
    from harness import peak_memory, time_fn

    dev = torch.device(device)
    step = case_step(loss, impl, b, d, device, dtype, classes)
    peak = peak_memory(step, dev)  # first: RSS peaks are sticky within a process
    # (a compiled graph: compiled, warmed up, recorded, then replayed)
    stats = time_fn(step, dev, warmup=3 if impl.endswith("+graphs") else 1, repeats=repeats)
    stats["peak_bytes"] = peak
    return stats


def case_step(loss, impl, b, d, device="cpu", dtype="float32", classes=0):
    """One timed step of --loss `loss` on `impl`: forward and backward (or the floor's
    products) on a fixed random batch of B = b rows of D = d, labels in B // 8 classes (or
    `classes` of them: the proxy losses' C, as the papers' data sets have, e.g. 11318 for
    Stanford Online Products at B = 180)."""
    import contextlib

    import torch

    dev = torch.device(device)
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    x0 = torch.randn(b, d, device=dev).to(dt)
    n_classes = classes or max(2, b // (128 if loss.endswith("_big_classes") else 8))
    if loss.endswith("_adjacent"):  # rows 2t and 2t + 1 share a label (still ~8 per class)
        y = torch.randint(0, n_classes, ((b + 1) // 2,), device=dev).repeat_interleave(2)[:b]
    else:
        y = torch.randint(0, n_classes, (b,), device=dev)
    proxy = LOSSES[loss][2] == "proxy"
    ctor_args = (n_classes, d) if proxy else ()
    autocast = (torch.autocast(dev.type, dtype=dt) if dt in (torch.float16, torch.bfloat16)
                else contextlib.nullcontext())
    if impl == "floor" and proxy:
        p0 = torch.randn(n_classes, d, device=dev).to(dt)

        def step():  # S = X Pᵀ, then dX = G P and dP = Gᵀ X
            s = x0 @ p0.t()
            return s @ p0, s.t() @ x0
    elif impl == "floor":
        # S = X Xᵀ, then dX = G X and dR = Gᵀ X: the three products any exact method needs
        def step():
            s = x0 @ x0.t()
            return s @ x0, s.t() @ x0
    else:
        # "<engine>+graphs": the loss under torch.compile(mode="reduce-overhead"), its graph
        # replayed as a CUDA graph where the ops allow (no per-launch cost)
        graphs = impl.endswith("+graphs")
        # on a GPU the clean loss runs where "auto" puts it (the faster of CUDA and Triton)
        loss_fn = make_loss(loss, impl.removesuffix("+graphs"), ctor_args,
                            clean_backend="auto" if dev.type == "cuda" else "cpu")
        if isinstance(loss_fn, torch.nn.Module):
            loss_fn.to(dev)
        module = loss_fn
        if graphs:
            loss_fn = torch.compile(module, mode="reduce-overhead")

        refs = {}
        if loss.endswith("_refs"):
            r0, ry = torch.randn(b, d, device=dev).to(dt), torch.randint(0, n_classes, (b,), device=dev)

        def step():
            x = x0.clone().requires_grad_(True)
            if isinstance(module, torch.nn.Module):
                module.zero_grad(set_to_none=True)  # proxies: a fresh gradient each step
            if loss.endswith("_refs"):
                refs.update(ref_emb=r0.clone().requires_grad_(True), ref_labels=ry)
            with autocast:
                out = loss_fn(x, y, **refs)
            out.backward()
            return x.grad
        if impl.startswith("cuda-general"):
            return _without_cuda_self_ops(step)
    return step


def _without_cuda_self_ops(step):
    """`step` with the CUDA engine's self ops off (fused/multi_similarity.CUDA_SELF_OPS)."""
    from metrix_ops.fused import multi_similarity as glue

    def general_step():
        glue.CUDA_SELF_OPS = False
        try:
            return step()
        finally:
            glue.CUDA_SELF_OPS = True
    return general_step


def ratios(row):
    """Speed-up over PML, time over the floor and over the clean loss, and peak memory over
    PML's, for each fused impl measured (keys without prefix for "cpu", as the older files)."""
    def t(k):
        return row.get(k, {}).get("median_s")
    for impl in FUSED_IMPLS:
        if t(impl) is None:
            continue
        pre = "" if impl == "cpu" else f"{impl}_"
        if t("pml") is not None:
            row[pre + "speedup_vs_pml"] = t("pml") / t(impl)
            row[f"peak_ratio_{impl}_over_pml"] = row[impl]["peak_bytes"] / max(1, row["pml"]["peak_bytes"])
        if t("floor") is not None:
            row[f"{impl}_over_floor"] = t(impl) / t("floor")
        if t("clean") is not None:
            row[f"{impl}_over_clean"] = t(impl) / t("clean")
    return row


def case_in_child(args, impl, b, d):
    """One case in its own process (CPU: an honest peak RSS); its stats or {"error": ...}."""
    cmd = [sys.executable, __file__, "--loss", args.loss, "--case", f"{impl}:{b}:{d}",
           "--repeats", str(args.repeats), "--mem-limit-gb", str(args.mem_limit_gb),
           "--device", args.device, "--dtype", args.dtype, "--classes", str(args.classes),
           "--out", "-"]
    cmd += ["--tf32"] if args.tf32 else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout:.0f} s"}
    err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 \
        else {"error": err[:200]}


def case_in_process(args, impl, b, d):
    """One case in this process (GPU): errors, out of memory included, become the entry."""
    import torch
    try:
        return run_case(args.loss, impl, b, d, args.repeats, args.device, args.dtype,
                        args.classes)
    except Exception as e:  # noqa: BLE001  (an impl that cannot run this case is a result)
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", default="multi_similarity", choices=sorted(LOSSES))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--tf32", action="store_true",
                    help="allow TF32 for fp32 matmuls (torch.backends.cuda.matmul.allow_tf32), "
                         "for every impl alike")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case (CPU process)")
    ap.add_argument("--mem-limit-gb", type=float, default=0,
                    help="address-space cap per case (0: none); a shared box survives PML's OOMs")
    ap.add_argument("--sizes", default="1024,4096")
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--impls", default="cpu,pml,reference,floor")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--classes", default="0",
                    help="labels in this many classes (the proxy losses' C), a comma list "
                         "like --sizes; 0: B // 8")
    ap.add_argument("--out", required=True)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tf32:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.case:  # child process: one case, result as JSON on stdout
        impl, b, d = args.case.split(":")
        if args.mem_limit_gb > 0:
            import resource
            cap = int(args.mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(json.dumps(run_case(args.loss, impl, int(b), int(d), args.repeats, args.device,
                                  args.dtype, int(args.classes))))
        return
    sys.path.insert(0, HERE)
    import torch
    from harness import write_result

    run = case_in_process if args.device == "cuda" else case_in_child
    rows = []
    shapes = [(b, d, c) for b in map(int, args.sizes.split(","))
              for d in map(int, args.dims.split(",")) for c in map(int, args.classes.split(","))]
    for b, d, c in shapes:
        # "case": the --loss key (the option set), which derive_gpu_order.py reads
        row = {"loss": LOSSES[args.loss][1], "case": args.loss, "B": b, "D": d,
               "dtype": args.dtype, "tf32": args.tf32,
               "classes": c or None}  # None: B // 8 (the older files' rule)
        one = argparse.Namespace(**{**vars(args), "classes": c})  # this case's C
        for impl in args.impls.split(","):
            row[impl] = run(one, impl, b, d)
            # each case as it ends: a run cut short by a time limit keeps what it measured
            print(json.dumps({"B": b, "D": d, impl: row[impl]}), file=sys.stderr, flush=True)
        print(json.dumps(ratios(row)), flush=True)
        rows.append(row)
    write_result(args.out, torch.device(args.device), rows)


if __name__ == "__main__":
    main()
