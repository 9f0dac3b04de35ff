"""Reproducible runs and what a resume refuses, through the real ``tpp prune`` command on the embedded digits.

A run stopped (``--stop-after-iters``, as if killed) in the regularize or the finetune phase and continued with
``--resume auto`` writes the same ``pruned.pt`` (every tensor, ``torch.equal``) and the same measurements as the
uninterrupted run, whatever the ``--workers`` of either part. A resume that changes a setting that changes the
result exits 2 naming the flag and both values, before anything in the run folder is written.
"""
import json
import shutil

import pytest
import torch

from tpp.cli import main
from tpp.files import save_verified

# digits_cnn from random weights (nothing to pretrain); 18 regularization iterations (growth 2, stabilize 16) over
# 11 batches per pass, so the regularization crosses a pass boundary; 2 finetuning epochs; checkpoints every 2
# regularization and every 3 finetuning iterations
RUN = ["prune", "--model", "digits_cnn", "--data", "digits", "--ratio", "features.3:0.5,features.7:0.5",
       "--method", "tpp", "--weights", "none", "--delta", "0.5", "--stabilize-iters", "16", "--zero-out-interval", "1",
       "--finetune-epochs", "2", "--lr-milestones", "1", "--batch-size", "128", "--jsv-samples", "8", "--quiet",
       "--checkpoint-every", "2", "--finetune-checkpoint-every", "3", "--keep-checkpoint"]
