"""Input checks shared by every loss: a clear ValueError/TypeError naming the argument,
never a crash deep in C++ and never a silent NaN."""
from __future__ import annotations

import math
import numbers

import torch
from .host_read import host_list

NORMALIZE_EPS = 1e-12  # F.normalize's, below which a row does not normalise to unit length


class DataChecks:
    """Checks of tensor data gathered and read in one host sync: on a GPU each read waits for
    the queue to drain, so a call's NaN checks, label and index ranges and zero-row flags are
    read together, before any launch. Each check queues one reduction (a min and max, or a
    smallest row norm) and the tests run on the host on the values read, so a call's checks
    cost a few launches, not a dozen element-wise ops on scalars. Under torch.compile nothing
    is read: the checks run as async asserts and the flags are False (the graph cannot branch
    on them)."""

    def __init__(self):
        self._items = []  # (kind, name, 1-element tensors, bound)
        self.longest = None  # after read(): the longest_row checks' largest norm, if any

    def finite(self, x, name):
        """NaN or Inf anywhere in x: one reduction (NaN propagates through min and max, an
        inf is one of them)."""
        lo, hi = torch.aminmax(x)
        self._items.append(("finite", name, (lo, hi), None))

    def short_rows(self, x, name):
        """Whether some row has an L2 norm under F.normalize's eps (1e-12: a row that
        normalising leaves shorter than 1, zero included) or past the float range (finite
        entries of ~1e19 and more in fp32, whose norm overflows: F.normalize makes such a row
        zero, the fused ops' unit rows do not)."""
        wide = torch.promote_types(x.dtype, torch.float32)  # 1e-12 is 0 in half precision
        shortest, longest = torch.aminmax(torch.linalg.vector_norm(x, dim=1, dtype=wide))
        self._items.append(("short", name, (shortest, longest), None))

    def longest_row(self, x, name):
        """The L2 norm of x's longest row (in fp32 at least), read as self.longest: the
        precision rule of rows of any norm (driver.raw_rows_too_short)."""
        wide = torch.promote_types(x.dtype, torch.float32)
        self._items.append(("longest", name,
                            (torch.linalg.vector_norm(x, dim=1, dtype=wide).amax(),), None))

    def within(self, t, bound: int, message: str):
        """Every value of t in [0, bound); `message` the error's text."""
        if t.numel():
            self._items.append(("range", message, tuple(torch.aminmax(t)), bound))

    def read(self) -> bool:
        """Raises the first failed check's error; returns whether a short row was found."""
        if not self._items:
            return False
        if torch.compiler.is_compiling():
            # a Python bool of tensor data would end a fullgraph=True graph: check at run time
            for kind, name, (lo, *rest), bound in self._items:
                if kind == "finite":
                    torch._assert_async(torch.isfinite(lo) & torch.isfinite(rest[0]),
                                        f"{name} contains NaN or Inf")
                elif kind == "range":
                    torch._assert_async((lo >= 0) & (rest[0] < bound), name)
            return False
        # one read: float64 holds every value (class ids up to 2^53 exactly; NaN and Inf)
        parts = [v.reshape(1) for _, _, vals, _ in self._items for v in vals]
        first = parts[0]
        values = host_list(torch.cat([first.new_empty(0, dtype=torch.float64)] + parts))
        short, at = False, 0
        for kind, name, vals, bound in self._items:
            got = values[at:at + len(vals)]
            at += len(vals)
            if kind == "finite" and not all(map(math.isfinite, got)):
                raise ValueError(f"{name} contains NaN or Inf")
            if kind == "range" and (got[0] < 0 or got[1] >= bound):
                raise ValueError(f"{name}, got values in [{int(got[0])}, {int(got[1])}]")
            short = short or (kind == "short" and (got[0] < NORMALIZE_EPS
                                                   or not math.isfinite(got[1])))
            if kind == "longest":
                self.longest = max(got[0], self.longest or 0.0)
        return short


