"""End-to-end runs of the tiny model through the real CLI (``python -m alignkit.cli``).

Every training run here is a separate process, and a process spends most of its few seconds importing torch
and transformers, so the runs this module's selected tests need are all started at once, a few at a time in the
background (fixture ``runs``), and each test waits for the ones it reads. Subprocesses get
``OMP_NUM_THREADS=1``: on a busy machine a 64-wide model is many times faster on one thread than on several.
The cheap failure and logging cases (each kind of bad row, skip_invalid, truncation) call the CLI's entry
point ``alignkit.cli:main`` in this process instead; one bad row also goes through a real process.

The preference task is ``max(a,b)=`` with the larger digit chosen and the smaller rejected: a byte-level model
learns it in a few dozen steps (a preference for larger digits alone solves it), so every loss must reach high
reward accuracy on held-out pairs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from alignkit.config import DPOConfig, SFTConfig, build, to_dict

TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------------ toy data


def _write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (dumped as JSON) or raw strings (written as they are), one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def max_pairs() -> list[dict]:
    """All 90 ordered pairs of distinct digits: ``max(a,b)=`` -> chosen the larger, rejected the smaller."""
    rows = [
        {"prompt": f"max({a},{b})=", "chosen": str(max(a, b)), "rejected": str(min(a, b))}
        for a in range(10) for b in range(10) if a != b
    ]
    random.Random(0).shuffle(rows)
    return rows


def count_chats(n: int = 64) -> list[dict]:
    """Chats ``count from s`` -> ``s s+1 ... s+4``: a format the tiny model picks up in a few dozen steps."""
    rng = random.Random(1)
    rows = []
    for _ in range(n):
        s = rng.randint(0, 5)
        reply = " ".join(str(s + k) for k in range(5))
        rows.append({"messages": [{"role": "user", "content": f"count from {s}"}, {"role": "assistant", "content": reply}]})
    return rows


GOOD = {"prompt": "max(1,2)=", "chosen": "2", "rejected": "1"}

# name -> (bad row, words the error must contain). Each file is three good rows and then the bad row, line 4.
BAD_ROWS = {
    "malformed_json": ('{"prompt": "max(1,2)=", "chosen": "2",', ["malformed JSON"]),
    "missing_field": ({"prompt": "max(1,2)=", "chosen": "2"}, ["rejected", "missing"]),
    "wrong_type": ({"prompt": "max(1,2)=", "chosen": 2, "rejected": "1"}, ["chosen", "expected a string"]),
    "empty_response": ({"prompt": "max(1,2)=", "chosen": "  ", "rejected": "1"}, ["chosen", "empty response"]),
    "identical": ({"prompt": "max(1,2)=", "chosen": "2", "rejected": "2"}, ["rejected", "identical"]),
    "ranking_tie": ({"prompt": "max(1,2,3)=", "responses": ["3", "2", "1"], "ranking": [1, 1, 2]}, ["ranking", "tie"]),
    "ranking_gap": ({"prompt": "max(1,2,3)=", "responses": ["3", "2", "1"], "ranking": [1, 2, 4]}, ["ranking", "gap"]),
}
BAD_LINE = 4


def long_and_short_rows() -> list[dict]:
    """Eight short prompt/completion rows (under 20 tokens) and three long ones (over 60 tokens)."""
    short = [{"prompt": f"max({a},{b})=", "completion": str(max(a, b))} for a, b in [(1, 2), (3, 1), (4, 7), (9, 2), (5, 6), (0, 8), (2, 3), (7, 1)]]
    long = [{"prompt": "Consider these digits carefully: " * 2 + f"max({a},{b})=", "completion": f"{max(a, b)}, clearly " * 3}
            for a, b in [(1, 5), (6, 2), (3, 9)]]
    return short[:4] + long + short[4:]


# ------------------------------------------------------------------------------------------- the runner


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    out: Path | None

    @property
    def summary(self) -> dict:
        return json.loads(self.stdout)

    @property
    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines() if line]

    def explain(self) -> str:
        return f"alignkit {' '.join(self.args)}\nexit {self.returncode}\n--- stderr (tail)\n{self.stderr[-3000:]}"


def _env(cache: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", ALIGNKIT_CACHE=str(cache),
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def cli(*args: str, cache: Path, out: Path | None = None, timeout: float = TIMEOUT_S) -> Run:
    """Run ``alignkit ARGS`` in a subprocess and collect what it printed."""
    argv = [sys.executable, "-m", "alignkit.cli", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env(cache), timeout=timeout)
    return Run(list(args), proc.returncode, proc.stdout, proc.stderr, out)


@dataclass(frozen=True)
class LossCase:
    """Hyperparameters of one loss's run on the max-digit task, and the held-out accuracy it must reach."""

    loss: str
    lr: float
    beta: float
    steps: int = 40
    extra: tuple[str, ...] = ()
    min_accuracy: float = 0.8


