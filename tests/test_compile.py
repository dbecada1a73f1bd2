"""``compile=true``: the decoder layers run compiled (regional ``torch.compile``) and train to the same losses."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.cli import main
from alignkit.models.loading import compile_layers, load_model


def test_compile_layers_compiles_every_decoder_layer_and_keeps_the_outputs():
    model, _ = load_model("tiny", seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    assert compile_layers(model) == len(model.model.layers)
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, eager, atol=1e-5, rtol=1e-5)


def test_sft_with_compile_matches_eager(tmp_path):
    rows = [{"prompt": f"question {i} " * (1 + i % 3), "completion": f"answer {i % 5} " * (1 + i % 2)} for i in range(8)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        assert main(["sft", "model=tiny", f"data={data}", f"output_dir={out}", "batch_size=4", "max_steps=3",
                     "lr=1e-3", "progress=false", "save_merged=false", f"compile={flag}"]) == 0
        losses[flag] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)
