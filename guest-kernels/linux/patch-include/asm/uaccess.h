/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lucos build --diff: user-memory accesses in live-patch code without
 * __ex_table entries of its own.
 *
 * A fault on an inline user access is fixed up by the entry for its address
 * in an exception table of vmlinux or of a module; code in lucos's patch
 * area is in none, so a bad user pointer would be an oops instead of
 * -EFAULT. lucos build compiles patch code with this header found first
 * (and, to compare with, the unpatched build of an object that has such
 * entries): unsafe_get_user() and unsafe_put_user(), the accessors of
 * user_access_begin() sections (readdir, signal frames, stat, ...), become
 * calls of the kernel's own out-of-line __get_user/__put_user helpers, whose
 * fixups are in vmlinux's table. Each helper sets and clears EFLAGS.AC
 * itself; the section's user_access_end() clears it again. On a fault
 * unsafe_get_user() leaves 0 in its variable (the kernel's leaves it as it
 * was); callers go to their error label and do not read it.
 *
 * Other inline fixups (rdmsr_safe, get_kernel_nofault, FPU state, user
 * cmpxchg) keep their entries, and lucos refuses patch code that has them.
 * Used only for patch objects, never for the running kernel.
 */
#ifndef LUCOS_PATCH_UACCESS_H
#define LUCOS_PATCH_UACCESS_H

#include_next <asm/uaccess.h>

#ifndef __ASSEMBLY__
#undef unsafe_put_user
#define unsafe_put_user(x, ptr, label)				\
do {								\
	if (unlikely(__put_user((__typeof__(*(ptr)))(x), (ptr))))	\
		goto label;					\
} while (0)

#undef unsafe_get_user
#define unsafe_get_user(x, ptr, err_label)			\
do {								\
	if (unlikely(__get_user((x), (ptr))))			\
		goto err_label;					\
} while (0)
#endif

#endif /* LUCOS_PATCH_UACCESS_H */
