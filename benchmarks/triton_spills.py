"""Registers and spills of the Triton kernels on sm_90, without a GPU: each kernel is compiled
by Triton for an H100 (tests/triton_cases.compile_sm90) and its PTX assembled by the CUDA
toolkit's `ptxas -v`, which reports registers per thread and spill bytes (and the number of
exp instructions in the PTX, which ptxas turns one for one into MUFU.EX2). What the interpreter
cannot show, and what the launch settings (metrix_tiles.mix_config, ee_hphn's tile override)
were chosen from.

    python benchmarks/triton_spills.py [--ptxas /usr/local/cuda/bin/ptxas] [--out FILE.json]
        [--only TEXT]

Run without TRITON_INTERPRET (the kernels must be real ones)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

PTRS = {"lab_ptr": "*i64", "cnt_ptr": "*i32", "chunk_ptr": "*i32", "pu_ptr": "*i64",
        "pw_ptr": "*i64", "plab_ptr": "*i64", "si_ptr": "*i64", "sj_ptr": "*i64",
        "col_ptr": "*i64", "pc_ptr": "*i32",
        "nc_ptr": "*i32", "lo_ptr": "*i32", "hi_ptr": "*i32", "kept_ptr": "*i64",
        "y_ptr": "*i64", "crank_ptr": "*i64", "srank_ptr": "*i64", "npos_ptr": "*i64",
        "nz_ptr": "*i64", "trip_ptr": "*i64"}


def cases():
    import triton.language as tl

    import metrix_ops.triton.ee_hphn as ee
    import metrix_ops.triton.metrix_tiles as mt
    import metrix_ops.triton.ms_metrix as mm
    out = []
    for kb, bn, split in ((16, 32, False), (16, 16, False), (32, 16, False), (32, 16, True), (16, 16, True)):
        t = dict(KB=kb, BLOCK_N=bn, BLOCK_D=64, ACC=tl.float32, PRECISION="tf32",
                 ANCHOR_NEG=False, SPLIT=split, BLOCK_DO=512)
        tag = f"KB={kb} N={bn}" + (" split" if split else "")
        out += [(f"ms_metrix fwd {tag}", mm._ms_mix_fwd_kernel, t, 8),
                (f"metrix grad rows {tag}", mt.mix_grad_rows_kernel,
                 dict(t, WEIGHTS=mm._ms_mix_weights), 8),
                (f"metrix grad cols {tag}", mt.mix_grad_cols_kernel,
                 dict(t, WEIGHTS=mm._ms_mix_weights), 8)]
    for row_seg, br, npr in ((False, 32, 1), (True, 16, 8), (True, 16, 16)):
        name = f"ee mine {'segment' if row_seg else 'original'} rows {br}x{npr}"
        out.append((name, ee._ee_mine_kernel,
                    dict(ROW_SEG=row_seg, INVERTED=False, BR=br, NPR=npr, BCO=32, BCS=16,
                         BLOCK_D=32, ACC=tl.float32, PRECISION="tf32"), 4))
    return out + seventh_session_cases()


def seventh_session_cases():
    """The kernels of the seventh session at the tiles launch_config gives CUDA tensors at
    D = 512 (64 rows forward, 32 for the gradient kernels; feature steps of 64; 8 warps)."""
    import triton.language as tl

    import metrix_ops.triton.generalized_lifted as gl
    import metrix_ops.triton.generalized_lifted_metrix as glm
    import metrix_ops.triton.lifted_structure as ls
    import metrix_ops.triton.lse_metrix as lm
    import metrix_ops.triton.ms_mined as mmd
    import metrix_ops.triton.multi_similarity as ms
    import metrix_ops.triton.pairs as pairs
    import metrix_ops.triton.side_lse as side
    fwd = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, ACC=tl.float32, PRECISION="tf32")
    grad = dict(fwd, BLOCK_M=32, BLOCK_N=32, BLOCK_DO=512)
    return [
        ("gen lifted fwd (side_lse) 64x64", side.side_lse_fwd_kernel,
         dict(fwd, LOGITS=gl._lifted_logits_l2, EMPTY_ZERO=True, EXCLUDE_DIAG=True), 8),
        ("gen lifted grad sym 32x32", pairs.pair_grad_sym_kernel,
         dict(grad, GRAD_TILE=gl._lifted_grad_tile_l2), 8),
        ("lifted positive pass fwd 64x64", ls._lifted_pos_kernel,
         dict(fwd, BLOCK_DO=512, BWD=False, COSINE=False), 8),
        ("lifted positive pass bwd 32x32", ls._lifted_pos_kernel,
         dict(grad, BWD=True, COSINE=False), 8),
        ("ms miner bounds 64x64", mmd._ms_bounds_kernel, dict(fwd, EXCLUDE_DIAG=True), 8),
        ("ms mined fwd 64x64", ms._ms_fwd_kernel, dict(fwd, EXCLUDE_DIAG=True, MINE=True), 8),
        ("ms mined grad sym 32x32", pairs.pair_grad_sym_kernel,
         dict(grad, GRAD_TILE=ms._ms_grad_tile, MINE=True), 8),
        ("gen lifted metrix fwd KB=16 N=32", lm.lse_mix_fwd_kernel,
         dict(KB=16, BLOCK_N=32, BLOCK_D=64, ACC=tl.float32, PRECISION="tf32",
              ANCHOR_NEG=False, SPLIT=False, LOGITS=glm._lifted_mix_logits_l2), 8),
    ] + proxy_and_triplet_cases()


def proxy_and_triplet_cases():
    """The proxy losses' Metrix kernels (16×16×16 candidate tiles, 4 and 8 warps) and the
    "all"-triplets kernels with TripletMarginMiner's window (semihard), as on CUDA tensors."""
    import triton.language as tl

    import metrix_ops.triton.proxy_anchor_metrix as pam
    import metrix_ops.triton.proxy_nca_metrix as pnm
    import metrix_ops.triton.triplet_margin as tm
    mix = dict(BLOCK_U=16, BLOCK_W=16, BLOCK_C=16, BLOCK_D=64, ACC=tl.float32,
               PRECISION="tf32", SAME=False, KIND=1, BLOCK_DO=512)
    tri = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, ACC=tl.float32, PRECISION="tf32",
               EXCLUDE_DIAG=True, COSINE=False, BLOCK_P=16, MINE=3)
    grad = dict(tri, BLOCK_M=32, BLOCK_N=32, BLOCK_DO=512)
    proxy = [("proxy nca metrix fwd", pnm._nca_mix_fwd_kernel),
             ("proxy nca metrix bwd", pnm._nca_mix_bwd_kernel),
             ("proxy anchor metrix fwd", pam._pa_mix_fwd_kernel),
             ("proxy anchor metrix bwd", pam._pa_mix_bwd_kernel)]
    return [(f"{name}{' 8 warps' if w == 8 else ''}", fn, mix, w)
            for w in (4, 8) for name, fn in proxy] + [
        ("triplet mined fwd 64x64", tm._tri_fwd_kernel, tri, 8),
        ("triplet mined counts 64x64", tm._tri_pos_counts_kernel, tri, 8),
        ("triplet mined grad dx 32x32", tm._tri_grad_dx_kernel, grad, 8)] + ee_lse_cases()


