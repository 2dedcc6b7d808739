#!/usr/bin/env bash
# Run the atheris targets: fuzz/run.sh SECONDS [TARGET...]   (TARGET: http, websocket; default both)
#
# Each target runs for SECONDS, both at once (one core each). Inputs that reach
# new code go to fuzz/out/TARGET/corpus (git-ignored); the committed seeds in
# fuzz/corpus/TARGET are only read. A crash, hang or oracle failure stops that
# target and leaves its reproducer in fuzz/out/TARGET/crash-* (or timeout-*).
# Worth keeping? Copy it into fuzz/corpus/TARGET/ so tests/hardening/test_fuzz.py
# replays it from then on. Exit status: 0 when no target found anything.
#
# To fold a long run's new inputs into the committed corpus (minimised):
#   PATH=.venv/bin:$PATH .venv/bin/python fuzz/fuzz_http.py -merge=1 NEWDIR fuzz/corpus/http fuzz/out/http/corpus
# then copy NEWDIR's files that are not already there into fuzz/corpus/http/ as cov-<sha1>.
#
# Needs the fuzz extra: .venv/bin/pip install -e '.[fuzz]'.
# TRIOSERVE_FUZZ_SKIP_KNOWN=1 passes over bugs already reported (fuzz/harness.py).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(http websocket)
python=${PYTHON:-.venv/bin/python}
# libFuzzer re-runs the target script by name for -merge and -fork; its shebang
# must then find this Python (and so atheris) first on PATH.
PATH="$(cd "$(dirname "$python")" && pwd):$PATH"
export PATH

pids=()
for t in "${targets[@]}"; do
    [ -f "fuzz/fuzz_$t.py" ] || { echo "no target fuzz/fuzz_$t.py" >&2; exit 2; }
    mkdir -p "fuzz/out/$t/corpus"
    "$python" "fuzz/fuzz_$t.py" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="fuzz/out/$t/" \
        "fuzz/out/$t/corpus" "fuzz/corpus/$t" >"fuzz/out/$t.log" 2>&1 &
    pids+=($!)
done

status=0
for i in "${!targets[@]}"; do
    t=${targets[$i]}
    rc=0
    wait "${pids[$i]}" || rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "fuzz/out/$t.log" | tail -n 1)
    cov=$(grep -o 'DONE *cov: [0-9]*' "fuzz/out/$t.log" | grep -o '[0-9]*$' | tail -n 1 || true)
    echo "$t: ${runs:-?} executions, coverage ${cov:-?}, exit $rc (log: fuzz/out/$t.log)"
    if [ "$rc" -ne 0 ]; then
        status=1
        ls fuzz/out/"$t"/crash-* fuzz/out/"$t"/timeout-* fuzz/out/"$t"/oom-* 2>/dev/null || true
    fi
done
exit $status
