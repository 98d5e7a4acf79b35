"""Debian's chromium driven by Playwright, for the web pages' tests: one launch for every
browser test, that may reach nothing but the gateway on 127.0.0.1.

Playwright's own browser download does not work on these machines; `./dev` installs
Debian's `chromium`. Where it is missing, a test is skipped, but not under CI (``CI`` set):
there a browser test that cannot run is a failure, never a quiet skip.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # without these, the closed network refuses its calls home
    "--disable-component-update",
    "--disable-sync",
]
LOCAL = re.compile(r"^(http://127\.0\.0\.1:\d+/|data:|blob:)")


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    why = "Debian's chromium is not installed at /usr/bin/chromium (./dev installs it)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


@asynccontextmanager
async def local_chromium(user_dir: Path, offsite: list[str] | None = None) -> AsyncIterator[Any]:
    """A fresh chromium context (its own user-data dir) whose requests anywhere but
    127.0.0.1 are refused, and recorded in `offsite`."""
    require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(user_dir), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        context.set_default_timeout(30_000)

        async def only_local(route: Any) -> None:
            if LOCAL.match(route.request.url):
                await route.continue_()
            else:
                if offsite is not None:
                    offsite.append(route.request.url)
                await route.abort()

        await context.route("**/*", only_local)
        try:
            yield context
        finally:
            await context.close()
