#!/bin/sh
# Trim the base tree of the x86-64 image; runs chrooted in it (an mmdebstrap customize hook).
# Keeps only the kernel modules a QEMU q35 / small x86-64 gateway needs, with their
# dependencies (modprobe --show-depends), so 395 MB of modules become about 10 MB.
set -eu
kver=$(ls /lib/modules)
keep="virtio_pci virtio_blk virtio_net virtio_rng virtio_console ext4 vfat nls_cp437 nls_ascii
      nls_utf8 nls_iso8859_1 autofs4 efivarfs tpm_crb tpm_tis i6300esb iTCO_wdt
      xhci_pci usb_storage uas sd_mod"
# (the second line: USB sticks for the technician console, edgeops-usb.service -- the xHCI
# controller, USB mass storage and SCSI disks; usbcore and scsi_mod come as their dependencies)
list=/tmp/keep-modules
: > "$list"
for m in $keep; do
    # "insmod PATH" for each module file, "builtin NAME" for what the kernel has built in
    modprobe -S "$kver" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" { print $2 }' >> "$list" || true
done
find "/lib/modules/$kver/kernel" -type f -name '*.ko*' | grep -vxF -f "$list" | xargs -r rm -f
find "/lib/modules/$kver/kernel" -depth -type d -empty -delete
depmod -a "$kver"
# the links GRUB's menu entries load, the same in every slot
ln -sfn "vmlinuz-$kver" /boot/vmlinuz
ln -sfn "initrd.img-$kver" /boot/initrd.img
rm -f /vmlinuz /vmlinuz.old /initrd.img /initrd.img.old
rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/locale/* /usr/share/info/* /var/cache/debconf/*-old
