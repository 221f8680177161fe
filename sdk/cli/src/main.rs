//! `moda-sdk`: describes and embeds product images with an exported bundle, merges the
//! outputs of a sharded job, benchmarks a bundle and shows what it holds. Arguments in, calls
//! into the `moda_sdk` library and this crate's `catalog` (jobs), `shard` (`--shard auto`),
//! `merge`, `npy` (`.npy` output) and `bench` (measurements), errors printed with `{:#}` and
//! an exit code out (the scheme `--help` states, shared by `trainer` and `exporter`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moda_cli::bench::{bench, BenchOptions, BenchReport};
use moda_cli::catalog::{
    list_csv, list_paths, run_job, CatalogError, CatalogItem, JobHeader, JobSummary, Listing,
    Record, ResumableOutput, Shard, Task,
};
use moda_cli::csv_out::{self, CsvOutput};
use moda_cli::npy::{is_npy, NpyOutput};
use moda_cli::shard::ShardArg;
use moda_sdk::manifest::{Manifest, TensorInfo, MANIFEST_FILE};
use moda_sdk::{read_manifest, Constrain, GenerationOptions, ImageInput, Moda, Norm, OpenOptions};

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

/// `describe` and `embed`.
/// Runs a catalog job (describe or embed) and reports it: the named steps below, in order.
fn job(
    model: &ModelArgs,
    input: &InputArgs,
    job: &JobArgs,
    task: Task,
    format: Option<Format>,
) -> anyhow::Result<ExitCode> {
    let shard = resolve_shard(job)?;
    if job.output.as_deref().is_some_and(is_npy) && !matches!(task, Task::Embed { .. }) {
        bail!(
            "--output FILE.npy holds embeddings: it goes with `embed` (describe writes JSON Lines \
             or CSV; `describe --embed --output OUT.jsonl`, then `moda-sdk merge -o FILE.npy \
             OUT.jsonl`, gives both)"
        );
    }
    let format = resolve_format(job, format, &task)?;
    if matches!(
        task,
        Task::Describe {
            embedding: Some(_),
            ..
        }
    ) {
        if format == Some(Format::Csv) {
            bail!("--embed writes each embedding into its JSON record: CSV has no place for it");
        }
        if format.is_none() && job.output.is_none() && !job.json {
            bail!(
                "--embed writes each embedding into its JSON record: add --json or --output FILE"
            );
        }
    }
    let listing = list_inputs(input, job, &task)?;
    let items = shard.select(listing.items.clone());
    // The model first: a bundle that cannot be opened leaves no output file behind. An
    // embedding job builds only the encoder's and the projector's sessions.
    let embeddings_only = matches!(task, Task::Embed { .. });
    let moda = open_model_with(model, |o| o.with_embeddings_only(embeddings_only))?;
    if let Task::Describe { options: opts, .. } = &task {
        let max_new = opts
            .max_new_tokens
            .unwrap_or(moda.manifest().generation.max_new_tokens);
        opts.validate(max_new)?;
        check_constrain(opts, &moda)?;
    }
    // `--format csv`: the columns of the bundle's schema fields, in template order.
    let csv_fields = (format == Some(Format::Csv)).then(|| moda.attribute_names());
    let npy = npy_output(job, &moda, items.len())?;
    let resume = match npy {
        // A .npy output is written whole each time (not resumed).
        Some(_) => Resume {
            output: None,
            todo: items.clone(),
            earlier_failures: 0,
        },
        None => resume_output(job, &moda, &task, shard, &items, csv_fields.as_deref())?,
    };
    let stdout_format = match (&csv_fields, format) {
        (Some(fields), _) => Stdout::Csv(fields.clone()),
        (None, Some(Format::Jsonl)) => Stdout::Json,
        _ if job.json => Stdout::Json,
        _ => Stdout::Text,
    };
    if let (None, None, Stdout::Csv(fields)) = (&npy, &resume.output, &stdout_format) {
        write_stdout(&csv_out::encode(&csv_out::columns(fields)).map_err(CatalogError::Emit)?)
            .map_err(CatalogError::Emit)?;
    }
    let stop = stop_on_ctrl_c();
    let bar = progress_bar(resume.todo.len() as u64, job.quiet, task.name());
    let mut sink = RecordSink {
        npy,
        output: resume.output,
        stdout: stdout_format,
        quiet: job.quiet,
        bar: &bar,
    };
    let summary = run_job(
        &moda,
        &resume.todo,
        &task,
        job.batch_size,
        &stop,
        &mut |r| sink.emit(r),
    )?;
    bar.finish_and_clear();
    if let Some(npy) = sink.npy.take().filter(|_| !summary.interrupted) {
        finish_npy(npy, job.quiet)?;
    }
    let report = JobReport {
        task: &task,
        listed: items.len(),
        todo: resume.todo.len(),
        earlier_failures: resume.earlier_failures,
        skipped_rows: listing.skipped.len(),
        resumable: job.output.as_deref().is_some_and(|p| !is_npy(p)),
    };
    let code = report.finish(&summary, job.quiet);
    // Every record is written and flushed, and the process ends next: freeing the sessions'
    // packed weights and unmapping the bundle's files one by one (30-40 ms of a one-image
    // job) is left to the operating system, which reclaims them at once.
    std::mem::forget(moda);
    Ok(code)
}

