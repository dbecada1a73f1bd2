"""Padding-free (packed) micro-batches score every token exactly as the padded batch does."""

import pytest
import torch

from alignkit.data.collate import collate, collate_packed
from alignkit.data.tokenize import Encoded
from alignkit.models.loading import LoraSettings, load_model, tiny_model
from alignkit.models.logprobs import token_logps
from alignkit.models.packing import NAME, enable_packing, supports_packing


def _rows():
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(4, 260, (n,), generator=g).tolist()  # noqa: E731
    # different lengths (so padding matters), a row with no prompt (its first token is never scored) and a
    # response mask with a hole
    return [Encoded(rand(7), [rand(3)], 0), Encoded([], [rand(6)], 1), Encoded(rand(11), [rand(9)], 2, [[True] * 4 + [False] * 2 + [True] * 3]),
            Encoded(rand(1), [rand(1)], 3)]


def _both(model, rows):
    padded = collate(rows, (0,), 0)
    lp_pad = token_logps(model, padded["input_ids"], padded["attention_mask"], padded["loss_mask"], chunk=5)
    packed = collate_packed(rows, 0)
    lp_pack = token_logps(model, packed["input_ids"], packed["attention_mask"], packed["loss_mask"], chunk=5,
                          position_ids_BT=packed["position_ids"], packed_layout=packed["packed_layout"])
    # the same tokens in the same order: the scored positions, row by row
    return lp_pad[padded["loss_mask"]], lp_pack[packed["loss_mask"]]


def test_layout():
    rows = [Encoded([1, 2], [[3, 4, 5]], 0), Encoded([], [[6, 7]], 1)]
    b = collate_packed(rows, 0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert b["loss_mask"].tolist() == [[False, False, True, True, True, False, True]]
    gather, take = b["packed_layout"]
    assert gather.tolist() == [[0, 1, 2, 3, 4], [5, 6, 0, 0, 0]]
    assert take.tolist() == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("lora", [False, True])
def test_packed_equals_padded_values_and_gradients(lora):
    torch.manual_seed(0)
    model, _ = load_model("tiny", seed=4, lora=LoraSettings(4, 8, 0.0, "all-linear") if lora else None)
    with torch.no_grad():  # non-zero LoRA B, so the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    enable_packing(model.get_base_model() if lora else model)
    params = [p for p in model.parameters() if p.requires_grad]
    pad, pack = _both(model, _rows())
    assert pad.shape == pack.shape and pad.numel() == 3 + 5 + 7 + 1
    assert torch.allclose(pack, pad, atol=1e-5)
    g_pad = torch.autograd.grad(pad.sum(), params, retain_graph=True)
    g_pack = torch.autograd.grad(pack.sum(), params)
    for a, b in zip(g_pack, g_pad):
        assert torch.allclose(a, b, atol=1e-5)


def test_sequences_cannot_see_each_other():
    """Changing the first sequence leaves the second one's log-probs unchanged; without the layout they change."""
    model = tiny_model(seed=3)
    enable_packing(model)
    a = [Encoded([5, 6], [[10, 11, 12]], 0), Encoded([7, 8], [[20, 21]], 1)]
    b = [Encoded([9, 9, 9], [[30, 31]], 0), Encoded([7, 8], [[20, 21]], 1)]
    with torch.no_grad():
        out = []
        for rows in (a, b):
            p = collate_packed(rows, 0)
            lp = token_logps(model, p["input_ids"], p["attention_mask"], p["loss_mask"], position_ids_BT=p["position_ids"],
                             packed_layout=p["packed_layout"])
            leaky = token_logps(model, p["input_ids"], p["attention_mask"], p["loss_mask"], position_ids_BT=p["position_ids"])
            out.append((lp[0, -2:], leaky[0, -2:]))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-6)
    assert not torch.allclose(out[0][1], out[1][1], atol=1e-3)  # plain causal attention over the row would leak


def test_checkpointed_layers_keep_the_layout():
    """The layout reaches the layers recomputed in the backward pass: the gradients equal the padded ones."""
    model, _ = load_model("tiny", seed=4, gradient_checkpointing=True)
    model.train()
    enable_packing(model)
    pad, pack = _both(model, _rows())
    params = list(model.parameters())
    g_pad = torch.autograd.grad(pad.sum(), params)
    g_pack = torch.autograd.grad(pack.sum(), params)
    for a, b in zip(g_pack, g_pad):
        assert torch.allclose(a, b, atol=1e-5)


def test_unpacked_batches_are_unchanged_and_config_saves_cleanly(tmp_path):
    model = tiny_model(seed=3)
    padded = collate(_rows(), (0,), 0)
    args = (padded["input_ids"], padded["attention_mask"], padded["loss_mask"])
    with torch.no_grad():
        before = token_logps(model, *args)
        enable_packing(model)
        after = token_logps(model, *args)
    assert model.config._attn_implementation == NAME
    assert torch.equal(before, after)
    model.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()


def test_supports_packing_names_the_reason():
    model = tiny_model(seed=3)
    assert supports_packing(model) is None
    model.config.sliding_window = 4
    assert "sliding_window" in supports_packing(model)


def test_sft_weight_counts_the_scored_tokens():
    """The step's normaliser (SFT's row weights) counts exactly the tokens both layouts score: a row without a
    prompt has its first token unscored, since nothing predicts it."""
    from alignkit.recipes.sft import SFTTask

    rows = _rows()
    weights = sum(SFTTask(0, 1024).weight(r) for r in rows)
    assert weights == 3 + 5 + 7 + 1  # row 2 (no prompt) scores 5 of its 6 tokens; row 3 has a hole of 2
    assert collate_packed(rows, 0)["loss_mask"].sum() == weights
    assert collate(rows, (0,), 0)["loss_mask"].sum() == weights
