#!/bin/bash
# dracut module: make kairos-init (a static PID 1) the initramfs's /init.
#
# kairos-init mounts /proc /sys /dev /run itself, loads kernel modules straight from
# /lib/modules/$(uname -r) (it reads each .ko's .modinfo; modules.dep is tolerated, not needed),
# finds partitions by label without udev, loop-mounts the Kairos image at /sysroot, sets up the
# overlays and bind mounts and switch_roots. So nothing of dracut's own boot logic runs: this
# module only contributes the binary and the .ko files it needs.
#
# The "99" matters: dracut runs install() in modules.d order, and /init is written by
# 00systemd (a symlink to systemd) and 99base (init.sh). "99kairos-init" sorts after both
# ("99base" < "99kairos-init" under dracut's LC_ALL=C), so the /init we install is the last one.

# Where the binary comes from: $KAIROS_INIT_BIN, else the packaged locations. Prints the path.
kairos_init_bin() {
    local _p
    if [[ -n ${KAIROS_INIT_BIN-} ]]; then
        # An explicit choice is final: a typo must not silently fall back to another binary.
        [[ -f $KAIROS_INIT_BIN && -x $KAIROS_INIT_BIN ]] || return 1
        printf '%s\n' "$KAIROS_INIT_BIN"
        return 0
    fi
    for _p in /usr/lib/kairos/kairos-init /usr/bin/kairos-init; do
        if [[ -f ${dracutsysrootdir-}$_p && -x ${dracutsysrootdir-}$_p ]]; then
            printf '%s\n' "${dracutsysrootdir-}$_p"
            return 0
        fi
    done
    return 1
}

# called by dracut
check() {
    kairos_init_bin > /dev/null || return 1
    # 255, not 0: "include only when asked for" (dracut --add kairos-init). Returning 0 would pull
    # the module into every initramfs dracut builds on a host where the binary is installed (a
    # kernel upgrade's postinst, say), silently replacing the distribution's /init.
    return 255
}

# called by dracut
depends() {
    # Nothing: kairos-init is self-contained (static, no udev, no shell, no kmod). Keep the
    # dracut "kernel-modules" module in the image (it is in the default set) when the initramfs
    # must drive arbitrary hardware: kairos-init loads whatever .ko matches a device's modalias.
    return 0
}

# called by dracut
installkernel() {
    # What every Kairos boot needs (loop + ext4/squashfs images, overlays; kairos-init loads
    # these unconditionally) plus the disk controllers of QEMU and of common PCs, and vfat/nls
    # for EFI/OEM partitions. instmods pulls in the dependencies (jbd2, mbcache, crc16, virtio,
    # libata, ...) and silently skips what the kernel has built in.
    # hostonly='' : these are needed whatever the build host has loaded, so --hostonly must not
    # filter them (with --no-hostonly it makes no difference).
    hostonly='' instmods \
        loop ext4 overlay squashfs \
        virtio_blk virtio_pci virtio_scsi \
        ahci ata_piix sd_mod nvme \
        vfat nls_cp437 nls_iso8859_1 \
        crc32c_generic crc32c-intel

    # kairos-init reads modules.builtin to know what needs no .ko. dracut's kernel_post step
    # copies it too; doing it here keeps the image correct if that ever changes.
    local _f
    for _f in modules.builtin modules.builtin.modinfo modules.order; do
        [[ -e $srcmods/$_f ]] && inst_simple "$srcmods/$_f" "/lib/modules/$kernel/$_f"
    done
    return 0
}

# called by dracut
install() {
    local _bin _m
    if ! _bin=$(kairos_init_bin); then
        dfatal "kairos-init: no binary (set KAIROS_INIT_BIN, or install /usr/lib/kairos/kairos-init)"
        return 1
    fi

    # /init may already be systemd's symlink (00systemd) or dracut's init.sh (99base):
    # replace it. inst_* never overwrite an existing file, hence the rm.
    rm -f -- "${initdir}/init"
    if ! inst_simple "$_bin" /init; then
        dfatal "kairos-init: failed to install $_bin as /init"
        return 1
    fi
    chmod 0755 "${initdir}/init"

    # Mount points kairos-init uses before anything writable exists; /dev/console, /dev/kmsg
    # and /dev/null are created by dracut itself (mknod when run as root).
    mkdir -p -m 0755 "${initdir}"/{dev,proc,sys,run,sysroot,tmp}

    for _m in systemd systemd-initrd dracut-systemd base rootfs-block dmsquash-live immucore; do
        if dracut_module_included "$_m"; then
            dinfo "kairos-init: dracut module '$_m' is in the image but never runs (kairos-init is /init); --omit it for a smaller image"
        fi
    done
    return 0
}
