"""Races between Triton programs, as far as the interpreter can bring them out: every loss on
the Triton engine gives the same bits, value and gradient, when each launch runs its programs
in reverse order instead of the interpreter's index order. The kernels write each output
entry from one program and merge in fixed orders (test_deterministic.py), so an output that
changes with the order is a race: two programs writing one address, or one reading what
another writes within the launch. A GPU runs programs in whatever order its SMs take them.

The order is set by giving the k-th program the interpreter runs the program id of the k-th
entry of the reversed order (triton.runtime.interpreter's builder takes each program's id from
set_grid_idx), so the kernels and the interpreter run unchanged. The cases together launch
every Triton kernel of metrix_ops/triton (checked against the sources), each on several
programs; the one kernel that adds with float atomics (the index-tuple backward) is
compared to rounding instead. CPU tensors under TRITON_INTERPRET=1 only."""
import contextlib
import os
import re

import pytest
import torch

import metrix_ops as mo
from cases import assert_same_run, listed_pairs
from metrix_ops.triton import launch, usable_on

pytestmark = pytest.mark.skipif(not usable_on(torch.device("cpu")),
                                reason="needs TRITON_INTERPRET=1 (Triton's interpreter)")

L, mi = mo.losses, mo.miners
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float64 where this triton's tl.dot takes it (not 3.2's); the bits must agree in either
DTYPE = torch.float64 if launch.FP64_DOT else torch.float32


