/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lucos build --diff: jump labels (static keys) in live-patch code test
 * their key when they run.
 *
 * The kernel keeps its own static-branch sites right by rewriting each one
 * listed in its __jump_table when a key changes; it knows nothing of code in
 * lucos's patch area, so a site there would keep the state it was built
 * with. lucos build compiles patch code with this header found first (and,
 * to compare with, the unpatched build of an object that has jump labels,
 * WARN or BUG): it renames the architecture's
 * asm-goto versions out of the way and makes a static branch read the key,
 * as a kernel without jump labels does (static_key_count() != 0).
 * The result is what the site would say, one load and test instead of a NOP
 * or jump, and never stale. Used only for patch objects, never for the
 * running kernel.
 */
#ifndef LUCOS_PATCH_JUMP_LABEL_H
#define LUCOS_PATCH_JUMP_LABEL_H

#ifndef __ASSEMBLY__
#define arch_static_branch lucos_unused_arch_static_branch
#define arch_static_branch_jump lucos_unused_arch_static_branch_jump
#endif

#include_next <asm/jump_label.h>

#ifndef __ASSEMBLY__
#undef arch_static_branch
#undef arch_static_branch_jump
/*
 * Whether the site would jump: the key's state XOR the site's branch bit,
 * as jump_label_type() computes it for the kernel's own sites. The key is
 * on when its count is not 0: -1 is its first enable in progress, which
 * static_key_count() counts as on while the kernel rewrites its sites.
 */
#define lucos_static_key_jumps(key, branch) \
	((*(const volatile int *)&(key)->enabled.counter != 0) ^ (branch))
#define arch_static_branch(key, branch) lucos_static_key_jumps(key, branch)
#define arch_static_branch_jump(key, branch) lucos_static_key_jumps(key, branch)
#endif

#endif /* LUCOS_PATCH_JUMP_LABEL_H */
