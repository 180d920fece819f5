/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The lucos test-kernel boot protocol (see docs/boot-protocol.md).
 *
 * Every vCPU enters _start in 64-bit mode at CPL0 with interrupts off, on the
 * VMM's boot page tables (identity map and 0xffffffff80000000 -> 0, 1 GiB each),
 * with RDI = vCPU index and RSI = guest-physical address of struct boot_info.
 */
#ifndef TK_BOOT_H
#define TK_BOOT_H

#define BOOT_INFO_MAGIC 0x3149424f43554cULL /* "LUCOBI1" little-endian */
#define BOOT_INFO_VERSION 1

struct boot_info {
	unsigned long long magic;
	unsigned int version;
	unsigned int nr_cpus;
	unsigned long long mem_bytes;
	unsigned long long cmdline_gpa;
	unsigned int cmdline_len;
	unsigned int flags;
};

/* flags: the host KVM cannot deliver SYSCALL from user mode to CPL0 (PVM):
 * user tasks enter kernel services with int3 (a DPL-3 trap gate) instead. */
#define BOOT_FLAG_NO_SYSCALL 0x1

/* I/O ports the VMM implements. */
#define PORT_COM1 0x3f8
#define PORT_DEBUG_EXIT 0x501 /* write a byte: the VM ends with that status */
#define PORT_I8042_CMD 0x64   /* write 0xfe: reset */

#endif
