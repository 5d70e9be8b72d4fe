#!/usr/bin/env bash
# Installs the programs the test suite talks to as independent peers: OpenSSL, curl, GnuTLS's
# gnutls-cli/gnutls-serv, a PostgreSQL server (and its psql client), a headless browser, and stunnel (the
# baseline of bench/tunnel.py). Only what is missing is installed; needs root.
set -euo pipefail
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v gnutls-cli >/dev/null || need+=(gnutls-bin)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# psql runs through the tunnel tests (it comes with the postgresql package; the client alone is its own).
command -v psql >/dev/null || need+=(postgresql-client)
command -v stunnel4 >/dev/null || need+=(stunnel4)
command -v runuser >/dev/null || need+=(util-linux)
# The video call test screenshots the receiver's web page with headless Chromium.
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing system packages: ${need[*]} (run as root, or install them: apt-get install ${need[*]})" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
