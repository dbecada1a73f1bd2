"""GDPO (arXiv:2412.20299): its loss terms, their optimum on a tabular problem against pooled DPO's, the belief data
format and its errors, the row encoding, and ``alignkit gdpo`` through the real CLI on the tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from alignkit.data.beliefs import DEFAULT_TEMPLATE, encode_belief_pair, parse_belief, render_belief
from alignkit.data.formats import load_examples
from alignkit.errors import DataError
from alignkit.losses.preference import PREFERENCE_LOSSES, BeliefLogps, PairLogps, belief_calibration, belief_nll, dpo, gdpo
from test_losses_closed_form import lbfgs, tv

F64 = torch.float64


# --------------------------------------------------------------------------------------------- golden values


def golden_batch():
    """Batch G of alignkit.losses.preference (two pairs) and the beliefs of :func:`gdpo`'s docstring: the first
    pair's prompt has 2 beliefs (logps -1, -2; shares 0.6, 0.4; the pair is conditioned on belief 1), the second's
    3 (logps -1, -2, -3; shares 0.5, 0, 0.5; belief 0); the first row is padded to 3 beliefs."""
    pairs = PairLogps(torch.tensor([-5.0, -8.0], dtype=F64), torch.tensor([-7.0, -6.0], dtype=F64),
                      torch.tensor([2.0, 4.0]), torch.tensor([4.0, 3.0]),
                      torch.tensor([-6.0, -7.0], dtype=F64), torch.tensor([-6.5, -7.5], dtype=F64))
    beliefs = BeliefLogps(torch.tensor([[-1.0, -2.0, 5.0], [-1.0, -2.0, -3.0]], dtype=F64),
                          torch.tensor([[True, True, False], [True, True, True]]),
                          torch.tensor([[0.6, 0.4, 0.0], [0.5, 0.0, 0.5]], dtype=F64), torch.tensor([1, 0]))
    return pairs, beliefs


def test_calibration_golden_values_and_padding_is_ignored():
    _, beliefs = golden_batch()
    # the padded belief's logp (5.0, higher than any real one) must not take part in the normalisation
    assert belief_calibration(beliefs).tolist() == pytest.approx([0.0402500205, 0.7144587838], abs=1e-9)


def test_calibration_is_zero_at_the_target_and_normalised_over_the_options():
    target = torch.tensor([[0.2, 0.3, 0.5]], dtype=F64)
    # any common shift of the sequence log-probs (mass outside the beliefs) leaves q, and so the KL, unchanged
    for shift in (0.0, -7.0):
        b = BeliefLogps(torch.log(target) + shift, torch.ones(1, 3, dtype=torch.bool), target, torch.tensor([0]))
        assert belief_calibration(b).item() == pytest.approx(0.0, abs=1e-12)


def test_belief_nll_golden_values():
    _, beliefs = golden_batch()
    assert belief_nll(beliefs).tolist() == [2.0, 1.0]


def test_gdpo_golden_values_weights_and_inner_loss():
    pairs, beliefs = golden_batch()
    out = gdpo(pairs, beliefs=beliefs, beta=0.5)
    assert out.losses.tolist() == pytest.approx([2.4271210266, 3.2163878652], abs=1e-9)
    assert out.metrics["preference"].tolist() == pytest.approx([0.3868710061, 1.5019290813], abs=1e-9)
    # weights act on their own term
    w = gdpo(pairs, beliefs=beliefs, beta=0.5, calibration_weight=2.0, belief_nll_weight=0.5, preference_weight=3.0)
    expected = [3 * 0.3868710061 + 2 * 0.0402500205 + 0.5 * 2, 3 * 1.5019290813 + 2 * 0.7144587838 + 0.5 * 1]
    assert w.losses.tolist() == pytest.approx(expected, abs=1e-9)
    # any registered paired loss is the preference term, with its own hyperparameters
    ipo = gdpo(pairs, beliefs=beliefs, loss="ipo", beta=0.5, calibration_weight=0.0, belief_nll_weight=0.0)
    assert ipo.losses.tolist() == pytest.approx([0.25, 12.25])
    assert gdpo(pairs, beliefs=beliefs, beta=0.5).chosen_rewards.tolist() == dpo(pairs, beta=0.5).chosen_rewards.tolist()
    assert PREFERENCE_LOSSES["gdpo"].fn is gdpo
    with pytest.raises(Exception, match="paired"):
        gdpo(pairs, beliefs=beliefs, loss="kto")


# ------------------------------------------------------------------------------------- closed form, tabular


def pooled_dpo_optimum(pi_ref: torch.Tensor, p: float, beta: float) -> torch.Tensor:
    """The docstring's formula: pi(y1) / pi(y2) = pi_ref(y1) / pi_ref(y2) * (p / (1 - p))^(1 / beta)."""
    ratio = pi_ref[0] / pi_ref[1] * (p / (1 - p)) ** (1 / beta)
    return torch.stack([ratio / (1 + ratio), 1 / (1 + ratio)])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_pooled_dpo_collapses_to_the_majority_as_the_formula_says(beta):
    """A group where a share p = 0.6 holds belief 1: each member prefers the response of their belief, so pooled
    pairs prefer y1 over y2 with probability p. DPO's expected loss on them reaches the closed form."""
    p, pi_ref = 0.6, torch.tensor([0.45, 0.55], dtype=F64)
    one = torch.ones(1, dtype=F64)

    def expected(theta):
        logpi = torch.log_softmax(theta, 0)
        lr = torch.log(pi_ref)
        fwd = dpo(PairLogps(logpi[:1], logpi[1:], one, one, lr[:1], lr[1:]), beta=beta).losses
        back = dpo(PairLogps(logpi[1:], logpi[:1], one, one, lr[1:], lr[:1]), beta=beta).losses
        return (p * fwd + (1 - p) * back).sum()

    pi = torch.softmax(lbfgs(expected, torch.log(pi_ref)), 0)
    optimum = pooled_dpo_optimum(pi_ref, p, beta)
    assert tv(pi, optimum) < 1e-3, (pi, optimum)
    if beta == 0.1:
        assert pi[0] > 0.97  # the majority takes nearly all the mass, far from the group's 0.6


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_gdpo_belief_marginal_reaches_the_target(beta):
    """Tabular GDPO: the model's first output is one of 5 texts, 3 of them beliefs (the other 2 are mass outside
    the beliefs, which the normalised calibration ignores and the belief likelihood removes); then, given belief
    b, one of 3 responses, y_b being the consistent one. Pairs: a member with belief b (share p*_b) prefers y_b to
    each other response. Minimising the expected GDPO loss brings the belief marginal to p* (normalised over the
    beliefs), whatever beta, and within each belief the consistent response wins."""
    target = torch.tensor([0.55, 0.3, 0.15], dtype=F64)
    ref_first = torch.log(torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=F64))
    ref_resp = torch.log(torch.full((3, 3), 1 / 3, dtype=F64))
    win, lose = [], []
    for b in range(3):
        for o in range(3):
            if o != b:
                win.append(b)
                lose.append(o)
    win, lose = torch.tensor(win), torch.tensor(lose)
    weight = target[win] / 2  # belief b is drawn with p*_b, the rejected response uniformly among the other two
    one = torch.ones(len(win), dtype=F64)

    def expected(theta):
        first = torch.log_softmax(theta[:5], 0)
        resp = torch.log_softmax(theta[5:].view(3, 3), 1)
        pairs = PairLogps(resp[win, win], resp[win, lose], one, one, ref_resp[win, win], ref_resp[win, lose])
        beliefs = BeliefLogps(first[:3].expand(len(win), 3), torch.ones(len(win), 3, dtype=torch.bool),
                              target.expand(len(win), 3), win)
        return (weight * gdpo(pairs, beliefs=beliefs, beta=beta).losses).sum()

    theta = lbfgs(expected, torch.cat([ref_first, ref_resp.flatten()]), iters=2000)
    first = torch.softmax(theta[:5], 0)
    marginal = first[:3] / first[:3].sum()
    assert tv(marginal, target) < 1e-3, (marginal, target)
    assert first[:3].sum() > 0.99  # the likelihood term moved the mass onto the beliefs
    resp = torch.softmax(theta[5:].view(3, 3), 1)
    assert (resp.diagonal() > 0.9).all(), resp
    # without the calibration and likelihood terms nothing moves the beliefs away from the reference
    flat = lbfgs(lambda t: expected(t) * 0 + (weight * gdpo(
        PairLogps(torch.log_softmax(t[5:].view(3, 3), 1)[win, win], torch.log_softmax(t[5:].view(3, 3), 1)[win, lose],
                  one, one, ref_resp[win, win], ref_resp[win, lose]),
        beliefs=BeliefLogps(torch.log_softmax(t[:5], 0)[:3].expand(len(win), 3), torch.ones(len(win), 3, dtype=torch.bool),
                            target.expand(len(win), 3), win),
        beta=beta, calibration_weight=0.0, belief_nll_weight=0.0).losses).sum(), torch.cat([ref_first, ref_resp.flatten()]))
    ref_marginal = torch.softmax(ref_first, 0)[:3] / torch.softmax(ref_first, 0)[:3].sum()
    assert tv(torch.softmax(flat[:5], 0)[:3] / torch.softmax(flat[:5], 0)[:3].sum(), ref_marginal) < 1e-9
    assert tv(ref_marginal, target) > 0.1


