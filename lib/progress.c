/* A one-line progress bar on stderr, redrawn at most every 100 ms, only on a terminal. */
#include "progress.h"

#include <stdio.h>
#include <time.h>
#include <unistd.h>

#define BAR_WIDTH 30
#define REDRAW_SECONDS 0.1

static double now_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Bytes as "1.2 GB" / "512 MB" / "3 KB" (decimal units, as disk sizes are quoted). */
static void format_bytes(char *buf, size_t len, double bytes)
{
	if (bytes >= 1e9)
		snprintf(buf, len, "%.1f GB", bytes / 1e9);
	else if (bytes >= 1e6)
		snprintf(buf, len, "%.0f MB", bytes / 1e6);
	else
		snprintf(buf, len, "%.0f KB", bytes / 1e3);
}

static void draw(const progress *p, double now)
{
	double frac = p->total ? (double)p->done / (double)p->total : 1.0;
	if (frac > 1.0)
		frac = 1.0;
	char bar[BAR_WIDTH + 1];
	int filled = (int)(frac * BAR_WIDTH);
	for (int i = 0; i < BAR_WIDTH; i++)
		bar[i] = i < filled ? '#' : '.';
	bar[BAR_WIDTH] = '\0';

	double elapsed = now - p->start;
	double rate = elapsed > 0 ? (double)p->done / elapsed : 0;
	double eta = rate > 0 ? (double)(p->total - (p->done < p->total ? p->done : p->total)) / rate : 0;
	unsigned long eta_s = (unsigned long)(eta + 0.5);
	char rate_s[32];
	format_bytes(rate_s, sizeof rate_s, rate);
	fprintf(stderr, "\r%s [%s] %3d%% %.1f/%.1f GB %s/s ETA %lu:%02lu ", p->label ? p->label : "",
		bar, (int)(frac * 100), (double)p->done / 1e9, (double)p->total / 1e9, rate_s,
		eta_s / 60, eta_s % 60);
	fflush(stderr);
}

void progress_start(progress *p, const char *label, uint64_t total)
{
	p->label = label;
	p->total = total;
	p->done = 0;
	p->enabled = isatty(2);
	p->start = now_seconds();
	p->last_draw = 0;
}

void progress_add(progress *p, uint64_t n)
{
	p->done += n;
	if (!p->enabled)
		return;
	double now = now_seconds();
	if (now - p->last_draw < REDRAW_SECONDS)
		return;
	p->last_draw = now;
	draw(p, now);
}

void progress_end(progress *p)
{
	if (!p->enabled)
		return;
	draw(p, now_seconds());
	fputc('\n', stderr);
}
