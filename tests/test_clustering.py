"""Community detection (the sentence-transformers rule WWbL uses to group proposal captions)."""
from __future__ import annotations

import numpy as np
import pytest

from wsolbench.clustering import closest_to_centroid, community_detection


def _near(v, rng, eps=0.02):
    return v + eps * rng.standard_normal(v.shape)


def test_groups_near_duplicates_and_drops_singletons():
    rng = np.random.default_rng(0)
    a, b, c = np.eye(3, 16)  # three orthogonal "meanings"
    emb = np.stack([_near(a, rng), _near(b, rng), _near(a, rng), _near(a, rng), _near(b, rng), c])
    groups = community_detection(emb, threshold=0.85, min_size=2)
    assert [sorted(g) for g in groups] == [[0, 2, 3], [1, 4]]  # largest first; the lone "c" is no community


def test_seed_first_and_no_overlap():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(8)
    emb = np.stack([_near(base, rng, 0.01) for _ in range(5)])
    groups = community_detection(emb, threshold=0.85, min_size=2)
    assert len(groups) == 1 and sorted(groups[0]) == list(range(5))
    sims = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (emb[groups[0][0]] / np.linalg.norm(emb[groups[0][0]]))
    assert sims[groups[0][0]] == pytest.approx(1.0)
    # members after the seed are ordered by decreasing similarity to the seed
    assert np.all(np.diff(sims[groups[0]][1:]) <= 1e-12)


def test_threshold_and_min_size():
    x = np.array([[1.0, 0.0], [np.cos(0.5), np.sin(0.5)]])  # cosine 0.877
    assert community_detection(x, threshold=0.85, min_size=2) == [[0, 1]]
    assert community_detection(x, threshold=0.9, min_size=2) == []
    assert community_detection(x, threshold=0.85, min_size=3) == [[0, 1]]  # capped at N, as upstream
    assert community_detection(x[:1], threshold=0.85, min_size=2) == [[0]]
    assert community_detection(np.zeros((0, 4)), 0.85, 2) == []


def test_torch_input_and_centroid_member():
    torch = pytest.importorskip("torch")
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.9, -0.1, 0.0], [0.0, 0.0, 1.0]])
    groups = community_detection(emb, 0.85, 2)
    assert sorted(groups[0]) == [0, 1, 2]
    assert closest_to_centroid(emb, groups[0]) == 0  # (1, 0, 0) is the centre of the three
