"""``alignkit.train.loop.clip_and_step``: the same update as ``clip_grad_norm_`` followed by ``optimizer.step()``,
for torch's fused AdamW (the coefficient passed to the kernel) and for the plain one."""

from __future__ import annotations

import pytest
import torch

from alignkit.train.loop import clip_and_step


def _setup(fused: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7, 5), (5,), (3, 4, 2))]
    # eps = 1 makes Adam's first step depend on the gradients' scale (with a tiny eps it is nearly sign(g))
    opt = torch.optim.AdamW(params, lr=0.1, eps=1.0, weight_decay=0.01, fused=fused or None, foreach=False if not fused else None)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3.0  # global norm about 17
    return params, opt


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [1.0, 100.0, 0.0])
def test_clip_and_step_is_clip_grad_norm_then_step(fused, max_norm):
    ref_params, ref_opt = _setup(fused)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm if max_norm > 0 else float("inf"))
    ref_opt.step()
    params, opt = _setup(fused)
    norm = clip_and_step(opt, params, max_norm)
    assert torch.equal(norm, ref_norm)
    assert opt.grad_scale is None
    clipped = max_norm == 1.0
    for p, q in zip(params, ref_params):
        m, m_ref = opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"]
        if clipped and fused:  # divided by 1 / coefficient instead of multiplied by it: an ulp at most
            torch.testing.assert_close(m, m_ref, rtol=3e-7, atol=0)
            torch.testing.assert_close(p, q, rtol=3e-7, atol=1e-8)
        else:  # unclipped steps, and clipping without the fused kernel, are torch's arithmetic exactly
            assert torch.equal(m, m_ref) and torch.equal(p, q)
    if clipped:  # and clipping happened: the first moment is (1 - beta1) x the clipped gradient
        total = torch.sqrt(sum((opt.state[p]["exp_avg"] / 0.1).square().sum() for p in params))
        assert total == pytest.approx(1.0, rel=1e-5)


# ------------------------------------------------------------------------------------- one step of the loop


class _AllRows:
    """A StepSource that gives every row at every step and keeps the weights each step starts from."""

    def __init__(self, rows, n_steps: int):
        self.all_rows, self.n_steps, self.starts = rows, n_steps, []

    def rows(self, step, model):
        self.starts.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return list(self.all_rows)

    def metrics(self):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _mean_response_nll(model, rows) -> torch.Tensor:
    """The SFT objective written out naively: each row alone, unpadded, full-vocabulary log-softmax; the NLL of
    every response token, divided by the number of response tokens of all rows."""
    total, count = 0.0, 0
    for r in rows:
        ids = torch.tensor([r.prompt + r.responses[0]])
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        lp = logp.gather(-1, ids[0, 1:, None])[:, 0]
        total = total - lp[len(r.prompt) - 1 :].sum()  # token t is predicted at position t - 1
        count += len(r.responses[0])
    return total / count


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.3])
def test_loop_step_is_the_clipped_gradient_of_the_step_mean_loss(tmp_path, max_grad_norm):
    """Three SFT steps of ``train()`` over 8 rows of different lengths in micro-batches of 3, with AdamW made
    into plain gradient descent (beta1 = 0, eps = 1e6 >> sqrt(v), lr = 1e5: each step moves the weights by
    0.1 x the gradient it is given). Each step must move them by -0.1 x the gradient of the mean response-token
    NLL of the step (one normaliser over all micro-batches), computed naively from the weights the step started
    from, clipped to ``max_grad_norm``; the logged grad_norm is that gradient's norm before clipping. This fails
    when the loop divides by anything but the step's response tokens, scores prompt tokens, does not clip, or
    carries gradients over from the previous step."""
    import _toy
    from alignkit.config import SFTConfig, build
    from alignkit.data.formats import load_examples
    from alignkit.data.tokenize import encode_all
    from alignkit.models.loading import load_model
    from alignkit.recipes.sft import SFTTask
    from alignkit.train.loop import train

    data = _toy.sft_jsonl(tmp_path, n=8)
    model, tok = load_model("tiny", seed=0)
    rows = encode_all(load_examples(str(data), "sft").examples, tok, max_length=1024, max_prompt_length=None,
                      truncation="truncate").rows
    assert len(rows) == 8 and all(r.response_masks is None and r.prompt for r in rows)
    cfg = build(SFTConfig, overrides=dict(model="tiny", data=str(data), output_dir=str(tmp_path / "out"), max_steps=3,
                                          batch_size=3, lr=1e5, adam_eps=1e6, adam_beta1=0.0, scheduler="constant",
                                          max_grad_norm=max_grad_norm, progress=False))
    source = _AllRows(rows, 3)
    history = train(SFTTask(tok.pad_token_id, cfg.logits_chunk), model, source, cfg).history
    ends = [*source.starts[1:], {n: p.detach() for n, p in model.named_parameters()}]
    naive, _ = load_model("tiny", seed=0)
    for step, (start, end) in enumerate(zip(source.starts, ends)):
        naive.load_state_dict(start)
        naive.zero_grad(set_to_none=True)
        _mean_response_nll(naive, rows).backward()
        grads = {n: p.grad for n, p in naive.named_parameters()}
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads.values())).item()
        assert history[step]["grad_norm"] == pytest.approx(norm, rel=1e-4)
        coef = min(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm > 0 else 1.0
        if max_grad_norm > 0:
            assert coef < 0.5  # clipping acts on every step
        scale = max(g.abs().max().item() for g in grads.values()) * 0.1 * coef
        gap = max(((end[n] - start[n]) + 0.1 * coef * grads[n]).abs().max().item() for n in grads)
        assert gap <= 1e-4 * scale, (step, gap, scale)
