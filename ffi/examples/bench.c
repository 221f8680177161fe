/*
 * bench: times moda_model_describe through libmoda, to compare with the Rust SDK called
 * directly (ffi/examples/bench.rs, which says how to build and run both).
 *
 *     bench BUNDLE_DIR IMAGE [CALLS]
 *
 * Prints the mean and the fastest call in milliseconds after 5 warm-up calls, with one
 * intra-op thread; then the time of calls that stop at the boundary, in nanoseconds.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <moda.h>

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static moda_description *describe(moda_model *model, const char *path)
{
    moda_image image = moda_image_from_file(path);
    moda_description *d = NULL;
    if (moda_model_describe(model, &image, NULL, &d) != MODA_OK) {
        fprintf(stderr, "bench: %s\n", moda_model_errmsg(model));
        exit(1);
    }
    return d;
}

int main(int argc, char **argv)
{
    moda_model *model = NULL;
    moda_model_params params = moda_model_default_params();
    int calls, i;
    size_t tokens = 0;
    double start, best = 1e30, mean;

    if (argc < 3) {
        fprintf(stderr, "usage: %s BUNDLE_DIR IMAGE [CALLS]\n", argv[0]);
        return 2;
    }
    calls = argc > 3 ? atoi(argv[3]) : 200;
    params.n_threads = 1;
    if (moda_model_open(argv[1], &params, &model) != MODA_OK) {
        fprintf(stderr, "bench: %s\n", moda_last_error());
        return 1;
    }
    for (i = 0; i < 5; i++) {
        moda_description *d = describe(model, argv[2]);
        tokens = moda_description_n_tokens(d);
        moda_description_free(d);
    }
    start = now_ms();
    for (i = 0; i < calls; i++) {
        double t = now_ms();
        moda_description *d = describe(model, argv[2]);
        double ms = now_ms() - t;
        if (ms < best) best = ms;
        moda_description_free(d);
    }
    mean = (now_ms() - start) / calls;
    printf("c:    %d calls, %lu tokens each: mean %.4f ms, fastest %.4f ms\n", calls,
           (unsigned long)tokens, mean, best);
    /* The boundary's own fixed cost, with no model run: a call that fails its argument check
     * (catch_unwind, the checks, formatting and storing the message for this thread), and a
     * call that succeeds without running the model (an empty batch). */
    start = now_ms();
    for (i = 0; i < 100000; i++) {
        moda_description *d = NULL;
        if (moda_model_describe(model, NULL, NULL, &d) != MODA_ERR_INVALID_ARGUMENT) return 1;
    }
    printf("c:    failing call: %.0f ns\n", (now_ms() - start) * 1e6 / 100000);
    start = now_ms();
    for (i = 0; i < 100000; i++) {
        if (moda_model_describe_batch(model, NULL, 0, NULL, NULL, NULL, NULL) != MODA_OK) return 1;
    }
    printf("c:    empty batch call: %.0f ns\n", (now_ms() - start) * 1e6 / 100000);
    moda_model_free(model);
    return 0;
}
