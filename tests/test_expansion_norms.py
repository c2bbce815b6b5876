"""The norms of an expansion's points that the GPU engines' HPHN mining divides by
(fused/hphn_triplet.expansion_norms, three row dots per segment): bit for bit the values of
each point's own gathered rows (the form it replaced, two P × D stacks, written out here), and
close to the reference's (reference/expansion_points.PointMetric, from the Gram matrix), in
every dtype, with duplicate and antipodal rows (a segment through the origin: the clamp)."""
import pytest
import torch
import torch.nn.functional as F

from metrix_ops.fused.hphn_triplet import expansion_norms
from metrix_ops.distances import CosineSimilarity
from metrix_ops.ops.ee_mining import all_segments
from metrix_ops.reference.expansion_points import (PointMetric, expansion_segments,
                                                   points_on_segments)


def _dot(a, b):
    return (a * b).sum(1)


def gathered_norms(xu, u, w, lam):
    """‖λ x̂_u + (1−λ) x̂_w‖ per point from its two gathered rows, in the association the
    mining has always used; exactly 1 for an original (u = w)."""
    pu, pw = xu.index_select(0, u), xu.index_select(0, w)
    sq = (lam * (lam * _dot(pu, pu) + (1 - lam) * _dot(pu, pw))
          + (1 - lam) * (lam * _dot(pw, pu) + (1 - lam) * _dot(pw, pw)))
    return torch.where(u == w, torch.ones_like(sq), sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt())


def _points(b, d, n, pairs, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    if b >= 6:
        x[3], x[5] = x[2], -x[4]  # a duplicate and an antipodal pair
    x = x.to(dtype)
    if pairs == "all":
        y = torch.randint(0, max(1, b // 4), (b,), generator=g)
        if b >= 6:  # the duplicate pair is a segment, and so is the antipodal one
            y[2], y[3], y[4], y[5] = 0, 0, 1, 1
        seg = all_segments(y) if n > 0 else (y.new_empty(0), y.new_empty(0))
    else:
        y = torch.arange(b) // 2
        seg = expansion_segments(y, "adjacent")
    return x, y, points_on_segments(y, n, *seg)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16,
                                   torch.float16])
@pytest.mark.parametrize("b,d,n,pairs", [(30, 17, 8, "all"), (12, 5, 1, "all"),
                                         (20, 9, 3, "adjacent"), (9, 4, 0, "all"),
                                         (1, 3, 2, "all"), (0, 3, 2, "all")])
def test_bit_for_bit_with_gathered_rows(b, d, n, pairs, dtype):
    for seed in range(3):
        x, _, pts = _points(b, d, n, pairs, seed, dtype)
        lam = pts.lam.to(dtype)
        got = expansion_norms(x, pts, lam)
        assert got.dtype == dtype and got.shape == (pts.size,)
        assert torch.equal(got, gathered_norms(x, pts.u, pts.w, lam))


@pytest.mark.parametrize("n,pairs", [(8, "all"), (2, "adjacent")])
def test_close_to_reference_point_metric(n, pairs):
    x, _, pts = _points(40, 33, n, pairs, 0, torch.float64)
    ref = PointMetric(x, pts, True, CosineSimilarity()).scale
    torch.testing.assert_close(expansion_norms(x, pts, pts.lam), ref, rtol=1e-12, atol=1e-12)
