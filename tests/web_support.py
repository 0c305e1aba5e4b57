"""HTTP helpers of the web tests: plain GETs that return error answers, basic credentials, and
headless Chromium (its DOM after load, or a screenshot)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import Any


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    """A GET that returns error answers instead of raising them; header names match in any case."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, body = get(url, headers)
    return status, json.loads(body)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _chromium(profile: Path, *args: str) -> str:
    chromium = shutil.which("chromium")
    assert chromium is not None
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM as Chromium has it after loading ``url``."""
    return _chromium(profile, "--dump-dom", url)


def screenshot(url: str, profile: Path, out: Path, size: tuple[int, int] = (1400, 1000)) -> Path:
    """A PNG of the page as Chromium draws it, images loaded."""
    _chromium(profile, "--hide-scrollbars", "--force-device-scale-factor=1", f"--window-size={size[0]},{size[1]}",
              f"--screenshot={out}", url)
    assert out.is_file() and out.stat().st_size > 0
    return out
