"""The daemon near the inotify watch limit (issue 24): the real `autocaption run` in a user namespace of its
own whose kernel limit (/proc/sys/user/max_inotify_watches) is lowered to fewer watches than the tree has
folders; watchdog then skips folders without a word. Every photo must still be described: in the folders
left unwatched at start and in folders created later, with one log line naming how many and how to raise
the limit, and `status` saying so."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import cli_env
from tests.test_daemon import FAST_RULES, described_in, photo, wait_for

LIMIT = 12  # watches the daemon may hold: the inbox and 11 of its 30 folders


def _namespaces_work() -> str | None:
    """Why a user namespace with its own inotify limit cannot be made here, or None."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "-Ur", "sh", "-c", f"echo {LIMIT} > /proc/sys/user/max_inotify_watches"],
        capture_output=True, text=True,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"this machine gives no user namespace with its own inotify limit: {probe.stderr.strip()}"
    return None


def test_folders_past_the_watch_limit_are_polled_and_every_photo_is_described(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    why = _namespaces_work()
    if why:
        pytest.skip(why)
    inbox = tmp_path / "inbox"
    folders = [inbox / f"album-{i:02d}" for i in range(30)]
    for folder in folders:
        folder.mkdir(parents=True)
    config = make_config(
        rules=FAST_RULES, extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.3, poll_seconds: 1}}]"
    )
    log = tmp_path / "daemon.log"
    command = [sys.executable, "-m", "autocaption", "run", "--config", str(config)]
    limited = ["unshare", "-Ur", "sh", "-c", f'echo {LIMIT} > /proc/sys/user/max_inotify_watches && exec "$@"', "sh"]
    proc = subprocess.Popen([*limited, *command], stdout=subprocess.DEVNULL, stderr=log.open("ab"), env=cli_env())
    try:
        wait_for(lambda: "ready:" in log.read_text(encoding="utf-8"), what="ready")
        text = log.read_text(encoding="utf-8")
        assert "folders of the tree cannot be watched: the inotify watch limit is reached" in text, text
        assert "sudo sysctl fs.inotify.max_user_watches" in text
        time.sleep(3)  # the reconcile at start is over: what arrives now only a watch or the poller can see
        for i, folder in enumerate(folders):  # one photo in every folder, watched or not
            (folder / f"p{i:02d}.jpg").write_bytes(photo(i))
        later = [inbox / f"new-{i}" / "deeper" for i in range(3)]  # created now: no watch is left for them
        for i, folder in enumerate(later):
            folder.mkdir(parents=True)
            (folder / f"n{i}.jpg").write_bytes(photo(100 + i))
        names = {f"p{i:02d}.jpg" for i in range(30)} | {f"n{i}.jpg" for i in range(3)}
        wait_for(lambda: {Path(p).name for p in described_in(log)} >= names, timeout=120, what="every photo described")
        assert all(count == 1 for count in described_in(log).values())  # each once
        text = log.read_text(encoding="utf-8")
        assert re.search(r"\d+ new folders? cannot be watched", text)
        assert "reconcile:" not in text  # no reconcile found them
        status = subprocess.run([sys.executable, "-m", "autocaption", "status", "--config", str(config)],
                                capture_output=True, text=True, env=cli_env())  # fmt: skip
        assert "folders polled, not watched: the inotify watch limit is reached" in status.stdout, status.stdout
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_a_folders_device_is_the_one_the_kernels_watch_list_names() -> None:
    """On btrfs stat() gives every subvolume a device of its own (0:41) while the kernel's watch list names
    the superblock's (0:40): compared as stat says, every folder would be taken for unwatched and polled."""
    from autocaption.watch import _mount_devices, kernel_device

    devices = sorted([("/", os.makedev(8, 1)), ("/srv/photos", os.makedev(0, 40)), ("/srv/photos2", os.makedev(0, 50))],
                     key=lambda entry: len(entry[0]), reverse=True)  # fmt: skip
    assert kernel_device("/srv/photos/2024/a", devices, os.makedev(0, 41)) == os.makedev(0, 40)
    assert kernel_device("/srv/photos", devices, os.makedev(0, 41)) == os.makedev(0, 40)
    assert kernel_device("/srv/photos2/x", devices, 1) == os.makedev(0, 50)  # not /srv/photos's
    assert kernel_device("/home/a", devices, 1) == os.makedev(8, 1)
    assert kernel_device("/x", [], 77) == 77  # no mountinfo: stat's
    root = os.stat("/").st_dev
    assert kernel_device("/", _mount_devices(), root) in {root, *(d for p, d in _mount_devices() if p == "/")}


def test_every_folder_of_a_large_tree_is_found_in_the_kernels_watch_list(tmp_path: Path) -> None:
    """The kernel writes watch descriptors in hex: a decimal-only pattern took the folders of wd a-f, 1a-1f,
    ... for unwatched, and polled them with a false error, in every tree of more than nine folders."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    from autocaption.watch import inotify_watched, unwatched_folders

    for i in range(40):
        (tmp_path / f"album-{i:02d}" / "raw").mkdir(parents=True)
    observer = Observer()
    observer.start()
    try:
        observer.schedule(FileSystemEventHandler(), str(tmp_path), recursive=True)
        watched = inotify_watched()
        assert watched is not None and len(watched) >= 81
        assert unwatched_folders(tmp_path, watched) == []
    finally:
        observer.stop()
        observer.join(timeout=10)
