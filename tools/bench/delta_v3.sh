#!/usr/bin/env bash
# delta_v3.sh - add a third release (v3) to the delta corpus of ../shared/anchors/delta/run.sh,
# so tools/bench/delta.py can measure "from the predecessor" (v2 -> v3) and "from a release
# two steps older" (v1 -> v3). The anchors build only v1 and v2.
#
# v3 = v2's tree (left in $D/tree by run.sh) plus what a next monthly release could carry:
# three more small packages with their dependencies (iproute2, iputils-ping, vim-tiny; .debs
# resolved by the host's apt against v2's dpkg status and cached in $D/cache/v3-debs, as
# run.sh does for v2), a version bump, another sysctl drop-in and a changed motd. Images use
# run.sh's exact options (fixed UUID, hash seed, mkfs time, SOURCE_DATE_EPOCH).
# Needs root (chroot) and Debian's registry once (apt). Writes only under $D.
set -euo pipefail
D=${D:-/tmp/delta}
SIZE_MIB=${SIZE_MIB:-512}
SDE=1700000000
FS_UUID=5f1c7a2e-0d6b-4c1e-9a57-3b2f8e4d6c10
HASH_SEED=8e3c1d2a-6b4f-4f1a-9c7e-2d5b0a9e1f33
V3_NEW_PKGS=${V3_NEW_PKGS:-"iproute2 iputils-ping vim-tiny"}
TREE=$D/tree3 CACHE=$D/cache IMG=$D/img
[ -s "$IMG/v3.ext4" ] && [ -s "$IMG/v3.sqfs" ] && { echo "v3 present in $IMG" >&2; exit 0; }
[ -d "$D/tree/etc" ] || { echo "delta_v3.sh: run ../shared/anchors/delta/run.sh first (no $D/tree)" >&2; exit 1; }
rm -rf "$TREE"; cp -a "$D/tree" "$TREE"
if [ ! -e "$CACHE/v3-debs/.complete" ]; then
  rm -rf "$CACHE/v3-debs"; mkdir -p "$CACHE/v3-debs/partial"
  # shellcheck disable=SC2086
  apt-get -o "Dir::State::status=$TREE/var/lib/dpkg/status" -o "Dir::Cache::archives=$CACHE/v3-debs/" \
    -o Debug::NoLocking=1 -o APT::Install-Recommends=false -qq -y -d install $V3_NEW_PKGS >&2
  rmdir "$CACHE/v3-debs/partial" 2>/dev/null || true
  touch "$CACHE/v3-debs/.complete"
fi
mkdir -p "$TREE/tmp/v3-debs"; cp "$CACHE"/v3-debs/*.deb "$TREE/tmp/v3-debs/"
chroot "$TREE" sh -c 'export DEBIAN_FRONTEND=noninteractive; dpkg -i /tmp/v3-debs/*.deb || dpkg -i /tmp/v3-debs/*.deb' >&2
rm -rf "$TREE/tmp/v3-debs" "$TREE"/var/cache/apt/archives/*.deb "$TREE"/var/cache/apt/*.bin "$TREE"/var/lib/apt/lists/*
printf 'NAME=edgeops-gw\nVERSION=1.2.0\nBUILD_ID=%s\n' "$((SDE + 2 * 86400))" > "$TREE/etc/edgeops-release"
printf 'edgeops gateway image 1.2.0\nUnauthorised access prohibited.\n' > "$TREE/etc/motd"
printf 'net.core.somaxconn = 1024\n' > "$TREE/etc/sysctl.d/91-gateway-net.conf"
rm -f "$IMG/v3.ext4"; truncate -s "${SIZE_MIB}M" "$IMG/v3.ext4"
E2FSPROGS_FAKE_TIME=$SDE mkfs.ext4 -q -F -t ext4 -b 4096 -I 256 -L rootfs -U "$FS_UUID" \
  -E root_owner=0:0,hash_seed=$HASH_SEED,lazy_itable_init=0,lazy_journal_init=0,nodiscard \
  -d "$TREE" "$IMG/v3.ext4"
rm -f "$IMG/v3.sqfs"
SOURCE_DATE_EPOCH=$SDE mksquashfs "$TREE" "$IMG/v3.sqfs" -noappend -quiet -no-progress \
  -comp zstd -Xcompression-level 19 -b 131072 -processors 2 >/dev/null
echo "v3: $(ls "$CACHE"/v3-debs/*.deb | wc -l) .debs ($(cat "$CACHE"/v3-debs/*.deb | wc -c) bytes): $(ls "$CACHE"/v3-debs | tr '\n' ' ')" >&2
