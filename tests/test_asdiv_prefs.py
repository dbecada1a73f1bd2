"""The rule that labels ASDiv samples, and the pairs built from them."""

from fractions import Fraction

from alignkit.data.answers import is_correct, last_number, parse_number
from alignkit.data.asdiv import build_pairs, load_samples, solved_ids


def test_parse_and_last_number():
    assert parse_number("1,250") == 1250
    assert parse_number("3.5") == Fraction(7, 2)
    assert parse_number("-1/3") == Fraction(-1, 3)
    assert parse_number("1/0") is None and parse_number("apples") is None
    assert last_number("7 + 2 = 9 apples.") == 9
    assert last_number("The answer is 1,250.") == 1250
    assert last_number("half is 1/2") == Fraction(1, 2)
    assert last_number("no digits here") is None


def test_is_correct():
    assert is_correct("So there are 16 oranges.", "16")
    assert is_correct("It is 0.5", "1/2")
    assert not is_correct("9 + 7 = 16, so 17", "16")
    assert not is_correct("sixteen", "16")


def test_build_pairs_rules():
    rows = {1: {"id": 1, "prompt": "2 + 2?", "answer": "4"}, 2: {"id": 2, "prompt": "3 + 3?", "answer": "6"},
            3: {"id": 3, "prompt": "1 + 1?", "answer": "2"}}
    samples = [
        {"id": 1, "samples": ["It is 15 or so", "It is 5", "2 + 2 = 4", "4!"]},  # correct -> chosen; shortest wrong
        {"id": 2, "samples": ["It is 7", "It is 8"]},                # none correct -> reference answer
        {"id": 3, "samples": ["2", "1 + 1 = 2"]},                   # all correct -> no pair
    ]
    pairs = build_pairs(rows, samples)
    assert [p["id"] for p in pairs] == [1, 2]
    assert pairs[0]["chosen"][0]["content"] == "2 + 2 = 4" and pairs[0]["rejected"][0]["content"] == "It is 5"
    assert pairs[1]["chosen"][0]["content"] == "The answer is 6." and pairs[1]["chosen_source"] == "reference"
    assert pairs[0]["prompt"][0]["content"].startswith("2 + 2?")


def test_shipped_samples_are_well_formed():
    samples = load_samples()
    assert len(samples) == 700  # as shipped: scripts/sample_asdiv.py --prompts 700 --samples 4
    assert all(len(s["samples"]) == 4 for s in samples)
    assert len({s["id"] for s in samples}) == len(samples)
    assert all(isinstance(t, str) for s in samples for t in s["samples"])


def test_solved_ids_keeps_problems_some_sample_solves_in_order():
    rows = {1: {"answer": "3"}, 2: {"answer": "5"}, 3: {"answer": "7"}, 4: {"answer": "2"}}
    samples = [{"id": 3, "samples": ["so 7.", ""]},          # solved by its first sample
               {"id": 1, "samples": ["4", "the answer is 3"]},  # solved by its last
               {"id": 2, "samples": ["", "55", None]},          # never solved: empty, wrong, missing
               {"id": 4, "samples": []}]
    assert solved_ids(rows, samples) == [3, 1]
