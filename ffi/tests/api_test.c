/*
 * api_test: calls every function of moda.h, with good arguments and with NULL for every
 * pointer, a missing bundle, files that are not images, bad parameters and too-small buffers.
 * Run by tests/tests/ffi.rs under AddressSanitizer + UBSan and under valgrind.
 *
 *     api_test BUNDLE_DIR FIXTURE_IMAGES_DIR SCHEMA_BUNDLE_DIR
 *
 * SCHEMA_BUNDLE_DIR is a bundle with a caption schema: the attributes of photo.jpg's
 * descriptions are printed, one line each, for the caller to compare with the Rust SDK's:
 *
 *     attribute<TAB>MODE<TAB>I<TAB>NAME<TAB>VALUE<TAB>CONFIDENCE<TAB>N_ALTERNATIVES
 *     alternative<TAB>MODE<TAB>I<TAB>J<TAB>VALUE<TAB>CONFIDENCE
 *
 * MODE is "auto" or "none" (moda_generation_params.constrain), VALUE "-" for NULL or "="
 * followed by the value, names and values escaped (a backslash as \\, bytes below 0x20 and
 * 0x7F as \xHH), CONFIDENCE "NaN" or "%.9g".
 *
 * Prints "api_test: all N checks passed" and exits 0, or lists the failed checks and exits 1.
 * Double free and use after free are not tested: the API does not promise to survive them.
 */
/* mkfifo, getpid */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <moda.h>

static int checks = 0;
static int failures = 0;

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        checks++;                                                                          \
        if (!(cond)) {                                                                     \
            failures++;                                                                    \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__, __LINE__, \
                    #cond, moda_last_error());                                             \
        }                                                                                  \
    } while (0)

#define CHECK_RC(call, want) CHECK_RC_(call, want, #call)
#define CHECK_RC_(call, want, text)                                                        \
    do {                                                                                   \
        int rc_ = (call);                                                                  \
        checks++;                                                                          \
        if (rc_ != (want)) {                                                               \
            failures++;                                                                    \
            fprintf(stderr, "%s:%d: %s returned %d (%s), expected %d; last error: %s\n",   \
                    __FILE__, __LINE__, text, rc_, moda_status_string(rc_), (want),        \
                    moda_last_error());                                                    \
        }                                                                                  \
    } while (0)

static char *join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static unsigned char *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf;
    long n;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t)n);
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    *size = (size_t)n;
    return buf;
}

static int contains(const char *haystack, const char *needle)
{
    return haystack && strstr(haystack, needle) != NULL;
}

/* Prints s escaped (see the top of the file). */
static void print_escaped(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    for (; *p; p++) {
        if (*p == '\\') {
            fputs("\\\\", stdout);
        } else if (*p < 0x20 || *p == 0x7F) {
            printf("\\x%02X", *p);
        } else {
            putchar(*p);
        }
    }
}

static void print_confidence(float c)
{
    if (isnan(c)) {
        fputs("NaN", stdout);
    } else {
        printf("%.9g", (double)c);
    }
}

static int is_confidence(float c)
{
    return c >= 0.0f && c <= 1.0f;
}

/* Whether a and b have the same attributes (names, values, confidences, alternatives). */
static int same_attributes(const moda_description *a, const moda_description *b)
{
    size_t i, j, n = moda_description_attribute_count(a);
    if (n != moda_description_attribute_count(b)) return 0;
    for (i = 0; i < n; i++) {
        const char *va = moda_description_attribute_value(a, i);
        const char *vb = moda_description_attribute_value(b, i);
        float ca = moda_description_attribute_confidence(a, i);
        float cb = moda_description_attribute_confidence(b, i);
        size_t m = moda_description_attribute_alternative_count(a, i);
        if (strcmp(moda_description_attribute_name(a, i), moda_description_attribute_name(b, i)))
            return 0;
        if ((va == NULL) != (vb == NULL) || (va && strcmp(va, vb) != 0)) return 0;
        if (isnan(ca) != isnan(cb) || (!isnan(ca) && ca != cb)) return 0;
        if (m != moda_description_attribute_alternative_count(b, i)) return 0;
        for (j = 0; j < m; j++) {
            if (strcmp(moda_description_attribute_alternative_value(a, i, j),
                       moda_description_attribute_alternative_value(b, i, j)) != 0 ||
                moda_description_attribute_alternative_confidence(a, i, j) !=
                    moda_description_attribute_alternative_confidence(b, i, j))
                return 0;
        }
    }
    return 1;
}

/* Checks every attribute accessor of d (a description from a bundle with a schema) and
 * prints the attributes (see the top of the file). */
static void check_and_print_attributes(const moda_description *d, const char *mode)
{
    size_t i, j, n = moda_description_attribute_count(d);
    CHECK(n > 0);
    for (i = 0; i < n; i++) {
        const char *name = moda_description_attribute_name(d, i);
        const char *value = moda_description_attribute_value(d, i);
        float c = moda_description_attribute_confidence(d, i);
        size_t m = moda_description_attribute_alternative_count(d, i);
        CHECK(name != NULL && name[0] != '\0');
        /* A value has a confidence in [0, 1]; a missing value has NaN. (A value whose tokens
         * cannot be told apart would have NaN too, but generated text always has tokens.) */
        CHECK(value == NULL ? isnan(c) : is_confidence(c));
        CHECK(value != NULL || m == 0);
        printf("attribute\t%s\t%lu\t", mode, (unsigned long)i);
        print_escaped(name ? name : "");
        fputs(value ? "\t=" : "\t-", stdout);
        if (value) print_escaped(value);
        putchar('\t');
        print_confidence(c);
        printf("\t%lu\n", (unsigned long)m);
        for (j = 0; j < m; j++) {
            const char *alt = moda_description_attribute_alternative_value(d, i, j);
            float ac = moda_description_attribute_alternative_confidence(d, i, j);
            CHECK(alt != NULL);
            CHECK(is_confidence(ac));
            printf("alternative\t%s\t%lu\t%lu\t=", mode, (unsigned long)i, (unsigned long)j);
            print_escaped(alt ? alt : "");
            putchar('\t');
            print_confidence(ac);
            putchar('\n');
        }
        /* Alternatives out of range. */
        CHECK(moda_description_attribute_alternative_value(d, i, m) == NULL);
        CHECK(isnan(moda_description_attribute_alternative_confidence(d, i, m)));
        CHECK(moda_description_attribute_alternative_value(d, i, (size_t)-1) == NULL);
    }
    /* Attributes out of range. */
    for (i = n; i <= n + 1; i++) {
        CHECK(moda_description_attribute_name(d, i) == NULL);
        CHECK(moda_description_attribute_value(d, i) == NULL);
        CHECK(isnan(moda_description_attribute_confidence(d, i)));
        CHECK(moda_description_attribute_alternative_count(d, i) == 0);
        CHECK(moda_description_attribute_alternative_value(d, i, 0) == NULL);
        CHECK(isnan(moda_description_attribute_alternative_confidence(d, i, 0)));
    }
    CHECK(moda_description_attribute_name(d, (size_t)-1) == NULL);
    CHECK(isnan(moda_description_attribute_confidence(d, (size_t)-1)));
}

