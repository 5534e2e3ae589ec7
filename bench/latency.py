"""Latency from a photo's last write to its JSON sidecar, through the real `autocaption run` daemon.

Starts the daemon on a temp folder with the tiny local model, writes N photos one by one (each a
copy of a corpus JPEG, closed, then a pause), and reports the median and worst time from the close to
the sidecar's appearance. Usage: python bench/latency.py [--files 50] [--settle 2.0]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tinymodel import build_tiny  # noqa: E402

CORPUS = ROOT.parent / "shared/corpus/jpg/gps"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between two photos")
    args = parser.parse_args()
    sources = sorted(CORPUS.glob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        model = build_tiny(base / "model")
        inbox = base / "inbox"
        inbox.mkdir()
        config = base / "rules.yaml"
        config.write_text(
            f"model: {{id: {str(model)!r}}}\nstate: {{dir: {str(base / 'state')!r}}}\n"
            f"watch: [{{path: {str(inbox)!r}, settle_seconds: {args.settle}}}]\n"
            "rules: [{name: caption, prompt: 'Describe.', max_new_tokens: 16, write: [description]}]\n",
            encoding="utf-8",
        )
        log = base / "daemon.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        daemon = subprocess.Popen([sys.executable, "-m", "autocaption", "run", "--config", str(config)],
                                  stderr=log.open("wb"), env=env)  # fmt: skip
        try:
            while "ready:" not in log.read_text(encoding="utf-8"):
                time.sleep(0.1)
            written: dict[Path, float] = {}
            latency: dict[Path, float] = {}

            def poll() -> None:  # runs while photos are still being written
                for path, at in list(written.items()):
                    if path not in latency and path.with_name(path.name + ".json").exists():
                        latency[path] = time.monotonic() - at

            for i in range(args.files):
                target = inbox / f"photo_{i:03d}.jpg"
                shutil.copyfile(sources[i % len(sources)], target)
                written[target] = time.monotonic()
                pause_until = time.monotonic() + args.gap
                while time.monotonic() < pause_until:
                    poll()
                    time.sleep(0.01)
            deadline = time.monotonic() + 300
            while len(latency) < len(written) and time.monotonic() < deadline:
                poll()
                time.sleep(0.01)
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
    values = sorted(latency.values())
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; tiny model on CPU")
    print(f"{len(values)}/{args.files} photos, settle_seconds {args.settle}: median {statistics.median(values):.2f} s, "
          f"p90 {values[int(0.9 * (len(values) - 1))]:.2f} s, worst {values[-1]:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
