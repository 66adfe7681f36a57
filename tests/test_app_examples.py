"""Example cache: one set of files per size (no stale files across sizes), each written atomically."""

from __future__ import annotations

from PIL import Image

import multicrafter.io
from demo.examples import make_examples


def test_examples_at_two_sizes_do_not_share_files(tmp_path, monkeypatch):
    written = []
    real = multicrafter.io.save_image_atomic

    def recording(image, path, *a, **kw):
        written.append(str(path))
        return real(image, path, *a, **kw)

    monkeypatch.setattr(multicrafter.io, "save_image_atomic", recording)
    small = make_examples(tmp_path, size=64)
    large = make_examples(tmp_path, size=96)
    for examples, size in ((small, 64), (large, 96)):
        for ex in examples:
            assert Image.open(ex.scene).size == (size, size)
            assert all(Image.open(m).size == (size, size) for m in ex.masks)
            assert f"_{size}_" in ex.scene
    files = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(written) == sorted(str(tmp_path / f) for f in files)   # every file went through the atomic writer
    assert not set(small[0].references) & set(large[0].references)
    again = make_examples(tmp_path, size=64)                            # cached: nothing rewritten
    assert [e.scene for e in again] == [e.scene for e in small] and len(written) == len(files)
