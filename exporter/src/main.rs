//! `exporter`: writes MODA's ONNX bundle. A thin shell over the `exporter` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use exporter::{
    export_onnx, ExportOptions, Quantize, DEFAULT_DECODER, DEFAULT_ENCODER, DEFAULT_MAX_NEW_TOKENS,
};

/// The exit status, the scheme all three MODA command lines share (the exporter has no
/// partial result, so no 1, and no Ctrl-C handling: an interrupted export leaves only a
/// temporary directory, which the next export removes).
const EXIT_STATUS_HELP: &str = "\
Exit status:
  0    the bundle was written (and checked, unless --no-verify)
  2    usage error, or the checkpoint, the encoder or decoder, the output directory or the
       check in ONNX Runtime failed (the message says which); nothing is written then";

#[derive(Parser)]
#[command(
    name = "exporter",
    version,
    about = "Export a MODA model as an ONNX bundle",
    after_help = EXIT_STATUS_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantizeArg {
    None,
    Int8,
    Int4,
}

#[derive(Subcommand)]
enum Command {
    /// Write encoder, projector, token-embedding and KV-cache decoder graphs, the tokenizer and
    /// the manifest to a bundle directory, then check them in ONNX Runtime.
    Onnx {
        /// A trainer checkpoint directory (`trainer fit`), or the original recipe's `.pth`
        /// state_dict.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The bundle directory to write.
        #[arg(long)]
        out: PathBuf,
        /// For a `.pth`: the frozen image encoder, a local Hugging Face directory or a hub id.
        /// [default: patrickjohncyh/fashion-clip]
        #[arg(long)]
        encoder: Option<String>,
        /// For a `.pth`: the decoder's config.json and tokenizer, a local directory or a hub id.
        /// [default: facebook/opt-125m]
        #[arg(long)]
        decoder: Option<String>,
        /// Weight quantization of the encoder's and decoder's linear layers and the LM head:
        /// the decoder's as ONNX Runtime's MatMulNBits (int8 or int4 codes, one scale per
        /// block of weights), the encoder's as int8 dynamic products.
        #[arg(long, value_enum, default_value = "none")]
        quantize: QuantizeArg,
        /// Weights per quantization block of the decoder (a power of two from 16 to 256):
        /// larger blocks store fewer scales, so decode steps read fewer bytes and run faster,
        /// and approximate the weights more coarsely. [default: 128 for int8, 32 for int4]
        #[arg(long, value_name = "N")]
        block_size: Option<usize>,
        /// Replace an existing --out, if it is a bundle (a directory with moda.json).
        #[arg(long)]
        force: bool,
        /// Skip the check of the graphs in ONNX Runtime against the candle model.
        #[arg(long)]
        no_verify: bool,
        /// The bundle's default limit on generated tokens (the SDK's --max-new-tokens when not
        /// given); at most the decoder's positions minus the image prefix.
        #[arg(long, default_value_t = DEFAULT_MAX_NEW_TOKENS)]
        max_new_tokens: usize,
        /// The caption template of the bundle's schema (with which the SDK reads descriptions
        /// back into attributes), for a `.pth`, or to replace the one a trainer checkpoint
        /// records. [default with --catalog: "{Colour} {Usage} {ProductType} for {Gender} -
        /// {Category} {SubCategory}"]
        #[arg(long, value_name = "TEMPLATE")]
        caption_template: Option<String>,
        /// A catalog whose rows give each schema field's known values: a CSV with a column
        /// per template field, or a directory in the Kaggle fashion-images layout. Without
        /// this and --caption-template, a `.pth` gives a bundle without a schema.
        #[arg(long, value_name = "CSV|DIR")]
        catalog: Option<PathBuf>,
    },
}

/// A failed export (see [`EXIT_STATUS_HELP`]).
const EXIT_FAILED: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exporter: error: {}", exporter::report(&*e));
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Onnx {
            checkpoint,
            out,
            encoder,
            decoder,
            quantize,
            block_size,
            force,
            no_verify,
            max_new_tokens,
            caption_template,
            catalog,
        } => {
            if checkpoint.is_dir() && (encoder.is_some() || decoder.is_some()) {
                eprintln!(
                    "exporter: note: --encoder and --decoder are ignored for a trainer \
                     checkpoint directory (it records its own)"
                );
            }
            let opts = ExportOptions {
                checkpoint,
                out,
                encoder: encoder.unwrap_or_else(|| DEFAULT_ENCODER.to_string()),
                decoder: decoder.unwrap_or_else(|| DEFAULT_DECODER.to_string()),
                quantize: match quantize {
                    QuantizeArg::None => Quantize::None,
                    QuantizeArg::Int8 => Quantize::Int8,
                    QuantizeArg::Int4 => Quantize::Int4,
                },
                block_size,
                force,
                verify: !no_verify,
                max_new_tokens,
                caption_template,
                catalog,
            };
            let report = export_onnx(&opts)?;
            println!("wrote {}", report.out.display());
            for (file, bytes) in &report.files {
                println!("  {file:<20} {:>12} bytes", bytes);
            }
            println!("  written in {:.1} s", report.write_seconds);
            match &report.verification {
                Some(m) => println!(
                    "verified in ONNX Runtime ({:.1} s), max abs diff vs candle: encoder {:.2e}, \
                     projector {:.2e}, embed_tokens {:.2e}, decoder prefill {:.2e}, cached \
                     steps {:.2e}; listed logits vs the whole head {:.2e}",
                    report.verify_seconds,
                    m.encoder,
                    m.projector,
                    m.embed_tokens,
                    m.decoder_prefill,
                    m.decoder_steps,
                    m.decoder_listed
                ),
                None => println!("not verified (--no-verify)"),
            }
            if let Some(m) = &report.verification {
                if let (Some(rate), Some(cos)) = (m.greedy_agreement, m.min_logits_cosine) {
                    println!(
                        "quantized decoder vs fp32: argmax tokens agree at {:.1}% of the probe \
                         positions, logits cosine >= {cos:.4}",
                        100.0 * rate
                    );
                }
                if let Some(cos) = m.min_embeds_cosine {
                    println!("quantized encoder vs fp32: image embeddings cosine >= {cos:.4}");
                }
            }
            Ok(())
        }
    }
}
