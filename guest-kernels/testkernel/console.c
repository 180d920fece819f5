// SPDX-License-Identifier: Apache-2.0
/* Serial console on COM1 and the VMM's debug-exit port. */
#include <stdarg.h>
#include "boot.h"
#include "printk.h"
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

/*
 * Every line printed is also a record of the kernel log (printk.c), under
 * the console lock: the line so far, its level and facility (0 kernel, 1
 * user). A line longer than LOG_LINE_MAX is cut there in the log (not on the
 * serial port); a print that does not end its line ends the record anyway.
 */
#define LOG_LINE_MAX 512
#define LOG_DEFAULT_LEVEL 6
static char log_line[LOG_LINE_MAX];
static u16 log_len;
static u8 log_level, log_facility;

static const char *log_begin(const char *fmt, u8 facility)
{
	log_facility = facility;
	log_level = LOG_DEFAULT_LEVEL;
	if (fmt[0] == KERN_SOH[0] && fmt[1] >= '0' && fmt[1] <= '7') {
		log_level = (u8)(fmt[1] - '0');
		fmt += 2;
	}
	return fmt;
}

static void log_end(void)
{
	if (log_len)
		log_store(log_facility, log_level, log_line, log_len);
	log_len = 0;
}

static void out(char c)
{
	putc_raw(c);
	if (c == '\n') {
		log_store(log_facility, log_level, log_line, log_len);
		log_len = 0;
	} else if (log_len < LOG_LINE_MAX) {
		log_line[log_len++] = c;
	}
}

static void outs(const char *s)
{
	while (*s)
		out(*s++);
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
		out(buf[--i]);
}

static void vkprintf(const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		int width = 0, is_long = 0;
		char pad = ' ';

		if (*fmt != '%') {
			out(*fmt);
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
				out('-');
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
			outs("0x");
			put_num((u64)va_arg(ap, void *), 16, 0, '0');
			break;
		case 's':
			outs(va_arg(ap, const char *));
			break;
		case 'c':
			out((char)va_arg(ap, int));
			break;
		default:
			out('%');
			out(*fmt);
		}
	}
}

/* Print one message atomically with respect to other CPUs. */
void kprintf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	console_lock();
	vkprintf(log_begin(fmt, 0), ap);
	log_end();
	console_unlock();
	va_end(ap);
}

/* A user task's output, as it is: printed, and logged line by line. */
void console_write(const char *s, u64 n)
{
	u64 i;

	console_lock();
	log_begin("", 1);
	for (i = 0; i < n; i++)
		out(s[i]);
	log_end();
	console_unlock();
}

void debug_exit(u8 status)
{
	outb(PORT_DEBUG_EXIT, status);
	for (;;)
		__asm__ volatile("cli; hlt");
}

void panic(const char *msg)
{
	kprintf(KERN_EMERG "[tk] PANIC: %s\n", msg);
	debug_exit(0x7f);
}
