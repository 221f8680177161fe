//! `moda-sdk merge`: the outputs of the `n` shards of one catalog job made into one file,
//! after checking that together they are that job, each image exactly once.
//!
//! Each input is a resumable output (`--output` of `describe` or `embed`), its first line the
//! job header. The inputs must be the shards `0/n` .. `n-1/n` of one job: the same header but
//! for the shard (task, options, model and anything else it records), each shard once. Every
//! complete line after the header must be a record of that task; a last line without its
//! newline (a job that crashed, or is still writing) and an input locked by a running job are
//! refused. No image may be recorded twice (in one shard or across shards). Given the job's
//! inputs (the same CSV column or images), each listed image must be recorded, in the shard
//! its position puts it in (`p % n`), and no other image may be. A CSV output (`describe
//! --format csv`) has no job header and is refused, saying so.
//!
//! Any of those problems refuses the merge and writes nothing. Otherwise the records are
//! written as they were (the lines' bytes, unchanged) after a merged header, the shards'
//! header with `"shard": "0/1"` and `"merged_shards": n`: the file is then what one unsharded
//! job would have written, and `describe --output MERGED` without `--shard` (same inputs and
//! options) resumes it. The order is the catalog's when the inputs are given; otherwise the
//! shards' records are interleaved (the first of each shard, then the second of each, ...),
//! which is the catalog's order for shards that ran straight through. The output is written to
//! a temporary file beside it and renamed into place. An output ending in `.npy` (for `embed`
//! or `describe --embed` shards) gets the embeddings as a NumPy array instead (see
//! [`crate::npy`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::catalog::{upgrade_options, CatalogItem, Record, Shard, HEADER_KEY};
use crate::npy::{is_npy, sync_dir, temp_beside, NpyOutput};

/// The longest record line read (as for a job's output).
const MAX_LINE_BYTES: u64 = 64 << 20;

/// How a `describe --format csv` output begins (its header row).
const CSV_HEADER_START: &[u8] = b"image,description,";

/// Why a CSV output is not merged.
pub const CSV_REFUSED: &str = "a CSV output (`describe --format csv`): merge takes the JSON \
    Lines --output files of a sharded job, whose job headers show that they are the shards of \
    one job (a CSV records no shard, options or model). Join CSV shards yourself, keeping one \
    header row: (head -n 1 A.csv; tail -q -n +2 A.csv B.csv ...) > ALL.csv";

/// Problems listed of each kind before "... and N more".
const SHOWN: usize = 10;

/// Why a merge did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The inputs are not the shards of one job each image exactly once: what is wrong, one
    /// problem a line. Nothing was written.
    #[error("refused, nothing written:\n  {}", .0.join("\n  "))]
    Refused(Vec<String>),
    /// Reading or writing failed.
    #[error("{}: {error}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's error.
        error: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MergeError + '_ {
    move |error| MergeError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// What a merge wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeReport {
    /// `describe` or `embed`.
    pub task: String,
    /// Shards merged.
    pub shards: usize,
    /// Records written (failures included).
    pub records: usize,
    /// Of those, failures.
    pub failed: usize,
}

/// Where a record is: its line in its shard's file.
struct Loc {
    offset: u64,
    len: usize,
    /// The image's identity (see `CatalogItem::identity`).
    id: Vec<u8>,
    failed: bool,
    /// An embedding's length.
    dim: Option<usize>,
}

/// One input, read and checked.
struct Input {
    path: PathBuf,
    /// Open and share-locked until the merge is written, so that no job appends meanwhile.
    file: File,
    header: serde_json::Map<String, serde_json::Value>,
    shard: Shard,
    records: Vec<Loc>,
}

/// A name to show for an image identity (lossy for one that is not UTF-8).
fn show(identity: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(identity))
}