def check_embeddings(x, name: str = "embeddings", allow_empty: bool = False,
                     checks: DataChecks | None = None, zero_rows: bool = False,
                     longest: bool = False) -> bool:
    """Shape, dtype and NaN/Inf checks; with zero_rows, whether some row is (nearly) zero
    (DataChecks.short_rows); with longest, the longest row's norm joins the read
    (DataChecks.longest_row). The data checks join `checks` when given (read by its owner),
    else are read here."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch_size, embedding_dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (batch_size 0): a loss needs at least one embedding")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has embedding_dim 0, got shape {tuple(x.shape)}")
    if x.device.type == "meta":  # (torch.compile's fake tensors carry the real device)
        raise ValueError(f"{name} is on the meta device, which holds shapes but no data: a "
                         "loss needs the values (CPU or CUDA tensors)")
    own = checks is None
    checks = DataChecks() if own else checks
    if x.numel():
        checks.finite(x, name)
        if zero_rows:
            checks.short_rows(x, name)
        if longest:
            checks.longest_row(x, name)
    return checks.read() if own else False


def check_labels(labels, n: int, device: torch.device, name: str = "labels") -> None:
    if not torch.is_tensor(labels):
        raise TypeError(f"{name} must be a torch.Tensor of integer class ids, got {type(labels).__name__}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D (batch_size,), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but there are {n} embeddings")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the embeddings are on {device}")


def _movable(t, like) -> bool:
    return (torch.is_tensor(t) and torch.is_tensor(like) and t.device != like.device
            and "meta" not in (t.device.type, like.device.type))


def pml_labels(labels, like, name: str = "labels"):
    """labels as PML's losses, miners and CrossBatchMemory take them: moved to the device of
    `like` (the embeddings, or ref_emb; PML's c_f.to_device), and float class ids of whole
    values as int64 (PML compares float labels as they are; the ops take integers). A tensor
    without data (meta) stays, for check_labels to name; float labels with a fractional, NaN
    or Inf value are an error naming them."""
    if _movable(labels, like):
        labels = labels.to(like.device)
    if not (torch.is_tensor(labels) and labels.is_floating_point() and labels.ndim == 1
            and labels.device.type != "meta"):
        return labels
    whole = (labels == labels.round()).all() & torch.isfinite(labels).all()
    msg = (f"{name} must hold class ids: float labels are taken when every value is a whole "
           "number (they are used as int64)")
    if torch.compiler.is_compiling():
        torch._assert_async(whole, msg)
    elif not bool(whole):
        raise ValueError(f"{msg}; got dtype {labels.dtype} with fractional, NaN or Inf values")
    return labels.long()


def pml_label_pair(labels, ref_labels, embeddings, ref_emb):
    """(labels, ref_labels) as pml_labels makes them, keeping `ref_labels is labels` (the
    same-set rule reads that identity)."""
    same = ref_labels is labels
    labels = pml_labels(labels, embeddings)
    return labels, labels if same else pml_labels(ref_labels, ref_emb, "ref_labels")


def is_weight(w) -> bool:
    """A loss weight as PML takes it: a finite real number (Python's or NumPy's), or a
    one-element tensor, which may be learned (not read on the host)."""
    if torch.is_tensor(w):
        return w.numel() == 1 and not w.is_complex()
    return (isinstance(w, numbers.Real) and not isinstance(w, bool)
            and math.isfinite(float(w)))


def pml_indices(indices_tuple, like):
    """An indices_tuple's tensors moved to the embeddings' device (PML indexes with them
    wherever they are)."""
    if not isinstance(indices_tuple, (tuple, list)):
        return indices_tuple
    return type(indices_tuple)(t.to(like.device) if _movable(t, like) else t
                               for t in indices_tuple)


def check_indices_tuple(indices_tuple, n: int, m: int, device: torch.device,
                        checks: DataChecks | None = None) -> None:
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple must be a tuple of 3 (anchors, positives, negatives) "
                         "or 4 (anchors1, positives, anchors2, negatives) 1-D index tensors")
    sizes = (n, m, m) if len(indices_tuple) == 3 else (n, m, n, m)
    own = DataChecks()  # read here when no caller's checks are given
    for k, (t, size) in enumerate(zip(indices_tuple, sizes)):
        if not torch.is_tensor(t) or t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"indices_tuple[{k}] must be a 1-D integer tensor")
        if t.device != device:
            raise ValueError(f"indices_tuple[{k}] is on {t.device} but the embeddings are on {device}")
        (checks or own).within(t, size, f"indices_tuple[{k}] holds indices outside [0, {size})")
    if len(indices_tuple) == 3:
        groups = [(0, 1, 2)]
    else:
        groups = [(0, 1), (2, 3)]
    for g in groups:
        if len({indices_tuple[k].numel() for k in g}) != 1:
            raise ValueError(f"indices_tuple entries {g} must have equal lengths")
    if checks is None:
        own.read()


def compute_dtype(t) -> torch.dtype:
    """The dtype a loss computes a tensor in: half precision in fp32 (driver)."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def check_loss_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                      labels_required: bool = True, zero_rows: bool = False,
                      proxies=None, longest_rows: bool = False) -> tuple[bool, float | None]:
    """Checks the PML call signature `(embeddings, labels, indices_tuple, ref_emb, ref_labels)`;
    with proxies (the proxy losses' (num_classes, D) weights), that they are finite and that
    the labels are in [0, num_classes). Every check of tensor data is read in one host sync
    (DataChecks). Returns (zero_row, longest): with zero_rows, whether a row of embeddings,
    ref_emb or proxies has a norm under F.normalize's eps or past the float range
    (DataChecks.short_rows); with longest_rows, the largest row norm of embeddings and
    ref_emb (None without it, or under torch.compile, where nothing is read)."""
    checks = DataChecks()
    # an empty batch or reference set is PML's zero loss (driver.empty_loss), not an error
    check_embeddings(embeddings, "embeddings", allow_empty=True, checks=checks,
                     zero_rows=zero_rows, longest=longest_rows)
    n, dev = embeddings.shape[0], embeddings.device
    num_classes = None
    if torch.is_tensor(proxies) and proxies.ndim == 2 and proxies.is_floating_point():
        num_classes = len(proxies)
        # (proxies elsewhere are the proxy losses' own error, check_proxies: not read here)
        if proxies.numel() and proxies.device == dev:
            checks.finite(proxies.detach(), "proxies")
            if zero_rows:
                checks.short_rows(proxies.detach(), "proxies")
    if labels is None:
        if labels_required and indices_tuple is None:
            raise ValueError("labels is required (or pass indices_tuple)")
    else:
        check_labels(labels, n, dev, "labels")
        if num_classes is not None:
            checks.within(labels, num_classes, f"labels must be in [0, num_classes={num_classes})")
    m = n
    if ref_emb is not None:
        if ref_emb is not embeddings:  # (the batch as its own references: checked once)
            check_embeddings(ref_emb, "ref_emb", allow_empty=True, checks=checks,
                             zero_rows=zero_rows, longest=longest_rows)
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(f"ref_emb has embedding_dim {ref_emb.shape[1]} but embeddings has "
                             f"{embeddings.shape[1]}")
        if ref_emb.device != dev:
            raise ValueError(f"ref_emb is on {ref_emb.device} but embeddings is on {dev}")
        if compute_dtype(ref_emb) != compute_dtype(embeddings):
            raise ValueError(
                f"ref_emb has dtype {ref_emb.dtype} but embeddings has {embeddings.dtype}: "
                "they must match (float16 and bfloat16 are computed in float32, so those mix "
                "with float32)")
        m = ref_emb.shape[0]
        if ref_labels is None:
            if labels_required and indices_tuple is None:
                raise ValueError("ref_labels is required when ref_emb is given")
        else:
            check_labels(ref_labels, m, dev, "ref_labels")
    elif ref_labels is not None:
        raise ValueError("ref_labels was given without ref_emb")
    if indices_tuple is not None:
        check_indices_tuple(indices_tuple, n, m, dev, checks)
    return checks.read(), checks.longest
