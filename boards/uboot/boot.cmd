# edgeops A/B boot script, bootcount scheme (agent/bootloader/uboot.py, backend "uboot").
# Build: mkimage -A arm64 -O linux -T script -C none -n edgeops -d boot.cmd boot.scr
#
# U-Boot itself (CONFIG_BOOTCOUNT_LIMIT with CONFIG_BOOTCOUNT_ENV) increments
# bootcount on every boot while upgrade_available=1 and, once bootcount >
# bootlimit, runs altbootcmd instead of bootcmd (doc/README.bootcount). With
# bootlimit=1 a trial slot boots exactly once; the next reset of any kind runs
# altbootcmd, which falls back to EO_ALT without the agent's help.
#
# Environment: EO_SLOT (slot to boot), EO_ALT (fallback), upgrade_available,
# bootcount, bootlimit. The agent writes them with fw_setenv semantics.

test -n "${EO_SLOT}" || setenv EO_SLOT A
test -n "${EO_ALT}" || setenv EO_ALT ${EO_SLOT}
test -n "${bootlimit}" || setenv bootlimit 1

# altbootcmd must be in the saved environment: U-Boot reads it before any script runs.
if test -z "${altbootcmd}"; then
    setenv altbootcmd 'setenv EO_SLOT ${EO_ALT}; setenv upgrade_available 0; setenv bootcount 0; saveenv; run bootcmd'
    saveenv
fi

# Belt and braces: if this U-Boot ran bootcmd although the trial's boot limit is
# exceeded (altbootcmd was not in its environment yet), take the fallback here.
if test "${upgrade_available}" = "1" && test ${bootcount} -gt ${bootlimit}; then
    run altbootcmd
fi

if test "${EO_SLOT}" = "A"; then
    setenv eo_part 2
elif test "${EO_SLOT}" = "B"; then
    setenv eo_part 3
else
    echo "edgeops: EO_SLOT=${EO_SLOT} names no slot; falling back to ${EO_ALT}"
    run altbootcmd
fi

setenv bootargs "${bootargs} root=PARTLABEL=rootfs_${EO_SLOT} rootwait ro edgeops.slot=${EO_SLOT}"
load ${devtype} ${devnum}:${eo_part} ${kernel_addr_r} /boot/Image
# Debian's arm64 kernel finds its root with modules (virtio, mmc, ext4): the initrd is needed
load ${devtype} ${devnum}:${eo_part} ${ramdisk_addr_r} /boot/initrd.img
setenv eo_initrd ${ramdisk_addr_r}:${filesize}
# the slot's device tree when U-Boot names one (fdtfile), else the one U-Boot itself runs on
# (QEMU virt and boards whose firmware hands U-Boot the tree have no file to load)
if test -n "${fdtfile}" && load ${devtype} ${devnum}:${eo_part} ${fdt_addr_r} /boot/${fdtfile}; then
    setenv eo_fdt ${fdt_addr_r}
else
    setenv eo_fdt ${fdtcontroladdr}
fi
booti ${kernel_addr_r} ${eo_initrd} ${eo_fdt}
# Only reached when the kernel failed to load: let the bootcount fallback decide.
reset
