//! libmoda (the `ffi` crate) from C and C++, with the system's `cc` and `c++`:
//!
//! - `ffi/include/moda.h` is what cbindgen makes of the code, declares exactly the symbols
//!   `libmoda.so` exports, and compiles as C89, C99 and C++ with `-Wall -Wextra -Werror`;
//! - `make install PREFIX=...` lays out lib/, include/ and lib/pkgconfig/moda.pc, and the C and
//!   C++ examples, built with `pkg-config --cflags --libs moda`, print what the Rust SDK says
//!   (and the C example also links against `libmoda.a`);
//! - `ffi/tests/api_test.c` exercises every function (NULL for every pointer, a missing
//!   bundle, a non-image file, a too-small buffer, ...) under AddressSanitizer + UBSan and
//!   under valgrind, with no errors and no leaks;
//! - `ffi/tests/threads_test.c`: 8 pthreads describing on one model give the serial results.
//!
//! libmoda.so and libmoda.a come from this package's dependency on `moda-ffi`: cargo builds
//! them, with this test's profile and target directory, next to this test's executable (in
//! `target/<profile>/deps`). The fixture bundle is the recipe fixture exported once; a second
//! export of it carries a caption schema, for the attributes.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use moda_sdk::{Constrain, Description, GenerationOptions, ImageInput, Moda, OpenOptions};
use moda_tests::{fixture, TempDir};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
}

fn ffi_dir() -> PathBuf {
    repo().join("ffi")
}

fn header_path() -> PathBuf {
    ffi_dir().join("include").join("moda.h")
}

/// Where cargo put libmoda.so and libmoda.a for this test run: the directory of this test's
/// executable (`target/<profile>/deps`), or its parent.
fn lib_dir() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's path");
        let deps = exe.parent().expect("the test's directory").to_path_buf();
        let candidates = [
            deps.clone(),
            deps.parent().map(Path::to_path_buf).unwrap_or(deps),
        ];
        for d in &candidates {
            if d.join("libmoda.so").is_file() && d.join("libmoda.a").is_file() {
                return d.clone();
            }
        }
        panic!(
            "libmoda.so and libmoda.a are not in {candidates:?}; cargo builds them because \
             moda-tests depends on moda-ffi (crate-type cdylib + staticlib)"
        )
    })
}

fn bundle() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi-recipe-bundle");
        moda_tests::export_recipe_bundle(&out, exporter::Quantize::None)
    })
}

fn moda() -> &'static Moda {
    static M: OnceLock<Moda> = OnceLock::new();
    M.get_or_init(|| Moda::open(bundle(), &OpenOptions::default()).expect("open the bundle"))
}

/// The caption template of [`schema_bundle`]: its fields' order is not their alphabetical one.
const SCHEMA_TEMPLATE: &str = "{Style} {Article}";

/// The recipe fixture exported with a caption schema (`--caption-template "{Style} {Article}"
/// --catalog CSV`) whose catalog gives Style the first word of photo.jpg's description (the
/// free text of the plain fixture bundle) and Article values the model never writes: free
/// text then reads as Style = that word, Article = none.
fn schema_bundle() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        let text = moda()
            .describe(
                &ImageInput::Path(&fixture("images/photo.jpg")),
                &GenerationOptions::default(),
            )
            .expect("describe")
            .text;
        let (head, _) = text.trim().split_once(' ').expect("a space in the text");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi-schema");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let q = |v: &str| format!("\"{}\"", v.replace('"', "\"\""));
        let catalog = dir.join("catalog.csv");
        std::fs::write(
            &catalog,
            format!(
                "Style,Article\n{},zzz\n{},\"never written\"\n",
                q(head),
                q(head)
            ),
        )
        .expect("write the catalog");
        moda_tests::export_recipe_bundle_with_schema(&dir.join("bundle"), SCHEMA_TEMPLATE, &catalog)
    })
}

fn schema_moda() -> &'static Moda {
    static M: OnceLock<Moda> = OnceLock::new();
    M.get_or_init(|| {
        Moda::open(schema_bundle(), &OpenOptions::default()).expect("open the schema bundle")
    })
}

