#!/usr/bin/env bash
# Set up a development/test machine (Debian, as root): the Debian packages the
# tests and the demo need, and .venv with sendooway installed. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

# (man-db: lexgrog for the man page test; python3-setuptools and git: the
# sdist/wheel test; curl: a real client; slapd: authBackend = LDAP tests;
# dovecot-core and dovecot-submissiond: a real Dovecot submission service as
# the upstream of tests/test_review_upstreams3.py, which runs its own
# instance (dovecot -c CONF -F); a system dovecot they start is stopped below;
# libgnutls-dane0, libidn12, libdb5.3 and libnsl2: the libraries of Exim,
# unpacked below, not installed; util-linux: its unshare; liblockfile1,
# libldap-2.5-0, libwrap0, libsasl2-2 and m4 (its .cf is built from the
# unpacked sendmail-cf): sendmail's; libevent-2.1-7: OpenSMTPD's (both
# unpacked below too);
# fetchmail and getmail6: the oracles of tests/test_review_parsers_oracle.py,
# which run fetchmail -f FILE --check against a POP3 server of their own;
# Debian's fetchmail starts no daemon unless /etc/default/fetchmail says so;
# s-nail, neomutt, git-email and the Perl modules git send-email needs for
# AUTH and TLS (Authen::SASL, IO::Socket::SSL; Mail::Address from
# libmailtools-perl, without which it does not start), and Cyrus SASL's
# PLAIN/LOGIN client plugins for Postfix as a null client: the real clients
# of tests/test_review_clients2.py; sendemail, ruby (its net/smtp is a
# bundled gem of ruby3.1), php-cli with libphp-phpmailer, and GNU mailutils:
# the real clients of tests/test_review_clients3.py, which also uses Net::SMTP
# from Perl's core with the IO::Socket::SSL and Authen::SASL above; sasl2-bin:
# saslpasswd2, which fills the sasldb2 of the Cyrus SASL Postfix in
# tests/test_review_upstreams4.py (its saslauthd is not used: stopped and
# disabled below); systemd-container (systemd-nspawn) and
# ssl-cert (the snakeoil certificate of the shipped sendooway.conf): the real
# systemd of tests/test_review_systemd.py, a container booted from this
# machine's own root, which starts nothing here; default-jdk-headless with
# libjakarta-mail-java (JSSE), golang-go (crypto/tls, net/smtp; built offline,
# standard library only), node-nodemailer (run by the nodejs it pulls in, or
# one already there), gnutls-bin (gnutls-cli), libnss3-tools (NSS's tstclnt
# and certutil) and openssl (s_client): the TLS stacks of
# tests/test_review_tlsclients.py)
# NAME|OTHER: a package whose name differs between the Debian releases this
# runs on, bookworm's first (trixie's libraries of the 64-bit time_t
# transition are *t64; its libldap is 2.6, libldap2); the first name this
# machine's apt has a candidate for is installed.
DEBS=(python3 python3-venv python3-dev gcc libc6-dev ca-certificates procps iproute2
      libpam-wrapper libnss-wrapper libpam0g python3-wheel netbase
      xinetd swaks libnet-ssleay-perl libio-socket-inet6-perl msmtp groff-base groff
      fail2ban systemd haproxy postfix logrotate libpam0g-dev slapd
      man-db python3-setuptools curl git fetchmail getmail6
      s-nail neomutt git-email libauthen-sasl-perl libio-socket-ssl-perl libmailtools-perl
      libsasl2-modules sasl2-bin
      sendemail ruby php-cli libphp-phpmailer mailutils
      dovecot-core dovecot-submissiond
      libgnutls30\|libgnutls30t64 libgnutls-dane0\|libgnutls-dane0t64 libidn12 libidn2-0 libnsl2
      libdb5.3\|libdb5.3t64 libpcre2-8-0 libcrypt1
      util-linux systemd-container ssl-cert
      default-jdk-headless libjakarta-mail-java golang-go nodejs node-nodemailer gnutls-bin
      libnss3-tools openssl
      liblockfile1 libldap-2.5-0\|libldap2 libwrap0 libsasl2-2 m4 libevent-2.1-7\|libevent-2.1-7t64)

