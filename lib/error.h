/* Errors: functions return a code and fill a message naming file and tensor; only main prints. */
#ifndef DSV3_ERROR_H
#define DSV3_ERROR_H

/* Exit codes of every tool (DESIGN §1). */
enum {
	DSV3_OK = 0,
	DSV3_EUSAGE = 1, /* bad command line */
	DSV3_EDATA = 2,  /* bad input data: malformed file, missing tensor, wrong shape */
	DSV3_EIO = 3,    /* an I/O or system failure */
};

typedef struct {
	int code;
	char msg[2048];
} dsv3_error;

/* Sets code and a printf-style message; returns code so callers can `return dsv3_fail(...)`. */
int dsv3_fail(dsv3_error *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Like dsv3_fail with DSV3_EIO, appending ": strerror(errno)". */
int dsv3_fail_errno(dsv3_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prints "prog: msg" on stderr and returns err->code (for `return dsv3_report(...)` in main). */
int dsv3_report(const char *prog, const dsv3_error *err);

#endif
