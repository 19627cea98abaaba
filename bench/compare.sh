#!/usr/bin/env bash
# The whole comparison in one table: kmsd (cached and uncached GET, durable GET-OR-CREATE, 1, 8
# and 32 clients) against OpenBao Transit decrypt and datakey and against the pkcs11 provider on
# SoftHSM2, all through the same load generator; AES key wrap, PBKDF2 and AES-256-GCM against
# OpenSSL; durable creates; the 1,000,000-key store. Every ratio comes from this one run.
#
# Needs: bao on PATH (or $KMS_BAO), softhsm2-util and /usr/lib/softhsm/libsofthsm2.so, openssl,
# a C compiler with libssl-dev (for the PBKDF2 reference); .ci/run installs all of them.
# Takes about 4 minutes of measuring on 2 cores after the release build (which can take 10);
# scratch data goes under target/. Stopped by SIGTERM alone, it leaves its servers running:
# stop it with Ctrl-C (the whole process group).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p kmsd -p kms-cli -p kms-bench
exec target/release/kms-bench compare "$@"