deb_installed() {  # NAME[|OTHER...]: is one of them installed
    local name
    for name in ${1//|/ }; do
        dpkg-query -W -f='${Status}' "$name" 2>/dev/null | grep -q "install ok installed" && return 0
    done
    return 1
}
deb_pick() {  # NAME[|OTHER...]: the first one apt can install (else NAME, for apt's own error)
    local name policy
    for name in ${1//|/ }; do
        # (read whole, not piped into grep -q: under pipefail apt-cache
        # killed by SIGPIPE when grep stops early fails the pipeline)
        policy=$(LC_ALL=C apt-cache policy "$name" 2>/dev/null || true)
        [[ $policy =~ $'\n'"  Candidate: "[^\(] ]] && { echo "$name"; return; }
    done
    echo "${1%%|*}"
}
missing=()
for p in "${DEBS[@]}"; do
    deb_installed "$p" || missing+=("$p")
done
# Postfix is only the upstream of tests/test_upstream_postfix.py, which runs
# its own instance (postfix -c DIR). Installed "No configuration": no
# /etc/postfix/main.cf, so no system postfix ever starts (its systemd unit
# needs main.cf; disabled below all the same). It would replace another MTA (exim4, ...): then it is left
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
# slapd's package starts a directory server of its own on port 389 where no
# policy forbids it; the tests run their own instances: one installed now
# is stopped again (one that was there before is the admin's, left alone).
slapd_new=no
[[ " ${missing[*]} " == *" slapd "* ]] && slapd_new=yes
# Dovecot's package starts the system's dovecot (with dovecot-submissiond:
# a submission service on port 587) where no policy forbids it; the tests run
# their own instance: one installed now is stopped again.
dovecot_new=no
[[ " ${missing[*]} " == *" dovecot-core "* ]] && dovecot_new=yes
# sasl2-bin brings saslauthd (off by default in Debian); one started now is
# stopped again.
saslauthd_new=no
[[ " ${missing[*]} " == *" sasl2-bin "* ]] && saslauthd_new=yes
installed_now=("${missing[@]}")
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
    picked=()
    for p in "${missing[@]}"; do picked+=("$(deb_pick "$p")"); done
    apt-get install -y -qq --no-install-recommends "${picked[@]}" </dev/null >/dev/null
fi
# A postfix installed just now never serves as the system's MTA.
if [ "$postfix_new" = yes ]; then
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q postfix 2>/dev/null; then
        systemctl stop postfix || true
    fi
    if [ -f /etc/postfix/main.cf ] && postfix status >/dev/null 2>&1; then
        postfix stop || true
    fi
    # Under systemd the package enables postfix.service, which (its condition
    # on main.cf notwithstanding) pulls in postfix@-.service from postfix's
    # generator, and that fails for want of main.cf: at the install and at
    # every boot after, leaving the machine "degraded" (seen on a freshly
    # booted Debian 12). Not enabled, nothing pulls it in.
    if [ -d /run/systemd/system ]; then
        systemctl disable -q postfix 2>/dev/null || true
        systemctl reset-failed postfix.service postfix@-.service 2>/dev/null || true
    fi
fi
if [ "$slapd_new" = yes ] && pidof slapd >/dev/null 2>&1 && [ -x /etc/init.d/slapd ]; then
    /etc/init.d/slapd stop >/dev/null 2>&1 || true
fi
if [ "$dovecot_new" = yes ] && [ -f /run/dovecot/master.pid ] && [ -x /etc/init.d/dovecot ]; then
    /etc/init.d/dovecot stop >/dev/null 2>&1 || true
fi
if [ "$saslauthd_new" = yes ] && pidof saslauthd >/dev/null 2>&1 && [ -x /etc/init.d/saslauthd ]; then
    /etc/init.d/saslauthd stop >/dev/null 2>&1 || true
fi
# xinetd, fail2ban, haproxy, slapd, dovecot and saslauthd are only used by the tests (each runs its
# own instance), never left running; those installed just now are also not
# started again at the next boot. A slapd or dovecot that was there before
# is the admin's: left alone. (A unit whose start failed at the install,
# fail2ban's with no sshd log to watch, is not left "failed" either.)
for svc in xinetd fail2ban haproxy slapd dovecot saslauthd; do
    [ "$svc" = slapd ] && [ "$slapd_new" != yes ] && continue
    [ "$svc" = dovecot ] && [ "$dovecot_new" != yes ] && continue
    [ "$svc" = saslauthd ] && [ "$saslauthd_new" != yes ] && continue
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q "$svc" 2>/dev/null; then
        systemctl stop "$svc" || true
    fi
    pkg=$svc  # the package that brings the service
    [ "$svc" = dovecot ] && pkg=dovecot-core
    [ "$svc" = saslauthd ] && pkg=sasl2-bin
    if [[ " ${installed_now[*]} " == *" $pkg "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable -q "$svc" 2>/dev/null || true
        systemctl reset-failed "$svc" 2>/dev/null || true
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
# Servers whose Debian packages conflict with Postfix in apt (each is the
# mail-transport-agent) or would start a system MTA are not installed: their
# .debs are unpacked under .venv/mta/NAME (nothing is registered with dpkg,
# nothing starts; the libraries they link are in DEBS above) and the tests
# run those binaries with private configs: Exim (tests/test_review_upstreams3.py
# as the upstream, tests/test_review_clients2.py as a smarthost client);
# sendmail, chasquid and OpenSMTPD (tests/test_review_upstreams5.py).
unpack_mta() {  # NAME BINARY PACKAGE...
    local dir=.venv/mta/$1 binary=$2
    shift 2
    [ -x "$dir/$binary" ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: not unpacking $* (needs root for apt-get): its tests will skip" >&2
        return 0
    fi
    local debs
    debs=$(mktemp -d)
    chmod 755 "$debs"  # apt-get download fetches as _apt where it can
    if (cd "$debs" && apt-get download -qq "$@" >/dev/null 2>&1) \
            || { apt-get update -qq && (cd "$debs" && apt-get download -qq "$@" >/dev/null); }; then
        mkdir -p "$dir"
        for deb in "$debs"/*.deb; do
            dpkg-deb -x "$deb" "$dir"
        done
        # no set-uid or set-gid binary left lying in a work tree: the tests run them as root
        find "$dir" -type f -perm /6000 -exec chmod u-s,g-s {} +
        echo "setup: unpacked $* under $dir (not installed)"
    else
        echo "setup: could not download $*: its tests will skip" >&2
    fi
    rm -rf "$debs"
}
unpack_mta exim4 usr/sbin/exim4 exim4-daemon-light
unpack_mta sendmail usr/libexec/sendmail/sendmail sendmail-bin sendmail-cf
unpack_mta chasquid usr/bin/chasquid chasquid
unpack_mta opensmtpd usr/sbin/smtpd opensmtpd
# A checkout below a 0700 directory (/root) is fine for the demo: the
# frontend imports all its code before it drops to nobody. Some tests start
# sendooway as nobody from the beginning (xinetd `user = nobody`):
# scripts/test.sh lets others through the parent directories for its run.
echo "setup: ready (.venv/bin/sendooway, .venv/bin/sendooway-auth)"
