"""MultiSimilarityLoss through the fused streaming op: the loss's per-anchor terms come
from ms_loss_fwd (no B×M matrix); PML's reducers then apply to them as usual."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from ..distances import is_cosine
from ..ops.ms_loss import ms_loss_rows, ms_loss_rows_self
from ..reducers import reduce_loss_dict
from . import register
from .pair_counts import pair_count_tensors, pair_counts


def supports(params, inp, expansion) -> bool:
    return (_ext.HAS_EXT and expansion is None and inp.indices_tuple is None
            and is_cosine(inp.distance) and inp.labels is not None)


def impl(params, inp, reducer, chunk: int = 2048):
    x = inp.embeddings
    # PML's rule: no loss when no side has two pairs. Eagerly a Python branch (skips the op);
    # under torch.compile a select on the counts, so the graph has no data-dependent branch.
    compiling = torch.compiler.is_compiling()
    if not compiling:
        pos, neg = pair_counts(inp.labels, inp.ref_labels, inp.same_set)
        if pos <= 1 and neg <= 1:
            return torch.sum(x * 0)
    xu = F.normalize(x, dim=1)
    # the batch against itself, self pairs excluded (PML keeps them when ref_labels is another
    # tensor, even with ref_emb the batch): S is symmetric
    if inp.ref_emb is inp.embeddings and inp.same_set:
        rows = ms_loss_rows_self(xu, inp.labels, params["alpha"], params["beta"], params["base"])
    else:
        rows = ms_loss_rows(xu, F.normalize(inp.ref_emb, dim=1), inp.labels, inp.ref_labels,
                            inp.same_set, params["alpha"], params["beta"], params["base"], chunk)
    loss_dict = {"loss": {"losses": rows, "indices": torch.arange(len(rows), device=x.device),
                          "reduction_type": "element"}}
    loss = reduce_loss_dict(loss_dict, reducer, x)
    if compiling:
        pos, neg = pair_count_tensors(inp.labels, inp.ref_labels, inp.same_set)
        loss = torch.where((pos <= 1) & (neg <= 1), torch.sum(x * 0), loss)
    return loss


register("cpu", "MultiSimilarityLoss", supports, impl)
