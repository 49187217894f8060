"""Does an attribution follow the play the prompt names? Three figures per prompt and ranking.

For a prompt "Speak as Hamlet in Hamlet." and a ranking of the training speeches (most supporting first):
whether the top-1 speech is from Hamlet, the fraction of the top 10 that is, and the fraction of the 10 most
opposing speeches that is (speeches of one play share the prompt, so they compete for its answer). A ranking
by random scores (seeded) and the chance level (the play's share of the training rows) are the baselines.
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
    bottom10: float  # fraction of the TOP most opposing from the prompt's play

    def describe(self) -> dict:
        return {"top1": self.top1, f"top{TOP}": round(self.top10, 3), f"bottom{TOP}": round(self.bottom10, 3)}


def own_play(
    supporting: Sequence[str], opposing: Sequence[str], play_of: Mapping[str, str], play: str, top: int = TOP
) -> OwnPlay:
    """The three figures for one ranking: ids most supporting first, and most opposing first (at least `top`
    of each)."""
    if len(supporting) < top or len(opposing) < top:
        raise ValueError(f"own_play needs the top and bottom {top} ids, got {len(supporting)} and {len(opposing)}")
    head = [play_of[i] == play for i in supporting[:top]]
    tail = [play_of[i] == play for i in opposing[:top]]
    return OwnPlay(top1=head[0], top10=sum(head) / top, bottom10=sum(tail) / top)


def random_ranking(ids: Sequence[str], seed: int) -> list[str]:
    """The ids ranked by seeded random scores (standard normal, one per row)."""
    scores = np.random.default_rng(seed).standard_normal(len(ids))
    return [ids[int(i)] for i in np.argsort(-scores, kind="stable")]


def chance(play_of: Mapping[str, str], play: str) -> float:
    """The play's share of the training rows: what either figure averages to under random scores."""
    return sum(value == play for value in play_of.values()) / len(play_of)
