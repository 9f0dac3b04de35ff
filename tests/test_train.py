"""`tpp train` (tpp.train): every phase on a generated ImageFolder in one process and under torchrun with gloo
(2 ranks select the same filters and end with the same weights); a run killed mid-regularization or mid-finetuning
resumes to bit-identical weights; a crash while a checkpoint is written leaves the previous one loadable; a checkpoint
of another model or pruning spec is refused; AMP's GradScaler unscales before the regularizer; the recipes hold the
paper's settings; --compile compiles the model and the pruned one, --amp none turns TF32 off, checkpoints by wall
time change no result, DDP gets broadcast_buffers=False and static_graph (background checkpoint writing itself:
test_async_checkpoint.py)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tpp import TPPRegularizer, load_pruned
from tpp.models import build_model
from tpp.pipeline import evaluate
from tpp.recipes import RECIPES, get_recipe, recipe_from_dict
from tpp.train import checkpoint as C
from tpp.train.data import ResumableDistributedSampler, SeededSamples, ShardSampler, sample_seed
from tpp.train.distributed import DistEnv, agree, digest
from tpp.train.engine import Engine
from tpp.train.logs import to_yaml
from tpp.train.run import main

ROOT = Path(__file__).resolve().parents[1]
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 16, 4
REG_ITERS = 28           # the smoke recipe: 4 growth + 24 stabilize iterations
EPOCH_ITERS = 6          # 48 images / batch 8
FINETUNE_ITERS = 2 * EPOCH_ITERS


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    """A tiny ImageNet-layout folder: 3 classes of random 24×24 JPEGs, each class tinted its own colour."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.zeros((24, 24, 3))
                img[..., c] = 150
                img = np.clip(img + rng.normal(0, 60, img.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The 'pretrained' model to prune: a seeded ResNet20 with 3 classes, as a state_dict file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet20.pt"
    torch.save(build_model("resnet20", num_classes=CLASSES).state_dict(), path)
    return path


def _args(imagefolder, weights, out, *extra):
    return ["smoke", "--data-root", str(imagefolder), "--weights", str(weights), "--out", str(out),
            "--image-size", "16", "--batch-size", "8", "--eval-batch-size", "12", "--device", "cpu", "--workers", "0",
            "--quiet", *extra]


def _final_state(out: Path) -> dict:
    return torch.load(out / "pruned.pt", weights_only=True)["state_dict"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def full_run(imagefolder, weights, tmp_path_factory):
    """One uninterrupted run (the reference of the resume tests)."""
    out = tmp_path_factory.mktemp("runs") / "full"
    assert main(_args(imagefolder, weights, out, "--checkpoint-every", "4", "--finetune-checkpoint-every", "2",
                      "--log-every", "3", "--tensorboard")) == 0
    return out


# ------------------------------------------------------------------------------------------- one process
def test_every_phase_and_artifact(full_run):
    files = {p.name for p in full_run.iterdir()}
    assert {"args.yaml", "args.json", "summary.csv", "regularize.csv", "metrics.json", "pruned.pt", "checkpoints",
            "ranks"} <= files
    metrics = json.loads((full_run / "metrics.json").read_text())
    m = metrics["metrics"]
    for when in ("base", "before_removal", "after_removal", "final", "best"):
        assert 0 <= m["accuracy"][when] <= 100
    for when in ("base", "before_removal", "after_removal", "final"):
        assert m["accuracy"][when] <= m["top5"][when] == 100.0        # 3 classes: top-5 is every class
    # zeroed during stabilize: removal changes nothing
    assert m["accuracy"]["after_removal"] == m["accuracy"]["before_removal"]
    assert m["loss"]["after_removal"] == pytest.approx(m["loss"]["before_removal"], rel=1e-5)
    assert m["flops"]["speedup"] > 1.5 and metrics["recipe"] == "smoke"
    assert metrics["pruned"].keys() == {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)}
    reg = metrics["history"]["regularize"]
    assert [r["iteration"] for r in reg] == [*range(3, REG_ITERS, 3), REG_ITERS] and reg[-1]["phase"] == "done"
    assert [r["strength"] for r in reg[:2]] == [0.5, 1.0]                  # Δ = 0.25 per iteration

    lines = (full_run / "summary.csv").read_text().splitlines()
    assert lines[0] == "epoch,lr,train_loss,val_top1,val_top5,val_loss,time_s,images_per_s"
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2"]
    assert len((full_run / "regularize.csv").read_text().splitlines()) == 1 + len(reg)
    settings = json.loads((full_run / "args.json").read_text())
    assert settings["recipe"]["image_size"] == 16 and settings["world_size"] == 1
    assert settings["regularization_iterations"] == REG_ITERS and settings["iterations_per_epoch"] == EPOCH_ITERS
    yaml = (full_run / "args.yaml").read_text()
    assert "recipe:\n  name: smoke\n  model: resnet20\n" in yaml and "world_size: 1\n" in yaml

    try:                                  # --tensorboard: scalars when tensorboard is installed, else a warning
        import torch.utils.tensorboard  # noqa: F401
        has_tensorboard = True
    except ImportError:
        has_tensorboard = False
    assert (full_run / "tb").is_dir() == has_tensorboard

    ckpts = full_run / "checkpoints"
    assert len(C.list_checkpoints(ckpts)) == 2 and (ckpts / "best.pt").is_file()     # keep-last 2, best
    done = C.load_checkpoint(C.list_checkpoints(ckpts)[-1])
    assert done["stage"] == "done" and done["identity"]["model"] == "resnet20"
    best = C.load_checkpoint(ckpts / "best.pt")
    assert best["best_score"] == max(r["test_acc"] for r in metrics["history"]["finetune"])
    assert json.loads((ckpts / "best.json").read_text())["best_score"] == best["best_score"]

    model = load_pruned(build_model("resnet20", num_classes=CLASSES), full_run / "pruned.pt")
    assert sum(p.numel() for p in model.parameters()) == m["params"]["pruned"]
    rank = json.loads((full_run / "ranks" / "rank0.json").read_text())
    assert rank["model_sha256"] == digest(model.state_dict())


def test_pruned_model_scores_what_the_run_measured(full_run, imagefolder):
    from tpp.train.data import build_datasets

    _, val = build_datasets("imagefolder", str(imagefolder), 16)
    model = load_pruned(build_model("resnet20", num_classes=CLASSES), full_run / "pruned.pt")
    loader = torch.utils.data.DataLoader(val, batch_size=12)
    final = json.loads((full_run / "metrics.json").read_text())["metrics"]["accuracy"]["final"]
    assert evaluate(model, loader)[0] == final


@pytest.mark.parametrize("phase, stop_after, resumes_at", [
    ("regularize", 11, ("regularize", 8)),                              # checkpoints every 4 iterations, a loss
                                                                        # history entry every 3
    ("finetune", REG_ITERS + EPOCH_ITERS + 3, ("finetune", (1, 2))),    # epoch 1 done, 2 batches of epoch 2
])
def test_killed_run_resumes_bit_exactly(full_run, imagefolder, weights, tmp_path, monkeypatch, phase, stop_after,
                                        resumes_at):
    out = tmp_path / "run"
    args = _args(imagefolder, weights, out, "--checkpoint-every", "4", "--finetune-checkpoint-every", "2",
                 "--log-every", "3")
    if phase == "regularize":            # slow background writes: the stopped run waits for the last one
        real_write = C._write
        monkeypatch.setattr(C, "_write", lambda state, path: (time.sleep(0.3), real_write(state, path))[1])
    assert main([*args, "--stop-after-iters", str(stop_after)]) == 0          # a requested stop is no failure
    monkeypatch.undo()
    assert not (out / "pruned.pt").exists()
    latest = C.load_checkpoint(C.list_checkpoints(out / "checkpoints")[-1])
    assert latest["stage"] == resumes_at[0]
    if phase == "regularize":
        assert latest["iteration"] == resumes_at[1] and latest["regularizer"]["iteration"] == resumes_at[1]
        assert latest["data"] == {"epoch": 1, "batch": 2}                 # 8 batches of 6 per pass
    else:
        assert (latest["epoch"], latest["finetune_position"]["batch"]) == resumes_at[1]
    assert main([*args, "--resume", "auto"]) == 0
    _assert_same_weights(_final_state(out), _final_state(full_run))
    mine, ref = (json.loads((d / "metrics.json").read_text()) for d in (out, full_run))
    assert mine["history"]["finetune"] == [dict(r, time_s=m["time_s"]) for r, m in
                                           zip(ref["history"]["finetune"], mine["history"]["finetune"])]
    assert mine["history"]["regularize"] == ref["history"]["regularize"]


def test_crash_while_saving_leaves_the_previous_checkpoint(full_run, imagefolder, weights, tmp_path, monkeypatch):
    """os.replace fails on the 4th checkpoint (the temporary file is complete): the run dies, the 3rd checkpoint
    is intact, no temporary file is left, and resuming from it reproduces the uninterrupted run."""
    out = tmp_path / "run"
    args = _args(imagefolder, weights, out, "--checkpoint-every", "4", "--finetune-checkpoint-every", "2")
    real_replace, calls = os.replace, {"n": 0}

    def failing_replace(src, dst):
        if Path(dst).name.startswith("ckpt-"):
            calls["n"] += 1
            if calls["n"] == 4:
                raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        main(args)
    monkeypatch.setattr(os, "replace", real_replace)
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["ckpt-000002-regularize-it0000004.pt", "ckpt-000003-regularize-it0000008.pt"]
    assert C.load_checkpoint(out / "checkpoints" / files[-1])["iteration"] == 8
    assert main([*args, "--resume", "auto"]) == 0
    _assert_same_weights(_final_state(out), _final_state(full_run))


def test_compile_and_fp32_arithmetic(full_run, imagefolder, weights, tmp_path, monkeypatch):
    """--compile aot_eager --amp none: the training module is torch.compile-d, and compiled again after removal (the
    pruned model); aot_eager keeps eager arithmetic, so the run ends with the uncompiled run's weights; --amp none
    turns TF32 off for cuDNN convolutions and cuBLAS matmuls (the flags are global: restored after)."""
    real_compile, compiled, graphs = torch.compile, [], []

    def recording_backend(gm, example_inputs):          # what dynamo captured; runs it eagerly
        graphs.append(gm)
        return gm.forward

    def spy(net, backend):
        compiled.append((backend, sum(p.numel() for p in net.parameters())))
        return real_compile(net, backend=recording_backend)

    monkeypatch.setattr(torch, "compile", spy)
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        out = tmp_path / "compiled"
        assert main(_args(imagefolder, weights, out, "--compile", "aot_eager", "--amp", "none",
                          "--backend", "torch")) == 0
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    params = json.loads((full_run / "metrics.json").read_text())["metrics"]["params"]
    assert compiled == [("aot_eager", params["base"]), ("aot_eager", params["pruned"])]
    assert len(graphs) >= 2                          # the forward of each model went through the compiler
    _assert_same_weights(_final_state(out), _final_state(full_run))


def test_wall_time_cadence_checkpoints_without_changing_the_run(full_run, imagefolder, weights, tmp_path):
    """--checkpoint-minutes 1e-6: a checkpoint after every step (written in the background, each waiting for the one
    before); the weights are those of the run checkpointed by iterations."""
    out = tmp_path / "often"
    assert main(_args(imagefolder, weights, out, "--checkpoint-minutes", "0.000001", "--keep-last", "1")) == 0
    (last,) = C.list_checkpoints(out / "checkpoints")
    # start, every regularization step but the last, removed, every finetuning step, 2 epochs, done
    assert int(last.name.split("-")[1]) == 1 + (REG_ITERS - 1) + 1 + FINETUNE_ITERS + 2 + 1
    assert C.load_checkpoint(last)["stage"] == "done"
    _assert_same_weights(_final_state(out), _final_state(full_run))


def test_ddp_does_not_broadcast_buffers_and_takes_static_graph():
    """Engine.wrap builds DDP with broadcast_buffers=False (Engine.sync broadcasts them where they are read) and the
    static_graph asked for; a one-process gloo group stands for the world of two the engine is told about."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = build_model("resnet20", num_classes=3)
        for static in (False, True):
            engine = Engine(DistEnv(0, 2, 0, 2, torch.device("cpu"), "gloo"), static_graph=static)
            net = engine.wrap(model)
            assert isinstance(net, torch.nn.parallel.DistributedDataParallel)
            assert net.broadcast_buffers is False and net.static_graph is static
    finally:
        dist.destroy_process_group()


def test_wall_time_cadence_asks_rank_zero_clock():
    engine = Engine(DistEnv(), checkpoints=C.CheckpointManager("unused"), checkpoint_minutes=1.0)
    assert not engine.checkpoint_due()                     # a minute has not passed
    engine.last_save -= 61.0
    assert engine.checkpoint_due()
    assert not Engine(DistEnv(), checkpoints=None, checkpoint_minutes=1.0).checkpoint_due()
    sparse = Engine(DistEnv(), checkpoints=C.CheckpointManager("unused"), checkpoint_minutes=1.0, poll_every=3)
    sparse.last_save -= 61.0
    assert [sparse.checkpoint_due() for _ in range(6)] == [False, False, True, False, False, True]


def test_checkpoint_of_another_model_or_spec_is_refused(full_run, imagefolder, weights, tmp_path, capsys):
    out = tmp_path / "other"
    torch.manual_seed(0)
    w32 = tmp_path / "resnet32.pt"
    torch.save(build_model("resnet32", num_classes=CLASSES).state_dict(), w32)
    ckpt = C.list_checkpoints(full_run / "checkpoints")[0]
    before = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    capsys.readouterr()
    code = main(_args(imagefolder, w32, out, "--model", "resnet32", "--resume", str(ckpt)))
    err = capsys.readouterr().err
    assert code == 2 and "another architecture" in err and "'resnet20'" in err and "'resnet32'" in err
    code = main(_args(imagefolder, weights, out, "--ratio", "*layer*.conv1:0.3", "--resume", str(ckpt)))
    err = capsys.readouterr().err
    assert code == 2 and "another pruning spec" in err and "0.3" in err
    assert not out.exists()                                           # refused before anything was written
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == before


def test_bad_input_exits_2_and_writes_nothing(imagefolder, weights, tmp_path, capsys, full_run):
    out = tmp_path / "bad"
    cases = [
        (["nope", "--out", str(out)], "unknown recipe 'nope'"),
        (_args(imagefolder, weights, out, "--batch-size", "0"), "multiple"),
        (_args(imagefolder, weights, out, "--ratio", "1.5"), "[0, 1)"),
        (_args(imagefolder, weights, out, "--ratio", "nothing*:0.5"), "matches no"),
        (_args(imagefolder, tmp_path / "missing.pt", out), "no such file"),
        (_args(imagefolder, weights, out, "--method", "magic"), "unknown method"),
        (["resnet56-cifar10-0.5", "--data-root", str(tmp_path), "--out", str(out), "--device", "cpu"],
         "cifar10"),
        (_args(imagefolder, weights, full_run), "--resume auto"),        # a run folder with checkpoints
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, (argv, message)
        assert not out.exists()


# ----------------------------------------------------------------------------------------------- torchrun
def _torchrun(args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tpp.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(imagefolder, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    args = [a for a in _args(imagefolder, weights, out, "--checkpoint-every", "4") if a != "--quiet"]
    proc = _torchrun(args)                        # not quiet: rank 0 logs and prints progress
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_torchrun_two_ranks_agree(ddp_run, full_run):
    out, proc = ddp_run
    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["pruned_sha256"] == ranks[1]["pruned_sha256"]
    assert ranks[0]["model_sha256"] == ranks[1]["model_sha256"]
    assert ranks[0]["final_top1"] == ranks[1]["final_top1"]
    # the same filters as one process picks from the same weights (selection is rank-independent)
    single = json.loads((full_run / "ranks" / "rank0.json").read_text())
    assert ranks[0]["pruned_sha256"] == single["pruned_sha256"]
    assert digest(_final_state(out)) == ranks[0]["model_sha256"]
    settings = json.loads((out / "args.json").read_text())
    assert settings["world_size"] == 2 and settings["batch_size_per_process"] == 4
    assert settings["iterations_per_epoch"] == EPOCH_ITERS                    # 48 images / (2 × 4)
    assert "[rank 0/2] INFO smoke: resnet20" in proc.stderr and "[rank 1/2] INFO" not in proc.stderr
    assert "finetune | [####################] 12/12" in proc.stderr and "img/s" in proc.stderr


def test_torchrun_resume_after_kill_is_exact(ddp_run, imagefolder, weights, tmp_path):
    """...also with DDP's static_graph, which changes no result."""
    out = tmp_path / "run"
    args = _args(imagefolder, weights, out, "--checkpoint-every", "4", "--static-graph")
    proc = _torchrun([*args, "--stop-after-iters", "10"])
    assert proc.returncode == 0 and "--stop-after-iters" in proc.stderr          # torchrun: no failed job
    assert f"continue with: python -m tpp.train smoke --data-root {imagefolder}" in proc.stderr
    assert "--resume auto" in proc.stderr
    assert C.load_checkpoint(C.list_checkpoints(out / "checkpoints")[-1])["iteration"] == 8
    proc = _torchrun([*args, "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_weights(_final_state(out), _final_state(ddp_run[0]))
    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["model_sha256"] == ranks[1]["model_sha256"]


# -------------------------------------------------------------------------------------------------- units
def test_atomic_save_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    manager = C.CheckpointManager(tmp_path, keep_last=2)
    first = manager.save({"x": torch.arange(3)}, "iteration", "a")

    def partial_save(obj, f):
        f.write(b"PK\x03\x04 truncated")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(C.torch, "save", partial_save)
    with pytest.raises(RuntimeError, match="mid-write"):
        manager.save({"x": torch.arange(5)}, "iteration", "b")
    monkeypatch.undo()
    assert C.list_checkpoints(tmp_path) == [first]
    assert torch.equal(C.load_checkpoint(first)["x"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == [first.name]            # no temporary file left
    # a writer killed hard leaves its temporary file: the next manager removes it and numbers on
    (tmp_path / ".ckpt-000009-x.pt.tmp-123").write_bytes(b"junk")
    again = C.CheckpointManager(tmp_path, keep_last=2)
    assert not (tmp_path / ".ckpt-000009-x.pt.tmp-123").exists()
    assert again.save({"x": 1}, "iteration", "c").name == "ckpt-000002-c.pt"


def test_overwrite_starts_over(full_run, imagefolder, weights, tmp_path):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(full_run, out)
    old_best = C.load_checkpoint(out / "checkpoints" / "best.pt")
    assert main(_args(imagefolder, weights, out, "--overwrite", "--ratio", "*layer*.conv1:0.3",
                      "--finetune-epochs", "1")) == 0
    kept = [C.load_checkpoint(p) for p in C.list_checkpoints(out / "checkpoints")]
    assert len(kept) == 2 and all("0.3" in k["identity"]["ratio"] for k in kept)   # only the new run's
    best = C.load_checkpoint(out / "checkpoints" / "best.pt")
    assert "0.3" in best["identity"]["ratio"] != old_best["identity"]["ratio"]


def test_keep_last_and_best(tmp_path):
    manager = C.CheckpointManager(tmp_path, keep_last=2)
    for epoch, acc in enumerate([50.0, 70.0, 60.0, 65.0], 1):
        manager.save({"history": {"finetune": [{"test_acc": acc}]}, "epoch": epoch}, "epoch")
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["ckpt-000003-epoch.pt", "ckpt-000004-epoch.pt"]
    best = C.load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 2 and best["best_score"] == 70.0
    assert C.CheckpointManager(tmp_path).best == 70.0                      # remembered across restarts
    assert manager.latest().name == "ckpt-000004-epoch.pt"
    # an unreadable newest file: load_latest falls back to the one before
    manager.latest().write_bytes(b"garbage")
    path, state = manager.load_latest(warn=lambda m: None)
    assert path.name == "ckpt-000003-epoch.pt" and state["epoch"] == 3


def test_identity_check_names_what_differs():
    from tpp.identity import RUN_CHECKPOINT_VERSION, CheckpointMismatch, RunIdentity

    model = build_model("resnet20", num_classes=3)
    mine = RunIdentity.of(model, "tpp", "*:0.5", "", arch="resnet20", num_classes=3)
    state = {"version": RUN_CHECKPOINT_VERSION, **mine.to_state()}
    mine.check(state, "c.pt")
    other = RunIdentity.of(build_model("resnet32", num_classes=3), "tpp", "*:0.5", (), arch="resnet32", num_classes=3)
    with pytest.raises(CheckpointMismatch, match="another architecture.*resnet20.*resnet32"):
        other.check(state, "c.pt")
    with pytest.raises(CheckpointMismatch, match="another pruning spec.*skip"):
        RunIdentity.of(model, "tpp", "*:0.5", "x", arch="resnet20", num_classes=3).check(state, "c.pt")
    with pytest.raises(CheckpointMismatch, match="not a tpp run checkpoint"):
        mine.check({"version": RUN_CHECKPOINT_VERSION, "model": {}}, "c.pt")
    # a tpp 0.1 `tpp train` checkpoint (identity under hooks) and a tpp 0.1 `tpp prune` one (top-level keys, skip as
    # a string, no model name) are read the same way
    v01_train = {"version": 1, "method": "tpp", "ratio": "'*:0.5'", "skip": [], "signature": dict(mine.signature),
                 "hooks": {"identity": {"model": "resnet20", "num_classes": 3, "method": "tpp", "ratio": "'*:0.5'",
                                        "skip": []}}}
    mine.check(v01_train, "c.pt")
    v01_prune = {"version": 1, "method": "tpp", "ratio": "'*:0.5'", "skip": "", "signature": dict(mine.signature)}
    mine.check(v01_prune, "c.pt")
    with pytest.raises(CheckpointMismatch, match="another architecture — tensors missing from it: .*layer1.3.bn1.bias"):
        other.check(v01_prune, "c.pt")


def test_rng_state_roundtrip_through_a_weights_only_file(tmp_path):
    import random

    state = C.rng_state()
    path = C.atomic_save({"rng": state}, tmp_path / "r.pt")
    a = (random.random(), np.random.rand(), torch.rand(3))
    C.set_rng_state(C.load_checkpoint(path)["rng"])
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_sampler_resumes_mid_pass_and_seeds_samples():
    data = list(range(10))
    s = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=7)
    s.set_epoch(3)
    whole = list(s)
    s.set_epoch(3, start=2)
    assert list(s) == whole[2:] and len(s) == 5
    assert all(seed == sample_seed(7, 3, i) for i, seed in whole)
    s.set_epoch(4)
    assert [i for i, _ in s] != [i for i, _ in whole]                       # a new permutation per pass
    other = ResumableDistributedSampler(data, num_replicas=2, rank=0, seed=7)
    other.set_epoch(3)
    assert sorted([i for i, _ in other] + [i for i, _ in whole]) == data     # disjoint shards
    assert list(ShardSampler(5, 2, 1)) == [1, 3] and len(ShardSampler(5, 2, 0)) == 3

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(2)

    ds = SeededSamples(Noisy())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = ds[(1, 123)]
    assert torch.equal(torch.get_rng_state(), before)                      # the caller's RNG is untouched
    torch.rand(5)
    assert torch.equal(ds[(1, 123)], a) and not torch.equal(ds[(1, 124)], a)


def test_grad_scaler_unscales_before_the_regularizer():
    """With a GradScaler (scale 2¹⁰), the step equals the unscaled step: the regularizer's gradients are added to
    true gradients (after unscale_), not to scaled ones."""
    torch.manual_seed(0)
    base = build_model("resnet20", num_classes=3)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    results = []
    for scaled in (False, True):
        model = build_model("resnet20", num_classes=3)
        model.load_state_dict(base.state_dict())
        reg = TPPRegularizer(model, "*layer*.conv1:0.5", backend="torch")
        reg.strength = 1.0
        engine = Engine(DistEnv())
        if scaled:
            engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine.train_step(model, opt, x, y, reg)
        results.append(model.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0]["layer1.0.conv1.weight"], base.state_dict()["layer1.0.conv1.weight"])


def test_amp_bf16_and_channels_last_step_runs_on_cpu():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=3)
    engine = Engine(DistEnv(), amp=torch.bfloat16, channels_last=True, label_smoothing=0.1)
    model = engine.place(model, torch.device("cpu"))
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    reg = TPPRegularizer(model, "*layer*.conv1:0.5", backend="torch")
    reg.strength = 1.0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = engine.inputs(torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,)), torch.device("cpu"))
    assert x.is_contiguous(memory_format=torch.channels_last)
    loss = engine.train_step(model, opt, x, y, reg)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.conv1.weight.dtype == torch.float32                       # master weights stay fp32


def test_agree_and_digest():
    env = DistEnv()
    assert agree("x", {"a": torch.ones(2)}, env) == digest({"a": torch.ones(2)})
    assert digest(torch.ones(2, 3, 4, 5)) == digest(torch.ones(2, 3, 4, 5).to(memory_format=torch.channels_last))
    assert digest({"a": torch.ones(2)}) != digest({"a": torch.ones(2, dtype=torch.float64)})
    assert digest([1, 2]) != digest([2, 1])


def test_yaml_emitter():
    text = to_yaml({"a": 1, "b": [1, "x"], "c": {"d": None, "e": "yes", "f": "*layer*:0.5"}, "g": [], "h": 0.5,
                    "i": True, "j": [{"k": 1}]})
    assert text == ('a: 1\nb:\n  - 1\n  - x\nc:\n  d: null\n  e: "yes"\n  f: "*layer*:0.5"\ng: []\nh: 0.5\n'
                    'i: true\nj:\n  - k: 1\n')


# ------------------------------------------------------------------------------------------------ recipes
def test_recipes_hold_the_paper_settings():
    names = list(RECIPES)
    assert [n for n in names if n.startswith("resnet56")] == [f"resnet56-cifar10-{r}" for r in
                                                              (0.3, 0.5, 0.7, 0.9, 0.95)]
    assert [n for n in names if n.startswith("vgg19")] == [f"vgg19-cifar100-{r}" for r in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert [n for n in names if "-imagenet-" in n] == ["resnet34-imagenet-1.32x"] + [
        f"resnet50-imagenet-{s}" for s in ("1.49x", "2.31x", "2.56x", "3.06x")]
    for r in RECIPES.values():
        if not r.expected:               # the smoke check and the generic cifar/imagenet/demo settings
            continue
        assert (r.method, r.reg_lr, r.momentum, r.finetune_lr, r.lr_gamma, r.lr_schedule) == \
            ("tpp", 1e-3, 0.9, 1e-2, 0.1, "step")
        assert r.schedule.delta == 1e-4 and r.schedule.ceiling == 1.0 and r.schedule.zero_out_interval == 100
        assert {"base_top1", "top1", "flops_speedup", "source"} <= set(r.expected)
        if r.data == "imagefolder":
            assert (r.schedule.interval, r.schedule.stabilize_iters, r.weight_decay, r.batch_size) == \
                (5, 40_000, 1e-4, 256)
            assert (r.finetune_epochs, r.lr_milestones, r.weights) == (90, (30, 60, 75), "torchvision:IMAGENET1K_V1")
        else:
            assert (r.schedule.interval, r.schedule.stabilize_iters, r.weight_decay) == (10, 10_000, 5e-4)
            assert (r.finetune_epochs, r.lr_milestones) == (120, (60, 90))
            assert r.batch_size == (128 if r.model == "resnet56" else 256)
    assert get_recipe("resnet50-imagenet-2.31x").expected["top1"] == 75.60
    assert get_recipe("vgg19-cifar100-0.9").expected["top1"] == 57.70
    assert get_recipe("resnet56-cifar10-0.9").expected["top1"] == 89.63
    r = get_recipe("resnet50-imagenet-3.06x")
    assert recipe_from_dict(json.loads(r.to_json())) == r
    assert recipe_from_dict({"image_size": 64, "schedule": {"stabilize_iters": 5}}, r).schedule.interval == 5
    with pytest.raises(ValueError, match="unknown recipe keys"):
        recipe_from_dict({"lr": 1}, r)


@pytest.mark.parametrize("family", ["resnet56", "vgg19", "imagenet"])
def test_recipe_layer_sets_reach_the_papers_speedups(family):
    """The pruned architectures of the recipes have the paper's FLOPs speedup (and, on CIFAR, parameter sparsity)."""
    from tpp import prune_model, select_filters
    from tpp.metrics import count_flops, count_params

    recipes = [r for r in RECIPES.values() if r.expected and (r.name.startswith(family) or
                                                               (family == "imagenet" and r.data == "imagefolder"))]
    models = {}
    for r in recipes:
        classes = {"cifar10": 10, "cifar100": 100}.get(r.data, 1000)
        size = r.image_size or 32
        if r.model not in models:
            models[r.model] = build_model(r.model, num_classes=classes), torch.randn(1, 3, size, size)
        model, x = models[r.model]
        pruned = prune_model(model, select_filters(model, r.ratio, r.skip))
        speedup = count_flops(model, x) / count_flops(pruned, x)
        assert speedup == pytest.approx(r.expected["flops_speedup"], rel=0.005 if family == "imagenet" else 0.035), \
            r.name
        if "param_sparsity_pct" in r.expected:
            sparsity = 100 * (1 - count_params(pruned) / count_params(model))
            assert sparsity == pytest.approx(r.expected["param_sparsity_pct"], abs=0.1), r.name


def test_tpp_cli_has_the_train_subcommand(capsys, tmp_path):
    from tpp.cli import main as tpp_main

    assert tpp_main(["train", "--list"]) == 0
    assert "resnet50-imagenet-2.31x" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tpp_main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--compile [BACKEND] torch.compile the training module" in text and "--static-graph" in text
    assert "--checkpoint-minutes CHECKPOINT_MINUTES also checkpoint" in text and "(default: 10.0)" in text
    assert tpp_main(["train", "resnet34-imagenet-1.32x", "--show", "--finetune-epochs", "3"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["finetune_epochs"] == 3 and shown["skip"][0] == "*layer1.0.conv1"
    config = tmp_path / "mine.json"                      # a JSON file of recipe fields on top of a recipe
    config.write_text(json.dumps({"lr_schedule": "cosine", "schedule": {"stabilize_iters": 123}}))
    assert tpp_main(["train", "resnet50-imagenet-2.31x", "--config", str(config), "--label-smoothing", "0.1",
                     "--show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["lr_schedule"], shown["label_smoothing"], shown["schedule"]["stabilize_iters"],
            shown["schedule"]["interval"]) == ("cosine", 0.1, 123, 5)
