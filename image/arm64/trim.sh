#!/bin/sh
# Trim the base tree of the arm64 images; runs chrooted in it (an mmdebstrap customize hook,
# under qemu-user). One tree for QEMU virt (uboot-arm64) and the Raspberry Pis: keeps the
# kernel modules of both (virtio, the Pi's SD/eMMC and watchdog), with their dependencies.
set -eu
kver=$(ls /lib/modules)
keep="virtio_pci virtio_mmio virtio_blk virtio_net virtio_rng virtio_console ext4 vfat nls_cp437
      nls_ascii nls_utf8 nls_iso8859_1 autofs4 tpm_crb tpm_tis i6300esb
      mmc_block sdhci_iproc sdhci_brcmstb bcm2835_wdt bcm2835_rng"
list=/tmp/keep-modules
: > "$list"
for m in $keep; do
    modprobe -S "$kver" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" { print $2 }' >> "$list" || true
done
find "/lib/modules/$kver/kernel" -type f -name '*.ko*' | grep -vxF -f "$list" | xargs -r rm -f
find "/lib/modules/$kver/kernel" -depth -type d -empty -delete
depmod -a "$kver"
# U-Boot's booti and the Pi firmware want the uncompressed Image (Debian's vmlinuz is gzip);
# the initrd as a hard link (U-Boot's ext4 and the copy onto the Pi's FAT need no symlink)
zcat "/boot/vmlinuz-$kver" > /boot/Image 2>/dev/null || cp "/boot/vmlinuz-$kver" /boot/Image
rm -f "/boot/vmlinuz-$kver"
ln -f "/boot/initrd.img-$kver" /boot/initrd.img
# device trees: only the Pis' (QEMU virt hands U-Boot its own, which U-Boot passes on)
find "/usr/lib/linux-image-$kver" -mindepth 1 -maxdepth 1 ! -name broadcom -exec rm -rf {} +
find "/usr/lib/linux-image-$kver/broadcom" -type f ! -name 'bcm2711-*' ! -name 'bcm2712-*' -delete
rm -f /vmlinuz /vmlinuz.old /initrd.img /initrd.img.old
rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/locale/* /usr/share/info/* /var/cache/debconf/*-old
