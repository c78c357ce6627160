# edgeops A/B boot script, bootcount scheme (backend "uboot"), for a U-Boot whose own
# environment Linux cannot write as fw_setenv does: QEMU's arm64 virt machine with Debian's
# u-boot-qemu (qemu_arm64 keeps its environment in the second pflash bank). This script
# reads and writes the environment itself, raw on the boot disk, in libubootenv's redundant
# format (crc32 LE | flags | data, two copies, the newer valid one wins; image/uboot-arm64/
# fw_env.config: /dev/vda 0x3f8000 and 0x3fc000, 0x4000 each), so the agent's uboot backend
# (agent/adapters/bootloader/uboot.py, fwenv.py) and fw_printenv read what it wrote.
# Build: mkimage -A arm64 -O linux -T script -C none -n edgeops -d boot-virt.cmd boot.scr
#
# The decision is boot.cmd's, done here instead of by CONFIG_BOOTCOUNT_LIMIT/BOOTCOUNT_ENV
# (U-Boot doc/README.bootcount): while upgrade_available=1 every boot adds 1 to bootcount and
# saves it before the kernel starts; once bootcount > bootlimit (1) the trial is over and the
# slot falls back to EO_ALT (upgrade_available=0, bootcount=0), without the agent's help.
# Debian's arm64 kernel finds its root with modules (virtio, ext4), so an initrd is loaded;
# the device tree is the one QEMU gave U-Boot (${fdtcontroladdr}); booti needs the
# uncompressed Image (image/arm64/trim.sh makes /boot/Image).
#
# setexpr, cp, mw, env import/export and "virtio read/write" take hex numbers (no 0x).

setenv eo_a1 50000000
setenv eo_a2 50004000
setenv eo_buf 50008000
setenv eo_out 5000c000
virtio dev ${devnum}
virtio read ${eo_a1} 1fc0 20
virtio read ${eo_a2} 1fe0 20
setexpr eo_p ${eo_a1} + 4
setexpr.b eo_f1 *${eo_p}
setexpr eo_p ${eo_a2} + 4
setexpr.b eo_f2 *${eo_p}

# one copy as "env import -c" wants it (crc32 | data): the flags byte left out
setenv eo_imp 'cp.b ${eo_src} ${eo_buf} 4; setexpr eo_p ${eo_src} + 5; setexpr eo_q ${eo_buf} + 4; cp.b ${eo_p} ${eo_q} 3ffb; env import -c ${eo_buf} 3fff'
# write the copy that is not the current one, with flags + 1 (wrapping at ff, as U-Boot does)
setenv eo_save 'mw.b ${eo_buf} 0 4000; env export -c -s 3fff ${eo_buf} EO_SLOT EO_ALT upgrade_available bootcount bootlimit; mw.b ${eo_out} 0 4000; cp.b ${eo_buf} ${eo_out} 4; setexpr eo_flags ${eo_flags} + 1; setexpr eo_flags ${eo_flags} % 100; setexpr eo_p ${eo_out} + 4; mw.b ${eo_p} ${eo_flags} 1; setexpr eo_p ${eo_out} + 5; setexpr eo_q ${eo_buf} + 4; cp.b ${eo_q} ${eo_p} 3ffb; if test "${eo_cur}" = "1"; then setenv eo_cur 2; virtio write ${eo_out} 1fe0 20; else setenv eo_cur 1; virtio write ${eo_out} 1fc0 20; fi'

# which copy is newer: (f1 - f2) mod 100 in 1..7f means copy 1
setexpr eo_d ${eo_f1} - ${eo_f2}
setexpr eo_d ${eo_d} % 100
setexpr eo_h ${eo_d} / 80
if test "${eo_d}" = "0" || test "${eo_h}" = "0"; then
    setenv eo_first 1
else
    setenv eo_first 2
fi
setenv eo_cur
if test "${eo_first}" = "1"; then
    setenv eo_src ${eo_a1}; setenv eo_flags ${eo_f1}
    if run eo_imp; then setenv eo_cur 1; else
        setenv eo_src ${eo_a2}; setenv eo_flags ${eo_f2}
        if run eo_imp; then setenv eo_cur 2; fi
    fi
else
    setenv eo_src ${eo_a2}; setenv eo_flags ${eo_f2}
    if run eo_imp; then setenv eo_cur 2; else
        setenv eo_src ${eo_a1}; setenv eo_flags ${eo_f1}
        if run eo_imp; then setenv eo_cur 1; fi
    fi
fi
if test -z "${eo_cur}"; then
    echo "edgeops: no valid environment on the disk; booting slot A"
    setenv eo_flags 0
fi

test -n "${EO_SLOT}" || setenv EO_SLOT A
test -n "${EO_ALT}" || setenv EO_ALT ${EO_SLOT}
test -n "${bootlimit}" || setenv bootlimit 1
test -n "${bootcount}" || setenv bootcount 0

if test "${upgrade_available}" = "1"; then
    setexpr bootcount ${bootcount} + 1
    if test ${bootcount} -gt ${bootlimit}; then
        echo "edgeops: trial of ${EO_SLOT} not committed after ${bootlimit} boot(s); falling back to ${EO_ALT}"
        setenv EO_SLOT ${EO_ALT}
        setenv upgrade_available 0
        setenv bootcount 0
    fi
    # saved before the kernel starts: a trial that hangs or loses power has spent its boot
    run eo_save
fi

if test "${EO_SLOT}" = "A"; then
    setenv eo_part 2
elif test "${EO_SLOT}" = "B"; then
    setenv eo_part 3
else
    echo "edgeops: EO_SLOT=${EO_SLOT} names no slot; booting ${EO_ALT}"
    setenv EO_SLOT ${EO_ALT}
    setenv eo_part 2
    test "${EO_SLOT}" = "B" && setenv eo_part 3
fi
echo "edgeops: booting slot ${EO_SLOT} (partition ${eo_part}, upgrade_available=${upgrade_available}, bootcount=${bootcount})"

setenv bootargs "console=ttyAMA0,115200 ${eo_bootargs} root=PARTLABEL=rootfs_${EO_SLOT} rootwait ro edgeops.slot=${EO_SLOT}"
load ${devtype} ${devnum}:${eo_part} ${kernel_addr_r} /boot/Image
load ${devtype} ${devnum}:${eo_part} ${ramdisk_addr_r} /boot/initrd.img
booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}
# Only reached when the kernel failed to load or start: a trial has spent its boot already
reset
