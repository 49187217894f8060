"""Does an attribution follow the play the prompt names? Two figures per prompt and ranking.

For a prompt "Speak as Hamlet in Hamlet." and a ranking of the training speeches (most supporting first):
whether the top-1 speech is from Hamlet, and the fraction of the top 10 that is. A ranking by random scores
(seeded) and the chance level (the play's share of the training rows) are the baselines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

TOP = 10


@dataclass(frozen=True)
class OwnPlay:
    top1: bool
    top10: float  # fraction of the top TOP from the prompt's play

    def describe(self) -> dict:
        return {"top1": self.top1, f"top{TOP}": round(self.top10, 3)}


def own_play(ranked_ids: Sequence[str], play_of: Mapping[str, str], play: str, top: int = TOP) -> OwnPlay:
    """The two figures for one ranking (ids most supporting first; at least `top` of them)."""
    if len(ranked_ids) < top:
        raise ValueError(f"own_play needs the top {top} ids, got {len(ranked_ids)}")
    head = [play_of[i] == play for i in ranked_ids[:top]]
    return OwnPlay(top1=head[0], top10=sum(head) / top)


def random_ranking(ids: Sequence[str], seed: int) -> list[str]:
    """The ids ranked by seeded random scores (standard normal, one per row)."""
    scores = np.random.default_rng(seed).standard_normal(len(ids))
    return [ids[i] for i in np.argsort(-scores, kind="stable")]


def chance(play_of: Mapping[str, str], play: str) -> float:
    """The play's share of the training rows: what either figure averages to under random scores."""
    return sum(value == play for value in play_of.values()) / len(play_of)
