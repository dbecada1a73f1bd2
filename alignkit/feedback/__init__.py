"""Feedback for alignment: pairwise judges (reward-based, local LLM, OpenAI-compatible endpoint)."""

from alignkit.feedback.judges import (
    JUDGE_TEMPLATE,
    JudgeError,
    LLMJudge,
    PairwiseJudge,
    RewardJudge,
    agreement,
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
    "agreement",
    "combine_orders",
    "judge_both_orders",
    "judge_from_spec",
    "parse_verdict",
]
