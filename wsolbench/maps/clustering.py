"""Community detection over embeddings, with the rule of sentence-transformers 2.2.0 (``util.community_detection``),
the version the official WWbL code pins; WWbL groups its proposals' captions with it (threshold 0.85, min 2):

1. cosine similarity of every pair of (L2-normalised) embeddings;
2. every point whose ``min_size``-th most similar point (itself included) is at least ``threshold`` gives a
   candidate: all points with similarity >= ``threshold`` to it, by decreasing similarity;
3. candidates are visited from the largest to the smallest (stable for equal sizes); a candidate sharing any
   point with a community already kept is dropped WHOLE (2.2.0; later versions keep its fresh points);
4. the kept communities, largest first.

sentence-transformers 2.2.0 fails when ``min_size`` exceeds the number of points; here that gives no community.
The library is not a dependency: its current versions implement the later overlap rule.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _as_unit_rows(embeddings) -> np.ndarray:
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().float().cpu().numpy()
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def community_detection(embeddings, threshold: float = 0.85, min_size: int = 2) -> list[list[int]]:
    """Communities of ``embeddings`` (N×D array or tensor) as lists of row indices, largest first; each lists
    its members by decreasing similarity to the point that formed it."""
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    x = _as_unit_rows(embeddings)
    n = len(x)
    if n < min_size:
        return []
    sims = x @ x.T
    candidates: list[list[int]] = []
    for row in sims:
        if np.sort(row)[n - min_size] >= threshold:  # the min_size-th largest similarity of the row
            order = np.argsort(-row, kind="stable")
            candidates.append([int(j) for j in order if row[j] >= threshold])
    candidates.sort(key=len, reverse=True)  # stable: equal sizes keep their order
    taken: set[int] = set()
    communities: list[list[int]] = []
    for members in candidates:
        if taken.isdisjoint(members):
            communities.append(members)
            taken.update(members)
    return communities


def closest_to_centroid(embeddings, members: Sequence[int]) -> int:
    """The member whose (unit) embedding is most similar to the normalised mean of the members' embeddings.

    WWbL names each caption cluster by this member's caption.
    """
    if len(members) == 0:
        raise ValueError("members is empty")
    x = _as_unit_rows(embeddings)[list(members)]
    centre = x.mean(axis=0)
    centre = centre / max(np.linalg.norm(centre), 1e-12)
    return int(members[int(np.argmax(x @ centre))])
