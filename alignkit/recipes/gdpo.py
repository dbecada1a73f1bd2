"""``alignkit gdpo``: group distributional preference optimisation (Yao et al., arXiv:2412.20299).

Data: the ``belief`` kind (:mod:`alignkit.data.formats`): a prompt, its beliefs with the group's shares, and pairs
conditioned on a belief. Each pair is one row (:func:`alignkit.data.beliefs.encode_belief_pair`) whose responses
are the chosen and rejected answers after the pair's belief (scored after it) and every belief of the prompt (scored
whole), so one forward pass (one shared prompt) gives the preference log-probs and the belief distribution.
The loss is the registry's ``gdpo`` composition around ``loss`` (DPO by default). Everything else is the DPO
recipe: LoRA, precision, cached or live reference, shared prompt, resume, FSDP2 and torchrun.
"""

from __future__ import annotations

import torch

from alignkit.config import GDPOConfig
from alignkit.data.beliefs import FIRST_RESPONSE, encode_belief_pair
from alignkit.losses.preference import BeliefLogps, PairLogps, get_loss
from alignkit.recipes import dpo


def belief_tensors(rows, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mask [B, K], target [B, K], index [B])`` of encoded belief rows."""
    k = len(rows[0].responses) - FIRST_RESPONSE
    mask = torch.tensor([[j < r.extra["n_beliefs"] for j in range(k)] for r in rows], device=device)
    target = torch.tensor([r.extra["target"] for r in rows], dtype=torch.float32, device=device)
    index = torch.tensor([r.extra["belief"] for r in rows], device=device)
    return mask, target, index


class GDPOTask(dpo.PreferenceTask):
    """The preference task with the belief terms: ``gdpo`` wraps the configured pairwise loss."""

    def __init__(self, cfg: GDPOConfig, pad_id, reference, soft: bool = False):
        super().__init__(cfg, pad_id, reference, soft)
        self.spec, self.inner = get_loss("gdpo"), self.spec
        self.hparams = {k: getattr(cfg, k) for k in self.spec.hparams}

    def output(self, model, rows):
        every = tuple(range(len(rows[0].responses)))
        lp, n = dpo.response_logps(model, rows, every, self.pad_id, self.chunk, self.shared)
        ref = self.reference.logps(model, rows) if self.inner.needs_reference else None
        pair = PairLogps(lp[:, 0], lp[:, 1], n[:, 0], n[:, 1],
                         ref[:, 0] if ref is not None else None, ref[:, 1] if ref is not None else None)
        beliefs = BeliefLogps(lp[:, FIRST_RESPONSE:], *belief_tensors(rows, lp.device))
        return self.spec.fn(pair, beliefs=beliefs, **self.hparams), lp, n


def run(cfg: GDPOConfig) -> dict:
    most = []  # the most beliefs of any prompt (training and held out): every row is padded to it

    def encoder(example, tok, index):
        return encode_belief_pair(example, tok, index, cfg.belief_template, most[0])

    return dpo.run(cfg, kind="belief", check=lambda examples: most.append(max(len(e.beliefs) for e in examples)),
                   encoder=encoder, task_cls=GDPOTask, method=f"gdpo:{cfg.loss}", reference_responses=(0, 1))
