"""The feedback store without a server: assignment (overlap, leases, no second review, gold, authors), votes
mapped from the display order, exactly-once submission, validation with file, line and field."""

import json

import pytest

from alignkit.errors import DataError
from alignkit.feedback.store import Conflict, FeedbackError, NotFound, SQLiteStore, TooLarge


def _store(tmp_path, kind="pairwise", overlap=2, gold_rate=0.0, lease=60.0, n=3):
    store = SQLiteStore(tmp_path / "fb.sqlite", seed=0)
    store.create_project("p", kind, overlap=overlap, gold_rate=gold_rate, lease_seconds=lease)
    k = {"pairwise": 2, "ranking": 4, "thumbs": 1}[kind]
    store.add_items("p", [{"prompt": f"q{i}", "responses": [f"r{i}-{j}" for j in range(k)]} for i in range(n)])
    ids = {name: store.authenticate(store.add_annotator(name))["id"] for name in ("ann", "bob", "cat", "dan")}
    return store, ids


def test_overlap_no_second_review_and_complete(tmp_path):
    store, ids = _store(tmp_path, overlap=2, n=3)
    seen = {a: [] for a in ids}
    for _ in range(3):
        for a, aid in ids.items():
            task = store.next_task(aid, "p")
            if task is None:
                continue
            seen[a].append(task["item"])
            store.submit(aid, task["lease"], {"choice": "a"})
    per_item = {}
    for v in store.votes("p"):
        per_item.setdefault(v["item"], []).append(v["annotator"])
    assert sorted(per_item) == [1, 2, 3] and all(len(a) == 2 == len(set(a)) for a in per_item.values())
    assert all(len(s) == len(set(s)) for s in seen.values())  # nobody judged an item twice
    assert store.counts("p")["complete"] == 3
    assert all(store.next_task(aid, "p") is None for aid in ids.values())


def test_asks_again_after_voting_gets_another_item(tmp_path):
    store, ids = _store(tmp_path, overlap=2, n=2)
    first = store.next_task(ids["ann"], "p")
    store.submit(ids["ann"], first["lease"], {"choice": "a"})
    second = store.next_task(ids["ann"], "p")  # the first item still has a free slot, but not for ann
    assert second["item"] != first["item"]
    store.submit(ids["ann"], second["lease"], {"choice": "a"})
    assert store.next_task(ids["ann"], "p") is None


def test_lease_counts_against_overlap_then_expires_and_requeues(tmp_path):
    store, ids = _store(tmp_path, overlap=1, n=1, lease=10.0)
    t = store.next_task(ids["ann"], "p", now=100.0)
    assert store.next_task(ids["ann"], "p", now=101.0)["lease"] == t["lease"]  # the same task again, not a new one
    assert store.next_task(ids["bob"], "p", now=105.0) is None  # the only slot is leased
    t2 = store.next_task(ids["bob"], "p", now=111.0)  # expired: re-queued to someone else
    assert t2 is not None and t2["item"] == t["item"]
    with pytest.raises(Conflict):  # the first lease is gone: its late answer is refused
        store.submit(ids["ann"], t["lease"], {"choice": "a"}, now=112.0)
    store.submit(ids["bob"], t2["lease"], {"choice": "b"}, now=112.0)
    assert len(store.votes("p")) == 1


def test_late_answer_taken_while_a_slot_is_free_refused_when_full(tmp_path):
    store, ids = _store(tmp_path, overlap=1, n=1, lease=10.0)
    t = store.next_task(ids["ann"], "p", now=0.0)
    assert not store.submit(ids["ann"], t["lease"], {"choice": "a"}, now=50.0)["duplicate"]  # nobody took the slot
    store2, ids2 = _store(tmp_path / "b", overlap=1, n=1, lease=10.0)
    t = store2.next_task(ids2["ann"], "p", now=0.0)
    with store2._write() as db:  # someone else answered in the meantime (as if leased after the expiry)
        db.execute("INSERT INTO votes (item_id, annotator_id, answer, display, created) VALUES (?,?,?,?,?)",
                   (t["item"], ids2["bob"], json.dumps({"choice": "a", "reason": ""}), "[0, 1]", 20.0))
    with pytest.raises(Conflict, match="complete"):
        store2.submit(ids2["ann"], t["lease"], {"choice": "a"}, now=50.0)


