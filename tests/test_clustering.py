"""Community detection with the sentence-transformers 2.2.0 rule (WWbL's grouping of proposal captions)."""
from __future__ import annotations

import numpy as np
import pytest

from wsolbench.maps.clustering import closest_to_centroid, community_detection


def _near(v, rng, eps=0.02):
    return v + eps * rng.standard_normal(v.shape)


def _arc(*angles):
    return np.stack([[np.cos(a), np.sin(a)] for a in angles])


def test_groups_near_duplicates_and_drops_singletons():
    rng = np.random.default_rng(0)
    a, b, c = np.eye(3, 16)  # three orthogonal "meanings"
    emb = np.stack([_near(a, rng), _near(b, rng), _near(a, rng), _near(a, rng), _near(b, rng), c])
    groups = community_detection(emb, threshold=0.85, min_size=2)
    assert [sorted(g) for g in groups] == [[0, 2, 3], [1, 4]]  # largest first; the lone "c" is no community


def test_an_overlapping_candidate_is_dropped_whole():
    """Points 0.5 rad apart on an arc (neighbours' cosine 0.878, next-but-one 0.54): the candidates of points
    1..4 have three members each. 2.2.0 keeps point 1's {0, 1, 2}, drops point 2's and point 3's (they share a
    point with it) and keeps point 4's {3, 4, 5}; later versions would keep point 3's fresh {3, 4} instead."""
    groups = community_detection(_arc(0.0, 0.5, 1.0, 1.5, 2.0, 2.5), threshold=0.85, min_size=2)
    assert [sorted(g) for g in groups] == [[0, 1, 2], [3, 4, 5]]
    assert groups[0][0] == 1 and groups[1][0] == 4  # members by decreasing similarity: the forming point first


def test_members_by_decreasing_similarity():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(8)
    emb = np.stack([_near(base, rng, 0.01) for _ in range(5)])
    groups = community_detection(emb, threshold=0.85, min_size=2)
    assert len(groups) == 1 and sorted(groups[0]) == list(range(5))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit @ unit[groups[0][0]]
    assert np.all(np.diff(sims[groups[0]]) <= 1e-12)


def test_threshold_and_min_size():
    x = _arc(0.0, 0.5)  # cosine 0.877
    assert community_detection(x, threshold=0.85, min_size=2) == [[0, 1]]
    assert community_detection(x, threshold=0.9, min_size=2) == []
    assert community_detection(x, threshold=0.85, min_size=3) == []  # more than N points asked: none
    assert community_detection(x[:1], threshold=0.85, min_size=2) == []  # a lone caption is no cluster
    assert community_detection(x[:1], threshold=0.85, min_size=1) == [[0]]
    assert community_detection(np.zeros((0, 4)), 0.85, 2) == []
    with pytest.raises(ValueError):
        community_detection(x, 0.85, 0)


def test_torch_input_and_centroid_member():
    torch = pytest.importorskip("torch")
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.9, -0.1, 0.0], [0.0, 0.0, 1.0]])
    groups = community_detection(emb, 0.85, 2)
    assert sorted(groups[0]) == [0, 1, 2]
    assert closest_to_centroid(emb, groups[0]) == 0  # (1, 0, 0) is the centre of the three
