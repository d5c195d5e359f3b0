"""
Smoke tests of estimators.py: every measurement of the estimator study runs on a tiny random model
and the tiny hand-made pairs of tiny_vocab.py, and returns finite numbers under the keys the tables,
the [claims] block and the results file read. (The study's numbers themselves need a trained
checkpoint: python studies/estimators.py --ckpt=....) CPU, about a second.

    python -m pytest tests/test_estimators.py -q
"""
import math

import pytest
import torch

import estimators as E
from test_likelihood import tiny_model
from tiny_vocab import TOK, mixed_batch

NAMES = set(E.ESTIMATORS)


def finite(x) -> bool:
    """Every number in a nested dict / list is finite."""
    if isinstance(x, dict):
        return all(finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(finite(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return True


@pytest.fixture(scope="module")
def study():
    """Every measurement at tiny sizes: 3 pairs (2 edit, 1 vqa) x 16 value draws, 2 pairs x 4
    gradient draws, 2 windows (2 text + 1 image slot; 3 text slots) x 4 candidates x 2 draws."""
    model = tiny_model(seed=1)
    for p in model.parameters():
        p.requires_grad_(True)
    batch = mixed_batch()
    pairs = [batch.rows(torch.tensor([r])) for r in range(3)]
    g = torch.Generator().manual_seed(0)
    draws = [E.value_draws(model, b, TOK, 16, g) for b in pairs]
    P = batch.P
    windows = [(pairs[0], [P + 0, P + 1, P + 5]), (pairs[1], [P + 0, P + 1, P + 2])]
    cases = E.window_cases(model, windows, TOK, g, n_cand=4)
    out = {"draws": draws, "cases": cases, "values": E.value_variance(draws),
           "cover": E.coverage_and_weights(draws), "grads": E.gradient_variance(model, pairs[:2], TOK, 4, g),
           "rho": E.rank_correlation(model, cases, TOK, g, reps=2), "bias": E.bias(model, cases, TOK, g, k_mc=4)}
    return out


def test_value_draws_shapes(study):
    for d in study["draws"]:
        assert set(d["values"]) == NAMES and set(d["coverage"]) == NAMES and d["t1"].shape == (16,)
        assert all(v.shape == (16,) and torch.isfinite(v).all() for v in d["values"].values())
        assert torch.all(d["coverage"]["complementary"] == 1.0)          # every token, every draw


def test_value_variance(study):
    v = study["values"]
    assert set(v["var"]) == set(v["ratio"]) == set(v["ratio_per_pair"]) == NAMES and finite(v)
    assert v["ratio"]["complementary"] == pytest.approx(1.0) and v["var"]["one_step"] == 0.0
    assert set(v["ratio_per_pair"]["elbo_mc n=2"]) == {"median", "min", "max"}
    assert len(v["per_pair"]) == 3


def test_coverage_and_weights(study):
    c = study["cover"]
    assert set(c["coverage"]) == NAMES and finite(c)
    assert c["coverage"]["complementary"] == 1.0 and c["coverage"]["elbo_mc n=1"] < 1.0
    for k in ("elbo1_small_k_var_share", "elbo1_small_k_draw_share", "comp_t1_share"):
        assert 0.0 <= c[k] <= 1.0


def test_gradient_variance(study):
    gr = study["grads"]
    assert set(gr["grad_var"]) == set(gr["ratio"]) == NAMES and finite(gr)
    assert gr["grad_var"]["complementary"] > 0 and gr["grad_var"]["one_step"] == 0.0
    assert set(gr["grad_mean_sq"]) == NAMES - {"one_step"} and len(gr["per_pair"]) == 2


def test_bias_against_exact(study):
    b = study["bias"]
    assert set(b["bias"]) == NAMES and finite(b) and len(b["windows"]) == 2
    for k in NAMES:
        assert set(b["bias"][k]) == {"mean", "minus_elbo", "minus_any_order"}
    # elbo_mc's exact expectation is the ELBO itself
    assert b["bias"]["elbo_mc n=2"]["minus_elbo"] == pytest.approx(0.0, abs=1e-9)
    assert all(len(c["cands"]) == 4 and len(c["exact"]) == 4 for c in study["cases"])


def test_rank_correlation(study):
    rho = study["rho"]
    assert set(rho) == NAMES and finite(rho)
    for k in NAMES:
        assert set(rho[k]) == {"any_order", "elbo"} and all(-1.0 <= r <= 1.0 for r in rho[k].values())
    assert E.spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])) == pytest.approx(0.5)


def test_by_family_and_claims(study):
    per_pair = [{"task": t, "L": 8, "n_img": 3, "var": study["values"]["per_pair"][j],
                 "comp_t1_share": study["cover"]["comp_t1_share_per_pair"][j]}
                for j, t in enumerate(["edit", "vqa", "edit"])]
    per_grad = [{"task": t, **study["grads"]["per_pair"][j]} for j, t in enumerate(["edit", "vqa"])]
    fam = E.by_family(per_pair, per_grad)
    assert set(fam) == {"edit", "vqa"} and finite(fam)
    lines = E.claims(study)
    assert lines[0].startswith("[claims]") and [ln.split(",")[0] for ln in lines[1:]] == \
        ["claim 1"] * 3 + ["claim 2", "claim 3", "claim 4"]
