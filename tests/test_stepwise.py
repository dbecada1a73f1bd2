"""Stepwise (process reward model) data: the ``stepwise`` row format and step token positions.

Positions are checked on the tiny byte-level tokenizer (one token per character, so they are written out by
hand), on a small BPE tokenizer built here whose merges join a step's last character with the separator
(``"4\\n"`` is one token), and on the real SmolLM2 tokenizer when it is cached.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import pytest

from alignkit.data.formats import StepwiseExample, describe, load_examples
from alignkit.data.tokenize import render, render_steps
from alignkit.errors import DataError
from alignkit.models.loading import CHATML_TEMPLATE, tiny_tokenizer


def write_jsonl(tmp_path, rows, name="steps.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "What is 2+2?", "steps": ["2+2=4", "The answer is 4."], "labels": [True, 1]}


# ------------------------------------------------------------------------------------------------ format


def test_stepwise_rows_load(tmp_path):
    path = write_jsonl(tmp_path, [GOOD, "", {"prompt": "p", "steps": ["only"], "labels": [0], "id": 3}])
    loaded = load_examples(path, "stepwise")
    first, second = loaded.examples
    assert isinstance(first, StepwiseExample)
    assert (first.prompt, first.steps, first.labels) == ("What is 2+2?", ["2+2=4", "The answer is 4."], [True, True])
    assert all(type(label) is bool for label in first.labels + second.labels)
    assert (second.steps, second.labels, second.extra) == (["only"], [False], {"id": 3})
    assert (first.origin.line, second.origin.line, second.origin.row) == (1, 3, 1)
    assert describe(loaded) == f"2 stepwise examples from {path}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.prompt = "x"


def test_stepwise_csv(tmp_path):
    path = tmp_path / "steps.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "steps", "labels"])
        w.writerow(["p", json.dumps(["a", "b"]), "[true, false]"])
    (ex,) = load_examples(str(path), "stepwise").examples
    assert (ex.steps, ex.labels) == (["a", "b"], [True, False])


@pytest.mark.parametrize(
    "row, field, message",
    [
        ({**GOOD, "steps": "2+2=4"}, "steps", "expected a non-empty list of step strings, found string"),
        ({**GOOD, "steps": [], "labels": []}, "steps", "non-empty list"),
        ({**GOOD, "steps": ["a", 3]}, "steps[1]", "expected a string, found integer 3"),
        ({**GOOD, "steps": ["a", "  "]}, "steps[1]", "empty step"),
        ({**GOOD, "steps": ["", "b"]}, "steps[0]", "empty step"),
        ({**GOOD, "labels": [True]}, "labels", "has 1 labels but steps has 2 entries"),
        ({**GOOD, "labels": [True, False, True]}, "labels", "has 3 labels but steps has 2"),
        ({**GOOD, "labels": True}, "labels", "expected a list of booleans"),
        ({**GOOD, "labels": [True, 2]}, "labels[1]", "expected a boolean"),
        ({**GOOD, "labels": [True, "yes"]}, "labels[1]", "expected a boolean"),
        ({**GOOD, "labels": [0.0, 1]}, "labels[0]", "expected a boolean"),
        ({**GOOD, "prompt": ["hi"]}, "prompt", "expected a string"),
        ({"prompt": "p", "steps": ["a"]}, "labels", "is missing"),
        ({"prompt": "p", "steps": ["a"], "labels": None}, "labels", "is null"),
    ],
)
def test_stepwise_errors_name_file_line_and_field(tmp_path, row, field, message):
    path = write_jsonl(tmp_path, [GOOD, row])
    with pytest.raises(DataError) as err:
        load_examples(path, "stepwise")
    assert err.value.field == field and err.value.line == 2 and err.value.path == path
    assert f"{path}:2: field '{field}': " in str(err.value) and message in str(err.value)


def test_stepwise_skip_invalid(tmp_path):
    path = write_jsonl(tmp_path, [GOOD, {**GOOD, "labels": [1]}])
    loaded = load_examples(path, "stepwise", skip_invalid=True)
    assert (len(loaded.examples), loaded.n_skipped) == (1, 1)
    assert "steps.jsonl:2: field 'labels'" in loaded.skipped[0]


def test_unknown_row_shape(tmp_path):
    with pytest.raises(DataError, match="no recognised stepwise format"):
        load_examples(write_jsonl(tmp_path, [{"text": "x"}]), "stepwise")


# --------------------------------------------------------------------------------------- step positions


def texts_at(tok, ids, positions):
    return [tok.decode([ids[p]]) for p in positions]


def test_positions_tiny_chat():
    tok = tiny_tokenizer()  # one token per character, ChatML template
    steps = ["2+2=4", "so 4", "x"]
    prompt_ids, response_ids, positions = render_steps(tok, "Q?", steps)
    assert tok.decode(prompt_ids) == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(response_ids) == "2+2=4\nso 4\nx<|im_end|>\n"
    # "2+2=4" is characters 0-4, "\n" 5, "so 4" 6-9, "\n" 10, "x" 11
    assert positions == [4, 9, 11]
    assert texts_at(tok, response_ids, positions) == ["4", "4", "x"]
    # the same ids as render() of the prompt and the joined steps as messages
    as_chat = render(tok, [{"role": "user", "content": "Q?"}], [{"role": "assistant", "content": "2+2=4\nso 4\nx"}])
    assert (prompt_ids, response_ids) == as_chat


def test_positions_tiny_plain_and_custom_sep():
    tok = tiny_tokenizer()
    tok.chat_template = None
    prompt_ids, response_ids, positions = render_steps(tok, "Q: ", ["ab", "c", "def"], sep=" | ")
    assert (prompt_ids, response_ids) == render(tok, "Q: ", "ab | c | def")
    assert response_ids[-1] == tok.eos_token_id
    assert positions == [1, 5, 11]
    assert texts_at(tok, response_ids, positions) == ["b", "c", "f"]


def merging_tokenizer(chat: bool):
    """Byte-level BPE over the whole text (no pre-splitting) whose merges make ``"4\\n"`` one token, and
    ``"45"`` one token (so two steps can end in the same token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("4", "Ċ"), ("4", "5")]
    vocab = {t: i for i, t in enumerate(specials + alphabet + [a + b for a, b in merges])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>",
        additional_special_tokens=specials,
    )
    tok.chat_template = CHATML_TEMPLATE if chat else None
    return tok