LOSS_CASES = {
    "dpo": LossCase("dpo", lr=1e-3, beta=0.1),
    "cdpo": LossCase("cdpo", lr=1e-3, beta=0.1, extra=("label_smoothing=0.1",)),
    "robust": LossCase("robust", lr=1e-3, beta=0.1, extra=("label_smoothing=0.1",)),
    "hinge": LossCase("hinge", lr=1e-3, beta=0.5),
    "ipo": LossCase("ipo", lr=1e-3, beta=0.5),
    "kto": LossCase("kto", lr=1e-3, beta=0.1),
    "orpo": LossCase("orpo", lr=2e-3, beta=0.1, extra=("orpo_lambda=0.5",)),
    "simpo": LossCase("simpo", lr=1e-3, beta=2.0, extra=("gamma=0.5",)),
}
# Variants: LoRA (zero-initialised B needs a larger step) and bf16 autocast.
VARIANT_CASES = {
    "lora": LossCase("dpo", lr=5e-3, beta=0.1, extra=("lora=true", "lora_r=8", "lora_alpha=16", "save_merged=false")),
    "bf16": LossCase("dpo", lr=1e-3, beta=0.1, extra=("precision=bf16",)),
}

# What every preference run shares; the per-run pairs on the command line override it (max_steps and lr on
# purpose, so the config-file test can see that they win).
BASE_YAML = {"model": "tiny", "eval_fraction": 0.2, "batch_size": 16, "progress": False, "max_steps": 1, "lr": 1e-9}


class Runner:
    """Starts CLI runs in the background, a few at a time; ``get(name)`` waits for one."""

    def __init__(self, root: Path, workers: int):
        self.root = root
        self.cache = root / "cache"
        self.pool = ThreadPoolExecutor(workers)
        self.futures: dict[str, Future] = {}
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.closed = False
        self.files = self._write_data()
        self.jobs = self._jobs()

    def _write_data(self) -> dict[str, Path]:
        d = self.root / "data"
        d.mkdir()
        files = {
            "pref": _write_jsonl(d / "max_pairs.jsonl", max_pairs()),
            "sft": _write_jsonl(d / "count.jsonl", count_chats()),
        }
        base = dict(BASE_YAML, data=str(files["pref"]))
        files["base_yaml"] = d / "base.yaml"
        files["base_yaml"].write_text(yaml.safe_dump(base))
        for name in BAD_ROWS:
            files[f"bad:{name}"] = _bad_file(d, name)
        return files

    def _jobs(self) -> dict[str, list[str]]:
        """Job name -> CLI arguments (``output_dir`` is added per job)."""
        f = self.files
        jobs = {}
        for name, case in {**LOSS_CASES, **VARIANT_CASES}.items():
            jobs[f"dpo:{name}"] = ["dpo", "--config", str(f["base_yaml"]), f"loss={case.loss}", f"lr={case.lr}",
                                   f"beta={case.beta}", f"max_steps={case.steps}", *case.extra]
        jobs["sft"] = ["sft", "model=tiny", f"data={f['sft']}", "max_steps=40", "lr=3e-3", "batch_size=16",
                       "eval_fraction=0.25", "eval_steps=10", "progress=false"]
        for name in BAD_ROWS:
            jobs[f"bad:{name}"] = ["dpo", "model=tiny", f"data={f[f'bad:{name}']}", "max_steps=1", "progress=false"]
        return jobs

    def start(self, names) -> None:
        for name in names:
            with self.lock:
                if name in self.futures or self.closed:
                    continue
                self.futures[name] = self.pool.submit(self._run, name)

    def get(self, name: str) -> Run:
        self.start([name])
        return self.futures[name].result()

    def _run(self, name: str) -> Run:
        out = self.root / "runs" / name.replace(":", "_")
        args = [*self.jobs[name], f"output_dir={out}"]
        argv = [sys.executable, "-m", "alignkit.cli", *args]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(self.cache))
        with self.lock:
            if self.closed:
                proc.kill()
            self.procs.add(proc)
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += f"\n[test] killed after {TIMEOUT_S} s"
        finally:
            with self.lock:
                self.procs.discard(proc)
        return Run(args, proc.returncode, stdout, stderr, out)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for proc in self.procs:  # only the processes this runner started
                proc.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)


