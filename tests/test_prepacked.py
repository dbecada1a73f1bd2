"""``alignkit.models.prepacked``: oneDNN-prepacked bf16 linears give ``nn.Linear``'s outputs bit for bit; and the
sampler's inverse-CDF draw (``alignkit.rl.rollout.inverse_cdf``) at its edges and in distribution."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.models.loading import load_model
from alignkit.models.prepacked import PrepackedLinear, prepack_available, prepack_linears
from alignkit.rl.rollout import inverse_cdf

needs_prepack = pytest.mark.skipif(not prepack_available(), reason="this torch build cannot prepack bf16 linears")


@needs_prepack
def test_prepacked_model_gives_the_plain_models_logits_bit_for_bit():
    model, _ = load_model("tiny", seed=0)
    plain = copy.deepcopy(model).to(torch.bfloat16).eval()
    packed = copy.deepcopy(plain)
    layers = prepack_linears(packed)
    n_linear = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert len(layers) == n_linear > 0
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    assert all(torch.equal(layers[name].weight, plain.get_submodule(name).weight) for name in layers)
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).logits, plain(input_ids=ids).logits)
    # the tied input embedding stays a parameter
    assert "model.embed_tokens.weight" in dict(packed.named_parameters())


@needs_prepack
def test_load_replaces_the_weight_and_checks_its_shape():
    layer = PrepackedLinear(6, 4, torch.ones(4))
    w = torch.randn(4, 6)
    layer.load(w)
    x = torch.randn(2, 6, dtype=torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w.to(torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="shape"):
        layer.load(torch.randn(6, 4))


def test_fp32_models_are_left_alone():
    model, _ = load_model("tiny", seed=0)
    assert prepack_linears(model) == {}
    assert any(type(m) is torch.nn.Linear for m in model.modules())


def test_inverse_cdf_edges_never_take_a_zero_weight_token():
    p = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0, 0.0]]).repeat(3, 1)
    u_max = 1.0 - 2.0**-53  # the largest float64 below 1, the largest value torch.rand can give
    u = torch.tensor([0.0, u_max, 0.5], dtype=torch.float64)
    # u = 0 takes the last token of positive weight, u just below 1 the first; u = 0.5 lands in (0.2, 0.7]
    assert inverse_cdf(p, u).tolist() == [4, 1, 3]


def test_inverse_cdf_follows_unnormalised_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(50, generator=g) * (torch.rand(50, generator=g) > 0.4)  # about 40% zeros
    n = 200_000
    u = torch.rand(n, dtype=torch.float64, generator=g)
    tokens = inverse_cdf(w.expand(n, -1) * 3.0, u)  # weights need not sum to one
    counts = torch.bincount(tokens, minlength=50).double()
    assert counts[w == 0].sum() == 0
    p = w.double() / w.sum()
    assert 0.5 * (counts / n - p).abs().sum() < 0.01
