#!/usr/bin/env bash
# Run the whole test suite (sets the machine up first). Fails when any test
# fails, and also when no test ran at all.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1

# Some tests start sendooway as nobody (xinetd `user = nobody`, a stdio
# session as nobody), which must reach .venv and the code. A checkout below
# a 0700 directory (/root, `mktemp -d`) is made passable for others (search
# only, no listing) for this run, and given its mode back at the end.
restore=()
if [ "$(id -u)" -eq 0 ] && command -v runuser >/dev/null 2>&1 \
        && ! runuser -u nobody -- test -r "$PWD/.venv/bin/sendooway" 2>/dev/null; then
    dir=$PWD
    while [ "$dir" != / ]; do
        if [ -n "$(find "$dir" -maxdepth 0 ! -perm -o+x)" ]; then
            restore+=("$(stat -c %a "$dir")" "$dir")
            chmod o+x "$dir"
            echo "test: $dir made passable for others (o+x) for this run: tests run sendooway as nobody"
        fi
        dir=$(dirname "$dir")
    done
fi
give_back() {
    local i
    for ((i = 0; i < ${#restore[@]}; i += 2)); do
        chmod "${restore[i]}" "${restore[i + 1]}" \
            && echo "test: ${restore[i + 1]} given back its mode ${restore[i]}"
    done
}
trap give_back EXIT

# The suite mostly waits (sockets, timers, child processes): pytest-xdist
# workers, one per CPU and one more, each in a fake world of its own
# (tests/conftest.py); a test file stays on one worker, so its module-wide
# upstreams (Postfix, Exim, ...) start once. SENDOOWAY_TEST_JOBS=N sets the
# number of workers, 0 runs the suite in one process.
jobs=${SENDOOWAY_TEST_JOBS:-$(( $(nproc 2>/dev/null || echo 1) + 1 ))}
.venv/bin/python -m pytest -n "$jobs" --dist loadfile "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test: pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
