//! Opening a bundle's graphs as ONNX Runtime sessions: the manifest read and checked, each
//! graph's inputs and outputs, one set of sessions built (with or without checking the files'
//! checksums), and how many threads each session gets.

use std::path::Path;
use std::sync::Arc;

use ort::session::Session;

use crate::error::{Error, Result};
use crate::manifest::{
    GraphInfo, Manifest, Role, HEAD_IDS, MANIFEST_FILE, MAX_POSITIONS_METADATA, VOCAB_SIZE_METADATA,
};
use crate::runtime::{session_from_bytes, session_from_file, SessionOptions};

use super::options::OpenOptions;
use super::{TextSessions, Worker};

/// The names of one graph's inputs and outputs, from the manifest.
#[derive(Debug, Clone)]
pub(super) struct Io {
    pub(super) inputs: Vec<String>,
    pub(super) outputs: Vec<String>,
    /// Whether the graph lists [`HEAD_IDS`] among its optional inputs (decoders exported
    /// with it).
    pub(super) head_ids: bool,
}

impl Io {
    fn of(g: &GraphInfo) -> Self {
        Self {
            inputs: g.inputs.iter().map(|t| t.name.clone()).collect(),
            outputs: g.outputs.iter().map(|t| t.name.clone()).collect(),
            head_ids: g.optional_inputs.iter().any(|t| t.name == HEAD_IDS),
        }
    }
}

/// Expected shapes of a graph's inputs or outputs: a number per fixed dimension, `None` for
/// a dynamic one.
pub(super) type Shapes = Vec<Vec<Option<usize>>>;

/// What building a session set reads of an opened bundle, borrowed: [`Moda::open`] builds
/// the first set from it before the `Moda` exists (while the tokenizer loads beside it), and
/// later sets come from the `Moda`'s own fields ([`Moda::graph_set`]).
pub(super) struct GraphSet<'a> {
    pub(super) dir: &'a Path,
    pub(super) manifest: &'a Manifest,
    pub(super) options: &'a OpenOptions,
    pub(super) session_options: &'a SessionOptions,
    pub(super) encoder_io: &'a Io,
    pub(super) projector_io: &'a Io,
    pub(super) embed_io: &'a Io,
    pub(super) decoder_io: &'a Io,
    /// Session sets built so far (names each set's profile files apart).
    pub(super) built: &'a std::sync::atomic::AtomicUsize,
}

