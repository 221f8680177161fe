//! What constrained decoding costs for a tokenizer: loading the tokenizer, compiling a bundle's
//! caption schema for it, and each step of a constrained walk through a caption.
//!
//! ```sh
//! cargo run --release -p moda-models --example constraint_cost -- BUNDLE [REPS]
//! ```
//! `BUNDLE` is a bundle directory (its `tokenizer.json` and the `schema` of its `moda.json`).
//! The walk follows the schema's commonest value of every field, as the tokenizer encodes the
//! caption, calling `allowed` and `forced` before each token as the search does. Prints the
//! medians of REPS runs (default 5) in milliseconds, as one JSON line.

use std::path::PathBuf;
use std::time::Instant;

use moda_models::constrain::Constraint;
use moda_models::schema::CaptionSchema;
use moda_models::tokenizer::ModaTokenizer;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: constraint_cost BUNDLE [REPS]";
    let dir = PathBuf::from(args.next().ok_or(usage)?);
    let reps: usize = args.next().map_or(Ok(5), |r| r.parse())?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("moda.json"))?)?;
    let schema: CaptionSchema = serde_json::from_value(
        manifest
            .get("schema")
            .cloned()
            .ok_or_else(|| format!("{}: no schema", dir.display()))?,
    )?;
    let caption = schema
        .template
        .render(|f| {
            schema
                .field(f)
                .and_then(|f| f.values.first())
                .map(|v| v.value.as_str())
        })
        .map_err(|f| format!("field {f} has no values"))?;
    let (mut load, mut compile, mut walk, mut per_step) = (vec![], vec![], vec![], vec![]);
    let mut steps = 0;
    let mut vocab = 0;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let tok = ModaTokenizer::from_tokenizer_json(&dir.join("tokenizer.json"))?;
        load.push(ms(t));
        vocab = tok.vocab_size();
        let t = Instant::now();
        let c = Constraint::new(&schema, &tok, tok.eos_id())?;
        compile.push(ms(t));
        let ids = tok.encode_no_bos(&caption)?;
        let t = Instant::now();
        let mut state = c.start();
        for &id in ids.iter().chain([&tok.eos_id()]) {
            let s = Instant::now();
            let allowed = c.allowed(&state);
            let _ = c.forced(&state);
            per_step.push(ms(s));
            if !allowed.contains(&id) {
                return Err(format!("token {id} not allowed in {caption:?}").into());
            }
            state = c.advance(&state, id).ok_or("cannot advance")?;
        }
        walk.push(ms(t));
        steps = ids.len() + 1;
    }
    println!(
        "{}",
        serde_json::json!({
            "vocab": vocab,
            "caption": caption,
            "steps": steps,
            "load_tokenizer_ms": median(load),
            "compile_ms": median(compile),
            "walk_ms": median(walk),
            "step_ms_median": median(per_step.clone()),
            "step_ms_max": per_step.iter().copied().fold(0.0, f64::max),
        })
    );
    Ok(())
}
