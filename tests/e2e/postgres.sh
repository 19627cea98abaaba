#!/usr/bin/env bash
# End to end: PostgreSQL 15 gets its TLS key passphrase from kms and archives its WAL encrypted
# under a kms key; a point-in-time recovery reads the archive back through kms.
#
# Usage: postgres.sh BIN_DIR PROVIDER      (PROVIDER: file | command)
# BIN_DIR holds kms, kmsd and the plugins. Runs as root; PostgreSQL, kmsd and every kms call
# run as the user `postgres`. Everything lives in a fresh directory under /tmp and is removed at
# the end; every check prints "ok: ..." or stops the script with "FAILED: ...".
set -euo pipefail

BIN_SRC=$1
PROVIDER=$2
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
MARKER="kms-e2e-marker-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"

fail() { echo "FAILED: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }
as_pg() { runuser -u postgres -- "$@"; }

# 1. A work directory the postgres user owns, with copies of the binaries it may run.
WORK=$(mktemp -d /tmp/kms-pg.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/bin" "$WORK/archive" "$WORK/kms"
cp "$BIN_SRC/kms" "$BIN_SRC/kmsd" "$WORK/bin/"
cp "$BIN_SRC"/libkms_*.so "$WORK/bin/"
chown -R postgres:postgres "$WORK"
chown root:root "$WORK/bin" "$WORK/bin"/*
chmod 700 "$WORK/kms"
KMS="$WORK/bin/kms"
SOCK="$WORK/kms.sock"
PORT=$(( 20000 + RANDOM % 20000 ))
PGDATA="$WORK/data"
RESTORED="$WORK/restored"

KMSD_PID=""
RUNUSER_PID=""
cleanup() {
    as_pg "$PG_BIN/pg_ctl" -D "$RESTORED" -m immediate stop >/dev/null 2>&1 || true
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true
    # SIGKILL: whatever failed, no kmsd may outlive the test (it holds the test's stdout).
    [ -n "$KMSD_PID" ] && kill -KILL "$KMSD_PID" 2>/dev/null || true
    if [ "${KEEP_WORK:-}" = "" ]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT

# 2. kmsd with the chosen provider.
case "$PROVIDER" in
file)
    cat > "$WORK/kmsd.toml" <<TOML
[provider]
name = "file"
[provider.options]
dir = "kms/store"
[server]
socket = "kms.sock"
audit_log = "audit.log"
TOML
    ;;
command)
    printf 'correct horse battery staple\n' > "$WORK/kms/passphrase"
    chown postgres:postgres "$WORK/kms/passphrase"
    chmod 600 "$WORK/kms/passphrase"
    cat > "$WORK/kmsd.toml" <<TOML
[provider]
name = "command"
[provider.options]
dir = "kms/store"
passphrase_command = "cat $WORK/kms/passphrase"
[server]
socket = "kms.sock"
audit_log = "audit.log"
TOML
    ;;
*) fail "unknown provider $PROVIDER" ;;
esac
chown postgres:postgres "$WORK/kmsd.toml" "$WORK/kms"
as_pg "$KMS" --config "$WORK/kmsd.toml" init
# kmsd runs under runuser, which does not pass SIGTERM on: the shell in between writes kmsd's
# own pid (exec keeps it) so that signals go to kmsd itself; runuser's exit status is kmsd's.
start_kmsd() {
    rm -f "$WORK/kmsd.pid"
    as_pg sh -c 'echo $$ > "$1/kmsd.pid"; exec "$1/bin/kmsd" --config "$1/kmsd.toml" --log-level warn' \
        sh "$WORK" &
    RUNUSER_PID=$!
    for _ in $(seq 100); do
        [ -s "$WORK/kmsd.pid" ] && break
        sleep 0.05
    done
    KMSD_PID=$(cat "$WORK/kmsd.pid")
    for _ in $(seq 100); do
        as_pg "$KMS" --socket "$SOCK" list >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    fail "kmsd did not start"
}
stop_kmsd() {
    kill -TERM "$KMSD_PID"
    wait "$RUNUSER_PID" || fail "kmsd did not exit 0 on SIGTERM"
    KMSD_PID=""
}
start_kmsd
ok "kmsd serves the $PROVIDER provider on $SOCK"

# 3. The WAL key, and the TLS key's passphrase imported into kms.
as_pg "$KMS" --socket "$SOCK" create pg/wal >/dev/null
TLS_PASS=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
printf '%s\n' "$TLS_PASS" | as_pg "$KMS" --config "$WORK/kmsd.toml" import pg/ssl 2>/dev/null \
    || fail "import of the TLS passphrase"
[ "$(as_pg "$KMS" --socket "$SOCK" passphrase pg/ssl)" = "$TLS_PASS" ] \
    || fail "kms passphrase does not give the imported passphrase back"
ok "TLS passphrase imported and read back through kmsd"
as_pg openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -aes256 \
    -pass "pass:$TLS_PASS" -out "$WORK/server.key"
as_pg openssl req -new -x509 -days 2 -key "$WORK/server.key" -passin "pass:$TLS_PASS" \
    -subj /CN=localhost -out "$WORK/server.crt" 2>/dev/null
chmod 600 "$WORK/server.key"
grep -q "ENCRYPTED PRIVATE KEY" "$WORK/server.key" || fail "the server key is not encrypted"

# 4. A cluster whose TLS key passphrase and WAL archive go through kms.
as_pg "$PG_BIN/initdb" -D "$PGDATA" -A trust -U postgres >/dev/null
cat >> "$PGDATA/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
ssl = on
ssl_cert_file = '$WORK/server.crt'
ssl_key_file = '$WORK/server.key'
ssl_passphrase_command = '$KMS --socket $SOCK passphrase pg/ssl'
ssl_passphrase_command_supports_reload = on
wal_level = replica
archive_mode = on
archive_command = 'test ! -f $WORK/archive/%f && $KMS --socket $SOCK encrypt --key pg/wal %p $WORK/archive/%f'
archive_timeout = 0
CONF
as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$WORK/primary.log" -w start >/dev/null
PSQL=(as_pg psql -X -q -t -A -h "$WORK" -p "$PORT" -d postgres)
[ "$("${PSQL[@]}" -c 'show ssl')" = "on" ] || fail "ssl is off"
SSL_USED=$(as_pg psql -X -t -A "host=127.0.0.1 port=$PORT dbname=postgres sslmode=require" \
    -c "select ssl from pg_stat_ssl where pid = pg_backend_pid()")
[ "$SSL_USED" = "t" ] || fail "a TLS connection was not possible"
ok "PostgreSQL started with its TLS key unlocked through kms, and serves TLS"

# 5. Traffic, a base backup, rows before and after a recovery target.
wait_archived() {  # waits until the segment holding the current WAL position is archived
    local want
    want=$("${PSQL[@]}" -c "select pg_walfile_name(pg_current_wal_lsn())")
    "${PSQL[@]}" -c "select pg_switch_wal()" >/dev/null
    for _ in $(seq 300); do
        [ -f "$WORK/archive/$want" ] && return 0
        sleep 0.1
    done
    fail "segment $want was not archived"
}
as_pg pgbench -q -i -s 2 -h "$WORK" -p "$PORT" postgres >/dev/null 2>&1
as_pg pgbench -T 3 -c 2 -h "$WORK" -p "$PORT" postgres >/dev/null 2>&1
as_pg "$PG_BIN/pg_basebackup" -h "$WORK" -p "$PORT" -D "$WORK/base" -X none -c fast >/dev/null
"${PSQL[@]}" -c "create table kept (id int, note text)"
"${PSQL[@]}" -c "insert into kept select g, '$MARKER' from generate_series(1, 1000) g"
wait_archived
sleep 1.1
TARGET=$("${PSQL[@]}" -c "select now()")
sleep 1.1
"${PSQL[@]}" -c "insert into kept select g, 'after the target' from generate_series(1001, 1500) g"
wait_archived
ok "pgbench traffic, a base backup and two batches archived"

# 6. kmsd down while archive_command runs: PostgreSQL retries, nothing is lost.
stop_kmsd
BEFORE_FAIL=$("${PSQL[@]}" -c "select failed_count from pg_stat_archiver")
"${PSQL[@]}" -c "insert into kept select g, 'while kmsd was down' from generate_series(1501, 1600) g"
PENDING=$("${PSQL[@]}" -c "select pg_walfile_name(pg_current_wal_lsn())")
"${PSQL[@]}" -c "select pg_switch_wal()" >/dev/null
for _ in $(seq 200); do
    NOW_FAIL=$("${PSQL[@]}" -c "select failed_count from pg_stat_archiver")
    [ "$NOW_FAIL" -gt "$BEFORE_FAIL" ] && break
    sleep 0.1
done
[ "$NOW_FAIL" -gt "$BEFORE_FAIL" ] || fail "archive_command did not fail while kmsd was down"
[ ! -f "$WORK/archive/$PENDING" ] || fail "a segment was archived while kmsd was down"
ls "$WORK/archive" | grep -q '\.tmp' && fail "a failed archive_command left a temporary file"
start_kmsd
# After three failures in a row the archiver sleeps up to 60 s before it tries again; a new
# WAL segment wakes it at once, so one is switched to now and then every 10 s while waiting.
for i in $(seq 1200); do
    [ -f "$WORK/archive/$PENDING" ] && break
    if [ $((i % 100)) = 1 ]; then
        "${PSQL[@]}" -c "insert into kept values (0, 'wake the archiver')" >/dev/null
        "${PSQL[@]}" -c "select pg_switch_wal()" >/dev/null
    fi
    sleep 0.1
done
[ -f "$WORK/archive/$PENDING" ] || fail "archiving did not catch up after kmsd came back"
ok "with kmsd down archive_command failed ($((NOW_FAIL - BEFORE_FAIL)) times), and caught up after"
as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null

# 7. No archived file holds plaintext: the marker is in none of them, but in the WAL itself.
grep -rlq "$MARKER" "$PGDATA/pg_wal" || fail "the marker is not even in the primary's WAL"
if grep -rlq "$MARKER" "$WORK/archive"; then fail "an archived file holds plaintext"; fi
N_ARCHIVED=$(ls "$WORK/archive" | wc -l)
ok "$N_ARCHIVED archived files, none holds the marker"

# 8. Point-in-time recovery from the base backup through kms decrypt.
cp -a "$WORK/base" "$RESTORED"
cat >> "$RESTORED/postgresql.conf" <<CONF
restore_command = '$KMS --socket $SOCK decrypt $WORK/archive/%f %p'
recovery_target_time = '$TARGET'
recovery_target_action = 'promote'
archive_mode = off
CONF
as_pg touch "$RESTORED/recovery.signal"
as_pg "$PG_BIN/pg_ctl" -D "$RESTORED" -l "$WORK/restored.log" -w -t 120 start >/dev/null
for _ in $(seq 600); do
    [ "$("${PSQL[@]}" -c 'select pg_is_in_recovery()' 2>/dev/null)" = "f" ] && break
    sleep 0.2
done
[ "$("${PSQL[@]}" -c 'select pg_is_in_recovery()')" = "f" ] || fail "recovery did not finish"
KEPT=$("${PSQL[@]}" -c "select count(*) from kept where note = '$MARKER'")
AFTER=$("${PSQL[@]}" -c "select count(*) from kept where id > 1000")
ACCOUNTS=$("${PSQL[@]}" -c "select count(*) from pgbench_accounts")
[ "$KEPT" = "1000" ] || fail "recovered $KEPT of the 1000 rows before the target"
[ "$AFTER" = "0" ] || fail "recovered $AFTER rows written after the target"
[ "$ACCOUNTS" = "200000" ] || fail "pgbench_accounts has $ACCOUNTS rows"
grep -q "restored log file" "$WORK/restored.log" || fail "no WAL was restored from the archive"
ok "point-in-time recovery through kms decrypt: 1000 rows before the target, none after"

# 9. The audit log saw the key accesses and holds no key material.
grep -q "op=GET id=pg/ssl result=ok" "$WORK/audit.log" || fail "no audited GET of pg/ssl"
grep -q "id=pg/wal result=ok" "$WORK/audit.log" || fail "no audited access to pg/wal"
grep -q "$TLS_PASS" "$WORK/audit.log" && fail "the audit log holds the TLS passphrase"
ok "audit log: $(wc -l < "$WORK/audit.log") lines, no secrets"
echo "postgres end-to-end with the $PROVIDER provider: passed"