def test_display_order_is_recorded_and_answers_mapped_back(tmp_path):
    store, ids = _store(tmp_path, kind="ranking", overlap=4, n=1)
    for aid in ids.values():
        t = store.next_task(aid, "p")
        item = store.items("p")[0]
        display = [item["responses"].index({"text": r, "model": None, "author": None}) for r in t["responses"]]
        # the annotator ranks the shown responses by the item's own index (r1-0 best): answer in display positions
        shown_rank = sorted(range(4), key=lambda pos: display[pos])
        store.submit(aid, t["lease"], {"ranking": shown_rank})
    votes = store.votes("p")
    assert all(v["answer"]["ranking"] == [0, 1, 2, 3] for v in votes)
    assert len({tuple(v["display"]) for v in votes}) > 1  # orders are randomised per task


def test_pairwise_choice_mapped_through_display(tmp_path):
    store = SQLiteStore(tmp_path / "fb.sqlite", seed=0)
    store.create_project("p", "pairwise", overlap=8, gold_rate=0.0)
    store.add_items("p", [{"prompt": "q", "responses": ["first", "second"]}])
    shown = {}
    for i in range(8):
        aid = store.authenticate(store.add_annotator(f"a{i}"))["id"]
        t = store.next_task(aid, "p")
        shown[f"a{i}"] = t["responses"][0]
        store.submit(aid, t["lease"], {"choice": "a"})  # always the response shown first
    assert set(shown.values()) == {"first", "second"}  # both orders were shown
    for v in store.votes("p"):
        assert v["answer"]["choice"] == ("a" if shown[v["annotator"]] == "first" else "b")


def test_exactly_once_by_client_id(tmp_path):
    store, ids = _store(tmp_path)
    t = store.next_task(ids["ann"], "p")
    first = store.submit(ids["ann"], t["lease"], {"choice": "tie"}, client_id="c1")
    again = store.submit(ids["ann"], t["lease"], {"choice": "tie"}, client_id="c1")
    assert again == {"vote": first["vote"], "duplicate": True} and len(store.votes("p")) == 1
    t2 = store.next_task(ids["bob"], "p")
    with pytest.raises(Conflict):  # another annotator cannot reuse (or read back) someone's client id
        store.submit(ids["bob"], t2["lease"], {"choice": "a"}, client_id="c1")


def test_gold_items_mixed_in_without_overlap(tmp_path):
    store = SQLiteStore(tmp_path / "fb.sqlite", seed=1)
    store.create_project("p", "pairwise", overlap=1, gold_rate=1.0)
    store.add_items("p", [{"prompt": "g", "responses": ["x", "y"], "gold": "a"},
                          {"prompt": "q", "responses": ["u", "v"]}])
    got = []
    for name in ("ann", "bob", "cat"):
        aid = store.authenticate(store.add_annotator(name))["id"]
        t = store.next_task(aid, "p")
        got.append(t["item"])
        store.submit(aid, t["lease"], {"choice": "a"})
    assert got == [1, 1, 1]  # every annotator meets the gold item (no overlap cap); gold_rate 1 shows it first


def test_gold_left_when_nothing_else_is_and_never_at_rate_zero(tmp_path):
    for rate, want in ((0.01, [2, 1]), (0.0, [2, None])):
        store = SQLiteStore(tmp_path / f"fb{rate}.sqlite", seed=0)
        store.create_project("p", "pairwise", overlap=1, gold_rate=rate)
        store.add_items("p", [{"prompt": "g", "responses": ["x", "y"], "gold": "a"},
                              {"prompt": "q", "responses": ["u", "v"]}])
        aid = store.authenticate(store.add_annotator("ann"))["id"]
        got = []
        for _ in range(2):
            t = store.next_task(aid, "p")
            got.append(t and t["item"])
            if t:
                store.submit(aid, t["lease"], {"choice": "a"})
        assert got == want