/// The names of the fields of `moda`'s caption schema, in the template's order.
fn schema_fields(moda: &Moda) -> Vec<String> {
    let schema = moda.manifest().schema.as_ref().expect("a caption schema");
    schema.fields.iter().map(|f| f.name.clone()).collect()
}

/// `s` up to its first NUL, as libmoda passes strings to C.
fn cut_at_nul(s: &str) -> &str {
    s.split('\0').next().unwrap_or("")
}

/// The fixture images that are images.
fn images() -> Vec<PathBuf> {
    [
        "photo.jpg",
        "wide.png",
        "gray.png",
        "rgba.png",
        "palette.png",
        "gray16.png",
        "small.png",
        "photo_prog422.jpg",
    ]
    .iter()
    .map(|n| fixture(&format!("images/{n}")))
    .collect()
}

/// What `moda-sdk describe` prints in text mode: `PATH<TAB>DESCRIPTION`, one line per image,
/// with the default generation options and control characters as spaces (its `one_line`, in
/// sdk/cli/src/commands/job.rs); here from the Rust SDK. (The recipe fixture's random weights
/// make descriptions full of odd tokens, control characters among them.)
fn expected_text_output(paths: &[PathBuf]) -> String {
    expected_output(moda(), paths)
}

/// The text on one line: control characters as spaces.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// What the C and C++ examples print with `moda`'s bundle, from the Rust SDK: each image's
/// `PATH<TAB>DESCRIPTION` line, then, when the bundle has a schema, `  NAME: VALUE (0.97)` per
/// field in the template's order, with ` or VALUE (0.02)` per alternative, or `  NAME: -`.
fn expected_output(moda: &Moda, paths: &[PathBuf]) -> String {
    let fields = moda
        .manifest()
        .schema
        .as_ref()
        .map_or_else(Vec::new, |_| schema_fields(moda));
    let with_confidence = |value: &str, c: Option<f32>| match c {
        Some(c) => format!("{} ({c:.2})", one_line(cut_at_nul(value))),
        None => one_line(cut_at_nul(value)),
    };
    let mut out = String::new();
    for p in paths {
        let d = moda
            .describe(&ImageInput::Path(p), &GenerationOptions::default())
            .expect("describe");
        out += &format!("{}\t{}\n", p.display(), one_line(&d.text));
        for name in &fields {
            let a = d.attributes.as_ref().and_then(|a| a.get(name)?.as_ref());
            let line = match a {
                None => "-".to_string(),
                Some(a) => {
                    let mut line = with_confidence(&a.value, a.confidence);
                    for (v, c) in &a.alternatives {
                        line += &format!(" or {}", with_confidence(v, Some(*c)));
                    }
                    line
                }
            };
            out += &format!("  {name}: {line}\n");
        }
    }
    out
}

/// Runs `cmd`; panics with its output unless it exits with 0.
fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A command with the environment the C programs run in: libmoda is found through the rpath
/// it was linked with (cargo puts `target/<profile>/deps` on `LD_LIBRARY_PATH` for tests, which
/// would win over the installed copy) and ONNX Runtime by libmoda's own search.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env_remove("ORT_DYLIB_PATH")
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("DYLD_LIBRARY_PATH");
    c
}

/// Compiles C or C++ `sources` into `out` with `args` (warnings are errors).
fn compile(compiler: &str, sources: &[PathBuf], args: &[OsString], out: &Path) {
    let mut cmd = command(compiler);
    cmd.args(["-Wall", "-Wextra", "-Werror", "-g"])
        .args(sources)
        .args(args)
        .arg("-o")
        .arg(out);
    run_ok(&mut cmd);
}

/// `-I ffi/include -L <lib_dir> -lmoda -Wl,-rpath,<lib_dir> -pthread -lm`: against the build
/// tree.
fn build_tree_flags() -> Vec<OsString> {
    let lib = lib_dir();
    let mut rpath = OsString::from("-Wl,-rpath,");
    rpath.push(lib);
    vec![
        "-I".into(),
        ffi_dir().join("include").into(),
        "-L".into(),
        lib.into(),
        "-lmoda".into(),
        rpath,
        "-pthread".into(),
        "-lm".into(),
    ]
}

