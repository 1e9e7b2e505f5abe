"""Screenshot of a `diffgen view` gallery in headless Chromium (Playwright driving the system browser).

    diffgen view samples/samples.sdf --out /tmp/gallery.html
    python benchmarks/gallery_screenshot.py /tmp/gallery.html samples/gallery.png

Needs `pip install playwright` and a Chromium on PATH (Debian: `apt-get install chromium`); WebGL runs on
SwiftShader, so no GPU is needed. Waits until the visible cards have their 3D views, then shoots the viewport.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args()
    browser_path = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if browser_path is None:
        raise SystemExit("error: no Chromium on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--enable-unsafe-swiftshader"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(args.html.resolve().as_uri())
        page.wait_for_function("document.querySelectorAll('.card canvas').length >= 10", timeout=30_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(args.png))
        browser.close()
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
