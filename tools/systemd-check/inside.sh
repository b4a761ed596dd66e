#!/bin/bash
# Runs inside the booted container of tools/systemd-check/check.sh (as root,
# systemd as PID 1, its own loopback-only network): installs sendooway as
# docs/deployment.md says, with the shipped units, and checks what an admin
# would. Prints "PASS name" / "FAIL name: why" and exits 1 on any FAIL.
#   inside.sh REPO WHEELHOUSE TEST-PYTHON
# REPO: the checkout (its packaging/ and tools/systemd-check/), WHEELHOUSE:
# sendooway's wheel and its dependencies (the container has no network),
# TEST-PYTHON: an interpreter with aiosmtpd and trustme for the upstream.
set -u
REPO=$1 WHEELS=$2 TESTPY=$3
HERE=$REPO/tools/systemd-check
UNIXPW='Alice-Unix-Pw-1' UPPW='Upstream-Pw-9'
passed=0 failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }
# check NAME COMMAND...: PASS when COMMAND exits 0, else FAIL with its output
check() {
    local name=$1 out; shift
    if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$(echo "$out" | tail -n 5 | tr '\n' ' ')"; fi
}
client() { /usr/bin/python3 "$HERE/client.py" "$@"; }
journal_since() { journalctl --no-pager -o cat --since "@$1" "${@:2}"; }
upstream_count() { [ -f /run/upstream/messages.jsonl ] && wc -l < /run/upstream/messages.jsonl || echo 0; }

# ---- 1. install (docs/deployment.md, section 1 and 2c)
set -e
export DEBIAN_FRONTEND=noninteractive
/usr/bin/python3 -m venv /opt/sendooway
/opt/sendooway/bin/pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/sendooway-*.whl
ln -sf /opt/sendooway/bin/sendooway /opt/sendooway/bin/sendooway-auth /usr/local/bin/
install -m 0644 "$REPO/packaging/sendooway.conf" /etc/sendooway.conf
install -m 0644 "$REPO/packaging/pam.d/sendooway" /etc/pam.d/sendooway
# the Debian snakeoil certificate the shipped config names (ssl-cert makes
# it at installation; a machine image may lack it)
[ -f /etc/ssl/private/ssl-cert-snakeoil.key ] || make-ssl-cert generate-default-snakeoil
useradd -m -s /bin/bash alice
echo "alice:$UNIXPW" | chpasswd
# carol: for pam_faillock, with no failures counted by sendooway's own backoff
useradd -m -s /bin/bash carol
echo "carol:$UNIXPW" | chpasswd
# the upstream smarthost, STARTTLS and AUTH required, its CA alice's own sslCA
mkdir -p /run/upstream
systemd-run -q --unit=upstream --description="test upstream" -E PYTHONPATH="$REPO" \
    -p WorkingDirectory="$REPO" "$TESTPY" "$HERE/upstream.py" /run/upstream 2525 alice-up "$UPPW"
for _ in $(seq 100); do [ -f /run/upstream/ready ] && break; sleep 0.1; done
install -o alice -g alice -m 0644 /run/upstream/ca.pem /home/alice/upstream-ca.pem
printf 'smarthostMapping = direct:alice@example.org 127.0.0.1 2525 alice-up %s tls\nsslCA = %%h/upstream-ca.pem\n' \
    "$UPPW" > /home/alice/.sendoowayrc
