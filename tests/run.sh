#!/usr/bin/env bash
# Set everything up on a fresh clone and run the whole test suite (lint, types, tests).
# Installs the Debian tools the tests use as independent readers when they are missing and
# apt-get is usable, torch with its torchvision, and the project with its test extra, into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests read real camera photos from the project's shared/ folder, beside the clone: without it half of
# them would fail after ten minutes, so say so first.
if [ ! -d ../shared/corpus ]; then
    echo "tests/run.sh: the test photos are missing at $(cd .. && pwd)/shared/corpus: put the project's shared/" \
         "folder beside this clone (real camera files from the public ianare/exif-samples collection)" >&2
    exit 2
fi

need=()
command -v exiftool >/dev/null || need+=(libimage-exiftool-perl)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v exiv2 >/dev/null || need+=(exiv2)  # the second reader of what we write (issue 20)
command -v chromium >/dev/null || need+=(chromium)  # the review page's browser test
command -v chromedriver >/dev/null || need+=(chromium-driver)
apt=""
if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        # in the background while pip installs (both mostly wait on downloads and unpacking): install ~95 s -> 74-93 s
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
              "${need[@]}" >/dev/null; } &
        apt=$!
    else
        echo "tests/run.sh: please install: ${need[*]} (sudo apt-get install ${need[*]})" >&2
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
# torch and the torchvision built for it, installed together as users do (the processors of Qwen-VL,
# LLaVA-OneVision and SmolVLM need torchvision). 2.14.1 is the newest this machine's pip takes (from its own
# disk); its CUDA build runs the tests on the CPU. Users keep their ROCm/CUDA build.
pip_quietly() {  # this machine's pip warns about every package missing from its local index mirrors
    "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }
}
pip_quietly .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
pip_quietly .venv/bin/python -m pip install -q -e '.[test]'
if [ -n "$apt" ] && ! wait "$apt"; then
    echo "tests/run.sh: apt-get could not install ${need[*]} (above)" >&2
    exit 1
fi

echo "tests/run.sh: installed in $SECONDS s"
.venv/bin/ruff check .
# mypy runs on one core (22-34 s): beside the tests rather than before them, its result printed after theirs
types=$(mktemp)
.venv/bin/mypy autocaption > "$types" 2>&1 &
mypy=$!
# Several workers (pytest-xdist): most tests wait on a daemon, a server or a file rather than compute, so even
# two cores run three or four at once (about 2.2x faster than one at a time). TEST_WORKERS=0 runs them in turn.
# worksteal: a worker that runs out takes tests queued on a busy one (the last 30 s ran on one core).
status=0
.venv/bin/python -m pytest -n "${TEST_WORKERS:-4}" --dist worksteal "$@" || status=$?
wait "$mypy" || status=1
cat "$types"
rm -f "$types"
echo "tests/run.sh: done in $SECONDS s"
exit "$status"