@pytest.mark.parametrize("chat", [False, True])
def test_positions_when_step_end_merges_with_separator(chat):
    tok = merging_tokenizer(chat)
    steps = ["2+2=4", "2*2=4", "done"]
    _, response_ids, positions = render_steps(tok, "Q", steps)
    assert tok.convert_ids_to_tokens(response_ids)[:6] == ["2", "+", "2", "=", "4Ċ", "2"]  # the merge happened
    # each step's last character is in the token at its position; the first two are the merged "4\n" tokens
    assert texts_at(tok, response_ids, positions) == ["4\n", "4\n", "e"]
    # tokens: 2 + 2 = "4\n" (0-4), 2 * 2 = "4\n" (5-9), d o n e (10-13)
    assert positions == [4, 9, 13]
    for step, text in zip(steps, texts_at(tok, response_ids, positions)):
        assert step[-1] in text


def test_two_steps_ending_in_one_token():
    tok = merging_tokenizer(chat=False)
    _, response_ids, positions = render_steps(tok, "Q", ["x4", "5"], sep="")
    assert tok.convert_ids_to_tokens(response_ids[:2]) == ["x", "45"]
    assert positions == [1, 1]  # degenerate but documented: both steps are scored on the merged token


def test_slow_tokenizer_rejected():
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast tokenizer"):
        render_steps(Slow(), "p", ["a"])


SMOL = os.path.expanduser("~/.cache/alignkit/models/smollm2-135m-instruct")


@pytest.mark.skipif(not os.path.exists(os.path.join(SMOL, "tokenizer.json")), reason="SmolLM2 not cached")
def test_positions_smollm2():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOL)
    prompt = "Natalia sold clips to 48 of her friends in April, and half as many in May. How many in all?"
    steps = [
        "In May she sold 48 / 2 = 24 clips.",
        "Altogether she sold 48 + 24 = 72 clips",
        "So the answer is:  72",
        "Café: 2+2=4",
        "\\boxed{72}",
    ]
    for sep in ("\n", "\n\n", " "):
        prompt_ids, response_ids, positions = render_steps(tok, prompt, steps, sep=sep)
        as_chat = render(tok, [{"role": "user", "content": prompt}], [{"role": "assistant", "content": sep.join(steps)}])
        assert (prompt_ids, response_ids) == as_chat
        assert positions == sorted(positions) and len(set(positions)) == len(steps)
        for step, text in zip(steps, texts_at(tok, response_ids, positions)):
            assert step[-1] in text, (sep, step, text)
        # the token at the position completes step i: decoding up to it covers the step, up to just before not
        for i, p in enumerate(positions):
            text = sep.join(steps[: i + 1])
            assert tok.decode(response_ids[: p + 1]).startswith(text)
            assert not tok.decode(response_ids[:p]).startswith(text)
