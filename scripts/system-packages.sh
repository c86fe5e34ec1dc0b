#!/usr/bin/env bash
# Install the Debian packages the tests use beside .venv: HAProxy, the load balancer
# of tests/test_failover.py. Idempotent; needs root or sudo, and apt-get.
# Exit codes: 0 present or installed, 1 could not install.
set -euo pipefail

packages=(haproxy)
missing=()
for package in "${packages[@]}"; do
  command -v "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "system packages: present (${packages[*]})."
  exit 0
fi

as_root=()
if [[ $(id -u) -ne 0 ]]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "error: ${missing[*]} missing; install as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  as_root=(sudo)
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: ${missing[*]} missing and no apt-get here; install it with this system's package manager" >&2
  exit 1
fi
install() { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; }
install || { "${as_root[@]}" apt-get update -q && install; }
