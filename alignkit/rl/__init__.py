"""Online RL parts: advantage estimators (rollout engines, reward functions and samplers to come)."""