chown alice: /home/alice/.sendoowayrc
chmod 0600 /home/alice/.sendoowayrc
cp "$REPO"/packaging/systemd/* /etc/systemd/system/
systemctl daemon-reload
systemctl enable -q --now sendooway-auth.socket sendooway.socket
systemctl enable -q --now sendooways.socket
set +e
T0=$(date +%s)

# ---- 2. what the admin sees before the first client
check "auth socket is nobody's, mode 0600" test "$(stat -c '%U %a' /run/sendooway/auth.sock)" = "nobody 600"
out=$(sendooway-auth --check alice --sender alice@example.org 2>&1)
if [ $? -eq 0 ] && grep -q "^route for alice@example.org: 127.0.0.1:2525" <<<"$out"; then
    pass "sendooway-auth --check alice"
else
    fail "sendooway-auth --check alice" "$(tail -n 3 <<<"$out" | tr '\n' ' ')"
fi

# ---- 3. real mail: 587 STARTTLS (activates the authenticator), 465, IPv6
check "mail via 587 STARTTLS" client send 127.0.0.1 587 starttls alice "$UNIXPW" alice@example.org
check "authenticator is Type=notify and active" \
    test "$(systemctl show -p Type --value sendooway-auth.service) $(systemctl is-active sendooway-auth.service)" = "notify active"
check "mail via 465 implicit TLS" client send 127.0.0.1 465 ssl alice "$UNIXPW" alice@example.org
check "mail via [::1]:465" client send ::1 465 ssl alice "$UNIXPW" alice@example.org
sleep 0.3
check "upstream got 3 messages, logged in as alice-up over TLS" /usr/bin/python3 -c '
import json, sys
m = [json.loads(l) for l in open("/run/upstream/messages.jsonl")]
assert len(m) == 3 and all(x["login"] == "alice-up" and x["tls"] for x in m), m'

# ---- 4. wrong password
t=$(date +%s)
out=$(client send 127.0.0.1 587 starttls alice Wrong-Pw-1 alice@example.org 127.0.0.31)
check "wrong password answered 535" grep -q "^smtp 535" <<<"$out"
check "wrong password logged for fail2ban" grep -q "auth failed: user=alice client=127.0.0.31 reason=wrong-password" \
    <<<"$(journal_since "$t" -t sendooway-auth)"

# ---- 5. systemctl reload: a good config, then a broken one (old one kept)
t=$(date +%s)
systemctl reload sendooway-auth.service
sleep 0.5
check "reload logged" grep -q "^reloaded /etc/sendooway.conf" <<<"$(journal_since "$t" -t sendooway-auth)"
cp /etc/sendooway.conf /etc/sendooway.conf.good
echo "noSuchKeyword = 1" >> /etc/sendooway.conf
systemctl reload sendooway-auth.service
sleep 0.5
mv /etc/sendooway.conf.good /etc/sendooway.conf
check "broken config on reload: still active" systemctl is-active -q sendooway-auth.service
check "broken config on reload: mail still flows" client send 127.0.0.1 587 starttls alice "$UNIXPW" alice@example.org

# ---- 6. pam_faillock (deny = 3) in common-auth, as its manual shows
cp /etc/pam.d/common-auth /etc/pam.d/common-auth.orig
cp /etc/pam.d/common-account /etc/pam.d/common-account.orig
cat > /etc/pam.d/common-auth <<'EOF'
auth	requisite	pam_faillock.so preauth
auth	[success=2 default=ignore]	pam_unix.so nullok
auth	[default=die]	pam_faillock.so authfail
auth	requisite	pam_deny.so
auth	required	pam_faillock.so authsucc
auth	required	pam_permit.so
EOF
{ echo "account	required	pam_faillock.so"; cat /etc/pam.d/common-account.orig; } > /etc/pam.d/common-account
printf 'deny = 3\nunlock_time = 600\n' > /etc/security/faillock.conf
rm -rf /run/faillock     # a fresh boot: no other service has failed a login yet
systemctl restart sendooway-auth.service
t=$(date +%s)
for i in 1 2 3; do client send 127.0.0.1 587 starttls carol "Wrong-Pw-$i" carol@example.org "127.0.0.4$i" >/dev/null & done
wait
tallies=$(faillock --user carol 2>&1)
if [ "$(grep -c RHOST <<<"$tallies")" = 3 ]; then
    pass "pam_faillock counted 3 failures"
else
    fail "pam_faillock counted 3 failures" "$(echo "$tallies" | tr '\n' ' ')"
fi
out=$(client send 127.0.0.1 587 starttls carol "$UNIXPW" carol@example.org 127.0.0.45)
if grep -q "^smtp 535" <<<"$out"; then
    pass "pam_faillock: right password refused once locked"
else
    fail "pam_faillock: right password refused once locked" "$out; $(journal_since "$t" -t sendooway-auth | tail -n 4 | tr '\n' ' ')"
fi
# PAM's own lines carry the authenticator's name, not the interpreter's
check "PAM's lines tagged sendooway-auth" grep -q "pam_unix(sendooway:auth): authentication failure" \
    <<<"$(journal_since "$t" -t sendooway-auth)"
faillock --user carol --reset
mv /etc/pam.d/common-auth.orig /etc/pam.d/common-auth
mv /etc/pam.d/common-account.orig /etc/pam.d/common-account

# ---- 7. restarts and stops while a session is open
out=$(client hold 127.0.0.1 587 alice "$UNIXPW" alice@example.org restart sendooway-auth.service)
check "restart of the authenticator: open session gets a clean 4xx" grep -Eq "^(sent|smtp 4)" <<<"$out"
out=$(client hold 127.0.0.1 587 alice "$UNIXPW" alice@example.org restart sendooway-auth.socket)
if grep -Eq "^(sent|smtp 4)" <<<"$out"; then
    pass "restart of the authenticator's socket: open session gets a clean 4xx"
else
    fail "restart of the authenticator's socket: open session gets a clean 4xx" "$out"
fi
check "mail after the restarts" client send 127.0.0.1 587 starttls alice "$UNIXPW" alice@example.org
# the fork server killed (the OOM killer): the daemon exits 1 and
# Restart=on-failure starts a new one 2 s later
main=$(systemctl show -p MainPID --value sendooway-auth.service)
kill -KILL "$(ps -o pid= --ppid "$main" | head -n 1)"
for _ in $(seq 100); do
    now=$(systemctl show -p MainPID --value sendooway-auth.service)
    [ "$now" != "$main" ] && [ "$now" != 0 ] && systemctl is-active -q sendooway-auth.service && break
    sleep 0.1
done
check "fork server killed: Restart=on-failure brings the authenticator back" \
    test "$(systemctl show -p NRestarts --value sendooway-auth.service)" -ge 1
check "mail after the authenticator's restart" client send 127.0.0.1 587 starttls alice "$UNIXPW" alice@example.org
out=$(client hold 127.0.0.1 587 alice "$UNIXPW" alice@example.org stop sendooway.socket)
check "stop of sendooway.socket: open session goes on" grep -q "^sent" <<<"$out"
systemctl start sendooway.socket

# ---- 8. log files: the drop-ins of deployment.md section 4, as written
/usr/bin/python3 - "$REPO/docs/deployment.md" <<'PY'
import re, subprocess, sys
text = open(sys.argv[1]).read().split("## 4. Logging", 1)[1].split("\n## 5.", 1)[0]
sh = re.search(r"```sh\n(install -m 0600 .*?)```", text, re.S).group(1)
ini = re.search(r"```ini\n(.*?)```", text, re.S).group(1)
subprocess.run(["sh", "-ec", sh], check=True)
for name, body in re.findall(r"^# (\S+\.service\.d)/override\.conf\n(.*?)(?=^# |\Z)", ini, re.S | re.M):
    d = "/etc/systemd/system/" + name
    subprocess.run(["mkdir", "-p", d], check=True)
    open(d + "/override.conf", "w").write(body)
PY
systemctl daemon-reload
systemctl restart sendooway-auth.service
check "-l log files under the units (deployment.md's drop-ins)" client send 127.0.0.1 587 starttls alice "$UNIXPW" alice@example.org
check "the frontend's log file has the message" grep -q "message user=alice" /var/log/sendooway.log
check "the authenticator's log file has the login" grep -q "auth ok: user=alice" /var/log/sendooway-auth.log
rm -rf /etc/systemd/system/sendooway-auth.service.d /etc/systemd/system/sendooway@.service.d
systemctl daemon-reload
systemctl restart sendooway-auth.service

# ---- 9. the frontend as an account of its own (deployment.md 2c, as written:
# adduser, then frontendUser and SocketUser=)
adduser --quiet --system --group --no-create-home sendooway
sed -i 's/^frontendUser = nobody$/frontendUser = sendooway/' /etc/sendooway.conf
sed -i 's/^SocketUser=nobody$/SocketUser=sendooway/' /etc/systemd/system/sendooway-auth.socket
systemctl daemon-reload
systemctl stop sendooway-auth.service sendooway-auth.socket
# (sections 7 and 8 restarted the authenticator six times within seconds,
# past StartLimitBurst=: in a fresh Debian 13 its next start failed with
# start-limit-hit, which no admin's pace reaches; the count starts afresh)
systemctl reset-failed sendooway-auth.service sendooway-auth.socket
systemctl start sendooway-auth.socket
check "own account: the auth socket is sendooway's, mode 0600" \
    test "$(stat -c '%U %a' /run/sendooway/auth.sock)" = "sendooway 600"
t=$(date +%s)
check "own account: mail via 587 STARTTLS" client send 127.0.0.1 587 starttls alice "$UNIXPW" alice@example.org
check "own account: mail via 465" client send 127.0.0.1 465 ssl alice "$UNIXPW" alice@example.org
check "own account: no complaint about the socket's owner" \
    bash -c '! grep -q "lets root connect but not frontendUser"' <<<"$(journal_since "$t")"
sed -i 's/^frontendUser = sendooway$/frontendUser = nobody/' /etc/sendooway.conf
sed -i 's/^SocketUser=sendooway$/SocketUser=nobody/' /etc/systemd/system/sendooway-auth.socket
systemctl daemon-reload
systemctl stop sendooway-auth.service sendooway-auth.socket
systemctl reset-failed sendooway-auth.service sendooway-auth.socket
systemctl start sendooway-auth.socket

# ---- 10. the journal: no traceback, no password, no failed unit
j=$(journal_since "$T0")
# (the journals on stdin: as one argument, more than 128 KiB is E2BIG, and a
# booted Debian's persistent journal, seen through the overlay, is more)
check "no traceback in the journal" bash -c '! grep -q Traceback' <<<"$j"
check "no password in the journal" bash -c '! grep -Eq "$1|$2|Wrong-Pw-"' _ "$UNIXPW" "$UPPW" \
    <<<"$(journalctl --no-pager -o cat)"
check "no failed sendooway unit" bash -c '[ -z "$(systemctl list-units --failed --plain --no-legend "sendooway*")" ]'

echo "systemd-check inside: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