impl GraphSet<'_> {
    /// A session for the graph `graph`. With `verify_checksums` the graph's file and its
    /// external data file (if it has one) are read once, their SHA-256 compared with the
    /// manifest's, and ONNX Runtime given those very bytes: what runs is what was checked (a
    /// file swapped after the check is not read again), and a graph that names external data
    /// other than its own listed file, which no checksum covers, is refused. Otherwise ONNX
    /// Runtime reads the files itself: it maps the external data into memory instead of
    /// copying the weights, and needs no second copy of the graph while the session is built.
    fn load_graph(&self, graph: &GraphInfo, options: &SessionOptions) -> Result<Session> {
        let path = self.dir.join(&graph.file);
        if !self.options.verify_checksums {
            return Ok(session_from_file(&path, options)?);
        }
        let bytes = self.read_checked(&graph.file)?;
        let data = match &graph.data {
            Some(name) => Some((name.as_str(), Arc::<[u8]>::from(self.read_checked(name)?))),
            None => None,
        };
        session_from_bytes(&path, &bytes, data, options).map_err(|e| {
            let msg = e.to_string();
            if msg.to_lowercase().contains("external data") {
                Error::bundle(
                    &path,
                    format!(
                        "{msg} (with checksums verified a graph's weights must be in the graph \
                         or in the external data file the manifest lists for it, which its \
                         checksum covers)"
                    ),
                )
            } else {
                e.into()
            }
        })
    }

    /// The bundle file `file`, read whole and checked against the manifest's SHA-256.
    fn read_checked(&self, file: &str) -> Result<Vec<u8>> {
        let path = self.dir.join(file);
        let info = self.manifest.files.get(file).ok_or_else(|| {
            Error::bundle(
                &path,
                "is not listed in the manifest's files, so it has no checksum",
            )
        })?;
        let bytes = moda_models::files::read_bounded(&path, info.bytes)
            .map_err(|e| Error::bundle(&path, e.to_string()))?;
        let got = moda_models::files::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        if got != info.sha256 {
            return Err(Error::bundle(
                &path,
                format!("SHA-256 {got} differs from the manifest's {}", info.sha256),
            ));
        }
        Ok(bytes)
    }

    pub(super) fn build_worker(&self) -> Result<Worker> {
        let set = self
            .built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let open = |role: Role| -> Result<Session> {
            let g = self
                .manifest
                .graph(role)
                .map_err(|e| Error::bundle(self.dir, e))?;
            // Only the decoder, run once per token, keeps its threads spinning between runs.
            let options = SessionOptions {
                no_spinning: role != Role::Decoder,
                profile_prefix: self
                    .options
                    .profile_dir
                    .as_ref()
                    .map(|d| d.join(format!("{}-{set}", role.name()))),
                ..self.session_options.clone()
            };
            self.load_graph(g, &options)
        };
        // Building a session (ONNX Runtime's optimizer, packing the weights) runs mostly on one
        // core: the decoder and the projector each on a thread of their own while this one
        // builds the encoder and the token embedding. The two large graphs start at once, and
        // the small projector goes to whichever core is free first instead of waiting behind
        // the encoder (in int4 bundles the encoder and the decoder take about as long).
        let joined = |r: std::thread::Result<Result<Session>>, role: Role| {
            r.unwrap_or_else(|_| {
                Err(Error::Internal(format!(
                    "building the {role} session panicked"
                )))
            })
        };
        let text = !self.options.embeddings_only;
        let (decoder, projector, others) = std::thread::scope(|scope| {
            let decoder = text.then(|| scope.spawn(|| open(Role::Decoder)));
            let projector = scope.spawn(|| open(Role::Projector));
            let others = open(Role::Encoder).and_then(|e| {
                let embed = text.then(|| open(Role::EmbedTokens)).transpose()?;
                Ok((e, embed))
            });
            (
                decoder.map(|d| joined(d.join(), Role::Decoder)).transpose(),
                joined(projector.join(), Role::Projector),
                others,
            )
        });
        // One graph's error is reported when several fail: the decoder's first, then the
        // encoder's, the token embedding's and the projector's.
        let decoder = decoder?;
        let (encoder, embed) = others?;
        let projector = projector?;
        let worker = Worker {
            encoder,
            projector,
            text: embed
                .zip(decoder)
                .map(|(embed, decoder)| TextSessions { embed, decoder }),
        };
        self.check_graph_shapes(&worker)?;
        if let Some(text) = &worker.text {
            self.check_decoder_metadata(&text.decoder)?;
        }
        Ok(worker)
    }

    /// Compares every graph's inputs and outputs, as ONNX Runtime reads them from the graph
    /// files, with the shapes the manifest's dimensions imply; a bundle whose `moda.json`
    /// disagrees with its graphs is refused here instead of failing (or, worse, running on
    /// wrong numbers) later. Dimensions a graph leaves dynamic are checked on every run.
    fn check_graph_shapes(&self, w: &Worker) -> Result<()> {
        let d = self.manifest.model;
        let (c, s, p, e) = (
            Some(d.num_channels),
            Some(d.image_size),
            Some(d.projection_dim),
            Some(d.embed_dim),
        );
        let cache = vec![None, Some(d.num_heads), None, Some(d.head_dim)];
        let mut decoder_in = vec![vec![None, None, e], vec![None, None]];
        let mut decoder_out = vec![vec![None, None, Some(d.vocab_size)]];
        for _ in 0..2 * d.num_layers {
            decoder_in.push(cache.clone());
            decoder_out.push(cache.clone());
        }
        let mut checks: Vec<(Role, &Session, &Io, Shapes, Shapes)> = vec![
            (
                Role::Encoder,
                &w.encoder,
                self.encoder_io,
                vec![vec![None, c, s, s]],
                vec![vec![None, p]],
            ),
            (
                Role::Projector,
                &w.projector,
                self.projector_io,
                vec![vec![None, p]],
                vec![vec![None, Some(d.prefix_len), e]],
            ),
        ];
        if let Some(t) = &w.text {
            checks.push((
                Role::EmbedTokens,
                &t.embed,
                self.embed_io,
                vec![vec![None, None]],
                vec![vec![None, None, e]],
            ));
            checks.push((
                Role::Decoder,
                &t.decoder,
                self.decoder_io,
                decoder_in,
                decoder_out,
            ));
        }
        for (role, session, io, ins, outs) in checks {
            let graph = self
                .manifest
                .graph(role)
                .map_err(|e| Error::bundle(self.dir, e))?;
            let file = self.dir.join(&graph.file);
            let sides = [
                ("input", session.inputs(), &io.inputs, ins),
                ("output", session.outputs(), &io.outputs, outs),
            ];
            for (side, outlets, names, expected) in sides {
                if outlets.len() != names.len() {
                    return Err(Error::bundle(
                        &file,
                        format!(
                            "the {role} graph has {} {side}s, the manifest lists {} (is \
                             \"model\".\"num_layers\" right?)",
                            outlets.len(),
                            names.len()
                        ),
                    ));
                }
                for (name, want) in names.iter().zip(expected) {
                    let outlet = outlets.iter().find(|o| o.name() == name).ok_or_else(|| {
                        Error::bundle(
                            &file,
                            format!(
                                "the manifest names a {role} {side} {name:?} that the graph \
                                 does not have"
                            ),
                        )
                    })?;
                    let got: Vec<i64> = outlet
                        .dtype()
                        .tensor_shape()
                        .map(|s| s.iter().copied().collect())
                        .unwrap_or_default();
                    let fits = got.len() == want.len()
                        && got
                            .iter()
                            .zip(&want)
                            .all(|(&g, w)| g < 0 || w.is_none_or(|w| g as u64 == w as u64));
                    if !fits {
                        let show = |v: Vec<String>| format!("[{}]", v.join(", "));
                        return Err(Error::bundle(
                            &file,
                            format!(
                                "the graph's {role} {side} {name:?} has shape {}, but the \
                                 manifest's \"model\" dimensions make it {}",
                                show(
                                    got.iter()
                                        .map(|&g| if g < 0 { "?".into() } else { g.to_string() })
                                        .collect()
                                ),
                                show(
                                    want.iter()
                                        .map(|w| w.map_or("?".into(), |w| w.to_string()))
                                        .collect()
                                )
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Compares the manifest with what the decoder graph says of itself: `max_positions`
    /// with the positions its table holds ([`MAX_POSITIONS_METADATA`]; more would fail
    /// mid-job, in the middle of a long description, as an out-of-range lookup inside the
    /// graph), `vocab_size` with the tokens its LM head scores ([`VOCAB_SIZE_METADATA`]), and
    /// an optional [`HEAD_IDS`] input that the manifest lists with the graph's inputs that
    /// have defaults. A graph without an entry (older bundles) is not checked on it.
    fn check_decoder_metadata(&self, decoder: &Session) -> Result<()> {
        let file = self
            .manifest
            .graph(Role::Decoder)
            .map(|g| self.dir.join(&g.file))
            .map_err(|e| Error::bundle(self.dir, e))?;
        if self.decoder_io.head_ids
            && !decoder
                .overridable_initializers()
                .iter()
                .any(|o| o.name() == HEAD_IDS)
        {
            return Err(Error::bundle(
                &file,
                format!(
                    "the manifest lists an optional decoder input {HEAD_IDS:?} that the graph \
                     does not have"
                ),
            ));
        }
        let meta = decoder
            .metadata()
            .map_err(|e| Error::bundle(&file, format!("cannot read its metadata: {e}")))?;
        let number = |key: &str| -> Result<Option<usize>> {
            let Some(value) = meta.custom(key) else {
                return Ok(None);
            };
            value.trim().parse().map(Some).map_err(|_| {
                Error::bundle(
                    &file,
                    format!("its {key} metadata is {value:?}, not a number"),
                )
            })
        };
        let d = self.manifest.model;
        if let Some(table) = number(MAX_POSITIONS_METADATA)? {
            if d.max_positions > table {
                return Err(Error::bundle(
                    &file,
                    format!(
                        "the manifest's \"model\".\"max_positions\" is {}, but the decoder's \
                         position table holds {table} positions",
                        d.max_positions
                    ),
                ));
            }
        }
        if let Some(vocab) = number(VOCAB_SIZE_METADATA)? {
            if d.vocab_size != vocab {
                return Err(Error::bundle(
                    &file,
                    format!(
                        "the decoder's LM head scores {vocab} tokens, but the manifest's \
                         \"model\" dimensions make it {} (\"vocab_size\")",
                        d.vocab_size
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Reads and checks `moda.json` in `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    if !dir.is_dir() {
        return Err(Error::bundle(
            dir,
            "no such directory (make one with `exporter onnx --checkpoint CKPT --out DIR`)",
        ));
    }
    let path = dir.join(MANIFEST_FILE);
    let text = moda_models::files::read_text_bounded(&path, MANIFEST_MAX_BYTES).map_err(|e| {
        Error::bundle(
            &path,
            format!("cannot read the manifest ({e}); is this a bundle written by `exporter onnx`?"),
        )
    })?;
    crate::manifest::parse(text.as_bytes()).map_err(|e| Error::bundle(&path, e))
}

/// The names of `role`'s inputs and outputs; [`Manifest::validate`] has checked that they
/// are the ones [`Role::input_names`] and [`Role::output_names`] give.
pub(super) fn graph_io(path: &Path, m: &Manifest, role: Role) -> Result<Io> {
    let g = m.graph(role).map_err(|e| Error::bundle(path, e))?;
    Ok(Io::of(g))
}

/// The largest `moda.json` read (a real one is a few kB).
pub(super) const MANIFEST_MAX_BYTES: u64 = 16 << 20;

/// The cores this process may use (its CPU affinity and cgroup quota included).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The default intra-op thread count: the cores this process may use, at most 8, shared by
/// `sessions` session sets.
pub(super) fn default_threads(sessions: usize) -> usize {
    (available_cores().min(8) / sessions.max(1)).max(1)
}
