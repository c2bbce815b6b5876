"""One code path for every loss call: validate, pick the backend, compute the clean (or
expanded) loss, reduce it as PML does, add the Metrix term."""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from . import backend as backend_mod
from . import fused
from .config import Expansion, Metrix
from .distances import (as_distance, cdist_is_direct, is_raw_l2, record_norms, unit_l2_form,
                        wants_norms)
from .fused.pair_counts import pair_count_tensors
from .hyper_checks import check_hyper
from .miners.base import mined_counts, record_counts, stats_distance
from .reducers import ForeignReducer, as_reducer, reduce_loss_dict
from .regularizers import check_regularizer, regularization
from .spec import LossInputs, get_spec
from .validation import check_loss_inputs, compute_dtype, pml_indices, pml_label_pair

class _OnTensorsDevice:
    """Autocast off, and the tensors' CUDA device current (see op_scope)."""

    def __init__(self, t: torch.Tensor):
        self.device = t.device
        self.stack = contextlib.ExitStack()

    def __enter__(self):
        self.stack.enter_context(torch.autocast("cuda", enabled=False))
        self.stack.enter_context(torch.cuda.device(self.device))
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def op_scope(t: torch.Tensor):
    """Where a fused op runs. Autocast is off: the ops compute in the precision of their
    (fp32 or fp64) inputs, and under autocast the products inside them (ATen's mm in the C++
    ops, the glue's PyTorch ops) would come back in half precision and no longer match the
    kernels' types. On a CUDA tensor its device is made current: Triton launches on the
    current device (tensors on cuda:1 while cuda:0 is current would be read through the wrong
    device's context), as the C++ ops' device guard does for theirs. The backward needs no
    guard (autograd's device threads run each device's nodes with it current), nor does a
    compiled graph (Inductor's wrapper sets its device first), where the plain autocast
    object is what Dynamo traces."""
    if t.is_cuda and not torch.compiler.is_compiling():
        return _OnTensorsDevice(t)
    return torch.autocast(t.device.type, enabled=False)


def draw_lam(metrix: Metrix, lam: Optional[float]) -> float:
    """The call's λ, else the config's fixed λ, else one Beta(α, α) draw (global torch RNG)."""
    if lam is None:
        lam = metrix.lam
    if lam is None:
        a = torch.tensor(float(metrix.alpha), dtype=torch.float64)
        return float(torch.distributions.Beta(a, a).sample())
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return lam


def empty_loss(*tensors) -> torch.Tensor:
    """PML's loss of an empty batch or an empty reference set: 0, without a miner, a Metrix
    draw or an op, still attached to the inputs (their gradients are zeros, not None), in
    the embeddings' dtype (fp32 for half inputs, as every loss here)."""
    x = tensors[0]
    zero = x.new_zeros((), dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16)
                       else x.dtype)
    for t in tensors:
        if t is not None:
            zero = zero + t.sum().to(zero.dtype) * 0
    return zero


def needs_reference(name: str, params: dict, reducer, backend: str) -> bool:
    """Whether this call must run on the reference backend (_reference_reason); an explicit
    fused backend refuses it, naming the reason."""
    why = _reference_reason(name, params, as_reducer(reducer))
    if why and backend not in ("auto", "reference"):
        raise NotImplementedError(f"backend={backend!r}: {why}; use backend='auto' or "
                                  "'reference'")
    return bool(why)


def _reference_reason(name: str, params: dict, reducer) -> str:
    """Why this call needs the reference backend ("" when it does not): the fused ops take
    hyper-parameters as constants, so a learned one (a tensor that requires grad: a
    temperature, a margin) would silently get no gradient there; and they reduce with the
    reducers reimplemented here, so another of PML's (a ForeignReducer) needs PML's loss
    dict."""
    learned = sorted(k for k, v in params.items()
                     if k != "proxies" and torch.is_tensor(v) and v.requires_grad)
    if learned:
        return (f"{name}'s {learned} require grad (learned hyper-parameters), which the fused "
                "ops take as constants (the reference differentiates through them, as PML)")
    if isinstance(reducer, ForeignReducer):
        return (f"the reducer {type(reducer.module).__name__} is called on PML's loss dict, "
                "which the reference backend builds")
    return ""


