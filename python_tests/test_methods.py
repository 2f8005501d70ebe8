"""The ensemble defenses CDA² is compared with (ensemble, ADP, GAL, DVERGE): each loss against a
direct transcription of its formula (float64: values, input and parameter gradients, GAL's double
backward included), DVERGE's feature reading and distillation, per-method defaults and options,
and a smoke run per method through ``cda2 train`` with checkpoint and exact resume."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as Fn

from cda2_ext.storage.checkpoint import DOCUMENT_KEY, FORMAT, document_digest, load_checkpoint
from cda2_ext.cli import main
from cda2_ext.errors import ConfigError
from cda2_ext.models import Collaboration
from cda2_ext.models.features import packed_features
from cda2_ext.runtime import FUSED, REFERENCE
from cda2_ext.training import TrainConfig
from cda2_ext.training.methods import METHODS
from cda2_ext.training.methods.adp import adp_loss
from cda2_ext.training.methods.dverge import (derangement, distill, dverge_loss, epoch_layer,
                                              round_robin)
from cda2_ext.training.methods.ensemble import ensemble_ce_loss, ensemble_log_probs, ensemble_pgd
from cda2_ext.training.methods.gal import gal_loss
from helpers import tiny_train

IMG = 8
BACKENDS = pytest.mark.parametrize("backend", [FUSED, REFERENCE], ids=["fused", "reference"])


def _model(M=3, depth=8, train=False, seed=0):
    torch.manual_seed(seed)
    m = Collaboration(num_models=M, depth=depth).double()
    return m.train(train)


def _batch(gen, B=4, K=10):
    return (torch.rand(B, 3, IMG, IMG, generator=gen, dtype=torch.float64),
            torch.randint(0, K, (B,), generator=gen))


def _grads(model, *tensors):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None] + \
           [t.grad.clone() for t in tensors]


def _assert_grads_close(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)


# ----- ensemble ------------------------------------------------------------------------------------
@BACKENDS
def test_ensemble_loss_is_the_sum_of_each_sub_models_cross_entropy(gen, backend):
    model = _model()
    x, y = _batch(gen)
    xa = x.clone().requires_grad_(True)
    loss, terms = ensemble_ce_loss(model(xa)[0], y, backend)
    loss.backward()
    got = _grads(model, xa)
    model.zero_grad()
    xb = x.clone().requires_grad_(True)
    logits = model(xb)[0]
    ref = sum(Fn.cross_entropy(logits[m], y) for m in range(3))   # one optimiser per sub-model
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms["ce"].sum(), ref.detach(), rtol=1e-12, atol=0)
    _assert_grads_close(got, _grads(model, xb))


def test_ensemble_output_is_the_log_of_the_mean_probability(gen):
    z = torch.randn(3, 5, 10, generator=gen, dtype=torch.float64) * 5
    ref = torch.log(torch.stack([torch.softmax(z[m], -1) for m in range(3)]).mean(0))
    torch.testing.assert_close(ensemble_log_probs(z).double(), ref, rtol=1e-6, atol=1e-6)


def test_ensemble_pgd_attacks_the_averaged_ensemble(gen):
    model = _model()
    x, y = _batch(gen, B=6)
    eps = 0.03
    x_adv = ensemble_pgd(model, x, y, eps, 0.01, 5, generator=gen, backend=REFERENCE)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= eps + 1e-12
    assert model.training is False  # _model(train=False); eval mode kept

    def ens_ce(v):
        with torch.no_grad():
            return Fn.nll_loss(ensemble_log_probs(model(v)[0]), y, reduction="none")
    assert (ens_ce(x_adv) >= ens_ce(x) - 1e-9).all() and (ens_ce(x_adv) > ens_ce(x)).any()


# ----- ADP -----------------------------------------------------------------------------------------
def _adp_transcription(logits, y, alpha, beta):
    """ADP as DVERGE's train_adp.py writes it: masked non-true predictions, L2-normalised, Gram
    matrix + 1e-6 I, log-det; ensemble entropy with a 1e-20 log offset; CEs summed."""
    M, B, K = logits.shape
    onehot = torch.zeros(B, K, dtype=torch.bool)
    onehot[torch.arange(B), y] = True
    ce, rows, probs = 0, [], 0
    for m in range(M):
        ce = ce + Fn.cross_entropy(logits[m], y)
        p = torch.softmax(logits[m], -1)
        rows.append(torch.masked_select(p, ~onehot).reshape(B, K - 1))
        probs = probs + p
    probs = probs / M
    entropy = torch.sum(-probs * torch.log(probs + 1e-20), -1).mean()
    n = torch.stack(rows, 1)
    n = n / torch.norm(n, p=2, dim=-1, keepdim=True)
    mat = n @ n.permute(0, 2, 1)
    log_det = torch.logdet(mat + 1e-6 * torch.eye(M, dtype=mat.dtype).unsqueeze(0)).mean()
    return ce - alpha * entropy - beta * log_det


@BACKENDS
@pytest.mark.parametrize("alpha, beta", [(2.0, 0.5), (0.0, 1.5)])
def test_adp_loss_matches_its_formula(gen, backend, alpha, beta):
    model = _model()
    x, y = _batch(gen, B=5)
    xa = x.clone().requires_grad_(True)
    loss, terms = adp_loss(model(xa)[0], y, alpha, beta, backend)
    loss.backward()
    got = _grads(model, xa)
    model.zero_grad()
    xb = x.clone().requires_grad_(True)
    ref = _adp_transcription(model(xb)[0], y, alpha, beta)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    _assert_grads_close(got, _grads(model, xb))
    assert float(terms["log_det"]) < 0 and float(terms["entropy"]) > 0


def test_adp_diversity_terms_change_the_gradient(gen):
    z = (torch.randn(3, 4, 10, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    y = torch.randint(0, 10, (4,), generator=gen)
    g = [torch.autograd.grad(adp_loss(z, y, a, b)[0], z)[0] for a, b in ((0, 0), (2, 0), (0, 0.5))]
    assert not torch.allclose(g[0], g[1]) and not torch.allclose(g[0], g[2])


# ----- GAL -----------------------------------------------------------------------------------------
def _gal_transcription(model, x, y, coeff):
    """GAL as DVERGE's train_gal.py writes it: each sub-model's batch-mean CE, its input gradient
    with create_graph, pairwise F.cosine_similarity, log(sum exp + 1e-20), CEs averaged."""
    M = model.num_models
    logits = model(x)[0]
    grads, ce = [], 0
    for m in range(M):
        loss_m = Fn.cross_entropy(logits[m], y)
        (g,) = torch.autograd.grad(loss_m, x, create_graph=True)
        grads.append(g.flatten(1))
        ce = ce + loss_m
    cos = torch.stack([Fn.cosine_similarity(grads[i], grads[j], dim=-1)
                       for i in range(M) for j in range(i + 1, M)], -1)
    coh = torch.log(cos.exp().sum(-1) + 1e-20).mean()
    return ce / M + coeff * coh, coh


@pytest.mark.parametrize("train", [False, True], ids=["eval-bn", "train-bn"])
def test_gal_loss_matches_its_formula_through_the_double_backward(gen, train):
    model = _model(train=train)
    twin = _model(train=train)   # same weights; train-mode BN moves its own running statistics
    x, y = _batch(gen, B=4)
    xa = x.clone().requires_grad_(True)
    x_in = xa.unsqueeze(0).expand(3, *x.shape).clone()   # one copy per sub-model
    loss, terms = gal_loss(model(x_in)[0], x_in, y, 0.5)
    loss.backward()
    got = _grads(model, xa)
    xb = x.clone().requires_grad_(True)
    ref, coh = _gal_transcription(twin, xb, y, 0.5)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["coherence"], coh.detach(), rtol=1e-10, atol=1e-12)
    _assert_grads_close(got, _grads(twin, xb))


def test_gal_coherence_reaches_the_weights_through_the_input_gradients(gen):
    """The coherence term's parameter gradient is not zero: the double backward is real."""
    model = _model()
    x, y = _batch(gen)
    x_in = x.unsqueeze(0).expand(3, *x.shape).clone().requires_grad_(True)
    _, terms = gal_loss(model(x_in)[0], x_in, y, 1.0)
    coh_only = gal_loss(model(x_in)[0], x_in, y, 1.0)[0] - gal_loss(model(x_in)[0], x_in, y, 0.0)[0]
    grads = torch.autograd.grad(coh_only, [p for p in model.net.trunk.parameters()])
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert -1.0 <= float(terms["coherence"]) - torch.log(torch.tensor(3.0)) <= 1.0 + 1e-9


