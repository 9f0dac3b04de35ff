"""Faults a hostile world brings, and what tpp guarantees under each (issue 13 items 5, 6, 9):

* a run killed (SIGKILL) at random points leaves a folder whose every file is complete and verified, and that
  ``--resume auto`` finishes; temporary files of killed writes are removed by the next run;
* a full disk (a real tiny tmpfs where the machine allows mounting one, and an injected ``ENOSPC``) leaves the
  previous file intact and no temporary file;
* corrupted and truncated ``pruned.pt``, ``checkpoint.pt``, ``ckpt-*.pt`` and ``best.pt`` are clear errors naming the
  file (a flipped bit inside a tensor used to load silently);
* a non-finite loss/gradient stops the run with exit status 3 naming the first bad iteration exactly and the last
  good checkpoint; no model is written from it; every JSON file is strict; the guard never reads the host per step;
* every file ``tpp prune`` writes is renamed into place (written atomically).
"""
import errno
import io
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import tpp.files
from tpp import GrowingSchedule, load_pruned, save_pruned
from tpp.cli import main
from tpp.data import build_loader, load_digits_split
from tpp.files import (
    DIGEST_KEY,
    load_verified,
    remove_stale_temporaries,
    save_verified,
    write_json,
    write_text_atomic,
)
from tpp.guard import EXIT_NON_FINITE, FiniteGuard, NonFiniteError
from tpp.loop import TrainHooks
from tpp.models import build_model, digits_cnn
from tpp.pipeline import run_pruning
from tpp.train.checkpoint import CheckpointFile, CheckpointManager, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CNN = ["--model", "digits_cnn", "--data", "digits", "--ratio", "features.3:0.5,features.7:0.5", "--method", "tpp"]
TINY = ["--delta", "0.5", "--stabilize-iters", "4", "--zero-out-interval", "1", "--lr-milestones", "1",
        "--batch-size", "128", "--jsv-samples", "8", "--quiet", "--threads", "1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def _weights(folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / "w.pt"
    torch.save(digits_cnn().state_dict(), path)
    return path


def _check_folder(out: Path) -> set:
    """Every complete-named file of a run folder is whole: .pt verified, JSON strict, PNG ends with IEND, text ends
    with a newline. Returns the names of temporary files (killed writes) found."""
    temporaries = set()
    for p in out.rglob("*"):
        if not p.is_file():
            continue
        if tpp.files.TEMPORARY.match(p.name):
            temporaries.add(p.relative_to(out))
        elif p.name == "pruned.pt":
            load_pruned(p)
        elif p.suffix == ".pt":
            state = load_checkpoint(p)
            assert p.name == "w.pt" or DIGEST_KEY in torch.load(p, weights_only=True), p
            assert isinstance(state, dict)
        elif p.suffix == ".json":
            _strict_json(p)
        elif p.suffix == ".png":
            assert p.read_bytes()[-8:-4] == b"IEND", p
        elif p.suffix in (".md", ".csv"):
            assert p.read_text().endswith("\n"), p
    return temporaries


# ------------------------------------------------------------------------------------------------ kill loops
def test_killed_at_random_points_the_folder_stays_whole_and_resumable(tmp_path, seed):
    """SIGKILL `tpp prune` at random points (after its first checkpoint) up to three times, checking every file
    each time; `--resume auto` then finishes, and removes the temporary files killed writes left (planted ones too)."""
    rng = random.Random(seed)
    weights = _weights(tmp_path)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "tpp", "prune", *CNN, *TINY, "--weights", str(weights), "--out", str(out),
            "--finetune-epochs", "2", "--finetune-checkpoint-every", "3", "--checkpoint-every", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    kills = 0
    for attempt in range(3):
        proc = subprocess.Popen(args + (["--resume", "auto"] if attempt else []), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()
        _check_folder(out)
        finished = (out / "metrics.json").exists() and not (out / "checkpoint.pt").exists()
        if proc.returncode == 0 or finished:  # a kill can land after the run removed its checkpoint, before exit
            break
    assert kills >= 1, "the run finished before the first kill"
    if not (out / "checkpoint.pt").exists():           # it finished before the last kill
        assert (out / "metrics.json").exists() and (out / "pruned.pt").exists()
        return
    planted = [out / ".checkpoint.pt.tmp-999999", out / ".metrics.json.tmp-4242"]
    kept = [out / "notes.tmp-1", out / "mine" / ".x.tmp-1"]             # not tpp's pattern / not tpp's folder
    (out / "mine").mkdir()
    for p in planted + kept:
        p.write_bytes(b"half")
    done = subprocess.run(args + ["--resume", "auto"], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert _check_folder(out) == {Path("mine", ".x.tmp-1")}, "temporary files left"
    assert all(p.exists() for p in kept)
    assert (out / "pruned.pt").exists() and not (out / "checkpoint.pt").exists()
    metrics = _strict_json(out / "metrics.json")
    assert [r["epoch"] for r in metrics["history"]["finetune"]] == [1, 2], kills


def test_remove_stale_temporaries_only_in_the_named_folders(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "other").mkdir()
    stale = [tmp_path / ".a.json.tmp-12", tmp_path / "checkpoints" / ".ckpt-000001-x.pt.tmp-7"]
    kept = [tmp_path / "a.tmp-12", tmp_path / ".a.tmp-x", tmp_path / "other" / ".b.tmp-3", tmp_path / "a.json"]
    for p in stale + kept:
        p.write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path, ("checkpoints", "missing"))) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


# ------------------------------------------------------------------------------------------------ full disks
class _FullDisk(io.FileIO):
    """A file on a disk that fills up: the first write stores half its bytes, then ENOSPC."""

    def write(self, data):
        data = bytes(data)
        super().write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _writers(tmp_path):
    model = digits_cnn()
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    return {
        "write_json": (tmp_path / "m.json", lambda i: write_json(tmp_path / "m.json", {"i": i})),
        "write_text_atomic": (tmp_path / "r.md", lambda i: write_text_atomic(tmp_path / "r.md", f"{i}\n")),
        "save_verified": (tmp_path / "c.pt", lambda i: save_verified({"w": torch.full((9,), float(i))},
                                                                     tmp_path / "c.pt")),
        "save_pruned": (tmp_path / "pruned.pt", lambda i: save_pruned(model, {}, tmp_path / "pruned.pt",
                                                                      extra={"i": i})),
        "CheckpointFile": (tmp_path / "checkpoint.pt",
                           lambda i: CheckpointFile(tmp_path / "checkpoint.pt").save({"i": i}, "epoch")),
        "CheckpointManager": (tmp_path / "checkpoints" / "best.pt",
                              lambda i: manager.save({"history": {"finetune": [{"test_acc": float(i)}]}}, "epoch")),
    }


@pytest.mark.parametrize("writer", ["write_json", "write_text_atomic", "save_verified", "save_pruned",
                                    "CheckpointFile", "CheckpointManager"])
def test_a_full_disk_leaves_the_previous_file(writer, tmp_path, monkeypatch):
    path, write = _writers(tmp_path)[writer]
    write(1)
    before = {p: p.read_bytes() for p in path.parent.iterdir()}
    monkeypatch.setattr(tpp.files, "open", lambda file, mode: _FullDisk(file, "w"), raising=False)
    with pytest.raises(OSError) as err:
        write(2)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in path.parent.iterdir()} == before        # no temporary file, nothing changed
    if path.suffix == ".pt" and writer != "save_pruned":
        load_checkpoint(path)


