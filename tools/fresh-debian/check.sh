#!/bin/bash
# Checks the README's promise on a fresh Debian: in a minimal Debian 12 or 13
# (debootstrap --variant=minbase, about what a debian:12 container image
# holds; no python3, no git, no locales, no /etc/mailname) it runs, as root
# and with nothing else prepared, `bash scripts/demo.sh` and then
# `CI=true bash .ci/run </dev/null` in a fresh clone of this checkout's HEAD.
# Prints both commands' output, then one line per command with its exit
# status and time, and a last line "fresh-debian: PASS" or "... FAIL".
#
#   tools/fresh-debian/check.sh [ROOT [COMMAND...]]
#   FRESH_DEBIAN_BOOT=yes tools/fresh-debian/check.sh [ROOT [COMMAND...]]
#   FRESH_DEBIAN_SUITE=trixie tools/fresh-debian/check.sh /srv/fresh-trixie
#
# As root, on the host. ROOT (default /srv/fresh-debian) is made by
# debootstrap when it does not exist yet: Debian FRESH_DEBIAN_SUITE (default
# bookworm; trixie for Debian 13) from FRESH_DEBIAN_MIRROR (default
# http://deb.debian.org/debian), with SUITE-updates and SUITE-security in its
# sources.list like an installed system. It is kept afterwards: remove it to
# check a fresh one again; give each suite a ROOT of its own (a ROOT that
# holds another release than SUITE is refused). COMMAND (run by bash in the
# checkout inside ROOT) replaces the two commands, e.g. to rerun one test file.
# Not run by the suite: it downloads Debian and takes 10-15 minutes.
#
# Two kinds of fresh machine:
# - by default a container: ROOT as the root of mount and PID namespaces of
#   its own (unshare), a root login's bash its PID 1, no init system. Its
#   /dev, /proc, /sys and /run exist only in that mount namespace, and
#   whatever a package or a test starts in there dies with the namespace's
#   PID 1, which is killed when this script ends, however it ends.
# - FRESH_DEBIAN_BOOT=yes: a machine that boots systemd, as an installed
#   Debian does. ROOT gets systemd-sysv and dbus (the init of any installed
#   system; once, through the container above), is booted with
#   systemd-nspawn and the commands run in it through nsenter. Packages
#   start their services there (slapd, dovecot, ...), and what setup.sh
#   leaves enabled or failed shows at the next boot. It is powered off at
#   the end (its PID 1 killed after 20 s); its state under ROOT stays.
#   Needs systemd-container on the host. Its cgroup controllers are
#   read-only where the host has cgroup v1: the tests that limit processes
#   with a pids cgroup then skip (under CI=true, fail).
# Both use the host's network (apt and pip need it): services started in
# there listen on the host's ports while they run. At the end the script
# looks for anything left running with ROOT as its root, or mounted under it.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
ROOT=${1:-/srv/fresh-debian}
shift || true
MIRROR=${FRESH_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${FRESH_DEBIAN_SUITE:-bookworm}
BOOT=${FRESH_DEBIAN_BOOT:-no}
[ "$(id -u)" -eq 0 ] || { echo "fresh-debian: needs root"; exit 1; }
case $ROOT in /|"") echo "fresh-debian: refusing ROOT '$ROOT'"; exit 1 ;; esac
if [ "$BOOT" = yes ] && ! command -v systemd-nspawn >/dev/null; then
    echo "fresh-debian: FRESH_DEBIAN_BOOT needs systemd-nspawn (apt-get install systemd-container)"; exit 1
fi

case $SUITE in
    bookworm|trixie) ;;
    *) echo "fresh-debian: FRESH_DEBIAN_SUITE '$SUITE': bookworm or trixie"; exit 1 ;;
esac

if [ ! -x "$ROOT/bin/bash" ]; then
    command -v debootstrap >/dev/null || { echo "fresh-debian: apt-get install debootstrap"; exit 1; }
    [ -e "/usr/share/debootstrap/scripts/$SUITE" ] \
        || { echo "fresh-debian: this debootstrap does not know $SUITE"; exit 1; }
    # (the host's debian-archive-keyring, 2023.3 or later as in bookworm,
    # holds the trixie keys too)
    echo "fresh-debian: debootstrap --variant=minbase $SUITE $ROOT"
    debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$SUITE" "$ROOT" "$MIRROR" >/dev/null
    # what the installer (or an image build) leaves and debootstrap does not
    security=${MIRROR%/debian}/debian-security
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
        "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$security" "$SUITE" > "$ROOT/etc/apt/sources.list"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        "$(hostname)" > "$ROOT/etc/hosts"
fi
# a ROOT made for the other suite would check that one under this one's name
release=$(. "$ROOT/etc/os-release" && echo "${VERSION_CODENAME:-}")
[ "$release" = "$SUITE" ] \
    || { echo "fresh-debian: $ROOT holds '$release', not $SUITE (FRESH_DEBIAN_SUITE): another ROOT"; exit 1; }

# Where this host's TLS goes through an intercepting proxy, its extra CA
# certificates (/usr/local/share/ca-certificates) are what any machine on
# that network needs for pip: they go in where ca-certificates, once
# setup.sh installs it, takes them from. (Not needed on an open network.)
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$ROOT/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
fi

# A fresh clone, as a developer or CI has it (the chroot may have no git).
rm -rf "$ROOT/root/sendooway"
git clone -q "$REPO" "$ROOT/root/sendooway"

if [ "$#" -gt 0 ]; then
    inner="$*"
else
    inner='
        s=$SECONDS; bash scripts/demo.sh; demo=$?; demo_s=$((SECONDS - s))
        s=$SECONDS; CI=true bash .ci/run </dev/null; ci=$?; ci_s=$((SECONDS - s))
        echo "fresh-debian: bash scripts/demo.sh: exit $demo after ${demo_s} s"
        echo "fresh-debian: CI=true bash .ci/run: exit $ci after ${ci_s} s"
        [ "$demo" -eq 0 ] && [ "$ci" -eq 0 ]'
