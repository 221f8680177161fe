//! `describe` and `embed`: a catalog job from the command line's arguments: the inputs listed
//! (paths or a CSV, a shard of them), the output file resumed or started, the records written
//! as they come (JSON Lines, CSV, text or `.npy`), Ctrl-C honoured, and the summary and exit
//! status.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::bail;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moda_cli::catalog::{
    list_csv, list_paths, run_job, CatalogError, CatalogItem, JobHeader, JobSummary, Listing,
    Record, ResumableOutput, Shard, Task,
};
use moda_cli::csv_out::{self, CsvOutput};
use moda_cli::npy::{is_npy, NpyOutput};
use moda_cli::shard::ShardArg;
use moda_sdk::{GenerationOptions, Moda};

use crate::{
    open_model_with, Format, InputArgs, JobArgs, ModelArgs, EXIT_INTERRUPTED, EXIT_PARTIAL,
};

/// Runs a catalog job (describe or embed) and reports it: the named steps below, in order.
pub(crate) fn job(
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
pub(crate) fn resolve_format(
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
pub(crate) fn check_constrain(opts: &GenerationOptions, moda: &Moda) -> anyhow::Result<()> {
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
pub(crate) fn list_inputs(
    input: &InputArgs,
    job: &JobArgs,
    task: &Task,
) -> anyhow::Result<Listing> {
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
pub(crate) struct Resume {
    output: Option<OutputFile>,
    todo: Vec<CatalogItem>,
    /// Images the output records as failed (they count in the exit status).
    earlier_failures: usize,
}

/// An `--output` file: JSON Lines after a job header, or CSV rows after a header row.
pub(crate) enum OutputFile {
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
pub(crate) fn resume_output(
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
pub(crate) fn stop_on_ctrl_c() -> Arc<AtomicBool> {
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
pub(crate) enum Stdout {
    /// `IMAGE<TAB>RESULT` lines (failures on stderr).
    Text,
    /// JSON Lines records.
    Json,
    /// CSV rows with these schema fields (the header row written before the first).
    Csv(Vec<String>),
}

/// Writes `bytes` to stdout and flushes it.
pub(crate) fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

/// Where a job's records go: `--output` (JSON Lines or CSV), or stdout as text, JSON or CSV;
/// failures also to stderr unless quiet (always in text mode, where stdout has no place for
/// them).
pub(crate) struct RecordSink<'a> {
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
pub(crate) struct JobReport<'a> {
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

pub(crate) fn progress_bar(len: u64, quiet: bool, what: &str) -> ProgressBar {
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
pub(crate) fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The text-mode line of a successful record.
pub(crate) fn text_line(r: &Record) -> Option<String> {
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

/// The shard of this job: `--shard i/n`, `--shard auto` from the scheduler's environment (said
/// on stderr unless quiet), or the whole list.
pub(crate) fn resolve_shard(job: &JobArgs) -> anyhow::Result<Shard> {
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
pub(crate) fn npy_output(
    job: &JobArgs,
    moda: &Moda,
    rows: usize,
) -> anyhow::Result<Option<NpyOutput>> {
    match job.output.as_deref().filter(|p| is_npy(p)) {
        Some(path) => {
            let dim = moda.manifest().model.projection_dim;
            Ok(Some(NpyOutput::create(path, dim, rows)?))
        }
        None => Ok(None),
    }
}

/// Puts a finished `.npy` output (and its images file) in place.
pub(crate) fn finish_npy(npy: NpyOutput, quiet: bool) -> anyhow::Result<()> {
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
