"""Open a local HTML page in headless Chromium: did all its images load, and what does it look like?

Chromium is required (Debian: ``apt-get install -y chromium``); ``CLIPPRIOR_CHROMIUM`` names another
binary. Without one the calling test fails, unless ``CLIPPRIOR_SKIP_BROWSER_TEST=1`` opts out
explicitly. ``CLIPPRIOR_KEEP_SCREENSHOT=FILE`` keeps the last screenshot for a human to look at.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,900", "--virtual-time-budget=15000",
)

# Injected into a copy of the page: once every <img> has loaded (lazy ones forced to load) or failed,
# the body records "<loaded>/<total>" in data-images, which --dump-dom then shows.
_CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  imgs.forEach((img) => { img.loading = 'eager'; });
  Promise.all(imgs.map((img) => img.complete && img.naturalWidth > 0 ? null
      : new Promise((done) => { img.addEventListener('load', done); img.addEventListener('error', done); })))
    .then(() => {
      const ok = imgs.filter((img) => img.naturalWidth > 0).length;
      document.body.setAttribute('data-images', ok + '/' + imgs.length);
    });
});
</script>"""


def chromium() -> str:
    """The Chromium binary, or fail (skip only on an explicit opt-out)."""
    found = os.environ.get("CLIPPRIOR_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    if found is None:
        if os.environ.get("CLIPPRIOR_SKIP_BROWSER_TEST") == "1":
            pytest.skip("CLIPPRIOR_SKIP_BROWSER_TEST=1: browser check explicitly opted out")
        pytest.fail("headless Chromium is needed for this test: `apt-get install -y chromium` (Debian), set "
                    "CLIPPRIOR_CHROMIUM to a Chrome binary, or opt out with CLIPPRIOR_SKIP_BROWSER_TEST=1")
    return found


def check_page_in_chromium(page: Path, workdir: Path) -> tuple[tuple[int, int], np.ndarray]:
    """Load ``page`` from disk (file://) in headless Chromium.

    Returns:
        ((images loaded, images on the page), the (900, 1280, 3) uint8 screenshot of the page).
    """
    browser = chromium()
    workdir.mkdir(parents=True, exist_ok=True)
    check = page.with_name(f"_check_{page.name}")
    check.write_text(page.read_text(encoding="utf-8").replace("</body>", _CHECK_SCRIPT + "</body>"), encoding="utf-8")

    def run(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        profile = workdir / f"profile-{name}"  # a fresh, empty profile per run
        profile.mkdir()
        return subprocess.run([browser, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=120, check=False)

    try:
        dom = run("dom", "--dump-dom", check.resolve().as_uri())
    finally:
        check.unlink()
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert match, f"the page never finished loading its images:\n{dom.stdout[-2000:]}\n{dom.stderr[-2000:]}"
    shot_path = workdir / "screenshot.png"
    shot = run("shot", f"--screenshot={shot_path}", page.resolve().as_uri())
    assert shot.returncode == 0 and shot_path.is_file(), shot.stderr[-2000:]
    if os.environ.get("CLIPPRIOR_KEEP_SCREENSHOT"):
        shutil.copy(shot_path, os.environ["CLIPPRIOR_KEEP_SCREENSHOT"])
    with Image.open(shot_path) as img:
        pixels = np.asarray(img.convert("RGB"))
    return (int(match.group(1)), int(match.group(2))), pixels
