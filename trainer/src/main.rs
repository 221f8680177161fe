//! `trainer`: writes synthetic catalogs, fits MODA's projector and OPT decoder in candle, and
//! evaluates checkpoints. Arguments in, a library call, errors printed with their causes
//! (`trainer::error::report`), and the exit status of [`EXIT_STATUS_HELP`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use moda_models::hub::{DEFAULT_DECODER, DEFAULT_ENCODER};
use trainer::data::DataArgs;
use trainer::embed_cache::default_cache_dir;
use trainer::eval::{EvalOptions, EvalSplit};
use trainer::fit::{FitConfig, FitEnd, FitOptions};
use trainer::preset::Preset;

/// The exit status of a command that failed: bad flags or input, missing files, a runtime
/// error (clap's usage errors exit with it too).
const EXIT_FAILED: u8 = 2;
/// The exit status of a command interrupted by Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;

/// The exit statuses, shown by `trainer --help`; the scheme of `moda-sdk` and `exporter` too.
const EXIT_STATUS_HELP: &str = "\
Exit status:
  0    success
  1    not used by the trainer (moda-sdk and exporter: the command finished but some inputs
       failed); catalog rows that cannot be used are skipped and reported, not a failure
  2    the command failed: bad flags or input, missing files, a runtime error
  130  interrupted by Ctrl-C (`fit` first writes a resumable checkpoint, OUT/last; a second
       Ctrl-C quits at once)";

/// `trainer eval`'s generation length limit, the default of the bundles' generation.
const DEFAULT_MAX_NEW_TOKENS: usize = 32;

/// `trainer eval`'s predictions CSV, in the current directory: beside the checkpoint rather
/// than in it, so that the checkpoint stays as `trainer fit` wrote it.
const DEFAULT_PREDICTIONS: &str = "predictions.csv";

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "Train and evaluate MODA",
    after_help = EXIT_STATUS_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a synthetic catalog in the Kaggle fashion-images layout.
    Synth(trainer::synth::SynthArgs),
    /// Fine-tune the projector and OPT (defaults: the original recipe).
    Fit(Box<FitArgs>),
    /// Describe held-out images with a checkpoint and score the descriptions.
    Eval(EvalArgs),
}