/* Checks that d has no attributes (a bundle without a schema, a failed image, NULL). */
static void check_no_attributes(const moda_description *d)
{
    CHECK(moda_description_attribute_count(d) == 0);
    CHECK(moda_description_attribute_name(d, 0) == NULL);
    CHECK(moda_description_attribute_value(d, 0) == NULL);
    CHECK(isnan(moda_description_attribute_confidence(d, 0)));
    CHECK(moda_description_attribute_alternative_count(d, 0) == 0);
    CHECK(moda_description_attribute_alternative_value(d, 0, 0) == NULL);
    CHECK(isnan(moda_description_attribute_alternative_confidence(d, 0, 0)));
}

static int same_tokens(const moda_description *a, const moda_description *b)
{
    size_t n = moda_description_n_tokens(a);
    return n == moda_description_n_tokens(b) && n > 0 &&
           memcmp(moda_description_token_ids(a), moda_description_token_ids(b),
                  n * sizeof(unsigned int)) == 0;
}

/* A synthetic RGB image, and the same pixels as a 24-bit BMP file (rows bottom-up, BGR,
 * padded to 4 bytes): describing either must give the same tokens. */
#define W 37
#define H 29
static unsigned char rgb[W * H * 3];
static unsigned char bmp[54 + H * ((W * 3 + 3) & ~3)];