def test_authors_never_judge_their_own_responses(tmp_path):
    store = SQLiteStore(tmp_path / "fb.sqlite")
    store.create_project("p", "pairwise", overlap=3)
    store.add_items("p", [{"prompt": "q", "responses": [{"text": "mine", "author": "ann"}, "model's"]}])
    ann = store.authenticate(store.add_annotator("ann"))["id"]
    bob = store.authenticate(store.add_annotator("bob"))["id"]
    assert store.next_task(ann, "p") is None and store.next_task(bob, "p") is not None


def test_skip_requeues_and_does_not_come_back(tmp_path):
    store, ids = _store(tmp_path, overlap=1, n=1)
    t = store.next_task(ids["ann"], "p")
    store.skip(ids["ann"], t["lease"])
    assert store.next_task(ids["ann"], "p") is None and store.next_task(ids["bob"], "p")["item"] == t["item"]


def test_priority_orders_tasks(tmp_path):
    store, ids = _store(tmp_path, overlap=1, n=3)
    store.set_priority({3: 2.0, 2: 1.0})
    order = []
    for aid in ids.values():
        t = store.next_task(aid, "p")
        if t:
            order.append(t["item"])
    assert order == [3, 2, 1]


@pytest.mark.parametrize("answer", [{"choice": "c"}, {"choice": None}, "a", {"ranking": [0, 1]}])
def test_bad_answers_refused_and_nothing_stored(tmp_path, answer):
    store, ids = _store(tmp_path)
    t = store.next_task(ids["ann"], "p")
    with pytest.raises(FeedbackError):
        store.submit(ids["ann"], t["lease"], answer)
    assert store.votes("p") == [] and store.next_task(ids["ann"], "p")["lease"] == t["lease"]


def test_limits_and_roles(tmp_path):
    store, ids = _store(tmp_path, kind="thumbs")
    t = store.next_task(ids["ann"], "p")
    with pytest.raises(TooLarge):
        store.submit(ids["ann"], t["lease"], {"thumb": "down", "correction": "x" * 8001})
    with pytest.raises(FeedbackError, match="only with a thumbs down"):
        store.submit(ids["ann"], t["lease"], {"thumb": "up", "correction": "better"})
    store.submit(ids["ann"], t["lease"], {"thumb": "down", "correction": "better"})
    assert store.votes("p")[0]["answer"] == {"thumb": "down", "correction": "better"}
    with pytest.raises(NotFound):  # someone else's lease is not theirs to answer
        store.submit(ids["bob"], store.next_task(ids["cat"], "p")["lease"], {"thumb": "up"})
    assert store.authenticate("nope") is None and store.authenticate("") is None


def test_import_file_errors_name_file_line_field(tmp_path):
    store = SQLiteStore(tmp_path / "fb.sqlite")
    store.create_project("p", "ranking")
    f = tmp_path / "items.jsonl"
    f.write_text(json.dumps({"prompt": "q", "responses": ["a", "b", "c"]}) + "\n"
                 + json.dumps({"prompt": "q", "responses": ["a", "b"], "gold": [0, 0]}) + "\n")
    with pytest.raises(DataError, match=r"items.jsonl:2: field 'gold'"):
        store.import_file("p", str(f))
    assert store.items("p") == []  # all or nothing
    f.write_text(json.dumps({"prompt": "q", "responses": ["a", "a"]}) + "\n")
    with pytest.raises(DataError, match=r":1: field 'responses': two responses are identical"):
        store.import_file("p", str(f))
    f.write_text(json.dumps({"prompt": "q", "responses": ["a", "b"], "gold": [1, 0], "id": 7}) + "\n")
    assert store.import_file("p", str(f)) == [1] and store.items("p")[0]["external_id"] == "7"


def test_reopen_keeps_everything(tmp_path):
    store, ids = _store(tmp_path)
    t = store.next_task(ids["ann"], "p")
    store.submit(ids["ann"], t["lease"], {"choice": "b", "reason": "clearer"})
    secret = store.secret
    store.close()
    again = SQLiteStore(tmp_path / "fb.sqlite")
    assert again.secret == secret and again.votes("p")[0]["answer"]["reason"] == "clearer"
    assert again.snapshot_hash("p") == store.snapshot_hash("p")
