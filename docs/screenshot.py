"""Make docs/review-page.png, the picture of `autocaption web`: drawn photos (no one's pictures)
with example captions, served by the real page and photographed by headless Chromium.

Usage: python docs/screenshot.py   (needs Debian's chromium and chromium-driver, and selenium)
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCENES = [  # (file, sky top, sky bottom, ground, sun, caption, keywords)
    ("IMG_2041.jpg", (20, 40, 110), (250, 140, 60), (40, 30, 40), (255, 200, 80),
     "A sunset over a calm sea, the sun half below the horizon.", "sunset, sea, horizon"),
    ("IMG_2042.jpg", (90, 160, 230), (200, 230, 250), (60, 120, 50), (255, 250, 210),
     "Green hills under a clear blue sky on a summer morning.", "hills, summer, sky"),
    ("IMG_2043.jpg", (30, 30, 60), (70, 70, 120), (25, 25, 35), (240, 240, 255),
     "A full moon over a dark forest at night.", "moon, night, forest"),
    ("IMG_2044.jpg", (180, 200, 220), (230, 235, 240), (240, 240, 245), (255, 255, 255),
     "Snow-covered fields and a pale winter sky.", "snow, winter, fields"),
    ("IMG_2045.jpg", (120, 180, 240), (180, 220, 250), (230, 200, 140), (255, 240, 180),
     "A sandy beach with the tide going out.", "beach, sand, tide"),
    ("IMG_2046.jpg", (60, 90, 140), (150, 120, 160), (50, 60, 50), (250, 180, 120),
     "Mountains at dusk with the last light on the peaks.", "mountains, dusk"),
]


def draw(path: Path, top: tuple[int, ...], bottom: tuple[int, ...], ground: tuple[int, ...],
         sun: tuple[int, ...], seed: int) -> None:  # fmt: skip
    width, height = 960, 640
    image = Image.new("RGB", (width, height))
    pen = ImageDraw.Draw(image)
    horizon = int(height * (0.55 + 0.1 * math.sin(seed)))
    for y in range(horizon):
        t = y / horizon
        pen.line([(0, y), (width, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    x = 200 + 110 * seed
    pen.ellipse([x, horizon - 150, x + 110, horizon - 40], fill=sun)
    ridge = [(i * 120, horizon - 40 * (1 + math.sin(i + seed))) for i in range(9)]
    points = [(0, horizon), *ridge, (width, horizon)]
    pen.polygon([*points, (width, height), (0, height)], fill=ground)
    image.save(path, quality=90)


def main() -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from autocaption.config import load
    from autocaption.journal import Journal
    from tests.test_web import chromium

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        folder = base / "Pictures" / "2026-08 holidays"
        folder.mkdir(parents=True)
        config_path = base / "rules.yaml"
        config_path.write_text(
            f"state: {{dir: {str(base / 'state')!r}}}\nwatch: [{{path: {str(folder.parent)!r}}}]\n"
            "rules:\n  - {name: caption, prompt: Describe this photo in one sentence., write: [description]}\n"
            "  - {name: keywords, prompt: Keywords for this photo., write: [keywords]}\n",
            encoding="utf-8",
        )
        config = load(config_path)
        journal = Journal(config.state.dir)
        for seed, (name, top, bottom, ground, sun, caption, keywords) in enumerate(SCENES):
            path = folder / name
            draw(path, top, bottom, ground, sun, seed)
            rules = {"caption": {"prompt": "Describe this photo in one sentence.", "answer": caption},
                     "keywords": {"prompt": "Keywords for this photo.", "answer": keywords}}  # fmt: skip
            document = {"schema": "autocaption/1", "image": {"file": name, "size": path.stat().st_size,
                        "mtime_ns": path.stat().st_mtime_ns}, "rules": rules,
                        "model": {"id": "llava-hf/llava-v1.6-mistral-7b-hf", "dtype": "bfloat16",
                                  "device": "cuda:0 (AMD Radeon PRO W7900, ROCm 6.2)", "backend": "transformers"},
                        "written": {"file": "embedded", "description": "written", "keywords": "written"}}  # fmt: skip
            (folder / f"{name}.json").write_text(json.dumps(document), encoding="utf-8")
            journal.done(path, path.stat(), None, "example", texts={"caption": caption, "keywords": keywords})
        journal.close()
        command = [sys.executable, "-m", "autocaption", "web", "--config", str(config_path), "--port", "0"]
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        browser = chromium()
        try:
            assert server.stdout is not None
            browser.set_window_size(1200, 900)
            browser.get(server.stdout.readline().strip())
            WebDriverWait(browser, 30).until(
                lambda b: all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                              for img in b.find_elements(By.CSS_SELECTOR, ".card img"))
            )
            target = ROOT / "docs" / "review-page.png"
            browser.save_screenshot(str(target))
            print(target)
        finally:
            browser.quit()
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
