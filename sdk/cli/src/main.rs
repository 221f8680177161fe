//! `moda-sdk`: describes and embeds product images with an exported bundle, merges the
//! outputs of a sharded job, benchmarks a bundle and shows what it holds. Arguments in, calls
//! into the `moda_sdk` library and this crate's `catalog` (jobs), `shard` (`--shard auto`),
//! `merge`, `npy` (`.npy` output) and `bench` (measurements), errors printed with `{:#}` and
//! an exit code out (the scheme `--help` states, shared by `trainer` and `exporter`). This file
//! holds the arguments (every `--help`) and the dispatch; each command's work is in
//! `commands/` (`job` for describe and embed, `bench`, `info`, `merge`).

mod commands;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::bail;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};
use moda_cli::bench::BenchOptions;
use moda_cli::catalog::{CatalogError, Task};
use moda_cli::shard::ShardArg;
use moda_sdk::manifest::MANIFEST_FILE;
use moda_sdk::{Constrain, GenerationOptions, Moda, Norm, OpenOptions};

use commands::bench::run_bench;
use commands::info::info;
use commands::job::job;
use commands::merge::merge;

/// The exit status, as `--help` states it.
macro_rules! exit_codes {
    () => {
        "\
Exit status:
  0    success
  1    the job ran, but at least one image failed (its record says why), or a CSV row
       named no image
  2    usage error, or the model bundle, ONNX Runtime, an input list or an output file
       could not be used
  130  stopped by Ctrl-C (what was written is kept; run the same command again to go on)"
    };
}

const EXIT_CODES: &str = exit_codes!();

/// The job finished, but some images failed or some CSV rows named none.
const EXIT_PARTIAL: u8 = 1;
/// The command failed (usage, bundle, ONNX Runtime, input list or output file).
const EXIT_FAILED: u8 = 2;
/// Stopped by Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;

