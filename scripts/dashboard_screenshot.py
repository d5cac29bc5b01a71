"""A screenshot of the dashboard (the README's picture) with Debian's headless Chromium.

Serves a runs directory on a free loopback port with a throwaway token, opens the dashboard
of one run and saves a full-page PNG:

    .venv/bin/python scripts/dashboard_screenshot.py --runs-dir runs --run shapes \\
        --out docs/images/dashboard.png
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from playwright.sync_api import sync_playwright

from services.api.server import ApiServer

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--run", help="run to show (default: the most recently updated)")
    ap.add_argument("--out", default="docs/images/dashboard.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--width", type=int, default=1280)
    args = ap.parse_args()
    token = secrets.token_urlsafe(32)
    server = ApiServer(args.runs_dir, token, "127.0.0.1", 0).start()
    query = f"?run={args.run}" if args.run else ""
    profile = tempfile.mkdtemp(prefix="elborl-chromium-")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile,
            executable_path=args.chromium,
            headless=True,
            args=FLAGS,
            viewport={"width": args.width, "height": 900},
        )
        page = ctx.new_page()
        page.goto(f"{server.url}/{query}#token={token}", timeout=30_000)
        page.wait_for_selector("#main:not([hidden])", timeout=30_000)
        page.wait_for_function(
            "document.querySelectorAll('#reward-chart circle.pt').length >= 2 && "
            "document.getElementById('samples-img').naturalWidth > 0",
            timeout=30_000,
        )
        page.screenshot(path=args.out, full_page=True)
        ctx.close()
    server.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