# ------------------------------------------------------------------------------------------------- data


def _write(tmp_path, rows, name="b.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "Tea or coffee?", "beliefs": {"tea": 0.6, "coffee": 0.4},
        "pairs": [{"belief": "tea", "chosen": "Tea, always.", "rejected": "Coffee, always.", "rejected_belief": "coffee"}]}


def test_nested_and_flat_rows_load_and_share_a_group_per_prompt(tmp_path):
    flat = {"prompt": "Tea or coffee?", "beliefs": {"tea": 0.6, "coffee": 0.4}, "belief": "coffee",
            "chosen": "Coffee, always.", "rejected": "Tea, always."}
    other = {**GOOD, "prompt": "Cats or dogs?", "beliefs": {"cats": 0.5, "dogs": 0.5},
             "pairs": [{"belief": "dogs", "chosen": "Dogs.", "rejected": "Cats."}]}
    ex = load_examples(str(_write(tmp_path, [GOOD, other, flat])), "belief").examples
    assert [e.belief for e in ex] == ["tea", "dogs", "coffee"]
    assert ex[0].target == (0.6, 0.4) and ex[0].rejected_belief == "coffee" and ex[2].rejected_belief is None
    assert ex[0].group == ex[2].group != ex[1].group


@pytest.mark.parametrize(("row", "field", "message"), [
    ({**GOOD, "beliefs": {"tea": 0.6, "coffee": 0.3}}, "beliefs", "sum to 0.9"),
    ({**GOOD, "beliefs": {"tea": 0.6, "coffee": -0.2, "milk": 0.6}}, "beliefs.coffee", ">= 0"),
    ({**GOOD, "beliefs": {"tea": 1.0}}, "beliefs", "at least 2"),
    ({**GOOD, "beliefs": ["tea", "coffee"]}, "beliefs", "object"),
    ({**GOOD, "pairs": [{"belief": "milk", "chosen": "a", "rejected": "b"}]}, "pairs[0].belief", "unknown belief 'milk'"),
    ({**GOOD, "pairs": [{"chosen": "a", "rejected": "b"}]}, "pairs[0].belief", "missing"),
    ({**GOOD, "pairs": [{"belief": "tea", "chosen": "a", "rejected": "b", "rejected_belief": "x"}]},
     "pairs[0].rejected_belief", "unknown belief"),
    ({**GOOD, "pairs": [{"belief": "tea", "chosen": "a", "rejected": "a"}]}, "pairs[0].rejected", "identical"),
    ({**GOOD, "pairs": []}, "pairs", "non-empty"),
])
def test_bad_belief_rows_name_file_line_and_field(tmp_path, row, field, message):
    path = _write(tmp_path, [GOOD, row])
    with pytest.raises(DataError) as err:
        load_examples(str(path), "belief")
    assert err.value.line == 2 and err.value.field == field and message in str(err.value), str(err.value)
    assert str(path) in str(err.value)


