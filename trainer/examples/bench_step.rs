//! One training step of the real-size model (OPT-125m + projector, random weights, embeddings
//! given as for the cached encoder): batch 32, 20 text tokens, forward + backward + clip +
//! AdamW, on the CPU. `scripts/bench_step.py` times the same step in PyTorch.
//!
//! `cargo run --release -p trainer --example bench_step -- [steps]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use moda_models::{
    CaptionModel, ClipVision, ClipVisionConfig, Opt, OptConfig, Projector, ProjectorConfig,
};
use trainer::optim::{AdamW, AdamWParams};
use trainer::params::{NewInit, ParamStore};

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5);
    // As the trainer binary does (BENCH_GLIBC_DEFAULTS=1 to see the difference).
    if std::env::var_os("BENCH_GLIBC_DEFAULTS").is_none() {
        trainer::alloc::keep_freed_memory();
    }
    // As the trainer binary does (CANDLE_BARRIER_POOL_SPIN_LIMIT=25000, candle's default, to
    // see the difference).
    trainer::threads::park_idle_elementwise_workers();
    let dev = Device::Cpu;
    let (b, t) = (32usize, 20usize);
    // OPT-125m geometry; BENCH_LAYERS=n changes the depth (to see where the time goes).
    let mut dcfg = OptConfig::default();
    if let Some(n) = std::env::var("BENCH_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        dcfg.num_hidden_layers = n;
    }
    let store = ParamStore::new(
        None,
        vec![
            ("projection.".into(), NewInit::TorchLinear),
            ("opt.".into(), NewInit::Normal(0.02)),
        ],
        0,
    );
    let vb = store.var_builder(&dev);
    let decoder = Opt::new(&dcfg, vb.pp("opt"))?;
    let projector = Projector::new(&ProjectorConfig::new(512, 768), vb)?;
    // A one-layer stand-in encoder: the step uses cached embeddings, the encoder never runs.
    let ecfg = ClipVisionConfig {
        num_hidden_layers: 1,
        ..ClipVisionConfig::default()
    };
    let enc_store = ParamStore::new(None, vec![(String::new(), NewInit::Normal(0.02))], 1);
    let encoder = ClipVision::new(&ecfg, enc_store.var_builder(&dev))?;
    let model = CaptionModel::new(encoder, projector, decoder)?;
    let mut adam = AdamW::new(store.vars(), AdamWParams::default())?;
    println!("parameters: {}", store.num_params());
    let embeds = Tensor::randn(0f32, 1.0, (b, 512), &dev)?;
    let ids = Tensor::rand(4f32, 50000.0, (b, t), &dev)?.to_dtype(DType::U32)?;
    let mask = Tensor::ones((b, t), DType::F32, &dev)?;
    let mut times = Vec::new();
    for i in 0..steps + 1 {
        let start = Instant::now();
        let prefix = model.project(&embeds)?;
        let batch = model.build_batch(&prefix, &ids, &mask)?;
        let loss = trainer::loss::causal_lm_loss(&model.logits(&batch)?, &batch.labels)?;
        let lv = loss.to_scalar::<f32>()?;
        let t_fwd = start.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        let t_bwd = start.elapsed().as_secs_f64();
        adam.accumulate(&grads)?;
        adam.clip_grad_norm(1.0)?;
        adam.step()?;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "step {i}: loss {lv:.4}, {secs:.3}s (forward {t_fwd:.3}s, backward {:.3}s, \
             clip + AdamW {:.3}s)",
            t_bwd - t_fwd,
            secs - t_bwd
        );
        if i > 0 {
            times.push(secs);
        }
    }
    times.sort_by(f64::total_cmp);
    println!("candle median step: {:.3}s", times[times.len() / 2]);
    Ok(())
}
