"""The repository speaks of the product only, and its documentation points at files that exist.

Every tracked text file and every tracked file name is checked for the language of a development process rather
than of the product: numbered work sessions, ticket numbers, a diary of experiments, the development machines and
their quotas, citations of an outside design document, run-history stage names (a stage number with a letter) and run
folders named after them, commit hashes used as pointers, and dates in file names. Each hit is reported as file:line.

The patterns are assembled from fragments so that this file does not match itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".safetensors", ".bin", ".pt", ".onnx", ".whl", ".ico"}

SES = "sess" + "ion"
TEXT_PATTERNS = {
    "numbered work session": re.compile(r"\b" + SES + r"s?[ -]?\d", re.I),
    "work session": re.compile(r"\b(?:this|that|next|previous|earlier|each|every) " + SES + r"\b", re.I),
    "ticket number": re.compile(r"\biss" + r"ues? ?#?\d", re.I),
    "work item as a source": re.compile(r"\b(?:from|in|per|by) the iss" + r"ue\b(?! with)", re.I),
    "ticket reference": re.compile(r"\bthe iss" + r"ue's\b", re.I),
    "experiment diary": re.compile(r"\blab note" + r"book", re.I),
    "development machine": re.compile(r"\b(?:2|two)[- ]c" + r"ore\b|\bthis C" + r"PU\b", re.I),
    "borrowed device": re.compile(r"\bl" + r"ent (?:GPU|device|machine|H100|H200)\b|\b(?:this|next|one|a) le" + r"ase\b",
                                  re.I),
    "design-document citation": re.compile(r"\bDES" + r"IGN(?:\.md| ?\u00a7| section)|\u00a7 ?\d"),
    "run-history stage name": re.compile(r"\bstages?[- ]1[a-g]\b|\b1[b-g]-1[b-g]\b", re.I),
    "run folder named after a work session": re.compile(r"\bs1\d_[a-z]|\bruns/s\d+_"),
    "commit hash as a pointer": re.compile(r"\bgit [0-9a-f]{7,40}\b"),
}
NAME_PATTERNS = {
    "work session in a file name": re.compile(SES, re.I),
    "ticket in a file name": re.compile(r"iss" + r"ue[-_ ]?\d", re.I),
    "notebook in a file name": re.compile(r"note" + r"book", re.I),
    "stage name in a file name": re.compile(r"stage[-_]?1[a-g]", re.I),
    "date in a file name": re.compile(r"20\d\d-\d\d-\d\d"),
}


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked-file list is unavailable")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def read_text(path: Path) -> str | None:
    """The file's text, or None for binaries (by suffix or by a NUL byte) and files that are gone or not UTF-8."""
    if path.suffix.lower() in BINARY_SUFFIXES or not path.is_file():
        return None
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_patterns_catch_process_language_and_spare_product_words():
    hits = {
        "numbered work session": f"what {SES} 17 found",
        "work session": f"measured in this {SES}",
        "ticket number": "as iss" + "ue 10 asked",
        "work item as a source": "controls from the iss" + "ue",
        "experiment diary": "the whole lab note" + "book",
        "development machine": "on the 2-c" + "ore machine",
        "borrowed device": "on the l" + "ent GPU",
        "design-document citation": "see DES" + "IGN \u00a76",
        "run-history stage name": "the stage-1" + "g base",
        "run folder named after a work session": "runs/s1" + "3_highnoise3",
        "commit hash as a pointer": "git 5ee4" + "fae:assets/toy",
    }
    for name, text in hits.items():
        assert TEXT_PATTERNS[name].search(text), name
    fine = ["holder.session(adapter, folder)", "a gradio session", "CPU, 2 cores", "stage 1 of 3", "the issue with",
            "reachable from this machine", "release notes", "sha256 of the weights"]
    for text in fine:
        assert not any(p.search(text) for p in TEXT_PATTERNS.values()), text
    assert NAME_PATTERNS["date in a file name"].search("gpu_h100_2026-11-28.md")
    assert not any(p.search("bench/results/toy_ablation_rows.json") for p in NAME_PATTERNS.values())


def test_tracked_text_speaks_of_the_product_only():
    problems = []
    for rel in tracked_files():
        for name, pattern in NAME_PATTERNS.items():
            if pattern.search(rel):
                problems.append(f"{rel}: {name}")
        text = read_text(ROOT / rel)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for name, pattern in TEXT_PATTERNS.items():
                m = pattern.search(line)
                if m:
                    problems.append(f"{rel}:{lineno}: {name}: {m.group(0)!r}")
    assert not problems, "process language in tracked files:\n" + "\n".join(problems)


LINK = re.compile(r"\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:annotate|assets|bench|demo|docs|multicrafter|tests|train)/[\w./-]*[\w/])")
PLACEHOLDER = re.compile(r"(?<![a-z])(?:ROW|NAME|BASE|DIR|MODEL|ADAPTER|OWNER|PNG|N)(?![a-z])|\.\.|\*")  # toy_adapter_ROW.yaml


def test_documentation_points_at_existing_files():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench" / "results").glob("*.md")),
            ROOT / "multicrafter/assets/toy/TRAINING.md", ROOT / "multicrafter/assets/toy_vae/README.md"]
    problems = []
    for doc in docs:
        if not doc.is_file():
            continue
        text = doc.read_text(encoding="utf-8")
        for m in LINK.finditer(text):
            target = m.group(1)
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                problems.append(f"{doc.relative_to(ROOT)}: link to a missing file: {target}")
        for m in REPO_PATH.finditer(text):
            path = m.group(1).rstrip(".")
            if PLACEHOLDER.search(path):
                continue
            if not (ROOT / path).exists():
                problems.append(f"{doc.relative_to(ROOT)}: names a missing file: {path}")
    assert not problems, "\n".join(problems)
