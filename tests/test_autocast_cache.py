"""Under gradient checkpointing bf16 autocast runs without its weight cache (alignkit/train/strategy.py,
``Layout.keep_casts``): the cache would keep a bf16 copy of every weight until the forward ends, which the
checkpointed backward never uses (it recasts). Without checkpointing the cache stays on (the casts are saved for
the backward anyway, and a weight used twice is cast once)."""

from __future__ import annotations

import pytest
import torch

import _toy
from alignkit.config import SFTConfig, build
from alignkit.recipes import sft as sft_recipe


@pytest.mark.parametrize("checkpointing", [False, True])
def test_autocast_cache_follows_checkpointing(tmp_path, monkeypatch, checkpointing):
    seen: list[tuple[bool, bool]] = []
    real = sft_recipe.train

    def spying(task, model, *args, **kwargs):
        layer = model.get_decoder().layers[0]
        layer.register_forward_pre_hook(
            lambda *_: seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled())))
        return real(task, model, *args, **kwargs)

    monkeypatch.setattr(sft_recipe, "train", spying)
    data = _toy.sft_jsonl(tmp_path, n=8)
    sft_recipe.run(build(SFTConfig, overrides=dict(model="tiny", data=str(data), output_dir=str(tmp_path / "out"),
                                                   max_steps=1, batch_size=8, precision="bf16", progress=False,
                                                   gradient_checkpointing=checkpointing)))
    assert seen and all(enabled for enabled, _ in seen)  # the layer ran under autocast (and its recompute too)
    assert {cache for _, cache in seen} == {not checkpointing}
