//! Trainable parameters: the models of `moda_models` built over a candle `VarMap`.
//!
//! [`ParamStore`] is a `VarBuilder` backend. For each tensor a model asks for, it takes the
//! value from a checkpoint (under the name asked for or an alias of it) or, for names allowed
//! to be new, draws it from a seeded generator, wraps it in a `Var` and records it in its
//! `VarMap` under the name asked for. Models built through it therefore compute with the
//! `Var`s themselves, and gradients reach them. A tied `lm_head` is the token embedding's
//! tensor (see `moda_models::opt`), so it stays one `Var`.
//!
//! Names are the original recipe's (`opt.model.decoder.*`, `projection.*`) for the decoder
//! store and Hugging Face's (`vision_model.*`, `visual_projection.weight`) for the encoder
//! store, so the `VarMap` is directly the state dict a checkpoint stores.
//!
//! New tensors are initialised as their reference does: the projector as PyTorch's
//! `nn.Linear` (uniform in `±1/sqrt(fan_in)`, weight and bias), backbones as transformers'
//! `_init_weights` (normal with std `init_std`, biases 0, LayerNorm 1 and 0).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use moda_models::Weights;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How a tensor absent from the checkpoint is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NewInit {
    /// Not allowed: a missing tensor is an error.
    Refuse,
    /// PyTorch's `nn.Linear` default: uniform in `±1/sqrt(fan_in)` for weight and bias.
    TorchLinear,
    /// transformers' `_init_weights`: normal(0, std) weights, zero biases, LayerNorm 1/0.
    Normal(f64),
}

struct Inner {
    varmap: VarMap,
    source: Option<Weights>,
    /// Name prefix -> how to draw new tensors under it (first match wins).
    init: Vec<(String, NewInit)>,
    rng: Mutex<ChaCha8Rng>,
}

/// A `VarMap` filled from a checkpoint or a seeded initialisation; see the module docs.
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamStore")
            .field("vars", &self.names().len())
            .finish()
    }
}

/// The names under which `name` may be stored: itself, and for the recipe's
/// `opt.model.decoder.*` / `opt.lm_head.weight` the names of a Hugging Face OPT directory.
fn aliases(name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    if let Some(rest) = name.strip_prefix("opt.model.decoder.") {
        out.push(format!("model.decoder.{rest}"));
        out.push(format!("decoder.{rest}"));
    } else if name == "opt.lm_head.weight" {
        out.push("lm_head.weight".into());
    }
    out
}

fn normal(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    // Box-Muller.
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((r * t.cos()) as f32);
        if out.len() < n {
            out.push((r * t.sin()) as f32);
        }
    }
    out
}

impl ParamStore {
    /// A store reading `source` (if any), drawing missing tensors by `init` (prefix rules),
    /// from a generator seeded with `seed`.
    pub fn new(source: Option<Weights>, init: Vec<(String, NewInit)>, seed: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                varmap: VarMap::new(),
                source,
                init,
                rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            }),
        }
    }

    /// A `VarBuilder` over this store (f32).
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// The names of the variables created so far, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match self.inner.varmap.data().lock() {
            Ok(d) => d.keys().cloned().collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    /// The variables, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut vars: Vec<(String, Var)> = match self.inner.varmap.data().lock() {
            Ok(d) => d.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => Vec::new(),
        };
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The current values, by name (the state dict a checkpoint stores). The tensors share
    /// the variables' storage: they change with the next optimizer step (see
    /// [`ParamStore::snapshot`]).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect()
    }

    /// A copy of the current values, by name, that later steps leave alone.
    pub fn snapshot(&self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        self.vars()
            .into_iter()
            .map(|(k, v)| Ok((k, v.as_tensor().copy()?.detach())))
            .collect()
    }

    /// The number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    fn rule(&self, name: &str) -> NewInit {
        self.inner
            .init
            .iter()
            .find(|(p, _)| name.starts_with(p.as_str()))
            .map_or(NewInit::Refuse, |(_, i)| *i)
    }

    fn draw(&self, s: &Shape, name: &str, init: Init, dev: &Device) -> candle_core::Result<Tensor> {
        let n = s.elem_count();
        let rule = self.rule(name);
        let mut rng = self
            .inner
            .rng
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter generator poisoned".into()))?;
        let values: Vec<f32> = match rule {
            NewInit::Refuse => candle_core::bail!(
                "tensor `{name}` not found in {}",
                self.inner
                    .source
                    .as_ref()
                    .map_or("the checkpoint".to_string(), |w| w
                        .source()
                        .display()
                        .to_string())
            ),
            NewInit::TorchLinear => {
                // fan_in: the weight's second dim; a bias shares its layer's (the weight is
                // asked for first, and its fan_in kept here).
                let fan_in = if s.dims().len() >= 2 {
                    s.dims()[1..].iter().product::<usize>()
                } else {
                    self.fan_in_of(name).unwrap_or(n)
                };
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..n)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect()
            }
            NewInit::Normal(std) => match init {
                Init::Const(c) => vec![c as f32; n],
                _ if name.ends_with(".bias") => vec![0.0; n],
                _ => normal(&mut rng, n, std),
            },
        };
        Tensor::from_vec(values, s.clone(), dev)
    }

    /// The fan-in of the weight next to a bias (`x.bias` -> `x.weight`'s second dim).
    fn fan_in_of(&self, bias: &str) -> Option<usize> {
        let w = format!("{}.weight", bias.strip_suffix(".bias")?);
        let data = self.inner.varmap.data().lock().ok()?;
        let v = data.get(&w)?;
        v.dims().get(1).copied()
    }
}

impl SimpleBackend for ParamStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(data) = self.inner.varmap.data().lock() {
            if let Some(v) = data.get(name) {
                if v.shape() != &s {
                    candle_core::bail!(
                        "tensor `{name}` asked for with shape {s:?}, already {:?}",
                        v.shape()
                    );
                }
                return Ok(v.as_tensor().clone());
            }
        }
        let found = self.inner.source.as_ref().and_then(|w| {
            aliases(name)
                .into_iter()
                .find(|a| w.contains(a))
                .map(|a| (w, a))
        });
        let value = match found {
            Some((w, alias)) => w.get(s.clone(), &alias, init, dtype, dev)?,
            None => self.draw(&s, name, init, dev)?.to_dtype(dtype)?,
        };
        let var = Var::from_tensor(&value)?;
        let t = var.as_tensor().clone();
        match self.inner.varmap.data().lock() {
            Ok(mut data) => {
                data.insert(name.to_string(), var);
            }
            Err(_) => candle_core::bail!("parameter map poisoned"),
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Ok(data) = self.inner.varmap.data().lock() {
            if let Some(v) = data.get(name) {
                return v.as_tensor().to_dtype(dtype);
            }
        }
        match &self.inner.source {
            Some(w) => w.get_unchecked(name, dtype, dev),
            None => candle_core::bail!("tensor `{name}` has no value to take its shape from"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let in_map = self
            .inner
            .varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false);
        in_map
            || match &self.inner.source {
                Some(w) => aliases(name).iter().any(|a| w.contains(a)),
                // A fresh model: report the recipe's layout as present, so that OPT is built
                // under `opt.model.decoder.*`.
                None => self.rule(name) != NewInit::Refuse,
            }
    }
}