// ---------------------------------------------------------------------------------------------
// The header.

/// The header cbindgen makes of the ffi crate's source with `ffi/cbindgen.toml`.
fn generated_header() -> String {
    let mut config =
        cbindgen::Config::from_file(ffi_dir().join("cbindgen.toml")).expect("ffi/cbindgen.toml");
    // SAFETY: moda_version returns a static NUL-terminated string.
    let version = unsafe { std::ffi::CStr::from_ptr(moda::moda_version()) }
        .to_str()
        .expect("version")
        .to_string();
    config.after_includes = config
        .after_includes
        .map(|s| s.replace("@MODA_VERSION@", &version));
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(ffi_dir().join("src").join("lib.rs"))
        .generate()
        .expect("cbindgen");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("UTF-8 header")
}

#[test]
fn header_matches_the_code() {
    let want = generated_header();
    let path = header_path();
    if std::env::var_os("MODA_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &want).expect("write ffi/include/moda.h");
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have != want {
        let diff_at = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(have.lines().count().min(want.lines().count()));
        panic!(
            "{} differs from what cbindgen makes of ffi/src (first at line {}):\n  checked in: \
             {:?}\n  generated:  {:?}\nRun `make header` (MODA_UPDATE_HEADER=1 cargo test -p \
             moda-tests --test ffi header_matches_the_code) and review the diff.",
            path.display(),
            diff_at + 1,
            have.lines().nth(diff_at).unwrap_or("<end>"),
            want.lines().nth(diff_at).unwrap_or("<end>")
        );
    }
}

/// The functions the header declares.
fn declared_functions(header: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in header.lines() {
        if line.starts_with(' ') || line.starts_with('#') || line.starts_with("typedef") {
            continue;
        }
        if let Some(open) = line.find('(') {
            let name = line[..open]
                .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("");
            if name.starts_with("moda_") {
                out.insert(name.to_string());
            }
        }
    }
    out
}

#[test]
fn header_declares_exactly_the_exported_symbols() {
    let header = std::fs::read_to_string(header_path()).expect("moda.h");
    let declared = declared_functions(&header);
    let nm = run_ok(
        Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(lib_dir().join("libmoda.so")),
    );
    let exported: BTreeSet<String> = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_addr, kind, name) = (f.next()?, f.next()?, f.next()?);
            (kind == "T" && name.starts_with("moda_")).then(|| name.to_string())
        })
        .collect();
    assert!(
        declared.len() >= 25,
        "only {declared:?} found in the header"
    );
    assert_eq!(
        declared, exported,
        "moda.h declares the left set, libmoda.so exports the right one"
    );
    // Nothing else leaks out under a C name of ours.
    assert!(!String::from_utf8_lossy(&nm.stdout).contains(" D moda_"));
}

#[test]
fn header_compiles_as_c89_c99_and_cxx() {
    let dir = TempDir::new("ffi-header");
    let c = dir.path().join("use_header.c");
    // Uses every type so that each declaration is really checked.
    std::fs::write(
        &c,
        "#include <moda.h>\n\
         #include <stdio.h>\n\
         int main(void) {\n\
         \x20   moda_model_params mp = moda_model_default_params();\n\
         \x20   moda_generation_params gp = moda_generation_default_params();\n\
         \x20   moda_image img = moda_image_from_file(\"x.jpg\");\n\
         \x20   moda_timings t;\n\
         \x20   moda_token tok;\n\
         \x20   moda_token_callback cb = 0;\n\
         \x20   moda_model *m = 0;\n\
         \x20   moda_description *d = 0;\n\
         \x20   (void)mp; (void)gp; (void)img; (void)t; (void)tok; (void)cb; (void)d;\n\
         \x20   moda_model_free(m);\n\
         \x20   printf(\"%s %d\\n\", MODA_VERSION, MODA_VERSION_NUMBER);\n\
         \x20   return moda_version_number() == MODA_VERSION_NUMBER ? 0 : 1;\n\
         }\n",
    )
    .expect("write");
    let cpp = dir.path().join("use_header.cpp");
    std::fs::copy(&c, &cpp).expect("copy");
    let include = ffi_dir().join("include");
    let cases: [(&str, &Path, &[&str]); 6] = [
        ("cc", &c, &["-std=c89", "-pedantic"]),
        ("cc", &c, &["-std=c99", "-pedantic"]),
        ("cc", &c, &["-std=c11", "-pedantic", "-Wstrict-prototypes"]),
        ("c++", &cpp, &["-std=c++98", "-pedantic"]),
        ("c++", &cpp, &["-std=c++11", "-pedantic"]),
        (
            "c++",
            &cpp,
            &["-std=c++17", "-pedantic", "-Wold-style-cast"],
        ),
    ];
    for (compiler, src, flags) in cases {
        let mut cmd = Command::new(compiler);
        cmd.args(["-fsyntax-only", "-Wall", "-Wextra", "-Werror"])
            .args(flags)
            .arg("-I")
            .arg(&include)
            .arg(src);
        run_ok(&mut cmd);
    }
}