/// The format a job's records are written in: `--format`, else `--json` (JSON Lines), else
/// what the `--output` file's name says (`.csv`: CSV); `None` when nothing says (text on
/// stdout, JSON Lines in an --output file). An explicit format that contradicts the --output
/// file's extension is an error, and so is CSV for `embed`.
fn resolve_format(
    job: &JobArgs,
    asked: Option<Format>,
    task: &Task,
) -> anyhow::Result<Option<Format>> {
    if job.json && asked == Some(Format::Csv) {
        bail!("--json writes JSON Lines: it cannot go with --format csv");
    }
    let (asked, by) = match asked {
        Some(f) => (Some(f), "--format"),
        None => (job.json.then_some(Format::Jsonl), "--json"),
    };
    let output = job.output.as_deref();
    let named = output.and_then(|p| {
        if csv_out::is_csv(p) {
            Some(Format::Csv)
        } else if csv_out::is_json(p) {
            Some(Format::Jsonl)
        } else {
            None
        }
    });
    if let (Some(a), Some(n), Some(path)) = (asked, named, output) {
        if a != n {
            bail!(
                "{by} asks for {}, but --output {} is named as {}: leave out {by}, or name the \
                 output for what it holds",
                a.name(),
                path.display(),
                n.name()
            );
        }
    }
    let format = asked.or(named);
    if format == Some(Format::Csv) && !matches!(task, Task::Describe { .. }) {
        bail!(
            "`{}` writes JSON Lines (or a NumPy array with --output FILE.npy), not CSV: CSV is \
             for `describe`",
            task.name()
        );
    }
    Ok(format)
}

/// `--constrain schema` needs a bundle whose caption schema lists values for every field:
/// refused before any output is written, rather than at the first image.
fn check_constrain(opts: &GenerationOptions, moda: &Moda) -> anyhow::Result<()> {
    moda.check_constrain(opts.constrain).map_err(|e| {
        anyhow::anyhow!(
            "--constrain {}: {e} (bundle {}); use --constrain auto or none",
            opts.constrain.name(),
            moda.dir().display()
        )
    })
}

/// The images of a job (a CSV column or files and folders), with the skipped rows reported;
/// an empty list is an error that says why.
fn list_inputs(input: &InputArgs, job: &JobArgs, task: &Task) -> anyhow::Result<Listing> {
    let listing = match (&input.csv, &input.image_column) {
        (Some(csv), Some(col)) => list_csv(csv, col, input.root.as_deref())?,
        (Some(_), None) => bail!("--csv needs --image-column"),
        _ => list_paths(&input.images)?,
    };
    for s in &listing.skipped {
        eprintln!("moda-sdk: skipped: {s}");
    }
    if listing.items.is_empty() {
        match &input.csv {
            Some(csv) if listing.skipped.is_empty() => {
                bail!(
                    "{}: no rows after the header: no images to {}",
                    csv.display(),
                    task.name()
                )
            }
            Some(csv) => bail!(
                "{}: no row names an image (see the skipped rows above)",
                csv.display()
            ),
            None => bail!(
                "no images to {}: the directories given hold no files ending in .{}",
                task.name(),
                moda_cli::catalog::IMAGE_EXTENSIONS.join(", .")
            ),
        }
    }
    if job.output.is_some() && listing.items.iter().any(|it| it.is_stdin()) {
        bail!(
            "`-` (an image from standard input) cannot go with --output: a job run again could \
             not tell one piped image from another"
        );
    }
    Ok(listing)
}

