"""The pair totals behind PML's "no pairs, no loss" rules (fused/pair_counts.py): the compiled
CPU op and the PyTorch form, each against a count over the B×M label-equality matrix, on
random labels of odd sizes (empty sides, one class, B = 1, negative and huge ids), the batch
against itself and against other references; the op's schema (opcheck), its argument errors
and its trace under torch.compile(fullgraph=True)."""
import pytest
import torch

from metrix_ops.fused import pair_counts as pc


def brute(labels, ref_labels, same_set):
    matches = int((labels[:, None] == ref_labels[None, :]).sum())
    return matches - (len(labels) if same_set else 0), len(labels) * len(ref_labels) - matches


def cases():
    g = torch.Generator().manual_seed(7)
    out = []
    for b, m, classes in [(0, 0, 3), (0, 5, 3), (4, 0, 3), (1, 1, 1), (1, 9, 2), (13, 13, 1),
                          (17, 29, 4), (64, 5, 64), (33, 71, 7)]:
        lab = torch.randint(0, classes, (b,), generator=g)
        ref = torch.randint(0, classes, (m,), generator=g)
        out += [(lab, ref, False), (lab, lab, True)]
    big = torch.tensor([2**62, -5, 2**62, 0, -5, -(2**62)])  # ids any int64 value
    out += [(big, big, True), (big[:4], big.flip(0), False)]
    return out


@pytest.mark.parametrize("form", ["op", "pytorch"])
def test_counts_against_the_label_matrix(form, monkeypatch):
    if form == "op":
        if not pc.HAS_CPU_OP:
            pytest.skip("the compiled CPU op is not built")
    else:
        monkeypatch.setattr(pc, "cpu_op", lambda *a: False)
    for lab, ref, same in cases():
        pos, neg = pc.pair_count_tensors(lab, ref, same)
        assert pos.dtype == neg.dtype == torch.int64 and pos.dim() == neg.dim() == 0
        assert (int(pos), int(neg)) == brute(lab, ref, same), (lab.tolist(), ref.tolist(), same)


def test_strided_labels_and_the_op_route():
    lab = torch.arange(24).remainder(5)[::3]  # a strided view
    ref = torch.arange(40).remainder(7)[1::2]
    assert not lab.is_contiguous()
    assert pc.cpu_op(lab, ref) == pc.HAS_CPU_OP
    assert not pc.cpu_op(lab.int(), ref)  # other integer dtypes take the PyTorch form
    pos, neg = pc.pair_count_tensors(lab, ref, False)
    assert (int(pos), int(neg)) == brute(lab, ref, False)
    pos, neg = pc.pair_count_tensors(lab.int(), ref.int(), False)
    assert (int(pos), int(neg)) == brute(lab, ref, False)


needs_op = pytest.mark.skipif(not pc.HAS_CPU_OP, reason="the compiled CPU op is not built")


@needs_op
def test_op_schema_errors_and_compile():
    from torch.library import opcheck
    lab, ref = torch.tensor([3, 1, 3, 2]), torch.tensor([1, 3, 3, 5, 3])
    opcheck(torch.ops.metrix_ops.pair_counts.default, (lab, ref, False))
    with pytest.raises(RuntimeError, match="ref_labels must be a 1-D int64 tensor"):
        torch.ops.metrix_ops.pair_counts(lab, ref.float(), False)
    with pytest.raises(RuntimeError, match="labels must be a 1-D int64 tensor"):
        torch.ops.metrix_ops.pair_counts(lab[None], ref, False)
    f = torch.compile(lambda a, b: torch.stack(pc.pair_count_tensors(a, b, True)),
                      fullgraph=True)
    assert f(lab, lab).tolist() == list(brute(lab, lab, True))