def test_the_same_prompt_with_other_shares_is_an_error(tmp_path):
    with pytest.raises(DataError) as err:
        load_examples(str(_write(tmp_path, [GOOD, {**GOOD, "beliefs": {"tea": 0.5, "coffee": 0.5}}])), "belief")
    assert err.value.line == 2 and err.value.field == "beliefs" and "at 1" in str(err.value)


def test_shares_within_the_tolerance_are_renormalised(tmp_path):
    ex = load_examples(str(_write(tmp_path, [{**GOOD, "beliefs": {"tea": 0.604, "coffee": 0.4}}])), "belief").examples
    assert sum(ex[0].target) == pytest.approx(1.0, abs=1e-12) and ex[0].target[0] == pytest.approx(0.604 / 1.004)


# GlobalOpinionQA-derived rows as the GDPO paper's data ships them (mma_*.json): options as a Python repr, one
# probability per option, the annotator's choice (by text and 1-based id) with a consistent and an inconsistent answer
OPINION_QA = [
    {"context": "Survey of adults in the United States.", "prompt": "Do you think the economy will improve?",
     "options": "['Improve a lot', 'Improve a little', 'Remain the same', 'Worsen']",
     "probabilities": [0.12, 0.33, 0.3, 0.25], "accept_choice_id": 2, "accept_choice": "Improve a little",
     "accept_response": "I expect things to get somewhat better.", "reject_choice_id": 4, "reject_choice": "Worsen",
     "reject_response": "I think it is going downhill."},
    {"context": "Survey of adults in the United States.", "prompt": "Do you think the economy will improve?",
     "options": ["Improve a lot", "Improve a little", "Remain the same", "Worsen"],
     "probabilities": [0.12, 0.33, 0.3, 0.25], "accept_choice": "Worsen",
     "accept_response": "Honestly, it will get worse.", "reject_response": "Things are looking up a lot."},
    {"prompt": "Is trade with other countries good?", "options": ["Good", "Bad"], "probabilities": [0.7, 0.3],
     "accept_choice_id": 0, "accept_choice": "Good", "accept_response": "Trade helps us.",
     "reject_choice_id": 1, "reject_choice": "Bad", "reject_response": "Trade hurts us."},
]


