// describe (C++): the C example's output ("PATH<TAB>DESCRIPTION" per image, as
// `moda-sdk describe` prints it, then "  Colour: Blue (0.97)" per attribute when the bundle has
// a caption schema), through a small RAII wrapper over moda.h, describing all the images as one
// batch.
//
//     c++ -std=c++11 describe.cpp $(pkg-config --cflags --libs moda) -o describe_cpp
//     ./describe_cpp BUNDLE_DIR IMAGE...
//
// The wrapper turns status codes into exceptions and owns every handle with std::unique_ptr,
// so nothing leaks when an exception is thrown.
#include <moda.h>

#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace moda {

// A field of the bundle's caption schema and its value in a description.
struct Attribute {
    std::string name;
    bool has_value;     // false: the text yields no value for the field
    std::string value;  // e.g. "Blue"
    float confidence;   // in [0, 1]; NaN when unknown
    std::vector<std::pair<std::string, float> > alternatives;  // most likely first
};

// A failed call: the status code and libmoda's message.
class Error : public std::runtime_error {
public:
    Error(int status, const std::string& message) : std::runtime_error(message), status_(status) {}
    int status() const { return status_; }

private:
    int status_;
};

// A description (owns a moda_description).
class Description {
public:
    explicit Description(moda_description* d) : d_(d, &moda_description_free) {}

    bool ok() const { return moda_description_status(d_.get()) == MODA_OK; }
    int status() const { return moda_description_status(d_.get()); }
    std::string error() const { return moda_description_errmsg(d_.get()); }
    std::string text() const
    {
        return std::string(moda_description_text(d_.get()), moda_description_text_len(d_.get()));
    }
    // Why generation ended: "end_of_text", "stop_string", "length" (cut at the token limit)
    // or "stopped"; "" for an image that failed.
    std::string finish() const { return moda_description_finish(d_.get()); }
    std::vector<unsigned> token_ids() const
    {
        const unsigned* ids = moda_description_token_ids(d_.get());
        return std::vector<unsigned>(ids, ids + moda_description_n_tokens(d_.get()));
    }
    std::vector<float> logprobs() const
    {
        const float* lp = moda_description_logprobs(d_.get());
        return std::vector<float>(lp, lp + moda_description_n_tokens(d_.get()));
    }
    // Every field of the schema, in the template's order (none without a schema).
    std::vector<Attribute> attributes() const
    {
        const moda_description* d = d_.get();
        std::vector<Attribute> out;
        for (size_t i = 0; i < moda_description_attribute_count(d); i++) {
            const char* value = moda_description_attribute_value(d, i);
            Attribute a;
            a.name = moda_description_attribute_name(d, i);
            a.has_value = value != nullptr;
            a.value = value ? value : "";
            a.confidence = moda_description_attribute_confidence(d, i);
            for (size_t j = 0; j < moda_description_attribute_alternative_count(d, i); j++) {
                const char* v = moda_description_attribute_alternative_value(d, i, j);
                float c = moda_description_attribute_alternative_confidence(d, i, j);
                a.alternatives.emplace_back(v, c);
            }
            out.push_back(a);
        }
        return out;
    }

private:
    std::unique_ptr<moda_description, void (*)(moda_description*)> d_;
};

// An opened bundle (owns a moda_model). Safe to use from many threads at once.
class Model {
public:
    explicit Model(const std::string& bundle_dir,
                   const moda_model_params& params = moda_model_default_params())
        : model_(nullptr, &moda_model_free)
    {
        moda_model* m = nullptr;
        int rc = moda_model_open(bundle_dir.c_str(), &params, &m);
        if (rc != MODA_OK) throw Error(rc, moda_last_error());
        model_.reset(m);
    }

    // One image from a file; throws Error when it fails.
    Description describe(const std::string& path,
                         const moda_generation_params& params = moda_generation_default_params())
    {
        moda_image image = moda_image_from_file(path.c_str());
        moda_description* d = nullptr;
        int rc = moda_model_describe(model_.get(), &image, &params, &d);
        if (rc != MODA_OK) throw Error(rc, moda_model_errmsg(model_.get()));
        return Description(d);
    }