fi
LOGIN_ENV=(HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM="${TERM:-dumb}"
           PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)

UNSHARE_PID= NSPAWN_PID= LEADER= LEADER_NS=
cleanup() {
    if [ -n "$UNSHARE_PID" ] && kill -0 "$UNSHARE_PID" 2>/dev/null; then
        kill -KILL "$UNSHARE_PID" 2>/dev/null || true   # --kill-child: the namespace goes too
    fi
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        kill -TERM "$NSPAWN_PID" 2>/dev/null || true    # nspawn: power the machine off
        for _ in $(seq 200); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    # its PID 1, only while that PID is still the machine's (same PID namespace)
    if [ -n "$LEADER" ] && [ "$(readlink "/proc/$LEADER/ns/pid" 2>/dev/null)" = "$LEADER_NS" ]; then
        kill -KILL "$LEADER" 2>/dev/null || true
    fi
    if [ -n "$NSPAWN_PID" ]; then kill -KILL "$NSPAWN_PID" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    local p left=
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ] && left+=" ${p#/proc/}"
    done
    [ -z "$left" ] || echo "fresh-debian: still running in $ROOT:$left"
    if grep -q " $ROOT[/ ]" /proc/self/mountinfo; then echo "fresh-debian: still mounted under $ROOT"; fi
}
trap cleanup EXIT
trap 'exit 1' TERM INT HUP

# in_container COMMAND: a mount namespace of its own gets the pseudo file
# systems; then, in a PID namespace of its own too, a root login's bash in
# ROOT is PID 1. systemctl finds no systemd there (not "running in chroot",
# which a plain chroot gets), as in a container. bash as PID 1 reaps the
# orphans of daemons that fork; its end ends them all.
in_container() {
    unshare --mount --propagation private bash -c '
        set -e
        R=$1 CMD=$2
        shift 2
        # / a mount point of its own, as on any machine or container: else
        # `unshare -m` in there (tests do) cannot make it private (EINVAL)
        mount --bind "$R" "$R"
        mount --rbind /dev "$R/dev"
        mount --rbind /sys "$R/sys"   # with the cgroup file systems under it
        mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/run"
        mkdir -p "$R/run/lock"
        exec unshare --pid --fork --kill-child --mount-proc --root="$R" /usr/bin/env -i "$@" \
            /bin/bash -lc "cd /root/sendooway && { $CMD
}"' fresh-debian "$ROOT" "$1" "${LOGIN_ENV[@]}" &
    UNSHARE_PID=$!
    local rc=0
    wait "$UNSHARE_PID" || rc=$?
    UNSHARE_PID=
    return "$rc"
}

# in_booted COMMAND: boot ROOT (systemd-nspawn in a mount namespace of its
# own, with a tmpfs over the host's /run so that nspawn keeps nothing of
# its own there), wait until its systemd has booted, run COMMAND in it.
in_booted() {
    local log n c own ns state rc=0
    log=$(mktemp)
    unshare --mount --propagation private bash -c '
        mount -t tmpfs -o mode=755 tmpfs /run
        exec systemd-nspawn -q -D "$1" --register=no --keep-unit -b --console=passive' \
        fresh-debian "$ROOT" >"$log" 2>&1 &
    NSPAWN_PID=$!
    for _ in $(seq 100); do  # its PID 1: nspawn's child in a PID namespace of its own
        own=$(readlink "/proc/$NSPAWN_PID/ns/pid" 2>/dev/null || true)
        for c in $(pgrep -P "$NSPAWN_PID" || true); do
            ns=$(readlink "/proc/$c/ns/pid" 2>/dev/null || true)
            if [ "$c" -gt 1 ] && [ -n "$own" ] && [ -n "$ns" ] && [ "$ns" != "$own" ]; then
                LEADER=$c LEADER_NS=$ns
            fi
        done
        [ -n "$LEADER" ] && break
        sleep 0.1
    done
    if [ -z "$LEADER" ]; then
        echo "fresh-debian: the machine did not boot:"; cat "$log"; rm -f "$log"; return 1
    fi
    rm -f "$log"
    for _ in $(seq 300); do
        state=$(timeout 60 nsenter -t "$LEADER" -a -r -w systemctl is-system-running --wait 2>&1 || true)
        case $state in running|degraded) break ;; esac
        sleep 0.2
    done
    echo "fresh-debian: booted ($state)"
    # (in the background: bash runs the traps above only between commands,
    # or in a `wait`)
    nsenter -t "$LEADER" -a -r -w /usr/bin/env -i "${LOGIN_ENV[@]}" \
        /bin/bash -lc "cd /root/sendooway && { $1
}" &
    wait "$!" || rc=$?
    echo "fresh-debian: failed units: $(nsenter -t "$LEADER" -a -r -w systemctl --failed --plain --no-legend | awk '{print $1}' | tr '\n' ' ')"
    return "$rc"
}

rc=0
if [ "$BOOT" = yes ]; then
    if [ ! -x "$ROOT/lib/systemd/systemd" ] || [ ! -e "$ROOT/usr/bin/dbus-daemon" ]; then
        in_container 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd-sysv dbus </dev/null >/dev/null' \
            || { echo "fresh-debian: could not install systemd-sysv in $ROOT"; exit 1; }
    fi
    in_booted "$inner" || rc=$?
else
    in_container "$inner" || rc=$?
fi
if [ "$rc" -eq 0 ]; then echo "fresh-debian: PASS"; else echo "fresh-debian: FAIL (exit $rc)"; fi
exit "$rc"