def check_addable(loss, reducer) -> None:
    """The clean loss can take the Metrix term: not a loss dict (PML's DoNothingReducer)."""
    if not torch.is_tensor(loss):
        raise ValueError(f"the reducer ({type(getattr(reducer, 'module', reducer)).__name__}) "
                         "returned the loss dict, to which the Metrix term cannot be added: use "
                         "a reducer that returns the loss, or metrix=None")


def check_options(name: str, params: dict, inp: LossInputs, metrix, expansion) -> None:
    """The Metrix and EE checks that do not depend on the batch's values, which the losses
    run as they build their terms: an empty batch, which builds none, refuses the same
    configurations."""
    if metrix is not None:
        from .reference.metrix import _check_supported
        _check_supported(name, inp)
    if expansion is not None:
        from .reference.expansion import check_expansion
        check_expansion(name, params, inp)


def call_features(params: dict, inp: LossInputs, expansion) -> str:
    """What a call asks of a fused op, for a refusal's message: its distance, hyper-parameters
    and options."""
    d = inp.distance
    shown = ", ".join(f"{a}={getattr(d, a)!r}" for a in ("normalize_embeddings", "p", "power")
                      if hasattr(d, a))
    parts = [f"distance={type(d).__name__}({shown})"]
    parts += [f"{k}={v!r}" for k, v in params.items() if not torch.is_tensor(v)]
    if not inp.same_set:
        parts.append("ref_emb")
    if inp.indices_tuple is not None:
        parts.append("indices_tuple")
    if expansion is not None:
        parts.append(f"expansion={expansion!r}")
    return ", ".join(parts)


def run_loss(name: str, params: dict, embeddings, labels=None, indices_tuple=None,
             ref_emb=None, ref_labels=None, *, embedding_regularizer=None,
             embedding_reg_weight=1, weight_regularizer=None, weight_reg_weight=1,
             **options) -> torch.Tensor:
    """The loss (clean, or with its Metrix term) plus PML's regularization sub-losses
    (`regularizers.regularization`); `options` as `loss_terms`."""
    check_regularizer("embedding_regularizer", embedding_regularizer, embedding_reg_weight)
    check_regularizer("weight_regularizer", weight_regularizer, weight_reg_weight)
    if weight_regularizer is not None and "proxies" not in params:
        raise ValueError(f"weight_regularizer is for the proxy losses (ProxyAnchorLoss, "
                         f"ProxyNCALoss), which have weights; {name} has none")
    distance, miner = options.get("distance"), options.get("miner")
    # the call's inputs as the loss took them (after the miner), for the norm statistics
    seen = {} if wants_norms(distance) or wants_norms(stats_distance(miner)) else None
    loss = loss_terms(name, params, embeddings, labels, indices_tuple, ref_emb, ref_labels,
                      seen=seen, **options)
    if seen:
        record_call_norms(name, params, embeddings, ref_emb, seen["inp"], distance, miner)
    return regularization(loss, embeddings, params.get("proxies"),
                          embedding_regularizer=embedding_regularizer,
                          embedding_reg_weight=embedding_reg_weight,
                          weight_regularizer=weight_regularizer,
                          weight_reg_weight=weight_reg_weight)


# PML's GenericPairLoss subclasses: no distance call where every index list has at most one
# entry (all pairs from the labels, or the tuple's)
PAIR_LOSSES = {"ContrastiveLoss", "MultiSimilarityLoss", "CircleLoss", "NTXentLoss",
               "SupConLoss", "LiftedStructureLoss", "GeneralizedLiftedStructureLoss"}


def calls_distance(name, inp, miner=None):
    """Whether PML's loss calls its distance on this input (it returns its zero losses before
    the call where there is nothing to compute): a bool, or a 0-d bool tensor (no host read).
    A miner that ran inside the fused op left its tuple's sizes as its counts."""
    tup = inp.indices_tuple
    if tup is None and miner is not None:
        triplets, pos, neg = mined_counts(miner)
        if name in PAIR_LOSSES:
            return (torch.as_tensor(pos) > 1) | (torch.as_tensor(neg) > 1)
        return torch.as_tensor(triplets) > 0 if name == "TripletMarginLoss" else True
    if name in PAIR_LOSSES:
        if tup is not None:  # a pair tuple as is, a triplet tuple as (a, p, a, n)
            return any(len(t) > 1 for t in tup)
        pos, neg = pair_count_tensors(inp.labels, inp.ref_labels, inp.same_set)
        return (pos > 1) | (neg > 1)
    if name == "TripletMarginLoss":
        if tup is not None:  # a pair tuple's triplets: anchors with a positive and a negative
            return len(tup[0]) > 0 if len(tup) == 3 else torch.isin(tup[0], tup[2]).any()
        ys = torch.sort(inp.ref_labels).values
        same = torch.searchsorted(ys, inp.labels, right=True) - torch.searchsorted(ys, inp.labels)
        pos = same - 1 if inp.same_set else same
        return ((pos > 0) & (same < len(ys))).any()
    return True