/// What is left to do after what `--output` already records.
struct Resume {
    output: Option<OutputFile>,
    todo: Vec<CatalogItem>,
    /// Images the output records as failed (they count in the exit status).
    earlier_failures: usize,
}

/// An `--output` file: JSON Lines after a job header, or CSV rows after a header row.
enum OutputFile {
    Jsonl(ResumableOutput),
    Csv(CsvOutput),
}

impl OutputFile {
    fn append(&mut self, r: &Record) -> std::io::Result<()> {
        match self {
            OutputFile::Jsonl(out) => out.append(r),
            OutputFile::Csv(out) => out.append(r),
        }
    }
}

/// Opens `--output` (if given), skipping the images it already records; `csv_fields` (the
/// schema's fields) for a CSV output.
fn resume_output(
    job: &JobArgs,
    moda: &Moda,
    task: &Task,
    shard: Shard,
    items: &[CatalogItem],
    csv_fields: Option<&[String]>,
) -> anyhow::Result<Resume> {
    let Some(path) = &job.output else {
        return Ok(Resume {
            output: None,
            todo: items.to_vec(),
            earlier_failures: 0,
        });
    };
    let (out, recorded) = match csv_fields {
        Some(fields) => {
            let (out, recorded) = CsvOutput::open(path, fields)?;
            (OutputFile::Csv(out), recorded)
        }
        None => {
            let header = JobHeader::new(moda, task, shard);
            let (out, recorded) = ResumableOutput::open(path, &header)?;
            (OutputFile::Jsonl(out), recorded)
        }
    };
    if recorded.truncated_bytes > 0 && !job.quiet {
        eprintln!(
            "moda-sdk: cut off an incomplete last {} ({} bytes) of {}",
            if csv_fields.is_some() { "row" } else { "line" },
            recorded.truncated_bytes,
            path.display()
        );
    }
    // A CSV's image cell is the record's "image" (a name that is not UTF-8 with U+FFFD in
    // place of its bad bytes: CSV has no "image_hex").
    let id = |it: &CatalogItem| match csv_fields {
        Some(_) => it.key.as_bytes().to_vec(),
        None => it.identity(),
    };
    let earlier_failures = items
        .iter()
        .filter(|it| recorded.images.get(&id(it)) == Some(&true))
        .count();
    let todo: Vec<CatalogItem> = items
        .iter()
        .filter(|it| !recorded.images.contains_key(&id(it)))
        .cloned()
        .collect();
    if !job.quiet && todo.len() < items.len() {
        eprintln!(
            "moda-sdk: {} of {} images already in {}; {} to go",
            items.len() - todo.len(),
            items.len(),
            path.display(),
            todo.len()
        );
    }
    Ok(Resume {
        output: Some(out),
        todo,
        earlier_failures,
    })
}

/// A flag a first Ctrl-C sets (the job finishes the batch in flight, then stops); a second
/// Ctrl-C exits at once.
fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let installed = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(EXIT_INTERRUPTED.into());
        }
    });
    if let Err(e) = installed {
        eprintln!("moda-sdk: warning: cannot catch Ctrl-C: {e}");
    }
    stop
}

/// What a job without `--output` writes on stdout.
enum Stdout {
    /// `IMAGE<TAB>RESULT` lines (failures on stderr).
    Text,
    /// JSON Lines records.
    Json,
    /// CSV rows with these schema fields (the header row written before the first).
    Csv(Vec<String>),
}

/// Writes `bytes` to stdout and flushes it.
fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

/// Where a job's records go: `--output` (JSON Lines or CSV), or stdout as text, JSON or CSV;
/// failures also to stderr unless quiet (always in text mode, where stdout has no place for
/// them).
struct RecordSink<'a> {
    /// `--output FILE.npy` (embed): rows of an array instead of records.
    npy: Option<NpyOutput>,
    output: Option<OutputFile>,
    stdout: Stdout,
    quiet: bool,
    bar: &'a ProgressBar,
}