_TMPFS_SCRIPT = r"""
import errno, os, sys, torch
from tpp.files import load_verified, save_verified, write_json
d = sys.argv[1]
print("mounted", flush=True)
save_verified({"w": torch.arange(1000.0)}, os.path.join(d, "c.pt"))
write_json(os.path.join(d, "m.json"), {"ok": True})
for write in (lambda: save_verified({"w": torch.zeros(200_000)}, os.path.join(d, "c.pt")),
              lambda: write_json(os.path.join(d, "m.json"), {"big": "x" * 600_000})):
    try:
        write()
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    else:
        raise SystemExit("no ENOSPC on a full tmpfs")
assert torch.equal(load_verified(os.path.join(d, "c.pt"))["w"], torch.arange(1000.0))
assert open(os.path.join(d, "m.json")).read() == '{\n  "ok": true\n}\n'
assert sorted(os.listdir(d)) == ["c.pt", "m.json"], os.listdir(d)
print("ok")
"""


def test_a_real_full_tmpfs_leaves_the_previous_file(tmp_path):
    """A 256 KiB tmpfs in a private mount namespace (``unshare -rm``; skipped where the machine does not allow it)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare: the injected ENOSPC tests cover this")
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=256k tmpfs "$0" && exec "$1" -c "$2" "$0"',
           str(disk), sys.executable, _TMPFS_SCRIPT]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if "mounted" not in done.stdout:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:200]}): the injected ENOSPC tests cover this")
    assert done.returncode == 0 and done.stdout.endswith("ok\n"), done.stdout + done.stderr


# ------------------------------------------------------------------------------------ corrupted and truncated
def _flip_a_tensor_bit(path: Path, rng: random.Random) -> None:
    """Flip one bit inside the largest tensor record of a torch zip file (not its headers)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + rng.randrange(info.file_size)] ^= 1 << rng.randrange(8)
    path.write_bytes(raw)