# ----- DVERGE --------------------------------------------------------------------------------------
def test_round_robin_pairs_every_sub_model_with_every_other_ones_images():
    M, B = 4, 2
    x = torch.arange(M, dtype=torch.float64).view(M, 1, 1).expand(M, B, 3).clone()
    rr = round_robin(x)
    assert rr.shape == (M, (M - 1) * B, 3)
    for j in range(M):
        sources = sorted({int(v) for v in rr[j, :, 0]})
        assert sources == sorted(set(range(M)) - {j})


@BACKENDS
@pytest.mark.parametrize("adv", [False, True])
def test_dverge_loss_matches_the_pairwise_loop(gen, backend, adv):
    model, M, B = _model(), 3, 4
    x_dist = torch.rand(M, B, 3, IMG, IMG, generator=gen, dtype=torch.float64)
    x_adv = torch.rand(M, B, 3, IMG, IMG, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (B,), generator=gen)
    coeff = 0.7
    xa = x_dist.clone().requires_grad_(True)
    inputs = round_robin(xa)
    if adv:
        inputs = torch.cat([inputs, x_adv], 1)
    loss, terms = dverge_loss(model(inputs)[0], y, (M - 1) * B, coeff, backend)
    loss.backward()
    got = _grads(model, xa)
    model.zero_grad()
    xb = x_dist.clone().requires_grad_(True)
    ref = 0
    for i in range(M):          # DVERGE's train_dverge.py: model i on every other j's images
        for j in range(M):
            if i != j:
                ref = ref + Fn.cross_entropy(model(xb[j])[0][i], y)
    if adv:
        ref = coeff * ref + sum(Fn.cross_entropy(model(x_adv[i])[0][i], y) for i in range(M))
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    _assert_grads_close(got, _grads(model, xb))
    assert ("adv_ce" in terms) == adv


