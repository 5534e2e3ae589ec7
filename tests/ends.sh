#!/usr/bin/env bash
# The engine, family, writer and end-to-end tests at the low end of every declared dependency range, in a
# venv of its own (the main run, tests/run.sh, is the high end: the newest release of each):
#   lowest  every dependency at its floor (tests/lowest.txt): torch 2.6.0 with torchvision 0.21.0 (PyPI's
#           build, ~3 GB), transformers 5.5.0, pillow 10.1.0, ...
#   newest  the newest torch and transformers again, in a clean venv (the main run covers it; kept for
#           checking a new release by hand)
# Usage: bash tests/ends.sh [install|test] [lowest|newest]...   (both steps, and lowest, by default)
#   install only makes the venv (CI makes it while the main run tests); test only runs the tests in it.
set -euo pipefail
cd "$(dirname "$0")/.."

# What a dependency's floor can break, and no more: the main run has every test at the newest releases, and
# running the crash, scale and fault tests again would only repeat our own logic (it was 260 s of CI's time).
SUBSET=(
    tests/test_dependencies.py tests/test_config.py  # pyyaml, click, packaging
    tests/test_engine.py tests/test_families.py tests/test_structured.py  # torch, transformers, llguidance
    tests/test_images.py tests/test_metadata.py tests/test_texts.py  # pillow, pillow-heif, piexif, defusedxml
    tests/test_places.py tests/test_web.py  # reverse_geocode, scipy; flask, waitress
    # the command line end to end: every corpus format, bad inputs, the upright size, the written photo
    tests/test_process.py::test_process_corpus_writes_a_sidecar_for_every_image
    tests/test_process.py::test_bad_inputs_are_reported_one_line_each_and_never_stop_the_rest
    tests/test_process.py::test_files_that_are_no_images_are_refused_before_the_model_loads
    tests/test_process.py::test_sidecar_records_upright_size
    tests/test_process.py::test_process_writes_answers_into_photos_and_records_where
    # watchdog: a daemon sees copies, renames, new folders and what was there before it started
    tests/test_daemon.py::test_chunked_copy_is_described_once_after_its_last_byte
    tests/test_daemon.py::test_renames_from_temp_names_and_downloads
    tests/test_daemon.py::test_file_in_a_new_sub_subfolder
    tests/test_daemon.py::test_image_present_before_start_is_described
)
# the same code over more photos, or through the command line once more: covered by the tests above
AT_SCALE="not over_many_photos and not process_writes_values_to_the_sidecar"

pip_quietly() {  # this machine's pip warns about every package missing from its local index mirrors
    "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }
}

install_end() {
    local venv=".venv-$1"; shift
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip 2>/dev/null || true
    pip_quietly "$venv/bin/python" -m pip install -q "$@" -e . pytest pytest-xdist num2words selenium
    "$venv/bin/python" - <<'PY'
from importlib import metadata
names = ["torch", "torchvision", "transformers", "pillow", "watchdog", "pyyaml", "piexif", "click", "defusedxml",
         "packaging", "pillow-heif", "llguidance", "reverse_geocode", "scipy"]
print("versions:", ", ".join(f"{n} {metadata.version(n)}" for n in names))
PY
}

test_end() {
    local venv=".venv-$1"
    # -n: as in tests/run.sh, the tests wait on processes and files more than they compute
    "$venv/bin/python" -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-3}" --dist worksteal -k "$AT_SCALE" "${SUBSET[@]}"
}

steps=(install test)
case "${1:-}" in
    install|test) steps=("$1"); shift ;;
esac
ends=("$@")
[ ${#ends[@]} -gt 0 ] || ends=(lowest)
for which in "${ends[@]}"; do
    started=$SECONDS
    for step in "${steps[@]}"; do
        case "$step:$which" in
            install:lowest) install_end lowest -c tests/lowest.txt torch torchvision pillow-heif ;;
            install:newest) install_end newest torch torchvision pillow-heif ;;
            test:lowest|test:newest) test_end "$which" ;;
            *) echo "tests/ends.sh: unknown end $which (lowest, newest)" >&2; exit 2 ;;
        esac
    done
    echo "tests/ends.sh: ${steps[*]} of the $which end in $((SECONDS - started)) s"
done
