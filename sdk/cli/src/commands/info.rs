//! `info`: what a bundle holds (its manifest, graphs and files), as text or JSON.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use moda_sdk::manifest::{Manifest, TensorInfo};
use moda_sdk::read_manifest;

use crate::{resolve_model, InfoArgs, EXIT_FAILED};

use super::job::one_line;

pub(crate) fn info(a: &InfoArgs) -> anyhow::Result<ExitCode> {
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

pub(crate) fn print_info(
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