def ee_lse_cases():
    """The EE negative-side kernels (eighth session) at the CUDA launch settings: KB = 16
    (classes of ≤ 16), 64 side entries per block, 32 points per forward tile, 16 backward."""
    import triton.language as tl

    import metrix_ops.triton.ee_neg_lse as el
    ints = ("chunk_ptr", "cls_ptr", "pstart_ptr", "pu_ptr", "pw_ptr", "pp_ptr", "soff_ptr",
            "su_ptr", "sw_ptr", "sp_ptr")
    ptrs = dict({k: "*i32" for k in ints}, amask_ptr="*i8", pok_ptr="*i8", pl_ptr="*fp64",
                sl_ptr="*fp64")
    base = dict(L2=True, KB=16, BA=64, BLOCK_D=64, ACC=tl.float32, PRECISION="tf32")
    # the triplet mode (MODE 1, ee_triplet.py): positives in blocks of KP = KP_MAX
    trip_ptrs = dict(ptrs, pst_ptr="*i32", pct_ptr="*i32", nz_ptr="*i64", ct_ptr="*i64")
    trip = dict(MODE=1, SMOOTH=False, KP=el.KP_MAX)
    return [("ee neg lse fwd KB=16 Q=32", el._fwd_kernel, dict(base, BQ=32), 4, ptrs),
            ("ee neg lse bwd KB=16 Q=16 4 warps", el._bwd_kernel,
             dict(base, BQ=16, BLOCK_DO=512), 4, ptrs),
            ("ee neg lse bwd KB=16 Q=16 8 warps", el._bwd_kernel,
             dict(base, BQ=16, BLOCK_DO=512), 8, ptrs),
            (f"ee triplet fwd KB=16 Q=32 KP={el.KP_MAX}", el._fwd_kernel,
             dict(base, BQ=32, **trip), 4, trip_ptrs),
            (f"ee triplet bwd KB=16 Q=16 KP={el.KP_MAX} 8 warps", el._bwd_kernel,
             dict(base, BQ=16, BLOCK_DO=512, **trip), 8, trip_ptrs)] + picks_cases()