static void put32(unsigned char *p, unsigned long v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static void make_images(void)
{
    int x, y;
    int stride = (W * 3 + 3) & ~3;
    for (y = 0; y < H; y++) {
        for (x = 0; x < W; x++) {
            unsigned char *p = rgb + (y * W + x) * 3;
            p[0] = (unsigned char)(x * 7);
            p[1] = (unsigned char)(y * 9);
            p[2] = (unsigned char)((x * y) % 251);
        }
    }
    memset(bmp, 0, sizeof bmp);
    bmp[0] = 'B';
    bmp[1] = 'M';
    put32(bmp + 2, sizeof bmp);
    put32(bmp + 10, 54);
    put32(bmp + 14, 40);
    put32(bmp + 18, W);
    put32(bmp + 22, H);
    bmp[26] = 1;  /* planes */
    bmp[28] = 24; /* bits per pixel */
    put32(bmp + 34, (unsigned long)(H * stride));
    for (y = 0; y < H; y++) {
        unsigned char *row = bmp + 54 + (H - 1 - y) * stride;
        for (x = 0; x < W; x++) {
            const unsigned char *p = rgb + (y * W + x) * 3;
            row[x * 3 + 0] = p[2];
            row[x * 3 + 1] = p[1];
            row[x * 3 + 2] = p[0];
        }
    }
}

/* Streaming: collects what the callback sees. */
struct stream {
    int calls;
    int stop_after; /* 0: never stop */
    unsigned int ids[256];
    char text[4096];
    size_t images_seen[8];
    int order_ok;
};

static int on_token(const moda_token *t, void *user_data)
{
    struct stream *s = user_data;
    if (t->image < 8) {
        if (t->index != s->images_seen[t->image]) s->order_ok = 0;
        s->images_seen[t->image]++;
    }
    if (t->image == 0 && s->calls < 256) {
        s->ids[s->calls] = t->id;
        if (strlen(t->text) > t->text_len || t->logprob > 0.0f) s->order_ok = 0;
        if (strlen(s->text) + t->text_len < sizeof s->text) strcat(s->text, t->text);
    }
    s->calls++;
    return s->stop_after > 0 && s->calls >= s->stop_after;
}

/* The per-thread message of a model: a failing call on another thread does not change it. */
struct other_thread {
    moda_model *model;
    const char *missing;
    int rc;
    int saw_message;
};

static void *fail_on_other_thread(void *arg)
{
    struct other_thread *o = arg;
    moda_image img = moda_image_from_file(o->missing);
    moda_description *d = NULL;
    o->rc = moda_model_describe(o->model, &img, NULL, &d);
    o->saw_message = contains(moda_model_errmsg(o->model), "no-such-image.png") &&
                     contains(moda_last_error(), "no-such-image.png");
    return NULL;
}

int main(int argc, char **argv)
{
    const char *bundle;
    const char *images;
    const char *schema_bundle;
    char *photo, *wide, *not_image, *missing, *missing_bundle;
    moda_model *model = NULL;
    moda_model_params mp;
    moda_generation_params gp;
    moda_description *d = NULL, *d2 = NULL;
    moda_image img, bad;
    moda_timings t;
    size_t dim, i, size = 0;
    unsigned char *photo_bytes;

    if (argc != 4) {
        fprintf(stderr, "usage: %s BUNDLE_DIR FIXTURE_IMAGES_DIR SCHEMA_BUNDLE_DIR\n", argv[0]);
        return 2;
    }
    bundle = argv[1];
    images = argv[2];
    schema_bundle = argv[3];
    photo = join(images, "photo.jpg");
    wide = join(images, "wide.png");
    not_image = join(images, "not_an_image.jpg");
    missing = join(images, "no-such-image.png");
    missing_bundle = join(images, "no-such-bundle");
    make_images();

    /* Version and status strings. */
    CHECK(strcmp(moda_version(), MODA_VERSION) == 0);
    CHECK(moda_version_number() == MODA_VERSION_NUMBER);
    CHECK(strcmp(moda_last_error(), "") == 0);
    CHECK(strcmp(moda_status_string(MODA_OK), "success") == 0);
    for (i = 1; i <= MODA_ERR_PANIC; i++) {
        CHECK(strcmp(moda_status_string((int)i), "unknown status code") != 0);
    }
    CHECK(strcmp(moda_status_string(-1), "unknown status code") == 0);
    CHECK(strcmp(moda_status_string(1000), "unknown status code") == 0);

    /* Default parameters. */
    mp = moda_model_default_params();
    CHECK(mp.struct_size == sizeof(moda_model_params));
    CHECK(mp.n_threads == 0 && mp.n_sessions == 1 && mp.verify_checksums == 0 && mp.optimize == 1);
    CHECK(mp.max_image_width == 16384 && mp.max_image_height == 16384);
    CHECK(mp.max_image_alloc == 512u * 1024u * 1024u);
    gp = moda_generation_default_params();
    CHECK(gp.struct_size == sizeof(moda_generation_params));
    CHECK(sizeof gp.seed == 8);
    CHECK(gp.max_new_tokens == 0 && gp.min_new_tokens == 0 && gp.num_beams == 1);
    CHECK(gp.do_sample == 0 && gp.temperature == 1.0f && gp.top_k == 50 && gp.top_p == 1.0f);
    CHECK(gp.seed == 0 && gp.repetition_penalty == 1.0f && gp.no_repeat_ngram_size == 0);
    CHECK(gp.length_penalty == 1.0f);
    CHECK(gp.stop_strings == NULL && gp.stop_strings_len == 0);
    CHECK(gp.constrain == MODA_CONSTRAIN_AUTO);
    CHECK(MODA_CONSTRAIN_AUTO == 0 && MODA_CONSTRAIN_SCHEMA == 1 && MODA_CONSTRAIN_NONE == 2);

    /* Image constructors. */
    img = moda_image_from_file(photo);
    CHECK(img.kind == MODA_IMAGE_FILE && img.path == photo);
    img = moda_image_from_bytes(bmp, sizeof bmp, "synthetic.bmp");
    CHECK(img.kind == MODA_IMAGE_BYTES && img.data == bmp && img.size == sizeof bmp);
    img = moda_image_from_rgb8(rgb, W, H);
    CHECK(img.kind == MODA_IMAGE_RGB8 && img.size == sizeof rgb && img.width == W);
    img = moda_image_from_rgb8(rgb, 0xFFFFFFFFu, 0xFFFFFFFFu);
    CHECK(img.kind == MODA_IMAGE_RGB8);

    /* Opening: NULL arguments, a missing bundle, bad parameters. */
    model = (moda_model *)&checks; /* must be set to NULL on failure */
    CHECK_RC(moda_model_open(NULL, NULL, &model), MODA_ERR_INVALID_ARGUMENT);
    CHECK(model == NULL);
    CHECK(contains(moda_last_error(), "bundle_dir"));
    CHECK_RC(moda_model_open(bundle, NULL, NULL), MODA_ERR_INVALID_ARGUMENT);
    CHECK(contains(moda_last_error(), "out"));
    CHECK_RC(moda_model_open(missing_bundle, NULL, &model), MODA_ERR_BUNDLE);
    CHECK(model == NULL);
    CHECK(contains(moda_last_error(), "no-such-bundle"));
    CHECK(moda_model_errmsg(NULL) == moda_last_error());
    CHECK_RC(moda_model_open(images, NULL, &model), MODA_ERR_BUNDLE); /* no moda.json */
    CHECK(contains(moda_last_error(), "moda.json"));
    mp.n_sessions = 0;
    CHECK_RC(moda_model_open(bundle, &mp, &model), MODA_ERR_INVALID_ARGUMENT);
    CHECK(contains(moda_last_error(), "n_sessions"));
    mp = moda_model_default_params();
    mp.n_threads = -1;
    CHECK_RC(moda_model_open(bundle, &mp, &model), MODA_ERR_INVALID_ARGUMENT);
    mp = moda_model_default_params();
    mp.max_image_width = 0;
    CHECK_RC(moda_model_open(bundle, &mp, &model), MODA_ERR_INVALID_ARGUMENT);
    CHECK(model == NULL);
    /* A struct not set up by moda_model_default_params() (or from another header version). */
    memset(&mp, 0, sizeof mp);
    CHECK_RC(moda_model_open(bundle, &mp, &model), MODA_ERR_INVALID_ARGUMENT);
    CHECK(contains(moda_last_error(), "struct_size"));
    CHECK(contains(moda_last_error(), "moda_model_default_params"));
    mp = moda_model_default_params();
    mp.struct_size += 8;
    CHECK_RC(moda_model_open(bundle, &mp, &model), MODA_ERR_INVALID_ARGUMENT);
    CHECK(model == NULL);

    /* Open for real (default parameters through NULL, then explicit ones). */
    CHECK_RC(moda_model_open(bundle, NULL, &model), MODA_OK);
    CHECK(model != NULL);
    CHECK(strcmp(moda_last_error(), "") == 0);
    moda_model_free(model);
    model = NULL;
    mp = moda_model_default_params();
    mp.n_threads = 1;
    mp.verify_checksums = 1;
    CHECK_RC(moda_model_open(bundle, &mp, &model), MODA_OK);
    if (!model) {
        fprintf(stderr, "api_test: cannot open %s: %s\n", bundle, moda_last_error());
        return 1;
    }
    CHECK(strcmp(moda_model_errmsg(model), "") == 0);
    CHECK(moda_runtime_path() != NULL && contains(moda_runtime_path(), "onnxruntime"));
    dim = moda_model_embedding_size(model);
    CHECK(dim > 0);
    CHECK(moda_model_embedding_size(NULL) == 0);

    /* describe: NULL for every pointer. */
    img = moda_image_from_file(photo);
    d = (moda_description *)&checks;
    CHECK_RC(moda_model_describe(NULL, &img, NULL, &d), MODA_ERR_INVALID_ARGUMENT);
    CHECK(d == NULL);
    CHECK(contains(moda_last_error(), "model"));
    CHECK_RC(moda_model_describe(model, NULL, NULL, &d), MODA_ERR_INVALID_ARGUMENT);
    CHECK(contains(moda_model_errmsg(model), "image is NULL"));
    CHECK_RC(moda_model_describe(model, &img, NULL, NULL), MODA_ERR_INVALID_ARGUMENT);
    CHECK(d == NULL);
    bad = moda_image_from_file(NULL);
    CHECK_RC(moda_model_describe(model, &bad, NULL, &d), MODA_ERR_INVALID_ARGUMENT);
    bad = moda_image_from_bytes(NULL, 10, NULL);
    CHECK_RC(moda_model_describe(model, &bad, NULL, &d), MODA_ERR_INVALID_ARGUMENT);
    bad = moda_image_from_rgb8(NULL, W, H);
    CHECK_RC(moda_model_describe(model, &bad, NULL, &d), MODA_ERR_INVALID_ARGUMENT);
    memset(&bad, 0, sizeof bad);
    CHECK_RC(moda_model_describe(model, &bad, NULL, &d), MODA_ERR_INVALID_ARGUMENT);
    CHECK(contains(moda_model_errmsg(model), "unknown image kind 0"));
    CHECK(d == NULL);

    /* Files that are not images, or not there; empty and wrong-size buffers. */
    bad = moda_image_from_file(not_image);
    CHECK_RC(moda_model_describe(model, &bad, NULL, &d), MODA_ERR_IMAGE);
    CHECK(contains(moda_model_errmsg(model), "not_an_image.jpg"));
    CHECK(moda_model_errmsg(model) != moda_last_error());
    CHECK(strcmp(moda_model_errmsg(model), moda_last_error()) == 0);
    bad = moda_image_from_file(missing);
    CHECK_RC(moda_model_describe(model, &bad, NULL, &d), MODA_ERR_IMAGE);
    CHECK(contains(moda_model_errmsg(model), "no-such-image.png"));
    /* A device and a FIFO: refused at once (reading them never ended, or blocked). */
    bad = moda_image_from_file("/dev/zero");
    CHECK_RC(moda_model_describe(model, &bad, NULL, &d), MODA_ERR_IMAGE);
    CHECK(contains(moda_model_errmsg(model), "character device"));
    {
        char fifo[64];
        snprintf(fifo, sizeof fifo, "/tmp/moda-api-test-%ld.fifo", (long)getpid());
        remove(fifo);
        CHECK(mkfifo(fifo, 0600) == 0);
        bad = moda_image_from_file(fifo);
        CHECK_RC(moda_model_describe(model, &bad, NULL, &d), MODA_ERR_IMAGE);
        CHECK(contains(moda_model_errmsg(model), "FIFO"));
        remove(fifo);
    }
    /* Counts no buffer can hold: refused before anything is allocated or read. */
    {
        float one = 0.0f;
        CHECK_RC(moda_model_embed_batch(model, &img, (size_t)-1 / 2, 0, &one, (size_t)-1 / 2, NULL),
                 MODA_ERR_INVALID_ARGUMENT);
        CHECK(contains(moda_model_errmsg(model), "larger than any buffer"));
        CHECK_RC(moda_model_embed_batch(model, &img, 5000, 0, &one, (size_t)-1 / 8, NULL),
                 MODA_ERR_INVALID_ARGUMENT);
        CHECK(contains(moda_model_errmsg(model), "at most"));
    }
    bad = moda_image_from_bytes("garbage", 7, "garbage.bin");
    CHECK_RC(moda_model_describe(model, &bad, NULL, &d), MODA_ERR_IMAGE);
    CHECK(contains(moda_model_errmsg(model), "garbage.bin"));
    bad = moda_image_from_bytes(NULL, 0, NULL);
    CHECK_RC(moda_model_describe(model, &bad, NULL, &d), MODA_ERR_IMAGE);
    CHECK(contains(moda_model_errmsg(model), "image bytes"));
    bad = moda_image_from_rgb8(rgb, W, H);
    bad.size -= 1;
    CHECK_RC(moda_model_describe(model, &bad, NULL, &d), MODA_ERR_IMAGE);
    CHECK(contains(moda_model_errmsg(model), "needs"));
    bad = moda_image_from_rgb8(rgb, 0xFFFFFFFFu, 0xFFFFFFFFu);
    CHECK_RC(moda_model_describe(model, &bad, NULL, &d), MODA_ERR_IMAGE);
    CHECK(d == NULL);

    /* Bad generation parameters. */
    gp = moda_generation_default_params();
    gp.num_beams = 0;
    CHECK_RC(moda_model_describe(model, &img, &gp, &d), MODA_ERR_INVALID_ARGUMENT);
    CHECK(contains(moda_model_errmsg(model), "num_beams"));
    gp = moda_generation_default_params();
    gp.max_new_tokens = -1;
    CHECK_RC(moda_model_describe(model, &img, &gp, &d), MODA_ERR_INVALID_ARGUMENT);
    CHECK(contains(moda_model_errmsg(model), "max_new_tokens"));
    gp = moda_generation_default_params();
    gp.do_sample = 1;
    gp.temperature = 0.0f;
    CHECK_RC(moda_model_describe(model, &img, &gp, &d), MODA_ERR_INVALID_ARGUMENT);
    gp = moda_generation_default_params();
    gp.top_p = 1.5f;
    CHECK_RC(moda_model_describe(model, &img, &gp, &d), MODA_ERR_INVALID_ARGUMENT);
    gp = moda_generation_default_params();
    gp.min_new_tokens = 5;
    gp.max_new_tokens = 2;
    CHECK_RC(moda_model_describe(model, &img, &gp, &d), MODA_ERR_INVALID_ARGUMENT);
    CHECK(d == NULL);
    gp = moda_generation_default_params();
    gp.constrain = 3;
    CHECK_RC(moda_model_describe(model, &img, &gp, &d), MODA_ERR_INVALID_ARGUMENT);
    CHECK(contains(moda_model_errmsg(model), "constrain is 3"));
    CHECK(contains(moda_model_errmsg(model), "MODA_CONSTRAIN_NONE"));
    gp.constrain = -1;
    CHECK_RC(moda_model_describe(model, &img, &gp, &d), MODA_ERR_INVALID_ARGUMENT);
    CHECK(contains(moda_model_errmsg(model), "constrain is -1"));
    CHECK(d == NULL);
    memset(&gp, 0, sizeof gp);
    CHECK_RC(moda_model_describe(model, &img, &gp, &d), MODA_ERR_INVALID_ARGUMENT);
    CHECK(contains(moda_model_errmsg(model), "moda_generation_default_params"));
    CHECK(d == NULL);

    /* A description and its accessors. */
    CHECK_RC(moda_model_describe(model, &img, NULL, &d), MODA_OK);
    CHECK(d != NULL);
    CHECK(strcmp(moda_model_errmsg(model), "") == 0);
    CHECK(strcmp(moda_last_error(), "") == 0);
    if (d) {
        size_t n = moda_description_n_tokens(d);
        const float *lp = moda_description_logprobs(d);
        CHECK(moda_description_status(d) == MODA_OK);
        CHECK(strcmp(moda_description_errmsg(d), "") == 0);
        CHECK(moda_description_text(d) != NULL);
        CHECK(strlen(moda_description_text(d)) == moda_description_text_len(d));
        CHECK(n > 0 && n <= 32);
        CHECK(moda_description_token_ids(d) != NULL);
        CHECK(lp != NULL);
        for (i = 0; lp && i < n; i++) CHECK(lp[i] <= 0.0f && lp[i] > -1e30f);
        CHECK_RC(moda_description_timings(d, &t), MODA_OK);
        CHECK(t.n_tokens == n && t.total_ms > 0.0 && t.total_ms >= t.encoder_ms);
        /* Free text, greedy: the prefill and one run per token after the first; nothing
         * listed (the fixture bundle has no schema). */
        CHECK(moda_description_decoder_runs(d) == n);
        CHECK(moda_description_listed_runs(d) == 0);
        CHECK_RC(moda_description_timings(d, NULL), MODA_ERR_INVALID_ARGUMENT);
        CHECK_RC(moda_description_timings(NULL, &t), MODA_ERR_INVALID_ARGUMENT);
    }
    /* The fixture bundle has no caption schema: no attributes. */
    check_no_attributes(d);
    /* Accessors on NULL. */
    check_no_attributes(NULL);
    CHECK(moda_description_status(NULL) == MODA_ERR_INVALID_ARGUMENT);
    CHECK(strcmp(moda_description_errmsg(NULL), "") == 0);
    CHECK(moda_description_text(NULL) == NULL);
    CHECK(moda_description_text_len(NULL) == 0);
    CHECK(moda_description_n_tokens(NULL) == 0);
    CHECK(moda_description_decoder_runs(NULL) == 0);
    CHECK(moda_description_listed_runs(NULL) == 0);
    CHECK(moda_description_token_ids(NULL) == NULL);
    CHECK(moda_description_logprobs(NULL) == NULL);
    CHECK(strcmp(moda_description_finish(NULL), "") == 0);

    /* The same image as bytes; a BMP and its RGB pixels. */
    photo_bytes = read_file(photo, &size);
    CHECK(photo_bytes != NULL);
    img = moda_image_from_bytes(photo_bytes, size, "photo in memory");
    CHECK_RC(moda_model_describe(model, &img, NULL, &d2), MODA_OK);
    CHECK(d && d2 && same_tokens(d, d2));
    CHECK(d && d2 && strcmp(moda_description_text(d), moda_description_text(d2)) == 0);
    moda_description_free(d2);
    d2 = NULL;
    {
        moda_description *a = NULL, *b = NULL;
        moda_image from_bmp = moda_image_from_bytes(bmp, sizeof bmp, "synthetic.bmp");
        moda_image from_rgb = moda_image_from_rgb8(rgb, W, H);
        CHECK_RC(moda_model_describe(model, &from_bmp, NULL, &a), MODA_OK);
        CHECK_RC(moda_model_describe(model, &from_rgb, NULL, &b), MODA_OK);
        CHECK(a && b && same_tokens(a, b));
        moda_description_free(a);
        moda_description_free(b);
    }

    /* Generation parameters. */
    img = moda_image_from_file(photo);
    gp = moda_generation_default_params();
    gp.max_new_tokens = 3;
    CHECK_RC(moda_model_describe(model, &img, &gp, &d2), MODA_OK);
    CHECK(moda_description_n_tokens(d2) >= 1 && moda_description_n_tokens(d2) <= 3);
    moda_description_free(d2);
    gp.min_new_tokens = 5;
    gp.max_new_tokens = 5;
    CHECK_RC(moda_model_describe(model, &img, &gp, &d2), MODA_OK);
    CHECK(moda_description_n_tokens(d2) == 5);
    /* min = max masks </s>: the token limit ended it. */
    CHECK(strcmp(moda_description_finish(d2), "length") == 0);
    moda_description_free(d2);
    gp = moda_generation_default_params();
    gp.do_sample = 1;
    gp.seed = 7;
    gp.temperature = 1.5f;
    gp.top_k = 0;
    gp.top_p = 0.9f;
    gp.max_new_tokens = 10;
    {
        moda_description *a = NULL, *b = NULL;
        CHECK_RC(moda_model_describe(model, &img, &gp, &a), MODA_OK);
        CHECK_RC(moda_model_describe(model, &img, &gp, &b), MODA_OK);
        CHECK(a && b && same_tokens(a, b)); /* seeded */
        moda_description_free(a);
        moda_description_free(b);
    }
    /* Stop strings: the description ends before the first one, and generation stops there. */
    {
        moda_description *a = NULL, *b = NULL;
        const char *stops[2];
        char stop[3] = {0, 0, 0};
        gp = moda_generation_default_params();
        CHECK_RC(moda_model_describe(model, &img, &gp, &a), MODA_OK);
        if (a && moda_description_text_len(a) >= 4) {
            const char *text = moda_description_text(a);
            /* Two characters from inside the text (the fixture's text is ASCII). */
            stop[0] = text[2];
            stop[1] = text[3];
            stops[0] = "never in any description \x01";
            stops[1] = stop;
            gp.stop_strings = stops;
            gp.stop_strings_len = 2;
            CHECK_RC(moda_model_describe(model, &img, &gp, &b), MODA_OK);
            CHECK(b && moda_description_text_len(b) <= 2);
            CHECK(b && strncmp(moda_description_text(b), text, moda_description_text_len(b)) == 0);
            CHECK(b && moda_description_n_tokens(b) <= moda_description_n_tokens(a));
            CHECK(b && strcmp(moda_description_finish(b), "stop_string") == 0);
            moda_description_free(b);
            b = NULL;
            /* No stop strings at all (non-NULL, 0): the whole text again. */
            gp.stop_strings_len = 0;
            CHECK_RC(moda_model_describe(model, &img, &gp, &b), MODA_OK);
            CHECK(b && strcmp(moda_description_text(b), text) == 0);
            moda_description_free(b);
            b = NULL;
        }
        /* An empty or NULL string, too many: refused. */
        stops[0] = "";
        gp.stop_strings = stops;
        gp.stop_strings_len = 1;
        CHECK_RC(moda_model_describe(model, &img, &gp, &b), MODA_ERR_INVALID_ARGUMENT);
        CHECK(contains(moda_model_errmsg(model), "stop string"));
        stops[0] = NULL;
        CHECK_RC(moda_model_describe(model, &img, &gp, &b), MODA_ERR_INVALID_ARGUMENT);
        CHECK(contains(moda_model_errmsg(model), "stop_strings[0]"));
        gp.stop_strings_len = 1000;
        CHECK_RC(moda_model_describe(model, &img, &gp, &b), MODA_ERR_INVALID_ARGUMENT);
        CHECK(b == NULL);
        /* A struct of the header before stop_strings is still taken. */
        gp = moda_generation_default_params();
        gp.struct_size = offsetof(moda_generation_params, stop_strings);
        CHECK_RC(moda_model_describe(model, &img, &gp, &b), MODA_OK);
        CHECK(a && b && same_tokens(a, b));
        moda_description_free(b);
        b = NULL;
        /* And one of the header before constrain (in a buffer of exactly its size, so that
         * AddressSanitizer sees a read past it): MODA_CONSTRAIN_AUTO. */
        {
            size_t old_size = offsetof(moda_generation_params, constrain);
            unsigned char *old = malloc(old_size);
            gp = moda_generation_default_params();
            gp.struct_size = old_size;
            memcpy(old, &gp, old_size);
            CHECK_RC(moda_model_describe(model, &img, (const moda_generation_params *)(void *)old,
                                         &b),
                     MODA_OK);
            CHECK(a && b && same_tokens(a, b));
            moda_description_free(b);
            b = NULL;
            free(old);
        }
        /* Without a schema, free text is what MODA_CONSTRAIN_AUTO gives. */
        gp = moda_generation_default_params();
        gp.constrain = MODA_CONSTRAIN_NONE;
        CHECK_RC(moda_model_describe(model, &img, &gp, &b), MODA_OK);
        CHECK(a && b && same_tokens(a, b));
        moda_description_free(a);
        moda_description_free(b);
    }
    gp = moda_generation_default_params();
    gp.num_beams = 3;
    gp.max_new_tokens = 8;
    gp.repetition_penalty = 1.3f;
    gp.no_repeat_ngram_size = 2;
    gp.length_penalty = 0.5f;
    CHECK_RC(moda_model_describe(model, &img, &gp, &d2), MODA_OK);
    CHECK(moda_description_n_tokens(d2) >= 1);
    moda_description_free(d2);
    d2 = NULL;

    /* Streaming: every token, in order, adding up to the text; stopping early. */
    {
        struct stream s;
        moda_description *sd = NULL;
        memset(&s, 0, sizeof s);
        s.order_ok = 1;
        CHECK_RC(moda_model_describe_stream(model, &img, NULL, on_token, &s, &sd), MODA_OK);
        CHECK(sd && (size_t)s.calls == moda_description_n_tokens(sd));
        CHECK(s.order_ok);
        CHECK(sd && memcmp(s.ids, moda_description_token_ids(sd),
                           moda_description_n_tokens(sd) * sizeof(unsigned int)) == 0);
        /* The pieces add up to the text, except that a final incomplete character (U+FFFD
         * in the text) is never passed on. */
        CHECK(sd && strncmp(s.text, moda_description_text(sd), strlen(s.text)) == 0);
        CHECK(sd && (strcmp(moda_description_text(sd) + strlen(s.text), "") == 0 ||
                     strcmp(moda_description_text(sd) + strlen(s.text), "\xEF\xBF\xBD") == 0));
        CHECK(d && sd && same_tokens(d, sd));
        moda_description_free(sd);
        sd = NULL;
        memset(&s, 0, sizeof s);
        s.order_ok = 1;
        s.stop_after = 2;
        CHECK_RC(moda_model_describe_stream(model, &img, NULL, on_token, &s, &sd), MODA_OK);
        CHECK(s.calls == 2 && moda_description_n_tokens(sd) == 2);
        CHECK(sd && strcmp(moda_description_finish(sd), "stopped") == 0);
        moda_description_free(sd);
        sd = NULL;
        /* No callback is allowed; NULL model, image or out are not. */
        CHECK_RC(moda_model_describe_stream(model, &img, NULL, NULL, NULL, &sd), MODA_OK);
        CHECK(d && sd && same_tokens(d, sd));
        moda_description_free(sd);
        CHECK_RC(moda_model_describe_stream(NULL, &img, NULL, on_token, &s, &sd),
                 MODA_ERR_INVALID_ARGUMENT);
        CHECK_RC(moda_model_describe_stream(model, NULL, NULL, on_token, &s, &sd),
                 MODA_ERR_INVALID_ARGUMENT);
        CHECK_RC(moda_model_describe_stream(model, &img, NULL, on_token, &s, NULL),
                 MODA_ERR_INVALID_ARGUMENT);
    }

    /* Batch: a bad image and a bad struct get their own descriptions; the others equal
     * single calls. */
    {
        moda_image batch[4];
        moda_description *out[4];
        struct stream s;
        batch[0] = moda_image_from_file(photo);
        batch[1] = moda_image_from_file(not_image);
        batch[2] = moda_image_from_file(wide);
        memset(&batch[3], 0, sizeof batch[3]);
        memset(&s, 0, sizeof s);
        s.order_ok = 1;
        CHECK_RC(moda_model_describe_batch(model, batch, 4, NULL, on_token, &s, out),
                 MODA_ERR_IMAGE);
        CHECK(contains(moda_model_errmsg(model), "image 1 of 4"));
        CHECK(contains(moda_model_errmsg(model), "2 of 4 failed"));
        CHECK(out[0] && out[1] && out[2] && out[3]);
        CHECK(moda_description_status(out[0]) == MODA_OK);
        CHECK(d && same_tokens(d, out[0]));
        CHECK(moda_description_status(out[1]) == MODA_ERR_IMAGE);
        CHECK(contains(moda_description_errmsg(out[1]), "not_an_image.jpg"));
        CHECK(strcmp(moda_description_text(out[1]), "") == 0);
        CHECK(moda_description_n_tokens(out[1]) == 0);
        CHECK(moda_description_token_ids(out[1]) == NULL);
        CHECK(strcmp(moda_description_finish(out[1]), "") == 0);
        check_no_attributes(out[1]);
        CHECK(moda_description_status(out[2]) == MODA_OK);
        CHECK(moda_description_status(out[3]) == MODA_ERR_INVALID_ARGUMENT);
        CHECK(s.order_ok);
        CHECK(s.images_seen[0] == moda_description_n_tokens(out[0]));
        CHECK(s.images_seen[1] == 0 && s.images_seen[3] == 0);
        CHECK(s.images_seen[2] == moda_description_n_tokens(out[2]));
        for (i = 0; i < 4; i++) moda_description_free(out[i]);

        /* All good: MODA_OK. */
        CHECK_RC(moda_model_describe_batch(model, batch, 1, NULL, NULL, NULL, out), MODA_OK);
        CHECK(same_tokens(d, out[0]));
        moda_description_free(out[0]);
        /* Whole-call failures: every out[i] is NULL. */
        out[0] = out[1] = (moda_description *)&checks;
        CHECK_RC(moda_model_describe_batch(NULL, batch, 2, NULL, NULL, NULL, out),
                 MODA_ERR_INVALID_ARGUMENT);
        CHECK(out[0] == NULL && out[1] == NULL);
        out[0] = out[1] = (moda_description *)&checks;
        CHECK_RC(moda_model_describe_batch(model, NULL, 2, NULL, NULL, NULL, out),
                 MODA_ERR_INVALID_ARGUMENT);
        CHECK(out[0] == NULL && out[1] == NULL);
        CHECK_RC(moda_model_describe_batch(model, batch, 2, NULL, NULL, NULL, NULL),
                 MODA_ERR_INVALID_ARGUMENT);
        gp = moda_generation_default_params();
        gp.num_beams = 100;
        CHECK_RC(moda_model_describe_batch(model, batch, 2, &gp, NULL, NULL, out),
                 MODA_ERR_INVALID_ARGUMENT);
        CHECK(out[0] == NULL && out[1] == NULL);
        /* An empty batch. */
        CHECK_RC(moda_model_describe_batch(model, NULL, 0, NULL, NULL, NULL, NULL), MODA_OK);
    }

    /* Embeddings. */
    {
        float *e = calloc(dim * 3 + 1, sizeof(float));
        float *e2 = calloc(dim, sizeof(float));
        int statuses[3] = {-1, -1, -1};
        moda_image batch[3];
        double norm = 0.0;
        img = moda_image_from_file(photo);
        CHECK_RC(moda_model_embed(NULL, &img, 0, e, dim), MODA_ERR_INVALID_ARGUMENT);
        CHECK_RC(moda_model_embed(model, NULL, 0, e, dim), MODA_ERR_INVALID_ARGUMENT);
        CHECK_RC(moda_model_embed(model, &img, 0, NULL, dim), MODA_ERR_INVALID_ARGUMENT);
        CHECK_RC(moda_model_embed(model, &img, 0, e, dim - 1), MODA_ERR_BUFFER_TOO_SMALL);
        {
            char want[64];
            sprintf(want, "embedding has %lu", (unsigned long)dim);
            CHECK(contains(moda_model_errmsg(model), want));
        }
        CHECK(e[0] == 0.0f); /* nothing written */
        CHECK_RC(moda_model_embed(model, &img, 0, e, dim), MODA_OK);
        CHECK(e[0] != 0.0f || e[1] != 0.0f);
        CHECK_RC(moda_model_embed(model, &img, 1, e2, dim), MODA_OK);
        for (i = 0; i < dim; i++) norm += (double)e2[i] * e2[i];
        CHECK(fabs(norm - 1.0) < 1e-4);
        bad = moda_image_from_file(not_image);
        CHECK_RC(moda_model_embed(model, &bad, 0, e2, dim), MODA_ERR_IMAGE);
        CHECK(contains(moda_model_errmsg(model), "not_an_image.jpg"));

        batch[0] = moda_image_from_file(wide);
        batch[1] = moda_image_from_file(not_image);
        batch[2] = moda_image_from_file(photo);
        CHECK_RC(moda_model_embed_batch(model, batch, 3, 0, e, dim * 3 - 1, statuses),
                 MODA_ERR_BUFFER_TOO_SMALL);
        CHECK(statuses[0] == MODA_ERR_BUFFER_TOO_SMALL && statuses[2] == MODA_ERR_BUFFER_TOO_SMALL);
        {
            char want[64];
            sprintf(want, "need %lu", (unsigned long)(dim * 3));
            CHECK(contains(moda_model_errmsg(model), want));
        }
        e[dim] = 123.0f;
        CHECK_RC(moda_model_embed_batch(model, batch, 3, 0, e, dim * 3, statuses), MODA_ERR_IMAGE);
        CHECK(statuses[0] == MODA_OK && statuses[1] == MODA_ERR_IMAGE && statuses[2] == MODA_OK);
        CHECK(contains(moda_model_errmsg(model), "image 1 of 3"));
        CHECK(e[dim] == 0.0f); /* the failed row is zeros */
        CHECK_RC(moda_model_embed(model, &img, 0, e2, dim), MODA_OK);
        for (i = 0; i < dim; i++) CHECK(fabs(e[2 * dim + i] - e2[i]) < 1e-4);
        CHECK_RC(moda_model_embed_batch(model, batch, 1, 1, e, dim, NULL), MODA_OK);
        CHECK_RC(moda_model_embed_batch(NULL, batch, 1, 0, e, dim, statuses),
                 MODA_ERR_INVALID_ARGUMENT);
        CHECK(statuses[0] == MODA_ERR_INVALID_ARGUMENT);
        CHECK_RC(moda_model_embed_batch(model, NULL, 1, 0, e, dim, NULL), MODA_ERR_INVALID_ARGUMENT);
        CHECK_RC(moda_model_embed_batch(model, batch, 1, 0, NULL, dim, NULL),
                 MODA_ERR_INVALID_ARGUMENT);
        CHECK_RC(moda_model_embed_batch(model, NULL, 0, 0, NULL, 0, NULL), MODA_OK);
        free(e);
        free(e2);
    }

    /* A description's embedding: the one its encoder run computed, the same floats as
     * moda_model_embed_batch() writes for the same batch of images. */
    {
        float *e = calloc(dim * 3, sizeof(float));
        float *e2 = calloc(dim + 1, sizeof(float));
        moda_image batch[3];
        moda_description *out[3];
        int norm_flag;
        batch[0] = moda_image_from_file(wide);
        batch[1] = moda_image_from_file(not_image);
        batch[2] = moda_image_from_file(photo);
        gp = moda_generation_default_params();
        gp.max_new_tokens = 3;
        CHECK_RC(moda_model_describe_batch(model, batch, 3, &gp, NULL, NULL, out), MODA_ERR_IMAGE);
        for (norm_flag = 0; norm_flag <= 1; norm_flag++) {
            CHECK_RC(moda_model_embed_batch(model, batch, 3, norm_flag, e, dim * 3, NULL),
                     MODA_ERR_IMAGE);
            for (i = 0; i < 3; i += 2) {
                e2[dim] = 123.0f;
                CHECK_RC(moda_description_embedding(out[i], norm_flag, e2, dim + 1), MODA_OK);
                CHECK(memcmp(e2, e + i * dim, dim * sizeof(float)) == 0);
                CHECK(e2[dim] == 123.0f); /* nothing past the embedding */
            }
        }
        CHECK_RC(moda_description_embedding(out[1], 0, e2, dim), MODA_ERR_INVALID_ARGUMENT);
        CHECK(contains(moda_last_error(), "failed"));
        e2[0] = 7.0f;
        CHECK_RC(moda_description_embedding(out[0], 0, e2, dim - 1), MODA_ERR_BUFFER_TOO_SMALL);
        CHECK(e2[0] == 7.0f); /* nothing written */
        CHECK_RC(moda_description_embedding(NULL, 0, e2, dim), MODA_ERR_INVALID_ARGUMENT);
        CHECK_RC(moda_description_embedding(out[0], 0, NULL, dim), MODA_ERR_INVALID_ARGUMENT);
        for (i = 0; i < 3; i++) moda_description_free(out[i]);
        free(e);
        free(e2);
    }

    /* A model opened for embeddings only embeds as the whole model does and refuses to
     * describe; a struct of the header before embeddings_only (in a buffer of exactly its size,
     * so that AddressSanitizer sees a read past it) opens a whole model. */
    CHECK(moda_model_default_params().embeddings_only == 0);
    {
        float *e = calloc(dim, sizeof(float));
        float *e2 = calloc(dim, sizeof(float));
        moda_model *only = NULL;
        moda_description *od = NULL;
        size_t old_size = offsetof(moda_model_params, embeddings_only);
        unsigned char *old = malloc(old_size);
        img = moda_image_from_file(photo);
        mp = moda_model_default_params();
        mp.embeddings_only = 1;
        CHECK_RC(moda_model_open(bundle, &mp, &only), MODA_OK);
        CHECK(moda_model_embedding_size(only) == dim);
        CHECK_RC(moda_model_embed(only, &img, 1, e, dim), MODA_OK);
        CHECK_RC(moda_model_embed(model, &img, 1, e2, dim), MODA_OK);
        for (i = 0; i < dim; i++) CHECK(e[i] == e2[i]); /* the same graphs, the same bits */
        od = (moda_description *)&checks;
        CHECK_RC(moda_model_describe(only, &img, NULL, &od), MODA_ERR_INVALID_ARGUMENT);
        CHECK(od == NULL);
        CHECK(contains(moda_model_errmsg(only), "embeddings only"));
        moda_model_free(only);
        only = NULL;
        mp = moda_model_default_params();
        mp.struct_size = old_size;
        memcpy(old, &mp, old_size);
        CHECK_RC(moda_model_open(bundle, (const moda_model_params *)(void *)old, &only), MODA_OK);
        CHECK_RC(moda_model_describe(only, &img, NULL, &od), MODA_OK);
        CHECK(od != NULL && moda_description_status(od) == MODA_OK);
        moda_description_free(od);
        moda_model_free(only);
        free(old);
        free(e);
        free(e2);
    }

    /* Messages are per thread: another thread's failure leaves this thread's "" alone. */
    {
        pthread_t th;
        struct other_thread o;
        moda_description *ok = NULL;
        CHECK_RC(moda_model_describe(model, &img, NULL, &ok), MODA_OK);
        moda_description_free(ok);
        o.model = model;
        o.missing = missing;
        o.rc = 0;
        o.saw_message = 0;
        CHECK(pthread_create(&th, NULL, fail_on_other_thread, &o) == 0);
        CHECK(pthread_join(th, NULL) == 0);
        CHECK(o.rc == MODA_ERR_IMAGE && o.saw_message);
        CHECK(strcmp(moda_model_errmsg(model), "") == 0);
        CHECK(strcmp(moda_last_error(), "") == 0);
    }

    /* Attributes, from a bundle with a caption schema: the accessors' ranges, the single and
     * batch calls agree, the strings outlive the model; the values go to stdout. */
    {
        moda_model *sm = NULL;
        moda_description *auto_d = NULL, *none_d = NULL, *out[2] = {NULL, NULL};
        moda_image batch[2];
        img = moda_image_from_file(photo);
        CHECK_RC(moda_model_open(schema_bundle, NULL, &sm), MODA_OK);
        if (sm) {
            gp = moda_generation_default_params();
            CHECK_RC(moda_model_describe(sm, &img, &gp, &auto_d), MODA_OK);
            /* Constrained to the schema, whose last field is followed by </s>: complete. */
            CHECK(auto_d && strcmp(moda_description_finish(auto_d), "end_of_text") == 0);
            /* Forced text goes in several tokens a run, and every run of one constrained
             * image asks for the listed tokens' logits only. */
            CHECK(auto_d && moda_description_decoder_runs(auto_d) > 0 &&
                  moda_description_decoder_runs(auto_d) < moda_description_n_tokens(auto_d));
            CHECK(auto_d &&
                  moda_description_listed_runs(auto_d) == moda_description_decoder_runs(auto_d));
            gp.constrain = MODA_CONSTRAIN_NONE;
            CHECK_RC(moda_model_describe(sm, &img, &gp, &none_d), MODA_OK);
            CHECK(none_d && moda_description_listed_runs(none_d) == 0 &&
                  moda_description_decoder_runs(none_d) == moda_description_n_tokens(none_d));
            gp.constrain = 42;
            CHECK_RC(moda_model_describe_batch(sm, &img, 1, &gp, NULL, NULL, out),
                     MODA_ERR_INVALID_ARGUMENT);
            CHECK(contains(moda_model_errmsg(sm), "constrain is 42"));
            batch[0] = moda_image_from_file(not_image);
            batch[1] = moda_image_from_file(photo);
            CHECK_RC(moda_model_describe_batch(sm, batch, 2, NULL, NULL, NULL, out),
                     MODA_ERR_IMAGE);
            check_no_attributes(out[0]);
            CHECK(moda_description_decoder_runs(out[0]) == 0);
            CHECK(auto_d && out[1] && same_tokens(auto_d, out[1]));
            CHECK(auto_d && out[1] && same_attributes(auto_d, out[1]));
            moda_description_free(out[0]);
            moda_description_free(out[1]);
        }
        moda_model_free(sm);
        if (auto_d) check_and_print_attributes(auto_d, "auto");
        if (none_d) check_and_print_attributes(none_d, "none");
        CHECK(auto_d && none_d);
        moda_description_free(auto_d);
        moda_description_free(none_d);
    }

    /* Destructors accept NULL; a description outlives its model. */
    moda_description_free(NULL);
    moda_model_free(NULL);
    moda_model_free(model);
    CHECK(d && strlen(moda_description_text(d)) == moda_description_text_len(d));
    moda_description_free(d);

    free(photo_bytes);
    free(photo);
    free(wide);
    free(not_image);
    free(missing);
    free(missing_bundle);
    if (failures) {
        fprintf(stderr, "api_test: %d of %d checks failed\n", failures, checks);
        return 1;
    }
    printf("api_test: all %d checks passed\n", checks);
    return 0;
}