def _feature_hooks(model):
    """Activations captured independently of packed_features: stem output, conv2 inputs,
    block outputs (all after their ReLU)."""
    seen = {}
    trunk = model.net.trunk
    hs = [trunk.stem.register_forward_hook(lambda m, i, o: seen.__setitem__("stem", o))]
    for k, blk in enumerate(trunk.blocks):
        hs.append(blk.conv2.register_forward_pre_hook(
            lambda m, i, k=k: seen.__setitem__(("mid", k), i[0])))
        hs.append(blk.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(("out", k), o)))
    return seen, hs


def test_packed_features_follow_dvergees_layer_numbering(gen):
    M, depth = 3, 14
    model = _model(M=M, depth=depth)
    x = torch.rand(M, 2, 3, IMG, IMG, generator=gen, dtype=torch.float64)
    seen, hooks = _feature_hooks(model)
    with torch.no_grad():
        logits = model(x)[0]
    for h in hooks:
        h.remove()

    def unpack(h):
        return h.reshape(h.shape[0], M, -1).transpose(0, 1)

    with torch.no_grad():
        feats = {l: packed_features(model, x, l) for l in range(1, depth + 1)}
    torch.testing.assert_close(feats[1].relu(), unpack(seen["stem"]))
    for l in range(2, depth):
        k = (l - 2) // 2
        want = seen[("mid", k)] if (l - 2) % 2 == 0 else seen[("out", k)]
        torch.testing.assert_close(feats[l].relu(), unpack(want))
        assert (feats[l] < 0).any()   # read before the ReLU
    torch.testing.assert_close(feats[depth], logits)
    # sub-model m's features depend on x[m] alone
    x2 = x.clone()
    x2[0] = torch.rand(x.shape[1:], generator=gen, dtype=torch.float64)
    with torch.no_grad():
        f2 = packed_features(model, x2, 5)
    assert not torch.allclose(f2[0], feats[5][0])
    torch.testing.assert_close(f2[1:], feats[5][1:])
    with pytest.raises(ValueError, match="layer"):
        packed_features(model, x, depth + 1)


