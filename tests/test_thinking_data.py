"""Reasoning data: the thinking field, its converters and validation, how templates render it for training,
the prefix property, and the loss on thinking tokens (``alignkit.data.thinking``, ``formats``, ``tokenize``,
``recipes/sft``; docs/reasoning.md, "Thinking in SFT data").

Renderings are checked on the tiny byte-level tokenizer (one token per character, so positions are written out
by hand) with its ChatML template (no thinking form: the ``<think>`` convention), with a template of Qwen3's form
(it reads ``reasoning_content`` and ``enable_thinking``) and with one that drops the reasoning like
DeepSeek-R1-Distill's; token offsets also on the real SmolLM2 tokenizer when it is cached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from alignkit.data.collate import collate, loss_weights
from alignkit.data.formats import SFTExample, load_examples
from alignkit.data.thinking import (EMPTY_THINKING, for_template, join_thinking, mode_of, requested_mode,
                                    split_thinking, template_thinks)
from alignkit.data.tokenize import Encoded, _chat_text, encode, encode_all, prompt_ids
from alignkit.errors import DataError
from alignkit.losses.sft import nll_sum
from alignkit.models.loading import tiny_model, tiny_tokenizer
from alignkit.models.logprobs import token_logps
from alignkit.recipes.sft import SFTTask

# Qwen3's chat template, the parts that matter here (its tool handling left out): reasoning_content or an inline
# block in content; the block rendered only for turns after the last user message (earlier turns' thinking is
# dropped) and always for the last turn (empty for a no-think answer); enable_thinking=false puts the empty
# block in the generation prompt (the hard switch).
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(found=false, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if not ns.found and message.role == 'user' %}"
    "{%- set ns.found = true %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is not none %}"
    "{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in message.content %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# DeepSeek-R1-Distill's habit: an assistant turn keeps only what follows </think> (its thinking is dropped).
DROPPING_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def qwen_tok():
    t = tiny_tokenizer()
    t.chat_template = QWEN3_TEMPLATE
    return t


def user(text):
    return {"role": "user", "content": text}


def assistant(text, reasoning=None):
    m = {"role": "assistant", "content": text}
    return m if reasoning is None else {**m, "reasoning_content": reasoning}


def write_jsonl(tmp_path, rows, name="think.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def load(tmp_path, *rows):
    return load_examples(write_jsonl(tmp_path, rows), "sft").examples


def text_of(tok, ids):
    return tok.decode(ids)


# --------------------------------------------------------------------------------------- the convention


def test_join_and_split_round_trip_and_the_empty_block():
    assert join_thinking("2+2 is 4", "4") == "<think>\n2+2 is 4\n</think>\n\n4"
    assert split_thinking(join_thinking("2+2 is 4", "4")) == ("2+2 is 4", "4")
    assert EMPTY_THINKING == "<think>\n\n</think>\n\n"  # Qwen3's no-think form
    assert join_thinking("", "4") == EMPTY_THINKING + "4" and split_thinking(EMPTY_THINKING + "4") == ("", "4")
    assert split_thinking("<think>\ncut at the limit") == ("cut at the limit", "")  # no close tag
    assert split_thinking("the rest\n</think>\n\n4") == ("the rest", "4")  # an R1 continuation
    assert split_thinking("just 4") == ("", "just 4")


def test_mode_rules():
    assert (mode_of("x"), mode_of(""), mode_of("  \n"), mode_of(None)) == ("think", "no_think", "no_think", None)
    assert requested_mode([user("hi /no_think"), assistant("a"), user("again /think")]) == "think"
    assert requested_mode([user("/think please"), user("no, /no_think")]) == "no_think"
    assert requested_mode([user("path/think is not a flag"), assistant("/no_think")]) is None
    assert requested_mode("plain prompt /no_think") == "no_think"


def test_template_detection(tok, qwen_tok):
    assert not template_thinks(tok) and template_thinks(qwen_tok)
    messages = [user("q"), assistant("a", "r")]
    assert for_template(qwen_tok, messages) is messages  # passed through to a template that reads it
    assert for_template(tok, messages) == [user("q"), assistant("<think>\nr\n</think>\n\na")]


# ------------------------------------------------------------------------------------------ converters


def test_reasoning_field_inline_and_prefill_rows_load_to_one_form(tmp_path):
    field, inline, continuation, prefill, completion = load(
        tmp_path,
        {"messages": [user("2+2?"), assistant("4", "  two and two\n")]},
        {"messages": [user("2+2?"), assistant("<think>\ntwo and two\n</think>\n\n4")]},
        {"messages": [user("2+2?"), assistant("two and two</think>4")]},  # the template's prompt opened it
        {"prompt": "Q: 2+2?\n<think>\n", "completion": "two and two\n</think>\n\n4"},
        {"prompt": "Q: 2+2?", "completion": "<think>two and two</think> 4"},
    )
    for ex in (field, inline, continuation):
        assert ex.messages == [user("2+2?"), assistant("4", "two and two")] and ex.mode == "think"
    assert (prefill.prompt, prefill.completion, prefill.reasoning, prefill.mode) == (
        "Q: 2+2?\n<think>\n", "4", "two and two", "think")  # the prompt is kept: inference sees it so
    assert (completion.prompt, completion.completion, completion.reasoning) == ("Q: 2+2?", "4", "two and two")


def test_modes_are_stated_or_derived(tmp_path):
    stated, empty, mixed, plain, plain_pc = load(
        tmp_path,
        {"messages": [user("q"), assistant("a")], "mode": "no_think"},
        {"messages": [user("q"), assistant("a", "")]},
        {"messages": [user("q"), assistant("a", "r"), user("q2"), assistant("b")]},
        {"messages": [user("q"), assistant("a")]},
        {"prompt": "q", "completion": "a"},
    )
    assert stated.messages[1] == assistant("a", "") and stated.mode == "no_think"
    assert empty.messages[1] == assistant("a", "") and empty.mode == "no_think"
    # a thinking row: every trained turn gets a block, the one without reasoning an empty one
    assert mixed.messages[3] == assistant("b", "") and mixed.mode == "think"
    # data without thinking is read exactly as before
    assert plain.messages == [user("q"), assistant("a")] and plain.mode is None
    assert (plain_pc.completion, plain_pc.reasoning, plain_pc.mode) == ("a", None, None)


BAD = {
    "mode_unknown": ({"messages": [user("q"), assistant("a", "r")], "mode": "fast"}, "mode", "think, no_think"),
    "think_without": ({"messages": [user("q"), assistant("a")], "mode": "think"},
                      "messages[1].reasoning_content", "has no reasoning, but the row's mode is think"),
    "no_think_with": ({"messages": [user("q"), assistant("<think>r</think>a")], "mode": "no_think"},
                      "messages[1].content", "has reasoning, but the row's mode is no_think"),
    "unclosed": ({"messages": [user("q"), assistant("<think>r, a")]}, "messages[1].content", "never closed"),
    "two_blocks": ({"messages": [user("q"), assistant("<think>r</think>a<think>s</think>b")]},
                   "messages[1].content", "more than one thinking block"),
    "text_before": ({"messages": [user("q"), assistant("so <think>r</think>a")]}, "messages[1].content",
                    "text before"),
    "both": ({"messages": [user("q"), assistant("<think>r</think>a", "r")]}, "messages[1].content",
             "give the thinking once"),
    "marker_in_field": ({"messages": [user("q"), assistant("a", "r</think>")]},
                        "messages[1].reasoning_content", "marker"),
    "not_a_string": ({"messages": [user("q"), assistant("a", 3)]}, "messages[1].reasoning_content",
                     "expected a string"),
    "user_reasoning": ({"messages": [{**user("q"), "reasoning_content": "r"}, assistant("a")]},
                       "messages[0].reasoning_content", "only assistant messages"),
    "blank_answer": ({"messages": [user("q"), assistant("<think>r</think>  ")]}, "messages[1].content",
                     "empty answer"),
    "prefill_unclosed": ({"prompt": "Q\n<think>\n", "completion": "r and a"}, "completion", "close it"),
    "close_unopened": ({"prompt": "Q", "completion": "r</think>a"}, "completion", "neither it nor the prompt"),
    "completion_blank": ({"prompt": "Q", "completion": "<think>r</think>"}, "completion", "empty answer"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_thinking_rows_name_file_line_and_field(tmp_path, name):
    row, field, words = BAD[name]
    path = write_jsonl(tmp_path, [{"messages": [user("fine"), assistant("fine", "ok")]}, row])
    with pytest.raises(DataError) as info:
        load_examples(path, "sft")
    err = info.value
    assert (err.path, err.line, err.field) == (path, 2, field), str(err)
    assert words in str(err) and str(err).startswith(f"{path}:2: field '{field}': ")


def test_bad_thinking_row_exits_2_before_any_model_loads(tmp_path, capsys):
    from alignkit.cli import main

    path = write_jsonl(tmp_path, [{"messages": [user("q"), assistant("a", "r")]}, BAD["unclosed"][0]])
    out = tmp_path / "out"
    code = main(["sft", "model=tiny", f"data={path}", "max_steps=1", "progress=false", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}:2: field 'messages[1].content'" in err and "Traceback" not in err, err
    assert not out.exists()  # rejected before anything was written or loaded


# ---------------------------------------------------------------------------------- template round trips


def rendered(tok, example) -> str:
    enc = encode(example, tok, 0)
    return text_of(tok, enc.prompt) + "|" + text_of(tok, enc.responses[0])


def test_convention_keeps_empties_and_leaves_out_exactly_as_specified(tok, tmp_path):
    think, no_think, plain, multi = load(
        tmp_path,
        {"messages": [user("q"), assistant("a", "r")]},
        {"messages": [user("q"), assistant("a")], "mode": "no_think"},
        {"messages": [user("q"), assistant("a")]},
        {"messages": [user("q"), assistant("a", "r"), user("q2"), assistant("b", "s")]},
    )
    turn = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert rendered(tok, think) == f"|{turn}<think>\nr\n</think>\n\na<|im_end|>\n"  # kept
    assert rendered(tok, no_think) == f"|{turn}<think>\n\n</think>\n\na<|im_end|>\n"  # emptied
    assert rendered(tok, plain) == f"|{turn}a<|im_end|>\n"  # no block: rendered as before
    # every trained turn keeps its thinking, the first too (prefix-preserving: one sequence trains both)
    assert rendered(tok, multi) == (f"|{turn}<think>\nr\n</think>\n\na<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n"
                                    "<|im_start|>assistant\n<think>\ns\n</think>\n\nb<|im_end|>\n")
    # and the trained text reads back to the data
    body = rendered(tok, think).split("assistant\n")[1].removesuffix("<|im_end|>\n")
    assert split_thinking(body) == ("r", "a")


def test_plain_text_completions_and_prefills(tok, tmp_path):
    inline, prefill, no_think = load(
        tmp_path,
        {"prompt": "Q?", "completion": "<think>r</think>a"},
        {"prompt": "Q?\n<think>\n", "completion": "r</think>a"},
        {"prompt": "Q?", "completion": "a", "mode": "no_think"},
    )
    assert rendered(tok, inline) == "Q?|<think>\nr\n</think>\n\na<|im_end|>"
    assert rendered(tok, prefill) == "Q?\n<think>\n|r\n</think>\n\na<|im_end|>"  # continues the prompt's block
    assert rendered(tok, no_think) == "Q?|<think>\n\n</think>\n\na<|im_end|>"


def test_a_thinking_template_gets_the_field_and_drops_only_the_prompts_earlier_thinking(qwen_tok, tmp_path):
    think, no_think, with_history = load(
        tmp_path,
        {"messages": [user("q"), assistant("a", "r")]},
        {"messages": [user("q"), assistant("a")], "mode": "no_think"},
        {"prompt": [user("q"), assistant("a", "old thinking"), user("q2")], "completion": [assistant("b", "s")]},
    )
    turn = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert rendered(qwen_tok, think) == f"|{turn}<think>\nr\n</think>\n\na<|im_end|>\n"
    assert rendered(qwen_tok, no_think) == f"|{turn}<think>\n\n</think>\n\na<|im_end|>\n"
    # the prompt's earlier turn is context, not trained: the template drops its thinking, as at inference
    assert rendered(qwen_tok, with_history) == (
        f"{turn}a<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n|"
        "<think>\ns\n</think>\n\nb<|im_end|>\n")


def test_templates_that_lose_trained_thinking_are_refused(qwen_tok, tmp_path):
    [multi] = load(tmp_path, {"messages": [user("q"), assistant("a", "r"), user("q2"), assistant("b", "s")]})
    with pytest.raises(DataError, match="drops the thinking of earlier turns"):
        encode(multi, qwen_tok, 0)  # Qwen3's drops turn 1's thinking once turn 2 is asked: not one sequence
    dropping = tiny_tokenizer()
    dropping.chat_template = DROPPING_TEMPLATE
    [row] = load(tmp_path, {"messages": [user("q"), assistant("a", "r")]})
    assert not template_thinks(dropping)
    with pytest.raises(DataError, match="does not render the thinking of a trained assistant turn") as info:
        encode(row, dropping, 0)
    assert info.value.line == 1


# ------------------------------------------------------------------------------------ the prefix property


def training_ids(tok, example) -> list[int]:
    enc = encode(example, tok, 0)
    return enc.prompt + enc.responses[0]


@pytest.mark.parametrize("which", ["convention", "qwen3"])
def test_inference_prompt_is_a_token_prefix_of_the_training_rendering(tok, qwen_tok, tmp_path, which):
    """For each trained assistant turn k, the prompt as generation renders it (``prompt_ids``: the conversation
    before turn k with the generation prompt) is token for token the start of the training sequence."""
    t = tok if which == "convention" else qwen_tok
    rows = [{"messages": [user("q"), assistant("a", "r")]},
            {"messages": [user("q"), assistant("a")], "mode": "no_think"},
            {"prompt": [user("q"), assistant("a", "old"), user("q2")], "completion": [assistant("b", "s")]}]
    if which == "convention":  # the convention keeps earlier thinking, so a multi-turn row is one sequence
        rows.append({"messages": [user("q"), assistant("a", "r"), user("q2"), assistant("b", "")]})
    checked = 0
    for ex in load(tmp_path, *rows):
        ids = training_ids(t, ex)
        conversation = ex.messages or ex.prompt + ex.completion
        for k, m in enumerate(conversation):
            if m["role"] == "assistant" and (ex.messages is not None or k == len(ex.prompt)):
                inference = prompt_ids(t, conversation[:k])
                assert ids[: len(inference)] == inference, (which, k, text_of(t, ids), text_of(t, inference))
                checked += 1
    assert checked == len(rows) + (which == "convention")
    # the hard switch: Qwen3's generation prompt with enable_thinking=false ends in the empty block, which the
    # training rendering of a no-think answer also starts with
    [no_think] = load(tmp_path, rows[1])
    hard = t(_chat_text(t, [user("q")], True) if which == "convention" else t.apply_chat_template(
        [user("q")], tokenize=False, add_generation_prompt=True, enable_thinking=False), add_special_tokens=False)["input_ids"]
    if which == "convention":
        hard = hard + t(EMPTY_THINKING, add_special_tokens=False)["input_ids"]
    assert training_ids(t, no_think)[: len(hard)] == hard


def test_plain_prefill_prompt_is_a_prefix(tok, tmp_path):
    [ex] = load(tmp_path, {"prompt": "Q?\n<think>\n", "completion": "r</think>a"})
    assert training_ids(tok, ex)[: len(prompt_ids(tok, ex.prompt))] == prompt_ids(tok, ex.prompt)


# -------------------------------------------------------------------------------- loss on thinking tokens


def test_thinking_token_positions_exactly(tok, tmp_path):
    [pc, chat] = load(tmp_path, {"prompt": "Q?", "completion": "<think>ab</think>C"},
                      {"messages": [user("q"), assistant("a", "rr"), user("q2"), assistant("b", "s")]})
    enc = encode(pc, tok, 0)
    # response "<think>\nab\n</think>\n\nC<|im_end|>": "<think>\n" is 8 tokens, then a, b
    assert enc.thinking_masks == [[False] * 8 + [True] * 2 + [False] * 13]
    enc = encode(chat, tok, 0)
    [ids], [flags] = enc.responses, enc.thinking_masks
    assert text_of(tok, [i for i, f in zip(ids, flags) if f]) == "rrs"
    text = text_of(tok, ids)  # one token per character or special token
    starts = [k for k in range(len(ids)) if text_of(tok, ids[:k]).endswith("<think>\n")]
    assert [k for k, f in enumerate(flags) if f] == [starts[0], starts[0] + 1, starts[1]], text
    # no-think blocks and rows without thinking have no thinking tokens
    [none, plain] = load(tmp_path, {"messages": [user("q"), assistant("a", "")]}, {"prompt": "Q?", "completion": "C"})
    assert encode(none, tok, 0).thinking_masks is None and encode(plain, tok, 0).thinking_masks is None


@pytest.mark.skipif(not os.path.exists(os.path.expanduser("~/.cache/alignkit/models/smollm2-135m-instruct/tokenizer.json")),
                    reason="SmolLM2 not cached")
def test_thinking_tokens_on_smollm2_bpe(tmp_path):
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(os.path.expanduser("~/.cache/alignkit/models/smollm2-135m-instruct"))
    [ex] = load(tmp_path, {"messages": [user("What is 12*7?"), assistant("84", "12*7 = 70 + 14 = 84.")]})
    enc = encode(ex, smol, 0)
    [ids], [flags] = enc.responses, enc.thinking_masks
    assert smol.decode([i for i, f in zip(ids, flags) if f]) == "12*7 = 70 + 14 = 84."
    assert ids == smol(smol.apply_chat_template(for_template(smol, ex.messages), tokenize=False),
                       add_special_tokens=False)["input_ids"]


def test_fit_truncates_thinking_masks_with_the_responses(tok, tmp_path):
    [ex] = load(tmp_path, {"prompt": "Q?", "completion": "<think>ab</think>C"})
    [row] = encode_all([ex], tok, max_length=11, max_prompt_length=None, truncation="truncate").rows
    assert row.thinking_masks == [[False] * 8 + [True]]


def test_loss_weights_layout_and_the_weighted_nll():
    rows = [Encoded([1, 2], [[3, 4, 5]], 0, thinking_masks=[[False, True, True]]), Encoded([6], [[7, 8]], 1)]
    assert loss_weights(rows, 0, 0.25).tolist() == [[1, 1, 1, 0.25, 0.25], [1, 1, 1, 0, 0]]
    assert loss_weights(rows, 0, 0.25, packed=True).tolist() == [[1, 1, 1, 0.25, 0.25, 1, 1, 1]]
    task = SFTTask(0, 16, thinking_weight=0.25)
    assert [task.weight(r) for r in rows] == [1.5, 2.0] and SFTTask(0, 16).weight(rows[0]) == 3.0
    # -(1 * -1 + 0.5 * -2 + 2 * -3) over the masked positions: 1 + 1 + 6
    logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    mask, weights = torch.tensor([[True, True, True, False]]), torch.tensor([[1.0, 0.5, 2.0, 7.0]])
    assert nll_sum(logps, mask, weights).item() == 8.0 and nll_sum(logps, mask).item() == 6.0


def _thinking_rows(tok, tmp_path):
    examples = load(tmp_path,
                    {"messages": [user("2+3?"), assistant("5", "two plus three"), user("and 4?"), assistant("9", "")]},
                    {"prompt": "7-2=", "completion": "<think>seven minus two</think>5"},
                    {"prompt": "Q\n<think>\n", "completion": "think more</think>A"},
                    {"prompt": "no thinking here ", "completion": "ok"})
    return encode_all(examples, tok, max_length=512, max_prompt_length=None, truncation="truncate").rows


@pytest.mark.parametrize("packed", [False, True])
def test_sft_loss_weights_the_thinking_tokens(tok, tmp_path, packed):
    """The SFT task's loss at thinking weight w is sum_t w_t nll_t / sum_t w_t over the response tokens (w_t = w on
    thinking tokens, 1 elsewhere), from the model's own token log-probs; w = 0 is the thinking masked out."""
    from alignkit.models.packing import enable_packing

    model = tiny_model(seed=3)
    if packed:
        enable_packing(model)
    rows = _thinking_rows(tok, tmp_path)
    batch = collate(rows, (0,), 0)
    lp = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).detach()
    thinking = loss_weights(rows, 0, 0.0) == 0
    scored = batch["loss_mask"]
    assert int((scored & thinking).sum()) == len("two plus three") + len("seven minus two") + len("think more")
    for w in (1.0, 0.0, 0.3, 2.0):
        task = SFTTask(0, 64, packed=packed, thinking_weight=w)
        normaliser = sum(task.weight(r) for r in rows)
        loss, metrics = task.loss(model, rows, normaliser)
        nll_think, nll_answer = -lp[scored & thinking].sum(), -lp[scored & ~thinking].sum()
        n_think, n_answer = int((scored & thinking).sum()), int((scored & ~thinking).sum())
        expected = (w * nll_think + nll_answer) / (w * n_think + n_answer)
        assert normaliser == pytest.approx(w * n_think + n_answer)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5), w
        assert metrics["loss"][1] == pytest.approx(w * n_think + n_answer)
    # off: the thinking tokens have no gradient, the answer's do
    task = SFTTask(0, 64, packed=packed, thinking_weight=0.0)
    loss, _ = task.loss(model, rows, 1.0)
    masked = [Encoded(r.prompt, r.responses, r.index,
                      [[m and not t for m, t in zip(r.response_masks[0] if r.response_masks else [True] * len(r.responses[0]),
                                                    r.thinking_masks[0] if r.thinking_masks else [False] * len(r.responses[0]))]])
              for r in rows]
    assert loss.item() == pytest.approx(SFTTask(0, 64, packed=packed).loss(model, masked, 1.0)[0].item(), rel=1e-6)