def _truncate(path: Path, rng: random.Random) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: rng.randrange(1, len(raw))])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A whole `tpp prune` run (kept checkpoint), with every rename recorded: (folder, renamed paths)."""
    folder = tmp_path_factory.mktemp("finished")
    out = folder / "run"
    renamed = set()
    real = os.replace

    def spy(src, dst, *a, **k):
        real(src, dst, *a, **k)
        renamed.add(Path(dst).resolve())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", spy)
        code = main(["prune", *CNN, *TINY, "--finetune-epochs", "1", "--weights", str(_weights(folder)),
                     "--out", str(out), "--keep-checkpoint"])
    assert code == 0
    return out, renamed


def test_every_file_of_a_run_is_written_atomically_and_verified(finished):
    out, renamed = finished
    files = {p.resolve() for p in out.rglob("*") if p.is_file()}
    assert {p.name for p in files} >= {"config.json", "metrics.json", "summary.csv", "regularize.csv", "report.md",
                                       "pruned.pt", "checkpoint.pt", "accuracy.png"}
    assert files <= renamed, f"not renamed into place: {sorted(str(p) for p in files - renamed)}"
    assert not _check_folder(out)
    for name in ("pruned.pt", "checkpoint.pt"):
        assert DIGEST_KEY in torch.load(out / name, weights_only=True)


@pytest.mark.parametrize("damage", [_flip_a_tensor_bit, _truncate])
def test_a_damaged_pruned_model_is_refused(damage, finished, tmp_path, seed, capsys):
    out, _ = finished
    path = tmp_path / "pruned.pt"
    shutil.copy(out / "pruned.pt", path)
    damage(path, random.Random(seed))
    with pytest.raises(ValueError, match="pruned.pt"):
        load_pruned(path)
    with pytest.raises(ValueError, match="pruned.pt"):
        load_pruned(build_model("digits_cnn", num_classes=10), path)
    assert main(["export", str(path), "--format", "torchscript", "--out", str(tmp_path / "m.ts")]) == 2
    assert "pruned.pt" in capsys.readouterr().err and not (tmp_path / "m.ts").exists()


def test_a_flipped_bit_is_named_as_corruption(finished, tmp_path, seed):
    """The finding: a bit flip inside a tensor loaded silently; torch.load alone still does not notice."""
    out, _ = finished
    path = tmp_path / "pruned.pt"
    shutil.copy(out / "pruned.pt", path)
    _flip_a_tensor_bit(path, random.Random(seed))
    torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match=r"pruned\.pt is corrupted: its content does not match the SHA-256"):
        load_pruned(path)


@pytest.mark.parametrize("damage", [_flip_a_tensor_bit, _truncate])
def test_a_damaged_resume_checkpoint_exits_2_naming_it(damage, finished, tmp_path, seed, capsys):
    out, _ = finished
    run = tmp_path / "run"
    shutil.copytree(out, run)
    damage(run / "checkpoint.pt", random.Random(seed))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code = main(["prune", *CNN, *TINY, "--finetune-epochs", "1", "--out", str(run), "--resume", "auto"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("tpp prune: error: --resume") and "checkpoint.pt" in err
    assert "\n" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("damage", [_flip_a_tensor_bit, _truncate])
def test_damaged_numbered_checkpoints_and_best(damage, tmp_path, seed):
    rng = random.Random(seed)
    manager = CheckpointManager(tmp_path, keep_last=3)
    for i in range(3):
        manager.save({"w": torch.randn(64, 64), "history": {"finetune": [{"test_acc": float(i)}]}}, "epoch")
    files = sorted(tmp_path.glob("ckpt-*.pt"))
    damage(files[-1], rng)
    with pytest.raises(ValueError, match=files[-1].name):
        load_checkpoint(files[-1])
    warnings = []
    path, state = CheckpointManager(tmp_path).load_latest(warn=warnings.append)
    assert path == files[-2] and state["history"]["finetune"][0]["test_acc"] == 1.0
    assert len(warnings) == 1 and files[-1].name in warnings[0]
    best = tmp_path / "best.pt"
    best.unlink()                                    # a hard link to the newest: give it its own damaged copy
    shutil.copy(files[-1], best)
    with pytest.raises(ValueError, match="best.pt"):
        load_checkpoint(best)
    assert CheckpointManager(tmp_path).best is None  # an unreadable best.pt is replaced by the next best epoch


def test_files_without_a_checksum_still_load(tmp_path):
    """tpp 0.1 and early 0.2 files carry no checksum: loaded as they are."""
    torch.save({"stage": "done", "w": torch.ones(3)}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["stage"] == "done"
    save_verified({"stage": "done", "w": torch.ones(3)}, tmp_path / "new.pt")
    assert set(load_verified(tmp_path / "new.pt")) == {"stage", "w"}
    with pytest.raises(FileNotFoundError):
        load_verified(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------- guarded training
@pytest.mark.parametrize("command", ["prune", "train"])
def test_a_diverging_run_exits_3_and_writes_no_model(command, tmp_path, capsys):
    """The finding: `--momentum 5` ended with exit 0, an all-NaN pruned.pt and NaN in metrics.json."""
    out = tmp_path / "run"
    code = main([command, *CNN, *TINY, "--finetune-epochs", "1", "--weights", str(_weights(tmp_path)),
                 "--momentum", "5", "--reg-lr", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_NON_FINITE == 3
    assert err.startswith(f"tpp {command}: error: ") and "\n" not in err and "non-finite" in err
    last = out / "checkpoint.pt" if command == "prune" else sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert f"Last good checkpoint: {last} (stage regularize, iteration " in err
    assert not (out / "pruned.pt").exists() and not (out / "metrics.json").exists()
    checkpoints = [out / "checkpoint.pt"] if command == "prune" else sorted((out / "checkpoints").glob("*.pt"))
    assert checkpoints
    for path in checkpoints:
        state = load_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not _check_folder(out)


class _Poisoned:
    """Batches of ``loader`` (every pass) whose ``at``-th batch overall has a NaN input."""

    def __init__(self, batches, at):
        self.data, self.at, self.count = batches, at, 0

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for x, y in self.data:
            self.count += 1
            if self.count == self.at:
                x = x.clone()
                x[0, 0] = float("nan")
            yield x, y


@pytest.fixture(scope="module")
def digits():
    train_set, test_set = load_digits_split(seed=0)
    small_train = TensorDataset(*(t[:256] for t in train_set.tensors))
    small_test = TensorDataset(*(t[:64] for t in test_set.tensors))
    return list(build_loader(small_train, 64, train=True, seed=0)), build_loader(small_test, 64, train=False)


SCHEDULE = GrowingSchedule(delta=0.25, interval=1, stabilize_iters=8, zero_out_interval=1)   # 12 iterations
RUN = dict(schedule=SCHEDULE, finetune_epochs=2, lr_milestones=(), reg_lr=1e-2, jsv_samples=0, seed=0,
           latency=False, log_every=5, checkpoint_every=3)


@pytest.mark.parametrize("phase", ["regularize", "finetune"])
def test_the_guard_names_the_first_bad_iteration_exactly(phase, digits, tmp_path, seed):
    batches, test_loader = digits
    rng = random.Random(seed)
    bad = rng.randint(1, SCHEDULE.total_iters) if phase == "regularize" else rng.randint(1, 2 * len(batches))
    ckpt = tmp_path / "checkpoint.pt"
    at = bad if phase == "regularize" else SCHEDULE.total_iters + bad
    torch.manual_seed(0)
    with pytest.raises(NonFiniteError) as info:
        run_pruning(digits_cnn(), _Poisoned(batches, at), test_loader, "tpp", 0.5, skip=("features.0",),
                    checkpoint=ckpt, **RUN)
    err = info.value
    assert err.iteration == bad and f"at iteration {bad}" in str(err) and "\n" not in str(err)
    state = load_checkpoint(ckpt)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    if phase == "regularize":
        assert err.phase == "regularize" and "the training loss" in str(err)
        assert state["stage"] == "regularize" and state["iteration"] == (bad - 1) // 3 * 3
        assert f"(stage regularize, iteration {state['iteration']})" in str(err)
    else:
        epoch, batch = (bad - 1) // len(batches) + 1, (bad - 1) % len(batches) + 1
        assert err.phase == "finetune" and f"(epoch {epoch}, batch {batch})" in str(err)
        assert state["stage"] == "finetune" and state["epoch"] == epoch - 1
        assert f"(stage finetune, epoch {epoch - 1})" in str(err)


class _SkippingHooks(TrainHooks):
    """Like a GradScaler: the ``at``-th step has an inf gradient and is skipped, not applied."""

    def __init__(self, at, skips):
        self.at, self.steps, self.skips_nonfinite_steps = at, 0, skips

    def backward_step(self, loss, optimizer, regularizer=None):
        loss.backward()
        if regularizer is not None:
            regularizer.apply_gradients()
        self.steps += 1
        if self.steps == self.at:
            optimizer.param_groups[0]["params"][0].grad.fill_(float("inf"))
            if self.skips_nonfinite_steps:
                return
        optimizer.step()


def test_skipped_overflow_steps_do_not_stop_a_run_applied_ones_do(digits, seed):
    batches, test_loader = digits
    at = random.Random(seed).randint(1, SCHEDULE.total_iters)
    result = run_pruning(digits_cnn(), batches, test_loader, "tpp", 0.5, skip=("features.0",),
                         hooks=_SkippingHooks(at, skips=True), **dict(RUN, finetune_epochs=1))
    assert all(math.isfinite(r["loss"]) for r in result.history["regularize"])
    with pytest.raises(NonFiniteError, match="a gradient") as info:
        run_pruning(digits_cnn(), batches, test_loader, "tpp", 0.5, skip=("features.0",),
                    hooks=_SkippingHooks(at, skips=False), **dict(RUN, finetune_epochs=1))
    assert info.value.iteration == at


def test_the_guard_reads_nothing_on_the_host_per_step(monkeypatch):
    guard = FiniteGuard(torch.device("cpu"))
    grads = [torch.randn(5, 3), torch.randn(7)]

    def host_read(*args, **kwargs):
        raise AssertionError("a host read (sync) in FiniteGuard.watch")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"):
            m.setattr(torch.Tensor, name, host_read)
        for i in range(1, 5):
            guard.watch(i, torch.tensor(1.0), grads)
        grads[1][3] = float("nan")
        for i in range(5, 8):
            guard.watch(i, torch.tensor(1.0), grads)
    with pytest.raises(NonFiniteError, match=r"a gradient .* at iteration 5 \(test phase\)") as info:
        guard.check("test")
    assert info.value.iteration == 5


def test_run_json_is_strict(tmp_path):
    write_json(tmp_path / "m.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": (float("-inf"),)})
    assert _strict_json(tmp_path / "m.json") == {"a": None, "b": [None, 1.5], "c": [None]}
