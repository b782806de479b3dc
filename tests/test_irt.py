"""The full-subset estimate of a raced-out candidate (evomerge.irt): per-doc difficulty fitted on
complete candidates removes the bias of a prefix that is easier than the rest."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.irt import DocModel, task_model


def _world(seed: int = 0, docs: int = 200, references: int = 30, candidates: int = 60):
    """Binary scores from a Rasch model whose first 20 docs are easier than the rest."""
    rng = np.random.default_rng(seed)
    b = rng.normal(0.0, 1.5, docs)
    b[:20] -= 1.0
    sigmoid = lambda x: 1 / (1 + np.exp(-x))

    def draw(n):
        theta = rng.normal(1.0, 1.0, n)
        return (rng.random((n, docs)) < sigmoid(theta[:, None] - b[None, :])).astype(float)

    to_dict = lambda row: {d: float(v) for d, v in enumerate(row)}
    return [to_dict(r) for r in draw(references)], [to_dict(r) for r in draw(candidates)]


def test_rasch_estimate_removes_the_bias_of_an_easy_prefix():
    refs, cands = _world()
    model = task_model(refs)
    assert model.rasch
    plain, fitted = [], []
    for c in cands:
        truth = sum(c.values()) / len(c)
        prefix = {d: c[d] for d in range(20)}
        plain.append(sum(prefix.values()) / 20 - truth)
        fitted.append(model.full_mean(prefix) - truth)
    assert np.mean(plain) > 0.08  # the easy prefix flatters every candidate
    assert abs(np.mean(fitted)) < 0.02
    assert np.mean(np.abs(fitted)) < 0.5 * np.mean(np.abs(plain))


def test_docs_scored_count_as_they_are_and_a_complete_candidate_is_its_mean():
    refs, cands = _world(1)
    model = task_model(refs)
    c = cands[0]
    assert model.full_mean(c) == pytest.approx(sum(c.values()) / len(c))
    perfect = model.full_mean({d: 1.0 for d in range(20)})
    assert 0.0 < perfect < 1.0 and math.isfinite(perfect)


def test_metrics_outside_0_1_use_the_additive_model_exactly():
    offsets = [0.0, 2.0, -1.0, 5.0]
    refs = [{d: a + o for d, o in enumerate(offsets)} for a in (3.0, 7.0, 10.0)]
    model = task_model(refs)
    assert not model.rasch
    # ability 4 seen on the first two docs only: the other two are filled in exactly
    assert model.full_mean({0: 4.0, 1: 6.0}) == pytest.approx((4 + 6 + 3 + 9) / 4)


def test_without_references_the_estimate_is_the_plain_mean():
    model = DocModel([], ["a"])
    assert model.full_mean("a", {0: 1.0, 1: 0.0, 2: 1.0}) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same docs"):
        task_model([{0: 1.0, 1: 0.0}, {0: 1.0}])