def needs(*names: str):
    """Mark a test as reading these runs, so they are started in the background with all the others."""

    def mark(fn):
        fn.cli_jobs = names
        return fn

    return mark


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    runner = Runner(tmp_path_factory.mktemp("cli"), workers=min(4, (os.cpu_count() or 2) + 1))
    wanted = []
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module:
            continue
        wanted += getattr(getattr(item, "function", None), "cli_jobs", ())
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "job" in params:
            wanted.append(params["job"])
    runner.start(dict.fromkeys(wanted))  # in the order the tests read them
    yield runner
    runner.close()


def assert_ok(run: Run) -> None:
    assert run.returncode == 0, run.explain()
    assert "Traceback" not in run.stderr, run.explain()


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# ------------------------------------------------------------------------------------------------ SFT


@needs("sft")
def test_sft_learns_and_writes_metrics_config_and_final_model(runs):
    run = runs.get("sft")
    assert_ok(run)

    # metrics.jsonl: one object per optimizer step, with step and loss
    metrics = run.metrics
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert all(math.isfinite(m["loss"]) for m in metrics)

    # held-out loss (every 10 steps) falls, from well below uniform-guessing's ln(260) after 10 steps
    evals = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    assert len(evals) == 4, evals
    assert all(a > b for a, b in zip(evals, evals[1:])), evals
    assert evals[-1] < 0.75 * evals[0] and evals[-1] < 0.5 * math.log(260), evals
    assert run.summary["eval/loss"] == pytest.approx(evals[-1])
    assert mean(m["loss"] for m in metrics[-5:]) < mean(m["loss"] for m in metrics[:5])

    # config.yaml holds the resolved config: every field, command-line values and defaults alike
    saved = yaml.safe_load((run.out / "config.yaml").read_text())
    expected = to_dict(build(SFTConfig, None, run.args[1:]))
    assert saved == expected
    assert saved["lr"] == 3e-3 and saved["max_steps"] == 40 and saved["warmup_steps"] == 0

    # final/ loads with plain transformers, and is the trained model, not the initial one
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.data.collate import collate
    from alignkit.data.tokenize import render_chat, Encoded
    from alignkit.models.loading import tiny_model
    from alignkit.models.logprobs import sequence_logps

    final = run.out / "final"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None and tok.chat_template
    chat = [{"role": "user", "content": "count from 2"}, {"role": "assistant", "content": "2 3 4 5 6"}]
    ids, mask = render_chat(tok, chat)
    batch = collate([Encoded([], [ids], 0, response_masks=[mask])], (0,), tok.pad_token_id)
    with torch.no_grad():
        trained, n = sequence_logps(model, batch)
        initial, _ = sequence_logps(tiny_model(seed=0), batch)
    assert (-trained / n).item() < 0.5 * (-initial / n).item()
    assert json.loads((final / "alignkit.json").read_text())["method"] == "sft"


