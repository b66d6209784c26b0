#!/usr/bin/env bash
# An emulated Raspberry Pi: a Debian bookworm arm64 root (the base of Raspberry Pi OS) run under
# qemu-aarch64, with the agent flashed into it (aarch64 wheels from the package index) and run
# against a broker on this host until its first summary arrives. Slow (minutes): not part of the
# test suite. Needs root (debootstrap, binfmt_misc, chroot).
#
#   sudo bash scripts/emulated_pi.sh [--bench] [ROOTFS]   # default /var/tmp/edgekit-pi-root (kept for reruns)
#
# --bench then measures the agent's own cost inside the root (scripts/bench_agent.py --device, against the
# bare LiteRT interpreter) and prints it beside the host's last bench_agent.py figures.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH=()
if [ "${1:-}" = "--bench" ]; then BENCH=(--bench); shift; fi
ROOTFS="${1:-/var/tmp/edgekit-pi-root}"
MIRROR="${EDGEKIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
[ "$(id -u)" = 0 ] || { echo "emulated_pi: run as root (debootstrap, binfmt_misc, chroot)" >&2; exit 2; }

echo "[1/5] host packages: debootstrap, qemu-user-static, binfmt-support" >&2
command -v debootstrap >/dev/null && [ -x /usr/bin/qemu-aarch64-static ] || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static binfmt-support >/dev/null; }
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true

if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
  echo "[2/5] debootstrap bookworm arm64 into $ROOTFS (about 3 minutes)" >&2
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOTFS" "$MIRROR" >/dev/null
else
  echo "[2/5] reusing $ROOTFS" >&2
fi
# The package index may be reached through a proxy whose CA only the host trusts.
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true

for stale in "$ROOTFS/proc/cpuinfo" "$ROOTFS/proc" "$ROOTFS/sys" "$ROOTFS/dev"; do  # left by an interrupted run
  mountpoint -q "$stale" && umount -l "$stale" || true
done
mounted=()
cleanup() {
  [ -f "$ROOTFS/opt/edgekit/agent.pid" ] && kill "$(cat "$ROOTFS/opt/edgekit/agent.pid")" 2>/dev/null || true
  sleep 1
  for ((i=${#mounted[@]}-1; i>=0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
for fs in proc dev; do
  mountpoint -q "$ROOTFS/$fs" || { mount --bind "/$fs" "$ROOTFS/$fs"; mounted+=("$ROOTFS/$fs"); }
done
# The runtimes' CPU detection (the cpuinfo library, in onnxruntime and LiteRT alike) crashes under
# qemu-user on the host's x86 /proc/cpuinfo and /sys: give the root a Raspberry Pi 4's (Cortex-A72)
# and leave /sys out.
CPUINFO="$(mktemp)"
for cpu in 0 1 2 3; do
  printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$cpu"
done > "$CPUINFO"
mount --bind "$CPUINFO" "$ROOTFS/proc/cpuinfo"; mounted+=("$ROOTFS/proc/cpuinfo")

echo "[3/5] the root runs aarch64: $(chroot "$ROOTFS" /usr/bin/uname -m), $(chroot "$ROOTFS" /usr/bin/python3 --version)" >&2
# The host side (edgekit, paho for the broker check) runs from the repository's .venv, as demo.sh's does:
# the system python3 has none of it.
source "$REPO/scripts/setup_env.sh" host
cd "$REPO"
python scripts/emulated_pi.py "$ROOTFS" "${BENCH[@]}"   # not exec: the trap must unmount afterwards
