"""The input pipeline of `tpp train` (issue 14): uint8 imagefolder batches normalized on the device equal what the CPU
transforms gave, channels_last collation, the prefetcher keeps the order and exact resume, the GPU decode path draws
the same crops and falls back cleanly, and the worker count follows the CPU affinity."""
import logging
import math
import pickle

import numpy as np
import pytest
import torch

from tpp.data import IMAGENET_STATS
from tpp.train.data import (
    SeededSamples,
    build_datasets,
    build_loaders,
    default_workers,
    model_input,
    normalizer_of,
    sample_seed,
)
from tpp.train.decode import EncodedImages, resolve_decode
from tpp.train.distributed import DistEnv
from tpp.train.engine import Engine
from tpp.train.prefetch import Normalize, prefetch

SIZE = 24          # crop size: small, so that the JPEGs below are both larger and smaller than it in places


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """An ImageNet-layout folder of odd-sized RGB JPEGs, a grayscale JPEG and an RGBA PNG (the conversions)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(14)
    for split in ("train", "val"):
        for c, cls in enumerate(("ant", "bee", "cat")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                h, w = 17 + 13 * i + c, 45 - 7 * i + 3 * c
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (29, 33), dtype=np.uint8)).save(root / split / "ant" / "gray.jpg")
        Image.fromarray(rng.integers(0, 256, (31, 26, 4), dtype=np.uint8)).save(root / split / "bee" / "rgba.png")
    return root


@pytest.fixture(scope="module")
def datasets(image_root):
    return {p: build_datasets("imagefolder", str(image_root), SIZE, pixels=p)
            for p in ("float", "uint8", "tensor", "jpeg")}


# ----------------------------------------------------------------- uint8 + device normalization == the CPU transforms
@pytest.mark.parametrize("split", [0, 1], ids=["train", "val"])
def test_uint8_images_normalized_equal_the_float_transform(datasets, split):
    """Tolerance zero: both sides run the same float32 operations in the same order (uint8 → float32, ÷ 255, − mean,
    ÷ std, each correctly rounded), on the same pixels (same PIL crop and resize, drawn from the same seed)."""
    floats, uint8s = datasets["float"][split], datasets["uint8"][split]
    normalize = normalizer_of(uint8s)
    seeds = np.random.default_rng().integers(0, 2**62, size=2)
    for index in range(len(floats)):
        for seed in seeds:
            expected, label = SeededSamples(floats)[(index, int(seed))]
            image, same_label = SeededSamples(uint8s)[(index, int(seed))]
            assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE) and label == same_label
            assert torch.equal(normalize(image), expected)


def test_normalize_against_float64(datasets):
    """Per element, |float32 result − float64 (x/255 − mean)/std| is within the rounding of the three float32 steps
    and of the float32 mean and std: u·((x/255 + |x/255 − m| + m)/s + 2|result|), u = 2⁻²⁴ (first order in u)."""
    normalize = Normalize(*IMAGENET_STATS)
    x = torch.randint(0, 256, (5, 3, 7, 11), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    out = normalize(x)
    v = x.double() / 255
    m, s = (torch.tensor(t, dtype=torch.float64).view(-1, 1, 1) for t in IMAGENET_STATS)
    reference = (v - m) / s
    bound = 2.0**-24 * ((v + (v - m).abs() + m) / s + 2 * reference.abs()) * 1.001
    assert out.dtype == torch.float32
    assert ((out.double() - reference).abs() <= bound).all()
    assert not torch.equal(out.double(), reference)               # float32 arithmetic, not a float64 copy


def test_normalize_layouts_and_inputs():
    normalize = Normalize(*IMAGENET_STATS)
    x = torch.randint(0, 256, (4, 13, 9, 3), dtype=torch.uint8).permute(0, 3, 1, 2)      # channels_last view
    out = normalize(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, normalize(x.contiguous()))
    assert torch.equal(normalize(x[1]), out[1])                                           # one [C, H, W] image
    floats = torch.randn(2, 3, 4, 4)
    assert normalize(floats) is floats
    with pytest.raises(TypeError, match="uint8"):
        normalize(x.to(torch.int32))
    with pytest.raises(ValueError, match="C = 3"):
        normalize(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="std"):
        Normalize((0.5,), (0.0,))
    state = pickle.dumps(normalize)                   # into loader workers: the statistics, no (device) tensors
    assert b"_rebuild_tensor" not in state and torch.equal(pickle.loads(state)(x), out)


def test_uint8_batches_are_channels_last(datasets):
    train, val = datasets["uint8"]
    train_loader, val_loader = build_loaders(train, val, 4, 5, rank=0, world_size=1, seed=7, workers=0,
                                             pin_memory=False)
    train_loader.sampler.set_epoch(0)
    (x, y), keys = next(iter(train_loader)), list(train_loader.sampler)[:4]
    assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, torch.stack([SeededSamples(train)[k][0] for k in keys]))
    xv, _ = next(iter(val_loader))
    assert xv.is_contiguous(memory_format=torch.channels_last) and torch.equal(xv[2], val[2][0])
    float_train, float_val = datasets["float"]
    xf, _ = next(iter(build_loaders(float_train, float_val, 4, 5, rank=0, world_size=1, seed=7, workers=0,
                                    pin_memory=False)[1]))
    assert xf.dtype == torch.float32 and xf.is_contiguous() and torch.equal(xf, normalizer_of(val)(xv))


def test_model_input_is_float(datasets):
    assert torch.equal(model_input(datasets["uint8"][1]), datasets["float"][1][0][0])
    digits = build_datasets("digits", None)[1]
    assert normalizer_of(digits) is None and torch.equal(model_input(digits), digits[0][0])


# ------------------------------------------------------------------------------------------------ Engine.inputs
@pytest.mark.parametrize("channels_last", [False, True])
def test_engine_inputs_normalize_uint8_batches(datasets, channels_last):
    engine = Engine(DistEnv(), channels_last=channels_last)
    engine.normalize = normalizer_of(datasets["uint8"][0])
    loaders = {p: build_loaders(*datasets[p], 6, 6, rank=0, world_size=1, seed=1, workers=0, pin_memory=False)[0]
               for p in ("float", "uint8")}
    for (xf, yf), (xu, yu) in zip(engine.batches(loaders["float"], "regularize", 3),
                                  engine.batches(loaders["uint8"], "regularize", 3)):
        (a, ya), (b, yb) = engine.inputs(xf, yf, engine.device), engine.inputs(xu, yu, engine.device)
        assert torch.equal(a, b) and torch.equal(ya, yb) and b.dtype == torch.float32
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert b.is_contiguous(memory_format=layout)
    with pytest.raises(TypeError, match="Engine.normalize"):
        Engine(DistEnv()).inputs(xu, yu, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ prefetching
def test_prefetch_is_a_pass_through_off_cuda():
    batches = [(torch.full((2, 3), i), torch.tensor([i])) for i in range(5)]
    assert all(a is b for a, b in zip(prefetch(batches, torch.device("cpu")), batches))
    assert len(list(prefetch(batches, "cpu"))) == 5 and list(prefetch([], "cpu")) == []


@pytest.mark.parametrize("workers", [0, 2])
def test_prefetched_passes_keep_order_and_resume_exactly(datasets, workers):
    """A pass stopped after ``k`` batches and resumed with ``skip=k`` hands out exactly the uninterrupted pass."""
    engine = Engine(DistEnv(), batch_size=3, seed=5)
    engine.normalize = normalizer_of(datasets["uint8"][0])
    loader = build_loaders(*datasets["uint8"], 3, 3, rank=0, world_size=1, seed=5, workers=workers,
                           pin_memory=False)[0]
    full = [engine.inputs(x, y, engine.device) for x, y in engine.batches(loader, "finetune", 2)]
    assert len(full) == len(loader) == 3
    for k in (1, 2):
        first = engine.batches(loader, "finetune", 2)
        head = [engine.inputs(*next(first), engine.device) for _ in range(k)]
        tail = [engine.inputs(x, y, engine.device) for x, y in engine.batches(loader, "finetune", 2, skip=k)]
        for (x, y), (xe, ye) in zip(head + tail, full, strict=True):
            assert torch.equal(x, xe) and torch.equal(y, ye)
    other = [engine.inputs(x, y, engine.device) for x, y in engine.batches(loader, "finetune", 3)]
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(other, full))     # a new pass: new order and crops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetch_on_cuda_keeps_order_and_values():
    batches = [(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), torch.arange(8) + i) for i in range(6)]
    out = list(prefetch(batches, torch.device("cuda")))
    assert len(out) == 6
    for (x, y), (xd, yd) in zip(batches, out):
        assert xd.is_cuda and yd.is_cuda and torch.equal(xd.cpu(), x) and torch.equal(yd.cpu(), y)


# ------------------------------------------------------------------------------------------ --decode cpu-tensor, gpu
def test_tensor_decode_draws_the_same_crops(datasets):
    """``cpu-tensor`` draws the crop and flip the PIL path draws from the same sample seed; its pixels differ from
    PIL's by the rounding of the two resize passes only (decode bitwise libjpeg's: ≤ 1 level per pass, ≤ 2 in all),
    and are far from the crop of another seed."""
    tensor, pil = SeededSamples(datasets["tensor"][0]), SeededSamples(datasets["uint8"][0])
    for index in range(len(tensor)):
        seed = sample_seed(9, 1, index)
        image, label = tensor[(index, seed)]
        same, same_label = pil[(index, seed)]
        assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE) and label == same_label
        assert (image.int() - same.int()).abs().max() <= 2
        assert (image.float() - pil[(index, seed + 1)][0].float()).abs().mean() > 10


def test_gpu_decode_batches_equal_the_tensor_path(datasets):
    """``--decode gpu``'s batches (decoded here on the CPU) are the ``cpu-tensor`` images of the same sample seeds —
    the non-JPEG file shipped as PIL pixels included — and ``Engine.inputs`` decodes and normalizes them."""
    jpeg = datasets["jpeg"][0]
    loader = build_loaders(jpeg, datasets["jpeg"][1], 11, 4, rank=0, world_size=1, seed=2, workers=0,
                           pin_memory=False)[0]
    loader.sampler.set_epoch(0)
    (encoded, labels), keys = next(iter(loader)), list(loader.sampler)
    assert isinstance(encoded, EncodedImages) and len(encoded) == 11 and encoded.boxes.shape == (11, 5)
    assert sorted(d.dim() for d in encoded.items()) == [1] * 10 + [3]       # the PNG arrives decoded
    decoded = encoded.decode(torch.device("cpu"))
    assert decoded.shape == (11, 3, SIZE, SIZE) and decoded.dtype == torch.uint8
    assert decoded.is_contiguous(memory_format=torch.channels_last)
    tensor = SeededSamples(datasets["tensor"][0])
    assert torch.equal(decoded, torch.stack([tensor[k][0] for k in keys]))
    assert torch.equal(labels, torch.tensor([tensor[k][1] for k in keys]))
    engine = Engine(DistEnv())
    engine.normalize = normalizer_of(jpeg)
    x, _ = engine.inputs(encoded, labels, engine.device)
    assert torch.equal(x, engine.normalize(decoded))
    in_worker = build_loaders(jpeg, datasets["jpeg"][1], 11, 4, rank=0, world_size=1, seed=2, workers=1,
                              pin_memory=False)[0]                           # one shared payload per batch
    in_worker.sampler.set_epoch(0)
    assert torch.equal(next(iter(in_worker))[0].decode(torch.device("cpu")), decoded)


@pytest.fixture
def decode_log():
    """The messages logged by tpp.train.decode (caught on its own logger: `tpp train` stops propagation above)."""
    records, logger = [], logging.getLogger("tpp.train.decode")
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where CUDA is unavailable")
def test_gpu_decode_falls_back_to_cpu(decode_log):
    assert resolve_decode("gpu", torch.device("cpu")) == "cpu"
    assert resolve_decode("gpu", torch.device("cuda")) == "cpu"     # the trial decode fails: no CUDA here
    reasons = decode_log
    assert len(reasons) == 2 and "not a CUDA GPU" in reasons[0] and "decode_jpeg on cuda failed" in reasons[1]
    assert resolve_decode("cpu", torch.device("cuda")) == "cpu"
    assert resolve_decode("cpu-tensor", torch.device("cuda")) == "cpu-tensor"       # decodes on the CPU


def test_tensor_decode_falls_back_without_torchvision_io(monkeypatch, decode_log):
    import torchvision.io

    def broken(*args, **kwargs):
        raise RuntimeError("no libjpeg in this build")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)
    assert resolve_decode("cpu-tensor", torch.device("cpu")) == "cpu"
    assert len(decode_log) == 1 and "no libjpeg in this build" in decode_log[0]
    with pytest.raises(ValueError, match="decode must be one of"):
        resolve_decode("dali", torch.device("cpu"))


def test_bad_pixels():
    with pytest.raises(ValueError, match="pixels must be one of"):
        build_datasets("digits", None, pixels="bf16")


# ------------------------------------------------------------------------------------------------ workers
def test_default_workers_from_cpu_affinity(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers(torch.device("cuda", 3), 8) == 7
    assert default_workers(torch.device("cuda"), 1) == 63
    assert default_workers(torch.device("cpu"), 1) == 0
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_workers(torch.device("cuda"), 8) == 1


def test_sample_seed_drives_every_path(datasets):
    """The per-sample seed, not the global RNG, decides the crop on each path (resume stays exact)."""
    seed = sample_seed(0, 4, 2)
    for pixels in ("float", "uint8", "tensor", "jpeg"):
        train = SeededSamples(datasets[pixels][0])
        torch.manual_seed(0)
        a = train[(2, seed)][0]
        torch.manual_seed(1)
        b = train[(2, seed)][0]
        first, second = (a, b) if pixels != "jpeg" else (a[1], b[1])
        assert torch.equal(first, second) and not math.isnan(float(first.float().sum()))


# ------------------------------------------------------------------------------------------------ the command
@pytest.mark.usefixtures("one_torch_thread")
def test_tpp_train_decode_gpu_falls_back_on_cpu(image_root, tmp_path, capsys):
    """`tpp train --decode gpu` on the CPU trains on the PIL-decoded uint8 path, saying why (normalized on the
    device, the model's sample and the pipeline's example inputs included)."""
    from tpp.models import build_model
    from tpp.train.run import main

    torch.manual_seed(0)
    torch.save(build_model("resnet20", num_classes=3).state_dict(), tmp_path / "w.pt")
    args = ["smoke", "--data-root", str(image_root), "--weights", str(tmp_path / "w.pt"), "--out",
            str(tmp_path / "run"), "--image-size", "16", "--batch-size", "4", "--eval-batch-size", "4", "--device",
            "cpu", "--workers", "0", "--quiet", "--stop-after-iters", "2", "--decode", "gpu"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "--decode gpu is not available (the run's device is cpu, not a CUDA GPU)" in err and "Traceback" not in err
