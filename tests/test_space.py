"""Deployment: `python -m multicrafter.space` writes a self-contained Space folder that serves /generate from inside
itself, refuses to overwrite, and the packaging metadata declares exactly the pinned requirements."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from multicrafter import space
from multicrafter.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith(("#", "-r"))]


def test_pyproject_declares_the_pinned_runtime_and_dev_requirements():
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime, dev = _pins(REPO / "requirements.txt"), _pins(REPO / "requirements-dev.txt")
    assert project["dependencies"] == runtime and project["optional-dependencies"]["dev"] == dev
    assert "-r requirements.txt" in (REPO / "requirements-dev.txt").read_text().splitlines()
    tools = {"pytest", "playwright", "ruff"}
    assert not tools & {r.split("==")[0] for r in runtime} and tools <= {r.split("==")[0] for r in dev}
    assert all("==" in r for r in runtime + dev)


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n", 2)[1])


def _space_env(folder: Path) -> dict:
    """The environment of a process started in the Space folder: offline, and nothing of the checkout on its path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MULTICRAFTER_TOY_DIR", "SPACE_ID")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONNOUSERSITE="1",
               OMP_NUM_THREADS="1", TMPDIR=str(folder.parent))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("space") / "MultiCrafter"
    info = space.build_space(out)
    return out, info


def test_space_folder_holds_the_app_and_nothing_else(built):
    out, info = built
    names = {p.name for p in out.iterdir()}
    assert names == {"app.py", "README.md", "requirements.txt", "LICENSE", "multicrafter", "annotate", "demo", "train"}
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert info["files"] == len(files)
    assert not [f for f in files if f.suffix in (".pyc", ".sh") or "__pycache__" in f.parts or f.parts[0] == "tests"]
    assert (out / "multicrafter/assets/toy/model_index.json").is_file()
    assert not (out / "multicrafter/assets/toy_vae").exists()                    # only the toy recipe needs it
    assert (out / "multicrafter/assets/tokenizer_t5/tokenizer.json").is_file()   # the tiny model's tokenizers
    assert (out / "train/configs/toy_adapter_attn.yaml").is_file() and not (out / "train/configs/recipe").exists()
    assert (out / "requirements.txt").read_text() == (REPO / "requirements.txt").read_text()

    meta = _front_matter((out / "README.md").read_text())
    gradio_pin = next(r for r in _pins(REPO / "requirements.txt") if r.startswith("gradio=="))
    assert meta["sdk"] == "gradio" and f"gradio=={meta['sdk_version']}" == gradio_pin
    assert meta["app_file"] == "app.py" and meta["license"] == "apache-2.0" and meta["pinned"] is False
    assert len(meta["short_description"]) <= 60 and meta["title"] and meta["emoji"]
    assert meta["models"] == ["black-forest-labs/FLUX.1-dev", "bytedance-research/UNO"]
    assert {meta["colorFrom"], meta["colorTo"]} <= {"red", "yellow", "green", "blue", "indigo", "purple", "pink",
                                                    "gray"}


def test_space_refuses_to_overwrite_and_force_replaces(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        space.build_space(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["s"]
    for bad in (REPO, REPO / "multicrafter" / "x", REPO / "multicrafter" / "assets" / "toy" / "x"):
        with pytest.raises(UserError):
            space.build_space(bad, force=True)
    assert (REPO / "app.py").is_file() and not (REPO / "multicrafter" / "x").exists()
    space.build_space(out, force=True)
    assert not (out / "keep.txt").exists() and (out / "app.py").is_file()
    assert sorted(os.listdir(tmp_path)) == ["s"]          # no temporary or old folder left beside it


def test_space_cli_prints_one_line_errors_and_the_upload_command(tmp_path):
    cmd = [sys.executable, "-m", "multicrafter.space"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    bad = subprocess.run([*cmd, "--out", str(tmp_path / "full")], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--force" in bad.stderr
    adapter = subprocess.run([*cmd, "--out", str(tmp_path / "a"), "--adapter", str(tmp_path)], capture_output=True,
                             text=True, cwd=REPO)
    assert adapter.returncode == 2 and "not an adapter folder" in adapter.stderr and not (tmp_path / "a").exists()
    ok = subprocess.run([*cmd, "--out", str(tmp_path / "new"), "--adapter", str(REPO / "multicrafter/assets/toy/adapters/attn")],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert f"hf upload OWNER/NAME {tmp_path / 'new'} --repo-type space" in ok.stdout
    assert "MULTICRAFTER_MODEL=black-forest-labs/FLUX.1-dev" in ok.stdout
    assert "MULTICRAFTER_ADAPTER=adapters/attn" in ok.stdout
    assert (tmp_path / "new/adapters/attn/adapter_config.json").is_file()


@pytest.mark.slow
def test_the_space_folder_serves_generate_from_inside_itself(built, tmp_path):
    """The app started in the Space folder (not the checkout) imports only the folder's packages and generates."""
    gradio_client = pytest.importorskip("gradio_client")
    from gradio_client import handle_file

    from tests.app_fixtures import toy_refs

    out, _ = built
    env = _space_env(out)
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, app, multicrafter, demo, annotate, train\n"
         "print('\\n'.join(m.__file__ for m in (app, multicrafter, demo, annotate, train)))\n"
         f"print(any(p and __import__('os').path.realpath(p) == {str(REPO)!r} for p in sys.path))"],
        cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    *paths, repo_on_path = probe.stdout.split()
    assert all(Path(p).resolve().is_relative_to(out) for p in paths) and repo_on_path == "False", probe.stdout

    port = _free_port()
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--model", "toy", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client, deadline = None, time.time() + 300
        while client is None and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                client = gradio_client.Client(f"http://127.0.0.1:{port}", verbose=False)
            except Exception:   # not serving yet
                time.sleep(1.0)
        assert client is not None, (tmp_path / "app.log").read_text()[-3000:]
        refs, _, prompt = toy_refs(tmp_path / "refs")
        adapter = sorted(p.name for p in (out / "multicrafter/assets/toy/adapters").iterdir())[0]
        img, download, params, notes = client.predict(
            references=[{"image": handle_file(r), "caption": None} for r in refs], name_1="a", name_2="b",
            name_3="", name_4="", prompt=prompt, seed=1, steps=2, guidance=1.0, height=64, width=64,
            adapter=adapter, adapter_folder="", api_name="/generate")
        from PIL import Image

        assert Image.open(img).size == (64, 64) and Path(download).is_file()
        assert (out / "outputs").is_dir()       # the app wrote its outputs inside the Space folder
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()
