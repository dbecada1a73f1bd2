"""``alignkit.data.tokenize`` and ``alignkit.data.collate`` on the tiny byte-level tokenizer.

The tiny tokenizer maps each ASCII character to one token and has the specials ``<|pad|>`` (0),
``<|endoftext|>`` (1), ``<|im_start|>`` (2) and ``<|im_end|>`` (3, also EOS), with the ChatML template, so
expected ids and decoded texts can be written out exactly.
"""

from __future__ import annotations

import pytest
import torch

from alignkit.data.collate import collate, soft_labels
from alignkit.data.formats import Origin, PreferenceExample, SFTExample, UnpairedExample
from alignkit.data.tokenize import Encoded, encode, encode_all, fit, render, render_chat
from alignkit.models.loading import tiny_tokenizer

ORIGIN = Origin("toy.jsonl", 1, 0)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def byte_ids(tok, text: str) -> list[int]:
    return tok.convert_tokens_to_ids([tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(ch)[0][0] for ch in text])


def spans(ids, mask) -> list[list[int]]:
    """The runs of consecutive ids where ``mask`` is true."""
    out, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


# ------------------------------------------------------------------------------------------ plain strings


def test_text_rows_end_with_eos_so_the_model_learns_to_stop(tok):
    """A ``text`` row gets EOS appended like a completion does, and the EOS is in the loss."""
    enc = encode(SFTExample(None, None, None, "hi there", ORIGIN), tok, 0)
    [response] = enc.responses
    assert response[-1] == tok.eos_token_id and response[:-1] == byte_ids(tok, "hi there")
    batch = collate([enc], (0,), tok.pad_token_id)
    assert batch["input_ids"][0][-1] == tok.eos_token_id and batch["loss_mask"][0][-1]


def test_text_rows_that_already_end_with_eos_get_no_second_one(tok):
    enc = encode(SFTExample(None, None, None, "hi" + tok.eos_token, ORIGIN), tok, 0)
    assert enc.responses == [byte_ids(tok, "hi") + [tok.eos_token_id]]


def test_plain_strings_are_prompt_then_completion_then_eos(tok):
    p, c = render(tok, "max(3,7)=", " 7")
    assert p == byte_ids(tok, "max(3,7)=")
    assert c == byte_ids(tok, " 7") + [tok.eos_token_id]
    assert tok.decode(c) == " 7<|im_end|>"


def test_plain_string_loss_mask_covers_only_the_completion(tok):
    ex = SFTExample("max(3,7)=", " 7", None, None, ORIGIN)
    batch = collate([encode(ex, tok, 0)], (0,), tok.pad_token_id)
    ids, mask = batch["input_ids"][0], batch["loss_mask"][0]
    n_prompt = len("max(3,7)=")
    assert mask.tolist() == [False] * n_prompt + [True] * 3
    assert tok.decode(ids[mask]) == " 7<|im_end|>"
    assert tok.decode(ids[~mask]) == "max(3,7)="


def test_text_rows_are_all_response(tok):
    enc = encode(SFTExample(None, None, None, "hello", ORIGIN), tok, 0)
    assert enc.prompt == [] and enc.responses == [byte_ids(tok, "hello") + [tok.eos_token_id]]
    # every token is response; all but the first are scored (nothing in the sequence predicts the first)
    assert collate([enc], (0,), tok.pad_token_id)["loss_mask"][0].tolist() == [False] + [True] * (len(enc.responses[0]) - 1)


def test_non_ascii_text_round_trips(tok):
    p, c = render(tok, "¿máx(3,7)? ", "siete — 7")
    assert tok.decode(p) == "¿máx(3,7)? " and tok.decode(c) == "siete — 7<|im_end|>"


# -------------------------------------------------------------------------------------------- chat rows


