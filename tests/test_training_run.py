"""The training run end to end on a cut-down digits split: same seed → same numbers, the
Metrix levels' loss as the explicit computation, the comparison's JSON and PNG, and the
command line's errors."""
import dataclasses
import json

import pytest
import torch

import metrix_ops as mo
from metrix_ops import train as cli
from metrix_ops.training import TrainConfig, train
from metrix_ops.training.compare import compare, variants
from metrix_ops.training.data import Split, digits_split
from metrix_ops.training.loop import loss_step
from metrix_ops.training.loss_setup import build_loss
from metrix_ops.training.models import small_cnn


@pytest.fixture(scope="module")
def small_split():
    """Every 4th image of digits: about 225 train and 225 test images."""
    s = digits_split()
    sub = lambda ds, y: (torch.utils.data.TensorDataset(ds.tensors[0][::4]), y[::4])  # noqa: E731
    tr, ytr = sub(s.train, s.train_labels)
    te, yte = sub(s.test, s.test_labels)
    return Split(tr, ytr, te, yte, 1, 8, "digits/4")


FAST = dict(epochs=2, classes_per_batch=3, samples_per_class=6, embedding_dim=16)


@pytest.mark.parametrize("extra", [{}, {"metrix": "feature"}, {"metrix": "input"},
                                   {"metrix": "embedding"}, {"expansion": 2}])
def test_same_seed_same_numbers(small_split, extra):
    cfg = TrainConfig(**FAST, **extra)
    a, b = train(cfg, small_split, progress=False), train(cfg, small_split, progress=False)
    assert a["history"] == b["history"]
    c = train(dataclasses.replace(cfg, seed=1), small_split, progress=False)
    assert c["history"] != a["history"]
    # epoch 0 (untrained) and every epoch are evaluated; retrieval metrics are rates
    assert [h["epoch"] for h in a["history"]] == [0, 1, 2]
    for h in a["history"]:
        for k in ("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI"):
            assert 0.0 <= h[k] <= 1.0
        assert h["recall_at_1"] == pytest.approx(h["precision_at_1"])
    assert a["history"][0]["loss"] is None and a["history"][-1]["loss"] > 0


def test_embedding_metrix_with_weight_zero_trains_as_the_baseline(small_split):
    base = train(TrainConfig(**FAST), small_split, progress=False)
    zero = train(TrainConfig(**FAST, metrix="embedding", metrix_weight=0.0), small_split, progress=False)
    assert zero["history"] == base["history"]
    full = train(TrainConfig(**FAST, metrix="embedding"), small_split, progress=False)
    assert full["history"][1]["loss"] != base["history"][1]["loss"]


@pytest.mark.parametrize("level", ["feature", "input"])
def test_metrix_step_equals_the_explicit_computation(level):
    """loss_step's feature/input-level loss and gradients equal mixing by hand: the pairs and
    λ chosen on the clean embeddings, the mixes embedded by the network's tail (feature) or by
    the whole network (input), and the loss called with them."""
    torch.manual_seed(0)
    net = small_cnn(1, 8, 6).eval()  # eval: BatchNorm does not depend on the batch
    x, y = torch.randn(12, 1, 8, 8), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    cfg = TrainConfig(metrix=level, metrix_pairs="pos_neg", backend="reference")
    loss_fn = build_loss(cfg, 4, 6)

    torch.manual_seed(5)
    got = loss_step(net, loss_fn, x, y, cfg)
    g_got = torch.autograd.grad(got, list(net.parameters()))

    torch.manual_seed(5)
    emb = net(x)
    mixed = mo.mixup.mix_pairs(x if level == "input" else None, y, pairs="pos_neg",
                               alpha=cfg.metrix_alpha, embeddings=emb.detach())
    if level == "input":
        memb = net(mixed.inputs)
    else:
        memb = net.embed(net.pool(mixed.mix(net.trunk(x))).flatten(1))
    want = loss_fn(emb, y, mixed_embeddings=memb, mixed=mixed)
    g_want = torch.autograd.grad(want, list(net.parameters()))
    assert len(mixed) > 0
    assert torch.allclose(got, want, rtol=1e-6)
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    clean = build_loss(dataclasses.replace(cfg, metrix=None), 4, 6)(emb, y)
    assert not torch.allclose(got, clean)  # the Metrix term is in


def test_proxy_loss_trains_its_proxies(small_split):
    cfg = TrainConfig(**FAST, loss="ProxyAnchorLoss")
    loss_fn = build_loss(cfg, small_split.num_train_classes, 16)
    assert loss_fn.proxies.shape == (5, 16)
    res = train(cfg, small_split, progress=False)
    assert res["history"][-1]["loss"] > 0