# ------------------------------------------------------------------------------------- preference losses


def _check_preference_run(run: Run, case: LossCase) -> dict:
    """Assert the run learned the preference; return the numbers for the report."""
    assert_ok(run)
    metrics = run.metrics
    summary = run.summary
    assert [m["step"] for m in metrics] == list(range(1, case.steps + 1))
    before, after = summary["eval_before"], summary["eval_after"]
    k = 5
    if case.loss == "kto":
        # No pairwise accuracy: the desirable (chosen) responses' mean reward must exceed the undesirable ones'
        # by a margin, and that gap must grow, held out and in training.
        def gap(m):
            return m["rewards/chosen"] - m["rewards/rejected"]

        assert "rewards/accuracy" not in after
        assert abs(gap(before)) < 1e-3, before
        assert gap(after) > 0.1, after
        first, last = mean(gap(m) for m in metrics[:k]), mean(gap(m) for m in metrics[-k:])
        assert last > 0.1 and last > 3 * first, (first, last)
        return {"eval_gap_before": gap(before), "eval_gap_after": gap(after), "train_gap_first": first, "train_gap_last": last}
    acc = [m["rewards/accuracy"] for m in metrics]
    first, last = mean(acc[:k]), mean(acc[-k:])
    assert last > first, acc
    assert last >= case.min_accuracy, acc
    assert after["rewards/accuracy"] >= case.min_accuracy, after
    assert after["rewards/accuracy"] > before["rewards/accuracy"], (before, after)
    assert after["rewards/margin"] > before["rewards/margin"], (before, after)
    return {"eval_acc_before": before["rewards/accuracy"], "eval_acc_after": after["rewards/accuracy"],
            "train_acc_first": first, "train_acc_last": last}


@pytest.mark.parametrize("job", [f"dpo:{name}" for name in LOSS_CASES], ids=list(LOSS_CASES))
def test_every_preference_loss_learns_the_max_digit_preference(runs, job):
    case = LOSS_CASES[job.split(":")[1]]
    run = runs.get(job)
    numbers = _check_preference_run(run, case)
    print(job, {k: round(v, 3) for k, v in numbers.items()})
    saved = yaml.safe_load((run.out / "config.yaml").read_text())
    assert saved["loss"] == case.loss and saved["beta"] == case.beta
    assert (run.out / "final" / "model.safetensors").exists()


@needs("dpo:dpo")
def test_config_file_with_command_line_overrides(runs):
    """The preference runs take --config base.yaml; its max_steps=1 and lr=1e-9 are overridden on the command line."""
    run = runs.get("dpo:dpo")
    assert_ok(run)
    saved = yaml.safe_load((run.out / "config.yaml").read_text())
    assert saved["max_steps"] == 40 and saved["lr"] == 1e-3  # command line wins
    assert saved["eval_fraction"] == 0.2 and saved["batch_size"] == 16 and saved["model"] == "tiny"  # from the file
    assert len(run.metrics) == 40


@needs("dpo:bf16")
def test_dpo_with_bf16_autocast(runs):
    numbers = _check_preference_run(runs.get("dpo:bf16"), VARIANT_CASES["bf16"])
    print("bf16", numbers)


