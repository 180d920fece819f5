// SPDX-License-Identifier: Apache-2.0
/* Serial console on COM1 and the VMM's debug-exit port. */
#include <stdarg.h>
#include "boot.h"
#include "tk.h"

static volatile int console_spinlock;

/* Same name as a helper in services.c (see there). */
static __attribute__((noinline, used)) u64 mix(u64 v)
{
	return v * 31 + 7;
}

void console_lock(void)
{
	while (__atomic_exchange_n(&console_spinlock, 1, __ATOMIC_ACQUIRE))
		while (console_spinlock)
			__asm__ volatile("pause");
}

void console_unlock(void)
{
	__atomic_store_n(&console_spinlock, 0, __ATOMIC_RELEASE);
}

/* The VMM's 16550 is always ready to transmit, so LSR is not polled: each
 * character costs one port exit. */
void putc_raw(char c)
{
	outb(PORT_COM1, (u8)c);
}

void puts_raw(const char *s)
{
	while (*s)
		putc_raw(*s++);
}

static void put_num(u64 v, unsigned base, int width, char pad)
{
	char buf[24];
	int i = 0;

	do {
		unsigned d = v % base;
		buf[i++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	while (i < width)
		buf[i++] = pad;
	while (i)
		putc_raw(buf[--i]);
}

static void vkprintf(const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		int width = 0, is_long = 0;
		char pad = ' ';

		if (*fmt != '%') {
			putc_raw(*fmt);
			continue;
		}
		fmt++;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') {
			is_long = 1;
			fmt++;
		}
		switch (*fmt) {
		case 'd': {
			s64 v = is_long ? va_arg(ap, s64) : va_arg(ap, int);
			if (v < 0) {
				putc_raw('-');
				v = -v;
			}
			put_num((u64)v, 10, width, pad);
			break;
		}
		case 'u':
			put_num(is_long ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, width, pad);
			break;
		case 'x':
			put_num(is_long ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, width, pad);
			break;
		case 'p':
			puts_raw("0x");
			put_num((u64)va_arg(ap, void *), 16, 0, '0');
			break;
		case 's':
			puts_raw(va_arg(ap, const char *));
			break;
		case 'c':
			putc_raw((char)va_arg(ap, int));
			break;
		default:
			putc_raw('%');
			putc_raw(*fmt);
		}
	}
}

/* Print one message atomically with respect to other CPUs. */
void kprintf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	console_lock();
	vkprintf(fmt, ap);
	console_unlock();
	va_end(ap);
}

void debug_exit(u8 status)
{
	outb(PORT_DEBUG_EXIT, status);
	for (;;)
		__asm__ volatile("cli; hlt");
}

void panic(const char *msg)
{
	kprintf("[tk] PANIC: %s\n", msg);
	debug_exit(0x7f);
}