const AFTER_JOB: &str = concat!(
    "\
Output:
  text (default)  one line per image on stdout, IMAGE<TAB>RESULT; a failed image is written
                  to stderr instead, as IMAGE<TAB>error: MESSAGE
  --json          one JSON object per image on stdout, failures included:
                    describe: {\"image\", \"description\", \"attributes\" (with the bundle's
                              caption schema), \"finish\", \"token_ids\", \"logprobs\",
                              \"timings_ms\", \"embedding\" (with --embed)}
                    embed:    {\"image\", \"embedding\"}
                    failure:  {\"image\", \"error\"}
  --output FILE   the same JSON records, appended to FILE (a regular file) and flushed one
                  by one, after a first line {\"moda_job\": ...} naming the task, shard,
                  options and model. Run the same command again and it skips the images FILE
                  already records (failures included: delete their lines to retry them); a
                  half-written last line left by a crash is cut off first. The file is locked
                  while a job writes it; a job with another shard, options or model is
                  refused, and so is a file of records without the header. Give each
                  --shard its own FILE; `-` (standard input) cannot go with --output.
  --output FILE.npy  embed only: the embeddings as a NumPy float32 array (n, d), and beside
                  it FILE.images.jsonl: line i is {\"image\", \"row\": i} for row i; after
                  the rows, one {\"image\", \"error\"} per failed image (which has no row).
                  Written to temporary files and renamed into place when the job ends; not
                  resumable (a stopped job writes nothing). With --shard, give each shard its
                  own FILE.npy, or write JSON Lines and `moda-sdk merge -o FILE.npy` them.
  --format csv    describe only: one CSV row per image instead of a JSON record, after a
                  header row: image, description, finish, then <Field> and
                  <Field>_confidence for each field of the bundle's caption schema, in
                  template order (empty where the text yields no value; no such columns for
                  a bundle without a schema), then error (empty for an image described).
                  A text cell that begins with =, +, -, @, a tab, a carriage return or '
                  gets a ' before it, so that a spreadsheet shows it instead of running it
                  as a formula (drop one leading ' from such cells to read them back).
                  To stdout, or to --output FILE (chosen by a FILE ending in .csv): rows
                  appended whole and flushed one by one; run again, it skips the images
                  FILE's image column names. A CSV has no
                  job header: only its columns are checked (another bundle's are refused),
                  not the shard or the options, so give each job and each --shard its own
                  FILE; `moda-sdk merge` takes JSON Lines only.

\"finish\" says why a description ended: end_of_text (the model finished it), stop_string,
length (--max-new-tokens cut it: the text may stop mid-caption and its later fields be null),
or stopped. A job counts the descriptions cut at the limit in its summary on stderr.

\"image\" is the path as given (or found under a directory given), or the CSV cell as written.
A file name that is not UTF-8 shows there with U+FFFD for its bad bytes; its exact bytes are
in \"image_hex\" (hexadecimal).

",
    exit_codes!()
);

#[derive(Parser)]
#[command(
    name = "moda-sdk",
    version,
    about = "Describe and embed fashion product images with a MODA bundle (ONNX Runtime, CPU)",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a description of each image.
    #[command(after_help = AFTER_JOB)]
    Describe(DescribeArgs),
    /// Write the image embedding (the encoder's output) of each image.
    #[command(after_help = AFTER_JOB)]
    Embed(EmbedArgs),
    /// Time each stage of describing one image, and a batch of copies of it.
    #[command(after_help = EXIT_CODES)]
    Bench(BenchArgs),
    /// Show what a bundle's manifest says and which ONNX Runtime library would be loaded.
    #[command(after_help = EXIT_CODES)]
    Info(InfoArgs),
    /// Join the --output files of the shards of one job into one, checking that they are
    /// shards 0..N-1 of the same job and hold each image exactly once.
    #[command(after_help = AFTER_MERGE)]
    Merge(MergeArgs),
}

#[derive(Args)]
#[command(next_help_heading = "Model")]
struct ModelArgs {
    /// The bundle directory (written by `exporter onnx`). Default: $MODA_MODEL, else
    /// demo/bundle in the current directory (where `make demo` writes it).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// ONNX Runtime threads inside one graph run. Default: the cores available, at most 8;
    /// more than the cores available are capped at that number.
    #[arg(long, value_name = "N", value_parser = positive)]
    threads: Option<usize>,
    /// Check every bundle file's SHA-256 against the manifest before running (sizes are
    /// always checked).
    #[arg(long)]
    verify_checksums: bool,
}

#[derive(Args)]
#[command(next_help_heading = "Input")]
struct InputArgs {
    /// Image files, or directories searched recursively for *.jpg, *.jpeg, *.png, *.webp,
    /// *.gif, *.bmp, *.tif, *.tiff (any letter case; sorted by path); `-` reads one image
    /// from standard input. Only regular files are read (a FIFO or a device is that image's
    /// error).
    #[arg(
        value_name = "IMAGE",
        required_unless_present = "csv",
        conflicts_with = "csv"
    )]
    images: Vec<PathBuf>,
    /// Take the images from a CSV catalog (with a header row) instead, in row order; `-`
    /// reads the CSV from standard input.
    #[arg(long, value_name = "FILE", requires = "image_column")]
    csv: Option<PathBuf>,
    /// With --csv: the column holding the image paths.
    #[arg(long, value_name = "COL", requires = "csv")]
    image_column: Option<String>,
    /// With --csv: the directory relative image paths start from. Default: the CSV's
    /// directory.
    #[arg(long, value_name = "DIR", requires = "csv")]
    root: Option<PathBuf>,
}

#[derive(Args)]
#[command(next_help_heading = "Job")]
struct JobArgs {
    /// Write one JSON object per image to stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Append the records to FILE instead of writing to stdout (JSON Lines; CSV rows for
    /// describe --format csv or a FILE ending in .csv), skipping the images it already records
    /// (a job can be stopped and run again).
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Run only shard I of N (0 <= I < N): the images at positions p with p % N == I, so
    /// that N processes given the same inputs split them. `auto` takes I and N from a job
    /// scheduler: a Slurm job array (SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN, of
    /// SLURM_ARRAY_TASK_COUNT) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, of
    /// --shard-count or $MODA_SHARD_COUNT); missing or inconsistent values are an error.
    /// `moda-sdk merge` joins the shards' outputs.
    #[arg(long, value_name = "I/N|auto")]
    shard: Option<ShardArg>,
    /// With --shard auto: how many shards (a Kubernetes Indexed Job's spec.completions;
    /// default $MODA_SHARD_COUNT). Under Slurm it must equal the array's task count.
    #[arg(long, value_name = "N", value_parser = positive)]
    shard_count: Option<usize>,
    /// Images run through the model together (at most 1024). A batch of 8 describes 1.5 to
    /// 2.3 times as many images per second as one at a time (2 cores, fp32 to int4); 1 gives
    /// each image its own decoder runs (the fewest with a caption schema) and the lowest
    /// latency.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = batch_size)]
    batch_size: usize,
    /// No progress bar, no summary, no failure messages on stderr (text mode still writes
    /// failures there).
    #[arg(long, short)]
    quiet: bool,
}

/// Generation options, named as in `transformers`' `generate`.
#[derive(Args)]
#[command(next_help_heading = "Generation (as in transformers' generate)")]
struct GenArgs {
    /// Most tokens generated, the final </s> included [default: the bundle's].
    #[arg(long, value_name = "N")]
    max_new_tokens: Option<usize>,
    /// </s> is forbidden until this many tokens are generated [default: 0].
    #[arg(long, value_name = "N")]
    min_new_tokens: Option<usize>,
    /// Beam search with N beams; 1 is greedy search (or sampling) [default: 1].
    #[arg(long, value_name = "N")]
    num_beams: Option<usize>,
    /// Sample from the distribution instead of taking the most likely token.
    #[arg(long)]
    do_sample: bool,
    /// Sampling temperature, > 0 [default: 1.0].
    #[arg(long, value_name = "T")]
    temperature: Option<f32>,
    /// Sample among the K most likely tokens; 0 turns it off [default: 50].
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Sample among the fewest tokens whose probabilities add up to P, in (0, 1]
    /// [default: 1.0].
    #[arg(long, value_name = "P")]
    top_p: Option<f32>,
    /// Seed of the sampler; each image gets its own generator with this seed [default: 0].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Penalty on tokens already generated, > 0; 1.0 is none [default: 1.0].
    #[arg(long, value_name = "X")]
    repetition_penalty: Option<f32>,
    /// Never repeat an n-gram of this size; 0 turns it off [default: 0].
    #[arg(long, value_name = "N")]
    no_repeat_ngram_size: Option<usize>,
    /// Beam search: hypotheses score sum(logprobs) / length^X [default: 1.0].
    #[arg(long, value_name = "X")]
    length_penalty: Option<f32>,
    /// Stop a description once its text holds TEXT, and end it before TEXT (repeatable, as
    /// transformers' stop_strings) [default: the bundle's generation.stop_strings].
    #[arg(long = "stop-string", value_name = "TEXT")]
    stop_strings: Vec<String>,
    /// Whether the description must fit the bundle's caption schema. auto: constrained to the
    /// schema when the bundle has one (the description then always fits its template, with
    /// values the catalog knows), free text otherwise; schema: constrained, and an error for
    /// a bundle without a schema; none: free text, the only way to get a value the catalog
    /// never had.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "auto",
        value_parser = PossibleValuesParser::new(["auto", "schema", "none"])
            .try_map(|s| s.parse::<Constrain>())
    )]
    constrain: Constrain,
}

impl GenArgs {
    fn options(&self) -> GenerationOptions {
        let d = GenerationOptions::default();
        GenerationOptions::default()
            .with_max_new_tokens(self.max_new_tokens)
            .with_min_new_tokens(self.min_new_tokens.unwrap_or(d.min_new_tokens))
            .with_num_beams(self.num_beams.unwrap_or(d.num_beams))
            .with_do_sample(self.do_sample)
            .with_temperature(self.temperature.unwrap_or(d.temperature))
            .with_top_k(self.top_k.unwrap_or(d.top_k))
            .with_top_p(self.top_p.unwrap_or(d.top_p))
            .with_seed(self.seed.unwrap_or(d.seed))
            .with_repetition_penalty(self.repetition_penalty.unwrap_or(d.repetition_penalty))
            .with_no_repeat_ngram_size(self.no_repeat_ngram_size.unwrap_or(d.no_repeat_ngram_size))
            .with_length_penalty(self.length_penalty.unwrap_or(d.length_penalty))
            .with_stop_strings((!self.stop_strings.is_empty()).then(|| self.stop_strings.clone()))
            .with_constrain(self.constrain)
    }
}

#[derive(Args)]
struct DescribeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    input: InputArgs,
    #[command(flatten)]
    job: JobArgs,
    /// The records' format: jsonl (JSON Lines, as --json) or csv (one row per image: image,
    /// description, each field of the bundle's caption schema and its confidence, error; see
    /// below). Default: csv for an --output ending in .csv, else JSON Lines (text on stdout
    /// without --json); a --format that the --output's extension contradicts is an error.
    #[arg(long, value_enum, value_name = "FORMAT", help_heading = "Job")]
    format: Option<Format>,
    /// Also write each image's embedding ("embedding" in its JSON record), the one the
    /// encoder computed for its description: one pass over the images for both, where
    /// `describe` then `embed` runs the encoder twice. JSON Lines only (--json, or an
    /// --output that is not .csv).
    #[arg(long, help_heading = "Embedding")]
    embed: bool,
    /// With --embed: scale each embedding to unit length (cosine similarity is then a dot
    /// product).
    #[arg(long, requires = "embed", help_heading = "Embedding")]
    normalize: bool,
    #[command(flatten)]
    gen: GenArgs,
}

/// `describe --format`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// JSON Lines: one JSON record per image.
    Jsonl,
    /// CSV: a header row, then one row per image.
    Csv,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        }
    }
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    input: InputArgs,
    #[command(flatten)]
    job: JobArgs,
    /// Scale each embedding to unit length (cosine similarity is then a dot product).
    #[arg(long, help_heading = "Embedding")]
    normalize: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The image to describe.
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
    /// Tokens generated per description (exactly: </s> cannot end it early) [default: 64, or
    /// as many as the decoder's positions hold after the image, as in `describe`].
    #[arg(long, visible_alias = "tokens", value_name = "N", value_parser = positive)]
    max_new_tokens: Option<usize>,
    /// Measured runs after one warm-up (at most 10000); each figure is the median.
    #[arg(long, value_name = "R", default_value_t = BenchOptions::default().reps, value_parser = reps)]
    reps: usize,
    /// Copies of the image described as one batch, for images/s (at most 1024).
    #[arg(
        long,
        visible_alias = "batch",
        value_name = "N",
        default_value_t = BenchOptions::default().batch_size,
        value_parser = batch_size
    )]
    batch_size: usize,
    /// Also record ONNX Runtime's per-operator profile of every graph run (which slows each
    /// run a little) into JSON files in DIR (created if missing; open them in a trace viewer
    /// such as chrome://tracing or Perfetto), and report what each operator type of the
    /// decoder costs per run and how much of a run no operator accounts for.
    #[arg(long, value_name = "DIR")]
    profile: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InfoArgs {
    /// The bundle directory. Default: $MODA_MODEL, else demo/bundle in the current directory.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Print one JSON object: the manifest, with each file's size on disk and the ONNX
    /// Runtime library.
    #[arg(long)]
    json: bool,
}