# -------------------------------------------------------------------------------------- through the CLI


def test_sft_cli_on_thinking_data_weights_the_thinking_loss(tok, tmp_path):
    """``alignkit sft thinking_loss=0.5`` on a small thinking set (every row shape): the first step (all rows,
    once) logs the weighted loss of the untrained tiny model, computed here; the run finishes and saves."""
    rows = [{"messages": [user(f"{a}+{b}?"), assistant(str(a + b), f"{a} plus {b} is {a + b}")]} for a, b in ((2, 3), (4, 1))]
    rows += [{"messages": [user("hi"), assistant("hello")], "mode": "no_think"},
             {"prompt": "7-2=", "completion": "<think>seven minus two</think>5"},
             {"prompt": "Q: 9-1?\n<think>\n", "completion": "nine minus one\n</think>\n\n8"}]
    data = write_jsonl(tmp_path, rows)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "alignkit.cli", "sft", "model=tiny", f"data={data}", f"output_dir={out}",
           "max_steps=2", "lr=1e-3", f"batch_size={len(rows)}", "progress=false", "thinking_loss=0.5"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    assert run.returncode == 0, run.stderr[-3000:]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    encoded = encode_all(load_examples(data, "sft").examples, tok, max_length=1024, max_prompt_length=None,
                         truncation="truncate").rows
    task = SFTTask(tok.pad_token_id, 1024, thinking_weight=0.5)
    expected, _ = task.loss(tiny_model(seed=0), encoded, sum(task.weight(r) for r in encoded))
    plain, _ = SFTTask(tok.pad_token_id, 1024).loss(tiny_model(seed=0), encoded, sum(map(SFTTask(0, 1).weight, encoded)))
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-4) and abs(expected.item() - plain.item()) > 1e-3
    assert (out / "final" / "alignkit.json").exists()
    assert "thinking_loss: '0.5'" in (out / "config.yaml").read_text()
