/*
 * threads_test: 8 pthreads describe at the same time on one model; each result must equal the
 * serial one (text and token ids). Run by tests/tests/ffi.rs.
 *
 *     threads_test BUNDLE_DIR N_SESSIONS IMAGE... (8 images)
 *
 * Prints the serial results as "PATH<TAB>DESCRIPTION" lines (as `moda-sdk describe` prints
 * them), then "threads_test: ok", and
 * exits 0; or says what differed and exits 1.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <moda.h>

#define THREADS 8
#define ROUNDS 3

struct job {
    moda_model *model;
    const char *path;
    moda_description *serial;
    int mismatches;
    int errors;
};

/* The text with control characters as spaces, as `moda-sdk describe` prints it. */
static void print_one_line(const char *text, size_t len)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t i;
    for (i = 0; i < len; i++) {
        if (s[i] < 0x20 || s[i] == 0x7F) {
            putchar(' ');
        } else if (s[i] == 0xC2 && i + 1 < len && s[i + 1] >= 0x80 && s[i + 1] <= 0x9F) {
            putchar(' ');
            i++;
        } else {
            putchar(s[i]);
        }
    }
}

static int same(const moda_description *a, const moda_description *b)
{
    size_t n = moda_description_n_tokens(a);
    return n == moda_description_n_tokens(b) &&
           strcmp(moda_description_text(a), moda_description_text(b)) == 0 &&
           (n == 0 || memcmp(moda_description_token_ids(a), moda_description_token_ids(b),
                             n * sizeof(unsigned int)) == 0);
}

static void *work(void *arg)
{
    struct job *j = arg;
    int r;
    for (r = 0; r < ROUNDS; r++) {
        moda_image img = moda_image_from_file(j->path);
        moda_description *d = NULL;
        if (moda_model_describe(j->model, &img, NULL, &d) != MODA_OK) {
            fprintf(stderr, "threads_test: %s: %s\n", j->path, moda_model_errmsg(j->model));
            j->errors++;
            continue;
        }
        if (!same(d, j->serial)) {
            fprintf(stderr, "threads_test: %s: \"%s\" differs from the serial \"%s\"\n", j->path,
                    moda_description_text(d), moda_description_text(j->serial));
            j->mismatches++;
        }
        moda_description_free(d);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    moda_model *model = NULL;
    moda_model_params params = moda_model_default_params();
    struct job jobs[THREADS];
    pthread_t threads[THREADS];
    int i, bad = 0;

    if (argc != 3 + THREADS) {
        fprintf(stderr, "usage: %s BUNDLE_DIR N_SESSIONS IMAGE x %d\n", argv[0], THREADS);
        return 2;
    }
    params.n_sessions = atoi(argv[2]);
    if (moda_model_open(argv[1], &params, &model) != MODA_OK) {
        fprintf(stderr, "threads_test: %s\n", moda_last_error());
        return 1;
    }
    for (i = 0; i < THREADS; i++) {
        moda_image img = moda_image_from_file(argv[3 + i]);
        jobs[i].model = model;
        jobs[i].path = argv[3 + i];
        jobs[i].serial = NULL;
        jobs[i].mismatches = 0;
        jobs[i].errors = 0;
        if (moda_model_describe(model, &img, NULL, &jobs[i].serial) != MODA_OK) {
            fprintf(stderr, "threads_test: %s\n", moda_model_errmsg(model));
            return 1;
        }
        printf("%s\t", argv[3 + i]);
        print_one_line(moda_description_text(jobs[i].serial),
                       moda_description_text_len(jobs[i].serial));
        putchar('\n');
    }
    for (i = 0; i < THREADS; i++) {
        if (pthread_create(&threads[i], NULL, work, &jobs[i]) != 0) {
            fprintf(stderr, "threads_test: pthread_create failed\n");
            return 1;
        }
    }
    for (i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
        bad += jobs[i].mismatches + jobs[i].errors;
        moda_description_free(jobs[i].serial);
    }
    moda_model_free(model);
    if (bad) {
        fprintf(stderr, "threads_test: %d of %d results differ or failed\n", bad,
                THREADS * ROUNDS);
        return 1;
    }
    printf("threads_test: ok (%d threads x %d rounds, %s sessions)\n", THREADS, ROUNDS, argv[2]);
    return 0;
}
