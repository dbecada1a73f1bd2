"""The feedback loop (``alignkit loop``) on the tiny model with a simulated crowd: rounds versioned and resumable,
the gate (waiting for votes, blocked on disagreement), promotion and rollback, active selection, dropping
adversarial annotators; the simulated crowd's votes; the reward model's warm start."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from _toy import prompt_jsonl

from alignkit.cli import main
from alignkit.feedback.crowd import SimulatedCrowd, prefer
from alignkit.feedback.store import SQLiteStore

UTILITY = str(Path(__file__).parent / "_loop_utility.py") + ":letters"


def loop(tmp_path, *extra, rounds=2, out="out"):
    data = prompt_jsonl(tmp_path, n=40)
    args = [f"model=tiny", f"data={data}", f"output_dir={tmp_path / out}", f"rounds={rounds}", "items_per_round=12",
            f"crowd={UTILITY}", "crowd_size=4", "overlap=2", "min_items=4", "crowd_temperature=0.05",
            "max_new_tokens=16", "rm_lr=1e-3", "lr=1e-3", "progress=false", "compare_prompts=8", *extra]
    code = main(["loop", *args])
    summary = tmp_path / out / "summary.json"
    return code, json.loads(summary.read_text()) if summary.exists() else None


def test_rounds_are_versioned_and_policies_promoted(tmp_path):
    code, s = loop(tmp_path)
    assert code == 0 and s["status"] == "done" and len(s["rounds"]) == 2
    store = SQLiteStore(s["store"])
    items = store.items("loop")
    assert {it["meta"]["round"] for it in items} == {1, 2}
    for r in s["rounds"]:
        done = json.loads((tmp_path / "out" / f"round_{r['round']}" / "done.json").read_text())
        assert done == r
        assert all(isinstance(v, str) and len(v) == 16 for v in r["versions"].values())
        assert r["gate"]["complete"] >= 4 and r["rm_gold_accuracy"] is not None and r["compare"]["n"] == 8
    assert s["rounds"][0]["versions"]["votes"] != s["rounds"][1]["versions"]["votes"]
    # round 2 proposes from the policy round 1 left: the promoted one, or the base one after a rollback
    made_by = {it["responses"][0]["model"] for it in items if it["meta"]["round"] == 2}
    assert made_by == {"policy-v1" if s["rounds"][0]["promoted"] else "policy-v0"}
    # the reward model is warm-started: round 2's starts from round 1's
    cfg = (tmp_path / "out" / "round_2" / "rm" / "config.yaml").read_text()
    assert str(tmp_path / "out" / "round_1" / "rm" / "final") in cfg


def test_rollback_keeps_the_current_policy(tmp_path):
    code, s = loop(tmp_path, "promote_min_win_rate=1.0")
    assert code == 0
    assert [r["promoted"] for r in s["rounds"]] == [r["compare"]["win_rate"] >= 1.0 for r in s["rounds"]]
    if not s["rounds"][0]["promoted"]:
        store = SQLiteStore(s["store"])
        assert {it["responses"][0]["model"] for it in store.items("loop") if it["meta"]["round"] == 2} == {"policy-v0"}
    if not any(r["promoted"] for r in s["rounds"]):
        assert s["policy"] == "tiny"


def test_crash_then_resume_redoes_only_the_unfinished_round(tmp_path, monkeypatch):
    from alignkit.recipes import dpo

    real, calls = dpo.run, []

    def crash_in_round_2(cfg):
        calls.append(cfg.output_dir)
        if "round_2" in cfg.output_dir and len(calls) == 2:
            raise RuntimeError("killed")
        return real(cfg)

    monkeypatch.setattr(dpo, "run", crash_in_round_2)
    code, _ = loop(tmp_path)
    assert code == 1 and (tmp_path / "out" / "round_1" / "done.json").exists()
    assert not (tmp_path / "out" / "round_2" / "done.json").exists()
    store = SQLiteStore(tmp_path / "out" / "feedback.sqlite")
    before = (len(store.items("loop")), len(store.votes("loop")))
    first = (tmp_path / "out" / "round_1" / "done.json").read_text()
    code, s = loop(tmp_path, "resume=true")
    assert code == 0 and s["status"] == "done" and len(s["rounds"]) == 2
    assert (tmp_path / "out" / "round_1" / "done.json").read_text() == first  # not redone
    assert (len(store.items("loop")), len(store.votes("loop"))) == before  # the round's items and votes kept
    assert sum("round_2" in c for c in calls) == 2  # round 2's DPO ran again, round 1's did not


def test_gate_waits_for_people_then_resumes(tmp_path):
    code, s = loop(tmp_path, "crowd=", "rounds=1")
    assert code == 0 and s["status"] == "waiting" and s["rounds"] == []
    gate = json.loads((tmp_path / "out" / "round_1" / "gate.json").read_text())
    assert gate["complete"] == 0 and gate["items"] > 0
    store = SQLiteStore(tmp_path / "out" / "feedback.sqlite")
    from _loop_utility import letters

    SimulatedCrowd(store, "loop", lambda p, t, c=None: letters(p, t), n=3, temperature=0.05).collect()
    code, s = loop(tmp_path, "crowd=", "rounds=1", "resume=true")
    assert code == 0 and s["status"] == "done" and len(s["rounds"]) == 1
    assert s["rounds"][0]["gold_pairs"] == 0 and s["rounds"][0]["rm_gold_accuracy"] is None  # no gold items


def test_gate_blocks_when_votes_disagree(tmp_path):
    code, s = loop(tmp_path, "rounds=1", "crowd_temperature=100", "min_agreement=0.95")
    assert code == 0 and s["status"] == "blocked" and s["rounds"] == []
    assert not (tmp_path / "out" / "round_1" / "rm").exists()


def test_adversarial_annotators_dropped(tmp_path):
    code, s = loop(tmp_path, "rounds=1", "crowd_size=6", "crowd_adversarial=0.34", "overlap=6",
                   "min_annotator_agreement=0.5", "crowd_temperature=0.01", "align=none")
    assert code == 0
    assert s["rounds"][0]["dropped_annotators"] == ["crowd-0", "crowd-1"]  # the first round(0.34 * 6) are adversaries
    assert s["rounds"][0]["compare"] is None and s["rounds"][0]["promoted"] is False  # align=none: nothing compared


def test_active_selection_shows_the_reward_models_least_certain_pairs_first(tmp_path):
    code, s = loop(tmp_path, "rounds=2", "selection=uncertain", "pool_factor=2", "align=none")
    assert code == 0
    from alignkit.models.reward import RewardScorer

    store = SQLiteStore(s["store"])
    items = [it for it in store.items("loop") if it["meta"]["round"] == 2]
    scorer = RewardScorer.load(s["rounds"][0]["reward_model"])
    r = scorer.score([it["prompt"] for it in items for _ in range(2)],
                     [x["text"] for it in items for x in it["responses"]]).tolist()
    want = [2 - abs(1 / (1 + math.exp(-(r[2 * i] - r[2 * i + 1]))) - 0.5) for i in range(len(items))]
    assert [it["priority"] for it in items] == pytest.approx(want, abs=1e-5)
    # round 2's items come before round 1's left open (they are shown first)
    assert min(it["priority"] for it in items) > max(it["priority"] for it in store.items("loop") if it["meta"]["round"] == 1)


def test_simulated_votes_follow_bradley_terry_and_adversaries_flip(tmp_path):
    rng = random.Random(0)
    share = sum(prefer(1.0, 0.0, 0.5, rng) == "a" for _ in range(20000)) / 20000
    assert share == pytest.approx(1 / (1 + math.exp(-2.0)), abs=0.01)
    assert prefer(0.3, 0.3, 1.0, rng) == "tie"
    store = SQLiteStore(tmp_path / "fb.sqlite")
    store.create_project("p", "pairwise", overlap=4, gold_rate=0.0)
    store.add_items("p", [{"prompt": f"q{i}", "responses": [f"good{i}", f"bad{i}"]} for i in range(10)])
    crowd = SimulatedCrowd(store, "p", lambda p, t, c=None: [float(x.startswith("good")) for x in t], n=4,
                           adversarial=0.25, temperature=1e-3)
    assert crowd.collect() == 40 and crowd.adversaries == ["crowd-0"]
    for v in store.votes("p"):
        assert v["answer"]["choice"] == ("b" if v["annotator"] == "crowd-0" else "a")


def test_reward_model_warm_start_keeps_the_head(tmp_path):
    from alignkit.models.reward import RewardMeta, load_reward_backbone
    from alignkit.recipes.rm import save

    model, tok = load_reward_backbone("tiny", 1, seed=3)
    torch.nn.init.constant_(model.score.weight, 0.25)
    save(model, tok, RewardMeta(aspects=["reward"], weights=[1.0]), tmp_path / "rm")
    again, _ = load_reward_backbone(str(tmp_path / "rm"), 1, seed=4)
    assert torch.equal(again.score.weight, torch.full_like(again.score.weight, 0.25))


def test_used_output_dir_refused_overwrite_clears_the_loops_store_shared_store_kept_apart(tmp_path):
    code, s = loop(tmp_path, "rounds=1", "align=none")
    assert code == 0
    code, _ = loop(tmp_path, "rounds=1", "align=none")
    assert code == 2  # a fresh run into a used output_dir
    code, s2 = loop(tmp_path, "rounds=1", "align=none", "overwrite=true")
    assert code == 0 and len(SQLiteStore(s2["store"]).items("loop")) == s2["rounds"][0]["gate"]["items"]
    shared = tmp_path / "shared.sqlite"
    for out in ("a", "b"):
        code, s = loop(tmp_path, "rounds=1", "align=none", f"store={shared}", out=out)
        assert code == 0 and s["rounds"][0]["gate"]["items"] > 0
    items = SQLiteStore(shared).items("loop")
    assert len({it["meta"]["loop"] for it in items}) == 2  # each loop proposed its own round 1


def test_generate_items_from_two_policies_alternating(tmp_path):
    from alignkit.models.loading import tiny_model, tiny_tokenizer

    other = tmp_path / "other"
    tiny_model(seed=7).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    db = tmp_path / "fb.sqlite"
    assert main(["feedback", "init", str(db), "--project", "r", "--kind", "ranking"]) == 0
    data = prompt_jsonl(tmp_path, n=6)
    args = ["feedback", "generate", f"store={db}", f"data={data}", "max_new_tokens=8", "progress=false"]
    assert main([*args, "project=r", f"models=tiny,{other}", "responses=3"]) == 0
    items = SQLiteStore(db).items("r")
    assert len(items) == 6 and all([r["model"] for r in it["responses"]] == ["tiny", str(other), "tiny"] for it in items)
    assert all(it["meta"]["columns"]["answer"] for it in items)  # the prompt row's columns travel with the item
    assert main([*args, "project=nope"]) == 2
    assert main([*args, "project=r", "responses=9"]) == 2
    main(["feedback", "init", str(db), "--project", "t", "--kind", "thumbs"])
    assert main([*args, "project=t", "responses=2"]) == 2  # a thumbs item has one response


@pytest.mark.parametrize("align", ["rm", "grpo"])
def test_realign_with_the_new_reward_model(tmp_path, align):
    code, s = loop(tmp_path, "rounds=1", f"align={align}", "rl_steps=2", "prompts_per_step=2", "num_generations=2")
    assert code == 0 and s["status"] == "done"
    r = s["rounds"][0]
    assert r["align_rows"] > 0 and r["compare"]["n"] == 8 and r["candidate"].endswith("round_1/policy/final")
    if align == "grpo":  # online RL against the round's reward model
        cfg = (tmp_path / "out" / "round_1" / "policy" / "config.yaml").read_text()
        assert f"rm:{tmp_path / 'out' / 'round_1' / 'rm' / 'final'}" in cfg


def test_frozen_gold_set_from_a_file(tmp_path, capsys):
    """``gold_data``: the reward model is measured on the file's pairs (here loop a's own gold set with chosen and
    rejected swapped: the same reward model scores 1 - a's accuracy), and none is made; a bad file exits 2 naming
    its line and field before anything runs."""
    code, a = loop(tmp_path, "rounds=1", "align=none", out="a")
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "gold_pairs.jsonl").read_text().splitlines()]
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                               for r in rows))
    code, b = loop(tmp_path, "rounds=1", "align=none", f"gold_data={swapped}", out="b")
    assert code == 0 and not (tmp_path / "b" / "gold_pairs.jsonl").exists()
    ra, rb = a["rounds"][0], b["rounds"][0]
    assert rb["gold_pairs"] == ra["gold_pairs"] == len(rows) > 0
    assert rb["rm_gold_accuracy"] == pytest.approx(1 - ra["rm_gold_accuracy"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[0], "rejected": 5}) + "\n")
    code, c = loop(tmp_path, "rounds=1", f"gold_data={bad}", out="c")
    assert code == 2 and c is None and not (tmp_path / "c").exists()
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'rejected'" in err, err[-500:]
