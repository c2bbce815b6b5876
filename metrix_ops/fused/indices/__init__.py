"""Fused CPU ops for calls with an indices_tuple (registered with fused.register_indices):
the loss over the listed pairs or triplets only, from the listed pairs' similarities
(ops/pair_sims.py), never a B×M matrix. One module per family of PML semantics:
pair_lists (a pair listed twice is two terms), anchor_masks (the pairs as a mask: once),
triplet, npairs; proxies (ProxyNCA's per-example weights).

A tuple that lists a large share of all B×M pairs (a miner that keeps most of them) goes to
the reference instead: one BLAS product then beats P per-pair dot products (the pair path
measured about 4× slower on a near-complete tuple), and the reference's B×M matrices are no
larger, in order, than the tuple the caller already holds."""
from ...reducers import reduce_loss_dict
from ...spec import get_spec
from .. import INDICES_IMPLS
from . import anchor_masks, npairs, pair_lists, proxies, triplet  # importing registers them

__all__ = ["anchor_masks", "npairs", "pair_lists", "proxies", "triplet", "DENSE_FRACTION"]

# listed entries / (B·M) from which the dense (reference) computation runs
DENSE_FRACTION = 0.25


def listed_entries(indices_tuple) -> int:
    """Pairs a tuple lists: a1 and a2 for (a1, p, a2, n); the triplets' two pairs each."""
    if len(indices_tuple) == 4:
        return len(indices_tuple[0]) + len(indices_tuple[2])
    return 2 * len(indices_tuple[0])


def _dense_aware(name, impl):
    def run(params, inp, reducer, **kw):
        x, refs = inp.embeddings, inp.ref_emb
        if listed_entries(inp.indices_tuple) >= DENSE_FRACTION * len(x) * len(refs) > 0:
            return reduce_loss_dict(get_spec(name).loss_dict(inp, **params), reducer, x)
        return impl(params, inp, reducer, **kw)
    return run


# the proxy losses' tuples only weight examples (proxies.py): their ops take no pair list
_WEIGHTS_ONLY = ("ProxyNCALoss", "ProxyAnchorLoss")
for (_backend, _name), (_supports, _impl) in list(INDICES_IMPLS.items()):
    if _backend == "cpu" and _name not in _WEIGHTS_ONLY:
        INDICES_IMPLS[(_backend, _name)] = (_supports, _dense_aware(_name, _impl))