fn reps(s: &str) -> Result<usize, String> {
    match positive(s)? {
        n if n > moda_cli::bench::MAX_REPS => {
            Err(format!("at most {} runs", moda_cli::bench::MAX_REPS))
        }
        n => Ok(n),
    }
}

fn batch_size(s: &str) -> Result<usize, String> {
    match positive(s)? {
        n if n > moda_sdk::model::MAX_BATCH => Err(format!(
            "at most {} images go through the model at once",
            moda_sdk::model::MAX_BATCH
        )),
        n => Ok(n),
    }
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A command-line user's Python environment is a fair place to find ONNX Runtime (the
    // library itself does not look there unless asked).
    moda_sdk::runtime::allow_python_search();
    let result = match cli.command {
        Command::Describe(a) => {
            let task = Task::Describe {
                options: a.gen.options(),
                embedding: a.embed.then(|| Norm::unit_if(a.normalize)),
            };
            job(&a.model, &a.input, &a.job, task, a.format)
        }
        Command::Embed(a) => job(
            &a.model,
            &a.input,
            &a.job,
            Task::Embed {
                normalize: a.normalize,
            },
            None,
        ),
        Command::Bench(a) => run_bench(&a),
        Command::Info(a) => info(&a),
        Command::Merge(a) => merge(&a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if is_broken_pipe(&e) {
                // The reader of stdout went away (`| head`): not an error of ours.
                return ExitCode::SUCCESS;
            }
            eprintln!("moda-sdk: error: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<CatalogError>(),
        Some(CatalogError::Emit(io)) if io.kind() == std::io::ErrorKind::BrokenPipe
    )
}

/// The bundle to use: `--model`, `$MODA_MODEL`, or `demo/bundle` in the current directory (where
/// `make demo` writes it). No path of the machine this was built on is compiled in.
fn resolve_model(arg: Option<&Path>) -> anyhow::Result<PathBuf> {
    let make = "make one with `make demo` (in the MODA repository; writes demo/bundle) or \
                `exporter onnx --checkpoint CKPT --out DIR`";
    let (dir, from) = if let Some(p) = arg {
        (p.to_path_buf(), "--model")
    } else if let Some(p) = std::env::var_os("MODA_MODEL").filter(|p| !p.is_empty()) {
        (PathBuf::from(p), "$MODA_MODEL")
    } else {
        let demo = Path::new("demo").join("bundle");
        if demo.join(MANIFEST_FILE).is_file() {
            return Ok(demo);
        }
        bail!(
            "no model bundle: pass --model DIR or set MODA_MODEL (there is no {} in the current \
             directory); {make}",
            demo.display()
        );
    };
    if !dir.is_dir() {
        bail!(
            "model bundle {} (from {from}) does not exist; {make}",
            dir.display()
        );
    }
    Ok(dir)
}

/// Opens the bundle of `args` with the options they give, then `more`.
fn open_model_with(
    args: &ModelArgs,
    more: impl FnOnce(OpenOptions) -> OpenOptions,
) -> anyhow::Result<Moda> {
    let dir = resolve_model(args.model.as_deref())?;
    let opts = more(
        OpenOptions::default()
            .with_intra_threads(args.threads)
            .with_verify_checksums(args.verify_checksums),
    );
    let moda = Moda::open(&dir, &opts)?;
    if let Some(asked) = args.threads.filter(|&n| n > moda.intra_threads()) {
        eprintln!(
            "moda-sdk: --threads {asked} is more than the {} cores this process may use; \
             using {}",
            moda_sdk::model::available_cores(),
            moda.intra_threads()
        );
    }
    Ok(moda)
}

const AFTER_MERGE: &str = "\
Checks, before writing anything:
  - every SHARD_OUTPUT starts with its job header (a CSV output has none: CSV is refused), and
    the headers are those of one job (task, options, model) but for the shard; the shards
    are 0/N .. N-1/N, each once
  - no file ends in an incomplete line, and no job is still writing one (locked)
  - no image is recorded twice
  - given the job's inputs (--csv/--image-column/--root, or --image): every image listed is
    recorded, in the shard its position puts it in, and nothing else is (missing and extra
    images are listed)
Any problem refuses the merge (exit status 2) and writes nothing. Otherwise OUT gets the
records as they were, in catalog order (given the inputs; else the first record of each shard,
then the second of each, ...), after the header {\"moda_job\": {..., \"shard\": \"0/1\",
\"merged_shards\": N}}: the output of the whole job, which `--output OUT` without --shard
resumes. It is written to a temporary file and renamed into place. OUT ending in .npy (embed
or describe --embed shards, or one unsharded output): the embeddings as a NumPy array and
OUT's .images.jsonl beside it, as `embed --output FILE.npy` writes them.

Exit status:
  0    merged
  1    merged, but the records include failed images (or a CSV row named no image)
  2    refused (see the problems listed), or a file could not be read or written
";

/// `moda-sdk merge`.
#[derive(Args)]
struct MergeArgs {
    /// The --output files of a sharded job's `describe` or `embed` runs (any order).
    #[arg(value_name = "SHARD_OUTPUT", required = true)]
    inputs: Vec<PathBuf>,
    /// The merged file (an option, never the first file of a glob, so that no shard output
    /// is overwritten by mistake). Ending in .npy: the embeddings as a NumPy array.
    #[arg(long, short, value_name = "OUT")]
    output: PathBuf,
    /// Check against the job's images: a file or directory, as given to the job (repeatable,
    /// in the job's order).
    #[arg(
        long = "image",
        value_name = "PATH",
        conflicts_with = "csv",
        help_heading = "Input"
    )]
    images: Vec<PathBuf>,
    /// Check against the job's CSV catalog (as given to the job).
    #[arg(
        long,
        value_name = "FILE",
        requires = "image_column",
        help_heading = "Input"
    )]
    csv: Option<PathBuf>,
    /// With --csv: the column holding the image paths.
    #[arg(long, value_name = "COL", requires = "csv", help_heading = "Input")]
    image_column: Option<String>,
    /// With --csv: the directory relative image paths start from, as given to the job.
    #[arg(long, value_name = "DIR", requires = "csv", help_heading = "Input")]
    root: Option<PathBuf>,
    /// No summary on stderr (problems are still listed).
    #[arg(long, short)]
    quiet: bool,
}
