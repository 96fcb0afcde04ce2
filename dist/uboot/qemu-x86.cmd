# U-Boot boot script for an Abide A/B device whose U-Boot keeps no environment of its own
# (CONFIG_ENV_IS_NOWHERE, as Debian's u-boot-qemu builds): the Abide variables live in a file,
# `uboot.env` on the first (FAT) partition, in the fw_env format of one copy of `env_size`
# bytes (CRC32, then the variables), which `abide` rewrites in place
# (`[bootloader] backend = "uboot"`, `path = "/boot/uboot.env"`, `env_size = 16384`).
# `abide_select` comes from `abide.env` (crates/abide-boot/uboot/abide.env) beside it. This is
# the script scripts/boot-suite boots under QEMU; compile it with
# `mkimage -A x86 -T script -C none -d qemu-x86.cmd boot.scr`.
#
# Layout: virtio 0:1 boot (FAT: boot.scr, abide.env, uboot.env, /A and /B kernels and
# initramfs), virtio 0:2 rootfs A, virtio 0:3 rootfs B.
setenv abide_env_addr 0x2000000
setenv abide_env_size 0x4000
load virtio 0:1 ${abide_env_addr} /abide.env
env import -t ${abide_env_addr} ${filesize}
setenv abide_save "env export -c -s ${abide_env_size} ${abide_env_addr} ABIDE_ORDER ABIDE_A_OK ABIDE_B_OK ABIDE_A_TRY ABIDE_B_TRY ABIDE_BOOTED && save virtio 0:1 ${abide_env_addr} /uboot.env ${abide_env_size}"
if load virtio 0:1 ${abide_env_addr} /uboot.env; then
  env import -c ${abide_env_addr} ${abide_env_size}
fi
run abide_select
if test -z "${abide_group}"; then
  setenv abide_group A
fi
if test "${abide_group}" = "B"; then
  setenv abide_root /dev/vda3
else
  setenv abide_root /dev/vda2
fi
load virtio 0:1 0x3000000 /${abide_group}/vmlinuz
setenv abide_kernel_size ${filesize}
load virtio 0:1 0x8000000 /${abide_group}/initrd.img
setenv bootargs "root=${abide_root} ro console=ttyS0 panic=5 abide.group=${abide_group}"
zboot 0x3000000 ${abide_kernel_size} 0x8000000 ${filesize}
