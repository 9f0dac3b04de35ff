"""run_pruning end to end for every method on a small slice of the digits, with tiny schedules: a consistent
result, lossless removal for the zero-out methods, exact isometry for OrthP on a linear MLP, checkpoints and
resume, and bad input."""
import json

import pytest
import torch
from torch.utils.data import TensorDataset

from tpp import GrowingSchedule, load_pruned, save_pruned
from tpp.baselines import METHODS
from tpp.data import build_loader, load_digits_split
from tpp.models import MLP, digits_cnn
from tpp.pipeline import RECIPES, default_recipe, evaluate, model_signature, run_pruning, train

SCHEDULE = GrowingSchedule(delta=0.25, interval=1, stabilize_iters=8, zero_out_interval=1)   # 4 + 8 iterations
FAST = dict(schedule=SCHEDULE, finetune_epochs=1, lr_milestones=(), reg_lr=1e-2, jsv_samples=16, seed=0)
CNN_SKIP = ("features.0",)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    train_set, test_set = load_digits_split(seed=0)
    small_train = TensorDataset(*(t[:256] for t in train_set.tensors))
    small_test = TensorDataset(*(t[:128] for t in test_set.tensors))
    return build_loader(small_train, 64, train=True, seed=0), build_loader(small_test, 128, train=False)


@pytest.fixture(scope="module")
def cnn(digits):
    torch.manual_seed(0)
    model = digits_cnn()
    train(model, digits[0], 2, 0.05)
    return model


def _check_result(result, method, model_params):
    d = result.to_dict()
    json.dumps(d)                                             # JSON-serializable as is
    assert d["method"] == method and d["config"]["method"] == method
    m = d["metrics"]
    for key in ("base", "before_removal", "after_removal", "final", "best"):
        assert 0 <= m["accuracy"][key] <= 100
    for key in ("base", "before_removal", "after_removal", "final"):
        assert m["jsv_mean"][key] > 0 and m["jsv"][key]["mean"] == m["jsv_mean"][key]
    assert m["params"]["base"] == model_params > m["params"]["pruned"]
    assert m["params"]["ratio"] == pytest.approx(m["params"]["pruned"] / m["params"]["base"])
    assert m["flops"]["speedup"] == pytest.approx(m["flops"]["base"] / m["flops"]["pruned"]) and \
        m["flops"]["speedup"] > 1
    assert m["pruned_filters"] == {name: len(idx) for name, idx in d["pruned"].items()}
    assert sum(p.numel() for p in result.model.parameters()) == m["params"]["pruned"]
    assert [r["epoch"] for r in d["history"]["finetune"]] == [1]
    assert set(m["time_s"]) >= {"regularize", "remove", "finetune", "total"}
    return d


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_end_to_end(method, digits, cnn):
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    result = run_pruning(cnn, *digits, method, 0.5, skip=CNN_SKIP, **FAST)
    d = _check_result(result, method, sum(p.numel() for p in cnn.parameters()))
    for k, v in cnn.state_dict().items():                    # the given model is untouched (inplace=False)
        torch.testing.assert_close(v, before[k])
    assert d["pruned"].keys() == {"features.3", "features.7"}
    assert [len(v) for v in d["pruned"].values()] == [16, 32]
    spec = METHODS[method]
    reg = d["history"]["regularize"]
    if spec.regularizes:
        assert d["config"]["reg_iters"] == SCHEDULE.total_iters == reg[-1]["iteration"]
        assert all(r["penalty"] >= 0 and r["loss"] > 0 for r in reg)
    else:
        assert d["config"]["reg_iters"] == 0 and reg == []
        assert d["metrics"]["accuracy"]["before_removal"] == d["metrics"]["accuracy"]["base"]
    if spec.zero_out:   # zeroed W, b, γ, β: removal does not change the function
        assert [r["strength"] for r in reg[:5]] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert d["metrics"]["max_abs_pruned_before_zero"] == 0.0      # the schedule's zero-out already did it
        m = d["metrics"]
        assert m["accuracy"]["after_removal"] == m["accuracy"]["before_removal"]
        assert m["loss"]["after_removal"] == pytest.approx(m["loss"]["before_removal"], rel=1e-5, abs=1e-6)
        assert m["jsv_mean"]["after_removal"] == pytest.approx(m["jsv_mean"]["before_removal"], rel=1e-4)
    if spec.post_removal:
        assert "removed_untransformed" in d["metrics"]["accuracy"]


