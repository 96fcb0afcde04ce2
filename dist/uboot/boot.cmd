# U-Boot boot script for an Abide A/B device (compile with `mkimage -A arm64 -T script -C none
# -d boot.cmd boot.scr`). The environment must hold abide_select and abide_save from
# crates/abide-boot/uboot/abide.env (import it once, or put it in the default environment) and
# the variables `abide device init` writes (ABIDE_ORDER, ABIDE_A_OK, ABIDE_B_OK, ABIDE_A_TRY,
# ABIDE_B_TRY, ABIDE_BOOTED). Redundant environment copies (CONFIG_SYS_REDUNDAND_ENVIRONMENT)
# keep a write cut short by a power loss from losing the state.
#
# The layout this example assumes: mmc 0:1 boot (kernels per group in /A and /B),
# mmc 0:2 rootfs A, mmc 0:3 rootfs B.
run abide_select
if test "${abide_group}" = "B"; then
  setenv abide_root /dev/mmcblk0p3
else
  setenv abide_root /dev/mmcblk0p2
fi
setenv bootargs "root=${abide_root} ro rootwait console=ttyS0,115200 panic=5 abide.group=${abide_group}"
load mmc 0:1 ${kernel_addr_r} /${abide_group}/Image
load mmc 0:1 ${fdt_addr_r} /${abide_group}/board.dtb
booti ${kernel_addr_r} - ${fdt_addr_r}