def record_call_norms(name, params, embeddings, ref_emb, inp, distance, miner) -> None:
    """The norm statistics a distance with collect_stats keeps (distances.record_norms) of the
    call PML's loss makes on it: (embeddings, ref_emb or the batch), the proxies as the
    reference for the proxy losses, NPairs' kept anchors and positives; none where PML's loss
    returns before it (calls_distance). A miner's distance: (embeddings, ref_emb or the
    batch). Set after the loss: the fused ops never call the distance, and the reference's
    other calls (Metrix's mixed candidates) are not PML's. The caller's tensors (half
    precision as given), the labels and the index tuple as the loss took them."""
    ref = embeddings if ref_emb is None else ref_emb
    record_norms(stats_distance(miner), embeddings, ref)
    if not wants_norms(distance):
        return
    query = embeddings
    if torch.is_tensor(params.get("proxies")):
        ref = params["proxies"].to(embeddings.dtype)  # PML casts them to the batch's dtype
    elif name == "NPairsLoss":
        from .reference.npairs import unique_label_pos_pairs
        a, p = unique_label_pos_pairs(inp.indices_tuple, inp.labels)
        if len(a) == 0:
            return  # PML's NPairs returns before its distance call
        query, ref = embeddings[a], embeddings[p]
    record_norms(distance, query, ref, when=calls_distance(name, inp, miner))


def pml_exact_where_fused_rounds(name, distance, n_query, n_ref) -> bool:
    """A call of at most 25 rows a side (cdist's direct path: PML computes exact row
    differences) on a distance whose fused form rounds where those are exact:
    - ContrastiveLoss on an L2 (of unit or raw rows): its positive term is d itself at the
      default pos_margin 0, and AvgNonZero counts every d > 0, so a pair closer than ~1e-3
      counts in PML and is d = 0 in the fused ops' √(2 − 2s) (s rounds to 1), which moves
      the mean's divisor, not just a last digit;
    - any loss on the L2 of raw rows: the fused Gram form (fused/raw_l2.py) holds d² to an
      absolute ~ε·‖x‖², so close rows get a distance off PML's exact one (coincident rows
      get 0 under the norm-scaled threshold, rows just past it a noise distance and a 1/d
      gradient of noise).
    "auto" takes the reference for these: PML's numbers, and such small calls gain nothing
    from a fused op. Past 25 rows PML's cdist is the Gram form too, with noise of its own
    for such pairs, which no backend reproduces. Not under torch.compile: the reference's
    pair lists have data-dependent sizes, which a fullgraph trace refuses."""
    if torch.compiler.is_compiling() or not cdist_is_direct(n_query, n_ref):
        return False
    return is_raw_l2(distance) or (name == "ContrastiveLoss" and unit_l2_form(distance))


# the relative error of d² the fused forms of raw L2 may add over the reference's (cdist)
RAW_L2_RTOL = 1e-5


def raw_rows_too_short(name, distance, indices_tuple, miner, longest, dtype) -> bool:
    """Whether a call on the L2 of raw rows has rows too short for the fused forms: they read
    d² through 1 − d²/2 (the pair ops told `raw`, the Triton RAW kernels, the squared
    triplet's cosine keys, fused/raw_l2.py), held to an absolute error of ~ε (the
    accumulation type's), where cdist's is ε·‖x‖². So with every row shorter than
    √(ε / RAW_L2_RTOL) (fp32: 0.11; fp64: 4.7e-6) the fused d² may be off by more than
    RAW_L2_RTOL relative, and "auto" runs the reference (at norm 1e-3 in fp32 a review
    measured gradients off by up to 9 %). Not for TripletMarginLoss on L2 without an
    indices_tuple or a miner: its ops read the norms and products (or cdist) themselves (a
    miner's picks may read 1 − d²/2). longest: the largest row norm of the embeddings and
    references, read with the input checks (None under torch.compile: no rule)."""
    if longest is None or not is_raw_l2(distance):
        return False
    if (name == "TripletMarginLoss" and distance.power == 1 and indices_tuple is None
            and miner is None):
        return False
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return longest < math.sqrt(torch.finfo(acc).eps / RAW_L2_RTOL)


