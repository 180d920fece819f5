//! The test kernel's stats table with a new layout: the sources of the
//! live data-layout changes the data-change tests and the write-control
//! benchmark apply.

/// The new layout and the code that maintains it: a member added in the
/// middle (`generation`, declared to start at 1), `calls` widened from 32 to
/// 64 bits, `last_value` renamed `latest` (carried across by
/// [`C_TRANSFER`]), one added at the end. The patch does not include tk.h
/// (its struct is the old layout): it declares what it uses.
pub const NEW_LAYOUT: &str = r#"typedef unsigned int u32;
typedef unsigned long u64;
#define MAX_TASKS 8

struct task_stat {
	u32 id;
	u32 cpu;
	u64 generation;
	u64 calls;
	u64 latest;
	u64 sum;
	u64 max_value;
};

extern struct task_stat stats_table[MAX_TASKS];

u64 stats_update(u32 task, u32 cpu, u64 value)
{
	struct task_stat *s;

	if (task >= MAX_TASKS)
		return 0;
	s = &stats_table[task];
	s->id = task;
	s->cpu = cpu;
	s->calls++;
	s->latest = value;
	s->sum += value;
	if (value > s->max_value)
		s->max_value = value;
	s->generation = 2;
	return s->calls;
}
"#;

/// The transfer lucos cannot derive (a renamed member), in C: run by the
/// VMM in its sandbox on one element of each layout.
pub const C_TRANSFER: &str = r#"
struct task_stat_v1 {
	u32 id;
	u32 cpu;
	u32 calls;
	u64 last_value;
	u64 sum;
};

void lucos_to_new_stats_table(const struct task_stat_v1 *old, struct task_stat *new)
{
	new->latest = old->last_value;
}

void lucos_to_old_stats_table(const struct task_stat *new, struct task_stat_v1 *old)
{
	old->last_value = new->latest;
}
"#;

pub fn new_stats() -> String {
    format!("{NEW_LAYOUT}{C_TRANSFER}")
}

/// [`new_stats`] plus the table's other users: with every function that
/// touches the table replaced, the change can retire.
pub fn all_users() -> String {
    format!(
        "{}{}",
        new_stats(),
        r#"
u64 stats_record(u32 task, u32 cpu, u64 value)
{
	return stats_update(task, cpu, value);
}

u64 stats_read(u32 task, u32 which)
{
	struct task_stat *s;

	if (task >= MAX_TASKS)
		return 0;
	s = &stats_table[task];
	switch (which) {
	case 0:
		return s->calls;
	case 1:
		return s->sum;
	case 2:
		return s->id;
	case 3:
		return s->cpu;
	default:
		return s->latest;
	}
}

void *stats_addr(void)
{
	return stats_table;
}
"#
    )
}
