#!/bin/sh
# Stage edgeops into a device root filesystem tree, from an image build's post-build step
# (Yocto ROOTFS_POSTPROCESS_COMMAND, Buildroot BR2_ROOTFS_POST_BUILD_SCRIPT, debos/mkosi
# scripts), before the tree becomes the rootfs image. See image/README.md.
#
#   image/stage-rootfs.sh --rootfs DIR --board NAME --keyring ROOT.crt [--fleet fleet.toml]
#                         [--controller] [--edgeops CMD]
#
# Writes (all under DIR):
#   etc/edgeops/agent.toml              from the board file ('edgeops board config NAME')
#   etc/edgeops/keyring/root.crt        the fleet's trusted root(s); devices refuse all else
#   etc/edgeops/fleet.toml              when --fleet is given (0600: it may hold a token)
#   usr/share/edgeops/boards/NAME.toml  the board file, for 'edgeops board check' on the device
#   etc/systemd/system/edgeops-agent.service, edgeops-provision.service (TPM anchoring at
#                                            boot), both enabled for multi-user.target
#   etc/systemd/system.conf.d/edgeops-watchdog.conf  RuntimeWatchdogSec: PID 1 feeds /dev/watchdog
#   etc/systemd/system/edgeops-controller.service when --controller (enabled too)
#   etc/systemd/system/edgeops-console@.service, enabled for the board's console tty (its
#                                            serial-getty@ masked), and edgeops-usb.service
# The Python package itself is installed by the image builder's own Python packaging
# (pip wheel, a Yocto/Buildroot python package, or dh-python): /usr/bin/edgeops must exist.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
rootfs= board= keyring= fleet= controller=0 edgeops=edgeops
usage() { echo "usage: $0 --rootfs DIR --board NAME --keyring ROOT.crt [--fleet fleet.toml] [--controller] [--edgeops CMD]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --rootfs) rootfs=${2:?}; shift 2 ;;
        --board) board=${2:?}; shift 2 ;;
        --keyring) keyring=${2:?}; shift 2 ;;
        --fleet) fleet=${2:?}; shift 2 ;;
        --controller) controller=1; shift ;;
        --edgeops) edgeops=${2:?}; shift 2 ;;
        *) usage ;;
    esac
done
[ -n "$rootfs" ] && [ -n "$board" ] && [ -n "$keyring" ] || usage
[ -d "$rootfs" ] || { echo "stage-rootfs: $rootfs is not a directory; give the rootfs staging tree" >&2; exit 2; }
[ -f "$keyring" ] || { echo "stage-rootfs: keyring $keyring not found; give the fleet's root certificate(s), PEM" >&2; exit 2; }
openssl x509 -in "$keyring" -noout 2>/dev/null || { echo "stage-rootfs: $keyring is not a PEM certificate" >&2; exit 2; }

etc="$rootfs/etc/edgeops"
units="$rootfs/etc/systemd/system"
install -d -m 0755 "$etc" "$etc/keyring" "$units/multi-user.target.wants" "$rootfs/usr/share/edgeops/boards"
# the board file first: 'board config' fails with a one-line error on an unknown board
$edgeops board config "$board" > "$etc/agent.toml.tmp"
mv "$etc/agent.toml.tmp" "$etc/agent.toml"
$edgeops board show "$board" > "$rootfs/usr/share/edgeops/boards/$(basename "$board" .toml).toml"
install -m 0644 "$keyring" "$etc/keyring/root.crt"
if [ -n "$fleet" ]; then
    install -m 0600 "$fleet" "$etc/fleet.toml"
fi
install -m 0644 "$here/systemd/edgeops-agent.service" "$here/systemd/edgeops-provision.service" "$units/"
ln -sf ../edgeops-agent.service "$units/multi-user.target.wants/edgeops-agent.service"
# PID 1 feeds the hardware watchdog: a hung system is reset, then the bootloader decides
install -d -m 0755 "$rootfs/etc/systemd/system.conf.d"
install -m 0644 "$here/systemd/system.conf.d/edgeops-watchdog.conf" "$rootfs/etc/systemd/system.conf.d/"
# runs only where /dev/tpmrm0 exists (a TPM, or a TPM HAT on a Raspberry Pi)
ln -sf ../edgeops-provision.service "$units/multi-user.target.wants/edgeops-provision.service"
if [ "$controller" = 1 ]; then
    install -m 0644 "$here/systemd/edgeops-controller.service" "$units/"
    ln -sf ../edgeops-controller.service "$units/multi-user.target.wants/edgeops-controller.service"
fi
# The technician console on the board's serial port ([board] console, copied into agent.toml
# as [console] device), in place of the login getty there: systemd's getty generator would
# start serial-getty@ on the kernel's console port, so that instance is masked. And the USB
# stick watcher (the [console] usb policy decides whether it offers, installs or ignores).
tty=$(sed -n '/^\[console\]/,/^\[/ s/^device *= *"\(tty[A-Za-z0-9]*\)".*/\1/p' "$etc/agent.toml")
install -m 0644 "$here/systemd/edgeops-console@.service" "$here/systemd/edgeops-usb.service" "$units/"
ln -sf ../edgeops-usb.service "$units/multi-user.target.wants/edgeops-usb.service"
if [ -n "$tty" ]; then
    install -d -m 0755 "$units/getty.target.wants"
    ln -sf ../edgeops-console@.service "$units/getty.target.wants/edgeops-console@$tty.service"
    ln -sf /dev/null "$units/serial-getty@$tty.service"
fi
echo "staged edgeops for board $board into $rootfs"
