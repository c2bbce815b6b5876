"""Triton building blocks every loss kernel uses: a similarity tile by tl.dot, streamed over
the feature dimension, and the gradient product of a G tile with a block of rows.

Accumulation is in ACC (tl.float32, or tl.float64 for fp64 inputs). PRECISION is tl.dot's
input_precision: "ieee" for exact fp32 (what the tests compare against), "tf32" where torch
allows TF32 for matmuls (torch.backends.cuda.matmul.allow_tf32)."""
from __future__ import annotations

import torch

from ..fused.raw_l2 import raw_zero_eps  # noqa: F401 (the kernels' threshold, raw_table)
from .launch import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def load_rows(ptr, offs, n, offs_d, D, stride):
        """Rows `offs` (< n) of a row-major matrix, feature columns `offs_d` (< D); 0 outside."""
        mask = (offs[:, None] < n) & (offs_d[None, :] < D)
        return tl.load(ptr + offs[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)

    @triton.jit
    def sim_tile(a_ptr, b_ptr, offs_m, offs_n, n_a, n_b, D, stride_a, stride_b,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 ACC: tl.constexpr, PRECISION: tl.constexpr):
        """S = A[offs_m] · B[offs_n]ᵀ (BLOCK_M×BLOCK_N, in ACC); rows out of range give 0."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            a = load_rows(a_ptr, offs_m, n_a, offs_d, D, stride_a)
            b = load_rows(b_ptr, offs_n, n_b, offs_d, D, stride_b)
            acc += tl.dot(a, tl.trans(b), input_precision=PRECISION, out_dtype=ACC)
        return acc

    @triton.jit
    def add_tile_product(acc, g, b_ptr, offs, n_b, D, stride_b, BLOCK_DO: tl.constexpr,
                         PRECISION: tl.constexpr):
        """acc + g · B[offs] over the whole (padded) feature width BLOCK_DO ≥ D: the gradient
        products dX += G R (g a G tile) and dR += Gᵀ X (g = tl.trans of a G tile)."""
        b = load_rows(b_ptr, offs, n_b, tl.arange(0, BLOCK_DO), D, stride_b)
        return tl.dot(g.to(b.dtype), b, acc, input_precision=PRECISION, out_dtype=acc.dtype)

    @triton.jit
    def raw_unit_sims(s, raw_ptr, offs_m, offs_n, n_a, n_b):
        """The products s = a_i·b_j of rows of any norm rewritten as the similarity unit rows
        would have at the same L2 distance, 1 − d²/2 with d² = ‖a_i‖² + ‖b_j‖² − 2s, so that
        a unit-row loss reads the raw rows' distances (the CPU ops' raw_to_unit_sims).
        raw_ptr: raw_table's squared norms of A (n_a), of B (n_b), then eps; d² below
        eps·max(‖a_i‖², ‖b_j‖²) is rounding (it scales with the norms) and is taken as 0,
        so coincident rows get d = 0 as exact differences give."""
        na = tl.load(raw_ptr + offs_m, mask=offs_m < n_a, other=0.0)
        nb = tl.load(raw_ptr + n_a + offs_n, mask=offs_n < n_b, other=0.0)
        eps = tl.load(raw_ptr + n_a + n_b)
        q = (na[:, None] + nb[None, :]) - 2.0 * s
        return tl.where(q > eps * tl.maximum(na[:, None], nb[None, :]), 1.0 - 0.5 * q, 1.0)

    @triton.jit
    def minus_radial(acc, gsum, v_ptr, offs, N, D, stride, BLOCK_DO: tl.constexpr,
                     ACC: tl.constexpr):
        """acc − gsum · v for a program's rows `offs` of v (N × D): the part of a gradient in
        raw rows that comes through their own squared norms. With s̃_ij = 1 − d²_ij/2 (or
        −d_ij), ∂s̃_ij/∂v_i = v_j − v_i: the products G V give the v_j parts, this the
        −(Σ_j G_ij)·v_i ones (unit rows lose them in the normalisation's backward)."""
        offs_d = tl.arange(0, BLOCK_DO)
        mask = (offs[:, None] < N) & (offs_d[None, :] < D)
        v = tl.load(v_ptr + offs.to(tl.int64)[:, None] * stride + offs_d[None, :], mask=mask,
                    other=0.0)
        return acc - gsum[:, None] * v.to(ACC)

    @triton.jit
    def count_true(mask, axis: tl.constexpr):
        """The number of true entries of `mask` along `axis`, int32. Summed in fp32 (exact:
        a tile has far fewer than 2^24 entries): triton 3.2's interpreter keeps the sum of an
        int32 tile in int64 (numpy's sum) under the int32 type, and its store then writes 8
        bytes per 4-byte element, past the buffer's end."""
        return tl.sum(mask.to(tl.float32), axis).to(tl.int32)

    @triton.jit
    def pair_masks(offs_m, offs_n, lab_m, lab_n, n_a, n_b, EXCLUDE_DIAG: tl.constexpr):
        """(positive, negative) pair masks of a tile from the rows' and columns' labels; pairs
        outside the matrix, and with EXCLUDE_DIAG the self pairs (row i, column i), are in
        neither."""
        valid = (offs_m[:, None] < n_a) & (offs_n[None, :] < n_b)
        if EXCLUDE_DIAG:
            valid = valid & (offs_m[:, None] != offs_n[None, :])
        # (!= rather than ~(==): triton 3.2's interpreter cannot invert a bool tile)
        return (valid & (lab_m[:, None] == lab_n[None, :]),
                valid & (lab_m[:, None] != lab_n[None, :]))


def acc_dtype(dtype: torch.dtype):
    """The tl accumulation type of an input dtype (halves are cast to fp32 before any op)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def sq_norms(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The rows' squared norms in the accumulation type, x's then r's (one vector; r may be
    x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    nx = x.to(acc).pow(2).sum(1)
    return torch.cat([nx, nx if r is x else r.to(acc).pow(2).sum(1)])


def raw_table(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """What raw_unit_sims reads: the squared norms of x, of r (r may be x: its norms twice),
    then the zero threshold raw_zero_eps, in the accumulation type."""
    nrm = sq_norms(x, r)
    return torch.cat([nrm, nrm.new_full((1,), raw_zero_eps(x))])


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
