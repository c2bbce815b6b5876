"""backend="cuda": ProxyAnchorLoss and ProxyNCALoss with their embedding-level Metrix term
(any `pairs`): the CPU glue (fused/proxy_metrix.py) as is, its two ops dispatched by device
to their CUDA implementations (csrc/cuda/proxy_metrix_cuda.cu, the CPU ops' schemas), the Gram
rows streamed in blocks of about GPU_BLOCK entries (the CPU's 2^20 would leave a GPU idle)."""
from __future__ import annotations

from .. import _ext
from ..ops.proxy_metrix import proxy_anchor_metrix_terms, proxy_nca_metrix_rows
from . import proxy_anchor, proxy_metrix, proxy_nca, register_metrix


HAS_PROXY = (_ext.has_cuda_kernel("proxy_anchor_metrix_fwd")
             and _ext.has_cuda_kernel("proxy_nca_metrix_fwd"))
GPU_BLOCK = 1 << 24  # Gram entries per block: 64 MiB in fp32, whatever the batch


def gpu_chunk(batch: int) -> int:
    """Gram rows per block for a batch of `batch` rows."""
    return max(1, GPU_BLOCK // max(batch, 1))


def anchor_terms_cuda(x_unit, p_unit, labels, alpha, margin, lam, same_label, chunk=None):
    chunk = gpu_chunk(x_unit.shape[0]) if chunk is None else chunk
    return proxy_anchor_metrix_terms(x_unit, p_unit, labels, alpha, margin, lam, same_label,
                                     chunk)


def nca_rows_cuda(x_unit, p_unit, labels, scale, kind, lam, same_label, chunk=None):
    chunk = gpu_chunk(x_unit.shape[0]) if chunk is None else chunk
    return proxy_nca_metrix_rows(x_unit, p_unit, labels, scale, kind, lam, same_label, chunk)


def _on_cuda(supports):
    def cuda_supports(params, inp, expansion, metrix) -> bool:
        return (HAS_PROXY and inp.embeddings.device.type == "cuda"
                and supports(params, inp, expansion, metrix))
    return cuda_supports


def anchor_impl(params, inp, reducer, metrix, lam: float):
    # module globals looked up per call: tests count the calls by patching them
    mixed = proxy_metrix.anchor_mixed(params, inp, metrix.pairs, lam, terms_fn=anchor_terms_cuda)
    return proxy_anchor.impl(params, inp, reducer) + metrix.weight * mixed


def nca_impl(params, inp, reducer, metrix, lam: float):
    mixed = proxy_metrix.nca_mixed(params, inp, metrix.pairs, lam, rows_fn=nca_rows_cuda)
    return proxy_nca.impl(params, inp, reducer) + metrix.weight * mixed


register_metrix("cuda", "ProxyAnchorLoss", _on_cuda(proxy_metrix.anchor_supports), anchor_impl)
register_metrix("cuda", "ProxyNCALoss", _on_cuda(proxy_metrix.nca_supports), nca_impl)
