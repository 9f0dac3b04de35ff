"""``make gpu-check``: everything a GPU host must show, offline, in at most 8 minutes, with the machine's own python3.

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--dry-run] [--stages build,tests,smoke,table,train]
                                                 [--total-s 470] [--results DIR]

Stages, each in its own process group with its own time cap (cut to what is left of ``--total-s``), each writing its
own result as soon as it has one, so a cut run still returns the stages before the cut:

1. ``build``  — csrc/ compiled for sm_90 (``TORCH_CUDA_ARCH_LIST=9.0``, ``CUDA_HOME`` found by
   :func:`tpp_kernels.cuda_build.cuda_home`);
2. ``tests``  — the backend contract, kernel, CUDA-extension, regularizer and GPU-only tests on the GPU
   (``TRITON_INTERPRET`` unset);
3. ``smoke``  — the regularizer on the ResNet50 2.31× set: parity of every backend (float32) against the torch
   backend in float64, no host sync per step, ``apply_gradients()`` replayed from a CUDA graph against its floor;
4. ``table``  — the ResNet50 2.31× timing table of every form (``benchmarks/run.py``: :mod:`forms`, :mod:`timing`,
   :mod:`roofline`), ``torch.compile``'s form in a run of its own so its compile time cannot cut the others;
5. ``train``  — the ResNet50 training-throughput benchmark at per-GPU bs 32 (the DDP case) and bs 256
   (``bench_train_throughput.py``, shortened).

Results: ``<results>/<device>-<date>-gpu-check.{json,md}`` (rewritten after every stage), beside the table's
``<device>-<date>.{json,md}`` and ``train-throughput-<device>-<date>.{json,md}``; all of them copied to ``$OUT``
when it is set. ``--dry-run`` runs every stage's plumbing on tiny CPU shapes (the Triton kernels in the interpreter)
into a temporary directory; what needs CUDA reports "skipped: no CUDA".
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGES = {"build": 90, "tests": 150, "smoke": 60, "table": 120, "train": 100}  # seconds, each stage's cap
TESTS = ("tests/test_backend_contract.py", "tests/test_kernels.py", "tests/test_cuda_ops.py",
         "tests/test_regularizer.py", "tests/test_gpu.py")
SPEC = "*layer[1-3]*conv[1-2]:0.6,*layer4*conv[1-2]:0.21"  # ResNet50 2.31× (tpp-method.md §5)
DRY_SPEC = "*layer[1-3]*conv1:0.6"  # ResNet20 (CIFAR): its conv2s feed residual sums
BACKENDS = ("torch", "triton", "cuda")
PARITY_TOLERANCE = 1e-5  # fp32 against float64, relative to the largest magnitude (tests/tolerances.py, fp32)
NO_CUDA = "skipped: no CUDA"


# ------------------------------------------------------------------------------------------------ orchestration
def run_group(cmd: list[str], timeout: float, env: dict, log: Path) -> tuple[int | None, float]:
    """Run ``cmd`` in a new process group, output appended to ``log``; kill the whole group after ``timeout``
    seconds. Returns (exit code or None if killed, seconds)."""
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = child.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            code = None
    return code, time.perf_counter() - start


def tail(path: Path, chars: int = 2000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def child_env(dry_run: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    env.pop("TRITON_INTERPRET", None)
    env.pop("TPP_BACKEND", None)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # the Triton backend on CPU tensors
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every stage's plumbing on tiny CPU shapes")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {tuple(STAGES)}")
    ap.add_argument("--total-s", type=float, default=470.0, help="time for all stages together (default 470)")
    ap.add_argument("--results", default=None, help="default: benchmarks/results (--dry-run: a temporary dir)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--stage-out", help=argparse.SUPPRESS)
    ap.add_argument("--budget-s", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        return run_stage(args)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"--stages: unknown {sorted(unknown)}; known: {list(STAGES)}")

    import machine
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    results = Path(args.results or (tempfile.mkdtemp(prefix="tpp-gpu-check-") if args.dry_run else HERE / "results"))
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"{machine.slug(device)}-{dt.date.today().isoformat()}-gpu-check"
    log = stem.with_suffix(".log")
    log.write_text("")
    summary = {"machine": machine.describe(device), "date": dt.date.today().isoformat(), "dry_run": args.dry_run,
               "results_dir": str(results), "stages": {}}
    deadline = time.perf_counter() + args.total_s
    env = child_env(args.dry_run)
    for name in stages:
        left = deadline - time.perf_counter()
        if left < 5:
            summary["stages"][name] = {"status": "skipped: no time left"}
            continue
        timeout = min(STAGES[name], left)
        out = results / f"stage-{name}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__)), "--stage", name, "--stage-out", str(out),
               "--results", str(results), "--budget-s", f"{timeout:.0f}"] + (["--dry-run"] if args.dry_run else [])
        code, seconds = run_group(cmd, timeout, env, log)
        result = json.loads(out.read_text()) if out.exists() else {}
        if code is None:
            result["status"] = f"cut at its time cap ({timeout:.0f} s)" + (f"; {result['status']}"
                                                                           if "status" in result else "")
        elif code != 0 and "status" not in result:
            result["status"] = f"failed (exit {code})"
        result.setdefault("status", "failed: no result written")
        if not result["status"].startswith(("ok", "skipped")):
            result["log_tail"] = tail(log)
        result.update(seconds=round(seconds, 1), cap_s=round(timeout))
        summary["stages"][name] = result
        write_summary(summary, stem)
        print(f"[gpu-check] {name}: {result['status']} ({seconds:.0f} s)", flush=True)
    write_summary(summary, stem)
    copy_to_out(results, stem)
    print(stem.with_suffix(".md").read_text())
    return 0 if all(s["status"].startswith(("ok", "skipped")) for s in summary["stages"].values()) else 1


def copy_to_out(results: Path, stem: Path) -> None:
    """The summary, its log and the stages' result files into ``$OUT`` (flat: at most 8 files come back)."""
    out = os.environ.get("OUT")
    if not out:
        return
    day = stem.name.removesuffix("-gpu-check")
    date = day[-10:]
    names = [stem.with_suffix(s) for s in (".json", ".md", ".log")]
    names += [results / f"{day}{s}" for s in (".json", ".md")]
    names += sorted(results.glob(f"train-throughput-*-{date}.*"))[:2]
    for path in names:
        if path.exists():
            shutil.copy(path, Path(out) / path.name)