/// Lists `items` under `title`, at most [`SHOWN`] of them.
fn listed(title: String, items: &[String]) -> String {
    let mut s = format!(
        "{title}: {}",
        items
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    if items.len() > SHOWN {
        s += &format!(", ... and {} more", items.len() - SHOWN);
    }
    s
}

/// Merges the shard outputs `inputs` into `output` (see the module documentation), checking
/// them against the job's images `catalog` when given (the listing the job ran, before
/// sharding).
pub fn merge(
    output: &Path,
    inputs: &[PathBuf],
    catalog: Option<&[CatalogItem]>,
) -> Result<MergeReport, MergeError> {
    let refuse = |msg: String| MergeError::Refused(vec![msg]);
    if inputs.is_empty() {
        return Err(refuse("no shard outputs given".to_string()));
    }
    for input in inputs {
        if same_file(input, output) {
            return Err(refuse(format!(
                "the output {} is also an input; merge into a new file",
                output.display()
            )));
        }
    }
    if let Ok(m) = std::fs::metadata(output) {
        if !m.is_file() {
            return Err(refuse(format!(
                "{}: not a regular file; the merge is written to a new file and renamed into \
                 place",
                output.display()
            )));
        }
    }
    let mut problems = Vec::new();
    let mut read = Vec::new();
    for path in inputs {
        match read_input(path) {
            Ok(Ok(input)) => read.push(input),
            Ok(Err(problem)) => problems.push(problem),
            Err(e) => return Err(e),
        }
    }
    if !problems.is_empty() {
        return Err(MergeError::Refused(problems));
    }
    let inputs = read;

    // One job: the same header but for the shard, and every shard of it once.
    let without_shard = |h: &serde_json::Map<String, serde_json::Value>| {
        let mut h = h.clone();
        h.remove("shard");
        h
    };
    let first = &inputs[0];
    let job = without_shard(&first.header);
    for other in &inputs[1..] {
        let theirs = without_shard(&other.header);
        if theirs != job {
            let mut keys: Vec<&String> = job
                .keys()
                .chain(theirs.keys())
                .filter(|k| job.get(*k) != theirs.get(*k))
                .collect();
            keys.sort();
            keys.dedup();
            let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
            problems.push(format!(
                "{} and {} are not shards of one job: their headers differ in {}",
                first.path.display(),
                other.path.display(),
                keys.join(", ")
            ));
        }
    }
    let count = first.shard.count;
    let mut by_index: Vec<Vec<&Path>> = vec![Vec::new(); count];
    for input in &inputs {
        if input.shard.count != count {
            problems.push(format!(
                "{} is shard {} but {} is shard {}: not one split of the job",
                input.path.display(),
                input.shard,
                first.path.display(),
                first.shard
            ));
        } else {
            by_index[input.shard.index].push(&input.path);
        }
    }
    if problems.is_empty() {
        let missing: Vec<String> = (0..count)
            .filter(|&i| by_index[i].is_empty())
            .map(|i| format!("{i}/{count}"))
            .collect();
        if !missing.is_empty() {
            problems.push(listed(
                format!("{} of the {count} shards are not given", missing.len()),
                &missing,
            ));
            // With the job's images, name those the missing shards hold (a shard takes every
            // count-th image of the list from its index on), so that the user knows what is
            // left to run.
            if let Some(items) = catalog {
                let held: Vec<String> = items
                    .iter()
                    .enumerate()
                    .filter(|(p, _)| by_index[p % count].is_empty())
                    .map(|(_, item)| show(&item.identity()))
                    .collect();
                if !held.is_empty() {
                    problems.push(listed(
                        format!(
                            "the missing shards hold {} of the {} images listed",
                            held.len(),
                            items.len()
                        ),
                        &held,
                    ));
                }
            }
        }
        for (i, paths) in by_index.iter().enumerate().filter(|(_, p)| p.len() > 1) {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            problems.push(format!(
                "shard {i}/{count} is given twice: {}",
                names.join(", ")
            ));
        }
    }
    if !problems.is_empty() {
        return Err(MergeError::Refused(problems));
    }
    let task = job
        .get("task")
        .and_then(|t| t.as_str())
        .unwrap_or_default()
        .to_string();

    // Each image once: where each identity is (file, record).
    let mut seen: HashMap<&[u8], (usize, usize)> = HashMap::new();
    let mut duplicates = Vec::new();
    let mut failed = 0usize;
    let mut dim: Option<usize> = None;
    for (f, input) in inputs.iter().enumerate() {
        for (r, loc) in input.records.iter().enumerate() {
            failed += usize::from(loc.failed);
            match (dim, loc.dim) {
                (None, d) => dim = d,
                (Some(d), Some(e)) if d != e => problems.push(format!(
                    "{}: {} has an embedding of {e} numbers, another record {d}",
                    input.path.display(),
                    show(&loc.id),
                )),
                _ => {}
            }
            if let Some(&(f0, _)) = seen.get(loc.id.as_slice()) {
                duplicates.push(format!(
                    "{} (in {} and {})",
                    show(&loc.id),
                    inputs[f0].path.display(),
                    input.path.display()
                ));
            } else {
                seen.insert(&loc.id, (f, r));
            }
        }
    }
    if !duplicates.is_empty() {
        problems.push(listed(
            format!("{} images are recorded more than once", duplicates.len()),
            &duplicates,
        ));
    }

    // Against the job's images: each in its shard, none missing, none extra.
    let order: Vec<(usize, usize)> = match catalog {
        Some(items) => {
            let mut missing = Vec::new();
            let mut misplaced = Vec::new();
            let mut order = Vec::with_capacity(items.len());
            let mut listed_ids = std::collections::HashSet::with_capacity(items.len());
            for (p, item) in items.iter().enumerate() {
                let id = item.identity();
                match seen.get(id.as_slice()) {
                    None => missing.push(show(&id)),
                    Some(&(f, r)) => {
                        let want = p % count;
                        if inputs[f].shard.index != want {
                            misplaced.push(format!(
                                "{} (position {p}, shard {want}/{count}, found in {})",
                                show(&id),
                                inputs[f].path.display()
                            ));
                        }
                        order.push((f, r));
                    }
                }
                listed_ids.insert(id);
            }
            let mut extra: Vec<(usize, usize, String)> = seen
                .iter()
                .filter(|(id, _)| !listed_ids.contains(**id))
                .map(|(id, &(f, r))| {
                    (
                        f,
                        r,
                        format!("{} (in {})", show(id), inputs[f].path.display()),
                    )
                })
                .collect();
            extra.sort();
            let extra: Vec<String> = extra.into_iter().map(|(_, _, s)| s).collect();
            if !missing.is_empty() {
                problems.push(listed(
                    format!(
                        "{} of the {} images listed are in no shard's output (run their \
                         shards again to finish them)",
                        missing.len(),
                        items.len()
                    ),
                    &missing,
                ));
            }
            if !extra.is_empty() {
                problems.push(listed(
                    format!(
                        "{} images recorded are not among the images listed (were the shards \
                         run on other inputs?)",
                        extra.len()
                    ),
                    &extra,
                ));
            }
            if !misplaced.is_empty() {
                problems.push(listed(
                    format!(
                        "{} images are not in the shard their position in the list puts them \
                         in (were the shards run on another list, or another order?)",
                        misplaced.len()
                    ),
                    &misplaced,
                ));
            }
            order
        }
        None => {
            // The first record of each shard, then the second of each, ...
            let longest = inputs.iter().map(|i| i.records.len()).max().unwrap_or(0);
            let mut by_shard: Vec<usize> = (0..inputs.len()).collect();
            by_shard.sort_by_key(|&f| inputs[f].shard.index);
            (0..longest)
                .flat_map(|r| by_shard.iter().map(move |&f| (f, r)))
                .filter(|&(f, r)| r < inputs[f].records.len())
                .collect()
        }
    };
    // `describe --embed` records carry embeddings too (the header's options say so).
    let embedded = task == "embed"
        || (task == "describe"
            && job
                .get("options")
                .and_then(|o| o.get("embedding"))
                .is_some());
    if is_npy(output) && !embedded {
        problems.push(format!(
            "{}: a .npy output holds embeddings, and these are `{task}` outputs without them \
             (`embed`, or `describe --embed`, writes them)",
            output.display()
        ));
    }
    if !problems.is_empty() {
        return Err(MergeError::Refused(problems));
    }

    let report = MergeReport {
        task,
        shards: count,
        records: order.len(),
        failed,
    };
    if is_npy(output) {
        let mut npy =
            NpyOutput::create(output, dim.unwrap_or(0), order.len()).map_err(io_err(output))?;
        for &(f, r) in &order {
            let input = &inputs[f];
            let record = read_record(&mut &input.file, &input.records[r], &input.path)?;
            npy.push(&record).map_err(io_err(output))?;
        }
        npy.finish().map_err(io_err(output))?;
        return Ok(report);
    }

    let mut header = first.header.clone();
    header.insert(
        "shard".to_string(),
        serde_json::json!(Shard::ALL.to_string()),
    );
    header.insert("merged_shards".to_string(), serde_json::json!(count));
    let tmp = temp_beside(output);
    let written = (|| -> Result<(), MergeError> {
        let mut out = BufWriter::new(File::create(&tmp).map_err(io_err(&tmp))?);
        writeln!(out, "{}", serde_json::json!({ HEADER_KEY: header })).map_err(io_err(&tmp))?;
        let mut line = Vec::new();
        for &(f, r) in &order {
            let input = &inputs[f];
            read_line(&mut &input.file, &input.records[r], &input.path, &mut line)?;
            out.write_all(&line).map_err(io_err(&tmp))?;
        }
        let file = out.into_inner().map_err(|e| io_err(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, output).map_err(io_err(output))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(output);
    Ok(report)
}

/// Whether `a` and `b` are one file (both existing, same device and inode; else the same
/// absolute path).
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    match (std::path::absolute(a), std::path::absolute(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// A record's line (with its newline) into `line`.
fn read_line(
    file: &mut &File,
    loc: &Loc,
    path: &Path,
    line: &mut Vec<u8>,
) -> Result<(), MergeError> {
    line.resize(loc.len, 0);
    file.seek(SeekFrom::Start(loc.offset))
        .map_err(io_err(path))?;
    file.read_exact(line).map_err(io_err(path))
}

fn read_record(file: &mut &File, loc: &Loc, path: &Path) -> Result<Record, MergeError> {
    let mut line = Vec::new();
    read_line(file, loc, path, &mut line)?;
    serde_json::from_slice(&line).map_err(|e| MergeError::Io {
        path: path.to_path_buf(),
        error: std::io::Error::other(format!("a record changed while merging: {e}")),
    })
}

/// Reads and checks one shard output: `Ok(Err(problem))` for a file that is not a complete
/// shard output, `Err` for a failure to read it.
fn read_input(path: &Path) -> Result<Result<Input, String>, MergeError> {
    let file = moda_models::files::open_regular(path).map_err(io_err(path))?;
    match file.try_lock_shared() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Ok(Err(format!(
                "{}: a job is still writing it (it is locked); merge when every shard has \
                 finished",
                path.display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(path)(e)),
    }
    let bad = |line: usize, msg: String| Ok(Err(format!("{} line {line}: {msg}", path.display())));
    let mut reader = std::io::BufReader::new(&file);
    let mut line = Vec::new();
    let mut offset = 0u64;
    let mut number = 0usize;
    let mut header: Option<(serde_json::Map<String, serde_json::Value>, Shard, &str)> = None;
    let mut records = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut line)
            .map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        number += 1;
        let start = offset;
        offset += n as u64;
        if line.last() != Some(&b'\n') {
            if n as u64 > MAX_LINE_BYTES {
                return bad(number, format!("a line longer than {MAX_LINE_BYTES} bytes"));
            }
            return bad(
                number,
                "an incomplete last line (the job crashed or is still writing); run its job \
                 again to finish it"
                    .to_string(),
            );
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let v: serde_json::Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            Err(_) if header.is_none() && line.starts_with(CSV_HEADER_START) => {
                return Ok(Err(format!("{}: {CSV_REFUSED}", path.display())))
            }
            Err(e) => return bad(number, format!("not JSON ({e})")),
        };
        let Some((_, _, field)) = &header else {
            let h = v.get(HEADER_KEY).and_then(|h| h.as_object());
            let Some(h) = h else {
                return bad(
                    number,
                    "not a job header ({\"moda_job\": ...}); merge takes the --output files \
                     of sharded `moda-sdk describe` or `embed` jobs"
                        .to_string(),
                );
            };
            let task = h.get("task").and_then(|t| t.as_str());
            let field = match task {
                Some("describe") => "description",
                Some("embed") => "embedding",
                _ => return bad(number, format!("a job header of no known task: {v}")),
            };
            let shard = h.get("shard").and_then(|s| s.as_str());
            let Some(shard) = shard.and_then(|s| s.parse::<Shard>().ok()) else {
                return bad(number, format!("a job header without a valid shard: {v}"));
            };
            let mut h = h.clone();
            if let (Some(task), Some(options)) = (task, h.get_mut("options")) {
                upgrade_options(task, options);
            }
            header = Some((h, shard, field));
            continue;
        };
        if v.get(HEADER_KEY).is_some() {
            return bad(number, "a second job header".to_string());
        }
        let record: Record = match serde_json::from_value(v.clone()) {
            Ok(r) => r,
            Err(e) => return bad(number, format!("not a record ({e})")),
        };
        if !record.is_error() && v.get(*field).is_none() {
            return bad(number, format!("a record without {field:?}"));
        }
        records.push(Loc {
            offset: start,
            len: n,
            id: record.identity(),
            failed: record.is_error(),
            dim: match &record {
                Record::Embedding { embedding, .. }
                | Record::Description {
                    embedding: Some(embedding),
                    ..
                } => Some(embedding.len()),
                _ => None,
            },
        });
    }
    drop(reader);
    let Some((header, shard, _)) = header else {
        return Ok(Err(format!(
            "{}: empty (no job header); is it a shard's --output?",
            path.display()
        )));
    };
    Ok(Ok(Input {
        path: path.to_path_buf(),
        file,
        header,
        shard,
        records,
    }))
}