def _dverge_distillation_loop(model, x, x_t, layer, eps, alpha, steps):
    """DVERGE's distillation.Linf_distillation for each sub-model alone: MSE to the target's
    features, L1-normalised gradient with momentum 1, descending sign steps, clip, box."""
    out = []
    for i in range(model.num_models):
        with torch.no_grad():
            target = packed_features(model, x_t, layer)[i]
        xa, g = x.clone(), torch.zeros_like(x)
        for _ in range(steps):
            xa.requires_grad_(True)
            loss = Fn.mse_loss(packed_features(model, xa, layer)[i], target)
            (grad,) = torch.autograd.grad(loss, xa)
            grad = grad / grad.flatten(1).norm(p=1, dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            g = g + grad
            xa = xa.detach() - alpha * g.sign()
            xa = torch.max(torch.min(xa, x + eps), x - eps).clamp(0, 1)
        out.append(xa.detach())
    return torch.stack(out)


@pytest.mark.parametrize("layer", [1, 4, 7, 8])
def test_feature_distillation_on_the_engine_matches_dvergees_loop(gen, layer):
    model = _model(M=3, depth=8)
    x, _ = _batch(gen, B=3)
    x_t = torch.rand(x.shape, generator=gen, dtype=torch.float64)
    got = distill(model, x, x_t, layer, 0.07, 0.007, 4, REFERENCE)
    ref = _dverge_distillation_loop(model, x, x_t, layer, 0.07, 0.007, 4)
    assert got.shape == (3, *x.shape)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    with torch.no_grad():   # and it pulls each sub-model's features toward the target's
        before = (packed_features(model, x, layer) - packed_features(model, x_t, layer)).pow(2).mean()
        after = (packed_features(model, got, layer) - packed_features(model, x_t, layer)).pow(2).mean()
    assert after < before


def test_derangement_and_epoch_layer():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 17):
        for _ in range(20):
            d = derangement(n, g)
            assert sorted(d.tolist()) == list(range(n)) and (d != torch.arange(n)).all()
    with pytest.raises(ValueError):
        derangement(1)
    layers = [epoch_layer(0, e, 20) for e in range(200)]
    assert set(layers) == set(range(1, 21))
    assert layers == [epoch_layer(0, e, 20) for e in range(200)]   # a resumed run agrees
    assert layers != [epoch_layer(1, e, 20) for e in range(200)]
    assert epoch_layer(0, 5, 20, fixed=3) == 3


# ----- configuration -------------------------------------------------------------------------------
def test_each_method_has_its_sources_defaults_unless_given():
    assert set(METHODS) == {"cda2", "ensemble", "adp", "gal", "dverge"}
    adp = TrainConfig.for_method("adp").validate()
    assert (adp.optimizer, adp.lr, adp.weight_decay, adp.epochs) == ("adam", 1e-3, 1e-4, 200)
    assert adp.lr_at(99) == 1e-3 and adp.lr_at(100) == pytest.approx(1e-4) \
        and adp.lr_at(150) == pytest.approx(1e-5)
    dv = TrainConfig.for_method("dverge", epochs=10, lr=0.05)
    assert (dv.optimizer, dv.lr, dv.epochs, dv.distill_eps, dv.distill_steps) == ("sgd", 0.05, 10, 0.07, 10)
    assert TrainConfig.for_method("cda2") == TrainConfig()
    for name in ("ensemble", "gal", "dverge"):
        assert TrainConfig.for_method(name).epochs == 200


@pytest.mark.parametrize("method, change, needle", [
    ("cda2", dict(adp_alpha=1.0), "adp_alpha"), ("ensemble", dict(sigma=2.0), "sigma"),
    ("cda2", dict(adv=True), "adv"), ("gal", dict(init_from="x"), "init_from"),
    ("adp", dict(num_models=1), "num_models"), ("dverge", dict(distill_layer=21), "distill_layer"),
    ("gal", dict(gal_noise=-1.0), "gal_noise"), ("dverge", dict(distill_steps=0), "distill_steps"),
    ("nope", {}, "method"),
])
def test_options_of_other_methods_and_bad_values_are_refused(method, change, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.for_method(method, **change).validate()


# ----- smoke runs through the CLI, with checkpoint and exact resume --------------------------------
TINY = tiny_train(depth=8, batch_size=8, train_limit=16, test_limit=None, epochs=None, lr=0.01,
                  schedule="constant")  # (so 1 epoch + resume = 2)
SMOKE = {"ensemble": [], "ensemble-adv": ["--adv"], "adp": [], "adp-adv": ["--adv"], "gal": [],
         "dverge": ["--init-from", "{ensemble}"], "dverge-plus-adv": ["--plus-adv"]}


def _argv(name, run, tmp_path, epochs, *extra):
    method = name.split("-")[0]
    opts = [a.format(ensemble=str(tmp_path / "ensemble-base")) for a in SMOKE[name]]
    tiny = [*TINY, "--distill-steps", "2"] if method == "dverge" else TINY  # DVERGE's only
    return ["train", "--method", method, *tiny, *opts, "--epochs", str(epochs),
            "--out-dir", str(tmp_path / run), *extra]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOKE))