# --------------------------------------------------------------------------------------------------- summary
def write_summary(summary: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(summary))


def markdown(summary: dict) -> str:
    m = summary["machine"]
    lines = [f"# gpu-check — {m['device']} — {summary['date']}" + (" (dry run, CPU)" if summary["dry_run"] else ""),
             "", f"torch {m['torch']}, triton {m['triton']}, Python {m['python']}, CUDA {m['cuda_runtime']}, "
             f"driver {m['driver']}.", "", "| stage | status | seconds (cap) |", "|---|---|---:|"]
    for name, r in summary["stages"].items():
        status = r["status"].replace("|", "/").splitlines()[0]
        lines.append(f"| {name} | {status} | {r.get('seconds', '–')} ({r.get('cap_s', '–')}) |")
    lines.append("")
    for name, r in summary["stages"].items():
        body = r.get("markdown")
        if body:
            lines += [f"## {name}", "", body.rstrip(), ""]
        if r.get("log_tail"):
            lines += [f"<details><summary>{name}: end of the log</summary>", "", "```", r["log_tail"].rstrip(),
                      "```", "", "</details>", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ stages
def run_stage(args) -> int:
    out = Path(args.stage_out)

    def save(result: dict) -> None:
        out.write_text(json.dumps(result, indent=1) + "\n")

    stage = {"build": stage_build, "tests": stage_tests, "smoke": stage_smoke, "table": stage_table,
             "train": stage_train}[args.stage]
    stage(args, save)
    return 0


def stage_build(args, save) -> None:
    import torch

    from tpp_kernels import cuda_build

    home = cuda_build.cuda_home()
    if home is None:
        save({"status": "skipped: no CUDA toolkit (nvcc, CUDA_HOME)"})
        return
    start = time.perf_counter()
    try:
        path = cuda_build.build(verbose=False)
    except cuda_build.BuildError as e:
        save({"status": f"failed: {str(e).splitlines()[0]}", "error": str(e)[-4000:]})
        return
    torch.ops.load_library(str(path))
    with_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("tpp_cuda::gram_penalty_fwd", "CUDA")
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", cuda_build.DEFAULT_ARCH_LIST)
    save({"status": "ok" if with_cuda or not torch.cuda.is_available() else "failed: built without CUDA kernels",
          "library": str(path), "cuda_home": home, "arch_list": arch, "cuda_kernels": with_cuda,
          "markdown": f"`{path}` ({time.perf_counter() - start:.0f} s; CUDA kernels: {with_cuda}, "
                      f"TORCH_CUDA_ARCH_LIST={arch}, CUDA_HOME={home})"})


def stage_tests(args, save) -> None:
    import importlib.util

    import torch

    if args.dry_run or not torch.cuda.is_available():  # the plumbing: the GPU-only file, every test skipped
        files, status = ["tests/test_gpu.py"], NO_CUDA
    else:
        files, status = list(TESTS), None
    report = Path(args.stage_out).with_suffix(".junit.xml")
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-rfEs", f"--junitxml={report}"]
    if status is None and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "4"]  # compile-bound tests: four processes share the GPU
    log = Path(args.stage_out).with_suffix(".log")
    code, seconds = run_group(cmd, (args.budget_s or 150) - 5, dict(os.environ), log)
    counts = junit_counts(report)
    text = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("passed", "failures", "errors", "skipped"))
    lines = [line for line in tail(log, 6000).splitlines() if line.startswith(("FAILED", "ERROR"))]
    result = {"counts": counts, "exit_code": code, "failures": lines[:30],
              "markdown": f"{text} ({' '.join(files)})" + "".join(f"\n- {line}" for line in lines[:30])}
    if code is None:
        result["status"] = f"cut: {text} before the cut"
    elif status is not None:
        result["status"] = f"{status} ({text})" if code == 0 else f"failed (exit {code}): {text}"
    else:
        result["status"] = ("ok: " if code == 0 else "failed: ") + text
    save(result)


def junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


# --- stage 3: the regularizer on the ResNet50 2.31× set -----------------------------------------------------------
def _twin(model_name: str, dtype, device):
    import torch

    from tpp.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name).to(device=device, dtype=dtype)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _zero(model) -> None:
    for p in model.parameters():
        p.grad.zero_()


def _worst(grads: dict, ref: dict) -> float:
    """Largest |g − ref| over all parameters, relative to the largest |ref| (0 when nothing is regularized)."""
    scale = max(float(r.abs().max()) for r in ref.values())
    return max(float((g.double() - ref[n]).abs().max()) for n, g in grads.items()) / (scale or 1.0)


def stage_smoke(args, save) -> None:
    import torch

    from tpp import TPPRegularizer

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    model_name, spec = ("resnet50", SPEC) if not args.dry_run else ("resnet20", DRY_SPEC)
    torch.set_float32_matmul_precision("highest")  # parity at ieee fp32 (the backends follow torch's setting)
    result = {"model": model_name, "spec": spec, "device": str(device), "parity": {}, "sync_free": {}, "graph": {}}
    lines = []

    def publish(status: str) -> None:
        result["status"] = status
        result["markdown"] = "\n".join(lines)
        save(result)

    ref_model = _twin(model_name, torch.float64, device)
    ref = TPPRegularizer(ref_model, spec, backend="torch")
    ref.strength = 1.0
    ref_penalty = ref.penalty()
    ref_penalty.backward()
    ref_autograd = _grads(ref_model)
    _zero(ref_model)
    ref.apply_gradients()
    ref_inplace = _grads(ref_model)
    lines += [f"{model_name} `{spec}`: {len(ref.pruned)} layers, {sum(p.numel() for p in ref.pruned.values())} pruned "
              f"filters, strength 1, on {device}. Parity: float32 against the torch backend in float64 (tolerance "
              f"{PARITY_TOLERANCE:g} of the largest magnitude).", "",
              "| backend | penalty rel. err | autograd grads err | apply_gradients err | parity |",
              "|---|---|---|---|---|"]
    regs = {}
    ok = True
    for backend in BACKENDS:
        try:
            model = _twin(model_name, torch.float32, device)
            reg = TPPRegularizer(model, spec, backend=backend)
            reg.strength = 1.0
            penalty = reg.penalty()
            penalty.backward()
            autograd = _worst(_grads(model), ref_autograd)
            _zero(model)
            reg.apply_gradients()
            inplace = _worst(_grads(model), ref_inplace)
        except Exception as e:  # an unavailable backend is reported, the others still run
            result["parity"][backend] = {"error": f"{type(e).__name__}: {e}"[:500]}
            lines.append(f"| {backend} | – | – | – | error: {type(e).__name__}: {str(e).splitlines()[0][:120]} |")
            ok = False
            continue
        rel = abs(float(penalty) - float(ref_penalty)) / abs(float(ref_penalty))
        passed = max(rel, autograd, inplace) <= PARITY_TOLERANCE
        ok &= passed
        result["parity"][backend] = {"penalty_rel_err": rel, "autograd_err": autograd, "apply_gradients_err": inplace,
                                     "passed": passed}
        lines.append(f"| {backend} | {rel:.2e} | {autograd:.2e} | {inplace:.2e} | {'ok' if passed else 'FAILED'} |")
        regs[backend] = (model, reg)
    publish(("ok" if ok else "failed") + (f" (parity on the CPU; sync and graph checks {NO_CUDA})" if not cuda
                                          else " (parity)"))
    if not cuda:
        return

    import roofline
    from timing import median_seconds

    lines += ["", "| backend | no sync per step | eager apply_gradients µs | graph replay µs | floor µs | "
              "replay / floor |", "|---|---|---:|---:|---:|---:|"]
    rates = roofline.measure(device, (torch.float32,))
    flops = nbytes = 0
    for name, idx in ref.pruned.items():
        w = ref_model.get_submodule(name).weight
        f, b = roofline.gram_work(w.shape[0], w[0].numel(), idx.numel(), "in-place", 4)
        flops, nbytes = flops + f, nbytes + b
    floor = rates.floor(flops, nbytes, "float32")
    result["floor_s"] = floor
    for backend in ("triton", "cuda"):
        if backend not in regs:
            continue
        model, reg = regs[backend]
        sync = _sync_free(reg)
        result["sync_free"][backend] = sync
        eager = median_seconds(reg.apply_gradients, device, 3, 20, 10)
        graph = _graph_replay(reg, device)
        result["graph"][backend] = dict(graph, eager_s=eager)
        replay = graph.get("replay_s")
        cells = [f"{eager * 1e6:.1f}", f"{replay * 1e6:.1f}" if replay else graph.get("error", "–")[:80],
                 f"{floor * 1e6:.1f}", f"{replay / floor:.2f}×" if replay else "–"]
        lines.append(f"| {backend} | {sync} | {' | '.join(cells)} |")
        ok &= sync == "ok" and replay is not None
        publish("ok" if ok else "failed")
    lines += ["", "Floor: the gram term's in-place FLOPs and bytes (`roofline.gram_work`) at the copy bandwidth and "
              "fp32 matmul rate measured here; target: replay ≤ 2× the floor."]
    publish("ok" if ok else "failed")


