"""Races in global memory, as far as the CUDA emulator can bring them out: every loss on the
CUDA engine gives the same bits, value and gradient, when each of its launches runs its blocks,
and each block its threads between sync points, in reverse or shuffled order (EMU_ORDER,
tests/cuda_emu/runtime.cpp). The kernels write each output entry from one thread and merge in
fixed orders (test_deterministic.py), so an output that changes with the order is a race: two
blocks or threads writing one address, or one reading what another writes with no barrier
between. A GPU runs blocks in whatever order its SMs take them, and there such a race gives
wrong or varying numbers; the emulator's own order (blocks and threads in index order) hides it,
and the shared-memory checks do not see global memory.

The cases together launch every kernel of csrc/cuda (checked against the sources): each says
which kernels it must launch, and the chunk and block sizes are set small so that the grids
have several blocks and the ops several chunks. The one kernel that adds with float atomics
(the TripletMarginLoss backward with smooth_loss) is compared to rounding instead.

Emulator only: on a GPU the order is the hardware's (test_deterministic.py's GPU tests)."""
import os
import re

import pytest
import torch

import metrix_ops as mo
from cases import assert_same_run, listed_pairs
from cuda_emu.plugin import emulating
from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not (_ext.HAS_CUDA_EXT and emulating()),
                                reason="the launch order is the emulator's (a GPU has its own)")

L, mi = mo.losses, mo.miners
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDERS = ["reverse", "shuffle:1", "shuffle:2"]


class _RowStats(torch.nn.Module):
    """mo.ops.sim_row_stats (the similarity rows' max, argmax and log-sum-exp) as a loss."""

    def forward(self, x, labels, ref_emb, ref_labels):
        mx, arg, lse = mo.ops.sim_row_stats(x, ref_emb, 3.0, 16)
        return mx.sum() + lse.sum() + 1e-3 * arg.sum()


def _refs(x, y, g):
    r = torch.randn(53, x.shape[1], dtype=x.dtype, generator=g)
    return {"ref_emb": r, "ref_labels": torch.randint(0, 13, (53,), generator=g)}


def _pairs(x, y, g):
    return {"indices_tuple": listed_pairs(y, g, 300)}


def _ee():
    return mo.Expansion(n_points=3)


def _metrix():
    return mo.Metrix(weight=0.4)


PAIR = {"init_states_kernel", "fold_rows_kernel", "grad_entries_kernel"}  # cuda/pair_rows.cuh
SELF = PAIR | {"fold_cols_kernel", "merge_cols_kernel", "grad_diag_kernel"}  # S's symmetric blocks
MIX = {"mix_fold_kernel", "mix_grad_anchor_kernel", "mix_grad_positive_kernel"}  # metrix_rows.cuh
EE = {"weights_kernel", "tg_kernel", "du_kernel", "qnorm_kernel", "side_fold_kernel",
      "norms_kernel", "seg_coef_kernel", "norm_rows_kernel"}  # ee_losses_cuda.cu
TRIPLET = {"fwd_rows_kernel", "grad_neg_kernel", "grad_pos_kernel"}  # triplet_cuda.cu
ATOMICS = {"triplet-semihard-smooth"}  # its backward adds with float atomics
# Kernels that take one block at this size: a thread per row or column of the batch (100 <
# their 256 threads), each writing its own entries; the reversed and shuffled threads are
# their check. Every other kernel must run on several blocks in each case that lists it.
ONE_BLOCK = {"init_states_kernel", "init_kernel", "merge_cols_kernel", "qnorm_kernel",
             "pos_fold_kernel", "partner_shares_kernel"}


def _per_row(kernel):
    return kernel in ONE_BLOCK or kernel.endswith(("finish", "finish_kernel"))


def _cuda(loss, **kw):
    return lambda: getattr(L, loss)(backend="cuda", **kw)


def _semihard():
    return mi.TripletMarginMiner(type_of_triplets="semihard")