def test_smoke_train_checkpoint_and_exact_resume(tmp_path, capsys, name):
    if name.startswith("dverge"):   # DVERGE starts from a trained ensemble
        assert main(_argv("ensemble", "ensemble-base", tmp_path, 1)) == 0
    assert main(_argv(name, "straight", tmp_path, 2)) == 0
    assert main(_argv(name, "resumed", tmp_path, 1)) == 0
    assert main(_argv(name, "resumed", tmp_path, 2, "--resume")) == 0
    capsys.readouterr()
    a, meta_a = load_checkpoint(tmp_path / "straight")
    b, meta_b = load_checkpoint(tmp_path / "resumed")
    assert meta_a["config"]["method"] == name.split("-")[0] and meta_a["epoch"] == meta_b["epoch"] == 2
    assert set(a) == set(b)
    for k in a:   # the resumed run is the uninterrupted one, bit for bit
        assert torch.equal(a[k], b[k]), k
    hist = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert len(hist) == 2 and all(h["loss"] == h["loss"] for h in hist)   # finite, not NaN
    assert 0.0 <= hist[-1]["clean_acc"] <= 1.0
    assert (hist[-1]["adv_acc"] is None) == (name in ("ensemble", "adp", "gal", "dverge"))
    if name == "dverge":   # started from the ensemble: its PPD heads (never trained) are the same
        base, _ = load_checkpoint(tmp_path / "ensemble-base")
        ppd = [k for k in a if k.startswith("model.") and "ppd_head" in k]
        assert ppd and all(torch.equal(a[k], base[k]) for k in ppd)


@pytest.mark.slow
def test_eval_attacks_an_ensemble_run_as_the_ensemble(tmp_path, capsys):
    """A baseline's PPD heads are never trained, so Algorithm 2 over them would evaluate a
    random selection: cda2 eval evaluates such a run as its ensemble and says so."""
    assert main(_argv("ensemble", "ens", tmp_path, 1)) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(tmp_path / "ens"), "--attack", "pgd", "--eps", "0.03",
                 "--n-samples", "8", "--batch-size", "8", "--steps", "1", "--restarts", "1",
                 "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    report = json.loads((out / "robustness.json").read_text())
    assert report["config"]["targets"] == {"ens": "ensemble"}


# ----- cda2 compare --------------------------------------------------------------------------------
def _fake_run(folder, method, seconds=(10.0, 12.0), adv=False, init_from=None):
    folder.mkdir(parents=True)
    cfg = TrainConfig.for_method(method, adv=adv, init_from=init_from, depth=8).to_dict()
    doc = {"format": FORMAT, "epoch": len(seconds), "config": cfg}
    doc[DOCUMENT_KEY] = document_digest(doc)  # compare trusts only a digested document
    (folder / "checkpoint.json").write_text(json.dumps(doc))
    (folder / "metrics.json").write_text(json.dumps(
        [{"epoch": i + 1, "seconds": s, "images_per_s": 100.0 / s} for i, s in enumerate(seconds)]))
    return str(folder)


def _rows(pgd, adaptive=None, parts=("apgd-ce",)):
    rows = {"PGD-5x1 (ce)": {"0.01": pgd, "0.03": pgd / 2}}
    for p in parts:
        rows[f"adaptive: {p}"] = {"0.01": 0.0, "0.03": 0.0}
    if adaptive is not None:
        rows["adaptive (worst)"] = {"0.01": adaptive, "0.03": adaptive / 2}
    rows["transfer (all 3 variants)"] = {"0.01": 0.8, "0.03": 0.6}
    rows["Square-200"] = {"0.03": 0.5}
    rows["worst case (all attacks)"] = {"0.01": 0.1, "0.03": 0.05}
    return rows