impl RecordSink<'_> {
    fn emit(&mut self, r: &Record) -> std::io::Result<()> {
        let text_mode =
            self.output.is_none() && self.npy.is_none() && matches!(self.stdout, Stdout::Text);
        if let Record::Error { image, error, .. } = r {
            if text_mode || !self.quiet {
                self.bar
                    .suspend(|| eprintln!("{}\terror: {}", one_line(image), one_line(error)));
            }
        }
        match (&mut self.npy, &mut self.output) {
            (Some(npy), _) => npy.push(r)?,
            (None, Some(out)) => out.append(r)?,
            (None, None) => {
                let bytes = match &self.stdout {
                    Stdout::Json => Some(format!("{}\n", r.to_json()).into_bytes()),
                    Stdout::Text => text_line(r).map(|l| format!("{l}\n").into_bytes()),
                    Stdout::Csv(fields) => Some(csv_out::encode(&csv_out::row(fields, r))?),
                };
                if let Some(bytes) = bytes {
                    self.bar.suspend(|| write_stdout(&bytes))?;
                }
            }
        }
        self.bar.inc(1);
        Ok(())
    }
}

/// What a finished (or stopped) job says on stderr, and its exit status.
struct JobReport<'a> {
    task: &'a Task,
    /// Images in this shard.
    listed: usize,
    /// Images this run set out to do (the rest were recorded earlier).
    todo: usize,
    earlier_failures: usize,
    skipped_rows: usize,
    resumable: bool,
}

impl JobReport<'_> {
    fn finish(&self, summary: &JobSummary, quiet: bool) -> ExitCode {
        if !quiet {
            let mut msg = format!(
                "moda-sdk: {} images: {} {}, {} failed",
                summary.done,
                summary.done - summary.failed,
                match self.task {
                    Task::Describe { .. } => "described",
                    Task::Embed { .. } => "embedded",
                },
                summary.failed
            );
            if summary.cut > 0 {
                msg += &format!(
                    "; {} of the descriptions reached the token limit and may be cut short \
                     (\"finish\": \"length\"; raise --max-new-tokens)",
                    summary.cut
                );
            }
            if self.listed > self.todo {
                msg += &format!(
                    "; {} recorded earlier ({} failed)",
                    self.listed - self.todo,
                    self.earlier_failures
                );
            }
            eprintln!("{msg}");
        }
        if summary.interrupted {
            eprintln!(
                "moda-sdk: interrupted after {} of {} images{}",
                summary.done,
                self.todo,
                if self.resumable {
                    "; run the same command again to go on"
                } else {
                    ""
                }
            );
            return ExitCode::from(EXIT_INTERRUPTED);
        }
        if summary.failed + self.earlier_failures > 0 || self.skipped_rows > 0 {
            ExitCode::from(EXIT_PARTIAL)
        } else {
            ExitCode::SUCCESS
        }
    }
}