def test_globalopinionqa_layout_loads(tmp_path):
    ex = load_examples(str(_write(tmp_path, OPINION_QA)), "belief").examples
    assert ex[0].prompt == "Survey of adults in the United States.\n\nDo you think the economy will improve?"
    assert ex[0].beliefs == ("Improve a lot", "Improve a little", "Remain the same", "Worsen")
    assert ex[0].target == pytest.approx((0.12, 0.33, 0.3, 0.25))
    assert (ex[0].belief, ex[0].rejected_belief, ex[1].belief, ex[1].rejected_belief) == (
        "Improve a little", "Worsen", "Worsen", None)
    assert ex[0].chosen == "I expect things to get somewhat better." and ex[0].group == ex[1].group
    assert (ex[2].belief, ex[2].rejected_belief) == ("Good", "Bad")  # ids counted from 0 here


@pytest.mark.parametrize(("change", "field"), [
    ({"accept_choice": "Improve a lot"}, "accept_choice_id"),  # id 2 names neither option 2 nor option 1 of it
    ({"accept_choice": "Better"}, "accept_choice"),
    ({"probabilities": [0.5, 0.5]}, "probabilities"),
    ({"options": "['Improve a lot', "}, "options"),
])
def test_bad_globalopinionqa_rows(tmp_path, change, field):
    with pytest.raises(DataError) as err:
        load_examples(str(_write(tmp_path, [{**OPINION_QA[0], **change}])), "belief")
    assert err.value.field == field and err.value.line == 1, str(err.value)


