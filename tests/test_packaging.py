"""What a wheel carries: pyproject's package data must cover every file the embedded toy model and the tiny
model's tokenizers are made of, so `pip install` (not only a clone) runs `toy` offline."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")   # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "multicrafter"


def _package_data() -> set[Path]:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["multicrafter"]
    return {p.relative_to(PACKAGE) for pattern in patterns for p in PACKAGE.glob(pattern) if p.is_file()}


def test_the_wheel_carries_the_toy_model_and_the_tokenizers_but_not_the_training_vae():
    shipped = _package_data()
    toy = {p.relative_to(PACKAGE) for p in (PACKAGE / "assets" / "toy").rglob("*") if p.is_file()}
    tokenizers = {p.relative_to(PACKAGE) for p in (PACKAGE / "assets").glob("tokenizer_*/*.json")}
    assert toy and tokenizers
    assert toy - shipped == set() and tokenizers - shipped == set()
    assert Path("assets/toy/adapters/ippo/moe_lora.safetensors") in shipped        # the default adapter, whole
    assert not any(p.parts[:2] == ("assets", "toy_vae") for p in shipped)
