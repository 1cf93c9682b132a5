"""Take the console's screenshots in docs/: ``python docs/screenshots.py``.

Starts ``countersign serve`` on a throwaway SQLite file (demo model) on 127.0.0.1, drives a
headless Chromium through a chat, an approval card and the inbox, saves three PNGs next to this
file and stops the server by its PID. Needs the test extra (Playwright) and a Chromium
(``apt-get install -y chromium``, or Playwright's own).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.async_api import async_playwright

HERE = Path(__file__).resolve().parent
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def shoot(base: str) -> None:
    async with async_playwright() as playwright:
        own = Path(playwright.chromium.executable_path)
        path = str(own) if own.exists() else "/usr/bin/chromium"
        browser = await playwright.chromium.launch(executable_path=path, args=ARGS)
        page = await browser.new_page(viewport={"width": 1100, "height": 760})
        await page.goto(base)
        await page.get_by_label("Email").fill("ada@example.test")
        await page.get_by_label("Password").fill("correct horse battery staple")
        await page.get_by_role("button", name="Register").click()
        await page.get_by_role("button", name="New session").click()
        await page.get_by_role("button", name="Rename").click()
        await page.get_by_label("Title").fill("Release notes")
        await page.get_by_role("button", name="Save").click()
        await page.get_by_label("Message").fill("Draft the **release notes** for version 2.")
        await page.get_by_role("button", name="Send").click()
        await page.get_by_text("You said").wait_for()
        await page.screenshot(path=HERE / "console-chat.png")
        await page.get_by_label("Message").fill(
            '/tool write_file {"path": "NOTES.md", "content": "# Version 2"}'
        )
        await page.get_by_role("button", name="Send").click()
        await page.get_by_role("article", name="Approval: write_file").wait_for()
        await page.wait_for_timeout(1500)
        await page.screenshot(path=HERE / "console-approval.png")
        before = page.url
        await page.get_by_role("button", name="New session").click()
        await page.wait_for_url(lambda url: url != before)
        await page.get_by_label("Message").fill('/tool shell {"command": "git status"}')
        await page.get_by_role("button", name="Send").click()
        await page.get_by_role("article", name="Approval: shell").wait_for()
        await page.get_by_role("link", name="Approvals (2)").click()
        await page.get_by_text("Approvals waiting for you").wait_for()
        await page.wait_for_timeout(500)
        await page.screenshot(path=HERE / "console-inbox.png")
        await browser.close()


def main() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COUNTERSIGN_")}
        env.update(
            COUNTERSIGN_DATABASE_URL=f"sqlite+aiosqlite:///{folder}/countersign.db",
            COUNTERSIGN_WORKSPACE_ROOT=f"{folder}/workspaces",
            COUNTERSIGN_LOG_LEVEL="WARNING",
        )
        command = [sys.executable, "-m", "countersign", "serve", "--host", "127.0.0.1"]
        server = subprocess.Popen([*command, "--port", str(port)], env=env)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            asyncio.run(asyncio.wait_for(shoot(f"http://127.0.0.1:{port}/"), 120))
        finally:
            server.terminate()
            server.wait(15)
    print("wrote", ", ".join(f"docs/{name}" for name in
                             ("console-chat.png", "console-approval.png", "console-inbox.png")))


if __name__ == "__main__":
    main()
