"""Checkpoints written in the background (tpp.train.checkpoint): the snapshot is a deep copy (training may change
the model at once), one write at a time in order, a writer's error is raised by the next save or close, a process
killed at random moments leaves only loadable checkpoints, and ``best.json`` gives the best score without reading
``best.pt``."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from tpp.train import checkpoint as C

ROOT = Path(__file__).resolve().parents[1]


def _slow_writes(monkeypatch, seconds=0.2):
    """Every checkpoint write starts ``seconds`` late: the training thread is certainly ahead of the writer."""
    real = C._write

    def slow(state, path):
        time.sleep(seconds)
        return real(state, path)

    monkeypatch.setattr(C, "_write", slow)


def test_snapshot_is_a_deep_copy():
    torch.manual_seed(0)
    state = {"model": {"w": torch.randn(3, 4), "v": torch.randn(5)[1:4]}, "history": [{"a": 1}], "t": (2, [3]),
             "rng": torch.get_rng_state()}
    copy = C.snapshot(state)
    expected = {"w": state["model"]["w"].clone(), "v": state["model"]["v"].clone()}
    state["model"]["w"].add_(1.0)
    state["model"]["v"].zero_()
    state["history"].append({"b": 2})
    state["history"][0]["a"] = 9
    state["t"][1].append(4)
    assert torch.equal(copy["model"]["w"], expected["w"]) and torch.equal(copy["model"]["v"], expected["v"])
    assert copy["history"] == [{"a": 1}] and copy["t"] == (2, [3])
    assert copy["model"]["v"].untyped_storage().nbytes() == 3 * 4          # the view alone, not its base
    # the next snapshot reuses the earlier one's buffers where shape, dtype and strides match — and copies afresh
    again = C.snapshot({**state, "model": {"w": state["model"]["w"], "v": torch.ones(7)}}, into=copy)
    assert again["model"]["w"].data_ptr() == copy["model"]["w"].data_ptr()
    assert torch.equal(again["model"]["w"], state["model"]["w"]) and torch.equal(again["model"]["v"], torch.ones(7))
    assert again["rng"].data_ptr() == copy["rng"].data_ptr() and torch.equal(again["rng"], state["rng"])
    cl = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert C.snapshot(cl).is_contiguous(memory_format=torch.channels_last) and torch.equal(C.snapshot(cl), cl)


def test_background_save_writes_the_state_of_the_moment_of_saving(tmp_path, monkeypatch):
    _slow_writes(monkeypatch)
    manager = C.CheckpointManager(tmp_path, keep_last=2, background=True)
    model = torch.nn.Linear(4, 3)
    history = []
    saved = []
    for step in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)                      # "training" changes the model right after each save
        history.append(step)
        saved.append({k: v.clone() for k, v in model.state_dict().items()})
        t0 = time.perf_counter()
        path = manager.save({"model": model.state_dict(), "history": history, "epoch": step}, "iteration")
        if step == 0:
            assert time.perf_counter() - t0 < 0.15 and not path.exists()     # returned before the write
    manager.close()
    files = C.list_checkpoints(tmp_path)
    assert [p.name for p in files] == ["ckpt-000002-iteration.pt", "ckpt-000003-iteration.pt"]    # keep_last 2
    for path, step in zip(files, (1, 2)):
        state = C.load_checkpoint(path)
        assert state["epoch"] == step and state["history"] == list(range(step + 1))
        for k in saved[step]:
            assert torch.equal(state["model"][k], saved[step][k])


def test_writer_error_is_raised_at_the_next_save_and_at_close(tmp_path, monkeypatch):
    manager = C.CheckpointManager(tmp_path, keep_last=2, background=True)
    first = manager.save({"x": torch.arange(3)}, "iteration", "a")
    manager.wait()
    real_save = torch.save
    attempted = threading.Event()

    def partial_save(obj, f):
        f.write(b"PK\x03\x04 truncated")
        attempted.set()
        raise RuntimeError("disk gone (simulated)")

    monkeypatch.setattr(C.torch, "save", partial_save)
    manager.save({"x": torch.arange(5)}, "iteration", "b")                 # fails in the writer thread
    assert attempted.wait(60)                                              # (the writer has tried, and failed)
    monkeypatch.setattr(C.torch, "save", real_save)
    with pytest.raises(RuntimeError, match="simulated"):
        manager.save({"x": torch.arange(7)}, "iteration", "c")              # ...and is raised here
    assert C.list_checkpoints(tmp_path) == [first]                         # nothing of "c" either
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]      # no temporary file left
    manager.close()                                                        # raised once, not again

    monkeypatch.setattr(C.torch, "save", partial_save)
    single = C.CheckpointFile(tmp_path / "one.pt", background=True)
    single.save({"x": 1}, "iteration")
    with pytest.raises(RuntimeError, match="simulated"):
        single.close()
    assert not (tmp_path / "one.pt").exists()


def test_best_json_is_read_without_loading_best_pt(tmp_path, monkeypatch):
    manager = C.CheckpointManager(tmp_path, keep_last=1, background=True)
    for epoch, acc in enumerate([50.0, 70.0, 60.0], 1):
        manager.save({"history": {"finetune": [{"test_acc": acc}]}, "epoch": epoch}, "epoch")
    manager.close()
    assert C.load_checkpoint(tmp_path / "best.pt")["epoch"] == 2
    assert (tmp_path / "best.json").is_file()

    def no_loading(path):
        raise AssertionError(f"{path} was loaded")

    monkeypatch.setattr(C, "load_checkpoint", no_loading)
    assert C.CheckpointManager(tmp_path).best == 70.0
    monkeypatch.undo()
    # a folder of an older tpp (best.pt only), or a best.json older than best.pt (a writer killed between the two
    # renames): the score comes from best.pt
    stale = tmp_path / "best.json"
    stale.write_text('{"best_score": 10.0}')
    past = (tmp_path / "best.pt").stat().st_mtime_ns - 10**9
    os.utime(stale, ns=(past, past))
    assert C.CheckpointManager(tmp_path).best == 70.0
    stale.unlink()
    assert C.CheckpointManager(tmp_path).best == 70.0
    C.CheckpointManager(tmp_path).reset()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


WRITER = textwrap.dedent("""
    import sys, torch
    from tpp.train.checkpoint import CheckpointManager
    manager = CheckpointManager(sys.argv[1], keep_last=2, background=True)
    weights = torch.zeros(2_000_000)                    # 8 MB: a write takes a while
    step = 0
    while True:
        step += 1
        weights.fill_(step)                             # what the checkpoint of this step must hold
        manager.save({"model": {"w": weights}, "step": step}, "iteration")
        weights.fill_(-1.0)                             # training goes on at once
        if step == 1:
            print("ready", flush=True)
""")


def test_killed_writer_leaves_loadable_checkpoints(tmp_path):
    """SIGKILL at seeded random moments while checkpoints are written in the background (two writers at once):
    every checkpoint file left loads and holds the state of its step, and the next manager clears the temporary file
    and numbers on."""
    rng = random.Random(0)
    folders = [tmp_path / str(i) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(f)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT) for f in folders]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            time.sleep(rng.uniform(0.05, 0.6))
            proc.send_signal(signal.SIGKILL)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
            proc.stdout.close()
    for folder in folders:
        files = C.list_checkpoints(folder)
        assert files, "no checkpoint survived"
        for path in files:
            state = C.load_checkpoint(path)
            assert torch.equal(state["model"]["w"], torch.full((2_000_000,), float(state["step"])))
        manager = C.CheckpointManager(folder, keep_last=2)
        assert not [p for p in folder.iterdir() if p.name.startswith(".")]   # a killed write's temporary file
        path, state = manager.load_latest(warn=pytest.fail)
        assert path == files[-1]
        assert manager.save({"step": 0}, "iteration").name == f"ckpt-{manager.sequence:06d}-iteration.pt"
