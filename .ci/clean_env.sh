#!/usr/bin/env bash
# The README's two commands on a plain clone in an empty virtual environment (`make ci-clean`).
#
#   1. `git clone` of this checkout's HEAD into a temporary folder (nothing beside it: no shared/);
#      CI_CLEAN_WORKTREE=1 copies the working tree instead (tracked + untracked, not ignored
#      files), to try uncommitted changes;
#   2. `python3 -m venv` with nothing in it (no system site-packages; PYTHONNOUSERSITE=1, no
#      PYTHONPATH);
#   3. `make demo`, then `make test`, in that clone with that venv's python, with the documented
#      variables passed through (DETECTRON2_SRC, DETREX_SRC, STAGEINTERACTOR_OFFLINE, ...) and
#      STAGEINTERACTOR_REQUIRE_LAYERS=all.
#
# Fails (exit 1) when either command fails, when the demo's AP50 is below $CI_MIN_AP50 (50), when
# any test is skipped for a reason other than "no CUDA device" (tests marked gpu), or when a test
# layer did not run. The wheels the set-up step builds for detectron2 and detrex are cached in
# ~/.cache/stageinteractor/wheels (outside the clone), so only the first run builds them.
# Variables: BASE_PYTHON (interpreter that creates the venv, default python3), CI_KEEP=1 (keep the
# temporary folder), CI_CLEAN_DIR (use this folder instead of a new temporary one).
set -uo pipefail

SRC_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_PYTHON="${BASE_PYTHON:-python3}"
MIN_AP50="${CI_MIN_AP50:-50}"
WORK="${CI_CLEAN_DIR:-$(mktemp -d -t stageinteractor_clean.XXXXXX)}"
mkdir -p "$WORK"
CLONE="$WORK/stageinteractor"
VENV="$WORK/venv"
LOGS="$WORK/logs"

cleanup() {
    if [ "${CI_KEEP:-0}" = "1" ]; then
        echo "== ci-clean: kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

fail() {
    echo "== ci-clean: FAILED - $*"
    exit 1
}

T0=$(date +%s)
mkdir -p "$LOGS"
rm -rf "$CLONE" "$VENV"
if [ "${CI_CLEAN_WORKTREE:-0}" = "1" ]; then
    echo "== ci-clean: copying the working tree of $SRC_REPO into $CLONE"
    mkdir -p "$CLONE"
    (cd "$SRC_REPO" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | (cd "$CLONE" && tar -xf -) || fail "could not copy the working tree"
    git -C "$CLONE" init -q
else
    echo "== ci-clean: git clone $SRC_REPO ($(git -C "$SRC_REPO" rev-parse --short HEAD)) -> $CLONE"
    git clone -q "$SRC_REPO" "$CLONE" || fail "git clone failed"
fi
"$BASE_PYTHON" -m venv "$VENV" || fail "$BASE_PYTHON -m venv failed"
PY="$VENV/bin/python"
echo "== ci-clean: empty venv $VENV ($("$PY" --version 2>&1), $("$PY" -m pip list 2>/dev/null | tail -n +3 | wc -l) packages)"

# Only the venv: no user site, no PYTHONPATH, the venv's bin first on PATH.
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV CONDA_PREFIX
export PYTHONNOUSERSITE=1
export PATH="$VENV/bin:$PATH"
export STAGEINTERACTOR_REQUIRE_LAYERS=all
export STAGEINTERACTOR_LAYER_SUMMARY="$LOGS/layers.txt"
cd "$CLONE"

# `make <target>` with the venv's python, logged to $LOGS/<target>.log; fails unless it exits 0.
# Sets SECS to its wall time.
run_make() {
    local target=$1 t0 rc
    echo "== ci-clean: make $target"
    t0=$(date +%s)
    make "$target" PYTHON="$PY" 2>&1 | tee "$LOGS/$target.log"
    rc=${PIPESTATUS[0]}
    SECS=$(( $(date +%s) - t0 ))
    echo "== ci-clean: make $target exit $rc in $SECS s"
    [ "$rc" -eq 0 ] || fail "make $target exited $rc"
}

run_make demo
DEMO_SECS=$SECS
AP50=$("$PY" -c "import json; print(json.load(open('output/demo/demo_summary.json'))['stageinteractor']['results']['AP50'])") \
    || fail "make demo wrote no output/demo/demo_summary.json"
"$PY" -c "import sys; sys.exit(0 if float('$AP50') >= float('$MIN_AP50') else 1)" \
    || fail "demo AP50 $AP50 < $MIN_AP50"
echo "== ci-clean: demo AP50 $AP50 (>= $MIN_AP50)"

run_make test
TEST_SECS=$SECS

# pytest's -ra summary: "SKIPPED [n] file:line: reason" (or "file: reason" for a module). The only
# reason allowed is tests/conftest.py's GPU_SKIP_REASON, given to tests marked `gpu` without CUDA
# (tests/core/test_ci_scripts.py keeps the two strings equal).
GPU_SKIP_REASON="no CUDA device"
BAD_SKIPS=$(grep -E '^SKIPPED \[' "$LOGS/test.log" | grep -vE ": ${GPU_SKIP_REASON}\$" || true)
[ -z "$BAD_SKIPS" ] || fail "tests skipped for a reason other than no CUDA device:
$BAD_SKIPS"
[ -s "$LOGS/layers.txt" ] || fail "pytest wrote no layer summary"
for layer in core detectron2 detrex; do
    grep -qE "^layer $layer: [0-9]+ passed" "$LOGS/layers.txt" \
        || fail "layer $layer did not run: $(grep "^layer $layer" "$LOGS/layers.txt")"
done
cat "$LOGS/layers.txt"
echo "== ci-clean: PASSED in $(( $(date +%s) - T0 )) s (make demo $DEMO_SECS s, AP50 $AP50;" \
     "make test $TEST_SECS s)"
