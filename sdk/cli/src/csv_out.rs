//! `describe --format csv`: one row per image, for spreadsheets and catalog tools.
//!
//! The columns are `image`, `description`, `finish` (why generation ended: `end_of_text`,
//! `stop_string`, `length` when the token limit cut the text, `stopped`), then for each field
//! of the bundle's caption schema, in template order, `<Field>` (its value) and
//! `<Field>_confidence`, then `error`. A cell is empty where there is nothing to put: the
//! attribute cells of a text that yields no value for that field (and of a failed image),
//! `<Field>_confidence` when the value's tokens could not be told apart, `description` and
//! `finish` of a failed image, `error` of a described one. A bundle without a
//! schema has no attribute columns. Cells are quoted as CSV needs (commas, quotes, line breaks
//! in a description or an error message stay in their cell); rows end in `\n`.
//!
//! ## Formulas
//! A spreadsheet reads a cell that begins with `=`, `+`, `-` or `@` (or a tab or carriage
//! return before one) as a formula, and runs it: an image named `=HYPERLINK(...).jpg`, or a
//! description or error message quoting one, would become a live formula in whoever opens the
//! output. So a text cell (`image`, `description`, the attribute values, `error`) that begins
//! with one of those characters, or with `'`, is written with a `'` before it: spreadsheets
//! show such a cell as the text after the `'`. A program reading the CSV drops one leading `'`
//! from those cells to have the text as it was (resuming does so for `image`); JSON Lines
//! output is written as it is.
//!
//! ## Resuming
//! [`CsvOutput::open`] works as [`crate::catalog::ResumableOutput::open`] does for JSON Lines:
//! it locks the file, reads the rows already there and appends whole rows, each in a single
//! write, flushed. A new (or empty) file starts with the header row; an existing one must start
//! with this bundle's header row (another bundle's fields are refused, not mixed in), and its
//! `image` column names the images already done (a non-empty `error` cell: a failed one). A last
//! row cut short (no final newline, or fewer cells than the header: what a crash in the middle
//! of a write leaves) is cut off. A CSV has no job header: unlike JSON Lines, an output written
//! with another shard or other options cannot be told apart, and `moda-sdk merge` refuses CSV.

use std::cell::Cell;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::catalog::{io_err, open_output, CatalogError, Record, Recorded};

/// The longest row read back from an output (an unclosed quote makes the rest of a file one
/// row: it is refused rather than read into memory whole).
const MAX_ROW_BYTES: u64 = 64 << 20;

/// Whether `path` ends in `.csv` (any letter case).
pub fn is_csv(path: &Path) -> bool {
    has_extension(path, &["csv"])
}

/// Whether `path` ends in `.jsonl`, `.ndjson` or `.json` (any letter case): a name that says
/// JSON, which `--format csv` contradicts.
pub fn is_json(path: &Path) -> bool {
    has_extension(path, &["jsonl", "ndjson", "json"])
}