def check_call_kind(name, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """The loss takes this kind of call (ref_emb, an indices_tuple); returns (ref_emb,
    ref_labels), None for the batch itself where the loss takes no references (PML's
    ref_not_supported)."""
    spec = get_spec(name)
    if not spec.supports_ref_emb and ref_emb is embeddings and ref_labels is labels:
        ref_emb = ref_labels = None
    if ref_emb is not None and not spec.supports_ref_emb:
        raise ValueError(f"{name} does not take ref_emb/ref_labels")
    if indices_tuple is not None and not spec.supports_indices_tuple:
        raise ValueError(f"{name} does not take indices_tuple")
    return ref_emb, ref_labels


def loss_terms(name: str, params: dict, embeddings, labels=None, indices_tuple=None,
               ref_emb=None, ref_labels=None, *, distance=None, reducer=None, backend="auto",
               metrix: Optional[Metrix] = None, expansion: Optional[Expansion] = None,
               lam=None, mixed_embeddings=None, mixed=None, miner=None,
               seen: Optional[dict] = None) -> torch.Tensor:
    """The loss without regularizers: validate, pick the backend, the clean (or expanded)
    loss reduced as PML does, plus the Metrix term."""
    spec = get_spec(name)
    check_hyper(name, params)
    if miner is not None:
        if indices_tuple is not None:
            raise ValueError("give either indices_tuple or the loss's miner=, not both (the "
                             "miner= option mines the pairs itself)")
        if expansion is not None:
            raise ValueError("miner= and expansion= do not combine: Embedding Expansion mines "
                             "its own hard negative pairs")
        if not spec.supports_indices_tuple:
            raise ValueError(f"{name} does not take a miner (nor an indices_tuple)")
        if not callable(miner):
            raise TypeError(f"miner must be a miner module (PML's or metrix_ops.miners'), got "
                            f"{type(miner).__name__}")
    ref_emb, ref_labels = check_call_kind(name, embeddings, labels, indices_tuple, ref_emb,
                                          ref_labels)
    if metrix is not None and not isinstance(metrix, Metrix):
        raise TypeError(f"metrix must be metrix_ops.Metrix or None, got {type(metrix).__name__}")
    if expansion is not None and not isinstance(expansion, Expansion):
        raise TypeError(f"expansion must be metrix_ops.Expansion or None, got {type(expansion).__name__}")
    if (mixed_embeddings is None) != (mixed is None):
        raise ValueError("mixed_embeddings and mixed must be given together")
    if mixed is not None and (metrix is None or metrix.level == "embedding"):
        raise ValueError("mixed_embeddings/mixed need metrix=Metrix(level='feature' or 'input')")
    if metrix is not None and metrix.level != "embedding" and mixed is None:
        raise ValueError(f"Metrix(level={metrix.level!r}) needs mixed_embeddings= and mixed= "
                         "(build them with metrix_ops.mixup.mix_pairs)")
    # PML moves the labels to the embeddings' device (and ref_labels to ref_emb's), and takes
    # float labels
    labels, ref_labels = pml_label_pair(labels, ref_labels, embeddings, ref_emb)
    indices_tuple = pml_indices(indices_tuple, embeddings)
    distance = as_distance(distance, spec.default_distance)
    # the fused ops' L2 is √(2 − 2s), true of unit rows only: a zero row (PML's normalize
    # leaves it zero, at distance 1 from every unit row), or one under normalize's eps, is
    # looked for in the NaN check's read
    proxies = params.get("proxies")
    if labels is None:  # an indices_tuple does not say which pairs share a class
        for option, what in ((metrix, "metrix= (Metrix mixes pairs by their labels)"),
                             (expansion, "expansion= (Embedding Expansion interpolates the "
                              "pairs of each class)")):
            if option is not None:
                raise ValueError(f"labels is required with {what}; an indices_tuple alone "
                                 "is not enough")
    zero_row, longest = check_loss_inputs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels,
        labels_required=spec.labels_required or metrix is not None or expansion is not None,
        zero_rows=unit_l2_form(distance), proxies=proxies, longest_rows=is_raw_l2(distance))

    same_set = ref_emb is None or ref_labels is labels
    # labels of any integer dtype are int64 from here on (the ops take int64), keeping PML's
    # `ref_labels is labels` identity
    if labels is not None and labels.dtype != torch.int64:
        wide = labels.long()
        ref_labels = wide if ref_labels is labels else ref_labels
        labels = wide
    if ref_labels is not None and ref_labels.dtype != torch.int64:
        ref_labels = ref_labels.long()
    # half inputs are computed (and the loss returned) in fp32: exp/log-sum-exp terms and
    # means over B² pairs lose too much in 10- or 7-bit mantissas (each tensor on its own:
    # half embeddings against fp32 references, or the reverse, meet in fp32)
    if embeddings.dtype != compute_dtype(embeddings):
        embeddings = embeddings.float()
        if mixed_embeddings is not None:
            mixed_embeddings = mixed_embeddings.float()
    if ref_emb is not None and ref_emb.dtype != compute_dtype(ref_emb):
        ref_emb = ref_emb.float()
    miner_refs = (ref_emb, ref_labels)  # as the caller gave them, for an index-tuple miner
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels
    inp = LossInputs(embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set, distance)
    if seen is not None:
        seen["inp"] = inp
    red = as_reducer(reducer, spec.default_reducer)
    # λ is drawn for the embedding level only: feature/input mixes carry their own λ
    lam_value = draw_lam(metrix, lam) if metrix is not None and metrix.level == "embedding" else None
    chosen = backend_mod.resolve(backend, name, embeddings.device,
                                 embeddings.dtype)  # its errors first
    to_reference = needs_reference(name, params, red, backend)
    if to_reference:
        chosen = "reference"
    if embeddings.shape[0] == 0 or ref_emb.shape[0] == 0:
        check_options(name, params, inp, metrix, expansion)  # refused as on any batch
        if miner is not None:  # PML's miner on an empty batch counts nothing
            record_counts(miner)
        zero = empty_loss(embeddings, ref_emb, params.get("proxies"))
        if isinstance(red, ForeignReducer):  # PML's zero_losses() through its reducer
            return red.reduce_dict({k: {"losses": zero, "indices": None,
                                        "reduction_type": "already_reduced"}
                                    for k in spec.sub_losses}, embeddings, labels, name)
        return zero
    # each engine's op for the call, looked up once: a supports() may read the labels (a host
    # sync on a GPU: Triton EE's class sizes)
    impls = {}

    def impl_of(b):
        if b not in impls:
            impls[b] = fused.impl_for(b, name, params, inp, expansion)
        return impls[b]

    if backend == "auto" and chosen != "reference":
        # the preferred engine may not cover this call's options (a miner, ref_emb, Lp ...)
        # where the next one does: take the first that does
        def covers(b):
            return (fused.miner_supported(b, name, params, inp, miner) if miner is not None
                    else impl_of(b) is not None)

        mixing = lam_value is not None and metrix.weight > 0 and miner is None
        variant = ("miner" if miner is not None else "metrix" if mixing
                   else "expansion" if expansion is not None else "clean")
        order = [b for b in backend_mod.auto_order(name, embeddings.device, variant,
                                                   embeddings.shape[0], embeddings.dtype)
                 if covers(b)]
        if mixing:
            # an engine that fuses the Metrix term too comes first (else that term runs the
            # materialising reference)
            # (a stable partition: torch 2.4's dynamo cannot sort with a key)
            fuses = [fused.metrix_supported(b, name, params, inp, expansion, metrix)
                     for b in order]
            order = ([b for b, f in zip(order, fuses) if f]
                     + [b for b, f in zip(order, fuses) if not f])
        chosen = order[0] if order else chosen
    if backend == "auto" and chosen != "reference" and pml_exact_where_fused_rounds(
            name, distance, embeddings.shape[0], ref_emb.shape[0]):
        chosen = "reference"
    if backend == "auto" and chosen != "reference" and raw_rows_too_short(
            name, distance, indices_tuple, miner, longest, embeddings.dtype):
        chosen = "reference"
    if zero_row and chosen != "reference":
        if backend != "auto":
            raise NotImplementedError(
                f"backend={backend!r}: a row of embeddings, ref_emb or the proxies is all "
                "zeros (its norm is under F.normalize's eps, 1e-12) or so long that its norm "
                f"overflows, and the fused ops' {type(distance).__name__} assumes unit rows "
                "(PML puts a zero row at distance 1 from every other); use backend='auto' "
                "(which runs 'reference' for such a batch) or 'reference'")
        chosen = "reference"
    mined_loss = None
    if miner is not None:
        if chosen != "reference" and fused.miner_supported(chosen, name, params, inp, miner):
            # the miner's rule runs inside the fused op: no index tuple, no B×M matrix
            with op_scope(embeddings):
                mined_loss = fused.MINER_IMPLS[(chosen, name)][1](params, inp, red, miner)
        else:  # the miner's index tuple, then the loss on those pairs (PML's two calls)
            inp = inp.with_indices(miner(embeddings, labels, *miner_refs))
            if seen is not None:
                seen["inp"] = inp
            impls.clear()  # looked up for the call without the tuple
    impl = impl_of(chosen) if mined_loss is None and chosen != "reference" else None
    if mined_loss is None and chosen != "reference" and impl is None:
        if backend != "auto":
            # a configuration no backend takes gets the reference's own error first (e.g.
            # expansion= on a loss without Embedding Expansion), not this one
            check_options(name, params, inp, metrix, expansion)
            raise NotImplementedError(
                f"backend={backend!r} does not cover this {name} call "
                f"({call_features(params, inp, expansion)}); use backend='auto' or "
                "'reference'"
                + ("; under torch.use_deterministic_algorithms(True) an op that adds with "
                   "float atomics (TripletMarginLoss' smooth_loss on 'cuda') is not used"
                   if torch.are_deterministic_algorithms_enabled() else ""))
        chosen = "reference"

    if mined_loss is not None:
        loss = mined_loss
    elif (chosen != "reference" and lam_value is not None and metrix.weight > 0
            and fused.metrix_supported(chosen, name, params, inp, expansion, metrix)):
        # clean and mixed terms from one fused op (the mixed candidates in closed form)
        with op_scope(embeddings):
            return fused.METRIX_IMPLS[(chosen, name)][1](params, inp, red, metrix, lam_value)
    elif chosen != "reference":
        # only the ops that cover expansion= (their supports() says so) take it
        with op_scope(embeddings):
            loss = impl(params, inp, red) if expansion is None else impl(params, inp, red,
                                                                        expansion=expansion)
    elif expansion is not None:
        from .reference.expansion import expansion_loss_dict
        loss = reduce_loss_dict(expansion_loss_dict(name, params, inp, expansion), red,
                                embeddings, inp.labels)
    else:
        loss = reduce_loss_dict(spec.loss_dict(inp, **params), red, embeddings, inp.labels,
                                loss_name=name)

    if metrix is not None and metrix.weight > 0:
        check_addable(loss, red)
        mixed_loss = None
        if backend != "reference" and lam_value is not None and not to_reference:
            # pos_pos candidates live in class blocks: any engine takes them without B×B×B;
            # the other pairs (and ref_emb, or pos_pos past the blocks' cap) in checkpointed
            # anchor chunks, O(chunk) memory; also where the clean loss fell back to the
            # reference under "auto" (an Lp distance the ops lack, ...): the chunks are
            # PyTorch and take any normalised distance
            from .fused import metrix_pos_pos, metrix_refs
            with op_scope(embeddings):
                if metrix_pos_pos.covers(name, inp, metrix):
                    mixed_loss = metrix_pos_pos.mixed_term(name, params, inp, lam_value)
                if mixed_loss is None and metrix_refs.covers(name, inp, metrix):
                    mixed_loss = metrix_refs.mixed_term(name, params, inp, metrix, lam_value,
                                                        chosen)
        if mixed_loss is None:
            from .reference.metrix import metrix_loss
            mixed_loss = metrix_loss(name, params, inp, metrix, lam_value, mixed_embeddings,
                                     mixed)
        loss = loss + metrix.weight * mixed_loss
    return loss
