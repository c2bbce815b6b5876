"""The loss-level checks of Embedding Expansion for MultiSimilarity, LiftedStructure,
GeneralizedLiftedStructure, NPairs and TripletMargin that the GPU engines share
(test_triton_ee_losses.py, test_cuda_ee_losses.py): an engine's loss against the reference on
the shared edge cases, over n, pairs and distances, reducers and hyper-parameters, fp32 and
half. `to_dev` moves the inputs to the engine's device (leaves stay leaves)."""
import torch

import metrix_ops as mo
from cases import assert_close_vg, assert_float32_and_bf16, make_case
from metrix_ops.distances import CosineSimilarity, DotProductSimilarity, LpDistance
from metrix_ops.reducers import AvgNonZeroReducer, MeanReducer, SumReducer
from test_expansion import assert_close_up_to_ties
from test_fused_hphn_cpu import batch

LOSSES = ["MultiSimilarityLoss", "LiftedStructureLoss", "GeneralizedLiftedStructureLoss",
          "NPairsLoss", "TripletMarginLoss"]
SIM = {"NPairsLoss": DotProductSimilarity}
HYPER = {"MultiSimilarityLoss": {"alpha": 5.0, "beta": 80.0, "base": 0.9},
         "GeneralizedLiftedStructureLoss": {"neg_margin": 2.5, "pos_margin": 0.2},
         "TripletMarginLoss": {"margin": 0.3, "smooth_loss": True}}


def dists(name):
    return [SIM.get(name, CosineSimilarity), LpDistance]


def pair(backend, name, n, pairs="all", dist=None, **kw):
    """(engine, reference) losses of class `name` with Expansion(n, pairs)."""
    ee = mo.Expansion(n_points=n, pairs=pairs)
    extra = dict(kw, **({} if dist is None else {"distance": dist()}))
    return [getattr(mo.losses, name)(backend=be, expansion=ee, **extra)
            for be in (backend, "reference")]


def check_shared_case(backend, to_dev, name, case):
    # duplicate rows make a segment's points coincide with its ends: ŝ ties between them,
    # and which one takes the gradient depends on the last bit of each engine's arithmetic;
    # any split among the duplicates is a valid subgradient, so those are compared per group
    x, y = to_dev(*make_case(case))
    eng, ref = pair(backend, name, 2)
    assert_close_up_to_ties(lambda e: eng(e, y), lambda e: ref(e, y), x, case[0])


def check_distances_and_pairs(backend, to_dev, name, n, pairs):
    x, y = to_dev(*batch(20, 9, 5, seed=n, contiguous=pairs == "adjacent"))
    for dist in dists(name):
        eng, ref = pair(backend, name, n, pairs, dist)
        assert_close_vg(lambda e: eng(e, y), lambda e: ref(e, y), x)


def check_reducers_and_hyper_parameters(backend, to_dev, name):
    x, y = to_dev(*batch(22, 8, 4, seed=6))
    for reducer in (SumReducer, AvgNonZeroReducer, MeanReducer):
        eng, ref = pair(backend, name, 2, reducer=reducer(), **HYPER[name])
        assert_close_vg(lambda e: eng(e, y), lambda e: ref(e, y), x)


def check_labels(backend, to_dev, labels, n=1, name="MultiSimilarityLoss"):
    """A batch of the given labels (shuffled), values and gradients."""
    y = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    x, _ = batch(len(y), 5, 1, seed=8)
    x, y = to_dev(x, y)
    eng, ref = pair(backend, name, n)
    assert_close_vg(lambda e: eng(e, y), lambda e: ref(e, y), x)


def check_float32_and_half(backend, to_dev, name):
    x, y = to_dev(*batch(21, 16, 4, seed=2))
    eng, ref = pair(backend, name, 2)
    assert_float32_and_bf16(lambda e: eng(e, y), lambda e: ref(e, y), x)