def picks_cases():
    """HPHN's picks and EE's point norms (forty-first session) at their launch settings:
    16 anchors or segments a program, 32 (picks) or 64 (norms) features a step, 4 warps."""
    import triton.language as tl

    import metrix_ops.triton.ee_side_pairs as sp
    import metrix_ops.triton.pick_sims as ps
    import metrix_ops.triton.segment_norms as sn
    ints = {n: "*i64" for n in ("idx_ptr", "dst_ptr", "seg_i_ptr", "seg_j_ptr", "ends_ptr",
                                "off_ptr", "out_ptr", "u_ptr", "w_ptr")}
    picks = dict(TINY=1.1754943508222875e-38, DT=tl.float32, BLOCK_B=16, BLOCK_D=32,
                 ACC=tl.float32)
    norms = dict(TINY=1.1754943508222875e-38, DT=tl.float32, BLOCK_S=16, BLOCK_D=64,
                 ACC=tl.float32)
    return [("hphn pick sims fwd", ps._pick_sims_fwd_kernel, dict(picks, L2_POS=True), 4, ints),
            ("hphn pick sims bwd", ps._pick_sims_bwd_kernel, dict(picks, L2_POS=True), 4, ints),
            ("ee side pairs n=8", sp._side_pairs_kernel,
             dict(INVERTED=False, BLOCK_S=16, NP=8), 4, ints),
            ("ee segment norms fwd", sn._norms_fwd_kernel, norms, 4, ints),
            ("ee segment norms bwd", sn._norms_bwd_kernel, norms, 4, ints)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ptxas", default=os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                    "bin", "ptxas"))
    ap.add_argument("--out", help="also write the figures as JSON (machine and command)")
    ap.add_argument("--only", help="only the kernels whose name contains this text")
    args = ap.parse_args()
    from triton_cases import compile_sm90
    rows = []
    for name, fn, consts, warps, *ptrs in cases():  # a 5th entry: its own pointer types
        if args.only and args.only not in name:
            continue
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        kernel = compile_sm90(fn, consts, "fp32", num_warps=warps,
                              pointer_types=dict(PTRS, **(ptrs[0] if ptrs else {})))
        with tempfile.TemporaryDirectory() as d:
            ptx = os.path.join(d, "k.ptx")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            res = subprocess.run([args.ptxas, "-arch=sm_90a", "-v", ptx, "-o",
                                  os.path.join(d, "k.cubin")], capture_output=True, text=True)
        info = [line.split("ptxas info    :")[-1].strip()
                for line in (res.stderr + res.stdout).splitlines()
                if "registers" in line or "spill" in line]
        # exps in the code (static: a loop's body counts once); the SFU issues them at an
        # eighth of the FMA rate, so the count compares two forms of a kernel's inner loop
        exps = kernel.asm["ptx"].count("ex2.approx")
        print(f"{name}: " + "; ".join(info) + f"; {exps} ex2 in the PTX")
        text = " ".join(info)
        rows.append({"kernel": name, "warps": warps, "ptxas": text, "ex2_in_ptx": exps,
                     "registers": _number(text, "Used", "registers"),
                     "spill_stores_bytes": _number(text, "", "bytes spill stores"),
                     "spill_loads_bytes": _number(text, "", "bytes spill loads")})
    if args.out:
        import torch
        from harness import write_result
        write_result(args.out, torch.device("cpu"), rows)


def _number(text: str, before: str, after: str):
    """The integer between `before` and `after` in ptxas's line (None if absent)."""
    import re
    m = re.search(rf"{before}\s*(\d+)\s*{after}", text)
    return int(m.group(1)) if m else None


if __name__ == "__main__":
    main()
