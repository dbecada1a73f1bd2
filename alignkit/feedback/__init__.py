"""Feedback for alignment: pairwise judges (reward-based, local LLM, OpenAI-compatible endpoint), Constitutional
AI, and human feedback (the app: :mod:`~alignkit.feedback.store`, :mod:`~alignkit.feedback.app`; agreement metrics:
:mod:`~alignkit.feedback.agreement`; ratings: :mod:`~alignkit.feedback.ratings`).

``agreement`` here is the submodule of agreement metrics; the judges' agreement rate is
:func:`alignkit.feedback.judges.agreement`."""

from alignkit.feedback.judges import (
    JUDGE_TEMPLATE,
    JudgeError,
    LLMJudge,
    PairwiseJudge,
    RewardJudge,
    combine_orders,
    judge_both_orders,
    judge_from_spec,
    parse_verdict,
)

__all__ = [
    "JUDGE_TEMPLATE",
    "JudgeError",
    "LLMJudge",
    "PairwiseJudge",
    "RewardJudge",
    "combine_orders",
    "judge_both_orders",
    "judge_from_spec",
    "parse_verdict",
]