// ---------------------------------------------------------------------------------------------
// Install, pkg-config, the examples.

/// `make install PREFIX=<tmp> MODA_LIB_DIR=<lib_dir>`, once per test run.
fn installed() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let prefix = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi-prefix");
        let _ = std::fs::remove_dir_all(&prefix);
        let mut make = command("make");
        make.arg("-C")
            .arg(repo())
            .arg("install")
            .arg(format!("PREFIX={}", prefix.display()))
            .arg(format!("MODA_LIB_DIR={}", lib_dir().display()));
        run_ok(&mut make);
        prefix
    })
}

/// `pkg-config ARGS moda` against the installed prefix.
fn pkg_config(args: &[&str]) -> Vec<OsString> {
    let out = run_ok(
        Command::new("pkg-config")
            .env("PKG_CONFIG_PATH", installed().join("lib").join("pkgconfig"))
            .args(args)
            .arg("moda"),
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .split_whitespace()
        .map(OsString::from)
        .collect()
}

#[test]
fn make_install_lays_out_the_library_the_header_and_pkg_config() {
    let prefix = installed();
    for f in [
        "lib/libmoda.so",
        "lib/libmoda.a",
        "include/moda.h",
        "lib/pkgconfig/moda.pc",
    ] {
        assert!(prefix.join(f).is_file(), "{f} not installed");
    }
    let ort: Vec<_> = std::fs::read_dir(prefix.join("lib"))
        .expect("lib")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("libonnxruntime.so")
        })
        .collect();
    assert_eq!(ort.len(), 1, "ONNX Runtime is installed next to libmoda");
    assert_eq!(
        std::fs::read(prefix.join("include/moda.h")).expect("installed header"),
        std::fs::read(header_path()).expect("header")
    );
    let pc = std::fs::read_to_string(prefix.join("lib/pkgconfig/moda.pc")).expect("moda.pc");
    assert!(
        pc.lines()
            .any(|l| l == format!("prefix={}", prefix.display())),
        "{pc}"
    );
    let version = pkg_config(&["--modversion"]);
    assert_eq!(version, vec![OsString::from(env!("CARGO_PKG_VERSION"))]);
    let cflags = pkg_config(&["--cflags"]);
    assert_eq!(
        cflags,
        vec![OsString::from(format!(
            "-I{}",
            prefix.join("include").display()
        ))]
    );
}

/// The examples of ffi/examples.
enum Example {
    /// describe.c, as C89.
    C,
    /// describe.cpp, as C++11.
    Cxx,
}

/// Builds an example into `dir` against the installed library, found with pkg-config.
fn build_example(dir: &Path, example: Example) -> PathBuf {
    let (compiler, source, std, exe) = match example {
        Example::C => ("cc", "describe.c", "-std=c89", "describe"),
        Example::Cxx => ("c++", "describe.cpp", "-std=c++11", "describe_cpp"),
    };
    let exe = dir.join(exe);
    let mut args = vec![OsString::from(std), OsString::from("-pedantic")];
    args.extend(pkg_config(&["--cflags", "--libs"]));
    compile(
        compiler,
        &[ffi_dir().join("examples").join(source)],
        &args,
        &exe,
    );
    exe
}

