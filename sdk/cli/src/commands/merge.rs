//! `merge`: joins the outputs of a sharded job into one file.

use std::process::ExitCode;

use anyhow::bail;
use moda_cli::catalog::{list_csv, list_paths};
use moda_cli::csv_out;

use crate::{MergeArgs, EXIT_FAILED, EXIT_PARTIAL};

pub(crate) fn merge(a: &MergeArgs) -> anyhow::Result<ExitCode> {
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
