"""The autograd and fake-kernel registrations of the CUDA engine's Metrix ops
(fused/cuda_metrix.py's register_mix_op), checked without a GPU: the CUDA-only ops get
stand-in CPU kernels for the test's duration (simple functions of x with known gradients,
whose backwards assert that they receive the saved outputs and constants in the schema's
order), then gradcheck, the differentiable outputs, and opcheck. Then the CPU Metrix ops
as stand-ins (the same per-anchor values): under them the CUDA engine's in-batch Metrix
losses (eagerly and compiled whole) and its refs glue (fused/cuda_metrix_refs.py) equal the
reference. Needs a build with the CUDA kernels compiled (as CI's), not a GPU."""
import pytest
import torch

from metrix_ops import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_CUDA_EXT,
                                reason="the CUDA Metrix ops exist only in a CUDA build")

MS = (2.0, 50.0, 0.5, 0.3, True, 7)
CON = (True, 0.1, 0.8, 0.3, False, 5)
LSE = {"circle_metrix_mix": (0.25, 80.0, 0.3, False, 4),
       "lifted_metrix_mix": (True, 0.1, 0.8, 0.3, False, 4)}


def _ms_fwd(x, y, s, z, *c):
    return (x ** 2).sum(1) * c[0], x.sum(1), x[:, 0].clone()


def _ms_bwd(g, x, y, s, z, lp, ln, *c):
    assert torch.equal(lp, x.sum(1)) and torch.equal(ln, x[:, 0]), "saved outputs"
    assert c == MS, c
    return g[:, None] * 2 * x * c[0]


def _con_fwd(x, y, s, z, *c):
    ones = torch.ones(x.shape[0], dtype=torch.long)
    return x.sum(1) * c[1], ones, (x ** 2).sum(1) * c[2], 2 * ones


def _con_bwd(gp, gn, x, y, s, z, *c):
    assert c == CON, c
    return gp[:, None] * c[1] + gn[:, None] * 2 * x * c[2]


def _lse_fwd(x, y, s, z, *c):
    return x.sum(1), (x ** 3).sum(1)


def _lse_bwd(name):
    def bwd(gp, gn, x, y, s, z, lp, ln, *c):
        assert torch.equal(lp, x.sum(1)) and torch.equal(ln, (x ** 3).sum(1)), "saved outputs"
        assert c == LSE[name], c
        return gp[:, None] * torch.ones_like(x) + gn[:, None] * 3 * x ** 2
    return bwd


@pytest.fixture
def stand_ins():
    lib = torch.library.Library("metrix_ops", "IMPL")  # dropped after the test
    lib.impl("ms_metrix_mix_fwd", _ms_fwd, "CPU")
    lib.impl("ms_metrix_mix_bwd", _ms_bwd, "CPU")
    lib.impl("contrastive_metrix_mix_fwd", _con_fwd, "CPU")
    lib.impl("contrastive_metrix_mix_bwd", _con_bwd, "CPU")
    for name in LSE:
        lib.impl(f"{name}_fwd", _lse_fwd, "CPU")
        lib.impl(f"{name}_bwd", _lse_bwd(name), "CPU")
    yield torch.ops.metrix_ops
    lib._destroy()


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y, start = torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)
    return x, y, start, torch.full((6,), 6), torch.randn(6, dtype=torch.float64, generator=g)


def test_gradients_reach_the_backward_in_schema_order(stand_ins):
    ops = stand_ins
    x, y, s, z, w = _inputs()
    cases = [lambda e: ops.ms_metrix_mix_fwd(e, y, s, z, *MS)[0] * w]
    con = lambda e: ops.contrastive_metrix_mix_fwd(e, y, s, z, *CON)  # noqa: E731
    cases += [lambda e: con(e)[0] * w + con(e)[2], lambda e: con(e)[2] * w]  # one side unused
    for name, c in LSE.items():
        op = getattr(ops, f"{name}_fwd")
        cases += [lambda e, op=op, c=c: op(e, y, s, z, *c)[0] * w + op(e, y, s, z, *c)[1],
                  lambda e, op=op, c=c: op(e, y, s, z, *c)[1] * w]
    for f in cases:
        assert torch.autograd.gradcheck(f, (x,))