@contextlib.contextmanager
def program_order(reverse, log):
    """Launches in this scope run their programs in reverse index order if `reverse` (the
    grids here have 2 to 40 programs: every pair of them swaps), else in index order; each
    launch's kernel and program count go to `log`."""
    from triton.runtime import interpreter
    builder, executor = interpreter.interpreter_builder, interpreter.GridExecutor
    run, set_dim, set_idx = executor.__call__, builder.set_grid_dim, builder.set_grid_idx
    names = ("set_grid_dim", "set_grid_idx")
    own = {n: builder.__dict__[n] for n in names if n in builder.__dict__}
    state = {}

    def call(self, *args, **kwargs):
        state["kernel"] = f"{self.fn.__module__}.{self.fn.__name__}"
        return run(self, *args, **kwargs)

    def grid_dim(x, y, z):
        ids = list(range(x * y * z))
        if reverse:
            ids.reverse()
        state.update(dims=(y, z), ids=ids, k=0)
        log.append((state["kernel"], x * y * z))
        return set_dim(x, y, z)

    def grid_idx(x, y, z):  # the interpreter's k-th program (x outermost) gets ids[k]
        (ny, nz), i = state["dims"], state["ids"][state["k"]]
        state["k"] += 1
        return set_idx(i // (ny * nz), i // nz % ny, i % nz)

    executor.__call__ = call
    builder.set_grid_dim, builder.set_grid_idx = grid_dim, grid_idx
    try:
        yield
    finally:
        executor.__call__ = run
        del builder.set_grid_dim, builder.set_grid_idx
        builder.__dict__.update(own)  # (none where they are the class's methods)


def _refs(x, y, g):  # a reference set that takes a gradient too
    r = torch.randn(45, x.shape[1], dtype=x.dtype, generator=g).requires_grad_()
    return {"ref_emb": r, "ref_labels": torch.randint(0, 7, (45,), generator=g)}


def _pairs(x, y, g):
    return {"indices_tuple": listed_pairs(y, g, 200)}


class _PairSims(torch.nn.Module):
    """The listed pairs' similarities (triton/pair_sims.py; the Triton engine's index-tuple
    paths take them on CUDA tensors only) with their backward, as a loss."""

    def forward(self, x, labels, indices_tuple):
        from metrix_ops.triton.pair_sims import pair_sims_bwd_triton, pair_sims_triton

        class Sims(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, rows, cols):
                ctx.save_for_backward(x, rows, cols)
                return pair_sims_triton(x, x, rows, cols)

            @staticmethod
            def backward(ctx, grad):
                x, rows, cols = ctx.saved_tensors
                dx, dr = pair_sims_bwd_triton(grad.contiguous(), x, x, rows, cols)
                return dx + dr, None, None

        a1, p, a2, n = indices_tuple
        return (Sims.apply(x, a1, p).sum() - Sims.apply(x, a2, n).exp().sum())


class _UnitRows(torch.nn.Module):
    """The rows' normalisation kernels (triton/unit_rows.py; the glue takes them on CUDA
    tensors) with their backward, as a loss."""

    def forward(self, x, labels):
        from metrix_ops.triton.unit_rows import unit_rows_bwd, unit_rows_fwd

        class Unit(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                y, norm = unit_rows_fwd(x)
                ctx.save_for_backward(y, norm)
                return y

            @staticmethod
            def backward(ctx, grad):
                return unit_rows_bwd(grad.contiguous(), *ctx.saved_tensors)

        y = Unit.apply(x)
        return (y @ y.t()).exp().sum()


def _ee():
    return mo.Expansion(n_points=3)


def _tri(loss, **kw):
    return lambda: getattr(L, loss)(backend="triton", **kw)


P = {"num_classes": 70, "embedding_size": 12}  # proxies past one program's block
# name: (make the loss, the call's extra arguments' maker, the kernels it must launch, as
# module.kernel of metrix_ops.triton)
CASES = {
    "ms": (_tri("MultiSimilarityLoss"), None,
           {"multi_similarity._ms_fwd_kernel", "pairs.pair_grad_sym_kernel"}),
    "ms-miner": (_tri("MultiSimilarityLoss", miner=mi.MultiSimilarityMiner()), None,
                 {"ms_mined._ms_bounds_kernel", "pairs.pair_grad_sym_kernel"}),
    "ms-metrix": (_tri("MultiSimilarityLoss", metrix=mo.Metrix()), None,
                  {"ms_metrix._ms_mix_fwd_kernel", "metrix_tiles.mix_grad_rows_kernel",
                   "metrix_tiles.mix_grad_cols_kernel"}),
    "ms-ee": (_tri("MultiSimilarityLoss", expansion=_ee()), None,
              {"segment_norms._norms_fwd_kernel", "segment_norms._norms_bwd_kernel",
               "ee_neg_lse._fwd_kernel", "ee_neg_lse._bwd_kernel"}),
    "contrastive": (_tri("ContrastiveLoss"), None,
                    {"contrastive._con_fwd_kernel", "pairs.pair_grad_sym_kernel"}),
    "contrastive-refs": (_tri("ContrastiveLoss"), _refs,
                         {"contrastive._con_fwd_kernel", "pairs.pair_grad_dx_kernel",
                          "pairs.pair_grad_dr_kernel"}),
    "contrastive-metrix": (_tri("ContrastiveLoss", metrix=mo.Metrix()), None,
                           {"contrastive_metrix._con_mix_fwd_kernel"}),
    "circle-metrix": (_tri("CircleLoss", metrix=mo.Metrix()), None,
                      {"lse_metrix.lse_mix_fwd_kernel", "side_lse.side_lse_fwd_kernel"}),
    "lifted": (_tri("LiftedStructureLoss"), None,
               {"side_lse.side_lse_fwd_kernel", "lifted_structure._lifted_pos_kernel"}),
    "ntxent": (_tri("NTXentLoss"), None,
               {"ntxent._ntx_fwd_kernel", "ntxent._pair_dx_kernel", "ntxent._pair_dr_kernel"}),
    "supcon": (_tri("SupConLoss"), None, {"ntxent._sup_fwd_kernel"}),
    "triplet": (_tri("TripletMarginLoss"), None,
                {"triplet_margin._tri_pos_keys_kernel", "triplet_margin._tri_fwd_kernel",
                 "triplet_margin._tri_pos_counts_kernel", "triplet_margin._tri_grad_dx_kernel",
                 "triplet_margin._tri_grad_dr_kernel"}),
    "triplet-ee": (_tri("TripletMarginLoss", expansion=_ee()), None,
                   {"ee_neg_lse._fwd_kernel", "ee_neg_lse._bwd_kernel"}),
    "hphn-ee": (_tri("HPHNTripletLoss", expansion=_ee()), None,
                {"hphn_triplet._hphn_mine_kernel", "ee_hphn._ee_mine_kernel",
                 "ee_side_pairs._side_pairs_kernel", "pick_sims._pick_sims_fwd_kernel",
                 "pick_sims._pick_sims_bwd_kernel"}),
    "proxy-anchor-metrix": (_tri("ProxyAnchorLoss", metrix=mo.Metrix(), **P), None,
                            {"proxy_anchor._pa_fwd_kernel", "proxy_anchor._merge_lse_one_kernel",
                             "proxy_anchor._pa_dx_kernel", "proxy_anchor._pa_dp_kernel",
                             "proxy_anchor_metrix._pa_mix_fwd_kernel",
                             "proxy_anchor_metrix._pa_mix_bwd_kernel"}),
    "proxy-nca-metrix": (_tri("ProxyNCALoss", metrix=mo.Metrix(), **P), None,
                         {"proxy_nca._nca_fwd_kernel", "proxy_nca._nca_dx_kernel",
                          "proxy_nca._nca_dp_kernel", "proxy_nca_metrix._nca_mix_fwd_kernel",
                          "proxy_nca_metrix._nca_mix_bwd_kernel"}),
    "pair-sims": (_PairSims, _pairs, {"pair_sims._sims_fwd_kernel", "pair_sims._sims_bwd_kernel"}),
    "unit-rows": (_UnitRows, None,
                  {"unit_rows._unit_rows_fwd_kernel", "unit_rows._unit_rows_bwd_kernel"}),
}
ATOMICS = {"pair-sims"}  # its backward adds with float atomics
NOT_A_LOSS_KERNEL = {"launch._probe_kernel"}  # the interpreter's probe (launch.py)


def _kernels_in_sources():
    names = set()
    folder = os.path.join(ROOT, "metrix_ops", "triton")
    for f in sorted(os.listdir(folder)):
        if f.endswith(".py"):
            with open(os.path.join(folder, f)) as src:
                found = re.findall(r"@triton\.jit\s+def\s+(\w+_kernel)\b", src.read())
            names |= {f"{f[:-3]}.{n}" for n in found}
    return names


def _inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 12, dtype=DTYPE, generator=g)
    y = torch.randint(0, 7, (40,), generator=g)
    x[17] = x[4]  # a duplicate row
    y[30] = 20  # a row without positives
    return x, y, g


def _run(case, reverse):
    make, extra, _ = CASES[case]
    x, y, g = _inputs()
    torch.manual_seed(3)  # the same proxies and Metrix draws in every order
    loss_fn = make()
    kwargs = extra(x, y, g) if extra else {}
    xx = x.clone().requires_grad_()
    log = []
    with program_order(reverse, log):
        value = loss_fn(xx, y, **kwargs)
        value.backward()
    leaves = [xx, *loss_fn.parameters(), *(v for v in kwargs.values()
                                            if isinstance(v, torch.Tensor) and v.requires_grad)]
    launched = {}  # module.kernel: the most programs of its launches
    for kernel, programs in log:
        short = kernel.removeprefix("metrix_ops.triton.")
        launched[short] = max(launched.get(short, 0), programs)
    return value.detach(), [t.grad for t in leaves], launched


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_do_not_depend_on_the_program_order(case):
    v0, g0, launched = _run(case, reverse=False)
    assert torch.isfinite(v0) and v0.item() != 0.0
    want = CASES[case][2]
    assert want <= launched.keys(), f"{case}: not launched: {want - launched.keys()}"
    one = {k for k in launched if launched[k] < 2}
    assert not one, f"{case}: on one program only: {one}"
    v, g, again = _run(case, reverse=True)
    assert again == launched
    # the atomics' order changes their sums' rounding, not more
    tol = (1e-12 if DTYPE == torch.float64 else 2e-5) if case in ATOMICS else None
    assert_same_run(f"{case} reversed", (v, g), (v0, g0), tol)


def test_cases_launch_every_kernel():
    covered = set().union(*(c[2] for c in CASES.values()))
    assert covered == _kernels_in_sources() - NOT_A_LOSS_KERNEL
