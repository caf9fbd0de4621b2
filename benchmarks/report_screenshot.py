"""A picture of one section of a `lmforge report` page, for the README (docs/report_card.png).

    python benchmarks/report_screenshot.py CARD_DIR [--section memorisation] [--out docs/report_card.png]
                                           [--width 900]

Opens CARD_DIR/report.html in headless Chromium (Debian's, through Playwright; nothing is fetched:
the page is self-contained) and saves the section's element as a PNG. The page comes from
`lmforge report MODEL --out CARD_DIR`; `make results-report-card` reports the memorisation benchmark's
over-fit model and saves its memorisation section as docs/report_card.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-extensions", "--no-first-run", "--disable-sync"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("card", help="a report's output directory (holds report.html)")
    p.add_argument("--section", default="memorisation", help="the section's id: bias, memorisation, energy, explanations")
    p.add_argument("--out", default="docs/report_card.png")
    p.add_argument("--width", type=int, default=900, help="viewport width in CSS pixels")
    a = p.parse_args(argv)
    page_file = Path(a.card) / "report.html"
    if not page_file.is_file():
        raise SystemExit(f"report-screenshot: {page_file} does not exist; run `lmforge report MODEL --out {a.card}` first")
    from playwright import sync_api

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": a.width, "height": 800})
            page.goto(page_file.resolve().as_uri())
            section = page.locator(f"section#{a.section}")
            if section.count() != 1:
                raise SystemExit(f"report-screenshot: {page_file} has no section '{a.section}'")
            section.screenshot(path=a.out)
        finally:
            browser.close()
    print(f"report-screenshot: wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