def test_kernorth_then_l1_selects_on_the_regularized_weights(digits, cnn):
    strong = run_pruning(cnn, *digits, "kernorth", 0.5, skip=CNN_SKIP, orth_weight=1.0, **FAST)
    plain = run_pruning(cnn, *digits, "l1", 0.5, skip=CNN_SKIP, **FAST)
    assert strong.config["orth_weight"] == 1.0
    assert [r["strength"] for r in strong.history["regularize"]] == [1.0] * SCHEDULE.total_iters
    assert strong.metrics["accuracy"]["before_removal"] != strong.metrics["accuracy"]["base"] or \
        strong.metrics["loss"]["before_removal"] != strong.metrics["loss"]["base"]
    assert strong.pruned.keys() == plain.pruned.keys()


def test_orthp_restores_exact_isometry_and_l1_breaks_it(digits):
    torch.manual_seed(0)
    mlp = MLP(64, 100, 7, 10)
    train(mlp, digits[0], 2, 0.02)
    kwargs = dict(FAST, finetune_epochs=0)
    orthp = run_pruning(mlp, *digits, "orthp", 0.7, **kwargs)
    l1 = run_pruning(mlp, *digits, "l1", 0.7, **kwargs)
    sv = orthp.metrics["jsv"]["after_removal"]
    assert sv["mean"] == pytest.approx(1, abs=1e-5) and sv["max"] == pytest.approx(1, abs=1e-5) and \
        sv["min"] == pytest.approx(1, abs=1e-5)
    assert l1.metrics["jsv_mean"]["after_removal"] < 0.5 * l1.metrics["jsv_mean"]["base"]
    assert orthp.history["finetune"] == [] and orthp.metrics["accuracy"]["final"] == \
        orthp.metrics["accuracy"]["after_removal"]


def test_tpp_on_an_mlp_without_bn_removes_losslessly(digits):
    torch.manual_seed(0)
    mlp = MLP(64, 32, 4, 10)
    result = run_pruning(mlp, *digits, "tpp", 0.5, **dict(FAST, finetune_epochs=0))
    m = result.metrics
    assert m["loss"]["after_removal"] == pytest.approx(m["loss"]["before_removal"], rel=1e-5, abs=1e-6)
    assert set(result.pruned) == {"layers.0", "layers.1", "layers.2"}


def test_pruned_model_saves_and_loads(digits, cnn, tmp_path):
    result = run_pruning(cnn, *digits, "l1", 0.5, skip=CNN_SKIP, **dict(FAST, finetune_epochs=0))
    save_pruned(result.model, result.pruned, tmp_path / "p.pt", arch="digits_cnn")
    loaded = load_pruned(digits_cnn(), tmp_path / "p.pt")
    assert evaluate(loaded, digits[1])[0] == result.metrics["accuracy"]["final"]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [("regularize", 5), ("finetune", 2)])
def test_interrupted_run_resumes_from_its_checkpoint(digits, cnn, tmp_path, stop_at):
    ckpt = tmp_path / "checkpoint.pt"
    kwargs = dict(FAST, finetune_epochs=2, checkpoint=ckpt, checkpoint_every=2, log_every=1)
    phase, step = stop_at
    seen = {"epoch": 0}

    def interrupt(ph, done, total, info):
        if ph == phase and (done == step if ph == "regularize" else info["epoch"] == step):
            raise _Stop

    with pytest.raises(_Stop):
        run_pruning(cnn, *digits, "tpp", 0.5, skip=CNN_SKIP, progress=interrupt, **kwargs)
    state = torch.load(ckpt, weights_only=True)
    assert state["stage"] == phase and (state["iteration"] == 4 if phase == "regularize" else state["epoch"] == 1)

    def count(ph, done, total, info):
        seen["epoch"] = max(seen["epoch"], info.get("epoch", 0))
        if ph == "regularize":
            assert done > 4          # continues after the checkpointed iteration

    result = run_pruning(cnn, *digits, "tpp", 0.5, skip=CNN_SKIP, progress=count, resume=ckpt, **kwargs)
    its = [r["iteration"] for r in result.history["regularize"]]
    assert its == list(range(1, SCHEDULE.total_iters + 1))
    assert [r["epoch"] for r in result.history["finetune"]] == [1, 2]
    assert result.metrics["accuracy"]["after_removal"] == result.metrics["accuracy"]["before_removal"]
    assert torch.load(ckpt, weights_only=True)["stage"] == "done"
    # a finished checkpoint resumes to the same result without training again
    again = run_pruning(cnn, *digits, "tpp", 0.5, skip=CNN_SKIP, resume=ckpt, **kwargs)
    assert again.metrics["accuracy"] == result.metrics["accuracy"]