/// The C example (ffi/examples/describe.c), built against the installed library with
/// pkg-config, prints what the Rust SDK says for every fixture image, ONNX Runtime coming from
/// next to the installed libmoda.
#[test]
fn c_example_from_the_install_prints_what_the_sdk_says() {
    let dir = TempDir::new("ffi-c-example");
    let exe = build_example(dir.path(), Example::C);
    let paths = images();
    let out = run_ok(command(&exe).arg(bundle()).args(&paths));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected_text_output(&paths)
    );
    // A file that is not an image: its own message on stderr, the others still described,
    // exit status 1.
    let bad = fixture("images/not_an_image.jpg");
    let out = command(&exe)
        .arg(bundle())
        .arg(&paths[0])
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected_text_output(&paths[..1])
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err,
        format!(
            "{}\terror: not an image (unrecognized format)\n",
            bad.display()
        )
    );
    // A missing bundle: a message and status 1.
    let out = command(&exe)
        .arg(dir.path().join("no-bundle"))
        .arg(&paths[0])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-bundle"), "{err}");
}

/// The ONNX Runtime that an installed libmoda loads is the one `make install` put beside it.
#[test]
fn installed_libmoda_loads_the_onnx_runtime_beside_it() {
    let dir = TempDir::new("ffi-runtime");
    let src = dir.path().join("runtime.c");
    std::fs::write(
        &src,
        "#include <moda.h>\n#include <stdio.h>\n\
         int main(void) {\n\
         \x20   const char *p = moda_runtime_path();\n\
         \x20   if (!p) { fprintf(stderr, \"%s\\n\", moda_last_error()); return 1; }\n\
         \x20   printf(\"%s\\n\", p);\n\
         \x20   return 0;\n\
         }\n",
    )
    .expect("write");
    let exe = dir.path().join("runtime");
    compile("cc", &[src], &pkg_config(&["--cflags", "--libs"]), &exe);
    // Run from a directory outside the repository, so that the project's .ort/ is not found
    // from the current directory either.
    let out = run_ok(command(&exe).current_dir(dir.path()));
    let loaded = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let lib = installed().join("lib").canonicalize().expect("lib");
    assert_eq!(loaded.parent(), Some(lib.as_path()), "{}", loaded.display());
}

/// The C++ example (RAII wrapper, batch describe) prints the same as the C example.
#[test]
fn cxx_example_from_the_install_prints_what_the_sdk_says() {
    let dir = TempDir::new("ffi-cxx-example");
    let exe = build_example(dir.path(), Example::Cxx);
    let paths = images();
    let out = run_ok(command(&exe).arg(bundle()).args(&paths));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected_text_output(&paths)
    );
    let bad = fixture("images/not_an_image.jpg");
    let out = command(&exe)
        .arg(bundle())
        .arg(&bad)
        .arg(&paths[1])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected_text_output(&paths[1..2])
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "{}\terror: not an image (unrecognized format)\n",
            bad.display()
        )
    );
}

/// The C and C++ examples with a bundle that has a caption schema: after each description, a
/// line per field of the schema in the template's order, as the Rust SDK reads them.
#[test]
fn c_and_cxx_examples_print_the_attributes_the_sdk_reads() {
    let dir = TempDir::new("ffi-attributes-example");
    let paths = images();
    let want = expected_output(schema_moda(), &paths);
    assert!(
        want.contains("\n  Style: ") && want.contains("\n  Article: "),
        "{want}"
    );
    let c = build_example(dir.path(), Example::C);
    let cxx = build_example(dir.path(), Example::Cxx);
    for exe in [c, cxx] {
        let out = run_ok(command(&exe).arg(schema_bundle()).args(&paths));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            want,
            "{}",
            exe.display()
        );
    }
}

