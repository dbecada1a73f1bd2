"""Online RL parts: the rollout engine (``rollout``), reward functions (``rewards``, ``verifiable``), dynamic
sampling and the curriculum (``sampling``), advantage estimators (``advantages``), the objective and its presets
(``objective``) and the rollout source and policy task the training loop runs (``trainer``)."""
