"""RPO (Pang et al. 2404.19733, TRL's ``rpo_alpha``): a paired preference loss plus alpha times the chosen response's
mean token NLL. Checked against the terms computed here from the model's own log-probs, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from alignkit.config import DPOConfig
from alignkit.data.formats import Origin, PreferenceExample
from alignkit.data.tokenize import encode
from alignkit.errors import ConfigError
from alignkit.models.loading import load_model
from alignkit.recipes.dpo import PreferenceTask, Reference, response_logps


def _rows(tok):
    pairs = [("2+2=", " 4", " 5 and some more words"), ("capital of France:", " Paris", " Rome"),
             ("1, 2, 3,", " 4, 5", " 7")]
    origin = Origin("toy", 1, 0)
    return [encode(PreferenceExample(p, c, r, None, 0, origin), tok, i) for i, (p, c, r) in enumerate(pairs)]


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_rpo_adds_alpha_times_the_chosen_mean_token_nll(loss):
    torch.manual_seed(0)
    model, tok = load_model("tiny", seed=0)
    rows = _rows(tok)
    cfg = DPOConfig(model="tiny", data="x.jsonl", loss=loss, beta=0.2)
    ref = Reference(model, "cached", tok.pad_token_id, cfg.logits_chunk, 8, "fp32", False)
    ref.fill(model, rows)
    with torch.no_grad():
        plain, plain_m = PreferenceTask(cfg, tok.pad_token_id, ref).loss(model, rows, 4.0)
        cfg.rpo_alpha = 0.7
        rpo, rpo_m = PreferenceTask(cfg, tok.pad_token_id, ref).loss(model, rows, 4.0)
        lp, n = response_logps(model, rows, (0, 1), tok.pad_token_id, cfg.logits_chunk)
    nll = -(lp[:, 0] / n[:, 0])  # mean token NLL of each chosen response
    assert n[0, 0] != n[0, 1]  # lengths differ: a mean over the rejected or the pair's tokens would not match
    assert rpo.item() == pytest.approx(plain.item() + 0.7 * nll.sum().item() / 4.0, rel=1e-6, abs=1e-7)
    assert rpo_m["nll/chosen"][0] == pytest.approx(nll.sum().item(), rel=1e-6)
    assert rpo_m["loss"] == plain_m["loss"]  # the preference loss is reported on its own
    assert "nll/chosen" not in plain_m


def test_rpo_gradient_raises_the_chosen_likelihood():
    """The NLL term alone (a tiny beta leaves DPO's gradient negligible) makes a step raise log p(chosen)."""
    torch.manual_seed(0)
    model, tok = load_model("tiny", seed=0)
    rows = _rows(tok)
    cfg = DPOConfig(model="tiny", data="x.jsonl", beta=1e-6, rpo_alpha=1.0)
    ref = Reference(model, "cached", tok.pad_token_id, cfg.logits_chunk, 8, "fp32", False)
    ref.fill(model, rows)
    with torch.no_grad():
        before, _ = response_logps(model, rows, (0,), tok.pad_token_id, cfg.logits_chunk)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss, _ = PreferenceTask(cfg, tok.pad_token_id, ref).loss(model, rows, 3.0)
    loss.backward()
    opt.step()
    with torch.no_grad():
        after, _ = response_logps(model, rows, (0,), tok.pad_token_id, cfg.logits_chunk)
    assert (after[:, 0] > before[:, 0]).all(), (before, after)


@pytest.mark.parametrize("changes, needle", [({"rpo_alpha": -0.1}, "rpo_alpha"), ({"rpo_alpha": float("nan")}, "rpo_alpha"),
                                             ({"rpo_alpha": 1.0, "loss": "kto"}, "kto")])
def test_rpo_alpha_is_checked(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        DPOConfig(model="tiny", data="x.jsonl", **changes).validate()
