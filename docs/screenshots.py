"""Retake the README screenshots: the app in headless Debian chromium (Playwright), one PNG per tab, with a generation
and its attention maps on the first offline example.

    python docs/screenshots.py [--model toy] [--out docs/screenshots]

Everything runs locally (requests that leave the local server are blocked); the model is the app's default (`toy`,
or `tiny` when the toy model is not installed: the app says which in its header).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHROMIUM = os.environ.get("MULTICRAFTER_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def take(model: str, out: Path, width: int = 1400, height: int = 1000,
         attention_adapter: str | None = None) -> list[Path]:
    from playwright.sync_api import sync_playwright

    from demo import AppConfig, build_app, launch_kwargs

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = AppConfig(model=model, data_dir=root / "data", runs_dir=root / "runs", output_dir=root / "out")
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
                    written.append(path)

                page.locator("table tbody tr").first.click()  # first offline example: fills and runs
                page.wait_for_selector("#gen-result img", timeout=180_000)
                page.wait_for_function("document.querySelector('#gen-notes').innerText.includes('Saved')",
                                       timeout=120_000)
                shot("generate")
                page.get_by_role("tab", name="Attention").click()
                page.get_by_role("button", name="Copy inputs from the Generate tab").click()
                page.wait_for_function("document.querySelector('#attn-prompt textarea').value.length > 0",
                                       timeout=20_000)
                if attention_adapter:  # e.g. the Dice-loss adapter, so the shot shows localised maps beside "off"
                    page.locator("#attn-adapter input").click()
                    page.get_by_role("option", name=attention_adapter, exact=True).click()
                page.locator("#attn-run").click()
                page.wait_for_selector("#attn-on img", timeout=180_000)
                page.wait_for_timeout(500)
                shot("attention")
                for tab, selector in (("Annotate", "#ann-image"), ("Train", "#train-start")):
                    page.get_by_role("tab", name=tab).click()
                    page.wait_for_selector(selector, state="visible", timeout=30_000)
                    page.wait_for_timeout(300)
                    shot(tab.lower())
                browser.close()
        finally:
            demo.close()
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
