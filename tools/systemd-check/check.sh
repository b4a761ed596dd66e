#!/bin/bash
# Runs the shipped systemd units under a real systemd: boots this machine's
# own root file system in a container (systemd-nspawn, an overlay whose
# writes go to a tmpfs and vanish with it, a network of its own with only
# loopback), installs sendooway in it as docs/deployment.md says and runs
# tools/systemd-check/inside.sh there. Prints its PASS/FAIL lines and a last
# line "systemd-check: PASS" or "systemd-check: FAIL"; exit status 0 on PASS,
# 2 when this machine cannot boot a container at all ("NO CONTAINER").
#
#   tools/systemd-check/check.sh [PYTHON]
#
# As root, on a machine scripts/setup.sh prepared (systemd, systemd-container,
# swaks ...). PYTHON (default .venv/bin/python) builds the wheels and runs the
# test upstream (aiosmtpd, trustme). Nothing is left behind: the overlay and
# its tmpfs live in a mount namespace of their own, the container is powered
# off (killed after 20 s), and it never registers with machined.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${1:-$REPO/.venv/bin/python}
[ "$(id -u)" -eq 0 ] || { echo "systemd-check: needs root"; echo "systemd-check: FAIL"; exit 1; }
command -v systemd-nspawn >/dev/null || { echo "systemd-check: systemd-nspawn missing (apt-get install systemd-container)"; echo "systemd-check: FAIL"; exit 1; }
[ -x /lib/systemd/systemd ] || { echo "systemd-check: no /lib/systemd/systemd (apt-get install systemd)"; echo "systemd-check: FAIL"; exit 1; }

WORK=$(mktemp -d /tmp/systemd-check.XXXXXX)
NAME=sdcheck-$$
NSPAWN_PID= LEADER= LEADER_NS= WATCHER=
# The container's PID 1 outlives a killed systemd-nspawn (it has a PID
# namespace of its own, and a systemd still booting ignores nspawn's
# power-off signal): it is killed by its PID, once that PID is seen to be
# still the container's (same PID namespace), which ends all in it.
find_leader() {  # systemd-nspawn's child in a PID namespace of its own
    local n c own ns
    n=$(pgrep -f "^systemd-nspawn -q -D $WORK/root" || true)
    [ -n "$n" ] || return 1
    own=$(readlink "/proc/$n/ns/pid" 2>/dev/null || true)
    # (nspawn's first child, in nspawn's namespace, only starts the other)
    for c in $(pgrep -P "$n" || true); do
        ns=$(readlink "/proc/$c/ns/pid" 2>/dev/null || true)
        if [ -n "$ns" ] && [ -n "$own" ] && [ "$ns" != "$own" ]; then
            LEADER=$c LEADER_NS=$ns
            return 0
        fi
    done
    return 1
}
kill_leader() {
    [ -n "$LEADER" ] || find_leader || true
    if [ -n "$LEADER" ] && [ -n "$LEADER_NS" ] && [ "$(readlink "/proc/$LEADER/ns/pid" 2>/dev/null)" = "$LEADER_NS" ]; then
        kill -KILL "$LEADER" 2>/dev/null || true
    fi
}
cleanup() {
    if [ -n "$WATCHER" ]; then kill -KILL "$WATCHER" 2>/dev/null || true; fi
    [ -n "$LEADER" ] || find_leader || true
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        kill -TERM "$NSPAWN_PID" 2>/dev/null || true       # nspawn: power the container off
        for _ in $(seq 150); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    kill_leader
    for _ in $(seq 50); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$NSPAWN_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' TERM INT HUP

# sendooway's wheel and its dependencies: the container has no network
"$PY" -m pip wheel -q -w "$WORK/wheels" "$REPO" 2>&1 | grep -v "is ignored" >&2 || true
ls "$WORK"/wheels/sendooway-*.whl >/dev/null

# Where systemd is PID 1, nspawn asks it for a scope of the container's
# own; without (a CI container), it stays in the caller's cgroup.
KEEP_UNIT=--keep-unit
[ -d /run/systemd/system ] && KEEP_UNIT=
# The boot: in a private mount namespace, an overlay of / (writes to a
# tmpfs), the checkout bound at its own path (it may be on another mount).
mkdir -p "$WORK/layer" "$WORK/root"
cat > "$WORK/boot.sh" <<EOF
set -e
mount -t tmpfs -o mode=0755 systemd-check "$WORK/layer"
mkdir "$WORK/layer/upper" "$WORK/layer/work"
mount -t overlay systemd-check -o lowerdir=/,upperdir=$WORK/layer/upper,workdir=$WORK/layer/work "$WORK/root"
exec systemd-nspawn -q -D "$WORK/root" -M $NAME --register=no $KEEP_UNIT --private-network \
    --bind-ro="$REPO:$REPO" --bind-ro="$WORK/wheels:/run/systemd-check-wheels" \
    -b --console=passive systemd.mask=postfix.service systemd.mask=dovecot.service \
    systemd.mask=haproxy.service systemd.mask=fail2ban.service systemd.mask=slapd.service \
    systemd.mask=xinetd.service systemd.mask=postgresql.service systemd.mask=postgresql@.service
EOF
unshare -m --propagation private bash "$WORK/boot.sh" >"$WORK/nspawn.log" 2>&1 &
NSPAWN_PID=$!
# the container's PID 1
for _ in $(seq 100); do
    find_leader && break
    sleep 0.1
done
if [ -z "$LEADER" ]; then
    echo "systemd-check: the container did not start:"; cat "$WORK/nspawn.log"
    echo "systemd-check: NO CONTAINER (this machine cannot boot one; nothing of sendooway was tried)"; exit 2
fi
# and if this script is killed (SIGKILL: no trap runs), a watcher does it
(
    trap '' TERM INT HUP
    while kill -0 $$ 2>/dev/null; do sleep 1; done
    kill_leader
    kill -KILL "$NSPAWN_PID" 2>/dev/null || true
    rm -rf "$WORK"
) </dev/null >/dev/null 2>&1 &
WATCHER=$!
disown "$WATCHER"  # no "Killed" notice from bash when cleanup ends it
state=
for _ in $(seq 300); do  # until its manager answers, then until it has booted
    state=$(timeout 60 nsenter -t "$LEADER" -a -r -w systemctl is-system-running --wait 2>&1 || true)
    case $state in running|degraded|maintenance|stopping) break ;; esac
    sleep 0.2
done
echo "systemd-check: container booted ($state), $(nsenter -t "$LEADER" -a -r -w systemctl --version | head -n 1)"
if [ "$state" != running ] && [ "$state" != degraded ]; then
    # (sendooway is installed only after the boot: this is the machine)
    echo "systemd-check: NO CONTAINER (its systemd did not finish booting; nothing of sendooway was tried)"; exit 2
fi
rc=0
timeout 300 nsenter -t "$LEADER" -a -r -w env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    bash "$REPO/tools/systemd-check/inside.sh" "$REPO" /run/systemd-check-wheels "$PY" || rc=$?
if [ "$rc" -ne 0 ]; then
    echo "--- the container's journal (sendooway units)"
    nsenter -t "$LEADER" -a -r -w journalctl --no-pager -o short-precise -u "sendooway*" | tail -n 25 || true
    echo "systemd-check: FAIL"; exit 1
fi
echo "systemd-check: PASS"
