"""The synthetic pluralistic GDPO set (``alignkit.data.pluralistic``): generator, keyword rule, files, CLI."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from alignkit.data import pluralistic
from alignkit.data.beliefs import DEFAULT_TEMPLATE, parse_belief
from alignkit.data.formats import load_examples
from alignkit.data.pluralistic import MAJORITY_MAX, MAJORITY_MIN, MIN_SHARE, build, consistent, stance_of


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return build()


def questions(rows: dict[str, list[dict]]) -> list[dict]:
    return rows["train"] + rows["test"]


def test_keyword_rule():
    keywords = {"support": ["support", "favour"], "oppose": ["oppose", "against"], "undecided": ["unsure"]}
    assert stance_of("I SUPPORT it.", keywords) == "support"
    assert stance_of("Against it, firmly.", keywords) == "oppose"
    assert stance_of("I am supportive of it.", keywords) is None  # whole words only
    assert stance_of("I support one part and oppose the other.", keywords) is None  # two stances
    assert stance_of("No opinion here.", keywords) is None
    assert consistent("I am unsure.", "undecided", keywords)
    assert not consistent("I am unsure.", "support", keywords)


def test_same_seed_same_rows_other_seed_other_rows(rows):
    assert build() == rows
    other = build(seed=1)
    assert [r["prompt"] for r in other["train"]] != [r["prompt"] for r in rows["train"]]


def test_sizes_and_parameters():
    small = build(n_issues=14, n_test=8, annotators=3, seed=5)
    assert (len(small["train"]), len(small["test"])) == (20, 8)
    assert all(len(r["pairs"]) == 3 for r in small["train"] + small["test"])
    assert len(small["pooled_train"]) == len(small["sft_train"]) == 60
    with pytest.raises(ValueError):
        build(n_issues=1000)
    with pytest.raises(ValueError):
        build(n_issues=10, n_test=11)


def test_counts_and_stance_mix(rows):
    assert (len(rows["train"]), len(rows["test"])) == (240, 60)
    assert [r["id"] for r in questions(rows)] == [f"q{i:04d}" for i in range(1, 301)]
    by_size = Counter(len(r["beliefs"]) for r in questions(rows))
    assert sorted(by_size) == [2, 3, 4, 5] and all(74 <= n <= 76 for n in by_size.values()), by_size
    assert len({r["prompt"] for r in questions(rows)}) == 300


def test_shares(rows):
    for r in questions(rows):
        shares = list(r["beliefs"].values())
        assert MAJORITY_MIN <= max(shares) <= MAJORITY_MAX
        assert min(shares) >= MIN_SHARE
        assert sum(round(s * 1000) for s in shares) == 1000 and abs(sum(shares) - 1) < 1e-9
        assert all(round(s, 3) == s for s in shares)


def test_stance_order_is_shuffled(rows):
    """The stances of one family come in several orders, and the majority is often not listed first."""
    orders: dict[frozenset, set] = {}
    for r in questions(rows):
        orders.setdefault(frozenset(r["beliefs"]), set()).add(tuple(r["beliefs"]))
    assert len(orders) == 8 and all(len(o) > 1 for o in orders.values())
    first = sum(list(r["beliefs"].values())[0] == max(r["beliefs"].values()) for r in questions(rows))
    assert 40 < first < 150


def test_keywords_distinct_within_a_question(rows):
    for r in questions(rows):
        assert list(r["keywords"]) == list(r["beliefs"])
        words = [w.lower() for ws in r["keywords"].values() for w in ws]
        assert len(words) == len(set(words)), r["keywords"]


def test_every_response_takes_its_own_stance_only(rows):
    pluralistic.check_templates()
    for r in questions(rows):
        for p in r["pairs"]:
            assert p["belief"] != p["rejected_belief"] and p["chosen"] != p["rejected"]
            for text, stance in ((p["chosen"], p["belief"]), (p["rejected"], p["rejected_belief"])):
                assert stance_of(text, r["keywords"]) == stance, text
                assert [b for b in r["beliefs"] if consistent(text, b, r["keywords"])] == [stance]


def test_held_out_questions_are_new_wordings_of_trained_issues(rows):
    """No held-out prompt is trained on, but its issue is: another wording of the same topic, with the same
    stances (in the same order) and the same group shares."""
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["test"]}

    def topic(r):
        return next(t for t in pluralistic.TOPICS if t in r["prompt"])

    trained = {(topic(r), tuple(r["beliefs"])): r["beliefs"] for r in rows["train"]}
    for r in rows["test"]:
        assert trained[(topic(r), tuple(r["beliefs"]))] == r["beliefs"]
    assert len(trained) == 150


def test_annotators_follow_the_targets(rows):
    """Over all train annotations, the belief an annotator holds is drawn from the target shares: the fraction
    that picks the majority stance matches the mean majority share, and the per-question frequencies are
    close to the targets (a uniform draw would give ~0.3 for the first and a larger error for the second)."""
    train = rows["train"]
    n = sum(len(r["pairs"]) for r in train)
    majority = sum(p["belief"] == max(r["beliefs"], key=r["beliefs"].get) for r in train for p in r["pairs"])
    mean_major = sum(max(r["beliefs"].values()) for r in train) / len(train)
    assert abs(majority / n - mean_major) < 0.04
    big = build(n_test=1, annotators=200)["train"]
    errors = [abs(Counter(p["belief"] for p in r["pairs"])[b] / 200 - s) for r in big for b, s in r["beliefs"].items()]
    assert sum(errors) / len(errors) < 0.03
    rejected = Counter((len(r["beliefs"]), p["rejected_belief"] == max(r["beliefs"], key=r["beliefs"].get))
                       for r in big for p in r["pairs"])
    # the rejected stance is uniform among the others, so it is the majority well under half the time for K >= 3
    assert rejected[(5, True)] < 0.4 * (rejected[(5, True)] + rejected[(5, False)])


def test_pooled_and_sft_rows(rows):
    assert len(rows["pooled_train"]) == len(rows["sft_train"]) == 240 * 6
    pairs = [(r, p) for r in rows["train"] for p in r["pairs"]]
    for (r, p), pooled, sft in zip(pairs, rows["pooled_train"], rows["sft_train"]):
        assert pooled["prompt"] == [{"role": "user", "content": r["prompt"]}] == sft["messages"][:1]
        assert pooled["chosen"][0]["content"] == f"Belief: {p['belief']}\n{p['chosen']}" == sft["messages"][1]["content"]
        assert parse_belief(pooled["rejected"][0]["content"], DEFAULT_TEMPLATE, r["beliefs"]) == (
            p["rejected_belief"], p["rejected"])


def test_pooled_soft_pairs_are_the_groups_preference_between_every_two_stances(rows):
    """One pair per two stances of each train question, the larger share's answer chosen, soft_label p_a / (p_a + p_b),
    each answer after its own belief line and of that stance by the keyword rule."""
    soft = rows["pooled_soft_train"]
    assert len(soft) == sum(len(r["beliefs"]) * (len(r["beliefs"]) - 1) // 2 for r in rows["train"])
    by_id = {r["id"]: r for r in rows["train"]}
    seen = set()
    for pair in soft:
        q = by_id[pair["id"]]
        (a, ya), (b, yb) = (parse_belief(pair[side][0]["content"], DEFAULT_TEMPLATE, q["beliefs"]) for side in ("chosen", "rejected"))
        assert consistent(ya, a, q["keywords"]) and consistent(yb, b, q["keywords"])
        pa, pb = q["beliefs"][a], q["beliefs"][b]
        assert pa >= pb and pair["soft_label"] == pytest.approx(pa / (pa + pb), abs=1e-6)
        seen.add((pair["id"], frozenset((a, b))))
    assert len(seen) == len(soft)  # every two stances once


def test_fetch_through_the_cli(tmp_path, monkeypatch, capsys, rows):
    from alignkit.cli import main

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    assert main(["data", "fetch", "pluralistic"]) == 0
    out = tmp_path / "cache" / "data" / "pluralistic"
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*pluralistic.FILES, "card.json", "README.md"])
    assert not list(out.parent.glob(".pluralistic.tmp-*"))

    train = load_examples(str(out / "train.jsonl"), "belief")
    test = load_examples(str(out / "test.jsonl"), "belief")
    assert (train.n_rows, len(train.examples), test.n_rows, len(test.examples)) == (240, 1440, 60, 360)
    assert train.examples[0].extra["keywords"] == rows["train"][0]["keywords"]
    assert abs(sum(train.examples[0].target) - 1) < 1e-9
    pooled = load_examples(str(out / "pooled_train.jsonl"), "preference")
    soft = load_examples(str(out / "pooled_soft_train.jsonl"), "preference")
    assert len(soft.examples) == len(rows["pooled_soft_train"]) and all(0.5 <= e.soft_label < 1 for e in soft.examples)
    sft = load_examples(str(out / "sft_train.jsonl"), "sft")
    assert len(pooled.examples) == len(sft.examples) == 1440 and sft.examples[0].shape == "messages"
    assert [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()] == rows["train"]

    card = json.loads((out / "card.json").read_text())
    assert card["parameters"] == {"n_issues": 150, "n_test": 60, "annotators": 6, "seed": 0, "concentration": 1.0}
    assert card["summary"] == pluralistic.summary(rows)
    assert card["summary"]["train"]["pairs"] == 1440 and "Apache-2.0" in card["license"]
    readme = (out / "README.md").read_text()
    assert "Dirichlet" in readme and "pooled_train.jsonl" in readme and "annotator" in readme.lower()

    (out / "train.jsonl").write_text("changed\n")  # a cached copy is returned as it is, unless forced
    assert main(["data", "fetch", "pluralistic"]) == 0
    assert (out / "train.jsonl").read_text() == "changed\n"
    assert main(["data", "fetch", "pluralistic", "--force"]) == 0
    assert len((out / "train.jsonl").read_text().splitlines()) == 240
