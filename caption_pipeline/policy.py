"""The caption gate's policy: what is usable, what passes, which attempt of a key is selected, when a key is done
and when a key is asked again. Each rule is defined here and nowhere else.

The gate records the results in the caption store (``usable``, ``passed``, ``selected``) and every reader reads those
columns, so the segmenter, the report and a resumed run agree with the gate without knowing its rules. The two rules
the store applies itself, selection across runs (compaction) and done keys (resume), come from here as functions
(``compact(store, select=policy.select)``, ``attempt_counts(store, done=policy.done)``): ``manifests`` imports nothing
of the project.

The gate mode (``captions.gate.mode``) decides the number an attempt is judged by (its ``gate_score``) and the
threshold it must reach (its ``gate_threshold``); both are recorded per row with ``gate_mode``. Each mode is one
object (:class:`GateModeRule`, registered in :data:`GATE_MODES`) that the gate, the flows, the report and the
calibration ask what they need; no mode name is compared anywhere else. Adding a mode touches two files: its object
here and its name and settings in the manifest schema (``manifests.run_manifest.GateMode`` and ``GateConfig``).

- ``absolute`` (the paper): the eq. 2 similarity against ``tau``.
- ``percentile``: the similarity against a threshold per (expert, prompt), the ``1 - keep_top`` quantile of the
  attempt-0 similarities of a calibration sample (:meth:`GatePolicy.percentile_threshold`), so about ``keep_top``
  of each expert's captions per prompt pass whatever CLIP's scale.
- ``contrastive``: the similarity to the caption's own tile minus its mean similarity to the other tiles of the
  shard, against ``margin``: text that fits any tile as well as its own (generic, or another tile's) fails.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from manifests.caption_store import KEY_COLUMNS
from manifests.errors import InputError
from manifests.run_manifest import CaptionsConfig, GateMode


class CalibrationGroup(Protocol):
    """What a gate mode's suggestion reads of one expert's calibration (``flows.calibrate.GroupCalibration``)."""

    tau_at_false_pass: float
    false_pass_at_suggested: float
    own_pass_at_suggested: float
    margin_at_false_pass: float
    own_pass_at_margin: float


class GateModeRule(ABC):
    """One gate mode: the number an attempt is judged by, the threshold it must reach, and what runs, reports and
    calibrations say and check about it. Stateless: the settings are the :class:`GatePolicy`'s, passed in.

    Attributes:
        name: the mode's name in a manifest (``captions.gate.mode``) and in the store (``gate_mode``).
        setting: the manifest key of the one threshold every (expert, prompt) shares; None where the thresholds are
            derived per (expert, prompt) from a calibration sample before the run and kept beside the store.
        contrasts_shard: whether a caption is also scored against the other tiles of its shard.
        min_shard_tiles: the fewest tiles a shard must hold (a last shard with fewer joins the one before it).
        threshold_is_tau: whether the threshold is ``captions.tau``, so the report's tau sweep is this gate's.
        calibration_note: what a calibration's estimate of this mode does not capture (None: nothing).
    """

    name: ClassVar[str]
    setting: ClassVar[str | None]
    contrasts_shard: ClassVar[bool] = False
    min_shard_tiles: ClassVar[int] = 1
    threshold_is_tau: ClassVar[bool] = False
    calibration_note: ClassVar[str | None] = None

    @property
    def derives_thresholds(self) -> bool:
        """Whether the thresholds are derived per (expert, prompt) before a run (and read from the store's sidecar)."""
        return self.setting is None

    def fixed_threshold(self, policy: GatePolicy) -> float | None:
        """The threshold every (expert, prompt) shares under ``policy``; None where each has its derived one."""
        return None

    def score(self, similarity: float, others: float | None) -> float | None:
        """The number a scored attempt is judged by, from its similarity to its own tile and its mean similarity to
        the other tiles of its shard (None where there are none, or they were not scored)."""
        return similarity

    @abstractmethod
    def describe(self, policy: GatePolicy, shown: int) -> str:
        """One line: this gate and its threshold(s) under ``policy``, as a run summary shows it."""

    @abstractmethod
    def store_summary(self, thresholds: str) -> str:
        """The gate of a store's attempts in words, given the threshold(s) they recorded (one value or a range)."""

    @abstractmethod
    def calibration_pass_rate(self, own: np.ndarray, contrast: np.ndarray, policy: GatePolicy) -> float:
        """The share of a calibration sample's own captions this gate would pass under ``policy``.

        Args:
            own: their similarities to their own tiles.
            contrast: their similarity minus their mean similarity to the sample's other tiles.
            policy: the manifest's gate settings.
        """

    @abstractmethod
    def suggestion(self, group: CalibrationGroup, false_pass: float) -> str:
        """What to set for this mode so that at most ``false_pass`` of shuffled captions pass (an expert's
        calibration ``group``)."""

    def check_run(self, tiles: int, shard_size: int) -> None:
        """Refuse, before a run starts, ``tiles`` tiles in shards of ``shard_size`` that this gate cannot judge (by
        default it judges any).

        Raises:
            InputError: one line saying what to change.
        """
        return  # a gate that judges each caption alone judges any run

    def check_shard(self, tiles: int, distinct: int) -> None:
        """Refuse a shard of ``tiles`` tiles (``distinct`` distinct images) that this gate cannot judge (by default it
        judges any).

        Raises:
            InputError: one line saying what to change.
        """
        return  # a gate that judges each caption alone judges any shard


class AbsoluteGate(GateModeRule):
    """The paper's gate: the similarity (eq. 2) against ``captions.tau``."""

    name = "absolute"
    setting = "captions.tau"
    threshold_is_tau = True

    def fixed_threshold(self, policy: GatePolicy) -> float | None:
        """``tau``."""
        return policy.tau

    def describe(self, policy: GatePolicy, shown: int) -> str:
        """``gate: absolute, tau <tau>``."""
        return f"gate: absolute, tau {policy.tau:g}"

    def store_summary(self, thresholds: str) -> str:
        """The similarity against tau."""
        return f"gate mode absolute: similarity >= tau = {thresholds}"

    def calibration_pass_rate(self, own: np.ndarray, contrast: np.ndarray, policy: GatePolicy) -> float:
        """The share of own captions at or above tau."""
        return float((own >= policy.tau).mean())

    def suggestion(self, group: CalibrationGroup, false_pass: float) -> str:
        """The false-pass tau."""
        return (
            f"captions.tau: {group.tau_at_false_pass:.3f} (false-pass {group.false_pass_at_suggested:.1%}; "
            f"passes {group.own_pass_at_suggested:.1%} of own captions)"
        )


class PercentileGate(GateModeRule):
    """The similarity against a threshold per (expert, prompt): the ``1 - keep_top`` quantile of the attempt-0
    similarities of a calibration sample (:meth:`GatePolicy.percentile_threshold`)."""

    name = "percentile"
    setting = None

    def describe(self, policy: GatePolicy, shown: int) -> str:
        """``keep_top`` and the first ``shown`` derived thresholds."""
        pairs = [f"{expert}/{pid} {value:.3f}" for (expert, pid), value in sorted(policy.thresholds.items())]
        listed = ", ".join(pairs[:shown]) or "none derived"
        more = f", ... ({len(pairs) - shown} more)" if len(pairs) > shown else ""
        return f"gate: percentile keep_top {policy.keep_top:g}, thresholds per expert/prompt: {listed}{more}"

    def store_summary(self, thresholds: str) -> str:
        """The similarity against a threshold per expert and prompt."""
        return (
            f"gate mode percentile: similarity >= a threshold per expert and prompt ({thresholds}; see the gate table)"
        )

    def calibration_pass_rate(self, own: np.ndarray, contrast: np.ndarray, policy: GatePolicy) -> float:
        """``keep_top``, by definition."""
        return policy.keep_top

    def suggestion(self, group: CalibrationGroup, false_pass: float) -> str:
        """The share of own captions at or above the false-pass tau."""
        return (
            f"captions.gate.keep_top: {group.own_pass_at_suggested:.2f} (share of own captions above "
            f"{group.tau_at_false_pass:.3f} ≈ {group.own_pass_at_suggested:.1%})"
        )


class ContrastiveGate(GateModeRule):
    """The similarity to the caption's own tile minus its mean similarity to the other tiles of the shard, against
    ``captions.gate.margin``: text that fits any tile as well as its own (generic, or another tile's) fails."""

    name = "contrastive"
    setting = "captions.gate.margin"
    contrasts_shard = True
    min_shard_tiles = 2
    calibration_note = (
        "contrastive here compares a caption against random tiles of the sample; a run compares it against the other "
        "tiles of its shard (neighbours, often alike), so the margin and pass rate are an estimate (a run's own-minus-"
        "others tends to be lower)"
    )

    def fixed_threshold(self, policy: GatePolicy) -> float | None:
        """``margin``."""
        return policy.margin

    def score(self, similarity: float, others: float | None) -> float | None:
        """Own minus others; None without other tiles (such an attempt never passes)."""
        return None if others is None else similarity - float(others)

    def describe(self, policy: GatePolicy, shown: int) -> str:
        """``gate: contrastive, margin <margin> ...``."""
        return f"gate: contrastive, margin {policy.margin:g} against the other tiles of each shard"

    def store_summary(self, thresholds: str) -> str:
        """Own minus others against the margin."""
        return (
            "gate mode contrastive: own similarity minus the mean similarity to the shard's other tiles >= margin = "
            f"{thresholds}"
        )

    def calibration_pass_rate(self, own: np.ndarray, contrast: np.ndarray, policy: GatePolicy) -> float:
        """The share of own captions whose own-minus-others reaches the margin."""
        return float((contrast >= policy.margin).mean())

    def suggestion(self, group: CalibrationGroup, false_pass: float) -> str:
        """The false-pass quantile of the shuffled captions' own-minus-others."""
        return (
            f"captions.gate.margin: {group.margin_at_false_pass:.3f} (the own-minus-others value at false-pass "
            f"{false_pass:.0%}; passes {group.own_pass_at_margin:.1%} of own captions, an estimate)"
        )

    def check_run(self, tiles: int, shard_size: int) -> None:
        """Refuse a run of one tile, or shards of one tile."""
        if tiles == 1:
            raise InputError("captions.gate.mode contrastive: one tile has no other tile to contrast a caption with")
        if shard_size < 2 and tiles > 1:
            raise InputError(
                f"captions.gate.mode contrastive: a shard size of {shard_size} leaves a caption no other tile of its "
                "shard to contrast with; raise --shard-size (or captions.shard_size) to 2 at least"
            )

    def check_shard(self, tiles: int, distinct: int) -> None:
        """Refuse a shard without two distinct images."""
        if distinct < 2:
            raise InputError(
                f"contrastive gate: a shard of {tiles} tile(s) has no other tile to contrast a caption with "
                "(caption at least two distinct tiles per shard)"
            )


# Every gate mode, by name; the manifest's ``GateMode`` literal names the same ones (tests/test_gate_modes.py).
GATE_MODES: dict[str, GateModeRule] = {
    rule.name: rule for rule in (AbsoluteGate(), PercentileGate(), ContrastiveGate())
}


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

    def calibration_sampling(self) -> GatePolicy:
        """The policy a percentile gate's calibration samples with: attempt 0 only, judged against tau (it needs no
        threshold yet; only the similarities are kept)."""
        return replace(self, mode=AbsoluteGate.name, max_attempts=1)

    @property
    def gate_mode(self) -> GateModeRule:
        """The object of this policy's gate mode."""
        return GATE_MODES[self.mode]

    def describe(self, shown: int = 6) -> str:
        """One line: the gate mode and its threshold(s), as a run summary shows it.

        Args:
            shown: how many derived thresholds of a percentile gate are listed before the rest is counted.
        """
        return self.gate_mode.describe(self, shown)

    @property
    def contrastive(self) -> bool:
        """Whether the gate scores a caption against the other tiles of its shard too."""
        return self.gate_mode.contrasts_shard

    def threshold(self, expert: str, prompt_id: str) -> float:
        """The number an attempt's ``gate_score`` must reach: tau, the margin, or the derived threshold of the
        (expert, prompt).

        Raises:
            InputError: a percentile gate without a derived threshold for this (expert, prompt).
        """
        fixed = self.gate_mode.fixed_threshold(self)
        if fixed is not None:
            return fixed
        if (expert, prompt_id) not in self.thresholds:
            raise InputError(
                f"{self.mode} gate: no derived threshold for expert '{expert}', prompt {prompt_id} (calibrate first)"
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
        return None if similarity is None else self.gate_mode.score(float(similarity), others)

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
            threshold = self.gate_mode.fixed_threshold(self)
            if threshold is None:
                raise InputError(f"{self.mode} gate: passes() needs the thresholds of the attempts")
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