# name: (make the loss, the call's extra arguments' maker, the kernels it must launch)
CASES = {
    "ms": (_cuda("MultiSimilarityLoss"), None, SELF | {"ms_finish_kernel"}),
    "ms-refs": (_cuda("MultiSimilarityLoss"), _refs, PAIR | {"ms_finish_kernel"}),
    "ms-miner": (_cuda("MultiSimilarityLoss", miner=mi.MultiSimilarityMiner()), None,
                 SELF | {"bounds_finish_kernel", "mined_finish_kernel"}),
    "ms-metrix": (_cuda("MultiSimilarityLoss", metrix=_metrix()), None,
                  PAIR | MIX | {"ms_finish_kernel", "ms_mix_finish_kernel"}),
    "ms-metrix-refs": (_cuda("MultiSimilarityLoss", metrix=_metrix()), _refs,
                       PAIR | {"mix_fold_kernel", "mix_grad_anchor_kernel",
                               "ms_mix_finish_kernel"}),
    "ms-ee": (_cuda("MultiSimilarityLoss", expansion=_ee()), None, EE | {"lse_terms_kernel"}),
    "contrastive": (_cuda("ContrastiveLoss"), None, SELF | {"con_finish_kernel"}),
    "contrastive-refs": (_cuda("ContrastiveLoss"), _refs, PAIR | {"con_finish_kernel"}),
    "contrastive-pairs": (_cuda("ContrastiveLoss"), _pairs,
                          {"pair_sims_kernel", "bucket_sum_kernel"}),
    "contrastive-metrix": (_cuda("ContrastiveLoss", metrix=_metrix()), None,
                           PAIR | MIX | {"con_finish_kernel", "con_mix_finish_kernel"}),
    "circle": (_cuda("CircleLoss"), None, SELF | {"two_side_finish_kernel"}),
    "circle-metrix": (_cuda("CircleLoss", metrix=_metrix()), None,
                      SELF | MIX | {"two_side_finish_kernel", "lse_finish_kernel"}),
    "gen-lifted-metrix": (_cuda("GeneralizedLiftedStructureLoss", metrix=_metrix()), None,
                          SELF | MIX | {"two_side_finish_kernel", "lse_finish_kernel"}),
    "gen-lifted-ee": (_cuda("GeneralizedLiftedStructureLoss", expansion=_ee()), None,
                      EE | {"lse_terms_kernel"}),
    "lifted": (_cuda("LiftedStructureLoss"), None,
               PAIR | {"two_side_finish_kernel", "lifted_pos_fwd_kernel",
                       "lifted_pos_bwd_kernel", "partner_shares_kernel"}),
    "lifted-ee": (_cuda("LiftedStructureLoss", expansion=_ee()), None, EE | {"lse_terms_kernel"}),
    "npairs-ee": (_cuda("NPairsLoss", expansion=_ee()), None, EE | {"lse_terms_kernel"}),
    "ntxent": (_cuda("NTXentLoss"), None, SELF | {"ntx_neg_finish", "sum_count_finish"}),
    "supcon": (_cuda("SupConLoss"), None, SELF | {"supcon_finish"}),
    "triplet": (_cuda("TripletMarginLoss"), None, TRIPLET),
    "triplet-semihard": (_cuda("TripletMarginLoss", miner=_semihard()), None, TRIPLET),
    "triplet-semihard-smooth": (_cuda("TripletMarginLoss", miner=_semihard(), smooth_loss=True),
                                None, TRIPLET),
    "triplet-ee": (_cuda("TripletMarginLoss", expansion=_ee()), None,
                   EE | {"trip_terms_kernel", "pos_fold_kernel"}),
    "hphn": (_cuda("HPHNTripletLoss"), None, {"pick_rows_kernel"}),
    "hphn-ee": (_cuda("HPHNTripletLoss", expansion=_ee()), None,
                {"pick_rows_kernel", "point_mine_kernel"}),
    "proxy-anchor": (_cuda("ProxyAnchorLoss", num_classes=41, embedding_size=12), None,
                     PAIR | {"pa_finish_kernel"}),
    "proxy-anchor-metrix": (_cuda("ProxyAnchorLoss", num_classes=41, embedding_size=12,
                                  metrix=_metrix()), None,
                            PAIR | {"pa_finish_kernel", "pa_fold_kernel", "dsp_kernel",
                                    "gram_grad_kernel"}),
    "proxy-nca": (_cuda("ProxyNCALoss", num_classes=41, embedding_size=12), None,
                  PAIR | {"nca_finish_kernel"}),
    "proxy-nca-metrix": (_cuda("ProxyNCALoss", num_classes=41, embedding_size=12,
                               metrix=_metrix()), None,
                         PAIR | {"nca_finish_kernel", "nca_fwd_kernel", "nca_lse_kernel",
                                 "dsp_kernel", "gram_grad_kernel"}),
    "row-stats": (_RowStats, _refs, {"init_kernel", "fold_chunk_kernel", "finish_kernel"}),
}