    // Many files as one batch. An image that fails gets a Description whose ok() is false;
    // Error is thrown only when the whole call fails. on_token (may be empty) sees each token.
    std::vector<Description> describe_batch(
        const std::vector<std::string>& paths,
        const moda_generation_params& params = moda_generation_default_params(),
        std::function<bool(const moda_token&)> on_token = nullptr)
    {
        std::vector<moda_image> images;
        for (const std::string& p : paths) images.push_back(moda_image_from_file(p.c_str()));
        std::vector<moda_description*> out(paths.size(), nullptr);
        Callback cb{on_token, nullptr};
        int rc = moda_model_describe_batch(model_.get(), images.data(), images.size(), &params,
                                           on_token ? &Callback::call : nullptr, &cb, out.data());
        std::vector<Description> result;
        for (moda_description* d : out) result.emplace_back(d);  // owns each, even on error
        if (cb.exception) std::rethrow_exception(cb.exception);
        bool ran = out.empty() || out[0] != nullptr;
        if (rc != MODA_OK && !ran) throw Error(rc, moda_model_errmsg(model_.get()));
        return result;
    }

    size_t embedding_size() const { return moda_model_embedding_size(model_.get()); }

private:
    // Carries a std::function through the C callback; exceptions must not cross the C
    // boundary, so one is kept and rethrown after the call.
    struct Callback {
        std::function<bool(const moda_token&)> fn;
        std::exception_ptr exception;

        static int call(const moda_token* token, void* user_data)
        {
            Callback* self = static_cast<Callback*>(user_data);
            try {
                return self->fn(*token) ? 0 : 1;
            } catch (...) {
                self->exception = std::current_exception();
                return 1;
            }
        }
    };

    std::unique_ptr<moda_model, void (*)(moda_model*)> model_;
};

}  // namespace moda

// The text on one line, as `moda-sdk describe` prints it: control characters (U+0000 to
// U+001F, U+007F to U+009F) become spaces.
static std::string one_line(const std::string& text)
{
    std::string out;
    for (size_t i = 0; i < text.size(); i++) {
        unsigned char c = static_cast<unsigned char>(text[i]);
        unsigned char next = i + 1 < text.size() ? static_cast<unsigned char>(text[i + 1]) : 0;
        if (c < 0x20 || c == 0x7F) {
            out += ' ';
        } else if (c == 0xC2 && next >= 0x80 && next <= 0x9F) {
            out += ' ';
            i++;
        } else {
            out += text[i];
        }
    }
    return out;
}

// "Blue (0.97)", or "Blue" when the confidence is unknown (NaN).
static std::string with_confidence(const std::string& value, float confidence)
{
    if (std::isnan(confidence)) return one_line(value);
    char c[32];
    std::snprintf(c, sizeof c, " (%.2f)", confidence);
    return one_line(value) + c;
}

int main(int argc, char** argv)
{
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s BUNDLE_DIR IMAGE...\n", argv[0]);
        return 2;
    }
    try {
        moda::Model model(argv[1]);
        std::vector<std::string> paths(argv + 2, argv + argc);
        std::vector<moda::Description> ds = model.describe_batch(paths);
        int failed = 0;
        for (size_t i = 0; i < ds.size(); i++) {
            if (ds[i].ok()) {
                std::printf("%s\t%s\n", paths[i].c_str(), one_line(ds[i].text()).c_str());
                for (const moda::Attribute& a : ds[i].attributes()) {
                    std::string line = a.has_value ? with_confidence(a.value, a.confidence) : "-";
                    for (const std::pair<std::string, float>& alt : a.alternatives)
                        line += " or " + with_confidence(alt.first, alt.second);
                    std::printf("  %s: %s\n", a.name.c_str(), line.c_str());
                }
            } else {
                std::string msg = ds[i].error();
                if (msg.compare(0, paths[i].size() + 2, paths[i] + ": ") == 0)
                    msg = msg.substr(paths[i].size() + 2);
                std::fprintf(stderr, "%s\terror: %s\n", paths[i].c_str(), msg.c_str());
                failed = 1;
            }
        }
        return failed;
    } catch (const moda::Error& e) {
        std::fprintf(stderr, "describe: %s\n", e.what());
        return 1;
    }
}
