# edgeops A/B boot script, RAUC's attempts scheme (agent/bootloader/uboot_rauc.py,
# backend "uboot_rauc"); the selection loop is RAUC's documented U-Boot script.
# Build: mkimage -A arm64 -O linux -T script -C none -n edgeops-rauc -d boot-rauc.cmd boot.scr
#
# BOOT_ORDER lists slots by priority; BOOT_<S>_LEFT counts the boots a slot may
# still try (hex, as setexpr computes). The first slot in BOOT_ORDER with
# attempts left is booted after its counter is decremented and saved, so a slot
# that is not confirmed ("mark good") runs out. If every counter is spent, all
# but an unconfirmed trial's are reset and the board resets (RAUC resets all).

test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

setenv eo_part
setenv raucslot
for BOOT_SLOT in "${BOOT_ORDER}"; do
    if test "x${eo_part}" != "x"; then
        # a slot was chosen: skip the rest
    elif test "x${BOOT_SLOT}" = "xA"; then
        if test ${BOOT_A_LEFT} -gt 0; then
            setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
            setenv eo_part 2
            setenv raucslot A
        fi
    elif test "x${BOOT_SLOT}" = "xB"; then
        if test ${BOOT_B_LEFT} -gt 0; then
            setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
            setenv eo_part 3
            setenv raucslot B
        fi
    fi
done

if test -n "${eo_part}"; then
    # save the spent attempt *before* booting, and before bootargs (kept out of the saved env)
    saveenv
    setenv bootargs "${bootargs} root=PARTLABEL=rootfs_${raucslot} rootwait ro rauc.slot=${raucslot}"
else
    # RAUC refills every counter here; an unconfirmed trial (EO_TRIAL, set by the agent)
    # is not refilled, so it cannot come back after the committed slot ran out of tries.
    echo "edgeops: no slot has attempts left; resetting the counters"
    if test "x${EO_TRIAL}" != "xA"; then setenv BOOT_A_LEFT 3; fi
    if test "x${EO_TRIAL}" != "xB"; then setenv BOOT_B_LEFT 3; fi
    saveenv
    reset
fi

load ${devtype} ${devnum}:${eo_part} ${kernel_addr_r} /boot/Image
load ${devtype} ${devnum}:${eo_part} ${fdt_addr_r} /boot/${fdtfile}
booti ${kernel_addr_r} - ${fdt_addr_r}
reset
