/* SPDX-License-Identifier: MIT */
/* Replays a fuzzer's corpus (every file in the directories or files given) through
 * LLVMFuzzerTestOneInput(), so that each build runs the inputs behind past crashes
 * (systemd's src/fuzz/fuzz-main.c does the same). */

#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path) {
        FILE *f = fopen(path, "rb");
        if (!f) {
                fprintf(stderr, "%s: %s\n", path, strerror(errno));
                return -1;
        }
        uint8_t *buf = NULL;
        size_t len = 0, cap = 0;
        for (;;) {
                if (len == cap) {
                        cap = cap ? cap * 2 : 4096;
                        uint8_t *n = realloc(buf, cap);
                        if (!n) {
                                free(buf);
                                fclose(f);
                                return -1;
                        }
                        buf = n;
                }
                size_t r = fread(buf + len, 1, cap - len, f);
                if (r == 0)
                        break;
                len += r;
        }
        fclose(f);
        /* Hand the fuzzer an exact-size copy so ASan catches reads past the end. */
        uint8_t *exact = malloc(len ? len : 1);
        if (!exact) {
                free(buf);
                return -1;
        }
        if (len)
                memcpy(exact, buf, len);
        free(buf);
        (void) LLVMFuzzerTestOneInput(exact, len);
        free(exact);
        return 0;
}

int main(int argc, char **argv) {
        int n = 0, failed = 0;
        for (int i = 1; i < argc; i++) {
                struct stat st;
                if (stat(argv[i], &st) < 0) {
                        fprintf(stderr, "%s: %s\n", argv[i], strerror(errno));
                        return 1;
                }
                if (!S_ISDIR(st.st_mode)) {
                        failed |= run_file(argv[i]) < 0;
                        n++;
                        continue;
                }
                struct dirent **ents = NULL;
                int k = scandir(argv[i], &ents, NULL, alphasort);
                if (k < 0) {
                        fprintf(stderr, "%s: %s\n", argv[i], strerror(errno));
                        return 1;
                }
                for (int j = 0; j < k; j++) {
                        if (ents[j]->d_name[0] != '.') {
                                char p[4096];
                                snprintf(p, sizeof p, "%s/%s", argv[i], ents[j]->d_name);
                                failed |= run_file(p) < 0;
                                n++;
                        }
                        free(ents[j]);
                }
                free(ents);
        }
        fprintf(stderr, "replayed %d inputs\n", n);
        if (n == 0) {
                fprintf(stderr, "empty corpus: a fuzz target needs a seed corpus\n");
                return 1;
        }
        return failed ? 1 : 0;
}