def test_conversational_prompt_and_response_use_the_chat_template(tok):
    p, c = render(tok, [user("max(3,7)?")], [assistant("7")])
    assert tok.decode(p) == "<|im_start|>user\nmax(3,7)?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(c) == "7<|im_end|>\n"
    assert c[-2] == tok.eos_token_id
    # prompt + response is exactly the whole conversation rendered by the template
    full = tok.apply_chat_template([user("max(3,7)?"), assistant("7")], tokenize=False)
    assert tok.decode(p + c) == full


def test_string_prompt_with_message_completion_becomes_a_user_turn(tok):
    assert render(tok, "max(3,7)?", [assistant("7")]) == render(tok, [user("max(3,7)?")], [assistant("7")])


def test_system_turn_stays_in_the_prompt(tok):
    p, c = render(tok, [system("Be brief."), user("hi")], [assistant("yo")])
    assert tok.decode(p) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(c) == "yo<|im_end|>\n"


def test_preference_rows_share_the_prompt(tok):
    ex = PreferenceExample([user("max(3,7)?")], [assistant("7")], [assistant("3")], 0.5, 0, ORIGIN)
    enc = encode(ex, tok, 4)
    assert tok.decode(enc.prompt).endswith("<|im_start|>assistant\n")
    assert [tok.decode(r) for r in enc.responses] == ["7<|im_end|>\n", "3<|im_end|>\n"]
    assert enc.margin == 0.5 and enc.index == 4 and enc.label is None and enc.soft_label is None
    soft = encode(PreferenceExample([user("max(3,7)?")], [assistant("7")], [assistant("3")], None, 0, ORIGIN, {}, 0.8),
                  tok, 5)
    assert soft.soft_label == 0.8 and soft.margin is None
    # collated per pair, a hard label (no soft_label) as 1.0
    labels = soft_labels([enc, soft])
    assert labels.dtype == torch.float32 and labels.tolist() == pytest.approx([1.0, 0.8])


def test_unpaired_rows_keep_their_label(tok):
    enc = encode(UnpairedExample("max(3,7)=", "3", False, ORIGIN), tok, 0)
    assert enc.label is False and tok.decode(enc.responses[0]) == "3<|im_end|>"


def test_multi_turn_chat_marks_only_assistant_turns(tok):
    messages = [system("S"), user("u1"), assistant("a one"), user("u2"), assistant("a two")]
    ids, mask = render_chat(tok, messages)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    assert [tok.decode(s) for s in spans(ids, mask)] == ["a one<|im_end|>\n", "a two<|im_end|>\n"]
    not_masked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert not_masked == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n"
    )


def test_messages_rows_encode_as_one_masked_response(tok):
    messages = [user("u1"), assistant("a1"), user("u2"), assistant("a2")]
    enc = encode(SFTExample(None, None, messages, None, ORIGIN), tok, 0)
    assert enc.prompt == []
    batch = collate([enc], (0,), tok.pad_token_id)
    ids, mask = batch["input_ids"][0], batch["loss_mask"][0]
    assert tok.decode(ids[mask]) == "a1<|im_end|>\na2<|im_end|>\n"


# ----------------------------------------------------------------------------------------------- fit


def row(n_prompt: int, *n_responses: int, masks: bool = False) -> Encoded:
    """Prompt ids 10, 11, ...; response k's ids 100k, 100k + 1, ..."""
    responses = [list(range(100 * (k + 1), 100 * (k + 1) + n)) for k, n in enumerate(n_responses)]
    rmasks = [[j % 2 == 0 for j in range(n)] for n in n_responses] if masks else None
    return Encoded(list(range(10, 10 + n_prompt)), responses, index=7, response_masks=rmasks, label=True, margin=1.5,
                   soft_label=0.625)


def test_fit_keeps_rows_that_fit_unchanged():
    r = row(5, 5, 3)
    assert fit(r, 10, None, "truncate") is r
    assert fit(r, 10, None, "drop") is r


