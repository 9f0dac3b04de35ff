"""The README's example runs as written."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    reg = scope["reg"]
    assert reg.phase == "done"
    assert list(reg.pruned) == [f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2)]
    model = scope["model"]
    for name, idx in reg.pruned.items():  # zeroed during stabilize, kept at zero
        assert not model.get_submodule(name).weight[idx].any()
    small, x = scope["small"], scope["x"]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    model.eval()
    small.eval()
    torch.testing.assert_close(small(x), model(x))


def test_readme_modern_example_runs(capsys):
    text = README.read_text(encoding="utf-8")
    section = text.split("## Modern networks", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    out = capsys.readouterr().out
    assert "(3.210x fewer)" in out and "target speedup 2.3x (uniform" in out
    assert abs(scope["reg"].speedup_search.speedup / 2.3 - 1) <= 0.02
