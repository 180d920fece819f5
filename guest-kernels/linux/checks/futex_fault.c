/*
 * A LOADED check of the source-diff corpus (tests/linux_diff.rs): a
 * FUTEX_WAKE_OP whose second word is on a read-only page. The kernel's
 * atomic operation on it (inline assembly in futex_wake_op, with an
 * exception-table entry) faults, its fixup returns -EFAULT, and the
 * kernel, unable to make the page writable, returns an error. Prints the
 * error's name: EFAULT from the kernel, EACCES from the corpus's patch.
 *
 * Built static for the guest: cc -static -O2 -o futex_fault futex_fault.c
 */
#include <errno.h>
#include <linux/futex.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void)
{
	static unsigned int word;
	unsigned int *ro = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	long r;

	if (ro == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	r = syscall(SYS_futex, &word, FUTEX_WAKE_OP_PRIVATE, 1, (void *)0, ro,
		    FUTEX_OP(FUTEX_OP_SET, 1, FUTEX_OP_CMP_EQ, 0));
	if (r >= 0)
		puts("none");
	else if (errno == EFAULT)
		puts("EFAULT");
	else if (errno == EACCES)
		puts("EACCES");
	else
		puts(strerror(errno));
	return 0;
}