@needs("dpo:lora")
def test_dpo_with_lora_saves_an_adapter_on_a_loadable_base(runs):
    import torch
    from peft import PeftModel

    from transformers import AutoTokenizer

    from alignkit.models.loading import load_model
    from alignkit.recipes.dpo import response_logps
    from alignkit.data.formats import PreferenceExample, Origin
    from alignkit.data.tokenize import encode

    run = runs.get("dpo:lora")
    numbers = _check_preference_run(run, VARIANT_CASES["lora"])
    print("lora", numbers)

    final = run.out / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8
    base_name = adapter["base_model_name_or_path"]
    base, _ = load_model(base_name)  # the base the adapter names loads ...
    model = PeftModel.from_pretrained(base, final).eval()  # ... and the adapter goes on it
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.pad_token_id is not None

    # The adapter is the trained one: against the base (adapters off) it prefers the larger digit.
    origin = Origin("toy", 1, 0)
    rows = [encode(PreferenceExample(p["prompt"], p["chosen"], p["rejected"], None, 0, origin), tok, i)
            for i, p in enumerate(max_pairs()[:24])]
    with torch.no_grad():
        lp, _ = response_logps(model, rows, (0, 1), tok.pad_token_id, 1024)
        with model.disable_adapter():
            ref, _ = response_logps(model, rows, (0, 1), tok.pad_token_id, 1024)
    margin = (lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1])
    assert (margin > 0).float().mean().item() >= 0.8, margin


# ------------------------------------------------------------------------------------- config contract


def test_unknown_key_exits_2_and_names_it(tmp_path):
    run = cli("dpo", "model=tiny", "data=x.jsonl", "learning_rate=0.1", cache=tmp_path)
    assert run.returncode == 2, run.explain()
    assert "learning_rate" in run.stderr and "Traceback" not in run.stderr


def test_unknown_key_in_config_file_exits_2_and_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\ndata: x.jsonl\nbogus_key: 3\n")
    run = cli("sft", "--config", str(path), cache=tmp_path)
    assert run.returncode == 2, run.explain()
    assert "bogus_key" in run.stderr and "Traceback" not in run.stderr


def test_bad_value_type_exits_2(tmp_path):
    run = cli("sft", "model=tiny", "data=x.jsonl", "max_steps=abc", cache=tmp_path)
    assert run.returncode == 2, run.explain()
    assert "max_steps" in run.stderr and "abc" in run.stderr and "Traceback" not in run.stderr


def test_invalid_choice_exits_2_and_lists_the_choices(tmp_path):
    run = cli("dpo", "model=tiny", "data=x.jsonl", "loss=foo", cache=tmp_path)
    assert run.returncode == 2, run.explain()
    assert "loss" in run.stderr and "foo" in run.stderr and "Traceback" not in run.stderr
    choices = dict((f.name, f.metadata["choices"]) for f in dataclasses.fields(DPOConfig))["loss"]
    for choice in choices:
        assert choice in run.stderr


def test_help_lists_every_config_field_and_exits_0(tmp_path):
    run = cli("dpo", "--help", cache=tmp_path)
    assert run.returncode == 0, run.explain()
    for f in dataclasses.fields(DPOConfig):
        assert re.search(rf"^\s+{re.escape(f.name)}=", run.stdout, re.M), f"--help does not list {f.name}"
        assert f.metadata["help"] in run.stdout, f"--help does not explain {f.name}"


def test_unknown_command_exits_2(tmp_path):
    run = cli("frobnicate", "model=tiny", cache=tmp_path)
    assert run.returncode == 2, run.explain()
    assert "frobnicate" in run.stderr and "Traceback" not in run.stderr


def test_console_script_entry_point(tmp_path):
    exe = shutil.which("alignkit")
    if exe is None:
        pytest.skip("the alignkit console script is not on PATH")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("alignkit ")


# ------------------------------------------------------------------------------------------ bad data


def _bad_file(directory: Path, name: str) -> Path:
    row = BAD_ROWS[name][0]
    return _write_jsonl(directory / f"bad_{name}.jsonl", [GOOD] * (BAD_LINE - 1) + [row, GOOD])


def _check_bad_row_error(name: str, path: Path, returncode: int, stderr: str) -> None:
    assert returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert f"{path}:{BAD_LINE}:" in stderr, stderr
    message = next(line for line in stderr.splitlines() if line.startswith("alignkit: error:"))
    for word in BAD_ROWS[name][1]:
        assert word in message, message


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_row_exits_2_naming_file_and_line(tmp_path, capsys, name):
    """Every kind of bad row, through the CLI's entry point ``alignkit.cli:main`` in this process (a process
    per kind would spend its seconds importing torch; the next test checks one kind in a real process)."""
    from alignkit.cli import main

    path = _bad_file(tmp_path, name)
    out = tmp_path / "out"
    returncode = main(["dpo", "model=tiny", f"data={path}", "max_steps=1", "progress=false", f"output_dir={out}"])
    _check_bad_row_error(name, path, returncode, capsys.readouterr().err)
    assert not out.exists()  # rejected before anything is written


