"""Losses: pure functions of tensors (see DESIGN.md, principle 1)."""

from alignkit.losses.preference import (
    PREFERENCE_LOSSES,
    BeliefLogps,
    LossSpec,
    PairLogps,
    PreferenceOutput,
    UnpairedLogps,
    cdpo,
    dpo,
    gdpo,
    get_loss,
    hinge,
    ipo,
    kto,
    kto_reference_point,
    orpo,
    robust,
    simpo,
)
from alignkit.losses.sft import nll_sum
from alignkit.losses.reward import STEP_AGGREGATIONS, RewardOutput, aggregate_steps, bradley_terry, prm_bce

__all__ = [
    "PREFERENCE_LOSSES",
    "BeliefLogps",
    "gdpo",
    "LossSpec",
    "PairLogps",
    "PreferenceOutput",
    "UnpairedLogps",
    "cdpo",
    "dpo",
    "get_loss",
    "hinge",
    "ipo",
    "kto",
    "kto_reference_point",
    "nll_sum",
    "orpo",
    "robust",
    "simpo",
    "RewardOutput",
    "STEP_AGGREGATIONS",
    "aggregate_steps",
    "bradley_terry",
    "prm_bce",
]