def _sync_free(reg) -> str:
    import torch

    reg.apply_gradients()
    reg.penalty().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            reg.apply_gradients()
            reg.penalty().backward()
        return "ok"
    except RuntimeError as e:
        return f"syncs: {str(e).splitlines()[0][:100]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def _graph_replay(reg, device) -> dict:
    import torch
    from timing import median_seconds

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            reg.apply_gradients()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            reg.apply_gradients()
    except Exception as e:  # not capturable (yet): say why
        torch.cuda.synchronize()
        return {"error": f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {"replay_s": median_seconds(graph.replay, device, 5, 20, 20)}


# --- stage 4: the timing table ----------------------------------------------------------------------------------
def stage_table(args, save) -> None:
    import torch

    results = Path(args.results)
    budget = (args.budget_s or 120) - 5
    start = time.perf_counter()
    if args.dry_run or not torch.cuda.is_available():  # the plumbing: the smallest layer set, two CPU forms
        runs = [("resnet56-0.3 and (pruned-row or paper)", "cpu", "quick", 1.0)]
        status = NO_CUDA
    else:
        runs = [("resnet50-2.31x and not compiled", "cuda", "full", 0.6), ("resnet50-2.31x and compiled", "cuda",
                                                                            "full", 1.0)]
        status = None
    log = Path(args.stage_out).with_suffix(".log")
    done = []
    for select, device, suite, share in runs:
        left = budget - (time.perf_counter() - start)
        cmd = [sys.executable, str(HERE / "run.py"), "--device", device, "--set", suite, "--only", "layer-sets",
               "--results", str(results), "--", "-k", select]
        code, _ = run_group(cmd, left * share, dict(os.environ), log)
        done.append(f"`{select}`: " + ("cut at its time cap" if code is None else f"exit {code}"))
        day = results / f"{_slug(device)}-{dt.date.today().isoformat()}"
        table = _section(day.with_suffix(".md"), "## Headline" if status is None else "## Layer sets")
        passed = all(d.endswith("exit 0") for d in done)
        save({"status": (f"{status} (CPU plumbing ok)" if status else "ok") if passed else "failed: " + "; ".join(done),
              "runs": done, "json": str(day.with_suffix(".json")),
              "markdown": "\n".join(f"- {d}" for d in done) + "\n\n" + table})


def _slug(device: str) -> str:
    import machine
    import torch

    return machine.slug(torch.device(device))


def _section(path: Path, heading: str) -> str:
    """The section of a markdown report that starts at ``heading``, up to the next section of that level."""
    if not path.exists():
        return ""
    text = path.read_text()
    if heading not in text:
        return ""
    body = text.split(heading, 1)[1]
    return heading + body.split("\n## ", 1)[0]


# --- stage 5: training throughput ---------------------------------------------------------------------------------
def stage_train(args, save) -> None:
    import torch

    results = Path(args.results)
    if args.dry_run or not torch.cuda.is_available():
        extra = ["--device", "cpu", "--model", "resnet20", "--num-classes", "10", "--image-size", "32", "--batch", "4",
                 "--steps", "1", "--repeats", "1", "--warmup", "1", "--variants", "none,torch",
                 "--setting", DRY_SPEC]
        status = NO_CUDA
    else:
        extra = ["--batch", "32,256", "--steps", "5", "--repeats", "3", "--warmup", "3",
                 "--variants", "none,triton,cuda,torch,paper"]
        status = None
    cmd = [sys.executable, str(HERE / "bench_train_throughput.py"), *extra, "--out", str(results)]
    log = Path(args.stage_out).with_suffix(".log")
    code, _ = run_group(cmd, (args.budget_s or 100) - 5, dict(os.environ), log)
    device = "cpu" if status else "cuda"
    stem = results / f"train-throughput-{_slug(device)}-{dt.date.today().isoformat()}"
    table = stem.with_suffix(".md").read_text() if stem.with_suffix(".md").exists() else ""
    if code is None:
        state = "cut at its time cap"
    elif code != 0:
        state = f"failed (exit {code})"
    else:
        state = f"{status} (CPU plumbing ok)" if status else "ok"
    save({"status": state, "json": str(stem.with_suffix(".json")),
          "markdown": table.split("\n", 2)[-1] if table else tail(log, 1500)})


if __name__ == "__main__":
    sys.exit(main())
