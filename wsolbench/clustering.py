"""Community detection over embeddings (the "fast clustering" rule of sentence-transformers), written here.

WWbL groups the captions of its region proposals with this rule (cosine threshold 0.85, at least 2 members):

1. cosine similarity of every pair of (L2-normalised) embeddings;
2. every point whose ``min_size``-th most similar point (itself included) is at least ``threshold`` seeds a
   candidate community: all points with similarity >= ``threshold`` to it, ordered by decreasing similarity
   (so the seed comes first);
3. candidates are visited from the largest to the smallest (stable for equal sizes); the members not yet taken
   by an earlier community form the community if at least ``min_size`` remain;
4. the result is sorted by size, largest first.

As in sentence-transformers, ``min_size`` is capped at the number of points, so a single point forms a
community of one.
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
    """Communities of ``embeddings`` (N×D array or tensor) as lists of row indices, largest first.

    Each community lists its seed first, then the other members by decreasing similarity to the seed.
    """
    x = _as_unit_rows(embeddings)
    n = len(x)
    if n == 0:
        return []
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    k = min(int(min_size), n)
    sims = x @ x.T
    candidates: list[list[int]] = []
    for i in range(n):
        row = sims[i]
        # the k-th largest similarity of row i (row i includes the point itself, similarity 1)
        kth = np.partition(row, n - k)[n - k]
        if kth >= threshold:
            order = np.argsort(-row, kind="stable")
            members = [int(j) for j in order if row[j] >= threshold]
            if i in members:  # the seed first (ties at similarity 1 may sort another point ahead of it)
                members.remove(i)
                members.insert(0, i)
            candidates.append(members)
    candidates.sort(key=len, reverse=True)  # stable: equal sizes keep seed order
    taken: set[int] = set()
    communities: list[list[int]] = []
    for members in candidates:
        fresh = [j for j in members if j not in taken]
        if len(fresh) >= k:
            communities.append(fresh)
            taken.update(fresh)
    communities.sort(key=len, reverse=True)
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
