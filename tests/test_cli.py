"""The ``tpp`` command: a whole run on the digits writes every artifact (and the pruned model reloads), resume and
--weights reuse, --overwrite starts from an empty run folder, and every bad input (flags, $TPP_BACKEND, a failed
download, the output folder) exits 2 with one line naming the value and the allowed ones, creating and overwriting
nothing. (Resume's reproducibility and refusals: tests/test_resume.py.)"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpp import load_pruned
from tpp.cli import main
from tpp.data import build_loader, load_digits_split
from tpp.models import build_model
from tpp.pipeline import evaluate

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--delta", "0.5", "--stabilize-iters", "4", "--zero-out-interval", "1", "--finetune-epochs", "1",
        "--lr-milestones", "1", "--batch-size", "128", "--jsv-samples", "8", "--quiet"]
CNN = ["--model", "digits_cnn", "--data", "digits", "--ratio", "features.3:0.5,features.7:0.5"]
ARTIFACTS = {"config.json", "metrics.json", "report.md", "strength_penalty.png", "accuracy.png", "jsv.png",
             "pruned.pt", "pretrained.pt", "summary.csv", "regularize.csv"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tpp_run(tmp_path_factory):
    """One whole `tpp prune` run (pretraining 1 epoch here) with --overwrite into the folder of an earlier run."""
    out = tmp_path_factory.mktemp("runs") / "cnn-tpp"
    (out / "ranks").mkdir(parents=True)
    for stale in ("args.json", "ranks/rank0.json", ".metrics.json.tmp-99", "pruned.onnx"):
        (out / stale).write_text("of an earlier run")
    code = main(["prune", *CNN, "--method", "tpp", "--pretrain-epochs", "1", "--out", str(out), "--overwrite",
                 "--keep-checkpoint", *TINY])
    assert code == 0
    return out


def test_prune_writes_every_artifact(tpp_run, capsys):
    files = {p.name for p in tpp_run.iterdir()}
    assert ARTIFACTS | {"checkpoint.pt"} == files              # nothing of the earlier run is left
    config = json.loads((tpp_run / "config.json").read_text())
    assert config["model"] == "digits_cnn" and config["method"] == "tpp" and config["pretrain_epochs"] == 1
    assert config["recipe"]["name"] == "demo" and config["recipe"]["schedule"]["delta"] == 0.5
    assert config["run"]["reg_iters"] == 6 and config["command"].startswith("tpp prune --model digits_cnn")
    metrics = json.loads((tpp_run / "metrics.json").read_text())
    m = metrics["metrics"]
    assert metrics["method"] == "tpp" and m["flops"]["speedup"] > 1 and m["params"]["pruned"] < m["params"]["base"]
    assert [r["iteration"] for r in metrics["history"]["regularize"]] == list(range(1, 7))
    assert m["accuracy"]["after_removal"] == m["accuracy"]["before_removal"]
    report = (tpp_run / "report.md").read_text()
    assert "![strength_penalty](strength_penalty.png)" in report and "| `features.3` | 16 |" in report
    for png in ("strength_penalty.png", "accuracy.png", "jsv.png"):
        assert (tpp_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "measured latency" in report and m["latency_s"]["base"] > 0 and m["latency_s"]["pruned"] > 0
    # the pruned model reloads from its path alone, or onto the unpruned architecture, and reproduces the final
    # accuracy
    alone = load_pruned(tpp_run / "pruned.pt")
    pruned = load_pruned(build_model("digits_cnn"), tpp_run / "pruned.pt", arch="digits_cnn")
    for k, v in pruned.state_dict().items():
        assert torch.equal(alone.state_dict()[k], v)
    assert pruned.features[3].out_channels == 16 and pruned.features[7].out_channels == 32
    saved = torch.load(tpp_run / "pruned.pt", weights_only=True)
    assert saved["extra"]["method"] == "tpp" and saved["extra"]["data"] == "digits"
    _, test = load_digits_split(seed=0)
    assert evaluate(pruned, build_loader(test, 512, train=False))[0] == pytest.approx(m["accuracy"]["final"])


def test_weights_and_resume_reuse_a_run(tpp_run, tmp_path, capsys):
    out = tmp_path / "l1"
    code = main(["prune", *CNN, "--method", "l1", "--weights", str(tpp_run / "pretrained.pt"), "--out", str(out),
                 *TINY])
    assert code == 0
    files = {p.name for p in out.iterdir()}
    assert files == ARTIFACTS - {"pretrained.pt", "strength_penalty.png"}          # nothing trained or regularized
    base = json.loads((tpp_run / "metrics.json").read_text())["metrics"]["accuracy"]["base"]
    assert json.loads((out / "metrics.json").read_text())["metrics"]["accuracy"]["base"] == base
    assert "l1" in capsys.readouterr().out
    # a finished run (its checkpoint removed) is not started over by --resume auto
    _fails(["prune", *CNN, "--method", "l1", "--weights", str(tpp_run / "pretrained.pt"), "--out", str(out),
            "--resume", "auto", *TINY], capsys, "holds no checkpoint to resume", "--overwrite", out=out)
    # resuming the finished run rewrites its artifacts in its own folder
    before = json.loads((tpp_run / "metrics.json").read_text())["metrics"]["accuracy"]
    code = main(["prune", *CNN, "--method", "tpp", "--resume", str(tpp_run / "checkpoint.pt"), "--keep-checkpoint",
                 *TINY])
    assert code == 0
    code = main(["prune", *CNN, "--method", "tpp", "--out", str(tpp_run), "--resume", "auto", "--keep-checkpoint",
                 *TINY])
    assert code == 0
    assert json.loads((tpp_run / "metrics.json").read_text())["metrics"]["accuracy"] == before
    # a run folder of tpp 0.1: its checkpoint.pt (identity in top-level keys, plain hooks) still resumes
    old = tmp_path / "old-run"
    shutil.copytree(tpp_run, old)
    state = torch.load(old / "checkpoint.pt", weights_only=True)
    del state["identity"], state["tpp_checksum"]                   # tpp 0.1 wrote neither
    state.update(skip=[], hooks={})
    torch.save(state, old / "checkpoint.pt")
    assert main(["prune", *CNN, "--method", "tpp", "--resume", str(old / "checkpoint.pt"), *TINY]) == 0
    assert json.loads((old / "metrics.json").read_text())["metrics"]["accuracy"] == before
    assert not (old / "checkpoint.pt").exists()                  # removed at the end, as always without --keep


def _fails(args, capsys, *needles, out=None):
    """Run `tpp` with ``args``; it must exit 2 naming every needle, and leave ``out`` as it was."""
    snapshot = None
    if out is not None and out.exists():
        snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("tpp prune: error: ")
    for needle in needles:
        assert needle in err, err
    if out is not None:
        if snapshot is None:
            assert not out.exists()
        else:
            assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    return err


def test_unknown_names_exit_2(tmp_path, capsys):
    out = tmp_path / "o"
    base = ["prune", "--data", "digits", "--ratio", "0.5", "--out", str(out)]
    _fails([*base, "--model", "resnet9000"], capsys, "unknown model 'resnet9000'", "resnet56", "digits_cnn",
           "torchvision:<name>", out=out)
    _fails([*base, "--model", "torchvision:nonet"], capsys, "'nonet' is not a torchvision classifier", "resnet18",
           out=out)
    _fails([*base, "--model", "mlp7", "--method", "magic"], capsys, "unknown method 'magic'",
           "tpp, l1, greg, diagonal, no-bn, kernorth, orthconv, orthp, scratch", out=out)
    _fails(["prune", "--model", "mlp7", "--data", "svhn", "--ratio", "0.5", "--out", str(out)], capsys,
           "unknown dataset 'svhn'", "cifar10", "digits", out=out)
    _fails([*base, "--model", "mlp7", "--recipe", "fast"], capsys, "unknown recipe 'fast'", "cifar, imagenet, demo",
           out=out)


@pytest.mark.parametrize("ratio,needle", [("1", "[0, 1)"), ("1.5", "[0, 1)"), ("-0.1", "[0, 1)"),
                                          ("nan", "[0, 1)"), ("features.3:1.0", "[0, 1)"),
                                          ("features.3:x", "'x' is not a number"),
                                          ("nothing*:0.5", "matches no Conv2d/Linear layer"),
                                          ("features.3:0", "prunes no layer")])
def test_bad_ratio_exits_2(ratio, needle, tmp_path, capsys):
    out = tmp_path / "o"
    _fails(["prune", *CNN[:4], "--ratio", ratio, "--out", str(out)], capsys, f"--ratio {ratio!r}", needle, out=out)


def test_missing_data_root_exits_2(tmp_path, capsys):
    out = tmp_path / "o"
    _fails(["prune", "--model", "resnet20", "--data", "cifar10", "--ratio", "0.5", "--out", str(out)], capsys,
           "--data-root", out=out)
    missing = tmp_path / "no-such-dir"
    _fails(["prune", "--model", "resnet20", "--data", "cifar10", "--data-root", str(missing), "--ratio", "0.5",
            "--out", str(out)], capsys, str(missing), "download", out=out)
    assert not missing.exists()


def test_non_empty_output_folder_exits_2(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.json").write_text("keep me")
    _fails(["prune", *CNN, "--pretrain-epochs", "1", "--out", str(out), *TINY], capsys,
           f"--out {out} exists and is not empty", "--overwrite", out=out)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    _fails(["prune", *CNN, "--pretrain-epochs", "1", "--out", str(not_a_folder), *TINY], capsys,
           "is not a folder")
    assert not_a_folder.read_text() == "x"


def test_weights_or_checkpoint_for_another_architecture_exit_2(tmp_path, capsys, tpp_run):
    out = tmp_path / "o"
    mlp_weights = tmp_path / "mlp.pt"
    torch.save(build_model("mlp7", in_features=64).state_dict(), mlp_weights)
    _fails(["prune", *CNN, "--weights", str(mlp_weights), "--out", str(out), *TINY], capsys,
           f"--weights {mlp_weights} was written for another architecture than --model digits_cnn", out=out)
    _fails(["prune", *CNN, "--weights", str(tmp_path / "none.pt"), "--out", str(out), *TINY], capsys,
           "no such file", out=out)
    _fails(["prune", "--model", "mlp7", "--data", "digits", "--ratio", "0.5", "--method", "tpp", "--resume",
            str(tpp_run / "checkpoint.pt"), "--out", str(out), *TINY], capsys,
            "written for another architecture", "model: checkpoint 'digits_cnn', this run 'mlp7'", out=out)
    _fails(["prune", *CNN, "--method", "l1", "--resume", str(tpp_run / "checkpoint.pt"), "--out", str(out),
            *TINY], capsys, "another pruning spec", "method: checkpoint 'tpp', this run 'l1'", out=out)
    _fails(["prune", *CNN[:4], "--ratio", "features.3:0.7", "--resume", str(tpp_run / "checkpoint.pt"), "--out",
            str(out), *TINY], capsys, "ratio: checkpoint \"'features.3:0.5,features.7:0.5'\"", out=out)
    _fails(["prune", *CNN, "--skip", "features.0", "--resume", str(tpp_run / "checkpoint.pt"), "--out", str(out),
            *TINY], capsys, "skip", out=out)
    _fails(["prune", *CNN, "--resume", str(tpp_run / "pruned.pt"), "--out", str(out), *TINY], capsys,
           "not a tpp run checkpoint", out=out)
    _fails(["prune", *CNN, "--weights", str(tpp_run / "checkpoint.pt"), "--out", str(out), *TINY], capsys,
           "--resume", out=out)


def test_overwrite_removes_only_what_a_run_wrote(tpp_run, tmp_path, capsys):
    """--overwrite refuses a folder holding anything a tpp run does not write (naming it), and removes nothing."""
    for foreign in ("notes.txt", "checkpoints/mine.txt"):
        out = tmp_path / foreign.replace("/", "-")
        shutil.copytree(tpp_run, out)
        (out / foreign).parent.mkdir(exist_ok=True)
        (out / foreign).write_text("mine")
        before = {str(p.relative_to(out)): p.is_file() and p.read_bytes() for p in out.rglob("*")}
        _fails(["prune", *CNN, "--method", "l1", "--weights", str(tpp_run / "pretrained.pt"), "--out", str(out),
                "--overwrite", *TINY], capsys, "--overwrite", "a tpp run does not write", foreign.split("/")[0])
        assert {str(p.relative_to(out)): p.is_file() and p.read_bytes() for p in out.rglob("*")} == before


def _one_line_exit_2(argv, capsys, *needles, out=None):
    err = _fails(argv, capsys, *needles, out=out)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_backend_and_environment_are_checked_first(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    run = ["prune", *CNN, "--method", "tpp", "--weights", "none", "--out", str(out), *TINY]
    _one_line_exit_2([*run, "--backend", "bogus"], capsys, "--backend bogus", "unknown backend 'bogus'",
                     "auto, torch, triton, cuda", out=out)
    monkeypatch.setenv("TPP_BACKEND", "bogus")
    _one_line_exit_2(run, capsys, "$TPP_BACKEND='bogus'", "unknown backend", out=out)
    _one_line_exit_2([*run[:-len(TINY)], "--method", "l1", *TINY], capsys, "$TPP_BACKEND='bogus'", out=out)


def test_failed_download_is_a_usage_error(tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    out = tmp_path / "o"
    _one_line_exit_2(["prune", "--model", "resnet20", "--data", "cifar10", "--data-root", str(tmp_path / "data"),
                      "--download", "--ratio", "0.5", "--weights", "none", "--out", str(out)], capsys,
                     "--data cifar10", "--download failed", "no network", out=out)


def test_out_and_pretraining_flags_are_checked_first(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _one_line_exit_2(["prune", *CNN, "--weights", "none", "--out", str(a_file / "run"), *TINY], capsys,
                     f"--out {a_file / 'run'}", "is not a folder")
    out = tmp_path / "o"
    _one_line_exit_2(["prune", *CNN, "--pretrain-epochs", "1", "--pretrain-lr", "0", "--out", str(out), *TINY],
                     capsys, "--pretrain-lr must be > 0", out=out)
    _one_line_exit_2(["prune", *CNN, "--weights", "none", "--image-size", "16", "--out", str(out), *TINY], capsys,
                     "--image-size 16", "8×8", out=out)


def test_pretrained_model_is_written_atomically(tmp_path, monkeypatch):
    """A disk that fills up while pretrained.pt is written leaves no truncated pretrained.pt (nor a temporary
    file)."""
    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 truncated")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "o"
    with pytest.raises(OSError, match="No space"):
        main(["prune", *CNN, "--pretrain-epochs", "1", "--out", str(out), *TINY])
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


@pytest.mark.parametrize("config,needle", [
    ('[1]', "expected a JSON object of recipe fields"), ('{"batch_size": "x"}', "batch_size: expected an integer"),
    ('{"reg_lr": "a"}', "reg_lr: expected a finite number"), ('{"momentum": -1}', "momentum: expected a finite"),
    ('{"lr_milestones": "x"}', "lr_milestones: expected comma-separated epochs"),
    ('{"weight_decay": true}', "weight_decay must be a number"), ('{"model": 5}', "model must be text"),
    ('{"schedule": "x"}', "schedule must be a JSON object"), ('{"bogus": 1}', "unknown recipe keys ['bogus']"),
])
def test_config_values_are_checked_as_the_flags_are(config, needle, tmp_path, capsys):
    path, out = tmp_path / "recipe.json", tmp_path / "o"
    path.write_text(config)
    _one_line_exit_2(["prune", *CNN, "--weights", "none", "--config", str(path), "--out", str(out), *TINY], capsys,
                     needle, out=out)


def test_shown_recipe_is_a_config(tmp_path, capsys):
    """What --show prints reads back through --config unchanged."""
    assert main(["prune", *CNN, "--show"]) == 0
    shown = capsys.readouterr().out
    (tmp_path / "recipe.json").write_text(shown)
    assert main(["prune", "--config", str(tmp_path / "recipe.json"), "--show"]) == 0
    assert capsys.readouterr().out == shown


def test_zero_out_interval_longer_than_the_stabilize_phase_runs(tmp_path, capsys):
    """The zero-out of every layer is fitted into the stabilize phase (GrowingSchedule.spaced_for): removal stays
    exact."""
    out = tmp_path / "o"
    assert main(["prune", *CNN, "--method", "tpp", "--weights", "none", "--out", str(out), *TINY,
                 "--zero-out-interval", "1000", "--finetune-epochs", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert m["max_abs_pruned_before_zero"] == 0 and m["accuracy"]["after_removal"] == m["accuracy"]["before_removal"]


def test_other_usage_errors_exit_2(tmp_path, capsys):
    out = tmp_path / "o"
    _fails(["prune", *CNN, "--pretrain-epochs", "0", "--out", str(out), *TINY], capsys, "no model to prune",
           "--weights", out=out)
    _fails(["prune", *CNN, "--method", "tpp", "--reg-iters", "3", "--pretrain-epochs", "1", "--out", str(out),
            *TINY], capsys, "--reg-iters", out=out)
    _fails(["prune", *CNN, "--interval", "0", "--out", str(out), *TINY], capsys, "--interval", out=out)
    _fails(["prune", "--model", "resnet20", "--data", "digits", "--ratio", "0.5", "--pretrain-epochs", "1",
            "--out", str(out), *TINY], capsys, "cannot take --data digits inputs of shape (1, 8, 8)", out=out)
    for bad in (["--finetune-epochs", "-3"], ["--seed=-1"], ["--seed", str(2**32)]):
        with pytest.raises(SystemExit) as exc:     # malformed flags: argparse's own exit 2
            main(["prune", *CNN, *bad])
        assert exc.value.code == 2


def test_python_dash_m_tpp(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "tpp", "list"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0 and "orthconv" in ok.stdout and "digits_cnn" in ok.stdout and "recipes:" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "tpp", "prune", "--model", "mlp7", "--data", "digits", "--ratio",
                          "0.5", "--method", "nope"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr
    assert list(tmp_path.iterdir()) == []      # no runs/ folder created


def test_progress_printer_without_a_terminal():
    """Not a terminal: a line at every tenth of a phase, none for the phase's first step (its rate is unknown), a
    finished line at the end; every rate is measured over a real interval."""
    import io
    import re

    from tpp.progress import Progress

    stream = io.StringIO()
    progress = Progress(stream=stream, batch=None, interval=3600)
    for i in range(1, 101):
        progress("regularize", i, 100, {"strength": i / 100, "phase": "grow", "loss": torch.tensor(0.5)})
    progress("finetune", 3, 3, {"epoch": 1, "epochs": 1})            # a phase finished at its first report
    lines = stream.getvalue().splitlines()
    assert [re.search(r"\] (\d+)/100", line).group(1) for line in lines[:-1]] == [str(10 * k) for k in range(1, 11)]
    assert "r 1 grow" in lines[9] and "loss 0.5000" in lines[0] and "finetune" in lines[10] and "– it/s" in lines[10]
    rates = [float(re.search(r"([\d,.]+) it/s", line).group(1).replace(",", "")) for line in lines[:-1]]
    assert all(0 < r < 1e7 for r in rates), rates


def test_help_shows_real_defaults_and_loads_no_torch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import sys\nfrom tpp.cli import main\n"
            "for argv in (['--help'], ['prune', '--help'], ['train', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'triton') or "
            "m in ('tpp.pipeline', 'tpp.graph', 'tpp.regularizer'))\nprint('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]
    assert "usage: tpp train" in proc.stdout and "(default: None)" not in proc.stdout
    text = " ".join(proc.stdout.split())
    assert "--reg-lr REG_LR pruning-phase SGD learning rate (default: from the recipe: cifar 0.001, imagenet " \
           "0.001, demo 0.01)" in text
    assert "--seed SEED random seed (data split, order, initialization) (default: 0)" in text
    assert "--amp {auto,none,bf16,fp16} autocast dtype; fp16 adds a GradScaler; auto: bf16 on GPUs, none on CPU " \
           "(default: none)" in text                                            # tpp prune: fp32 as before
    assert "auto: bf16 on GPUs, none on CPU (default: auto)" in text                # tpp train
    # what a resume may change and what it refuses
    assert "a resume that changes one is refused, naming it. These may change: --workers, --threads" in text
    assert "--checkpoint-every, --finetune-checkpoint-every, --checkpoint-minutes, --keep-last" in text


# ------------------------------------------------------------------------------------------------- export
def test_export_torchscript_matches_pytorch(tpp_run, tmp_path, capsys):
    out = tmp_path / "model.ts"
    assert main(["export", str(tpp_run), "--format", "torchscript", "--out", str(out)]) == 0
    assert "max |diff|" in capsys.readouterr().out
    scripted = torch.jit.load(str(out))
    model = load_pruned(tpp_run / "pruned.pt").eval()
    _, test = load_digits_split(seed=0)
    x = test.tensors[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
    assert dict(scripted.named_parameters())["features.3.weight"].shape[0] == 16     # the pruned architecture


def test_export_onnx_without_the_extra_exits_2(tpp_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)         # as if not installed
    assert main(["export", str(tpp_run), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tpp export: error: ") and 'pip install "tpp[export]"' in err and "onnxruntime" in err
    assert len(err.strip().splitlines()) == 1 and not (tpp_run / "pruned.onnx").exists()


def test_export_onnx_matches_pytorch(tpp_run, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["export", str(tpp_run), "--format", "onnx", "--out", str(out)]) == 0
    assert out.stat().st_size > 0 and "ok at atol" in capsys.readouterr().out


def test_export_bad_input_exits_2(tmp_path, tpp_run, capsys):
    assert main(["export", str(tmp_path), "--format", "torchscript"]) == 2
    assert "no pruned.pt" in capsys.readouterr().err
    assert main(["export", str(tpp_run / "config.json"), "--format", "torchscript"]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert main(["export", str(tpp_run), "--format", "torchscript", "--input-shape", "3,x"]) == 2
    assert "--input-shape" in capsys.readouterr().err


def test_inspect_prints_units_refusals_and_a_ratio(capsys):
    assert main(["inspect", "digits_resnet", "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "prunable units" in out and "group" in out and "refused" in out and "members:" in out
    assert "ratio" in out.splitlines()[3]


def test_inspect_finds_ratios_for_a_speedup(capsys):
    assert main(["inspect", "digits_cnn", "--speedup", "1.5"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("target speedup 1.5x (uniform")
    reached = float(first.split(": ")[1].split("x")[0])
    assert abs(reached / 1.5 - 1) <= 0.02


@pytest.mark.parametrize("argv, message", [
    (["inspect", "no_such_model"], "no_such_model"),
    (["inspect", "digits_cnn", "--ratio", "0.5", "--speedup", "2"], "exclude each other"),
    (["inspect", "digits_cnn", "--speedup", "0.5"], "target_speedup must be"),
])
def test_inspect_errors_exit_2_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tpp inspect: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_prune_to_a_speedup_records_the_ratios_and_resumes(tmp_path, capsys):
    """``--speedup`` searches the ratios on the weights given (global ranking here), runs them, records them, and a
    resumed run searches the same ones (the run identity holds the ratio spec)."""
    from tpp.graph import analyze_model
    from tpp.selection import num_pruned, unit_ratios

    out = tmp_path / "sp"
    argv = ["prune", "--model", "digits_resnet", "--data", "digits", "--speedup", "1.8", "--speedup-mode", "global",
            "--weights", "none", "--out", str(out), *TINY]
    assert main([*argv, "--stop-after-iters", "3"]) == 0
    assert main([*argv, "--resume", "auto"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["speedup"]["target"] == 1.8 and config["speedup"]["mode"] == "global"
    reached = json.loads((out / "metrics.json").read_text())["metrics"]["flops"]["speedup"]
    assert abs(reached / 1.8 - 1) <= 0.02 and reached == pytest.approx(config["speedup"]["reached"])
    graph = analyze_model(build_model("digits_resnet"))
    counts = {n: num_pruned(r, graph.units[n].size) for n, r in unit_ratios(graph, config["ratio"]).items()}
    assert counts == {n: round(r * graph.units[n].size) for n, r in config["speedup"]["ratios"].items()}


@pytest.mark.parametrize("extra, needles", [
    (["--ratio", "0.5"], ("--ratio and --speedup exclude each other",)),
    (["--speedup-mode", "global"], ("--speedup-mode global", "--weights")),
    (["--speedup", "5000"], ("--speedup 5000 on --model digits_cnn", "out of reach")),
])
def test_speedup_errors_exit_2(extra, needles, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["prune", "--model", "digits_cnn", "--data", "digits", "--speedup", "1.5", "--out", str(out), *TINY]
    _fails(argv + extra, capsys, *needles, out=out)