REG_ITERS, EPOCH_ITERS = 18, 11
# what a resumed run cannot reproduce: wall times (also those inside the finetuning history)
UNTIMED = ("time_s", "latency_s")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _results(out):
    """(pruned.pt tensors, metrics.json without wall times) of a finished run folder."""
    saved = torch.load(out / "pruned.pt", weights_only=True)
    data = json.loads((out / "metrics.json").read_text())
    metrics = {k: v for k, v in data["metrics"].items() if k not in UNTIMED}
    history = {"regularize": data["history"]["regularize"],
               "finetune": [{k: v for k, v in r.items() if k != "time_s"} for r in data["history"]["finetune"]]}
    return saved, {"metrics": metrics, "history": history, "pruned": data["pruned"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "whole"
    assert main([*RUN, "--workers", "0", "--out", str(out)]) == 0
    return _results(out)


@pytest.mark.parametrize("stop,stage,workers,resume_workers", [
    (15, "regularize", "0", "0"),                                     # resumes in the 2nd pass over the data
    (15, "regularize", "2", "2"),
    (REG_ITERS + EPOCH_ITERS + 5, "finetune", "0", "0"),              # resumes inside the 2nd finetuning epoch
    (REG_ITERS + EPOCH_ITERS + 5, "finetune", "2", "0"),
], ids=["regularize-w0", "regularize-w2", "finetune-w0", "finetune-w2-then-w0"])
def test_stopped_and_resumed_run_equals_the_uninterrupted_one(stop, stage, workers, resume_workers, uninterrupted,
                                                              tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*RUN, "--workers", workers, "--out", str(out), "--stop-after-iters", str(stop)]) == 0
    hint = capsys.readouterr().err.split("continue with: ")[1]
    assert "--resume auto" in hint and "--stop-after-iters" not in hint
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["stage"] == stage and not (out / "pruned.pt").exists()
    # cadence and logging may change on resume
    assert main([*RUN, "--workers", resume_workers, "--out", str(out), "--resume", "auto", "--checkpoint-every", "5",
                 "--log-interval", "1"]) == 0
    saved, measured = _results(out)
    expected_saved, expected = uninterrupted
    assert saved["pruned"] == expected_saved["pruned"]
    assert saved["state_dict"].keys() == expected_saved["state_dict"].keys()
    differ = [k for k, v in saved["state_dict"].items() if not torch.equal(v, expected_saved["state_dict"][k])]
    assert differ == []
    assert measured == expected


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run folder stopped in the regularize phase."""
    out = tmp_path_factory.mktemp("resume") / "stopped"
    assert main([*RUN, "--out", str(out), "--stop-after-iters", "3"]) == 0
    return out


def _snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}


@pytest.mark.parametrize("flag,value,old", [
    ("--seed", "1", "0"), ("--reg-lr", "0.5", "0.01"), ("--momentum", "0.5", "0.9"),
    ("--weight-decay", "0", "0.0005"), ("--batch-size", "64", "128"), ("--eval-batch-size", "100", "256"),
    ("--delta", "0.25", "0.5"), ("--stabilize-iters", "8", "16"), ("--finetune-lr", "0.5", "0.01"),
    ("--finetune-epochs", "3", "2"), ("--lr-milestones", "2", "[1]"), ("--lr-schedule", "cosine", "'step'"),
    ("--label-smoothing", "0.1", "0.0"), ("--amp", "bf16", "'none'"), ("--jsv-samples", "4", "8"),
])
def test_resume_refuses_a_changed_setting_before_writing(flag, value, old, stopped, capsys):
    before = _snapshot(stopped)
    code = main([*RUN, "--out", str(stopped), "--resume", "auto", flag, value])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("tpp prune: error: ") and len(err.strip().splitlines()) == 1
    assert "other settings, which change the result" in err
    assert f"{flag}: checkpoint {old}, this run " in err, err
    assert _snapshot(stopped) == before                      # config.json, checkpoint.pt: not even touched


def test_checkpoint_without_recorded_settings_still_resumes(stopped, tmp_path):
    """A checkpoint of an earlier tpp (identity without settings) resumes; what it does not record is not
    compared."""
    out = tmp_path / "older"
    shutil.copytree(stopped, out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["identity"]["settings"], state["tpp_checksum"]
    save_verified(state, out / "checkpoint.pt")
    assert main([*RUN, "--out", str(out), "--resume", "auto", "--seed", "3", "--stop-after-iters", "3"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["identity"]["settings"]["seed"] == 3


class _Augmented(torch.utils.data.Dataset):
    """A stand-in for random crops and flips: each sample draws from torch's and Python's RNGs."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        import random

        return torch.rand(3) + random.random() + 10 * i, i


def test_batches_are_a_function_of_seed_and_pass_for_any_workers():
    """The command's training loader: pass e's batches (order and augmentation) depend on (seed, e) only — not on
    the workers, the passes before, or where a resumed pass starts."""
    from tpp.train.data import build_loaders
    from tpp.train.distributed import DistEnv
    from tpp.train.engine import Engine

    def loader(workers):
        return build_loaders(_Augmented(), _Augmented(), 4, 8, rank=0, world_size=1, seed=5, workers=workers,
                             pin_memory=False)[0]

    def pass_of(train_loader, epoch, skip=0):
        return torch.cat([x for x, _ in Engine(DistEnv(), batch_size=4).batches(train_loader, "regularize", epoch,
                                                                                skip)])

    fresh = pass_of(loader(0), 3)
    with_workers = loader(2)
    for epoch in range(3):                          # passes 0-2 first: pass 3 is the same all the same
        pass_of(with_workers, epoch)
    assert torch.equal(pass_of(with_workers, 3), fresh)
    assert torch.equal(pass_of(loader(0), 3, skip=4), fresh[16:])                  # a resumed pass
    assert not torch.equal(pass_of(loader(0), 4), fresh)                           # a new order per pass


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop", [15, REG_ITERS + EPOCH_ITERS + 5], ids=["regularize", "finetune"])
def test_library_run_with_build_loader_resumes_exactly(stop, tmp_path):
    """run_pruning on tpp.data.build_loader loaders (as the demo and the README build them): the training order of
    a pass is a function of (seed, pass), so a resumed call continues exactly too."""
    import copy

    from tpp import run_pruning
    from tpp.data import build_loader, load_digits_split
    from tpp.models import build_model
    from tpp.schedule import GrowingSchedule

    train, test = load_digits_split(seed=0)
    torch.manual_seed(0)
    model = build_model("digits_cnn")
    settings = dict(schedule=GrowingSchedule(delta=0.5, interval=1, stabilize_iters=16, zero_out_interval=1),
                    reg_lr=0.01, finetune_lr=0.01, finetune_epochs=2, lr_milestones=(1,), jsv_samples=0, seed=0,
                    latency=False, checkpoint_every=2, finetune_checkpoint_every=3)

    def run(checkpoint, **kwargs):
        return run_pruning(copy.deepcopy(model), build_loader(train, 128, train=True, seed=0),
                           build_loader(test, 512, train=False), "tpp", "features.3:0.5,features.7:0.5",
                           checkpoint=checkpoint, **settings, **kwargs)

    def stop_at(phase, done, total, info):
        counted["n"] += 1
        if counted["n"] == stop:
            raise _Stop

    whole = run(tmp_path / "whole.pt")
    counted = {"n": 0}
    with pytest.raises(_Stop):
        run(tmp_path / "part.pt", progress=stop_at)
    resumed = run(tmp_path / "part.pt", resume=tmp_path / "part.pt")
    expected = whole.model.state_dict()
    assert [k for k, v in resumed.model.state_dict().items() if not torch.equal(v, expected[k])] == []
    assert resumed.metrics["accuracy"] == whole.metrics["accuracy"]


def test_tpp_train_refuses_other_decoded_pixels_before_writing(tmp_path, capsys):
    """tpp train (args.json, checkpoints/): --decode cpu (PIL) and cpu-tensor decode different pixels; a resume
    switching between them is refused, naming --decode, with the run folder untouched."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in range(2):
            (tmp_path / "data" / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "data" / split / f"c{c}" / f"{i}.jpg")
    out = tmp_path / "run"
    run = ["train", "smoke", "--data-root", str(tmp_path / "data"), "--weights", "none", "--out", str(out),
           "--image-size", "16", "--batch-size", "4", "--eval-batch-size", "4", "--device", "cpu", "--workers", "0",
           "--checkpoint-every", "1", "--quiet"]
    assert main([*run, "--decode", "cpu", "--stop-after-iters", "2"]) == 0
    capsys.readouterr()
    before = {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert main([*run, "--resume", "auto", "--decode", "cpu-tensor"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]     # (after torchvision's decode_jpeg deprecation note)
    assert err.startswith("tpp train: error: ") and "--decode: checkpoint 'cpu', this run 'cpu-tensor|gpu'" in err
    assert {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before


def test_run_stopped_before_its_first_checkpoint_starts_again(uninterrupted, tmp_path, monkeypatch, capsys):
    """A run killed before its first checkpoint (during the base measurements) left its settings and nothing to
    resume from: ``--resume auto`` runs it again, to the uninterrupted run's result; a finished run is still
    refused."""
    import tpp.pipeline

    out = tmp_path / "early"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tpp.pipeline, "run_pruning", killed)
        with pytest.raises(KeyboardInterrupt):
            main([*RUN, "--workers", "0", "--out", str(out)])
    assert (out / "config.json").is_file() and not (out / "checkpoint.pt").exists()
    assert main([*RUN, "--workers", "0", "--out", str(out), "--resume", "auto"]) == 0
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    saved, measured = _results(out)
    expected_saved, expected = uninterrupted
    assert saved["pruned"] == expected_saved["pruned"] and measured == expected
    assert all(torch.equal(v, expected_saved["state_dict"][k]) for k, v in saved["state_dict"].items())
    (out / "checkpoint.pt").unlink()
    assert main([*RUN, "--workers", "0", "--out", str(out), "--resume", "auto"]) == 2
    assert "holds no checkpoint to resume" in capsys.readouterr().err
