/* A progress bar on stderr, drawn only when stderr is a terminal. */
#ifndef DSV3_PROGRESS_H
#define DSV3_PROGRESS_H
#include <stdint.h>

typedef struct {
	const char *label;
	uint64_t total, done;
	int enabled;          /* stderr is a tty */
	double start, last_draw;
} progress;

void progress_start(progress *p, const char *label, uint64_t total);
void progress_add(progress *p, uint64_t n); /* redraws at most ~10 times a second; thread-unsafe */
void progress_end(progress *p);             /* final line, newline */

#endif