def test_only_the_loss_outputs_are_differentiable(stand_ins):
    ops = stand_ins
    x, y, s, z, _ = _inputs()
    assert [o.requires_grad for o in ops.ms_metrix_mix_fwd(x, y, s, z, *MS)] == [True, False, False]
    out = ops.contrastive_metrix_mix_fwd(x, y, s, z, *CON)
    assert [o.requires_grad for o in out] == [True, False, True, False]
    assert out[1].dtype == torch.long
    for name, c in LSE.items():
        assert all(o.requires_grad for o in getattr(ops, f"{name}_fwd")(x, y, s, z, *c))


def test_opcheck(stand_ins):
    ops = stand_ins
    x, y, s, z, _ = _inputs()
    torch.library.opcheck(ops.ms_metrix_mix_fwd.default, (x, y, s, z, *MS))
    torch.library.opcheck(ops.contrastive_metrix_mix_fwd.default, (x, y, s, z, *CON))
    for name, c in LSE.items():
        torch.library.opcheck(getattr(ops, f"{name}_fwd").default, (x, y, s, z, *c))


# The refs ops (fused/cuda_metrix_refs.py): stand-ins that run the CPU refs ops, which give
# the same per-anchor values, so that the CUDA glue's whole mixed term (sorting, the ops'
# argument order, autograd with need_dr, the finishing) runs here against the reference.
NEED_DR = []  # the need_dr of each stand-in backward call


def _refs_stand_in(op):
    """the CPU refs op `op` in the CUDA refs op's schema: (fwd, bwd), the backward recording
    its need_dr in NEED_DR"""
    cpu = getattr(torch.ops.metrix_ops, f"{op}_fwd")
    cpu_bwd = getattr(torch.ops.metrix_ops, f"{op}_bwd")
    inf = float("inf")
    if op == "ms_metrix_refs":
        def fwd(x, r, y, ry, own, *c):
            *p, lam, an, chunk = c
            out = cpu(x, r, y, ry, own, *p, lam, an, False, chunk)
            return out[3].clone(), out[4].clone(), out[5].clone()

        def bwd(g, x, r, y, ry, own, tp, tn, *c):
            *p, lam, an, chunk, need_dr = c
            z = torch.zeros_like(g)
            return cpu_bwd(z, g, x, r, y, ry, own, z, z, tp, tn, *p, lam, an, False, chunk,
                           need_dr)
    elif op == "contrastive_metrix_refs":
        def fwd(x, r, y, ry, own, *c):
            *p, lam, an, chunk = c
            return tuple(t.clone() for t in cpu(x, r, y, ry, own, *p, lam, an, False, -inf, inf,
                                                 chunk)[4:])

        def bwd(gp, gn, x, r, y, ry, own, *c):
            *p, lam, an, chunk, need_dr = c
            z = torch.zeros_like(gp)
            return cpu_bwd(z, z, gp, gn, x, r, y, ry, own, *p, lam, an, False, -inf, inf, chunk,
                           need_dr)
    else:
        def fwd(x, r, y, ry, own, *c):
            *p, lam, an, chunk = c
            out = cpu(x, r, y, ry, own, *p, lam, an, False, chunk)
            return out[0].clone(), out[1].clone()

        def bwd(gp, gn, x, r, y, ry, own, lp, ln, *c):
            *p, lam, an, chunk, need_dr = c
            z = torch.zeros_like(gp)
            return cpu_bwd(gp, gn, z, z, x, r, y, ry, own, lp, ln, z, z, *p, lam, an, False,
                           chunk, need_dr)
    return fwd, bwd


@pytest.fixture
def refs_stand_ins():
    from metrix_ops.fused import cuda_metrix_refs as cmr
    if not cmr.HAS_OPS:
        pytest.skip("a build without the CUDA refs ops")
    lib = torch.library.Library("metrix_ops", "IMPL")  # dropped after the test
    for op in cmr.OPS:
        fwd, bwd = _refs_stand_in(op.replace("_mix_refs", "_refs"))
        lib.impl(f"{op}_fwd", fwd, "CPU")
        lib.impl(f"{op}_bwd", lambda *a, bwd=bwd: NEED_DR.append(a[-1]) or bwd(*a), "CPU")
    yield cmr
    lib._destroy()