def test_fit_truncate_keeps_the_prompt_end_and_the_response_start():
    r = row(10, 12, 6)
    out = fit(r, 12, 4, "truncate")
    assert out.prompt == [16, 17, 18, 19]  # the prompt's last 4
    assert out.responses == [list(range(100, 108)), list(range(200, 206))]  # first 12 - 4 = 8 of each
    assert out.truncated and out.length == 12
    assert (out.index, out.label, out.margin, out.soft_label) == (7, True, 1.5, 0.625)
    assert not r.truncated and len(r.prompt) == 10  # the input is not modified


def test_fit_default_prompt_budget_is_half_of_max_length():
    out = fit(row(20, 20), 16, None, "truncate")
    assert out.prompt == list(range(22, 30)) and out.responses == [list(range(100, 108))]


def test_fit_keeps_a_short_prompt_whole():
    out = fit(row(3, 20), 10, 8, "truncate")
    assert out.prompt == [10, 11, 12] and out.responses == [list(range(100, 107))]


def test_fit_truncates_response_masks_with_the_responses():
    out = fit(row(4, 12, masks=True), 10, 4, "truncate")
    assert out.response_masks == [[j % 2 == 0 for j in range(6)]]


def test_fit_drop_policy_returns_none():
    assert fit(row(10, 12), 12, 4, "drop") is None


def test_fit_drops_a_row_with_no_response_left():
    assert fit(row(10, 5), 8, 8, "truncate") is None


def test_encode_all_counts_truncated_and_dropped(tok):
    examples = [SFTExample("p" * 3, "c" * 3, None, None, ORIGIN),
                SFTExample("p" * 30, "c" * 30, None, None, ORIGIN),
                SFTExample("p" * 4, "c" * 2, None, None, ORIGIN)]
    kept = encode_all(examples, tok, max_length=20, max_prompt_length=None, truncation="truncate")
    assert (len(kept.rows), kept.n_truncated, kept.n_dropped) == (3, 1, 0)
    assert [r.truncated for r in kept.rows] == [False, True, False]
    assert max(r.length for r in kept.rows) == 20
    dropped = encode_all(examples, tok, max_length=20, max_prompt_length=None, truncation="drop")
    assert (len(dropped.rows), dropped.n_truncated, dropped.n_dropped) == (2, 0, 1)
    assert [r.index for r in dropped.rows] == [0, 1]  # renumbered after the drop


# --------------------------------------------------------------------------------------------- collate


def test_collate_right_pads_and_puts_chosen_before_rejected():
    rows = [Encoded([1, 2, 3], [[4, 5], [6]], 0), Encoded([7], [[8, 9, 10, 11], [12, 13]], 1)]
    batch = collate(rows, (0, 1), pad_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],  # row 0 chosen
        [7, 8, 9, 10, 11],  # row 1 chosen
        [1, 2, 3, 6, 0],  # row 0 rejected
        [7, 12, 13, 0, 0],  # row 1 rejected
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [
        [False, False, False, True, True],
        [False, True, True, True, True],
        [False, False, False, True, False],
        [False, True, True, False, False],
    ]
    assert batch["input_ids"].dtype == torch.long and batch["loss_mask"].dtype == torch.bool
    assert not (batch["loss_mask"] & ~batch["attention_mask"].bool()).any()


def test_collate_one_response_and_response_masks():
    rows = [Encoded([], [[1, 2, 3, 4]], 0, response_masks=[[False, True, False, True]]), Encoded([5], [[6]], 1)]
    batch = collate(rows, (0,), pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 9, 9]]
    assert batch["loss_mask"].tolist() == [[False, True, False, True], [False, True, False, False]]


def test_collate_selects_responses_by_index():
    rows = [Encoded([1], [[2], [3]], 0)]
    assert collate(rows, (1,), 0)["input_ids"].tolist() == [[1, 3]]
    assert collate(rows, (1, 0), 0)["input_ids"].tolist() == [[1, 3], [1, 2]]
