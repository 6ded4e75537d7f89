#!/usr/bin/env bash
# One-time setup on a fresh Debian machine (idempotent, quick when already done):
# Debian's aarch64 cross toolchain + qemu, then tvmq and its pinned Python dependencies.
set -euo pipefail
cd "$(dirname "$0")"
need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
compgen -c llvm-mca | grep -q . || need+=(llvm)  # llvm-mca: Cortex-A72 cycle estimates
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m pip install -q -c constraints.txt -e ".[test]"
# torchao (PT2E QAT/PTQ, tvmq.pt2e and its tests): --no-deps keeps pip from touching torch
python3 -m pip install -q --no-deps "torchao==0.18.*"
