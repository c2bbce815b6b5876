"""What the tests of the L2 of unnormalised rows share (test_raw_l2.py on the CPU engine,
test_triton_raw_l2.py on the Triton engine): the losses with margins for rows of norm
~3√D, the distance, a loss of ours on it, a shared case scaled to that norm, and the check
of coincident rows against exact differences."""
import torch

import metrix_ops as mo
from cases import assert_close_vg, make_case

# (loss, its hyper-parameters, power): margins scaled to distances of rows of norm ~√D·3
LOSSES = [
    ("ContrastiveLoss", {}, 1),
    ("ContrastiveLoss", {"pos_margin": 0.5, "neg_margin": 6.0}, 1),
    ("ContrastiveLoss", {"pos_margin": 1.0, "neg_margin": 30.0}, 2),
    ("LiftedStructureLoss", {"neg_margin": 6.0}, 1),
    ("GeneralizedLiftedStructureLoss", {"pos_margin": 1.0, "neg_margin": 6.0}, 1),
    ("TripletMarginLoss", {}, 1),
    ("TripletMarginLoss", {"margin": 2.0}, 1),
    ("TripletMarginLoss", {"margin": 8.0}, 2),
]


def loss_ids(losses):
    return [f"{n}-{i}" for i, (n, _, _) in enumerate(losses)]


def raw(lib, power):
    """The L2 (power 1) or squared L2 (power 2) of rows as they are, ours or PML's."""
    return lib.LpDistance(normalize_embeddings=False, power=power)


def ours_on(default_backend):
    """ours(name, kw, power, backend=default_backend, **extra): loss `name` of ours on the
    distance `raw(mo.distances, power)`."""
    def ours(name, kw, power, backend=default_backend, **extra):
        return getattr(mo.losses, name)(distance=raw(mo.distances, power), backend=backend,
                                        **kw, **extra)
    return ours


def scaled_case(case, dtype=torch.float64, seed=0):
    """A shared case with rows of norm ~3√D, as an unnormalised embedding has."""
    x, y = make_case(case, dtype, seed)
    return (3 * x.detach()).requires_grad_(), y


def rows_past_cdist_switch(seed):
    """(x, y, r, ry): fp32 rows of norm ~3√D, 53 and 37 of them (past the 25 rows a side
    below which torch.cdist, and so PML, takes exact differences), labels of 6 classes."""
    g = torch.Generator().manual_seed(seed)
    x, y = 3 * torch.randn(53, 19, generator=g), torch.randint(0, 6, (53,), generator=g)
    r, ry = 3 * torch.randn(37, 19, generator=g), torch.randint(0, 6, (37,), generator=g)
    return x, y, r, ry


class DirectL2(mo.distances.LpDistance):
    """The L2 of exact row differences (torch.cdist's direct path at every size): the oracle
    for coincident rows past 25 rows, where PML's own cdist gives them rounding noise."""

    def compute_mat(self, q, r):
        return torch.cdist(q, r, p=self.p, compute_mode="donot_use_mm_for_euclid_dist")


# the losses whose kernels read raw rows as 1 − d²/2 with a zero threshold scaled by the
# norms, at pos_margin 0 where any noise in a coincident pair's distance is a counted term
COINCIDENT = [
    ("ContrastiveLoss", {"pos_margin": 0.0, "neg_margin": 6.0}, 1),
    ("ContrastiveLoss", {"pos_margin": 0.5, "neg_margin": 6.0}, 1),
    ("ContrastiveLoss", {"pos_margin": 0.0, "neg_margin": 30.0}, 2),
    ("GeneralizedLiftedStructureLoss", {"pos_margin": 0.0, "neg_margin": 6.0}, 1),
    ("LiftedStructureLoss", {"pos_margin": 0.0, "neg_margin": 6.0}, 1),
    # the all-triplets ops: d from the norms (power 1); power 2 through the cosine keys
    # (read as 1 − d²/2: Triton from the norms, the CPU from cdist's d)
    ("TripletMarginLoss", {"margin": 4.0}, 1),
    ("TripletMarginLoss", {"margin": 8.0}, 2)]
# ... and against references (the CPU's general ops; LiftedStructure's Triton kernel takes
# no references: test_triton_raw_l2 leaves it out)
REFS = list(COINCIDENT)


def check_coincident_rows(loss, name, kw, power, dim, device="cpu", refs=False):
    """`loss` (ours, on raw L2) of fp32 rows of norm ~2.5√D, 41 of them (past cdist's switch)
    with three rows coincident with others, against the reference on exact differences
    (DirectL2) in fp64: values and gradients. refs: against references, rows 10..39 of the
    batch as a separate tensor (each coincides with its batch row) and three more rows."""
    g = torch.Generator().manual_seed(power + len(name) + dim)
    x = 10 * torch.randn(41, dim, generator=g)
    y = torch.randint(0, 5, (41,), generator=g)
    x[7], x[20], x[33] = x[3], x[3], x[12]
    y[7], y[20], y[33] = y[3], y[3], y[12]
    oracle = getattr(mo.losses, name)(
        distance=DirectL2(normalize_embeddings=False, power=power), backend="reference", **kw)
    x, y = x.to(device), y.to(device)
    if not refs:
        assert_close_vg(lambda e: loss(e, y).double().cpu(),
                        lambda e: oracle(e.double().cpu(), y.cpu()), x, rtol=2e-5, atol=1e-5)
        return
    r = torch.cat([x[10:40], 10 * torch.randn(3, dim, generator=g).to(device)])
    ry = torch.cat([y[10:40], torch.randint(0, 5, (3,), generator=g).to(device)])
    assert_close_vg(lambda e, q: loss(e, y, ref_emb=q, ref_labels=ry).double().cpu(),
                    lambda e, q: oracle(e.double().cpu(), y.cpu(), ref_emb=q.double().cpu(),
                                        ref_labels=ry.cpu()),
                    x, r, rtol=2e-5, atol=1e-5)