/// The C example linked statically against the installed libmoda.a.
#[test]
fn c_example_links_statically() {
    let dir = TempDir::new("ffi-static");
    let exe = dir.path().join("describe_static");
    let lib = installed().join("lib");
    let mut args = pkg_config(&["--cflags"]);
    args.push(lib.join("libmoda.a").into());
    // What rustc says a staticlib needs from the system (`--print native-static-libs`).
    args.extend(
        pkg_config(&["--libs-only-l", "--static"])
            .into_iter()
            .filter(|a| a != "-lmoda"),
    );
    compile("cc", &[ffi_dir().join("examples/describe.c")], &args, &exe);
    let paths = images();
    let out = run_ok(command(&exe).arg(bundle()).args(&paths[..2]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected_text_output(&paths[..2])
    );
}

// ---------------------------------------------------------------------------------------------
// The API test under sanitizers and valgrind; threads.

#[test]
fn api_test_calls_every_function_of_the_header() {
    let header = std::fs::read_to_string(header_path()).expect("moda.h");
    let test = std::fs::read_to_string(ffi_dir().join("tests/api_test.c")).expect("api_test.c");
    let missing: Vec<String> = declared_functions(&header)
        .into_iter()
        .filter(|f| !test.contains(&format!("{f}(")))
        .collect();
    assert!(
        missing.is_empty(),
        "ffi/tests/api_test.c never calls {missing:?}"
    );
}

fn api_test_args() -> Vec<OsString> {
    vec![
        bundle().into(),
        fixture("images").into(),
        schema_bundle().into(),
    ]
}

/// `s` as api_test prints names and values: a backslash as `\\`, bytes below 0x20 and 0x7F
/// as `\xHH`.
fn escaped(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\x7f' => out += &format!("\\x{:02X}", c as u32),
            c => out.push(c),
        }
    }
    out
}

/// An attribute or alternative line of api_test with its confidence (the sixth field of both
/// kinds) taken out: the line with `*` in its place, and the confidence (`None` for NaN).
type AttributeLine = (String, Option<f32>);

/// The attribute lines api_test prints for a description (see ffi/tests/api_test.c), from the
/// Rust SDK.
fn attribute_lines(mode: &str, fields: &[String], d: &Description) -> Vec<AttributeLine> {
    let attributes = d
        .attributes
        .as_ref()
        .expect("a bundle with a schema has attributes");
    assert_eq!(attributes.len(), fields.len(), "{attributes:?}");
    let mut out = Vec::new();
    for (i, name) in fields.iter().enumerate() {
        let a = attributes
            .get(name)
            .unwrap_or_else(|| panic!("no attribute {name}"))
            .as_ref();
        let value = a.map_or("-".to_string(), |a| {
            format!("={}", escaped(cut_at_nul(&a.value)))
        });
        let alternatives = a.map_or(&[][..], |a| &a.alternatives[..]);
        out.push((
            format!(
                "attribute\t{mode}\t{i}\t{}\t{value}\t*\t{}",
                escaped(cut_at_nul(name)),
                alternatives.len()
            ),
            a.and_then(|a| a.confidence),
        ));
        for (j, (v, c)) in alternatives.iter().enumerate() {
            out.push((
                format!(
                    "alternative\t{mode}\t{i}\t{j}\t={}\t*",
                    escaped(cut_at_nul(v))
                ),
                Some(*c),
            ));
        }
    }
    out
}

/// api_test's attribute lines.
fn printed_attribute_lines(stdout: &str) -> Vec<AttributeLine> {
    let mut out = Vec::new();
    for line in stdout.lines() {
        let mut f: Vec<&str> = line.split('\t').collect();
        if !matches!(f[0], "attribute" | "alternative") {
            continue;
        }
        assert!(f.len() > 5, "{line:?}");
        let c = match f[5] {
            "NaN" => None,
            c => Some(
                c.parse::<f32>()
                    .unwrap_or_else(|e| panic!("confidence in {line:?}: {e}")),
            ),
        };
        f[5] = "*";
        out.push((f.join("\t"), c));
    }
    out
}

