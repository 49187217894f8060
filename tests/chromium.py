"""Headless Chromium for the tests that render a page: a screenshot, its PNG summary read by hand, the DOM."""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.requirements import under_ci

CHROMIUM = Path("/usr/bin/chromium")


def png_summary(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the decompressed image data) from a PNG, by hand."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    offset, width, height, idat = 8, 0, 0, b""
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        offset += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def run_chromium(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{name}"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        *args,
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, f"chromium exited {result.returncode}: {result.stderr[-2000:]}"
    return result


def screenshot_and_dom(tmp_path: Path, url: str, size: tuple[int, int]) -> tuple[Path, tuple[int, int, int], str]:
    """Render `url` in headless Chromium at `size`: the screenshot's path, its png_summary, and the DOM."""
    shot = tmp_path / f"shot-{size[0]}x{size[1]}.png"
    run_chromium(tmp_path, "shot", f"--screenshot={shot}", f"--window-size={size[0]},{size[1]}", url)
    return shot, png_summary(shot), run_chromium(tmp_path, "dom", "--dump-dom", url).stdout


def require_chromium() -> None:
    """Under CI (CI=true) a missing Chromium fails the test: launch/test.sh installs it, so its absence is a
    broken CI, not a reason to check nothing. A plain local run without it skips, saying why."""
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing (Debian's `chromium` package; launch/test.sh installs it with apt-get as root)"
    if under_ci():
        pytest.fail(f"{reason}, and under CI this test must run")
    pytest.skip(reason)
