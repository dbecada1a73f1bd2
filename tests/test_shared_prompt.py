"""Shared-prompt batching scores every response exactly as a separate prompt + response sequence would."""

import pytest
import torch

from alignkit.data.collate import collate, collate_shared
from alignkit.data.tokenize import Encoded
from alignkit.models.loading import tiny_model
from alignkit.models.logprobs import sequence_logps, shared_prompt_logps


def _rows():
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(4, 260, (n,), generator=g).tolist()  # noqa: E731
    # different prompt and response lengths, so padding and position restarts both matter
    return [Encoded(rand(7), [rand(3), rand(5)], 0), Encoded(rand(2), [rand(6), rand(1)], 1), Encoded(rand(11), [rand(2), rand(2)], 2)]


@pytest.mark.parametrize("chunk", [1, 4, 1024])
@pytest.mark.parametrize("empty_prompt", [False, True])
def test_shared_equals_separate_values_and_gradients(chunk, empty_prompt):
    model = tiny_model(seed=3)
    rows = _rows()
    if empty_prompt:  # nothing predicts the first response token: neither layout scores it
        rows[1] = Encoded([], rows[1].responses, 1)
    lp_sep, n_sep = sequence_logps(model, collate(rows, (0, 1), 0), chunk=chunk)
    # separate layout is [chosen of every row, rejected of every row]; shared is row-major
    lp_sep, n_sep = lp_sep.view(2, 3).T.reshape(-1), n_sep.view(2, 3).T.reshape(-1)
    if empty_prompt:
        assert n_sep[2:4].tolist() == [5, 0]  # rows[1]'s responses have 6 and 1 tokens
    grads_sep = torch.autograd.grad(lp_sep.sum(), list(model.parameters()))
    lp_sh, n_sh = shared_prompt_logps(model, collate_shared(rows, 0), chunk=chunk)
    grads_sh = torch.autograd.grad(lp_sh.sum(), list(model.parameters()))
    assert torch.equal(n_sh, n_sep)
    assert torch.allclose(lp_sh, lp_sep, atol=1e-5)
    for a, b in zip(grads_sh, grads_sep):
        assert torch.allclose(a, b, atol=1e-5)


def test_rejected_cannot_see_chosen():
    """Changing the chosen tokens leaves the rejected response's log-prob unchanged."""
    model = tiny_model(seed=3)
    a = Encoded([5, 6, 7], [[10, 11, 12], [20, 21]], 0)
    b = Encoded([5, 6, 7], [[90, 91, 92, 93], [20, 21]], 0)
    with torch.no_grad():
        lp_a, _ = shared_prompt_logps(model, collate_shared([a], 0))
        lp_b, _ = shared_prompt_logps(model, collate_shared([b], 0))
    assert lp_a[1] == pytest.approx(lp_b[1].item(), abs=1e-6)
    assert abs(lp_a[0].item() - lp_b[0].item()) > 1e-3


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(lora):
    """Recomputing the layers in the backward pass changes memory, not values (shared-prompt path, 4-D mask)."""
    from alignkit.models.loading import LoraSettings, load_model

    settings = LoraSettings(4, 8, 0.0, "all-linear") if lora else None
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the LoRA A matrices are drawn from the global generator
        model, _ = load_model("tiny", seed=3, lora=settings, gradient_checkpointing=checkpointing)
        model.train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            lp, _ = shared_prompt_logps(model, collate_shared(_rows(), 0), chunk=4)
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((lp.detach(), torch.autograd.grad(lp.sum(), params), sum(saved)))
    (lp_a, grads_a, saved_a), (lp_b, grads_b, saved_b) = results
    assert saved_b < saved_a / 2  # it is on: most activations are not kept
    assert torch.allclose(lp_a, lp_b, atol=1e-6)
    assert len(grads_a) == len(grads_b) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))