#[derive(clap::Args)]
struct FitArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Output directory: checkpoints best/ and last/, metrics.jsonl, loss.png.
    #[arg(long, value_name = "DIR", required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Settings for a purpose; every other flag overrides them.
    #[arg(long, value_enum, value_name = "NAME")]
    preset: Option<Preset>,
    /// Epochs [recipe: 20; tiny preset: 270 for 1,200 training samples, fewer for larger
    /// catalogs, the same number of samples in all]. With --resume: a new length for the run
    /// (without it, the run ends where it was set to end).
    #[arg(long)]
    epochs: Option<usize>,
    /// Micro-batch size [recipe: 32].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step [recipe: 8].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// AdamW learning rate [recipe: 1e-3].
    #[arg(long)]
    lr: Option<f64>,
    /// AdamW weight decay [0.01; tiny preset: 0.1].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Learning-rate schedule: `step` (StepLR per epoch) [recipe] or `cosine` (linear warm-up,
    /// then cosine decay to 0 at the last epoch, set every optimizer step) [tiny preset].
    #[arg(long, value_enum)]
    lr_schedule: Option<trainer::fit::LrSchedule>,
    /// Warm-up epochs of the cosine schedule (fractions allowed) [0; tiny preset: 5].
    #[arg(long)]
    warmup_epochs: Option<f64>,
    /// StepLR period in epochs [recipe: 2].
    #[arg(long)]
    lr_step_epochs: Option<usize>,
    /// StepLR factor [recipe: 0.8].
    #[arg(long)]
    lr_gamma: Option<f64>,
    /// Clip the gradient norm to this; 0 turns clipping off [1.0].
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Fraction held out for validation [recipe: 0.2].
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Seed of the split, data order, new weights and dropout [42].
    #[arg(long)]
    seed: Option<u64>,
    /// Stop after this many optimizer steps in total.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Train the image encoder too (frozen by default, trained by `--preset tiny`; embeddings
    /// are then not cached).
    #[arg(long, conflicts_with = "freeze_encoder")]
    train_encoder: bool,
    /// Keep the image encoder frozen (embeddings cached), also with `--preset tiny`.
    #[arg(long)]
    freeze_encoder: bool,
    /// Decoder dropout (default: 0.1 with `--preset tiny`, else the decoder config's, 0.1 for
    /// OPT-125m).
    #[arg(long)]
    dropout: Option<f64>,
    /// Augment the training images when the encoder trains: random left-right flips and shifts
    /// of up to 1/16 of the side (on with `--preset tiny`).
    #[arg(long, conflicts_with = "no_augment")]
    augment: bool,
    /// No image augmentation, also with `--preset tiny`.
    #[arg(long)]
    no_augment: bool,
    /// With augmentation: also rotate half the images by up to DEG degrees either way
    /// (resampled bilinearly) [0; 10 with --preset tiny].
    #[arg(long, value_name = "DEG")]
    augment_rotate: Option<f64>,
    /// With augmentation: also scale half the images by a factor within 1 +- F (the same half
    /// as `--augment-rotate`) [0; 0.2 with --preset tiny].
    #[arg(long, value_name = "F")]
    augment_scale: Option<f64>,
    /// Repeat factor sampling: group the training samples by their values in these catalog
    /// columns (comma-separated, e.g. ProductType,Usage) and draw the rare groups more often
    /// and the common ones less, as many samples per epoch as without it. Needs
    /// --repeat-threshold.
    #[arg(long, value_name = "COLUMNS", value_delimiter = ',')]
    repeat_rare: Option<Vec<String>>,
    /// With --repeat-rare: a group that makes up a fraction f below T of the training samples
    /// is drawn sqrt(T / f) times as often as a group at T or above.
    #[arg(long, value_name = "T")]
    repeat_threshold: Option<f64>,
    /// Split each micro-batch into N shards trained on N threads (CPU; the result depends on N,
    /// not on the cores) [1; tiny preset: 2].
    #[arg(long, value_name = "N")]
    data_parallel: Option<usize>,
    /// Image encoder: local directory or hub id (not read by `--preset tiny`: giving another
    /// is an error).
    #[arg(long, value_name = "DIR|ID", default_value = DEFAULT_ENCODER)]
    encoder: String,
    /// Decoder: local directory or hub id (not read by `--preset tiny`: giving another is an
    /// error).
    #[arg(long, value_name = "DIR|ID", default_value = DEFAULT_DECODER)]
    decoder: String,
    /// cpu, or cuda / cuda:N (built with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Continue the run of this checkpoint (e.g. OUT/last) exactly where it stopped, with its
    /// recorded settings (only --epochs and --max-steps apply).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Embedding cache directory [$MODA_CACHE_DIR/embeddings or ~/.cache/moda/embeddings].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// The checkpoint directory (e.g. OUT/best).
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// val: the samples held out while training (recorded in the checkpoint); all: every one.
    #[arg(long, value_enum, default_value = "val")]
    split: EvalSplit,
    /// Print the scores as JSON.
    #[arg(long)]
    json: bool,
    /// Where to write every description, a CSV (replaced if it exists) [predictions.csv in
    /// the current directory: never inside the checkpoint unless asked for].
    #[arg(long, value_name = "FILE")]
    predictions: Option<PathBuf>,
    /// Generation length limit.
    #[arg(long, default_value_t = DEFAULT_MAX_NEW_TOKENS)]
    max_new_tokens: usize,
    /// Beams for beam search (1 to 64); 1 is greedy search.
    #[arg(long, default_value_t = 1)]
    num_beams: usize,
    /// auto: constrain decoding to the checkpoint's caption schema (its template, and in
    /// each field only values seen in training) when it records one; schema: require it;
    /// none: free text.
    #[arg(long, default_value = "auto", value_name = "auto|schema|none")]
    constrain: moda_models::generate::Constrain,
    /// Images per generation batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// cpu, or cuda / cuda:N (built with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Embedding cache directory.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn fit(a: FitArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = match a.preset {
        None => FitConfig::default(),
        Some(Preset::Tiny) => FitConfig::tiny(),
    };
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f { cfg.$f = v; } )* };
    }
    set!(
        epochs,
        batch_size,
        grad_accum,
        lr,
        weight_decay,
        lr_step_epochs,
        lr_gamma
    );
    set!(
        max_grad_norm,
        val_fraction,
        seed,
        lr_schedule,
        warmup_epochs,
        data_parallel
    );
    set!(augment_rotate, augment_scale, repeat_threshold);
    if let Some(columns) = a.repeat_rare {
        cfg.repeat_columns = columns;
    }
    if a.epochs.is_some() {
        // Exactly the epochs asked for, not a preset's budget.
        cfg.sample_budget = None;
    }
    cfg.max_steps = a.max_steps;
    cfg.dropout = a.dropout.or(cfg.dropout);
    if a.train_encoder {
        cfg.train_encoder = true;
    }
    if a.freeze_encoder {
        cfg.train_encoder = false;
    }
    if a.augment {
        cfg.augment = true;
    }
    if a.no_augment {
        cfg.augment = false;
        // The preset's rotation and scale go with its augmentation; asked for, they are an
        // error below (they act on augmented images only).
        if a.augment_rotate.is_none() {
            cfg.augment_rotate = 0.0;
        }
        if a.augment_scale.is_none() {
            cfg.augment_scale = 0.0;
        }
    }
    cfg.encoder = a.encoder;
    cfg.decoder = a.decoder;
    let out = match (&a.out, &a.resume) {
        (Some(o), _) => o.clone(),
        (None, Some(r)) => r
            .parent()
            .map(PathBuf::from)
            .context("--resume DIR has no parent directory; pass --out")?,
        (None, None) => bail!("--out is required"),
    };
    // Sharded micro-batches (--data-parallel N) run on N threads; candle's own threading inside
    // each small op then only adds waiting (measured: docs/PERFORMANCE.md). So split the cores
    // between the shards, unless RAYON_NUM_THREADS is set. This runs before
    // any other thread exists (the Ctrl-C handler's is started below).
    let shards = match &a.resume {
        Some(r) => trainer::fit::read_state(&moda_models::checkpoint::resolve_dir(r))
            .map_or(cfg.data_parallel, |s| s.config.data_parallel),
        None => cfg.data_parallel,
    };
    if shards > 1 && a.device == "cpu" && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", (cores / shards).max(1).to_string());
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                // Second Ctrl-C: leave now.
                std::process::exit(EXIT_INTERRUPTED.into());
            }
            eprintln!("\nCtrl-C: writing a resumable checkpoint (press again to quit at once)");
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let opts = FitOptions {
        source: a.data.source()?,
        out,
        resume_epochs: a.resume.as_ref().and(a.epochs),
        resume: a.resume,
        device: trainer::fit::parse_device(&a.device)?,
        cache_dir: a.cache_dir.unwrap_or_else(default_cache_dir),
        progress: !a.quiet,
        stop,
    };
    let report = trainer::fit::fit(&cfg, &opts)?;
    let best = report
        .state
        .best_val_loss
        .map_or("-".into(), |v| format!("{v:.4}"));
    match report.end {
        FitEnd::Finished => eprintln!(
            "done: {} epochs, {} steps, best val loss {best}; checkpoints in {}",
            report.state.epoch,
            report.state.step,
            report.out.display()
        ),
        FitEnd::MaxSteps => eprintln!(
            "stopped after {} steps (--max-steps); resume with --resume {}",
            report.state.step,
            report.out.join("last").display()
        ),
        FitEnd::Interrupted => {
            eprintln!(
                "interrupted at step {}; resume with --resume {}",
                report.state.step,
                report.out.join("last").display()
            );
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
    let predictions = a
        .predictions
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PREDICTIONS));
    let opts = EvalOptions {
        checkpoint: a.checkpoint.clone(),
        source: a.data.source()?,
        template: a.data.caption_template.clone(),
        split: a.split,
        predictions,
        device: trainer::fit::parse_device(&a.device)?,
        cache_dir: a.cache_dir.unwrap_or_else(default_cache_dir),
        max_new_tokens: a.max_new_tokens,
        num_beams: a.num_beams,
        constrain: a.constrain,
        batch_size: a.batch_size,
        progress: !a.quiet && !a.json,
    };
    let report = trainer::eval::evaluate(&opts)?;
    if a.json {
        println!("{:#}", trainer::eval::to_json(&report));
    } else {
        print!("{}", trainer::eval::format_table(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn run() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Synth(a) => {
            let r = trainer::synth::synth(&a)?;
            eprintln!("wrote {} products to {}", r.count, r.out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Fit(a) => fit(*a),
        Command::Eval(a) => eval(a),
    }
}

fn main() -> ExitCode {
    trainer::alloc::keep_freed_memory();
    trainer::threads::park_idle_elementwise_workers();
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", trainer::error::report(&*e));
            ExitCode::from(EXIT_FAILED)
        }
    }
}
