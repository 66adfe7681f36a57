"""Retake the README screenshots: the app in headless Debian chromium (Playwright), one PNG per tab, each tab in use.

    python docs/screenshots.py [--model toy] [--out docs/screenshots]

Generate: the first offline example with its result. Attention: the same inputs with the Dice-loss adapter beside
the adapter switched off. Annotate: a held-out ToyWorld scene, a box around one subject, its mask and reference crop.
Train: a short `tiny_pretrain.yaml` run with its live log and curves (stopped after the shot).

Everything runs locally (requests that leave the local server are blocked); the model is the app's default (`toy`,
or `tiny` when the toy model is not installed: the app says which in its header). The app works in a scratch folder
given by relative paths, and the run folder the Train tab prints is shown relative to it, so no temporary path
appears on screen. PNGs are palette-compressed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHROMIUM = os.environ.get("MULTICRAFTER_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TRAIN_STEPS_SHOWN = 40     # the Train shot is taken once the run has logged this many steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compress(path: Path) -> None:
    """Rewrite a screenshot as a 256-colour PNG (flat UI colours survive; files shrink 2-4x)."""
    from PIL import Image

    with Image.open(path) as im:
        q = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    q.save(path, optimize=True)


def annotation_scene(folder: Path, margin: int = 4) -> tuple[Path, str, str, list[tuple[int, int]]]:
    """A held-out ToyWorld scene: (image, its caption, one subject's name, two corners of a box around it)."""
    subprocess.run([sys.executable, "-m", "multicrafter.toyworld", "--out", str(folder), "--n", "1", "--seed", "5",
                    "--split", "test", "--size", "256"], check=True, cwd=ROOT, capture_output=True)
    line = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
    subject = line["subjects"][1]
    x0, y0, x1, y1 = subject["box"]
    corners = [(max(0, x0 - margin), max(0, y0 - margin)), (min(255, x1 + margin), min(255, y1 + margin))]
    return folder / line["file_name"], line["caption"], subject["name"], corners


def click_image_pixel(page, selector: str, xy: tuple[int, int]) -> None:
    """Click the displayed image at image pixel `xy` (the image is scaled to fit its box, keeping its aspect)."""
    img = page.locator(f"{selector} img").first
    img.wait_for(state="visible", timeout=30_000)
    box = img.bounding_box()
    nw, nh = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
    scale = min(box["width"] / nw, box["height"] / nh)
    x0 = box["x"] + (box["width"] - nw * scale) / 2
    y0 = box["y"] + (box["height"] - nh * scale) / 2
    page.mouse.click(x0 + (xy[0] + 0.5) * scale, y0 + (xy[1] + 0.5) * scale)


def take(model: str, out: Path, width: int = 1400, height: int = 1000,
         attention_adapter: str | None = None) -> list[Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # offline: Annotate uses local SAM 2 weights or GrabCut, no download
    from playwright.sync_api import sync_playwright

    from demo import AppConfig, build_app, launch_kwargs

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)   # the app's folders are relative, so the Annotate and Train tabs show no temporary path
        cfg = AppConfig(model=model, data_dir=Path("datasets"), runs_dir=Path("runs"), output_dir=Path("outputs"))
        image, caption, subject, corners = annotation_scene(Path(tmp) / "scene")
        demo = build_app(model, config=cfg)
        port = _free_port()
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                    **launch_kwargs(demo))
        url = f"http://127.0.0.1:{port}"
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page(viewport={"width": width, "height": height})
                page.route("**/*", lambda r: r.continue_() if r.request.url.startswith((url, "data:", "blob:"))
                           else r.abort())
                page.goto(url, wait_until="load")
                page.wait_for_selector("#gen-run", timeout=120_000)

                def shot(name: str) -> None:
                    path = out / f"{name}.png"
                    page.screenshot(path=str(path), full_page=True)
                    compress(path)
                    written.append(path)

                # Generate: the first offline example fills the form and runs
                page.locator("table tbody tr").first.click()
                page.wait_for_selector("#gen-result img", timeout=180_000)
                page.wait_for_function("document.querySelector('#gen-notes').innerText.includes('Saved')",
                                       timeout=120_000)
                shot("generate")

                # Attention: the same inputs, the Dice-loss adapter beside the adapter switched off
                page.get_by_role("tab", name="Attention").click()
                page.get_by_role("button", name="Copy inputs from the Generate tab").click()
                page.wait_for_function("document.querySelector('#attn-prompt textarea').value.length > 0",
                                       timeout=20_000)
                if attention_adapter:
                    page.locator("#attn-adapter input").click()
                    page.get_by_role("option", name=attention_adapter, exact=True).click()
                page.locator("#attn-run").click()
                page.wait_for_selector("#attn-on img", timeout=180_000)
                page.wait_for_timeout(500)
                shot("attention")

                # Annotate: a scene, a two-corner box around one subject -> its mask and reference crop
                page.get_by_role("tab", name="Annotate").click()
                page.locator("#ann-image input[type=file]").set_input_files(str(image))
                page.get_by_label("box (two corners)").check()
                for corner in corners:
                    click_image_pixel(page, "#ann-image", corner)
                    page.wait_for_timeout(700)
                page.wait_for_selector("#ann-mask img", timeout=120_000)
                page.locator("#ann-dataset input").fill("shapes")
                page.locator("#ann-subject textarea, #ann-subject input").first.fill(subject)
                page.locator("#ann-caption textarea").fill(caption)
                page.wait_for_timeout(800)
                shot("annotate")

                # Train: a short run of the tiny model, shot while its curves grow, then stopped. The status line
                # names the run folder; it is shown as the app's --runs-dir gave it (runs/NAME), on every redraw.
                page.evaluate("""prefix => {
                    const fix = root => {
                        const walk = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
                        for (let n = walk.nextNode(); n; n = walk.nextNode())
                            if (n.nodeValue.includes(prefix)) n.nodeValue = n.nodeValue.split(prefix).join("");
                    };
                    new MutationObserver(() => fix(document.body)).observe(
                        document.body, {subtree: true, childList: true, characterData: true});
                }""", str(Path(tmp).resolve()) + "/")
                page.get_by_role("tab", name="Train").click()
                page.wait_for_selector("#train-start", state="visible", timeout=30_000)
                steps = page.get_by_label("Max steps (0 = config)")
                steps.fill(str(TRAIN_STEPS_SHOWN * 10))
                page.get_by_label("Run name (optional)").fill("tiny-demo")
                page.locator("#train-start").click()
                metrics = Path("runs") / "tiny-demo" / "metrics.jsonl"
                for _ in range(600):   # at most 5 minutes
                    if metrics.is_file() and len(metrics.read_text().splitlines()) >= TRAIN_STEPS_SHOWN:
                        break
                    page.wait_for_timeout(500)
                else:
                    raise RuntimeError(f"the training run did not log {TRAIN_STEPS_SHOWN} steps in 5 minutes")
                page.wait_for_timeout(2500)   # the next log line redraws the curves with the latest records
                shot("train")
                page.locator("#train-stop").click()
                page.wait_for_timeout(1000)
                browser.close()
        finally:
            demo.close()
            os.chdir(here)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy", help="toy (default; falls back to tiny when not installed) or a folder")
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    p.add_argument("--attention-adapter", default="attn",
                   help="adapter picked in the Attention tab (default attn: the Dice-loss row; '' keeps the default)")
    args = p.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"error: chromium not found at {CHROMIUM} (apt-get install -y chromium, or set MULTICRAFTER_CHROMIUM)")
    for path in take(args.model, Path(args.out), attention_adapter=args.attention_adapter or None):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
