"""Votes to training data: every format loads with alignkit's own loader, pairs aggregate votes with soft labels,
rankings give all ordered pairs, KTO rows follow the majority, corrections become SFT rows, provenance is kept,
and the agreement filters drop an adversarial annotator."""

import json

import pytest

from alignkit.data.formats import load_examples
from alignkit.feedback.export import battles, export_rows, kept_votes
from alignkit.feedback.store import FeedbackError, SQLiteStore


def _vote_all(store, project, answer_for):
    """Every annotator answers every task offered to them; ``answer_for(name, task)`` gives the answer."""
    for a in store.annotators():
        while (t := store.next_task(a["id"], project)) is not None:
            store.submit(a["id"], t["lease"], answer_for(a["name"], t))


def _write(tmp_path, rows, name):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "fb.sqlite", seed=0)
    for name in ("ann", "bob", "cat", "eve"):
        s.add_annotator(name)
    return s


def test_pairwise_pairs_soft_labels_provenance_and_loader(store, tmp_path):
    store.create_project("p", "pairwise", overlap=4, gold_rate=0)
    store.add_items("p", [{"prompt": f"q{i}", "responses": [{"text": f"good{i}", "model": "m1"},
                                                            {"text": f"bad{i}", "model": "m2"}], "id": f"x{i}"}
                          for i in range(3)])

    def answer(name, t):  # ann, bob, cat prefer good; eve votes tie
        if name == "eve":
            return {"choice": "tie"}
        return {"choice": "a" if t["responses"][0].startswith("good") else "b"}

    _vote_all(store, "p", answer)
    rows = export_rows(store, "p", "pairs")
    assert len(rows) == 3
    for r in rows:
        assert r["chosen"].startswith("good") and r["rejected"].startswith("bad")
        assert r["soft_label"] == pytest.approx((3 + 0.5) / 4)  # a tie counts half to each side
        assert r["votes"] == {"chosen": 3, "rejected": 0, "tie": 1, "both_bad": 0}
        assert sorted(r["annotators"]) == ["ann", "bob", "cat", "eve"] and r["external_id"].startswith("x")
        assert r["chosen_model"] == "m1" and r["agreement"] == 0.75
    loaded = load_examples(_write(tmp_path, rows, "pairs.jsonl"), "preference")
    assert [e.soft_label for e in loaded.examples] == [0.875] * 3
    assert len(battles(store, "p")) == 12


def test_ranking_votes_give_every_ordered_pair_and_ranking_rows(store, tmp_path):
    store.create_project("r", "ranking", overlap=2, gold_rate=0)
    store.add_items("r", [{"prompt": "q", "responses": ["w", "x", "y", "z"]}])

    def answer(name, t):  # both rank w > x > y > z, except bob swaps y and z
        order = ["w", "x", "z", "y"] if name == "bob" else ["w", "x", "y", "z"]
        return {"ranking": [t["responses"].index(r) for r in order]}

    _vote_all(store, "r", answer)
    pairs = export_rows(store, "r", "pairs")
    got = {(p["chosen"], p["rejected"]): p["soft_label"] for p in pairs}
    assert got == {("w", "x"): 1.0, ("w", "y"): 1.0, ("w", "z"): 1.0, ("x", "y"): 1.0, ("x", "z"): 1.0}  # y-z split
    from alignkit.feedback.report import project_stats

    assert project_stats(store, "r")["agreement"]["kendall_tau"] == pytest.approx(4 / 6)  # 5 of 6 pairs agree
    ranks = export_rows(store, "r", "rankings")
    assert sorted(tuple(r["ranking"]) for r in ranks) == [(1, 2, 3, 4), (1, 2, 4, 3)]
    loaded = load_examples(_write(tmp_path, ranks, "ranks.jsonl"), "preference")
    assert len(loaded.examples) == 12  # each ranking of 4 is 6 ordered pairs


def test_thumbs_give_kto_by_majority_and_sft_from_corrections(store, tmp_path):
    store.create_project("t", "thumbs", overlap=3, gold_rate=0)
    store.add_items("t", [{"prompt": [{"role": "user", "content": "2+2?"}], "responses": ["5"]},
                          {"prompt": "capital of France?", "responses": ["Paris"]}])

    def answer(name, t):
        if t["responses"][0] == "5":
            return {"thumb": "down", "correction": "4"} if name != "cat" else {"thumb": "up"}
        return {"thumb": "up"}

    _vote_all(store, "t", answer)
    kto = export_rows(store, "t", "kto")
    assert {(json.dumps(r["completion"]), r["label"]) for r in kto} == {
        (json.dumps([{"role": "assistant", "content": "5"}]), False), (json.dumps("Paris"), True)}
    sft = export_rows(store, "t", "sft")
    assert [r["completion"] for r in sft] == [[{"role": "assistant", "content": "4"}]] * 2
    assert load_examples(_write(tmp_path, kto, "kto.jsonl"), "unpaired").examples
    assert len(load_examples(_write(tmp_path, sft, "sft.jsonl"), "sft").examples) == 2
    with pytest.raises(FeedbackError, match="needs a pairwise"):
        export_rows(store, "t", "pairs")


def test_filters_drop_the_adversary_and_gold_items_stay_out(store, tmp_path):
    store.create_project("p", "pairwise", overlap=4, gold_rate=0.1)
    store.add_items("p", [{"prompt": f"q{i}", "responses": [f"good{i}", f"bad{i}"]} for i in range(6)]
                    + [{"prompt": "g", "responses": ["gold-good", "gold-bad"], "gold": "a"}])

    def answer(name, t):
        honest = "a" if "good" in t["responses"][0] else "b"
        return {"choice": {"a": "b", "b": "a"}[honest] if name == "eve" else honest}

    _vote_all(store, "p", answer)
    assert all(r["soft_label"] == 0.75 for r in export_rows(store, "p", "pairs"))
    votes, dropped = kept_votes(store, "p", min_annotator_agreement=0.5)
    assert dropped["annotators"] == ["eve"] and all(v["annotator"] != "eve" for v in votes)
    rows = export_rows(store, "p", "pairs", min_annotator_agreement=0.5)
    assert len(rows) == 6 and all(r["soft_label"] == 1.0 for r in rows)
    assert not any(r["prompt"] == "g" for r in rows)  # gold items measure annotators; not trained on
    assert any(r["prompt"] == "g" for r in export_rows(store, "p", "pairs", include_gold=True))
    _, dropped = kept_votes(store, "p", gold_min_accuracy=0.5)
    assert dropped["annotators"] == ["eve"]