def test_compare_writes_json_and_png(small_split, tmp_path, monkeypatch):
    import metrix_ops.training.compare as cmp

    monkeypatch.setattr(cmp, "load_split", lambda cfg: small_split)
    cfg = TrainConfig(**dict(FAST, epochs=1))
    rep = compare(cfg, seeds=2, out_dir=str(tmp_path), ee_points=2, progress=False)
    names = ["MultiSimilarityLoss", "MultiSimilarityLoss+Metrix(feature)", "MultiSimilarityLoss+EE(2)"]
    assert list(rep["summary"]) == names and rep["seeds"] == [0, 1]
    on_disk = json.loads((tmp_path / "compare.json").read_text())
    assert list(on_disk["summary"]) == names
    for name in names:
        vals = [r["final"]["precision_at_1"] for r in rep["runs"][name]]
        s = rep["summary"][name]["precision_at_1"]
        assert s["mean"] == pytest.approx(sum(vals) / 2)
        assert s["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
        assert [r["config"]["seed"] for r in rep["runs"][name]] == [0, 1]
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variants_only_where_the_loss_supports_them():
    names = [v.describe() for v in variants(TrainConfig(loss="ContrastiveLoss"))]
    assert names == ["ContrastiveLoss", "ContrastiveLoss+Metrix(feature)"]
    names = [v.describe() for v in variants(TrainConfig(loss="HPHNTripletLoss", expansion=4))]
    assert names == ["HPHNTripletLoss", "HPHNTripletLoss+EE(4)"]


@pytest.mark.parametrize("argv,msg", [
    (["--loss", "Nope"], "--loss must be one of"),
    (["--loss", "TripletMarginLoss", "--metrix", "feature"], "--metrix is implemented for"),
    (["--loss", "ContrastiveLoss", "--expansion", "2"], "--expansion is implemented for"),
    (["--expansion", "2", "--expansion-pairs", "adjacent", "--samples-per-class", "5"], "must be even"),
    (["--loss-kwargs", "{margin: 1"], "--loss-kwargs is not valid JSON"),
    (["--loss-kwargs", '{"nonsense": 1}'], "do not fit MultiSimilarityLoss"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--classes-per-batch", "9"], "only 5 classes"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nope"], "--device"),
    (["--data", "/nonexistent/folder"], "not a directory"),
    (["--ddp-efficient", "--expansion", "2"], "--ddp-efficient takes neither"),
    (["--ddp-efficient", "--metrix", "feature"], "--ddp-efficient takes neither"),
])
def test_cli_bad_arguments_exit_2_with_a_message(argv, msg, capsys):
    assert cli.main(argv + ["--quiet", "--out", ""]) == 2
    assert msg in capsys.readouterr().err


def test_cli_runs_and_prints_the_table(tmp_path, capsys, monkeypatch, small_split):
    import metrix_ops.training.loop as loop

    monkeypatch.setattr(loop, "load_split", lambda cfg: small_split)
    assert cli.main(["--epochs", "1", "--classes-per-batch", "3", "--samples-per-class", "4",
                     "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "R@1" in out and "MAP@R" in out and "MultiSimilarityLoss" in out
    saved = json.loads((tmp_path / "MultiSimilarityLoss-seed0.json").read_text())
    assert saved["config"]["epochs"] == 1 and len(saved["history"]) == 2


def test_amp_trains_the_network_in_bf16(small_split, monkeypatch):
    """--amp: the network's forward runs under bf16 autocast, so the loss receives bf16
    embeddings (and computes in fp32); the run is deterministic and still learns."""
    seen = []
    real = mo.losses.MultiSimilarityLoss.forward
    monkeypatch.setattr(mo.losses.MultiSimilarityLoss, "forward",
                        lambda self, emb, *a, **k: seen.append(emb.dtype) or real(self, emb, *a, **k))
    cfg = TrainConfig(**FAST, amp=True)
    a = train(cfg, small_split, progress=False)
    assert seen and set(seen) == {torch.bfloat16}
    assert train(cfg, small_split, progress=False)["history"] == a["history"]
    seen.clear()
    fp32 = train(TrainConfig(**FAST), small_split, progress=False)
    assert set(seen) == {torch.float32} and fp32["history"] != a["history"]
    assert a["history"][-1]["precision_at_1"] > a["history"][0]["precision_at_1"]
    assert a["config"]["amp"] is True


def test_saved_network_reproduces_the_final_evaluation(small_split, tmp_path):
    """--save-model: the file rebuilds the trained network, whose test embeddings give the
    run's final R@1 and MAP@R again."""
    from metrix_ops.training.loop import evaluate
    from metrix_ops.training.models import load_trained
    path = str(tmp_path / "net.pt")
    res = train(TrainConfig(**FAST, save_model=path), small_split, progress=False)
    net = load_trained(path)
    again = evaluate(net, small_split, torch.device("cpu"), seed=0)
    for k in ("precision_at_1", "mean_average_precision_at_r"):
        assert again[k] == pytest.approx(res["final"][k], abs=1e-12)
    untrained = evaluate(small_cnn(1, 8, FAST["embedding_dim"]), small_split,
                         torch.device("cpu"), seed=0)
    assert again["precision_at_1"] != untrained["precision_at_1"]