fn has_extension(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// The header row for a schema with these fields (in template order).
pub fn columns(fields: &[String]) -> Vec<String> {
    let mut c = vec![
        "image".to_string(),
        "description".to_string(),
        "finish".to_string(),
    ];
    for f in fields {
        c.push(f.clone());
        c.push(format!("{f}_confidence"));
    }
    c.push("error".to_string());
    c
}

/// The first characters of a cell that a spreadsheet reads as the start of a formula, and the
/// `'` that [`guard`] puts before them (so that a text beginning with `'` reads back as it was).
const GUARDED_STARTS: [char; 7] = ['=', '+', '-', '@', '\t', '\r', '\''];

/// A text cell as written: `'` before a text that begins with one of `GUARDED_STARTS` (see
/// the module documentation), every other text as it is.
pub fn guard(text: &str) -> String {
    if text.starts_with(GUARDED_STARTS) {
        format!("'{text}")
    } else {
        text.to_string()
    }
}

/// The text [`guard`] was given, from the cell it wrote.
pub fn unguard(cell: &[u8]) -> &[u8] {
    match cell {
        [b'\'', rest @ ..] => rest,
        _ => cell,
    }
}

/// The cells of `record`'s row under the header of [`columns`]`(fields)`, text cells guarded
/// against formulas.
pub fn row(fields: &[String], record: &Record) -> Vec<String> {
    let mut c = Vec::with_capacity(4 + 2 * fields.len());
    c.push(guard(record.image()));
    match record {
        Record::Description {
            description,
            attributes,
            finish,
            ..
        } => {
            c.push(guard(description));
            c.push(finish.map(|f| f.as_str().to_string()).unwrap_or_default());
            for f in fields {
                let a = attributes
                    .as_ref()
                    .and_then(|a| a.get(f))
                    .and_then(Option::as_ref);
                c.push(a.map(|a| guard(&a.value)).unwrap_or_default());
                c.push(
                    a.and_then(|a| a.confidence)
                        .filter(|x| x.is_finite())
                        .map(|x| x.to_string())
                        .unwrap_or_default(),
                );
            }
            c.push(String::new());
        }
        Record::Error { error, .. } => {
            c.extend(std::iter::repeat_n(String::new(), 2 + 2 * fields.len()));
            c.push(guard(error));
        }
        // Embeddings have no CSV form (the command line does not ask for one).
        Record::Embedding { .. } => {
            c.extend(std::iter::repeat_n(String::new(), 2 + 2 * fields.len()));
            c.push("an embedding has no CSV row".to_string());
        }
    }
    c
}

/// One CSV row (quoted as needed) with its final `\n`.
pub fn encode(cells: &[String]) -> std::io::Result<Vec<u8>> {
    let mut w = csv::WriterBuilder::new().from_writer(Vec::new());
    w.write_record(cells).map_err(std::io::Error::other)?;
    w.into_inner()
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// A `describe --format csv` output file that a job appends to and can resume (see the module
/// documentation).
#[derive(Debug)]
pub struct CsvOutput {
    file: File,
    path: PathBuf,
    fields: Vec<String>,
}

impl CsvOutput {
    /// Opens (or creates) `path` for the rows of a bundle whose schema has `fields` (none
    /// without a schema): locks it, reads the images its rows record (by the exact text of
    /// their `image` cell, less the `'` of a guarded one), cuts off a last row cut short and
    /// appends from then on. A file that does not start with this header row, or has a row of
    /// another length before its last, is an error and is left as it is.
    pub fn open(path: &Path, fields: &[String]) -> Result<(Self, Recorded), CatalogError> {
        let file = open_output(path)?;
        let out_err = |msg: String| CatalogError::Output {
            path: path.to_path_buf(),
            msg,
        };
        let mut rows = Rows {
            want: columns(fields),
            saw_header: false,
            recorded: Recorded::default(),
        };
        // The row read last, not yet known to be whole: (where it starts, where it ends, its
        // line, its cells).
        let mut last: Option<(u64, u64, u64, csv::ByteRecord)> = None;
        let limit = Cell::new(MAX_ROW_BYTES);
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(Bounded {
                inner: &file,
                read: 0,
                limit: &limit,
            });
        let mut rec = csv::ByteRecord::new();
        loop {
            let start = reader.position().byte();
            let more = reader.read_byte_record(&mut rec).map_err(|e| {
                out_err(format!(
                    "cannot be read as CSV ({e}); this is not a `moda-sdk describe --format \
                     csv` output (choose another --output, or move this file away)"
                ))
            })?;
            if !more {
                break;
            }
            let end = reader.position().byte();
            let line = rec.position().map_or(0, |p| p.line());
            // A row followed by another is whole.
            if let Some((_, _, l, r)) = last.take() {
                rows.accept(l, &r).map_err(out_err)?;
            }
            last = Some((start, end, line, rec.clone()));
            limit.set(end + MAX_ROW_BYTES);
        }
        drop(reader);
        let len = file.metadata().map_err(io_err(path))?.len();
        let mut truncate_to = None;
        let mut missing_newline = false;
        if let Some((start, end, line, rec)) = last {
            // Whole: it ends in a newline that is not inside a quoted cell (the writer's quotes
            // come in pairs; a row cut inside a quoted cell has an odd number of them).
            let raw = read_range(&file, start, end).map_err(io_err(path))?;
            let ends_in_newline = raw.last() == Some(&b'\n');
            let quotes_closed = raw.iter().filter(|&&b| b == b'"').count() % 2 == 0;
            if !rows.saw_header {
                // The header row alone (it is written whole with the file: a missing newline
                // is added before the first row).
                rows.accept(line, &rec).map_err(out_err)?;
                missing_newline = !ends_in_newline;
            } else if !ends_in_newline || !quotes_closed || rec.len() < rows.want.len() {
                // Cut short by a crash in the middle of its write.
                truncate_to = Some(start);
            } else {
                rows.accept(line, &rec).map_err(out_err)?;
            }
        }
        if let Some(at) = truncate_to {
            rows.recorded.truncated_bytes = len - at;
            file.set_len(at).map_err(io_err(path))?;
        }
        let Rows {
            want,
            saw_header,
            recorded,
        } = rows;
        let mut out = Self {
            file,
            path: path.to_path_buf(),
            fields: fields.to_vec(),
        };
        if !saw_header {
            // Empty, or blank lines only: start it afresh with the header row.
            out.file.set_len(0).map_err(io_err(path))?;
            let header = encode(&want).map_err(io_err(path))?;
            out.write(&header).map_err(io_err(path))?;
        } else if missing_newline {
            out.write(b"\n").map_err(io_err(path))?;
        }
        Ok((out, recorded))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record`'s row, in a single write, and flushes it.
    pub fn append(&mut self, record: &Record) -> std::io::Result<()> {
        let line = encode(&row(&self.fields, record))?;
        self.write(&line)
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.file.flush()
    }
}

/// The rows of an existing output as they are read: the header first, then the images.
struct Rows {
    want: Vec<String>,
    saw_header: bool,
    recorded: Recorded,
}

impl Rows {
    /// Takes one whole row (at `line`), or says what is wrong with it.
    fn accept(&mut self, line: u64, rec: &csv::ByteRecord) -> Result<(), String> {
        let not_ours = "this is not a `moda-sdk describe --format csv` output of this bundle \
                        (choose another --output, or move this file away)";
        if !self.saw_header {
            let cells: Vec<String> = rec
                .iter()
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect();
            if cells != self.want {
                return Err(format!(
                    "its header row is {:?}, but this bundle's descriptions have the columns \
                     {:?}: it was written with another bundle (another caption schema), by an \
                     older moda-sdk (before the finish column), or {not_ours}",
                    cells.join(","),
                    self.want.join(",")
                ));
            }
            self.saw_header = true;
            return Ok(());
        }
        if rec.len() != self.want.len() {
            return Err(format!(
                "line {line}: a row of {} cells, but the header has {}; {not_ours}",
                rec.len(),
                self.want.len()
            ));
        }
        let image = unguard(&rec[0]);
        if image.is_empty() {
            return Err(format!("line {line}: a row without an image; {not_ours}"));
        }
        let failed = !rec[rec.len() - 1].is_empty();
        self.recorded.images.insert(image.to_vec(), failed);
        Ok(())
    }
}

/// The bytes of `file` from `start` to `end`.
fn read_range(mut file: &File, start: u64, end: u64) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    file.seek(SeekFrom::Start(start))?;
    file.take(end.saturating_sub(start)).read_to_end(&mut raw)?;
    Ok(raw)
}

/// A reader that fails once it has read past `limit` (moved on after each whole row), so that
/// one row cannot take more than [`MAX_ROW_BYTES`] of memory.
struct Bounded<'a, R> {
    inner: R,
    read: u64,
    limit: &'a Cell<u64>,
}

impl<R: Read> Read for Bounded<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // The CSV reader reads ahead of the row it is on: leave it a buffer's worth.
        let room = (self.limit.get() + (1 << 16)).saturating_sub(self.read);
        if room == 0 {
            return Err(std::io::Error::other(format!(
                "a row longer than {MAX_ROW_BYTES} bytes (an unclosed quote?)"
            )));
        }
        let n = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let got = self.inner.read(&mut buf[..n])?;
        self.read += got as u64;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Vec<String> {
        vec!["Colour".to_string(), "Usage".to_string()]
    }

    #[test]
    fn cells_are_quoted_as_csv_needs() {
        let cells: Vec<String> = ["a,b", "say \"hi\"", "two\nlines", "plain", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let line = encode(&cells).expect("encode");
        assert_eq!(
            String::from_utf8(line.clone()).expect("utf-8"),
            "\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",plain,\n"
        );
        let mut r = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(line.as_slice());
        let back: Vec<String> = r
            .records()
            .next()
            .expect("a row")
            .expect("csv")
            .iter()
            .map(str::to_string)
            .collect();
        assert_eq!(back, cells);
    }

    #[test]
    fn the_header_names_each_field_and_its_confidence() {
        assert_eq!(
            columns(&fields()),
            [
                "image",
                "description",
                "finish",
                "Colour",
                "Colour_confidence",
                "Usage",
                "Usage_confidence",
                "error"
            ]
        );
        assert_eq!(columns(&[]), ["image", "description", "finish", "error"]);
    }

    #[test]
    fn a_record_from_before_finish_reads_back_with_an_empty_finish_cell() {
        let old = r#"{"image":"a.jpg","description":"Blue Jeans","attributes":{"Colour":
            {"value":"Blue","confidence":0.5},"Usage":null},"token_ids":[5,2],
            "logprobs":[-0.1,-0.2],"timings_ms":{"preprocess":1.0,"encoder":1.0,
            "projector":1.0,"prefill":1.0,"decode":1.0,"total":5.0,"tokens":2}}"#;
        let r: Record = serde_json::from_str(old).expect("an old record");
        assert!(!r.is_cut());
        assert_eq!(
            row(&fields(), &r),
            ["a.jpg", "Blue Jeans", "", "Blue", "0.5", "", "", ""]
        );
        // The same record written now says why it ended, and reads back the same.
        let mut v: serde_json::Value = serde_json::from_str(old).expect("json");
        v["finish"] = "length".into();
        let r: Record = serde_json::from_value(v).expect("a new record");
        assert!(r.is_cut());
        assert_eq!(row(&fields(), &r)[2], "length");
        let back: Record = serde_json::from_str(&r.to_json()).expect("round trip");
        assert_eq!(back, r);
    }

    #[test]
    fn text_cells_that_a_spreadsheet_would_run_are_guarded_and_read_back() {
        for (text, cell) in [
            (
                "=HYPERLINK(\"http://x\",\"y\").jpg",
                "'=HYPERLINK(\"http://x\",\"y\").jpg",
            ),
            ("+1.jpg", "'+1.jpg"),
            ("-2.jpg", "'-2.jpg"),
            ("@SUM(A1).jpg", "'@SUM(A1).jpg"),
            ("\t=1.jpg", "'\t=1.jpg"),
            ("\r=1.jpg", "'\r=1.jpg"),
            ("'quoted.jpg", "''quoted.jpg"),
            ("photos/=1.jpg", "photos/=1.jpg"),
            ("a-b.jpg", "a-b.jpg"),
            ("", ""),
        ] {
            assert_eq!(guard(text), cell, "{text:?}");
            assert_eq!(unguard(cell.as_bytes()), text.as_bytes(), "{cell:?}");
        }
        // Every text cell of a row; the confidences and finish are the writer's own.
        let r: Record = serde_json::from_str(
            r#"{"image":"=cmd.jpg","description":"-Blue","finish":"length",
            "attributes":{"Colour":{"value":"@Blue","confidence":0.5},"Usage":null},
            "token_ids":[5],"logprobs":[-0.1],"timings_ms":{"preprocess":1.0,"encoder":1.0,
            "projector":1.0,"prefill":1.0,"decode":1.0,"total":5.0,"tokens":1}}"#,
        )
        .expect("record");
        assert_eq!(
            row(&fields(), &r),
            ["'=cmd.jpg", "'-Blue", "length", "'@Blue", "0.5", "", "", ""]
        );
        assert_eq!(
            row(&fields(), &error("+x.jpg", "=bad")),
            ["'+x.jpg", "", "", "", "", "", "", "'=bad"]
        );
        // Resuming matches the image's own name.
        let p = temp("guard");
        {
            let (mut out, _) = CsvOutput::open(&p, &fields()).expect("open");
            out.append(&r).expect("append");
            out.append(&error("'q.jpg", "=bad")).expect("append");
        }
        let (_, rec) = CsvOutput::open(&p, &fields()).expect("open again");
        assert_eq!(rec.images.get(b"=cmd.jpg".as_slice()), Some(&false));
        assert_eq!(rec.images.get(b"'q.jpg".as_slice()), Some(&true));
        assert_eq!(rec.images.len(), 2);
        let _ = std::fs::remove_file(&p);
    }

    fn temp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("moda-csv-out-{tag}-{}.csv", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn error(image: &str, msg: &str) -> Record {
        Record::Error {
            image: image.to_string(),
            image_hex: None,
            error: msg.to_string(),
        }
    }

    #[test]
    fn an_output_resumes_and_cuts_a_row_cut_short() {
        let p = temp("resume");
        {
            let (mut out, rec) = CsvOutput::open(&p, &fields()).expect("open");
            assert!(rec.images.is_empty());
            out.append(&error("a.jpg", "bad,\n\"image\""))
                .expect("append");
            out.append(&error("b.jpg", "")).expect("append");
        }
        let whole = std::fs::read(&p).expect("read");
        let (_, rec) = CsvOutput::open(&p, &fields()).expect("open again");
        assert_eq!(rec.images.len(), 2);
        assert_eq!(rec.images.get(b"a.jpg".as_slice()), Some(&true));
        assert_eq!(rec.images.get(b"b.jpg".as_slice()), Some(&false));
        assert_eq!(rec.truncated_bytes, 0);
        assert_eq!(std::fs::read(&p).expect("read"), whole, "unchanged");

        // A crash inside a quoted cell (the last), after a line break in it.
        let row = encode(&row(&fields(), &error("c.jpg", "x\ny"))).expect("encode");
        let cut = row.iter().position(|&b| b == b'\n').expect("newline") + 1;
        let mut bytes = whole.clone();
        bytes.extend_from_slice(&row[..cut]);
        std::fs::write(&p, &bytes).expect("write");
        let (_, rec) = CsvOutput::open(&p, &fields()).expect("open cut");
        assert_eq!(rec.truncated_bytes, cut as u64);
        assert_eq!(rec.images.len(), 2);
        assert_eq!(std::fs::read(&p).expect("read"), whole);
        // A crash before the final newline.
        let mut bytes = whole.clone();
        bytes.extend_from_slice(&row[..row.len() - 1]);
        std::fs::write(&p, &bytes).expect("write");
        let (_, rec) = CsvOutput::open(&p, &fields()).expect("open cut");
        assert_eq!(rec.truncated_bytes, row.len() as u64 - 1);
        assert_eq!(std::fs::read(&p).expect("read"), whole);
        // A crash inside a quoted cell before the last: fewer cells than the header.
        let mut bytes = whole.clone();
        bytes.extend_from_slice(b"d.jpg,\"two\n");
        std::fs::write(&p, &bytes).expect("write");
        let (_, rec) = CsvOutput::open(&p, &fields()).expect("open cut");
        assert_eq!(rec.truncated_bytes, 11);
        assert_eq!(std::fs::read(&p).expect("read"), whole);

        // Another bundle's columns are refused, the file left as it is.
        let e = CsvOutput::open(&p, &["Colour".to_string()])
            .expect_err("other fields")
            .to_string();
        assert!(e.contains("header row"), "{e}");
        assert_eq!(std::fs::read(&p).expect("read"), whole);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn other_files_are_refused_and_empty_ones_start_afresh() {
        let p = temp("other");
        for (text, needle) in [
            ("hello\nworld\n", "header row"),
            ("image,description,finish,error\nx.jpg,,,,\n", "cells"),
            ("image,description,finish,error\n,,,\n", "without an image"),
        ] {
            std::fs::write(&p, text).expect("write");
            let e = CsvOutput::open(&p, &[]).expect_err(text).to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
            assert_eq!(std::fs::read_to_string(&p).expect("read"), text);
        }
        std::fs::write(&p, "\n\n").expect("write");
        CsvOutput::open(&p, &[]).expect("blank");
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "image,description,finish,error\n"
        );
        // A header without its newline gets one before the first row.
        std::fs::write(&p, "image,description,finish,error").expect("write");
        let (mut out, _) = CsvOutput::open(&p, &[]).expect("header only");
        out.append(&error("a.jpg", "e")).expect("append");
        drop(out);
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "image,description,finish,error\na.jpg,,,e\n"
        );
        let _ = std::fs::remove_file(&p);
    }
}
