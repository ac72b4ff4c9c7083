"""The caption gate's policy: what is usable, what passes, which attempt of a key is selected, when a key is done
and when a key is asked again. Each rule is defined here and nowhere else.

The gate records the results in the caption store (``usable``, ``passed``, ``selected``) and every reader reads those
columns, so the segmenter, the report and a resumed run agree with the gate without knowing its rules. The two rules
the store applies itself, selection across runs (compaction) and done keys (resume), come from here as functions
(``compact(store, select=policy.select)``, ``attempt_counts(store, done=policy.done)``): ``manifests`` imports nothing
of the project. A gate mode other than today's absolute tau (a percentile of the similarities, a contrastive margin)
belongs inside :meth:`GatePolicy.passes`; readers then see its results in the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from manifests.caption_store import KEY_COLUMNS
from manifests.run_manifest import CaptionsConfig


@dataclass(frozen=True)
class GatePolicy:
    """The gate of a run, from the manifest's ``captions`` settings.

    Attributes:
        tau: the similarity (eq. 2) a usable caption must reach to pass.
        max_attempts: attempts per key and run for an expert that a re-prompt can change.
    """

    tau: float = 0.55
    max_attempts: int = 3

    @classmethod
    def from_captions(cls, captions: CaptionsConfig) -> GatePolicy:
        """The policy a manifest's ``captions`` section asks for."""
        return cls(tau=captions.tau, max_attempts=captions.max_attempts)

    def with_tau(self, tau: float) -> GatePolicy:
        """This policy at another threshold (a tau sweep asks what would pass at each)."""
        return replace(self, tau=tau)

    def usable(self, caption: str | None, error: str | None) -> bool:
        """Whether an answer is a caption at all: no error and some text besides whitespace. Only usable captions are
        scored, may pass, and make their key done."""
        return error is None and caption is not None and caption.strip() != ""

    def passes(self, similarity: ArrayLike, usable: ArrayLike) -> np.ndarray:
        """Whether each attempt passes the gate: a usable caption whose similarity reaches tau (element-wise).

        Args:
            similarity: eq. 2 similarities; None or NaN where the attempt has no score.
            usable: the attempts' ``usable`` flags.
        """
        similarity = np.asarray(similarity, dtype=np.float64)  # None becomes NaN, which reaches no tau
        return np.asarray(usable, dtype=bool) & (similarity >= self.tau)

    def select(self, frame: pd.DataFrame) -> pd.Series:
        """Which attempt of each (tile, expert, prompt) is selected: the most CLIP-similar usable one, the earliest on
        ties. Attempts without a usable caption rank last, so a key whose every attempt failed still has one selected
        row (its earliest), as the store's contract asks.

        Args:
            frame: attempts with the key columns, ``attempt``, ``similarity`` and ``usable``; a unique index.

        Returns:
            The ``selected`` flag of every row of ``frame``, on its index.
        """
        rank = frame["similarity"].astype("float64").where(frame["usable"].astype(bool)).fillna(float("-inf"))
        order = frame.assign(_rank=rank).sort_values(["_rank", "attempt"], ascending=[False, True], kind="stable")
        winners = order.drop_duplicates(list(KEY_COLUMNS)).index
        return pd.Series(frame.index.isin(winners), index=frame.index, name="selected")

    def done(self, frame: pd.DataFrame) -> pd.Series:
        """The rows that make their key done, which a resumed run skips: a selected attempt with a usable caption.

        A key whose every attempt failed (a server down for the night, an empty answer) is not done: a later run
        retries it with the next attempt numbers. A caption that did not pass is done: its key had its attempts.

        Args:
            frame: attempts with the key columns, ``attempt``, ``selected``, ``usable`` and ``passed``.
        """
        return frame["selected"].astype(bool) & frame["usable"].astype(bool)

    def rounds(self, reprompts: bool) -> int:
        """How many attempts one run makes at a key at most: ``max_attempts``, or one for an expert whose answer a
        re-prompt cannot change (``Expert.reprompts`` False: re-asking would repeat it under a sampling record)."""
        return self.max_attempts if reprompts else 1

    def reprompt(self, passed: bool, readable: bool) -> bool:
        """Whether a key is asked again (within :meth:`rounds`) after an attempt: it did not pass, and its tile's
        image can be read (an unreadable tile fails the same way however often it is asked)."""
        return not passed and readable