# ------------------------------------------------------------------------------------------------ encoding


def test_belief_row_encoding_matches_generation_and_whole_turn_tokenization(tmp_path):
    from alignkit.data.tokenize import _chat_split, _ids, prompt_ids
    from alignkit.models.loading import tiny_tokenizer

    tok = tiny_tokenizer()
    ex = load_examples(str(_write(tmp_path, [GOOD])), "belief").examples[0]
    row = encode_belief_pair(ex, tok, 0, DEFAULT_TEMPLATE, n_beliefs=3)
    # the prompt is what generation starts from; the chosen turn is belief ids + the rest, scored after the belief
    assert row.prompt == prompt_ids(tok, [{"role": "user", "content": ex.prompt}])
    head = _ids(tok, render_belief(DEFAULT_TEMPLATE, "tea"))
    assert row.responses[0][: len(head)] == head and row.responses[1][: len(head)] == head
    assert row.response_masks[0] == [False] * len(head) + [True] * (len(row.responses[0]) - len(head))
    # ... and equals the whole assistant turn tokenized at once
    _, whole = _chat_split(tok, [{"role": "user", "content": ex.prompt}], "Belief: tea\nTea, always.")
    assert row.responses[0] == _ids(tok, whole)
    # the beliefs follow, scored whole, padded to n_beliefs with the first
    assert row.responses[2:] == [head, _ids(tok, "Belief: coffee\n"), head] and all(all(m) for m in row.response_masks[2:])
    assert row.extra == {"n_beliefs": 2, "belief": 0, "target": [0.6, 0.4, 0.0]}


def test_smollm2_tokenizes_the_belief_turn_the_same_whole_or_in_pieces():
    """The default model's BPE splits at the template's newline, so training (pieces) equals generation (whole)."""
    from alignkit.data.tokenize import _ids
    from alignkit.models.loading import load_tokenizer

    try:
        tok = load_tokenizer("smollm2-135m-instruct")
    except Exception as err:  # the converted default model is not on every machine
        pytest.skip(f"default model not available: {err}")
    for belief, rest in (("support", "I support it."), ("one star", " Not good at all."), ("agree", "\nYes.")):
        head = render_belief(DEFAULT_TEMPLATE, belief)
        assert _ids(tok, head) + _ids(tok, rest) == _ids(tok, head + rest)


def test_parse_belief():
    assert parse_belief("Belief: tea\nTea.", DEFAULT_TEMPLATE, ["tea", "coffee"]) == ("tea", "Tea.")
    assert parse_belief("Belief: teapot\nx", DEFAULT_TEMPLATE, ["tea"]) == (None, "Belief: teapot\nx")
    assert parse_belief("I like tea", DEFAULT_TEMPLATE, ["tea"]) == (None, "I like tea")


# ------------------------------------------------------------------------------------------------ the CLI


def belief_rows(n: int = 24) -> list[dict]:
    """Prompts "pick a|b" (and a|b|c): a share of the group picks each letter; the chosen answer repeats it."""
    rows = []
    for i in range(n):
        letters = "ab" if i % 2 else "abc"
        shares = {"ab": [0.7, 0.3], "abc": [0.5, 0.3, 0.2]}[letters]
        rows.append({"prompt": f"pick {'|'.join(letters)} #{i}", "beliefs": dict(zip(letters, shares)),
                     "pairs": [{"belief": b, "chosen": b * 3, "rejected": c * 3} for b in letters for c in letters if b != c]})
    return rows


