/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lucos build --diff: WARN and BUG in live-patch code without __bug_table.
 *
 * The kernel finds a WARN by looking the trapping ud2's address up in the
 * __bug_table of vmlinux or of a module; code in lucos's patch area is in
 * neither, so a ud2 there would be an oops, not a warning. lucos build
 * compiles patch code with this header found first (and, to compare with,
 * the unpatched build of an object that has WARN, BUG or jump labels):
 *
 * - A WARN calls __warn() itself, with the file, line and address the
 *   kernel's report_bug() would have given it (the line kept as data, so
 *   that a fix above a WARN does not change the code; no register dump: __warn
 *   prints the stack instead), after the "cut here" line unless the WARN
 *   printed its message already. WARN_ON_ONCE and friends keep their
 *   once-flag in a variable of the patch (__lucos_warned): it starts clear,
 *   so a replaced function may warn once more than the kernel's copy did.
 *   A WARN inside a user_access_begin() section prints with EFLAGS.AC still
 *   set (the kernel's trap clears it).
 * - BUG() is the same ud2, without a table entry: the kernel still stops the
 *   task with an oops, reported as "invalid opcode" at the patch address
 *   instead of "kernel BUG at file:line".
 *
 * Used only for patch objects, never for the running kernel.
 */
#ifndef LUCOS_PATCH_BUG_H
#define LUCOS_PATCH_BUG_H

#include_next <asm/bug.h>

#if !defined(__ASSEMBLY__) && defined(CONFIG_GENERIC_BUG)
#undef BUG
#define BUG()							\
do {								\
	instrumentation_begin();				\
	asm volatile(ASM_UD2);					\
	__builtin_unreachable();				\
} while (0)

/*
 * The line is read from a constant of its own, not an immediate operand:
 * code that only moved (a fix above it) stays the same code, as with the
 * kernel's __bug_table, where the line is data too.
 */
#undef __WARN_FLAGS
#define __WARN_FLAGS(flags)					\
do {								\
	__auto_type __lucos_flags = BUGFLAG_WARNING | (flags);	\
	static bool __lucos_warned;				\
	static const int __lucos_line = __LINE__;		\
	instrumentation_begin();				\
	if (!(__lucos_flags & BUGFLAG_ONCE) || !__lucos_warned) { \
		if (__lucos_flags & BUGFLAG_ONCE)		\
			__lucos_warned = true;			\
		if (!(__lucos_flags & BUGFLAG_NO_CUT_HERE))	\
			printk(KERN_WARNING CUT_HERE);		\
		__warn(__FILE__,				\
		       *(const volatile int *)&__lucos_line,	\
		       ({ __label__ __lucos_here; __lucos_here:	\
			  (void *)&&__lucos_here; }),		\
		       __lucos_flags >> 8, NULL, NULL);		\
	}							\
	instrumentation_end();					\
} while (0)
#endif

#endif /* LUCOS_PATCH_BUG_H */