REFS_LOSSES = [("MultiSimilarityLoss", {"alpha": 3.0, "beta": 40.0, "base": 0.3}),
               ("CircleLoss", {"m": 0.3, "gamma": 40.0}),
               ("ContrastiveLoss", {"pos_margin": 0.1, "neg_margin": 0.7}),
               ("ContrastiveLoss", {"distance": "cosine", "pos_margin": 0.8, "neg_margin": 0.3}),
               ("GeneralizedLiftedStructureLoss", {"pos_margin": 0.2, "neg_margin": 0.9}),
               ("GeneralizedLiftedStructureLoss", {"distance": "cosine", "neg_margin": 0.3})]


@pytest.mark.parametrize("own_rows", [False, True], ids=["bank", "copy_of_batch"])
@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg"])
@pytest.mark.parametrize("name,kw", REFS_LOSSES,
                         ids=["ms", "circle", "con", "con_cos", "gen_lifted", "gen_lifted_cos"])
def test_refs_glue_equals_the_reference(refs_stand_ins, name, kw, pairs, own_rows):
    """the CUDA branch of the refs term (cuda_metrix_refs.refs_rows on the stand-ins, then
    metrix_refs' finishing) against the reference's L̃, values and
    the gradients of both x and the references; a detached bank asks for no dR"""
    import torch.nn.functional as F

    import metrix_ops as mo
    from cases import assert_close_vg
    from metrix_ops.fused import metrix_refs as mr
    from metrix_ops.reference.metrix import metrix_loss
    cmr = refs_stand_ins
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (13,), generator=g)
    if own_rows:
        r, ry, own = x.clone(), y, torch.arange(13)
    else:
        r = torch.randn(17, 5, dtype=torch.float64, generator=g)
        ry, own = torch.randint(1, 6, (17,), generator=g), torch.full((13,), -1)
    kw = dict(kw)
    dist = mo.distances.CosineSimilarity() if kw.pop("distance", None) or name in (
        "MultiSimilarityLoss", "CircleLoss") else mo.distances.LpDistance()
    params = {**getattr(mo.losses, name)().loss_params(), **kw}
    mx = mo.Metrix(level="embedding", pairs=pairs, lam=0.35)

    def inputs(e, q):
        return mo.spec.LossInputs(e, y, None, q, ry, own_rows, dist)

    def glue(e, q):
        xh, rh = F.normalize(e, dim=1), F.normalize(q, dim=1)
        out = cmr.refs_rows(name, params, inputs(e, q), pairs, 0.35, xh, rh, own)
        return mr._finish(name, out, 0.35, xh, y, ry)

    NEED_DR.clear()
    assert_close_vg(glue, lambda e, q: metrix_loss(name, params, inputs(e, q), mx, 0.35), x, r)
    assert NEED_DR == [True]
    xl = x.clone().requires_grad_()
    glue(xl, r).backward()  # a detached bank
    assert NEED_DR == [True, False] and xl.grad.abs().sum() > 0


def test_class_layout_has_no_value_dependent_shape():
    """fused/cuda_metrix.py class_layout (each row's class start and size, from running
    maxima and minima): unique_consecutive's answer on random sorted labels, the empty batch,
    one row, one class; and it traces whole under torch.compile(fullgraph=True)"""
    from metrix_ops.fused.cuda_metrix import class_layout

    def by_unique(y):
        _, inv, sizes = torch.unique_consecutive(y, return_inverse=True, return_counts=True)
        return (torch.cumsum(sizes, 0) - sizes)[inv], sizes[inv]

    g = torch.Generator().manual_seed(4)
    cases = [torch.zeros(0, dtype=torch.long), torch.tensor([7]), torch.zeros(5, dtype=torch.long)]
    cases += [torch.sort(torch.randint(0, k, (n,), generator=g)).values
              for n, k in ((9, 3), (31, 12), (64, 64))]
    torch._dynamo.reset()
    traced = torch.compile(class_layout, fullgraph=True, backend="eager", dynamic=True)
    for y in cases:
        for got in (class_layout(y), traced(y)):
            want = by_unique(y)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (y, got, want)