def _kernels_in_sources():
    names = set()
    for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")):
        with open(os.path.join(ROOT, "csrc", "cuda", f)) as src:
            names |= set(re.findall(r"__global__\s+void\s+(\w+)", src.read()))
    return names


def _inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(100, 12, dtype=torch.float64, generator=g)
    y = torch.randint(0, 13, (100,), generator=g)
    x[17] = x[4]  # a duplicate row
    y[30] = 40  # a row without positives
    return x, y, g


def _run(case, monkeypatch, tmp_path, order):
    make, extra, _ = CASES[case]
    log = tmp_path / f"launches-{order}.txt"
    monkeypatch.setenv("EMU_LAUNCH_LOG", str(log))
    monkeypatch.setenv("EMU_ORDER", order)
    x, y, g = _inputs()
    torch.manual_seed(3)  # the same proxies and Metrix draws in every order
    loss_fn = make().cuda()
    kwargs = extra(x, y, g) if extra else {}
    kwargs = {k: tuple(t.cuda() for t in v) if isinstance(v, tuple) else v.cuda()
              for k, v in kwargs.items()}
    xx = x.cuda().requires_grad_()
    value = loss_fn(xx, y.cuda(), **kwargs)
    value.backward()
    grads = [xx.grad.cpu()] + [p.grad.cpu() for p in loss_fn.parameters()]
    launched = {}  # kernel: the most blocks of its launches
    for line in (log.read_text().splitlines() if log.exists() else []):
        name, gx, gy, gz = line.split()[:4]  # (then the block's sizes)
        launched[name] = max(launched.get(name, 0), int(gx) * int(gy) * int(gz))
    return value.detach().cpu(), grads, launched


@pytest.fixture
def small_blocks(monkeypatch):
    """Several blocks per op: the self ops' block rows, the Metrix and EE class chunks."""
    from metrix_ops.fused import cuda_ee_losses, cuda_metrix, cuda_metrix_refs
    from metrix_ops.fused import multi_similarity
    monkeypatch.setattr(multi_similarity, "CUDA_SELF_BLOCK", 48)
    monkeypatch.setattr(cuda_metrix, "CHUNK", 24)
    monkeypatch.setattr(cuda_metrix_refs, "CHUNK", 24)
    monkeypatch.setattr(cuda_ee_losses, "GPU_CHUNK", 24)


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_do_not_depend_on_the_launch_order(case, small_blocks, monkeypatch, tmp_path):
    v0, g0, launched = _run(case, monkeypatch, tmp_path, "forward")
    assert torch.isfinite(v0) and v0.item() != 0.0
    want = CASES[case][2]
    assert want <= launched.keys(), f"{case}: not launched: {want - launched.keys()}"
    one_block = {k for k in want if launched[k] == 1 and not _per_row(k)}
    assert not one_block, f"{case}: on one block only: {one_block}"
    for order in ORDERS:
        v, g, again = _run(case, monkeypatch, tmp_path, order)
        assert again == launched
        # the atomics' order changes their sums' rounding, not more
        assert_same_run(f"{case} under {order}", (v, g), (v0, g0),
                        1e-12 if case in ATOMICS else None)


def test_cases_launch_every_kernel():
    covered = set().union(*(c[2] for c in CASES.values()))
    assert covered == _kernels_in_sources()
