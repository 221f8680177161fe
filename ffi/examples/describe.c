/*
 * describe: prints a description of each image as `moda-sdk describe` does in text mode: one
 * line per image, "PATH<TAB>DESCRIPTION", control characters in the description printed as
 * spaces so that each stays on its line. When the bundle has a caption schema, a line per
 * attribute follows: "  Colour: Blue (0.97)" (its confidence), then "or VALUE (CONFIDENCE)"
 * for each alternative the model weighed, or "  Colour: -" when the text yields no value.
 *
 *     cc describe.c $(pkg-config --cflags --libs moda) -o describe
 *     ./describe BUNDLE_DIR IMAGE...
 *
 * An image that fails gets "PATH<TAB>error: MESSAGE" on stderr and the others go on; the exit
 * status is then 1. Plain C89.
 */
#include <stdio.h>
#include <string.h>

#include <moda.h>

/* Prints len bytes of UTF-8 text, each control character (U+0000 to U+001F, U+007F to U+009F)
 * as a space. */
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

/* " (0.97)", or nothing when the confidence is unknown (NaN, the one value not equal to
 * itself). */
static void print_confidence(float confidence)
{
    if (confidence == confidence) printf(" (%.2f)", confidence);
}

/* One line per attribute of d (none when the bundle has no caption schema). */
static void print_attributes(const moda_description *d)
{
    size_t i, j;
    for (i = 0; i < moda_description_attribute_count(d); i++) {
        const char *value = moda_description_attribute_value(d, i);
        printf("  %s: ", moda_description_attribute_name(d, i));
        if (value == NULL) {
            puts("-");
            continue;
        }
        print_one_line(value, strlen(value));
        print_confidence(moda_description_attribute_confidence(d, i));
        for (j = 0; j < moda_description_attribute_alternative_count(d, i); j++) {
            const char *alt = moda_description_attribute_alternative_value(d, i, j);
            fputs(" or ", stdout);
            print_one_line(alt, strlen(alt));
            print_confidence(moda_description_attribute_alternative_confidence(d, i, j));
        }
        putchar('\n');
    }
}

int main(int argc, char **argv)
{
    moda_model *model = NULL;
    moda_generation_params params;
    int i;
    int failed = 0;

    if (argc < 3) {
        fprintf(stderr, "usage: %s BUNDLE_DIR IMAGE...\n", argv[0]);
        return 2;
    }
    if (moda_model_open(argv[1], NULL, &model) != MODA_OK) {
        fprintf(stderr, "describe: %s\n", moda_last_error());
        return 1;
    }
    /* Greedy search up to the bundle's length limit: the defaults of `moda-sdk describe`. */
    params = moda_generation_default_params();
    for (i = 2; i < argc; i++) {
        moda_image image = moda_image_from_file(argv[i]);
        moda_description *d = NULL;
        int rc = moda_model_describe(model, &image, &params, &d);
        if (rc != MODA_OK) {
            /* The message starts with the path when it is about the image: drop that copy. */
            const char *msg = moda_model_errmsg(model);
            size_t n = strlen(argv[i]);
            if (strncmp(msg, argv[i], n) == 0 && strncmp(msg + n, ": ", 2) == 0) msg += n + 2;
            fprintf(stderr, "%s\terror: %s\n", argv[i], msg);
            failed = 1;
            continue;
        }
        printf("%s\t", argv[i]);
        print_one_line(moda_description_text(d), moda_description_text_len(d));
        putchar('\n');
        print_attributes(d);
        moda_description_free(d);
    }
    moda_model_free(model);
    return failed;
}