def test_gdpo_cli_on_the_tiny_model_learns_the_beliefs_and_the_preferences(tmp_path):
    data = _write(tmp_path, belief_rows())
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "alignkit.cli", "gdpo", "model=tiny", f"data={data}", f"output_dir={out}",
           "max_steps=60", "lr=1e-2", "batch_size=8", "eval_fraction=0.25", "progress=false",
           "belief_nll_weight=0.05"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[0], metrics[-1]
    # held-out prompts: the beliefs' shares come from the prompt's form, so they are calibrated there too
    assert last["eval/calibration"] < 0.1 * first["calibration"], (first["calibration"], last["eval/calibration"])
    # and the answer follows the belief (the chosen repeats it, the rejected another one)
    assert last["eval/rewards/accuracy"] > 0.8, last
    saved = json.loads((out / "final" / "alignkit.json").read_text())
    assert saved["method"] == "gdpo:dpo"
    # a bad row stops the run before any model loads, naming the file, line and field
    bad = _write(tmp_path, [GOOD, {**GOOD, "beliefs": {"tea": 0.9, "coffee": 0.4}}], "bad.jsonl")
    run = subprocess.run([*cmd[:5], f"data={bad}", f"output_dir={tmp_path / 'bad'}"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and f"{bad}:2" in run.stderr and "beliefs" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------- the DPO recipe's options


def _task_and_rows(tmp_path, share_prompt: bool, reference: str = "cached"):
    import _toy
    from alignkit.config import GDPOConfig, build
    from alignkit.models.loading import tiny_model, tiny_tokenizer
    from alignkit.recipes.dpo import Reference
    from alignkit.recipes.gdpo import GDPOTask

    cfg = build(GDPOConfig, overrides=dict(model="tiny", data="x", share_prompt=share_prompt, reference=reference, beta=0.5))
    tok, model = tiny_tokenizer(), tiny_model(seed=3)
    examples = load_examples(str(_toy.belief_jsonl(tmp_path, n=6)), "belief").examples
    rows = [encode_belief_pair(e, tok, i, DEFAULT_TEMPLATE, 3) for i, e in enumerate(examples)]
    ref = Reference(model, cfg.reference, tok.pad_token_id, cfg.logits_chunk, 4, "fp32", share_prompt)
    ref.fill(model, rows, progress=False)
    return GDPOTask(cfg, tok.pad_token_id, ref), model, rows


def test_shared_prompt_and_live_reference_give_the_same_loss_as_separate_sequences(tmp_path):
    """One sequence per row (prompt once, every response masked apart) equals one padded sequence per response;
    a live reference equals the cached one. The beliefs' log-probs come out of the same pass."""
    results = []
    for share, reference in ((True, "cached"), (False, "cached"), (True, "live")):
        task, model, rows = _task_and_rows(tmp_path, share, reference)
        with torch.no_grad():
            out, lp, n = task.output(model, rows)
        results.append((out.losses, lp, n, out.metrics["calibration"]))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, atol=1e-5), (a, b)
    losses, lp, n, calibration = results[0]
    assert lp.shape == (6, 5) and (calibration > 0).all()
    # the pair's responses are scored after the belief only: counts exclude the belief's tokens
    _, _, rows = _task_and_rows(tmp_path, True)
    belief_len = [len(r.responses[2 + r.extra["belief"]]) for r in rows]
    assert n[:, 0].tolist() == [len(r.responses[0]) - b for r, b in zip(rows, belief_len)]


def test_lora_bf16_resume_through_the_cli(tmp_path):
    """LoRA with bf16 autocast and a cached reference: a run whose last checkpoint and final model are lost resumes
    from the step-2 checkpoint (with the initial model's saved reference log-probs) to the same adapter."""
    import os
    import shutil

    import _toy
    from safetensors.torch import load_file

    data = _toy.belief_jsonl(tmp_path, n=16)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "alignkit.cli", "gdpo", "model=tiny", f"data={data}", "batch_size=4", "lr=1e-3",
           "lora=true", "lora_r=4", "save_merged=false", "precision=bf16", "progress=false", "max_steps=4",
           "save_steps=2", f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    for lost in (out / "final", *sorted((out / "checkpoints").glob("step-*"))[1:]):
        shutil.rmtree(lost)
    again = subprocess.run([*cmd, "resume=true"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reference log-probs loaded" in again.stderr
    resumed = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert adapter.keys() == resumed.keys() and all(torch.equal(adapter[k], resumed[k]) for k in adapter)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
