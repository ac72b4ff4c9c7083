"""The caption gate's policy: what is usable, what passes, which attempt of a key is selected, when a key is done
and when a key is asked again. Each rule is defined here and nowhere else.

The gate records the results in the caption store (``usable``, ``passed``, ``selected``) and every reader reads those
columns, so the segmenter, the report and a resumed run agree with the gate without knowing its rules. The two rules
the store applies itself, selection across runs (compaction) and done keys (resume), come from here as functions
(``compact(store, select=policy.select)``, ``attempt_counts(store, done=policy.done)``): ``manifests`` imports nothing
of the project.

The gate mode (``captions.gate.mode``) decides the number an attempt is judged by (its ``gate_score``) and the
threshold it must reach (its ``gate_threshold``); both are recorded per row with ``gate_mode``:

- ``absolute`` (the paper): the eq. 2 similarity against ``tau``.
- ``percentile``: the similarity against a threshold per (expert, prompt), the ``1 - keep_top`` quantile of the
  attempt-0 similarities of a calibration sample (:meth:`GatePolicy.percentile_threshold`), so about ``keep_top``
  of each expert's captions per prompt pass whatever CLIP's scale.
- ``contrastive``: the similarity to the caption's own tile minus its mean similarity to the other tiles of the
  shard, against ``margin``: text that fits any tile as well as its own (generic, or another tile's) fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from manifests.caption_store import KEY_COLUMNS
from manifests.errors import InputError
from manifests.run_manifest import CaptionsConfig, GateMode


@dataclass(frozen=True)
class GatePolicy:
    """The gate of a run, from the manifest's ``captions`` settings.

    Attributes:
        tau: the similarity (eq. 2) a usable caption must reach to pass (mode ``absolute``).
        max_attempts: attempts per key and run for an expert that a re-prompt can change.
        mode: ``absolute``, ``percentile`` or ``contrastive`` (see the module's docstring).
        margin: the contrastive score a caption must reach (mode ``contrastive``).
        keep_top: the share of a calibration sample's captions per (expert, prompt) that pass (mode ``percentile``).
        thresholds: the derived threshold per (expert, prompt id) (mode ``percentile``; see :meth:`with_thresholds`).
    """

    tau: float = 0.55
    max_attempts: int = 3
    mode: GateMode = "absolute"
    margin: float = 0.02
    keep_top: float = 0.3
    thresholds: dict[tuple[str, str], float] = field(default_factory=dict)

    @classmethod
    def from_captions(
        cls, captions: CaptionsConfig, thresholds: dict[tuple[str, str], float] | None = None
    ) -> GatePolicy:
        """The policy a manifest's ``captions`` section asks for; ``thresholds`` are a percentile gate's derived
        thresholds per (expert, prompt id)."""
        gate = captions.gate
        return cls(
            tau=captions.tau, max_attempts=captions.max_attempts, mode=gate.mode, margin=gate.margin,
            keep_top=gate.keep_top, thresholds=dict(thresholds or {}),
        )  # fmt: skip

    def with_tau(self, tau: float) -> GatePolicy:
        """This policy at another threshold (a tau sweep asks what would pass at each)."""
        return replace(self, tau=tau)

    def with_thresholds(self, thresholds: dict[tuple[str, str], float]) -> GatePolicy:
        """This policy with a percentile gate's derived thresholds per (expert, prompt id)."""
        return replace(self, thresholds=dict(thresholds))

    def describe(self, shown: int = 6) -> str:
        """One line: the gate mode and its threshold(s), as a run summary shows it.

        Args:
            shown: how many derived thresholds of a percentile gate are listed before the rest is counted.
        """
        if self.mode == "absolute":
            return f"gate: absolute, tau {self.tau:g}"
        if self.mode == "contrastive":
            return f"gate: contrastive, margin {self.margin:g} against the other tiles of each shard"
        pairs = [f"{expert}/{pid} {value:.3f}" for (expert, pid), value in sorted(self.thresholds.items())]
        listed = ", ".join(pairs[:shown]) or "none derived"
        more = f", ... ({len(pairs) - shown} more)" if len(pairs) > shown else ""
        return f"gate: percentile keep_top {self.keep_top:g}, thresholds per expert/prompt: {listed}{more}"

    @property
    def contrastive(self) -> bool:
        """Whether the gate scores a caption against the other tiles of its shard too."""
        return self.mode == "contrastive"

    def threshold(self, expert: str, prompt_id: str) -> float:
        """The number an attempt's ``gate_score`` must reach: tau, the margin, or the derived threshold of the
        (expert, prompt).

        Raises:
            InputError: a percentile gate without a derived threshold for this (expert, prompt).
        """
        if self.mode == "absolute":
            return self.tau
        if self.mode == "contrastive":
            return self.margin
        if (expert, prompt_id) not in self.thresholds:
            raise InputError(
                f"percentile gate: no derived threshold for expert '{expert}', prompt {prompt_id} (calibrate first)"
            )
        return self.thresholds[(expert, prompt_id)]

    def gate_score(self, similarity: float | None, others: float | None = None) -> float | None:
        """The number an attempt is judged by: its similarity, or (contrastive) its similarity minus its mean
        similarity to the other tiles of its shard. None where the attempt is unscored, or where a contrastive gate
        has no other tile to compare with (such an attempt never passes).

        Args:
            similarity: the eq. 2 similarity of the caption to its own tile, None when unscored.
            others: the mean eq. 2 similarity of the caption to the shard's other tiles, None when there are none.
        """
        if similarity is None:
            return None
        if not self.contrastive:
            return float(similarity)
        return None if others is None else float(similarity) - float(others)

    def percentile_threshold(self, similarities: ArrayLike) -> float:
        """A percentile gate's threshold from the attempt-0 similarities of a calibration sample: their
        ``1 - keep_top`` quantile (linear interpolation), so about ``keep_top`` of them reach it.

        Raises:
            InputError: no similarity to derive it from.
        """
        values = np.asarray(similarities, dtype=np.float64)
        values = values[~np.isnan(values)]
        if values.size == 0:
            raise InputError("percentile gate: the calibration sample has no usable caption to derive a threshold")
        return float(np.quantile(values, 1.0 - self.keep_top))

    def usable(self, caption: str | None, error: str | None) -> bool:
        """Whether an answer is a caption at all: no error and some text besides whitespace. Only usable captions are
        scored, may pass, and make their key done."""
        return error is None and caption is not None and caption.strip() != ""

    def passes(self, score: ArrayLike, usable: ArrayLike, threshold: ArrayLike | None = None) -> np.ndarray:
        """Whether each attempt passes the gate: a usable caption whose gate score reaches its threshold
        (element-wise).

        Args:
            score: the attempts' ``gate_score`` (the similarity in modes absolute and percentile); None or NaN where
                the attempt has no score.
            usable: the attempts' ``usable`` flags.
            threshold: the attempts' ``gate_threshold``; None for tau (mode absolute) or the margin (contrastive).
        """
        score = np.asarray(score, dtype=np.float64)  # None becomes NaN, which reaches no threshold
        if threshold is None:
            if self.mode == "percentile":
                raise InputError("percentile gate: passes() needs the thresholds of the attempts")
            threshold = self.tau if self.mode == "absolute" else self.margin
        return np.asarray(usable, dtype=bool) & (score >= np.asarray(threshold, dtype=np.float64))

    def select(self, frame: pd.DataFrame) -> pd.Series:
        """Which attempt of each (tile, expert, prompt) is selected: the usable one with the best ``gate_score`` (the
        similarity, or the contrastive score), the earliest on ties. Attempts without a usable caption or a score rank
        last, so a key whose every attempt failed still has one selected row (its earliest), as the store's contract
        asks.

        Args:
            frame: attempts with the key columns, ``attempt``, ``gate_score`` and ``usable``; a unique index.

        Returns:
            The ``selected`` flag of every row of ``frame``, on its index.
        """
        rank = frame["gate_score"].astype("float64").where(frame["usable"].astype(bool)).fillna(float("-inf"))
        order = frame.assign(_rank=rank).sort_values(["_rank", "attempt"], ascending=[False, True], kind="stable")
        winners = order.drop_duplicates(list(KEY_COLUMNS)).index
        return pd.Series(frame.index.isin(winners), index=frame.index, name="selected")

    # Columns true on every row ``done`` flags: a store reads only those rows (``done_keys(..., requires=...)``).
    DONE_REQUIRES = ("selected", "usable")

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
