#!/usr/bin/env bash
# Set up a development/test machine (Debian, as root): the Debian packages the
# tests and the demo need, and .venv with sendooway installed. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(python3 python3-venv python3-dev gcc libc6-dev ca-certificates procps iproute2
      libpam-wrapper libnss-wrapper libpam0g python3-wheel netbase
      xinetd swaks libnet-ssleay-perl libio-socket-inet6-perl msmtp groff-base groff
      fail2ban systemd haproxy postfix logrotate libpam0g-dev)

missing=()
for p in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Postfix is only the upstream of tests/test_upstream_postfix.py, which runs
# its own instance (postfix -c DIR). Installed "No configuration": no
# /etc/postfix/main.cf, so no system postfix ever starts (its systemd unit
# needs main.cf). It would replace another MTA (exim4, ...): then it is left
# out and those tests skip, saying postfix is not installed.
postfix_new=no
if [[ " ${missing[*]} " == *" postfix "* ]]; then
    other_mta=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Provides}\n' 2>/dev/null \
        | awk '$1 == "ii" && $2 != "postfix" && / mail-transport-agent/ {print $2}' | head -n 1)
    if [ -n "$other_mta" ]; then
        echo "setup: not installing postfix: it would replace the installed MTA $other_mta" \
             "(tests/test_upstream_postfix.py will skip)" >&2
        rest=()
        for p in "${missing[@]}"; do [ "$p" = postfix ] || rest+=("$p"); done
        missing=("${rest[@]}")
    else
        postfix_new=yes
    fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$postfix_new" = yes ]; then
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
fi
# A postfix installed just now never serves as the system's MTA.
if [ "$postfix_new" = yes ]; then
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q postfix 2>/dev/null; then
        systemctl stop postfix || true
    fi
    if [ -f /etc/postfix/main.cf ] && postfix status >/dev/null 2>&1; then
        postfix stop || true
    fi
fi
# xinetd, fail2ban and haproxy are only used by the tests, never left running.
for svc in xinetd fail2ban haproxy; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q "$svc" 2>/dev/null; then
        systemctl stop "$svc" || true
    fi
done

# The venv is made from /usr/bin/python3: an interpreter under /root (mode
# 0700) could not be read by the frontend user after the privilege drop.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(not sys.base_prefix.startswith("/usr"))'; then
    rm -rf .venv
    /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.sendooway-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
# The frontend drops to nobody at start-up and must still reach its own
# code: a checkout below a 0700 directory (/root, mktemp -d) cannot work.
readable_by_nobody() { runuser -u nobody -- test -r "$PWD/.venv/bin/sendooway" 2>/dev/null; }
if [ "$(id -u)" -eq 0 ] && command -v runuser >/dev/null 2>&1 && ! readable_by_nobody \
        && [ "${CI:-}" = true ]; then
    # A throw-away CI machine (e.g. a clone in `mktemp -d`, mode 0700): let
    # others pass through the directories above the checkout (search only,
    # no listing). Never done outside CI: that is the admin's decision.
    dir=$PWD
    while [ "$dir" != / ]; do
        [ -n "$(find "$dir" -maxdepth 0 ! -perm -o+x)" ] && chmod o+x "$dir" \
            && echo "setup: CI: made $dir searchable by others (the frontend runs as nobody)"
        dir=$(dirname "$dir")
    done
fi
if [ "$(id -u)" -eq 0 ] && command -v runuser >/dev/null 2>&1 && ! readable_by_nobody; then
    echo "setup: $PWD is not readable by the user nobody (a parent directory" \
         "is mode 0700?): the frontend runs as nobody after start-up and could" \
         "not load its code. Clone the project where others may read it" \
         "(e.g. /srv, /opt) or chmod o+rx the parent directories." >&2
    exit 1
fi
echo "setup: ready (.venv/bin/sendooway, .venv/bin/sendooway-auth)"