def test_resume_refuses_another_architecture_or_method(digits, cnn, tmp_path):
    ckpt = tmp_path / "c.pt"
    run_pruning(cnn, *digits, "l1", 0.5, skip=CNN_SKIP, checkpoint=ckpt, **dict(FAST, finetune_epochs=0))
    with pytest.raises(ValueError, match="another architecture"):
        run_pruning(MLP(64, 32, 3, 10), *digits, "l1", 0.5, resume=ckpt, **FAST)
    with pytest.raises(ValueError, match="another pruning spec — method: checkpoint 'l1', this run 'orthp'"):
        run_pruning(cnn, *digits, "orthp", 0.5, skip=CNN_SKIP, resume=ckpt, **FAST)
    with pytest.raises(ValueError, match="ratio"):
        run_pruning(cnn, *digits, "l1", 0.7, skip=CNN_SKIP, resume=ckpt, **FAST)
    with pytest.raises(FileNotFoundError):
        run_pruning(cnn, *digits, "l1", 0.5, skip=CNN_SKIP, resume=tmp_path / "none.pt", **FAST)
    assert model_signature(cnn)["features.3.weight"] == [32, 32, 3, 3]


def test_bad_input(digits, cnn):
    with pytest.raises(ValueError, match="unknown method 'x'"):
        run_pruning(cnn, *digits, "x", 0.5, **FAST)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        run_pruning(cnn, *digits, "l1", 1.0, **FAST)
    with pytest.raises(ValueError, match="schedule.total_iters"):
        run_pruning(cnn, *digits, "tpp", 0.5, skip=CNN_SKIP, **dict(FAST, reg_iters=3))
    with pytest.raises(ValueError, match="finetune_epochs"):
        run_pruning(cnn, *digits, "l1", 0.5, **dict(FAST, finetune_epochs=-1))
    with pytest.raises(ValueError, match="matches no Conv2d/Linear"):
        run_pruning(cnn, *digits, "l1", "nothing*:0.5", **FAST)


def test_recipes_hold_the_paper_settings():
    cifar, imagenet = RECIPES["cifar"], RECIPES["imagenet"]
    assert cifar.schedule == GrowingSchedule() and cifar.schedule.total_iters == 110_000
    assert (cifar.reg_lr, cifar.momentum, cifar.weight_decay, cifar.batch_size) == (1e-3, 0.9, 5e-4, 128)
    assert (cifar.finetune_lr, cifar.lr_milestones, cifar.finetune_epochs) == (1e-2, (60, 90), 120)
    assert imagenet.schedule == GrowingSchedule.imagenet() and imagenet.weight_decay == 1e-4
    assert (imagenet.batch_size, imagenet.lr_milestones, imagenet.finetune_epochs) == (256, (30, 60, 75), 90)
    assert default_recipe("digits").name == "demo" and default_recipe("imagefolder").name == "imagenet"
    assert default_recipe("cifar100", "vgg19").batch_size == 256 and default_recipe("cifar10").batch_size == 128
    demo = RECIPES["demo"]
    assert demo.schedule.total_iters == 600 and demo.run_kwargs()["schedule"] is demo.schedule


def test_run_config_is_typed_and_a_run_traces_its_model_once(digits, cnn, monkeypatch):
    import dataclasses

    import tpp.graph
    from tpp.pipeline import RunConfig

    config = RunConfig(method="tpp", ratio=0.5, skip="features.0", **{k: v for k, v in FAST.items()
                                                                       if k not in ("jsv_samples", "seed")})
    assert config.reg_iters == SCHEDULE.total_iters and config.skip == ("features.0",) and config.log_every == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.reg_lr = 1.0
    with pytest.raises(TypeError, match="either config= or method"):
        run_pruning(cnn, *digits, "tpp", 0.5, config=config)
    with pytest.raises(TypeError, match="unexpected keyword argument 'reg_lrr'"):
        run_pruning(cnn, *digits, "tpp", 0.5, reg_lrr=1.0)
    assert RunConfig.from_recipe(RECIPES["demo"], method="l1", ratio=0.3).finetune_epochs == 10

    traced = []
    real = tpp.graph.analyze_model

    def counting(model, **options):
        traced.append(type(model).__name__)
        return real(model, **options)

    for module in ("tpp.graph", "tpp.pipeline", "tpp.regularizer", "tpp.selection", "tpp.surgery"):
        monkeypatch.setattr(f"{module}.analyze_model", counting)
    result = run_pruning(cnn, *digits, config=dataclasses.replace(config, finetune_epochs=0))
    assert traced == ["VGGCifar"]                     # regularizer, selection and removal share one trace
    assert set(result.pruned) == {"features.3", "features.7"}
    latency = result.metrics["latency_s"]
    assert latency["base"] > 0 and latency["pruned"] > 0 and latency["batch"] == 1
