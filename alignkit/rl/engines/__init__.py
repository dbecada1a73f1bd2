"""Rollout engines behind one interface (:class:`alignkit.rl.rollout.RolloutEngine`).

``rollout_backend`` chooses one from :data:`ENGINES`:

- ``local``: :class:`~alignkit.rl.rollout.LocalEngine`, in the training process (the default);
- ``ray``: :class:`~alignkit.rl.engines.ray_engine.RayEngine`, ``rollout_workers`` Ray actors each holding a
  ``LocalEngine`` on a copy of the policy, fed the trainer's weights after every update (``pip install
  alignkit[ray]``; Ray is imported only when this backend is chosen).

Every engine stamps each completion with the weight version that sampled it and refuses to generate with
another version than the one the trainer asks for, so a missed weight sync fails instead of training on
completions of older weights. With per-prompt seeds (what online RL passes), every engine samples the same
tokens for the same weights: which worker generates a prompt changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from alignkit.rl.rollout import LocalEngine, RolloutEngine


def _local(policy, tok, cfg) -> RolloutEngine:
    return LocalEngine(policy, tok, precision=cfg.rollout_precision, max_batch=cfg.rollout_batch,
                       fast_decode=cfg.rollout_fast_decode)


def _ray(policy, tok, cfg) -> RolloutEngine:
    from alignkit.rl.engines.ray_engine import RayEngine

    return RayEngine(policy, tok, workers=cfg.rollout_workers, precision=cfg.rollout_precision,
                     max_batch=cfg.rollout_batch, fast_decode=cfg.rollout_fast_decode, address=cfg.ray_address)


ENGINES: dict[str, Callable] = {"local": _local, "ray": _ray}


def build_engine(policy, tok, cfg) -> RolloutEngine:
    """The engine ``cfg.rollout_backend`` names, holding ``policy``'s current weights as version 0."""
    return ENGINES[cfg.rollout_backend](policy, tok, cfg)
