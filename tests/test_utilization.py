import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

import metrix_ops as mo


@pytest.mark.parametrize("nq,nx,d,chunk", [(1, 1, 3, 4), (17, 29, 5, 4), (64, 7, 11, 100)])
def test_utilization_matches_sklearn_nearest_neighbour(nq, nx, d, chunk):
    g = torch.Generator().manual_seed(nq + nx)
    q = torch.randn(nq, d, generator=g, dtype=torch.float64)
    x = torch.randn(nx, d, generator=g, dtype=torch.float64)
    dist, _ = NearestNeighbors(n_neighbors=1).fit(x.numpy()).kneighbors(q.numpy())
    expected = float(np.mean(dist[:, 0] ** 2))
    got = mo.metrics.utilization(q, x, chunk=chunk)
    assert got.dtype == torch.float64
    assert abs(float(got) - expected) <= 1e-9 * max(1.0, expected)


def test_utilization_zero_when_test_points_are_training_points():
    x = torch.randn(9, 4)
    assert float(mo.metrics.utilization(x[::2].clone(), x)) == pytest.approx(0.0, abs=1e-5)


def test_utilization_bad_input():
    with pytest.raises(ValueError, match="train_embeddings"):
        mo.metrics.utilization(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="test_embeddings"):
        mo.metrics.utilization(torch.randn(0, 4), torch.randn(3, 4))
