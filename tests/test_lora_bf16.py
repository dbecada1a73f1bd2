"""LoRA under bf16 autocast keeps adapter terms that peft's own forward rounds away (alignkit/models/lora.py)."""

import torch
from peft.tuners.lora.layer import Linear as PeftLinear

from alignkit.models.loading import LoraSettings, load_model
from alignkit.models.lora import ExactSumLinear


def _layer():
    torch.manual_seed(0)
    model, _ = load_model("tiny", seed=1, lora=LoraSettings(4, 8, 0.0, "all-linear"))
    layers = [m for m in model.modules() if isinstance(m, ExactSumLinear)]
    assert layers and not any(type(m) is PeftLinear for m in model.modules())  # every LoRA Linear converted
    layer = layers[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1e-6)  # an early, small update: far below bf16's spacing of the output
    return model, layer


def _peft(layer, x):
    return PeftLinear.forward(layer, x)


def test_float32_is_peft_bit_for_bit():
    _, layer = _layer()
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    ours, theirs = layer(x), _peft(layer, x)
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    for a, b in zip(torch.autograd.grad(ours.sum(), params), torch.autograd.grad(theirs.sum(), params)):
        assert torch.equal(a, b)


def test_bf16_autocast_keeps_the_adapter_term():
    _, layer = _layer()
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        exact = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]  # fp32 adapter term
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base = layer.base_layer(x)
            theirs, ours = _peft(layer, x), layer(x)
    assert base.dtype == torch.bfloat16 and ours.dtype == torch.float32
    # peft's bf16 sum rounds the term back to the base output almost everywhere ...
    assert (theirs.float() == base.float()).float().mean() > 0.9
    # ... the float32 sum keeps it (to bf16's precision of the term itself)
    assert torch.allclose(ours - base.float(), exact, rtol=2e-2, atol=1e-7)


def test_disabled_adapter_and_bf16_weights():
    model, layer = _layer()
    x = torch.randn(2, layer.in_features)
    with torch.no_grad(), model.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), layer.base_layer(x).float())  # the same values, float32 like the policy path
    layer.to(torch.bfloat16)  # bf16 weights without autocast: the output keeps the layer's dtype
    with torch.no_grad():
        assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_whole_model_float32_is_peft_bit_for_bit():
    """Through the whole model in float32, log-probs and LoRA gradients equal those of peft's own layers."""
    from alignkit.models.logprobs import token_logps

    model, _ = _layer()
    ids = torch.randint(4, 200, (2, 9))
    args = (ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    layers = [m for m in model.modules() if isinstance(m, ExactSumLinear)]
    results = []
    for cls in (ExactSumLinear, PeftLinear):
        for m in layers:
            m.__class__ = cls
        lp = token_logps(model, *args)
        results.append((lp, torch.autograd.grad(lp[:, 1:].sum(), lora)))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_bf16_policy_equals_reference_at_b_zero():
    """With B = 0 the adapters add nothing, so under bf16 autocast the policy's log-probs equal the adapters-off
    (reference) ones exactly, as they do in float32: DPO's first loss is exactly ln 2."""
    from alignkit.models.logprobs import autocast, token_logps

    torch.manual_seed(0)
    model, _ = load_model("tiny", seed=1, lora=LoraSettings(4, 8, 0.0, "all-linear"))
    ids = torch.randint(4, 200, (2, 9))
    args = (ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
    with torch.no_grad(), autocast("bf16"):
        policy = token_logps(model, *args)
        with model.disable_adapter():
            reference = token_logps(model, *args)
    assert torch.equal(policy, reference)
