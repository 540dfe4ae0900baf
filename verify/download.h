/* dsv3-verify download: a Hugging Face download checked before anything reads it (download.c). */
#ifndef DSV3_VERIFY_DOWNLOAD_H
#define DSV3_VERIFY_DOWNLOAD_H

/* argv[0] is the subcommand's name; returns the exit code. */
int verify_download(int argc, char **argv);

#endif