/// The attributes api_test printed for photo.jpg with the schema bundle are the Rust SDK's, in
/// the template's order, for MODA_CONSTRAIN_AUTO and MODA_CONSTRAIN_NONE.
fn check_api_test_attributes(stdout: &str) {
    let m = schema_moda();
    let fields = schema_fields(m);
    let photo = fixture("images/photo.jpg");
    let describe =
        |o: GenerationOptions| m.describe(&ImageInput::Path(&photo), &o).expect("describe");
    let auto = describe(GenerationOptions::default());
    let free = describe(GenerationOptions::default().with_constrain(Constrain::None));
    // The fixture covers what the C test checks: template order that is not alphabetical, and
    // free text with a field that has a value and one that has none.
    let mut sorted = fields.clone();
    sorted.sort();
    assert_ne!(fields, sorted, "the template order is the alphabetical one");
    let values: Vec<bool> = fields
        .iter()
        .map(|f| {
            free.attributes
                .as_ref()
                .and_then(|a| a.get(f)?.as_ref())
                .is_some()
        })
        .collect();
    assert_eq!(values, [true, false], "{:?}", free.attributes);
    let mut want = attribute_lines("auto", &fields, &auto);
    want.extend(attribute_lines("none", &fields, &free));
    let got = printed_attribute_lines(stdout);
    let lines = |v: &[AttributeLine]| v.iter().map(|l| l.0.clone()).collect::<Vec<_>>();
    assert_eq!(lines(&got), lines(&want));
    // The confidences to float precision: under valgrind ONNX Runtime takes other kernels.
    for ((line, got), (_, want)) in got.iter().zip(&want) {
        let close = match (got, want) {
            (Some(g), Some(w)) => (g - w).abs() <= 1e-5,
            (g, w) => g.is_none() && w.is_none(),
        };
        assert!(close, "{line}: confidence {got:?}, the SDK's {want:?}");
    }
}

#[test]
fn api_test_passes_under_address_and_undefined_behaviour_sanitizers() {
    let dir = TempDir::new("ffi-asan");
    let exe = dir.path().join("api_test_asan");
    let mut args: Vec<OsString> = [
        "-std=c99",
        "-O1",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.extend(build_tree_flags());
    compile("cc", &[ffi_dir().join("tests/api_test.c")], &args, &exe);
    let out = run_ok(
        command(&exe)
            .args(api_test_args())
            // LeakSanitizer needs no suppressions: what ONNX Runtime and Rust's runtime keep
            // for the whole process stays reachable from globals, which it does not report.
            .env("ASAN_OPTIONS", "detect_leaks=1:halt_on_error=1")
            .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("api_test: all"), "{stdout}");
    check_api_test_attributes(&stdout);
}

#[test]
fn api_test_passes_under_valgrind() {
    let valgrind = Command::new("valgrind").arg("--version").output();
    assert!(
        valgrind.is_ok_and(|o| o.status.success()),
        "valgrind is not installed: install it (Debian: apt-get install valgrind; \
         scripts/setup.sh does it)"
    );
    let dir = TempDir::new("ffi-valgrind");
    let exe = dir.path().join("api_test");
    let mut args = vec![OsString::from("-std=c99"), OsString::from("-O1")];
    args.extend(build_tree_flags());
    compile("cc", &[ffi_dir().join("tests/api_test.c")], &args, &exe);
    let out = run_ok(
        command("valgrind")
            .args([
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
                "--show-leak-kinds=definite",
                "--error-exitcode=99",
                "--quiet",
            ])
            .arg(format!(
                "--suppressions={}",
                ffi_dir().join("tests/valgrind.supp").display()
            ))
            .arg(&exe)
            .args(api_test_args()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("api_test: all"), "{stdout}");
    check_api_test_attributes(&stdout);
}

#[test]
fn eight_c_threads_on_one_model_equal_serial() {
    let dir = TempDir::new("ffi-threads");
    let exe = dir.path().join("threads_test");
    let mut args = vec![OsString::from("-std=c99")];
    args.extend(build_tree_flags());
    compile("cc", &[ffi_dir().join("tests/threads_test.c")], &args, &exe);
    for sessions in ["1", "3"] {
        let out = run_ok(command(&exe).arg(bundle()).arg(sessions).args(images()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("threads_test: ok"), "{stdout}");
    }
    // And the C threads' text is the Rust SDK's.
    let out = run_ok(command(&exe).arg(bundle()).arg("2").args(images()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: String = stdout
        .lines()
        .filter(|l| l.contains('\t'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(lines, expected_text_output(&images()));
}
