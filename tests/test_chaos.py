"""Chaos: training runs killed (``kill -9``, SIGTERM) or starved of disk, then resumed, must equal uninterrupted runs
bit for bit, and no half-written checkpoint may be left where a resume would take it.

``scripts/chaos.py`` does the runs and the checks (its docstring lists them); here a few of its trials run, in
processes forked from a server that imported alignkit once (``--launch fork``), so the module takes about a minute.
The first tests show that the checks themselves catch a one-ulp difference, a flipped weight and a broken
checkpoint, so a passing trial means something.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import chaos  # noqa: E402

LANDED: list[int] = []  # per kill trial: how many of its kills landed inside a checkpoint write


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return chaos.Lab(tmp_path_factory.mktemp("chaos"), chaos.ForkLauncher(), seed=0, log=lambda s: None)


def assert_ok(trial: chaos.Trial) -> None:
    assert not trial.problems, f"{trial.method} {trial.kind} {trial.modes}:\n" + "\n".join(trial.problems)


# ------------------------------------------------------------------------------------------------ the checks can fail


def test_the_checks_catch_an_ulp_a_flipped_weight_and_a_broken_checkpoint(lab, tmp_path):
    ref = lab.reference("sft")
    steps = lab.methods["sft"].steps
    assert chaos.compare_metrics(ref.metrics, ref.metrics, steps) == []
    nudged = [dict(r) for r in ref.metrics]
    nudged[4]["loss"] = math.nextafter(nudged[4]["loss"], math.inf)
    nudged[6]["seconds"] += 1.0  # timings are not compared
    assert [p[:6] for p in chaos.compare_metrics(ref.metrics, nudged, steps)] == ["step 5"]
    assert "not 1..10 once each" in chaos.compare_metrics(ref.metrics, ref.metrics + ref.metrics[-1:], steps)[0]

    import torch
    from safetensors.torch import load_file, save_file

    w = load_file(str(ref.weights))
    name = sorted(w)[0]
    w[name].view(-1).view(torch.int32)[0] ^= 1  # the lowest bit of one number
    save_file(w, str(tmp_path / "model.safetensors"))
    assert "1 tensors differ" in chaos.compare_weights(ref.weights, tmp_path / "model.safetensors")[0]

    ckpts = tmp_path / "checkpoints"
    shutil.copytree(ref.out / "checkpoints", ckpts)
    assert chaos.check_checkpoints(ckpts, ref.template, False) == []
    first, second = sorted(ckpts.glob("step-*"))
    data = (first / "optimizer.pt").read_bytes()
    (first / "optimizer.pt").write_bytes(data[: len(data) // 2])  # cut short, state.json still there
    (second / "rng.pt").unlink()
    problems = chaos.check_checkpoints(ckpts, ref.template, False)
    assert any(f"{first.name} does not load" in p for p in problems)
    assert any(f"{second.name} lacks rng.pt" in p for p in problems)
    assert any(f"list_checkpoints() takes {second.name}" in p for p in problems)


# ------------------------------------------------------------------------------------------------ the trials


@pytest.mark.parametrize("method, modes", [("sft", ["write", "step"]), ("dpo", ["write+"]),
                                           ("grpo", ["write", "rotate"])])
def test_kill_9_and_resume_equals_the_uninterrupted_run(lab, method, modes):
    """Killed once or twice (into a checkpoint write, after a step, right after a checkpoint is renamed into place),
    each time resumed: every step logged once with the reference's metrics, the reference's final weights."""
    trial = lab.kill_trial(method, modes)
    assert_ok(trial)
    assert trial.kills == len(modes) and trial.resumes == len(modes)
    LANDED.append(trial.in_write)


def test_some_kill_landed_inside_a_checkpoint_write():
    """The trials above are only worth something if kills do land inside save(); each 'write' kill comes as soon as
    the checkpoint's temporary directory appears, so at least one of them must."""
    if not LANDED:
        pytest.skip("no kill trial ran")
    assert sum(LANDED) >= 1, LANDED


def test_sigterm_exits_143_after_a_checkpoint_and_resumes_exactly(lab):
    assert_ok(lab.sigterm_trial("sft"))


def _full_disk(lab, method: str, how: str) -> None:
    trial = lab.disk_full_trial(method, how)
    assert not trial.problems, "\n".join(trial.problems)  # including: no traceback, only the message


def test_a_checkpoint_write_failing_with_enospc(lab):
    """The 4th-9th checkpoint's optimizer.pt is half written, then OSError(ENOSPC): exit 1, a message naming the
    newest complete checkpoint and resume=true, no partial directory left, and resume=true reaches the reference."""
    _full_disk(lab, "sft", "inject")


def test_a_full_tmpfs(lab):
    """The same on a real full disk (a tmpfs sized to fill up during a checkpoint; root only), where torch.save
    raises a RuntimeError and safetensors a SafetensorError rather than an OSError."""
    if not chaos.can_mount_tmpfs(lab.work):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    _full_disk(lab, "dpo", "tmpfs")


def test_a_failed_write_is_reported_and_cleaned_up_whatever_the_writer_raises(tmp_path, monkeypatch):
    """save() in-process: the writers' own exception types on a full disk become one OSError naming the newest
    checkpoint, with the partial directory gone, and a stale .tmp-* directory from a killed process is removed."""
    import errno

    import torch
    from safetensors import SafetensorError

    from alignkit.train import checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    checkpoint.save(root, 1, model, opt)
    (root / ".tmp-step-00000002-99999").mkdir()  # a process killed while writing
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    for error, free, code in ((full, 4096, errno.ENOSPC), (torn, 4096, errno.ENOSPC), (torn, 10**9, errno.EIO)):
        def fail(*a, error=error, **k):
            raise error

        monkeypatch.setattr(checkpoint, "save_file", fail)
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p, free=free: SimpleNamespace(free=free))
        with pytest.raises(OSError) as e:
            checkpoint.save(root, 2, model, opt)
        message = str(e.value)
        assert e.value.errno == code and str(error) in message
        assert ("No space left on device" in message) == (code == errno.ENOSPC)
        assert "step-00000002" in message and f"still {root / 'step-00000001'}" in message and "resume=true" in message
        assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    assert json.loads((root / "step-00000001" / "state.json").read_text())["step"] == 1


def test_a_kill_while_an_old_checkpoint_is_deleted_leaves_no_broken_step_directory(tmp_path, monkeypatch):
    """Found by the chaos script: a kill in the middle of deleting the oldest checkpoint left step-00000005 with
    only rng.pt, and without its state.json no later save ever deleted it (with it, it would have been listed)."""
    import torch

    from alignkit.train import checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    checkpoint.save(root, 1, model, opt, keep=2)
    checkpoint.save(root, 2, model, opt, keep=2)

    class Killed(BaseException):
        pass

    real = shutil.rmtree

    def dies_halfway(path, *a, **k):  # deletes one file, then the process is gone
        files = sorted(Path(path).iterdir()) if Path(path).is_dir() else []
        if not files:
            return real(path, *a, **k)
        files[-1].unlink()
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(checkpoint.shutil, "rmtree", dies_halfway)
        with pytest.raises(Killed):
            checkpoint.save(root, 3, model, opt, keep=2)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000003"]
    for d in root.glob("step-*"):
        assert sorted(f.name for f in d.iterdir()) == ["optimizer.pt", "rng.pt", "state.json", "trainable.safetensors"]
    checkpoint.save(root, 4, model, opt, keep=2)  # and the next save clears what the killed one left
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]