fn progress_bar(len: u64, quiet: bool, what: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(&format!(
        "{what} {{wide_bar}} {{pos}}/{{len}} images, {{per_sec}}, ETA {{eta}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr()).with_style(style)
}

/// Text on one line: control characters (newlines, tabs, escapes) become spaces, as text
/// output is one line per image, `IMAGE<TAB>RESULT`, and goes to terminals; `--json` keeps
/// the exact text (and image name).
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The text-mode line of a successful record.
fn text_line(r: &Record) -> Option<String> {
    match r {
        Record::Description {
            image, description, ..
        } => Some(format!("{}\t{}", one_line(image), one_line(description))),
        Record::Embedding {
            image, embedding, ..
        } => Some(format!(
            "{}\t{}",
            one_line(image),
            embedding
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        )),
        Record::Error { .. } => None,
    }
}

fn run_bench(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(dir) = &a.profile {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the profile directory {}", dir.display()))?;
    }
    let moda = open_model_with(&a.model, |o| o.with_profile_dir(a.profile.clone()))?;
    let d = moda.manifest().model;
    // As many tokens as `describe` allows (see `bench`).
    let room = d.max_positions.saturating_sub(d.prefix_len).max(1);
    let opts = BenchOptions {
        max_new_tokens: a
            .max_new_tokens
            .unwrap_or(BenchOptions::default().max_new_tokens.min(room)),
        reps: a.reps,
        batch_size: a.batch_size,
    };
    let report = bench(&moda, &ImageInput::Path(&a.image), &opts)?;
    let mut profiles = Vec::new();
    for (role, file) in moda.end_profiling()? {
        let summary = moda_cli::bench::summarize_profile(&file)
            .map_err(|e| anyhow::anyhow!("reading ONNX Runtime's profile: {e}"))?;
        profiles.push((role, summary));
    }
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        if a.profile.is_some() {
            v["profiles"] = serde_json::to_value(
                profiles
                    .iter()
                    .map(|(role, s)| (role.name(), s))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )?;
        }
        println!("{v}");
    } else {
        print_bench(&report, moda.dir());
        for (role, p) in &profiles {
            print_profile(*role, p);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A graph's profile: every graph's file and per-run totals; the decoder's operator types.
fn print_profile(role: moda_sdk::manifest::Role, p: &moda_cli::bench::ProfileSummary) {
    println!(
        "profile of the {role} graph ({}): {} runs, {:.3} ms per run, of which kernels {:.3} ms \
         and ONNX Runtime between them {:.3} ms",
        p.file,
        p.runs,
        p.run_ms,
        p.kernels_ms,
        (p.run_ms - p.kernels_ms).max(0.0)
    );
    if role == moda_sdk::manifest::Role::Decoder {
        for (op, n, ms) in &p.ops {
            println!("  {op:<28}{n:8.1} nodes {ms:10.3} ms per run");
        }
    }
}

fn print_bench(r: &BenchReport, dir: &Path) {
    let opt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:10.2} ms"));
    println!(
        "{}: bundle {} ({}), {} threads, {} tokens, median of {} runs",
        r.image,
        dir.display(),
        r.quantization,
        r.threads,
        r.tokens,
        r.reps
    );
    println!("  {:<22}{:10.2} ms", "preprocess", r.preprocess_ms);
    println!("  {:<22}{:10.2} ms", "encoder", r.encoder_ms);
    println!("  {:<22}{:10.2} ms", "projector", r.projector_ms);
    println!("  {:<22}{:10.2} ms", "prefill", r.prefill_ms);
    // A step beside its memory floor: the bytes it reads at the bandwidth measured here.
    let floor = |ms: Option<f64>, bytes: Option<u64>, floor: Option<f64>| match (ms, bytes, floor) {
        (Some(ms), Some(b), Some(f)) if f > 0.0 => format!(
            "  (floor {f:.2} ms: {:.0} MB at {:.1} GB/s; {:.2}x)",
            b as f64 / 1e6,
            r.read_gb_per_s,
            ms / f
        ),
        _ => String::new(),
    };
    if let Some(s) = r.early_step {
        println!(
            "  {:<22}{}{}",
            format!("decode step {s}"),
            opt(r.token_ms_early),
            floor(r.token_ms_early, r.step_bytes_early, r.floor_ms_early)
        );
    }
    if let Some(s) = r.late_step.filter(|&s| Some(s) != r.early_step) {
        println!(
            "  {:<22}{}{}",
            format!("decode step {s}"),
            opt(r.token_ms_late),
            floor(r.token_ms_late, r.step_bytes_late, r.floor_ms_late)
        );
    }
    let steps = r
        .decode_tokens_per_s
        .map_or(String::new(), |v| format!("  ({v:.1} steps/s)"));
    println!(
        "  {:<22}{:10.2} ms{steps}",
        "decode, all steps", r.decode_ms
    );
    println!(
        "  {:<22}{:10.2} ms  ({:.1} tokens/s)",
        "describe", r.describe_ms, r.tokens_per_s
    );
    println!(
        "  {:<22}{:10.2} ms  ({:.1} images/s)",
        format!("batch of {}", r.batch),
        r.batch_ms,
        r.images_per_s
    );
    if let Some(c) = &r.constrained {
        println!(
            "  {:<22}{:10.2} ms  ({} tokens, {} decoder runs, {} of them listed; decode {:.2} ms)",
            "describe, schema", c.describe_ms, c.tokens, c.decoder_runs, c.listed_runs, c.decode_ms
        );
    }
    match r.peak_rss_mb {
        Some(m) => println!("  {:<22}{m:10.0} MiB", "peak RSS"),
        None => println!("  {:<22}{:>10}", "peak RSS", "unknown"),
    }
}

fn info(a: &InfoArgs) -> anyhow::Result<ExitCode> {
    let dir = resolve_model(a.model.as_deref())?;
    let manifest = read_manifest(&dir)?;
    let runtime = moda_sdk::runtime::runtime().map(|rt| rt.library().to_path_buf());
    // Only files inside the bundle are looked at (a symbolic link leading out is refused).
    let on_disk = |name: &str| -> Result<u64, String> {
        let p = moda_sdk::manifest::bundle_file(&dir, name)?;
        std::fs::metadata(p)
            .map(|m| m.len())
            .map_err(|_| "missing".to_string())
    };
    if a.json {
        let mut v = serde_json::to_value(&manifest).context("serialising the manifest")?;
        v["bundle"] = serde_json::json!(dir.display().to_string());
        if let Some(files) = v.get_mut("files").and_then(|f| f.as_object_mut()) {
            for (name, f) in files.iter_mut() {
                f["bytes_on_disk"] = serde_json::json!(on_disk(name).ok());
            }
        }
        v["onnxruntime"] = match &runtime {
            Ok(lib) => serde_json::json!({"library": lib.display().to_string(), "error": null}),
            Err(e) => serde_json::json!({"library": null, "error": e.to_string()}),
        };
        println!("{v}");
    } else {
        print_info(&dir, &manifest, &on_disk, &runtime);
    }
    match runtime {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            if !a.json {
                eprintln!("moda-sdk: error: {e}");
            }
            Ok(ExitCode::from(EXIT_FAILED))
        }
    }
}

fn print_info(
    dir: &Path,
    m: &Manifest,
    on_disk: &dyn Fn(&str) -> Result<u64, String>,
    runtime: &Result<PathBuf, moda_sdk::runtime::RuntimeError>,
) {
    let d = &m.model;
    let g = &m.generation;
    let s = &m.special_tokens;
    println!("bundle        {}", dir.display());
    println!(
        "format        {} version {}",
        one_line(&m.format),
        m.format_version
    );
    println!(
        "exporter      {} {}",
        one_line(&m.exporter.name),
        one_line(&m.exporter.version)
    );
    println!("quantization  {}", m.quantization);
    println!(
        "model         image {0}x{0}x{1}, embedding {2}, decoder {3} layers x {4} heads x {5} \
         (hidden {6}, input embeddings {7}), vocabulary {8}, {9} positions, image prefix {10}",
        d.image_size,
        d.num_channels,
        d.projection_dim,
        d.num_layers,
        d.num_heads,
        d.head_dim,
        d.hidden_size,
        d.embed_dim,
        d.vocab_size,
        d.max_positions,
        d.prefix_len
    );
    println!(
        "generation    max_new_tokens {}, num_beams {}, do_sample {}",
        g.max_new_tokens, g.num_beams, g.do_sample
    );
    if !g.stop_strings.is_empty() {
        let stops: Vec<String> = g.stop_strings.iter().map(|t| format!("{t:?}")).collect();
        println!("stop strings  {}", one_line(&stops.join(", ")));
    }
    match &m.schema {
        Some(schema) => {
            println!(
                "schema        {}",
                one_line(&format!("{:?}", schema.template.as_str()))
            );
            for f in &schema.fields {
                println!("  {:<14} {} values", one_line(&f.name), f.values.len());
            }
        }
        None => println!("schema        none (descriptions are text only, without attributes)"),
    }
    println!("tokens        bos {}, eos {}, pad {}", s.bos, s.eos, s.pad);
    println!("tokenizer     {}", one_line(&m.tokenizer));
    println!("graphs");
    let tensor = |t: &TensorInfo| {
        let shape: Vec<String> = t
            .shape
            .iter()
            .map(|x| match x {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        one_line(&format!("{} {} [{}]", t.name, t.dtype, shape.join(", ")))
    };
    for (role, gi) in &m.graphs {
        println!("  {} ({})", role.name(), one_line(&gi.file));
        for t in &gi.inputs {
            println!("    in   {}", tensor(t));
        }
        for t in &gi.outputs {
            println!("    out  {}", tensor(t));
        }
    }
    println!("files");
    let width = m.files.keys().map(String::len).max().unwrap_or(0);
    for (name, f) in &m.files {
        let state = match on_disk(name) {
            Err(e) if e == "missing" => "MISSING".to_string(),
            Err(e) => format!("REFUSED: {}", one_line(&e)),
            Ok(n) if n != f.bytes => format!("SIZE DIFFERS: {n} bytes on disk"),
            Ok(_) => "ok".to_string(),
        };
        println!(
            "  {:<width$}  {:>12} bytes  {state}",
            one_line(name),
            f.bytes
        );
    }
    match runtime {
        Ok(lib) => println!("onnxruntime   {}", lib.display()),
        Err(_) => println!("onnxruntime   cannot be loaded (see below)"),
    }
}

/// The shard of this job: `--shard i/n`, `--shard auto` from the scheduler's environment (said
/// on stderr unless quiet), or the whole list.
fn resolve_shard(job: &JobArgs) -> anyhow::Result<Shard> {
    let env = |k: &str| std::env::var(k).ok();
    let resolved =
        moda_cli::shard::resolve(job.shard, job.shard_count, &env).map_err(anyhow::Error::msg)?;
    Ok(match resolved {
        Some(r) => {
            if job.shard == Some(ShardArg::Auto) && !job.quiet {
                eprintln!("moda-sdk: shard {} (from {})", r.shard, r.source);
            }
            r.shard
        }
        None => Shard::ALL,
    })
}

/// `--output FILE.npy` of an embed job, for at most `rows` rows of the bundle's embedding.
fn npy_output(job: &JobArgs, moda: &Moda, rows: usize) -> anyhow::Result<Option<NpyOutput>> {
    match job.output.as_deref().filter(|p| is_npy(p)) {
        Some(path) => {
            let dim = moda.manifest().model.projection_dim;
            Ok(Some(NpyOutput::create(path, dim, rows)?))
        }
        None => Ok(None),
    }
}

/// Puts a finished `.npy` output (and its images file) in place.
fn finish_npy(npy: NpyOutput, quiet: bool) -> anyhow::Result<()> {
    let (rows, path, images) = (
        npy.rows(),
        npy.path().to_path_buf(),
        npy.images_path().to_path_buf(),
    );
    npy.finish()?;
    if !quiet {
        eprintln!(
            "moda-sdk: wrote {rows} embeddings to {} (their images in {})",
            path.display(),
            images.display()
        );
    }
    Ok(())
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

fn merge(a: &MergeArgs) -> anyhow::Result<ExitCode> {
    if csv_out::is_csv(&a.output) {
        bail!(
            "merge writes JSON Lines (or a NumPy array for OUT.npy), not CSV: {}",
            moda_cli::merge::CSV_REFUSED
        );
    }
    let listing = match (&a.csv, &a.image_column) {
        (Some(csv), Some(col)) => Some(list_csv(csv, col, a.root.as_deref())?),
        _ if !a.images.is_empty() => Some(list_paths(&a.images)?),
        _ => None,
    };
    let skipped = listing.as_ref().map_or(0, |l| l.skipped.len());
    if !a.quiet {
        for s in listing.iter().flat_map(|l| &l.skipped) {
            eprintln!("moda-sdk: skipped: {s}");
        }
    }
    let items = listing.as_ref().map(|l| l.items.as_slice());
    match moda_cli::merge::merge(&a.output, &a.inputs, items) {
        Ok(r) => {
            if !a.quiet {
                eprintln!(
                    "moda-sdk: merged {} shards of a `{}` job into {}: {} images, {} failed{}",
                    r.shards,
                    r.task,
                    a.output.display(),
                    r.records,
                    r.failed,
                    if items.is_some() {
                        ", each listed image once"
                    } else {
                        ""
                    }
                );
            }
            Ok(if r.failed > 0 || skipped > 0 {
                ExitCode::from(EXIT_PARTIAL)
            } else {
                ExitCode::SUCCESS
            })
        }
        Err(moda_cli::merge::MergeError::Refused(problems)) => {
            eprintln!("moda-sdk: merge refused, nothing written:");
            for p in problems {
                eprintln!("  {p}");
            }
            Ok(ExitCode::from(EXIT_FAILED))
        }
        Err(e) => Err(e.into()),
    }
}