# The in-batch ops the same way: the CPU in-batch Metrix ops as stand-ins (the same
# per-anchor values), so that the CUDA engine's whole Metrix loss (fused/cuda_metrix.py's
# *_metrix_impl: the clean op, the sort, the class layout, the mixed op, the finishing)
# runs here against the reference, eagerly and under fullgraph compile.
def _self_stand_ins():
    ops, inf, blk = torch.ops.metrix_ops, float("inf"), 64

    def ms_fwd(x, y, cs, cz, a, b, base, lam, an, chunk):
        out = ops.ms_metrix_self_fwd(x, y, a, b, base, lam, an, blk)
        return out[3].clone(), out[4].clone(), out[5].clone()

    def ms_bwd(g, x, y, cs, cz, tp, tn, a, b, base, lam, an, chunk):
        z = torch.zeros_like(g)
        return ops.ms_metrix_self_bwd(z, g, x, y, z, z, tp, tn, a, b, base, lam, an, blk)

    def con_fwd(x, y, cs, cz, cos, pm, nm, lam, an, chunk):
        out = ops.contrastive_metrix_self_fwd(x, y, cos, pm, nm, -inf, inf, lam, an, blk)
        return tuple(t.clone() for t in out[4:])

    def con_bwd(gp, gn, x, y, cs, cz, cos, pm, nm, lam, an, chunk):
        z = torch.zeros_like(gp)
        return ops.contrastive_metrix_self_bwd(z, z, gp, gn, x, y, cos, pm, nm, -inf, inf, lam,
                                               an, blk)

    def lse(name):
        fwd_op = getattr(ops, f"{name}_metrix_self_fwd")
        bwd_op = getattr(ops, f"{name}_metrix_self_bwd")

        def fwd(x, y, cs, cz, *c):
            *p, lam, an, chunk = c
            out = fwd_op(x, y, *p, lam, an, False, blk)
            return out[0].clone(), out[1].clone()

        def bwd(gp, gn, x, y, cs, cz, lp, ln, *c):
            *p, lam, an, chunk = c
            z = torch.zeros_like(gp)
            return bwd_op(gp, gn, z, z, x, y, lp, ln, z, z, *p, lam, an, False, blk)
        return fwd, bwd

    return {"ms_metrix_mix": (ms_fwd, ms_bwd), "contrastive_metrix_mix": (con_fwd, con_bwd),
            "circle_metrix_mix": lse("circle"), "lifted_metrix_mix": lse("lifted")}


@pytest.fixture
def self_stand_ins():
    lib = torch.library.Library("metrix_ops", "IMPL")  # dropped after the test
    for op, (fwd, bwd) in _self_stand_ins().items():
        lib.impl(f"{op}_fwd", fwd, "CPU")
        lib.impl(f"{op}_bwd", bwd, "CPU")
    yield
    lib._destroy()


@pytest.mark.parametrize("pairs", ["pos_neg", "anchor_neg"])
@pytest.mark.parametrize("name,kw", REFS_LOSSES,
                         ids=["ms", "circle", "con", "con_cos", "gen_lifted", "gen_lifted_cos"])
def test_in_batch_glue_equals_the_reference(self_stand_ins, name, kw, pairs):
    """the CUDA engine's Metrix loss (its registered impl, on the stand-ins) against the
    reference module, values and gradient, eagerly and compiled whole"""
    import metrix_ops as mo
    from cases import assert_close_vg
    from metrix_ops import fused
    from metrix_ops.reducers import as_reducer
    from metrix_ops.spec import get_spec
    g = torch.Generator().manual_seed(5)
    x = torch.randn(19, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (19,), generator=g)
    y[0] = 9  # a class of one: it mixes itself
    kw = dict(kw)
    if kw.pop("distance", None):
        kw["distance"] = mo.distances.CosineSimilarity()
    mx = mo.Metrix(level="embedding", pairs=pairs, lam=0.35)
    module = getattr(mo.losses, name)(**kw)
    ref = getattr(mo.losses, name)(backend="reference", metrix=mx, **kw)
    spec = get_spec(name)
    impl = fused.METRIX_IMPLS[("cuda", name)][1]

    def cuda_glue(e):
        inp = mo.spec.LossInputs(e, y, None, e, y, True,
                                 mo.distances.as_distance(module.distance,
                                                          spec.default_distance))
        return impl(module.loss_params(), inp, as_reducer(module.reducer, spec.default_reducer),
                    mx, 0.35)

    assert_close_vg(cuda_glue, lambda e: ref(e, y), x)
    torch._dynamo.reset()
    compiled = torch.compile(cuda_glue, fullgraph=True, backend="eager")
    assert_close_vg(compiled, cuda_glue, x)