def test_compare_prints_the_papers_layout_and_writes_json_csv_png(tmp_path, capsys):
    runs = {"cda2": _fake_run(tmp_path / "c", "cda2"), "ens": _fake_run(tmp_path / "e", "ensemble"),
            "dv": None, "adp": _fake_run(tmp_path / "a", "adp", adv=True)}
    runs["dv"] = _fake_run(tmp_path / "d", "dverge", seconds=(30.0,), init_from=runs["ens"])
    doc = {"config": {"checkpoints": {"c": runs["cda2"], "e": runs["ens"], "d": runs["dv"],
                                      "a": runs["adp"]}},
           "clean": {"c": 0.5, "e": 0.6, "d": 0.55, "a": 0.45},
           "robust_accuracy": {"c": _rows(0.4, 0.3, parts=("soft(T=gap)", "apgd-ce")),
                               "e": _rows(0.2, 0.2), "d": _rows(0.25, 0.25),
                               "a": _rows(0.3, 0.3, parts=("soft(T=gap)",))}}
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "robustness.json").write_text(json.dumps(doc))
    out = tmp_path / "cmp"
    assert main(["compare", runs["cda2"], runs["ens"], runs["dv"], runs["adp"],
                 "--eval", str(tmp_path / "ev"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert "PGD" in lines[0] and "adaptive worst" in lines[0] and "Square" in lines[0]
    row = {ln.split()[0]: ln.split() for ln in lines[3:7]}
    assert row["cda2"][2:5] == ["50.0", "40.0", "20.0"]       # clean, PGD at 0.01 and 0.03
    assert row["cda2"][5:7] == ["30.0", "15.0"]               # its adaptive worst case
    assert row["ensemble"][5:7] == ["n/a", "n/a"]             # an ensemble has no selection
    assert row["dverge"][-3:] == ["30", "(+22)", "3.3"]       # own time (+ the ensemble it started from)
    assert row["cda2"][-2:] == ["22", "9.1"]                  # 200 images in 22 s
    # adp's rows include selection attacks: it was evaluated as a collaboration, and it says so
    assert "NOTE [a]: adp+adv has no selection" in text and "NOTE [e]" not in text
    res = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in res["runs"]] == ["cda2", "ensemble", "dverge", "adp+adv"]
    assert res["runs"][0]["pgd"] == {"0.01": 0.4, "0.03": 0.2} and res["columns"]["square"] == ["0.03"]
    assert "adaptive: soft(T=gap)" in res["runs"][0]["all_rows"]
    csv_text = (out / "compare.csv").read_text().splitlines()
    assert csv_text[0].startswith("method,run,clean,pgd@0.01,pgd@0.03,adaptive@0.01")
    assert csv_text[2].split(",")[5] == ""                     # ensemble: no adaptive cell
    assert (out / "compare.png").stat().st_size > 5_000
    # an earlier comparison is not overwritten without --force
    assert main(["compare", runs["cda2"], "--eval", str(tmp_path / "ev"), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_compare_without_results_or_metrics_says_what_is_missing(tmp_path, capsys):
    run = _fake_run(tmp_path / "r", "gal")
    assert main(["compare", run, "--out", str(tmp_path / "o")]) == 0
    assert "no robustness.json among the given ones evaluates this run" in capsys.readouterr().out
    (tmp_path / "r" / "metrics.json").unlink()
    assert main(["compare", run, "--out", str(tmp_path / "o2")]) == 2
    assert "metrics.json" in capsys.readouterr().err
    assert main(["compare", run, "--eval", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o3")]) == 2


@pytest.mark.parametrize("doc", ['{"config": {"checkpoints": [1, 2]}}',
                                 '{"config": {"checkpoints": {"r": "RUN"}}, "robust_accuracy": {"r": 3}}',
                                 '[1, 2]'])
def test_compare_refuses_a_damaged_robustness_json_in_one_line(tmp_path, capsys, doc):
    run = _fake_run(tmp_path / "r", "gal")
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "robustness.json").write_text(doc.replace("RUN", run))
    assert main(["compare", run, "--eval", str(tmp_path / "ev"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a robustness.json of cda2 eval" in err[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