@needs("bad:wrong_type")
def test_bad_row_in_a_real_process_exits_2(runs):
    run = runs.get("bad:wrong_type")
    _check_bad_row_error("wrong_type", runs.files["bad:wrong_type"], run.returncode, run.stderr)
    assert not (run.out / "final").exists()


def run_in_process(args: list[str], capsys, caplog, out: Path) -> Run:
    """``alignkit ARGS`` through the CLI's entry point ``alignkit.cli:main`` in this process; the log records
    are appended to what was printed on stderr."""
    from alignkit.cli import main

    with caplog.at_level(logging.INFO, logger="alignkit"):
        returncode = main([*args, f"output_dir={out}"])
    printed = capsys.readouterr()
    log = "\n".join(record.getMessage() for record in caplog.records)
    return Run(args, returncode, printed.out, printed.err + "\n" + log, out)


def test_skip_invalid_skips_every_bad_row_and_says_how_many(tmp_path, capsys, caplog):
    """A file with one row of every bad kind among good ones (in process, like the bad-row tests)."""
    mixed = [GOOD]
    for bad_row, _ in BAD_ROWS.values():
        mixed += [bad_row, GOOD]
    path = _write_jsonl(tmp_path / "mixed.jsonl", mixed)
    args = ["dpo", "model=tiny", f"data={path}", "max_steps=1", "batch_size=4", "progress=false"]
    failed = run_in_process(args, capsys, caplog, tmp_path / "strict")
    assert failed.returncode == 2 and f"{path}:2:" in failed.stderr, failed.explain()

    run = run_in_process([*args, "skip_invalid=true"], capsys, caplog, tmp_path / "out")
    assert_ok(run)
    good = 1 + len(BAD_ROWS)
    assert re.search(rf"\b{good} preference pairs from \S*mixed\.jsonl .*\b{len(BAD_ROWS)} rows skipped", run.stderr), run.explain()
    assert run.summary["steps"] == 1 and (run.out / "final").is_dir()


# ----------------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_over_long_rows_are_truncated_or_dropped_and_counted(tmp_path, capsys, caplog, policy):
    """Three of eleven rows are over max_length=32 (in process, like the bad-row tests)."""
    rows = long_and_short_rows()
    n_rows, n_long = len(rows), 3
    path = _write_jsonl(tmp_path / "long_and_short.jsonl", rows)
    args = ["sft", "model=tiny", f"data={path}", "max_length=32", f"truncation={policy}", "max_steps=1",
            "batch_size=4", "progress=false"]
    run = run_in_process(args, capsys, caplog, tmp_path / "out")
    assert_ok(run)
    n_truncated, n_dropped, n_train = (n_long, 0, n_rows) if policy == "truncate" else (0, n_long, n_rows - n_long)
    report = f"over max_length=32: {n_truncated} rows truncated, {n_dropped} dropped (truncation={policy})"
    assert report in run.stderr, run.explain()
    assert f"tiny: {n_train} train rows" in run.stderr, run.explain()


def test_all_rows_dropped_is_a_data_error(tmp_path, capsys, caplog):
    path = _write_jsonl(tmp_path / "long.jsonl", long_and_short_rows()[4:7])
    args = ["sft", "model=tiny", f"data={path}", "max_length=32", "truncation=drop", "max_steps=1", "progress=false"]
    run = run_in_process(args, capsys, caplog, tmp_path / "out")
    assert run.returncode == 2 and "no training rows left" in run.stderr and "Traceback" not in run.stderr, run.explain()
