"""Typed run configurations. The CLI's ``key=value`` pairs and YAML files map onto these fields one to one.

Every field carries its help text in ``metadata["help"]``; ``alignkit <method> --help`` prints them all.
Validation has no side effects and names the offending key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignkit.errors import ConfigError


def opt(default, help: str, choices: tuple | None = None, list_as: str | None = None):
    """A config field. ``list_as``: how a YAML list given for this string field is joined (``"comma"``: with
    commas, ``"json"``: as a JSON list); without it a list is an error naming the key."""
    return field(default=default, metadata={"help": help, "choices": choices, "list_as": list_as})


def check_choices(cfg) -> None:
    """A ConfigError naming the first field whose value is not one of its declared choices."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{f.name}={getattr(cfg, f.name)!r}: expected one of {', '.join(map(str, choices))}")


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


@dataclass
class TrainConfig:
    """Settings every training method shares."""

    model: str = opt("smollm2-135m-instruct", "Model: 'tiny', 'smollm2-135m-instruct', a .gguf file, a local directory or a hub id.")
    data: str = opt("", "Training data: a .jsonl/.json/.parquet/.csv file or a datasets name ('name' or 'name:split').")
    eval_data: str = opt("", "Held-out data in the same format (optional).")
    eval_fraction: float = opt(0.0, "Hold out this share of `data` for evaluation when `eval_data` is not given.")
    output_dir: str = opt("outputs/run", "Where metrics.jsonl, config.yaml, checkpoints/ and final/ are written.")
    max_steps: int = opt(-1, "Optimizer steps to run; -1 means `epochs` passes over the data.")
    epochs: float = opt(1.0, "Passes over the data when max_steps is -1.")
    batch_size: int = opt(8, "Rows per micro-batch on each process.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step (global batch = batch_size x grad_accum x processes).")
    lr: float = opt(5e-5, "Peak learning rate of AdamW.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    scheduler: str = opt("cosine", "Learning-rate decay after warm-up.", ("cosine", "linear", "constant"))
    warmup_steps: int = opt(0, "Steps of linear warm-up from 0 to `lr`.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 disables clipping).")
    optimizer_in_backward: bool = opt(False, "Take each parameter's AdamW step in the backward pass as soon as its gradient is complete, and free that gradient (the model's gradients never exist at once; the same update as the plain step). Needs max_grad_norm=0 (the global norm is known only after every gradient), one process and strategy=ddp.")
    optimizer_state: str = opt("fp32", "AdamW's two moments in fp32 (torch's fused AdamW), or in bf16: half the optimizer's memory (4 bytes a parameter instead of 8), each update computed in fp32 from the stored moments, the second moment rounded stochastically so that it does not stall (alignkit/train/optim.py).", ("fp32", "bf16"))
    seed: int = opt(0, "Seed for data order, initialisation and sampling.")
    precision: str = opt("fp32", "fp32, or bf16 autocast (weights and optimizer state stay fp32; under fsdp2 on CUDA: FSDP2's bf16 parameters with fp32 gradient reduction).", ("fp32", "bf16"))
    strategy: str = opt("ddp", "Across processes (torchrun): ddp (every process holds all weights; gradients summed) or fsdp2 (weights, gradients and optimizer state sharded with torch's fully_shard).", ("ddp", "fsdp2"))
    device: str = opt("auto", "Where to train: auto (CUDA if there is one, then MPS, then CPU), cpu, cuda or mps.", ("auto", "cpu", "cuda", "mps"))
    cpu_offload: bool = opt(False, "With strategy=fsdp2: keep parameters, gradients and optimizer state on the CPU between uses (FSDP2's CPUOffloadPolicy).")
    lora: bool = opt(False, "Train a LoRA adapter instead of all weights.")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_target: str = opt("all-linear", "Modules that get adapters (peft's target_modules).")
    max_length: int = opt(1024, "Longest prompt + response in tokens; see `truncation`.")
    max_prompt_length: int = opt(0, "Prompt tokens kept when a row is too long (0: max_length // 2).")
    truncation: str = opt("truncate", "Over-long rows: keep the prompt's end and the response's start, or drop them.", ("truncate", "drop"))
    skip_invalid: bool = opt(False, "Skip bad rows (and report how many) instead of stopping.")
    group_by_length: bool = opt(True, "Sort each step's rows by length before splitting into micro-batches (less padding).")
    gradient_checkpointing: bool = opt(False, "Recompute each layer's activations in the backward pass: less memory, about a third more compute.")
    compile: bool = opt(False, "torch.compile each decoder layer (compiled on the first step, again when the length first changes).")
    logits_chunk: int = opt(1024, "Response positions projected to the vocabulary at a time.")
    log_every: int = opt(1, "Print a metrics line every N steps (metrics.jsonl gets every step).")
    eval_steps: int = opt(0, "Evaluate every N steps (0: only at the end).")
    save_steps: int = opt(0, "Write a checkpoint every N steps (0: none until the end).")
    save_total_limit: int = opt(2, "Checkpoints kept (oldest deleted first).")
    resume: bool = opt(False, "Continue from the newest checkpoint in output_dir (its settings must match this run's).")
    overwrite: bool = opt(False, "Remove another run's files from output_dir first (without it, a used output_dir is refused).")
    max_bad_steps: int = opt(3, "Steps in a row with a non-finite loss or gradient norm (each skipped, no update) before the run stops with exit 1.")
    save_merged: bool = opt(True, "With LoRA, write final/ as merged weights (else the adapter, naming its base).")
    tensorboard: bool = opt(False, "Also log to TensorBoard under output_dir/tensorboard.")
    progress: bool = opt(True, "Show a progress bar.")
    learners: int = opt(0, "Training processes placed by Ray (pip install alignkit[ray]; docs/scaling.md), initialised as under torchrun, one placement-group bundle each (0: this process, or the processes torchrun starts).")
    learner_cpus: int = opt(1, "learners=N: CPUs reserved for each learner.")
    learner_gpus: float = opt(0.0, "learners=N: GPUs reserved for each learner (1 on a GPU cluster).")
    placement: str = opt("pack", "learners=N: pack the learners' bundles on as few nodes as possible, or spread them over different nodes.", ("pack", "spread"))
    placement_timeout: float = opt(120.0, "learners=N: seconds to wait for Ray to reserve the bundles before stopping with exit 2.")
    ray_address: str = opt("", "Ray (learners=N, rollout_backend=ray): the cluster to join ('auto', or ray://host:port); empty: start Ray here with this machine's cores.")

    def validate(self) -> None:
        check_choices(self)
        if not self.data:
            raise ConfigError("data= is required (a data file or a datasets name)")
        for name in ("batch_size", "grad_accum", "max_length", "logits_chunk", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be positive or -1, got {self.max_steps}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.resume and self.overwrite:
            raise ConfigError("resume=true and overwrite=true contradict each other: choose one")
        if self.cpu_offload and self.strategy != "fsdp2":
            raise ConfigError("cpu_offload=true needs strategy=fsdp2 (it offloads FSDP2's shards)")
        if self.cpu_offload and (self.device == "cpu" or self.device == "auto" and not _has_accelerator()):
            raise ConfigError("cpu_offload=true moves FSDP2's shards from an accelerator to CPU memory, but this run "
                              "is on the CPU already (device=cpu, or auto without a GPU): leave cpu_offload off")
        if self.learners < 0 or self.learner_cpus < 1 or self.learner_gpus < 0 or self.placement_timeout <= 0:
            raise ConfigError("need learners >= 0, learner_cpus >= 1, learner_gpus >= 0 and placement_timeout > 0")
        if self.strategy == "fsdp2" and self.compile:
            raise ConfigError("strategy=fsdp2 with compile=true is not supported yet: choose one of them")
        if self.optimizer_in_backward and self.max_grad_norm > 0:
            raise ConfigError(f"optimizer_in_backward=true updates each parameter before the global gradient norm is "
                              f"known, so it cannot clip to max_grad_norm={self.max_grad_norm}: set max_grad_norm=0 "
                              f"(the norm is still logged), or leave optimizer_in_backward off")
        if self.optimizer_state == "bf16" and self.strategy == "fsdp2":
            raise ConfigError("optimizer_state=bf16 is not supported with strategy=fsdp2 yet (its moments would be "
                              "sharded DTensors): choose one of them")
        if self.optimizer_in_backward and self.strategy == "fsdp2":
            raise ConfigError("optimizer_in_backward=true is not supported with strategy=fsdp2 (its gradients are "
                              "reduce-scattered per layer group): choose one of them")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: negative log-likelihood of response tokens."""

    lr: float = opt(2e-5, "Peak learning rate of AdamW.")
    packing: bool = opt(True, "Padding-free micro-batches: a micro-batch's rows go through the model as one row "
                        "with attention kept within each (the same result as padding, no compute on padding).")
    thinking_loss: str = opt("on", "Loss on the thinking tokens of reasoning data (the reasoning inside <think>...</think>; "
                             "docs/reasoning.md): on, off (no loss on them, the answer and markers still trained), or a "
                             "weight w >= 0 (each thinking token's NLL times w, the step normalised by the summed weights).")

    @property
    def thinking_weight(self) -> float:
        """``thinking_loss`` as a weight: on 1, off 0."""
        named = {"on": 1.0, "off": 0.0}.get(str(self.thinking_loss).strip().lower())
        return float(self.thinking_loss) if named is None else named

    def validate(self) -> None:
        super().validate()
        try:
            weight = self.thinking_weight
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"thinking_loss={self.thinking_loss!r}: expected on, off or a finite weight >= 0")


@dataclass
class DPOConfig(TrainConfig):
    """The offline preference family (ALGORITHMS.md, 'Offline preference losses')."""

    loss: str = opt("dpo", "Preference loss.", ("dpo", "cdpo", "robust", "hinge", "ipo", "kto", "orpo", "simpo"))
    beta: float = opt(0.1, "Inverse temperature beta (DPO family, SimPO, KTO); implicit reward = beta * log-ratio.")
    label_smoothing: float = opt(0.0, "Label-flip rate eps for cdpo and robust (0 <= eps < 0.5).")
    soft_labels: str = opt("use", "Rows with a `soft_label` s (the judge's probability that chosen is better): use: "
                           "loss=dpo trains as cdpo with a per-pair eps_i = 1 - s_i, fitting sigma(beta Delta_i) = s_i; "
                           "loss=cdpo takes eps_i = 1 - s_i in place of label_smoothing (which must be left at 0); "
                           "any other loss stops with exit 2; a row without one is a hard label (s = 1). ignore: "
                           "train on the hard labels, as if the column were absent.", ("use", "ignore"))
    force: bool = opt(False, "Train on AI labels whose judge measured below min_alignment (labeler_alignment.json beside the data, written by alignkit cai); without it such data stops the run with exit 2.")
    gamma: float = opt(0.5, "SimPO target margin gamma.")
    orpo_lambda: float = opt(0.1, "ORPO weight lambda of the odds-ratio term.")
    ipo_average: bool = opt(False, "IPO on average instead of summed log-probs (sum is the paper's).")
    kto_lambda_d: float = opt(1.0, "KTO weight of desirable examples.")
    kto_lambda_u: float = opt(1.0, "KTO weight of undesirable examples.")
    share_prompt: bool = opt(True, "Run each pair's prompt through the model once for both responses (one sequence, masked attention).")
    rpo_alpha: float = opt(0.0, "Weight alpha of the chosen response's mean token NLL added to each pair's loss (RPO, Pang et al. 2404.19733; TRL's rpo_alpha): keeps the chosen answers likely while the margin grows; 0: off.")
    reference: str = opt("cached", "Reference log-probs: computed once before training (cached) or every step (live).", ("cached", "live"))
    lr: float = opt(5e-6, "Peak learning rate of AdamW.")

    def validate(self) -> None:
        super().validate()
        if self.loss in ("cdpo", "robust") and not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5) for loss={self.loss}, got {self.label_smoothing}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        if not (math.isfinite(self.rpo_alpha) and self.rpo_alpha >= 0):
            raise ConfigError(f"rpo_alpha must be a finite weight >= 0, got {self.rpo_alpha}")
        if self.rpo_alpha and self.loss == "kto":
            raise ConfigError("rpo_alpha adds the chosen response's NLL to a paired loss: kto has no chosen response")


@dataclass
class GDPOConfig(DPOConfig):
    """GDPO (Yao et al. 2412.20299): state a belief, then answer given it; the belief distribution calibrated to
    the group's, the preference loss on the response after the belief (ALGORITHMS.md, 'GDPO')."""

    loss: str = opt("dpo", "Preference loss on the response tokens after the belief.",
                    ("dpo", "cdpo", "robust", "hinge", "ipo", "orpo", "simpo"))
    calibration_weight: float = opt(1.0, "Weight of the calibration term KL(p* || q): q is the model's distribution "
                                         "over the prompt's beliefs (sequence log-probs normalised over them).")
    belief_nll_weight: float = opt(1.0, "Weight of -log pi(belief | prompt) of each pair's own belief.")
    preference_weight: float = opt(1.0, "Weight of the preference loss on the response after the belief.")
    belief_template: str = opt("Belief: {belief}\n", "How the belief opens the answer; '{belief}' once, text after it.")

    def validate(self) -> None:
        super().validate()
        from alignkit.data.beliefs import check_template

        try:
            check_template(self.belief_template)
        except ValueError as err:
            raise ConfigError(f"belief_template: {err}") from None
        weights = (self.calibration_weight, self.belief_nll_weight, self.preference_weight)
        if min(weights) < 0 or max(weights) == 0:
            raise ConfigError(f"calibration_weight, belief_nll_weight and preference_weight must be >= 0 and not all "
                              f"0, got {weights}")


@dataclass
class RMConfig(TrainConfig):
    """Reward models: Bradley-Terry on pairs and rankings, several aspect heads, or a process reward model."""

    aspects: str = opt("reward", "Comma-separated aspect names, one linear head each (e.g. helpfulness,safety).", list_as="comma")
    aspect_weights: str = opt("", "Comma-separated weights combining the aspects into one reward (default: all 1).", list_as="comma")
    center_coef: float = opt(0.0, "Weight c of the centering term c * (r_w + r_l)^2 that keeps rewards near 0.")
    soft_labels: str = opt("use", "Rows with a `soft_label` s (the judge's probability that chosen is better): use: "
                           "Bradley-Terry against the soft target, loss -(s log sigma(d) + (1 - s) log sigma(-d)) with "
                           "d = r_w - r_l - margin, so a pair's reward gap is fitted to sigma(d) = s; a row without one "
                           "is a hard label (s = 1). ignore: train on the hard labels, as if the column were absent.",
                           ("use", "ignore"))
    force: bool = opt(False, "Train on AI labels whose judge measured below min_alignment (labeler_alignment.json beside the data, written by alignkit cai); without it such data stops the run with exit 2.")
    process: bool = opt(False, "Process reward model: stepwise data (prompt/steps/labels), BCE at each step's last token.")
    step_separator: str = opt("\n", "Text joining a process reward model's steps.")
    aggregate: str = opt("min", "How a process reward model combines step scores into one.", ("min", "prod"))
    share_prompt: bool = opt(True, "Run a prompt group's prompt through the model once for all its responses (masked attention).")
    lr: float = opt(1e-5, "Peak learning rate of AdamW.")

    @property
    def aspect_names(self) -> list[str]:
        return [a.strip() for a in self.aspects.split(",") if a.strip()]

    @property
    def weights(self) -> list[float]:
        if not self.aspect_weights:
            return [1.0] * len(self.aspect_names)
        return [float(w) for w in self.aspect_weights.split(",")]

    def validate(self) -> None:
        super().validate()
        names = self.aspect_names
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"aspects must be distinct non-empty names, got {self.aspects!r}")
        try:
            weights = self.weights
        except ValueError:
            raise ConfigError(f"aspect_weights must be comma-separated numbers, got {self.aspect_weights!r}") from None
        if len(weights) != len(names):
            raise ConfigError(f"aspect_weights has {len(weights)} values for {len(names)} aspects")
        if self.process and len(names) != 1:
            raise ConfigError("a process reward model has one head: leave aspects unset")


PRESET_HELP = ("Named combination of advantage, policy loss, aggregation and KL; fields left unset take the preset's "
               "values. dapo turns on three of DAPO's four techniques: clip-higher (eps_high 0.28), the token-level "
               "loss and dynamic sampling, plus overlong filtering (mask_truncated); the fourth, soft overlong "
               "punishment, is the `overlong` reward: add it to rewards=.")


@dataclass
class RolloutConfig(TrainConfig):
    """What online methods share: prompts in, sampled completions, reward functions."""

    # False for methods that sample first and then train offline (rejection sampling, self-rewarding), whose
    # training steps accumulate micro-batches as SFT and DPO do
    steps_are_rollouts: typing.ClassVar[bool] = True
    prompts_per_step: int = opt(8, "Prompts drawn for each rollout (each gets num_generations completions).")
    num_generations: int = opt(8, "Completions sampled per prompt (the group size G).")
    max_new_tokens: int = opt(64, "Token limit of each completion.")
    temperature: float = opt(1.0, "Sampling temperature (> 0); the trainer scores the samples' log-probs at the same temperature.")
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability (scoring uses the full distribution).")
    top_k: int = opt(0, "Sample among the k most likely tokens (0: off; scoring uses the full distribution).")
    stop: str = opt("", "Stop string, or a JSON list of them (e.g. '[\"\\n\\n\", \"Question:\"]'; in YAML a list).", list_as="json")
    thinking: str = opt("auto", "Thinking mode of reasoning models (docs/reasoning.md): on (the engine opens <think>), off (an empty thinking block, answer directly) or auto (a prompt's /think or /no_think, else the model decides).", ("auto", "on", "off"))
    max_thinking_tokens: int = opt(0, "Thinking budget in tokens per completion, the block's tags and forced tokens included (0: none).")
    min_thinking_tokens: int = opt(0, "s1 budget forcing: an end of thinking before this many tokens is replaced by 'Wait' (0: off).")
    budget_action: str = opt("force_end", "At the thinking budget: force_end (append \\n</think>\\n\\n) or transition (Qwen3's 'Considering the limited time...' then </think>).", ("force_end", "transition"))
    rollout_precision: str = opt("bf16", "Generation precision: a bf16 copy of the weights (fast) or the fp32 model.", ("bf16", "fp32"))
    rollout_batch: int = opt(64, "Sequences generated at once.")
    rollout_fast_decode: bool = opt(True, "Lean decode steps for Llama-style models on the CPU (false: transformers' forward).")
    rollout_backend: str = opt("local", "Where completions are generated: in this process (local), by Ray actors (ray: pip install alignkit[ray]), or by vLLM in this process (vllm: pip install alignkit[vllm]; on a CPU, scripts/vllm_cpu_env.sh).", ("local", "ray", "vllm"))
    vllm_max_model_len: int = opt(0, "rollout_backend=vllm: longest prompt + completion in tokens (0: the prompt limit plus max_new_tokens).")
    vllm_kv_cache_gb: float = opt(2.0, "rollout_backend=vllm on a CPU: the KV cache in GiB (VLLM_CPU_KVCACHE_SPACE, unless set).")
    vllm_gpu_memory: float = opt(0.3, "rollout_backend=vllm on a GPU: the share of GPU memory vLLM may take (leave room for training).")
    vllm_transport: str = opt("reload", "rollout_backend=vllm: weight sync by in-process reload (tested on CPU) or vLLM's CUDA IPC weight-transfer API (experimental, untested).", ("reload", "ipc"))
    rollout_workers: int = opt(2, "rollout_backend=ray: rollout actors, each with an engine of its own.")
    rewards: str = opt("correctness", "Comma-separated reward functions (in YAML a list): correctness, format, length, overlong, language, l1_exact, l1_max, code, code_share (docs/code_rewards.md), rm:PATH, module:function or file.py:function.", list_as="comma")
    reward_weights: str = opt("", "Comma-separated weights of the reward functions (default: all 1; in YAML a list).", list_as="comma")
    reward_timeout: float = opt(30.0, "Seconds a reward function may take per call before its completions get no reward.")
    overlong_buffer: int = opt(0, "DAPO overlong buffer in tokens for the `overlong` reward (0: max_new_tokens // 4).")
    l1_alpha: float = opt(0.0003, "L1/LCPO (2503.04697) length coefficient alpha of the `l1_exact` and `l1_max` rewards, per token away from the row's `budget`.")
    l1_delta: float = opt(0.5, "L1/LCPO-Max offset delta: a correct completion exactly at its `budget` gets clip(delta, 0, 1).")
    language: str = opt("en", "Target language of the `language` reward.", ("en", "zh"))
    batch_size: int = opt(2, "Prompt groups (a prompt and its completions) per micro-batch.")
    eval_prompts: int = opt(0, "Held-out prompts scored (greedy) at each evaluation; 0: all of them.")
    lr: float = opt(1e-6, "Peak learning rate of AdamW.")

    @property
    def thinking_mode(self) -> bool | None:
        """``thinking`` as the rollout engine's flag: on True, off False, auto None."""
        return {"on": True, "off": False}.get(self.thinking)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        import json

        if not self.stop:
            return ()
        if self.stop.lstrip().startswith("["):
            return tuple(json.loads(self.stop))
        return (self.stop,)

    def validate(self) -> None:
        super().validate()
        for name in ("prompts_per_step", "num_generations", "max_new_tokens", "rollout_batch", "rollout_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature}: online training samples, so it must be > 0 (at 0 every "
                              "completion of a prompt is the greedy one: the group advantages are all 0 and the "
                              "samples have no log-prob to score)")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("need 0 < top_p <= 1 and top_k >= 0")
        if self.grad_accum != 1 and self.steps_are_rollouts:
            raise ConfigError(f"grad_accum={self.grad_accum} does not apply to online methods: each optimizer step "
                              "takes prompts_per_step / mini_batches prompt groups, in micro-batches of batch_size "
                              "groups (lower batch_size for less memory)")
        try:
            stops = self.stop_strings
        except ValueError as e:
            raise ConfigError(f"stop={self.stop!r}: not a JSON list of strings ({e})") from None
        if not all(isinstance(x, str) and x for x in stops):
            raise ConfigError(f"stop={self.stop!r}: expected non-empty strings")
        self._validate_thinking()

    def _validate_thinking(self) -> None:
        if self.max_thinking_tokens < 0 or self.min_thinking_tokens < 0:
            raise ConfigError(f"max_thinking_tokens={self.max_thinking_tokens} and min_thinking_tokens="
                              f"{self.min_thinking_tokens} must be >= 0 (0: off)")
        if self.max_thinking_tokens and self.min_thinking_tokens > self.max_thinking_tokens:
            raise ConfigError(f"min_thinking_tokens={self.min_thinking_tokens} is above max_thinking_tokens="
                              f"{self.max_thinking_tokens}: the budget would always cut the thinking first")
        if self.thinking == "off" and (self.max_thinking_tokens or self.min_thinking_tokens):
            raise ConfigError("thinking=off answers after an empty thinking block: max_thinking_tokens and "
                              "min_thinking_tokens do not apply (set them to 0, or thinking=on/auto)")
        if self.rollout_backend == "vllm" and (self.thinking != "auto" or self.max_thinking_tokens
                                               or self.min_thinking_tokens):
            raise ConfigError("thinking, max_thinking_tokens and min_thinking_tokens are implemented by alignkit's "
                              "own rollout engine (rollout_backend=local or ray), not rollout_backend=vllm")


@dataclass
class RLConfig(RolloutConfig):
    """Online RL: a preset names a combination of registry entries; any field left unset takes the preset's value."""

    preset: str = opt("grpo", PRESET_HELP, ("ppo", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "kimi"))
    advantage: str | None = opt(None, "Advantage estimator (default: the preset's); log_mean_exp is the reward minus Kimi's exact baseline tau * log(mean exp(r / tau)).", ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "log_mean_exp", None))
    policy_loss: str | None = opt(None, "Policy loss (default: the preset's); kimi_omd is Kimi k1.5's squared loss against tau * log(pi / pi_old).", ("ppo_clip", "gspo", "kimi_omd", None))
    tau: float | None = opt(None, "Kimi k1.5 (preset=kimi): the KL coefficient of each mirror-descent iteration, max E[r] - tau KL(pi || pi_old), for kimi_omd and log_mean_exp (default: 1.0).")
    aggregation: str | None = opt(None, "Loss aggregation (default: the preset's).", ("token_mean", "seq_mean_token_mean", "seq_sum_constant", None))
    kl_estimator: str | None = opt(None, "KL estimator k1, k2 or k3 (default: the preset's).", ("k1", "k2", "k3", None))
    kl_in: str | None = opt(None, "Where the KL penalty goes (default: the preset's).", ("reward", "loss", "none", None))
    kl_coef: float | None = opt(None, "KL coefficient beta (default: the preset's).")
    kl_target: float = opt(0.0, "Adaptive KL controller target (summed KL per completion); 0 keeps kl_coef fixed.")
    kl_horizon: int = opt(10000, "Adaptive KL controller horizon.")
    eps_low: float | None = opt(None, "Lower clip range (default: the preset's).")
    eps_high: float | None = opt(None, "Upper clip range; > eps_low is DAPO's clip-higher (default: the preset's).")
    dual_clip: float | None = opt(None, "Dual-clip bound c > 1 for negative advantages (default: off).")
    whiten_advantages: bool | None = opt(None, "Normalise advantages over the rollout (default: the preset's).")
    gamma: float = opt(1.0, "Discount of GAE and REINFORCE++.")
    lam: float = opt(0.95, "GAE lambda.")
    ppo_epochs: int = opt(1, "Passes over each rollout.")
    mini_batches: int = opt(1, "Optimizer steps per pass over a rollout.")
    dynamic_sampling: bool | None = opt(None, "DAPO dynamic sampling: drop groups whose rewards are all equal and draw more (default: on for dapo).")
    mask_truncated: bool | None = opt(None, "DAPO overlong filtering: completions cut at max_new_tokens get no gradient; their rewards still count in the group's statistics (default: on for dapo).")
    max_sampling_rounds: int = opt(4, "Dynamic sampling: most draws per rollout before training on what it has.")
    curriculum: bool = opt(False, "Track each prompt's pass rate; drop prompts always or never solved; sample hard ones more.")
    curriculum_min_attempts: int = opt(8, "Completions seen before a prompt can be dropped.")
    success_threshold: float = opt(1.0, "A completion passes (for the curriculum) when its reward is at least this.")
    value_model: str = opt("separate", "PPO critic: its own backbone, or a head on the policy's trunk.", ("separate", "shared"))
    vf_coef: float = opt(0.1, "Weight of the value loss.")
    value_clip: float = opt(0.2, "Value clipping range eps_v.")
    correction: str = opt("none", "Off-policy correction for a sampler that is not the trainer (docs/off_policy.md): none, tis (per-token truncated importance weight), icepop (per-token weight masked outside is_bounds), seq_mask_tis (TIS, sequences whose geometric-mean ratio leaves is_bounds dropped) or mis (sequence importance weight, rejected outside is_bounds).", ("none", "tis", "icepop", "seq_mask_tis", "mis"))
    correction_mode: str = opt("decoupled", "decoupled: the PPO ratio against the trainer's old log-probs, the loss weighted by the correction; bypass: the sampler's log-probs are the old policy (no weight; needs correction=none).", ("decoupled", "bypass"))
    is_clip: float = opt(2.0, "C, where tis and seq_mask_tis truncate the importance ratio pi_old / pi_rollout (>= 1).")
    is_bounds: str = opt("0.5,5.0", "low,high: icepop, seq_mask_tis and mis mask ratios outside these (low <= 1 <= high).", list_as="comma")
    mismatch_threshold: float = opt(0.2, "mismatch/frac_over counts tokens whose |log p_rollout - log p_trainer| exceeds this.")
    mismatch_alarm: float = opt(0.0, "Warn (once per step) when mismatch/max_abs, the largest |log p_rollout - log p_trainer|, exceeds this (0: never).")
    mismatch_strict: bool = opt(False, "Stop the run (exit 1) instead of warning when the mismatch alarm sounds.")
    max_staleness: int = opt(0, "Asynchronous rollouts: the rollouts of up to this many later steps are generated in the background while a step trains, so a completion may be sampled by weights this many rollouts old (0: the synchronous loop). Pair it with an off-policy correction (correction=tis, ...); one training process only.")

    @property
    def is_low_high(self) -> tuple[float, float]:
        try:
            low, high = (float(x) for x in self.is_bounds.split(","))
        except ValueError:
            raise ConfigError(f"is_bounds={self.is_bounds!r}: expected two numbers 'low,high' (e.g. 0.5,5.0)") from None
        return low, high

    def objective(self):
        from alignkit.rl.objective import preset

        return preset(
            self.preset, advantage=self.advantage, policy_loss=self.policy_loss, aggregation=self.aggregation,
            kl_estimator=self.kl_estimator, kl_in=self.kl_in, kl_coef=self.kl_coef, eps_low=self.eps_low,
            eps_high=self.eps_high, dual_clip=self.dual_clip, whiten_advantages=self.whiten_advantages,
            gamma=self.gamma, lam=self.lam, aggregation_constant=float(self.max_new_tokens),
            correction=self.correction, correction_mode=self.correction_mode, is_clip=self.is_clip,
            is_low=self.is_low_high[0], is_high=self.is_low_high[1], tau=self.tau,
        )

    @property
    def use_dynamic_sampling(self) -> bool:
        return self.preset == "dapo" if self.dynamic_sampling is None else self.dynamic_sampling

    @property
    def use_mask_truncated(self) -> bool:
        return self.preset == "dapo" if self.mask_truncated is None else self.mask_truncated

    def validate(self) -> None:
        super().validate()
        obj = self.objective()
        if obj.needs_groups and self.num_generations < 2:
            raise ConfigError(f"advantage={obj.advantage} compares completions of a prompt: num_generations must be >= 2")
        for name in ("ppo_epochs", "mini_batches", "max_sampling_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.mini_batches > self.prompts_per_step:
            raise ConfigError(f"mini_batches={self.mini_batches} exceeds prompts_per_step={self.prompts_per_step}")
        if self.correction != "none" and (self.top_k > 0 or self.top_p < 1):
            raise ConfigError(f"correction={self.correction} with top_k={self.top_k}, top_p={self.top_p}: the sampler "
                              "drew from the truncated distribution, but its log-probs (like the trainer's) are the "
                              "untruncated ones, so the importance ratios would be biased; sample with top_k=0 "
                              "top_p=1, or use correction=none (docs/off_policy.md)")
        if self.mismatch_threshold <= 0 or self.mismatch_alarm < 0:
            raise ConfigError(f"need mismatch_threshold > 0 and mismatch_alarm >= 0, got {self.mismatch_threshold} "
                              f"and {self.mismatch_alarm}")
        if self.max_staleness < 0:
            raise ConfigError(f"max_staleness must be >= 0 (0: synchronous rollouts), got {self.max_staleness}")
        if self.learners > 1 and (self.rollout_backend == "ray" or self.max_staleness > 0):
            raise ConfigError(f"learners={self.learners} with rollout_backend={self.rollout_backend} and max_staleness="
                              f"{self.max_staleness}: rollout_backend=ray and asynchronous rollouts need one training "
                              "process for now (learners=1 or 0)")
        if self.mismatch_strict and self.mismatch_alarm <= 0:
            raise ConfigError("mismatch_strict=true needs a mismatch_alarm level (> 0) to act on")


@dataclass
class PPOConfig(RLConfig):
    """PPO-RLHF: policy, reference, reward (any reward function, e.g. rm:PATH) and a value model, with GAE."""

    preset: str = opt("ppo", PRESET_HELP, ("ppo", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "kimi"))
    num_generations: int = opt(1, "Completions sampled per prompt.")
    prompts_per_step: int = opt(16, "Prompts drawn for each rollout.")
    ppo_epochs: int = opt(2, "Passes over each rollout.")
    mini_batches: int = opt(2, "Optimizer steps per pass over a rollout.")


@dataclass
class OnlineDPOConfig(RolloutConfig):
    """Online DPO (Guo et al. 2402.04792): two samples per prompt, a judge picks the better, DPO loss."""

    loss: str = opt("dpo", "Preference loss applied to the judged pair.", ("dpo", "cdpo", "robust", "hinge", "ipo", "simpo"))
    beta: float = opt(0.1, "Inverse temperature beta of the preference loss.")
    label_smoothing: float = opt(0.0, "Label-flip rate for cdpo and robust.")
    gamma: float = opt(0.5, "SimPO target margin gamma.")
    num_generations: int = opt(2, "Samples per prompt (2: one pair; more: the reward functions' best and worst).")
    judge: str = opt("", "A pairwise judge instead of the reward functions: llm:MODEL, an http(s):// endpoint or rm:PATH (asked in both orders).")
    judge_model: str = opt("", "Model name sent to an endpoint judge.")
    share_prompt: bool = opt(True, "Run each pair's prompt through the model once for both responses.")

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2:
            raise ConfigError("online DPO needs num_generations >= 2 (a pair per prompt)")
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")


def _like(cls, name: str, default=dataclasses.MISSING, help: str | None = None):
    """A field as ``cls`` declares it (help text, choices), with another default or help text if given."""
    f = cls.__dataclass_fields__[name]
    m = f.metadata
    return opt(f.default if default is dataclasses.MISSING else default, help or m["help"], m["choices"], m["list_as"])


@dataclass
class BoNConfig:
    """Best-of-n sampling (``alignkit bon``): n completions per prompt, the best by reward or judge kept."""

    model: str = _like(TrainConfig, "model")
    data: str = opt("", "Prompt rows (a `prompt` column, plus any columns the rewards read, e.g. `answer`).")
    output_dir: str = opt("outputs/bon", "Where best.jsonl, samples.jsonl, summary.json and config.yaml are written.")
    num_generations: int = opt(4, "n: completions sampled per prompt.")
    rewards: str = _like(RolloutConfig, "rewards")
    reward_weights: str = _like(RolloutConfig, "reward_weights")
    reward_timeout: float = _like(RolloutConfig, "reward_timeout")
    judge: str = opt("", "Pick the best with a pairwise judge instead of the rewards: llm:MODEL or an http(s):// "
                     "endpoint (a knockout over the n samples, each duel asked in both orders).")
    judge_model: str = _like(OnlineDPOConfig, "judge_model")
    max_new_tokens: int = _like(RolloutConfig, "max_new_tokens")
    temperature: float = _like(RolloutConfig, "temperature")
    top_p: float = _like(RolloutConfig, "top_p")
    top_k: int = _like(RolloutConfig, "top_k")
    stop: str = _like(RolloutConfig, "stop")
    max_prompt_length: int = opt(512, "Prompt tokens kept (the last ones) when a prompt is longer.")
    rollout_precision: str = _like(RolloutConfig, "rollout_precision")
    rollout_batch: int = _like(RolloutConfig, "rollout_batch")
    rollout_fast_decode: bool = _like(RolloutConfig, "rollout_fast_decode")
    overlong_buffer: int = _like(RolloutConfig, "overlong_buffer")
    l1_alpha: float = _like(RolloutConfig, "l1_alpha")
    l1_delta: float = _like(RolloutConfig, "l1_delta")
    language: str = _like(RolloutConfig, "language")
    seed: int = _like(TrainConfig, "seed")
    skip_invalid: bool = _like(TrainConfig, "skip_invalid")
    overwrite: bool = opt(False, "Replace the files of an earlier bon run in output_dir (without it they are refused).")

    stop_strings = RolloutConfig.stop_strings

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("data= is required (prompt rows)")
        for name in ("num_generations", "max_new_tokens", "rollout_batch", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("best-of-n samples: need temperature > 0, 0 < top_p <= 1 and top_k >= 0")
        if self.rollout_precision not in ("bf16", "fp32"):
            raise ConfigError(f"rollout_precision={self.rollout_precision!r}: expected bf16 or fp32")
        try:
            self.stop_strings
        except ValueError as e:
            raise ConfigError(f"stop={self.stop!r}: not a JSON list of strings ({e})") from None


@dataclass
class RejectionConfig(RolloutConfig, SFTConfig):
    """Rejection-sampling fine-tuning, iterated: sample, keep the best or the verified samples, SFT, repeat."""

    mode: str = opt("raft", "raft: keep each prompt's best sample of this iteration (Dong et al. 2304.06767); "
                    "rest_em: keep every sample the reward verifies (reward >= threshold) and fine-tune the base "
                    "model again each iteration (Singh et al. 2312.06585); best_ever: keep each prompt's best over "
                    "all iterations so far (Llama 2, Touvron et al. 2307.09288).", ("raft", "rest_em", "best_ever"))
    iterations: int = opt(2, "Rounds of sample -> keep -> fine-tune; each writes output_dir/iter_K.")
    num_generations: int = opt(4, "Completions sampled per prompt and iteration.")
    start: str | None = opt(None, "The weights each iteration's fine-tuning starts from: the base model, or the "
                            "previous iteration's (default: base for rest_em, previous otherwise). Samples always "
                            "come from the previous iteration's model.", ("base", "previous", None))
    threshold: float = opt(1.0, "rest_em: a sample is verified when its reward is at least this.")
    max_per_prompt: int = opt(0, "rest_em: verified samples kept per prompt, distinct texts first come (0: all).")
    accumulate: bool = opt(False, "rest_em: fine-tune on the verified samples of all iterations so far instead of "
                           "the current iteration's (the paper's).")
    judge: str = opt("", "raft, best_ever: pick the best with a pairwise judge (llm:MODEL, an http(s):// "
                     "endpoint) instead of the rewards.")
    judge_model: str = _like(OnlineDPOConfig, "judge_model")
    batch_size: int = opt(8, "Rows per micro-batch of each iteration's fine-tuning.")
    lr: float = _like(SFTConfig, "lr")
    steps_are_rollouts = False

    @property
    def from_base(self) -> bool:
        return (self.start or ("base" if self.mode == "rest_em" else "previous")) == "base"

    def validate(self) -> None:
        super().validate()
        if self.iterations < 1 or self.max_per_prompt < 0:
            raise ConfigError(f"need iterations >= 1 and max_per_prompt >= 0, got {self.iterations} and "
                              f"{self.max_per_prompt}")
        if self.mode == "rest_em" and self.judge:
            raise ConfigError("mode=rest_em keeps samples a reward verifies: set rewards= (e.g. correctness), not judge=")


@dataclass
class DistillConfig(RolloutConfig, SFTConfig):
    """Reasoning distillation (``alignkit distill``, docs/reasoning.md): a teacher's traces, kept by a verifier
    and DeepSeek-R1's rules, written as think and no-think SFT rows (thinking-mode fusion), then SFT."""

    iterations: typing.ClassVar[int] = 1  # one round (alignkit.train.iterations: output_dir/iter_1, resumable)
    steps_are_rollouts = False
    teacher: str = opt("", "Where the traces come from: a model (name, directory, hub id; sampled with thinking on), "
                       "an http(s):// OpenAI-compatible endpoint (its reasoning_content, or <think> in the content), "
                       "or a program, package.module:function or path/to/file.py:function, called with each prompt "
                       "row (a dict) and returning (reasoning, answer).")
    teacher_model: str = opt("", "Model name sent to an endpoint teacher.")
    num_generations: int = opt(1, "Traces asked of the teacher per prompt (identical ones are kept once).")
    max_new_tokens: int = opt(512, "Token limit of a model or endpoint teacher's trace (thinking and answer).")
    temperature: float = opt(0.6, "Sampling temperature of a model or endpoint teacher (DeepSeek-R1's 0.6).")
    rewards: str = opt("correctness", "The verifier: reward functions scoring each trace against its row "
                       "(correctness reads `answer`; rm:PATH, module:function or file.py:function too); a trace is "
                       "kept when their weighted sum is at least `threshold`. Empty: no verifier.", list_as="comma")
    threshold: float = opt(1.0, "A trace passes the verifier when its reward is at least this.")
    min_language: float = opt(0.99, "DeepSeek-R1's mixed-language rule: a trace is dropped when less than this "
                              "share of the letters of its reasoning, or of its answer, are in `language` (0: off).")
    thinking_limit: int = opt(1024, "DeepSeek-R1's over-long rule: a trace is dropped when its reasoning has more "
                              "tokens than this in the student's tokenizer (0: off).")
    no_think_fraction: float = opt(0.25, "Thinking-mode fusion: this share of the kept traces (rounded, drawn by "
                                   "seed) is written as no-think rows: the answer after an empty thinking block, "
                                   "with /no_think appended to the user turn.")
    flag_fraction: float = opt(0.5, "This share of the think rows (rounded, drawn by seed) gets /think appended to "
                               "the user turn; the others get no flag, so thinking is what the model does by default.")
    batch_size: int = opt(8, "Rows per micro-batch of the fine-tuning.")
    lr: float = _like(SFTConfig, "lr")

    @property
    def teacher_kind(self) -> str:
        """``endpoint``, ``program`` or ``model`` (alignkit.feedback.teachers)."""
        from alignkit.feedback.teachers import teacher_kind

        return teacher_kind(self.teacher)

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise ConfigError("teacher= is required: a model, an http(s):// endpoint (with teacher_model=) or a "
                              "program (package.module:function or file.py:function)")
        if self.teacher_kind == "endpoint" and not self.teacher_model:
            raise ConfigError(f"teacher={self.teacher}: an endpoint teacher needs teacher_model (the model name)")
        if self.thinking == "off":
            raise ConfigError("thinking=off: a teacher that does not think gives nothing to distill")
        for name in ("no_think_fraction", "flag_fraction", "min_language"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.thinking_limit < 0:
            raise ConfigError(f"thinking_limit must be >= 0 (0: off), got {self.thinking_limit}")


@dataclass
class SelfRewardConfig(RolloutConfig, DPOConfig):
    """Self-rewarding (Yuan et al. 2401.10020): the policy scores its own samples (0-5); best vs worst -> DPO."""

    iterations: int = opt(2, "Rounds of sample -> self-judge -> DPO; each writes output_dir/iter_K.")
    num_generations: int = opt(4, "N: responses sampled per prompt and iteration.")
    rewards: str = opt("", "Not used to choose pairs (the policy judges); optional reward functions (e.g. "
                       "correctness) whose means over the samples are logged per iteration.", list_as="comma")
    judge_samples: int = opt(1, "Judgements sampled per response; their parsed scores are averaged.")
    judge_temperature: float = opt(0.0, "Temperature of the judgements (0: greedy; > 0 with judge_samples > 1).")
    judge_max_new_tokens: int = opt(192, "Token limit of a judgement (it reasons before 'Score: N').")
    collapse_threshold: float = opt(0.5, "Warn when more than this share of prompts get N equal scores.")
    batch_size: int = opt(8, "Pairs per micro-batch of each iteration's DPO.")
    lr: float = _like(DPOConfig, "lr")
    steps_are_rollouts = False

    def validate(self) -> None:
        super().validate()
        if self.loss == "kto":
            raise ConfigError("self-rewarding trains on (best, worst) pairs: choose a paired loss, not kto")
        if self.num_generations < 2:
            raise ConfigError("self-rewarding pairs the best and worst of N samples: num_generations must be >= 2")
        if self.iterations < 1 or self.judge_samples < 1 or self.judge_max_new_tokens < 1:
            raise ConfigError("need iterations, judge_samples and judge_max_new_tokens >= 1")
        if self.judge_temperature < 0 or not 0 <= self.collapse_threshold <= 1:
            raise ConfigError("need judge_temperature >= 0 and 0 <= collapse_threshold <= 1")
        if self.judge_samples > 1 and self.judge_temperature == 0:
            raise ConfigError("judge_samples > 1 with judge_temperature=0 asks the same greedy judgement again: "
                              "set judge_temperature > 0")


@dataclass
class IterativeDPOConfig(RolloutConfig, DPOConfig):
    """On-policy iterative DPO (RLHFlow, 2405.07863): sample N per prompt, the rewards' best against their worst
    (ties dropped), DPO from the current model, repeat."""

    iterations: int = opt(2, "Rounds of sample -> pair -> DPO; each writes output_dir/iter_K.")
    num_generations: int = opt(4, "N: completions sampled per prompt and iteration.")
    rewards: str = opt("correctness", "Reward functions that score each sample (the judge): correctness, format, "
                       "rm:PATH, module:function or file.py:function.", list_as="comma")
    batch_size: int = opt(8, "Pairs per micro-batch of each iteration's DPO.")
    lr: float = _like(DPOConfig, "lr")
    steps_are_rollouts = False

    def validate(self) -> None:
        super().validate()
        if self.loss == "kto":
            raise ConfigError("iterative DPO trains on (best, worst) pairs: choose a paired loss, not kto")
        if self.num_generations < 2 or self.iterations < 1:
            raise ConfigError("need num_generations >= 2 (a best and a worst) and iterations >= 1")


@dataclass
class FeedbackItemsConfig(RolloutConfig):
    """``alignkit feedback generate``: items for the feedback app, sampled from one or two policies."""

    store: str = opt("", "The feedback store (SQLite file); the project must exist (`alignkit feedback init`).")
    project: str = opt("", "The project the items go to: pairwise or arena (two responses), ranking (2-8) or thumbs (1).")
    models: str = opt("", "Comma-separated policies the responses come from (default: model); with two, each item has responses from both, alternating.", list_as="comma")
    responses: int = opt(2, "Responses per prompt (K).")
    rewards: str = opt("", "Not used.", list_as="comma")
    output_dir: str = opt("", "Not used (the items go to the store).")

    def validate(self) -> None:
        super().validate()
        if not self.store or not self.project:
            raise ConfigError("set store= (the feedback SQLite file) and project= (a project in it)")
        if not 1 <= self.responses <= 8:
            raise ConfigError("responses must be between 1 and 8")
        if len(self.model_list) > 2:
            raise ConfigError("models: at most two policies")

    @property
    def model_list(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()] or [self.model]


@dataclass
class LoopConfig(RolloutConfig, DPOConfig):
    """The continuous loop (alignkit.recipes.loop): propose pairs -> collect votes -> gate -> reward model ->
    re-align -> compare -> promote or roll back, round after round."""

    rounds: int = opt(3, "Rounds; each writes output_dir/round_K.")
    store: str = opt("", "The feedback store (SQLite file) annotators vote in; empty: output_dir/feedback.sqlite.")
    project: str = opt("loop", "The store's pairwise project for the loop's items (created if missing).")
    items_per_round: int = opt(32, "Training prompts proposed per round, each as a pair of two samples of the current policy.")
    pool_factor: int = opt(1, "Propose pool_factor x items_per_round pairs; with selection=uncertain the annotators see first those the reward model is least sure of.")
    selection: str = opt("uniform", "Which proposed pairs annotators see first: uniform (random order) or uncertain (|P(a > b) - 1/2| smallest under the current reward model: active selection).", ("uniform", "uncertain"))
    overlap: int = opt(3, "Distinct annotators per item.")
    lease_seconds: float = opt(600.0, "How long an annotator holds a task before it goes back to the queue.")
    gold_rate: float = opt(0.0, "Share of tasks drawn from gold items (items with a known answer).")
    min_items: int = opt(16, "Gate: items of the round that must be complete (overlap votes) before training.")
    min_agreement: float = opt(0.0, "Gate: the round's pairwise agreement must reach this, else the run stops (status blocked).")
    min_annotator_agreement: float = opt(0.0, "Drop annotators whose agreement with the others' consensus is below this before training (0: keep all).")
    crowd: str = opt("", "Simulate the annotators: their hidden utility as reward functions (e.g. correctness, a file.py:function); empty: people vote in `alignkit feedback serve`.", list_as="comma")
    crowd_weights: str = opt("", "Weights of the crowd's utility functions (default: all 1).", list_as="comma")
    crowd_size: int = opt(8, "Simulated annotators.")
    crowd_adversarial: float = opt(0.0, "Share of the simulated annotators who vote against their own judgement.")
    crowd_temperature: float = opt(1.0, "Noise of the simulated votes: P(a > b) = sigmoid((u(a) - u(b)) / temperature).")
    crowd_votes: int = opt(0, "Votes the simulated crowd casts per round (0: until every open item is complete).")
    rm_model: str = opt("", "The reward model's starting point in round 1 (default: model); later rounds warm-start from the last one.")
    rm_lr: float = opt(1e-5, "Learning rate of the reward model's training.")
    rm_epochs: float = opt(1.0, "Passes over all the votes so far when the reward model is retrained.")
    align: str = opt("dpo", "Re-alignment: dpo (DPO on the round's voted pairs), rm (DPO on best-vs-worst of num_generations samples by the new reward model), grpo (rl_steps of GRPO against the new reward model), or none (only the reward model learns; the policy stays).", ("dpo", "rm", "grpo", "none"))
    rl_steps: int = opt(20, "align=grpo: GRPO steps per round (prompts_per_step prompts x num_generations samples each).")
    compare_prompts: int = opt(64, "Held-out prompts the new policy and the current one are compared on (0: all).")
    promote_min_win_rate: float = opt(0.5, "Promote the new policy when its win rate against the current one is at least this; else roll back.")
    rewards: str = opt("", "Not used (the crowd or people judge).", list_as="comma")
    num_generations: int = opt(4, "align=rm: samples per prompt, the reward model's best against its worst.")
    eval_fraction: float = opt(0.2, "Share of the prompts held out: the reward model's gold set and the policies' comparison.")
    gold_data: str = opt("", "A frozen gold set (preference pairs: prompt, chosen, rejected) the reward model is measured on each round, e.g. another loop's gold_pairs.jsonl; empty: made from the held-out prompts with a simulated crowd, else the store's gold items.")
    batch_size: int = opt(8, "Pairs per micro-batch of the reward model's and the policy's training.")
    lr: float = _like(DPOConfig, "lr")
    steps_are_rollouts = False

    def validate(self) -> None:
        super().validate()
        if self.loss == "kto":
            raise ConfigError("the loop trains on pairs: choose a paired loss, not kto")
        if min(self.rounds, self.items_per_round, self.pool_factor, self.overlap, self.crowd_size) < 1:
            raise ConfigError("rounds, items_per_round, pool_factor, overlap and crowd_size must be >= 1")
        if not 0 <= self.crowd_adversarial <= 1 or self.crowd_temperature <= 0 or self.crowd_votes < 0:
            raise ConfigError("need 0 <= crowd_adversarial <= 1, crowd_temperature > 0 and crowd_votes >= 0")
        if not 0 <= self.promote_min_win_rate <= 1 or not 0 <= self.min_agreement <= 1:
            raise ConfigError("promote_min_win_rate and min_agreement are shares in [0, 1]")
        if self.align in ("rm", "grpo") and self.num_generations < 2:
            raise ConfigError(f"align={self.align} compares num_generations samples of a prompt: need >= 2")
        if self.rl_steps < 1:
            raise ConfigError("rl_steps must be >= 1")


@dataclass
class EvalConfig:
    """``alignkit eval``: a model against its reference on capability, win rate, safety and failure-mode probes."""

    model: str = opt("", "The model to evaluate: a run's final/ directory, a model name, a .gguf file or a hub id.")
    reference: str = opt("smollm2-135m-instruct", "What it is compared with (usually the model before alignment); empty: none.")
    output_dir: str = opt("outputs/eval", "Where summary.json, the PNG plots and report.html are written.")
    run_dir: str = opt("", "A training run's output_dir: its metrics.jsonl adds training curves to the report.")
    suites: str = opt("capability,winrate,safety,probes", "Comma-separated parts to run: capability, winrate, safety, probes, pluralistic (GDPO: the model's belief distribution against a group's on held-out questions) and thinking (reasoning models: mode following, accuracy against the thinking budget, thinking on against off); the last two not run by default.", list_as="comma")
    capability_data: str = opt("asdiv-heldout", "The first capability set: math prompts with an `answer` column ('asdiv-heldout', the main jobs' 150, 'math500', or a file), or code prompts with a `tests` column scored as pass@1 by the sandboxed code reward ('humaneval', or a file).")
    capability_limit: int = opt(150, "Problems scored per capability set (0: all).")
    math500_limit: int = opt(50, "MATH-500 problems scored as a second capability set (0: skip).")
    humaneval_limit: int = opt(0, "HumanEval problems scored as pass@1 (greedy, the sandboxed code reward) as another capability set (0: skip; 164: all).")
    code_max_new_tokens: int = opt(384, "Token limit of an answer to a code capability set (a whole function needs room).")
    ifbench_data: str = opt("ifbench", "Instruction-following prompts with rule checks: 'ifbench' or a file of rows in its format (prompt, instruction_id_list, kwargs).")
    ifbench_limit: int = opt(60, "IFBench prompts scored (a fixed seeded sample; 0: skip).")
    ifbench_max_new_tokens: int = opt(256, "Token limit of an IFBench answer (its constraints need room).")
    winrate_data: str = opt("asdiv-heldout", "Prompts for the win rate: 'asdiv-heldout', 'mt-bench' or a file of `prompt` rows.")
    winrate_limit: int = opt(80, "Prompts used for the win rate (0: all).")
    judge: str = opt("correctness", "Win-rate judge: a reward function (correctness, rm:PATH, module:function), llm:MODEL or an http(s):// OpenAI-compatible endpoint.")
    judge_model: str = opt("", "Model name sent to an endpoint judge.")
    reward: str = opt("", "Proxy reward for the reward-hacking probe (e.g. rm:PATH); empty: skip.")
    harmful_limit: int = opt(30, "Prompts taken from each harmful set (Do-Not-Answer, HarmBench, AdvBench).")
    harmful_data: str = opt("", "Instead of those sets: a file of `prompt` rows (with an optional `set` column).")
    refusal_data: str = opt("refusal", "Human-labelled responses (`text`, `refusal`) that validate the refusal detector: 'refusal' (PyRIT's) or a file.")
    benign_limit: int = opt(0, "Benign look-alike prompts for over-refusal (0: all of the built-in set).")
    samples: int = opt(4, "Samples per prompt (temperature 1) for diversity, entropy and KL probes.")
    probe_prompts: int = opt(24, "Prompts sampled for the diversity, entropy and KL probes.")
    max_new_tokens: int = opt(64, "Token limit of every answer.")
    precision: str = opt("bf16", "Generation precision.", ("bf16", "fp32"))
    batch_size: int = opt(64, "Sequences generated at once.")
    bootstrap: int = opt(2000, "Bootstrap resamples for confidence intervals.")
    seed: int = opt(0, "Seed for sampling and the bootstrap.")
    pluralistic_data: str = opt("", "suites=pluralistic: held-out questions as belief-kind data (prompt, beliefs with the group's shares, pairs; optional keywords for the consistency rule); empty: the shipped synthetic set's test.jsonl.")
    pluralistic_samples: int = opt(16, "suites=pluralistic: free completions per question (temperature 1) for the sampled belief distribution, and as many two-stage ones for consistency.")
    pluralistic_questions: int = opt(0, "suites=pluralistic: questions used (the first N; 0: all).")
    pluralistic_max_new_tokens: int = opt(40, "suites=pluralistic: token limit of a sampled turn (the belief line and a sentence).")
    pluralistic_plot_questions: int = opt(4, "suites=pluralistic: questions drawn as bar charts in the report (those with 3+ beliefs, spread over the set).")
    belief_template: str = opt("Belief: {belief}\n", "suites=pluralistic: how a turn states its belief, with one {belief} field and text after it (as the model was trained).")
    thinking_data: str = opt("asdiv-heldout", "suites=thinking: held-out math prompts with an `answer` column ('asdiv-heldout', 'math500' or a file) for the budget curve, thinking on against off, and the mode-following conversations.")
    thinking_limit: int = opt(100, "suites=thinking: problems used (0: all).")
    thinking_budgets: str = opt("32,64,128,256", "suites=thinking: thinking budgets in tokens (the engine's max_thinking_tokens with the hard stop) of the accuracy curve; thinking on is compared with off at the largest.", list_as="comma")
    thinking_answer_tokens: int = opt(64, "suites=thinking: new tokens for the answer beyond the budget (and the limit of a thinking-off answer).")
    budget_action: str = opt("force_end", "suites=thinking: the engine's action at the budget (force_end: close the block; transition: Qwen3's sentence, then close).", ("force_end", "transition"))
    thinkfollow_conversations: int = opt(100, "suites=thinking: mode-following conversations (their last turns cycle through the problems).")
    thinkfollow_turns: int = opt(3, "suites=thinking: user turns per conversation, at most (each drawn from 1 to this).")

    @property
    def budgets(self) -> list[int]:
        return [int(x) for x in str(self.thinking_budgets).split(",") if x.strip()]

    @property
    def suite_names(self) -> list[str]:
        return [x.strip() for x in self.suites.split(",") if x.strip()]

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model= is required (a run's final/ directory or a model name)")
        unknown = set(self.suite_names) - {"capability", "winrate", "safety", "probes", "pluralistic", "thinking"}
        if unknown:
            raise ConfigError(f"unknown suite(s) {', '.join(sorted(unknown))}; choose from capability, winrate, safety, probes, pluralistic, thinking")
        if "thinking" in self.suite_names:
            try:
                budgets = self.budgets
            except ValueError:
                budgets = []
            if not budgets or min(budgets) < 1:
                raise ConfigError(f"thinking_budgets={self.thinking_budgets!r}: expected positive token counts, e.g. 32,64,128")
            if min(self.thinking_answer_tokens, self.thinkfollow_turns, self.thinkfollow_conversations) < 1:
                raise ConfigError("thinking_answer_tokens, thinkfollow_turns and thinkfollow_conversations must be >= 1")
            check_choices(self)
        if "pluralistic" in self.suite_names:
            from alignkit.data.beliefs import check_template

            try:
                check_template(self.belief_template)
            except ValueError as e:
                raise ConfigError(f"belief_template: {e}") from None
        if "winrate" in self.suite_names and not self.reference:
            raise ConfigError("the win rate needs a reference= model")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"precision={self.precision!r}: expected bf16 or fp32")
        for name in ("samples", "max_new_tokens", "ifbench_max_new_tokens", "code_max_new_tokens", "batch_size",
                     "bootstrap", "pluralistic_samples", "pluralistic_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class CAIConfig:
    """``alignkit cai``: Constitutional AI's data stages (docs/ai_feedback.md). stage=critique: SL-CAI critique and
    revision, writing trace.jsonl, sft.jsonl and sft_card.md; stage=label: RL-CAI / RLAIF preference labels,
    writing label_trace.jsonl, preferences.jsonl and preferences_card.md. Both resume from their trace."""

    stage: str = opt("critique", "critique: sample, critique and revise (SL-CAI); label: judge pairs of samples (RL-CAI); align: measure the judge's agreement with a labelled set (labeler alignment) only.", ("critique", "label", "align"))
    model: str = opt("smollm2-135m-instruct", "The policy that answers, critiques and revises (and samples the pairs to label): a model name, a directory, 'tiny', or an http(s):// OpenAI-compatible endpoint.")
    model_name: str = opt("", "Model name sent when `model` is an endpoint.")
    data: str = opt("", "Prompts: a file or datasets name with a `prompt` column (an `id` column, if present, names each prompt; otherwise its row number).")
    output_dir: str = opt("outputs/cai", "Where the trace, the output set and its data card are written; rerun with the same settings to resume.")
    constitution: str = opt("default", "Constitution YAML file ('default': alignkit's harmlessness and helpfulness one). See --help's end for the format.")
    rounds: int = opt(1, "stage=critique: critique-and-revision rounds per prompt, each with a principle drawn uniformly at random.")
    few_shot: int = opt(-1, "Few-shot examples of the constitution put before each critique chain (-1: all, 0: none).")
    judge: str = opt("", "stage=label: the judge: empty (the policy model itself), llm:MODEL (a local model) or an http(s):// endpoint.")
    judge_model: str = opt("", "Model name sent to an endpoint judge.")
    judge_samples: int = opt(8, "An endpoint judge without log-probs: sampled answers per question; the label is the share of (A) among the readable ones.")
    principles_per_pair: int = opt(1, "stage=label: principles drawn (without replacement) per pair; their labels are averaged.")
    chain_of_thought: bool = opt(False, "stage=label: the judge reasons before answering; probabilities clamped to [0.4, 0.6].")
    tie_margin: float = opt(0.0, "stage=label: a pair whose label p has |p - 0.5| <= this is a tie: counted and dropped.")
    alignment_set: str = opt("", "stage=align, label: the labelled pairs the judge's labels are checked against: refusal (PyRIT's human labels), asdiv-prefs (a program oracle) or a preference file whose chosen answer is the better one; empty: not measured.")
    alignment_principles: str = opt("", "The principle ids asked about the labelled pairs (default: all of the constitution's).", list_as="comma")
    alignment_limit: int = opt(0, "Use only the first N labelled pairs (0: all).")
    min_alignment: float = opt(0.0, "stage=label: stop before labelling (exit 2) when the judge's measured alignment is below this (0: no gate); the report is written beside the labels and rm/dpo check it too.")
    force: bool = opt(False, "stage=label: label even when the judge's alignment is below min_alignment (training on those labels then needs force=true as well).")
    max_new_tokens: int = opt(128, "Token limit of every generated answer, critique, revision and judge reasoning.")
    temperature: float = opt(1.0, "Sampling temperature of the policy (0: greedy; pairs to label need > 0).")
    top_p: float = opt(1.0, "Nucleus sampling of the policy.")
    stop: str = opt("", "Extra stop string, or a JSON list of them, added to the constitution's.", list_as="json")
    limit: int = opt(0, "Use only the first N prompts (0: all).")
    batch_size: int = opt(16, "Prompts generated at once; records are written after each batch.")
    precision: str = opt("bf16", "Local generation precision.", ("bf16", "fp32"))
    seed: int = opt(0, "Seed of every sample and principle draw (each derived from the seed and the prompt id).")
    overwrite: bool = opt(False, "Remove this stage's earlier files from output_dir first, instead of resuming.")

    stop_strings = RolloutConfig.stop_strings

    @staticmethod
    def help_epilog() -> str:
        """The constitution format, printed at the end of ``alignkit cai --help``."""
        from alignkit.feedback import constitution

        doc = constitution.__doc__ or ""
        return "\nthe constitution file:\n" + "\n".join("  " + line for line in doc.strip().splitlines())

    def validate(self) -> None:
        check_choices(self)
        if not self.data and self.stage != "align":
            raise ConfigError("data= is required (a file of prompts)")
        for name in ("rounds", "max_new_tokens", "batch_size", "principles_per_pair", "judge_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.limit < 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need limit >= 0, temperature >= 0 and 0 < top_p <= 1, got {self.limit}, "
                              f"{self.temperature}, {self.top_p}")
        if not 0 <= self.tie_margin < 0.5:
            raise ConfigError(f"tie_margin must be in [0, 0.5), got {self.tie_margin}")
        if not 0 <= self.min_alignment <= 1 or self.alignment_limit < 0:
            raise ConfigError(f"need 0 <= min_alignment <= 1 and alignment_limit >= 0, got {self.min_alignment} and "
                              f"{self.alignment_limit}")
        if (self.stage == "align" or self.min_alignment > 0) and not self.alignment_set:
            raise ConfigError("measuring the judge's alignment (stage=align, min_alignment > 0) needs alignment_set= "
                              "(refusal, asdiv-prefs or a preference file)")
        if self.stage == "label" and self.temperature == 0:
            raise ConfigError("stage=label with temperature=0: both samples of a prompt would be the same answer")
        if self.model.startswith(("http://", "https://")) and not self.model_name:
            raise ConfigError(f"model={self.model}: an endpoint needs model_name (the model name to send)")
        if self.judge.startswith(("http://", "https://")) and not self.judge_model:
            raise ConfigError(f"judge={self.judge}: an endpoint judge needs judge_model (the model name to send)")
        if self.judge and not self.judge.startswith(("http://", "https://", "llm:")):
            raise ConfigError(f"judge={self.judge!r}: expected empty, llm:MODEL or an http(s):// endpoint")

# ---------------------------------------------------------------- parsing


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _coerce(key: str, raw, typ, list_as: str | None = None):
    if isinstance(raw, (list, tuple, dict)):
        if isinstance(raw, dict) or typ is not str or list_as is None:
            raise ConfigError(f"{key}: expected a single value, got a {type(raw).__name__} ({raw!r})")
        if not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in raw):
            raise ConfigError(f"{key}: expected a list of strings or numbers, got {raw!r}")
        if list_as == "json":
            import json

            return json.dumps([str(x) for x in raw])
        if any("," in str(x) for x in raw):
            raise ConfigError(f"{key}: list items cannot contain commas, got {raw!r}")
        return ",".join(str(x).strip() for x in raw)
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
        typ = args[0]
    if isinstance(raw, typ) and not (typ is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if typ is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        return text
    except ValueError:
        raise ConfigError(f"{key}={raw!r}: expected {typ.__name__}") from None


def build(cls, yaml_path: str | None = None, overrides: list[str] | dict | None = None):
    """A config of type ``cls`` from an optional YAML file and then ``key=value`` overrides (later wins)."""
    values: dict = {}
    if yaml_path:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {yaml_path}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of key: value")
        values.update(loaded)
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"expected key=value, got {item!r}")
            k, v = item.split("=", 1)
            values[k.strip()] = v
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (see --help for the valid keys)")
    kwargs = {k: _coerce(k, v, _field_type(cls, fields[k]), fields[k].metadata.get("list_as")) for k, v in values.items()}
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def help_text(cls) -> str:
    lines = []
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(map(str, choices))}]" if choices else ""
        lines.append(f"  {f.name}={f.default!r}{extra}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
