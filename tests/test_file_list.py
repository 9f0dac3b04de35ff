"""ImageFolder's file list is scanned once and reused while the folder's listing is unchanged; a change is seen."""
import os
import time

import pytest
from PIL import Image
from torchvision import datasets

from tpp.train.file_list import ListedImageFolder, cache_dir


def _tree(root, files, age_s=60):
    """Files written under ``root``, then every folder's timestamp set ``age_s`` back (a settled listing)."""
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 3)).save(path)
    old = time.time_ns() - int(age_s * 1e9)
    for folder in [root, *[p for p in root.iterdir() if p.is_dir()]]:
        os.utime(folder, ns=(old, old))


def test_file_list_is_cached_until_the_folder_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("TPP_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "train"
    _tree(root, ["cat/1.png", "cat/2.png", "dog/1.png"])
    first = ListedImageFolder(str(root))
    assert [(p.split("train/")[1], t) for p, t in first.samples] == [("cat/1.png", 0), ("cat/2.png", 0),
                                                                    ("dog/1.png", 1)]
    assert len(list(cache_dir().iterdir())) == 1
    scans = []
    scan = datasets.ImageFolder.make_dataset

    def counted(*args, **kwargs):
        scans.append(args[0])
        return scan(*args, **kwargs)

    monkeypatch.setattr(datasets.ImageFolder, "make_dataset", staticmethod(counted))
    again = ListedImageFolder(str(root))
    assert scans == [] and again.samples == first.samples and again.classes == ["cat", "dog"]
    _tree(root, ["dog/2.png"], age_s=0)                      # a new file: its class folder's listing changed now
    changed = ListedImageFolder(str(root))
    assert len(scans) == 1 and [t for _, t in changed.samples] == [0, 0, 1, 1]
    ListedImageFolder(str(root))                            # just changed: scanned again, not cached yet
    assert len(scans) == 2
    _tree(root, [], age_s=30)                                # settled
    ListedImageFolder(str(root))
    assert ListedImageFolder(str(root)).samples == changed.samples and len(scans) == 3


def test_unreadable_cache_falls_back_to_scanning(tmp_path, monkeypatch):
    monkeypatch.setenv("TPP_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "val"
    _tree(root, ["a/1.png"])
    ListedImageFolder(str(root))
    for entry in cache_dir().iterdir():
        entry.write_text("{not json")
    assert [t for _, t in ListedImageFolder(str(root)).samples] == [0]
    with pytest.raises(FileNotFoundError):                   # an empty class folder is ImageFolder's error, as before
        _tree(root, [])
        (root / "b").mkdir()
        ListedImageFolder(str(root))
