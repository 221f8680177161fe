//! The order in which an epoch draws the training samples: a seeded shuffle per epoch (so a
//! resumed run sees the same order), or repeat factor sampling, which draws samples of rare
//! attribute groups more often.

use std::collections::{BTreeMap, HashMap};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::{Catalog, Split};
use crate::error::{Error, Result};

use super::config::FitConfig;
use super::Log;

/// The order of the training samples in `epoch`: a ChaCha8 shuffle seeded by the run's seed
/// and the epoch, so that a resumed run sees the same order.
pub(super) fn epoch_order(train: &[usize], seed: u64, epoch: usize) -> Vec<usize> {
    let mut order = train.to_vec();
    order.shuffle(&mut epoch_rng(seed, epoch));
    order
}

/// The generator of an epoch's data order, from the run's seed and the epoch.
pub(super) fn epoch_rng(seed: u64, epoch: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9)
            .wrapping_add(epoch as u64 + 1),
    )
}

/// Repeat factor sampling (Gupta, Dollar and Girshick, "LVIS", 2019) over catalog columns:
/// the training samples are grouped by their values in `columns`, and a sample of a group
/// that makes up a fraction `f` of them gets the repeat factor `r = max(1, sqrt(threshold /
/// f))`. Returns each sample's factor as an integer weight (`r` in units of 2^-20), in the
/// order of `samples`, or an error naming a column that a sample lacks.
pub fn repeat_weights(
    samples: &[&BTreeMap<String, String>],
    columns: &[String],
    threshold: f64,
) -> std::result::Result<Vec<u64>, String> {
    let mut keys = Vec::with_capacity(samples.len());
    for attributes in samples {
        let mut key = Vec::with_capacity(columns.len());
        for c in columns {
            match attributes.get(c) {
                Some(v) => key.push(v.as_str()),
                None => {
                    let mut have: Vec<&str> = attributes.keys().map(String::as_str).collect();
                    have.sort_unstable();
                    return Err(format!(
                        "--repeat-rare: no column {c:?} in the catalog (its columns: {})",
                        have.join(", ")
                    ));
                }
            }
        }
        keys.push(key);
    }
    let mut counts: HashMap<&[&str], usize> = HashMap::new();
    for k in &keys {
        *counts.entry(k.as_slice()).or_default() += 1;
    }
    let n = samples.len().max(1) as f64;
    Ok(keys
        .iter()
        .map(|k| {
            let f = counts[k.as_slice()] as f64 / n;
            let r = (threshold / f).sqrt().max(1.0);
            (r * f64::from(1u32 << 20)).round() as u64
        })
        .collect())
}

/// The samples of an epoch under repeat factor sampling: as many as `train` holds, sample
/// `train[i]` drawn about `weights[i] / mean(weights)` times (systematic sampling over a
/// shuffled order, so that each count is the floor or the ceiling of its expectation), then
/// shuffled; seeded like [`epoch_order`], so that a resumed run draws the same.
pub(super) fn weighted_epoch_order(
    train: &[usize],
    weights: &[u64],
    seed: u64,
    epoch: usize,
) -> Vec<usize> {
    let mut rng = epoch_rng(seed, epoch);
    let mut pos: Vec<usize> = (0..train.len().min(weights.len())).collect();
    pos.shuffle(&mut rng);
    let total: u128 = pos.iter().map(|&p| u128::from(weights[p])).sum();
    let n = pos.len() as u128;
    if total == 0 {
        return epoch_order(train, seed, epoch);
    }
    // Sample j's count: the multiples of `total` that its share of [0, n * total) crosses,
    // offset by `u`; the counts add up to exactly n.
    let u = rand::Rng::random_range(&mut rng, 0..total);
    let mut order = Vec::with_capacity(train.len());
    let mut cum: u128 = 0;
    for &p in &pos {
        let before = (cum * n + u) / total;
        cum += u128::from(weights[p]);
        let after = (cum * n + u) / total;
        for _ in before..after {
            order.push(train[p]);
        }
    }
    order.shuffle(&mut rng);
    order
}

/// Repeat factor sampling's weights over the training split (see [`repeat_weights`]), when
/// configured, with a line in the log on what they do.
pub(super) fn sampling_weights(
    cfg: &FitConfig,
    catalog: &Catalog,
    split: &Split,
    log: &mut Log,
) -> Result<Option<Vec<u64>>> {
    if cfg.repeat_columns.is_empty() {
        return Ok(None);
    }
    let attributes: Vec<&BTreeMap<String, String>> = split
        .train
        .iter()
        .map(|&i| &catalog.samples[i].attributes)
        .collect();
    let weights = repeat_weights(&attributes, &cfg.repeat_columns, cfg.repeat_threshold)
        .map_err(|m| Error::InvalidArgument(format!("{}: {m}", catalog.csv.display())))?;
    let unit = f64::from(1u32 << 20);
    let mean = weights.iter().sum::<u64>() as f64 / weights.len().max(1) as f64;
    let max = weights.iter().copied().max().unwrap_or(0) as f64;
    let repeated = weights.iter().filter(|&&w| w as f64 > unit).count();
    log.say(format!(
        "repeat factor sampling over {}: {repeated} of {} training samples are in groups under \
         {} of them; per epoch the rarest are drawn {:.2} times on average, the commonest {:.2}",
        cfg.repeat_columns.join(", "),
        weights.len(),
        cfg.repeat_threshold,
        max / mean.max(1.0),
        unit / mean.max(1.0)
    ));
    Ok(Some(weights))
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rows(values: &[(&str, &str)]) -> Vec<BTreeMap<String, String>> {
        values
            .iter()
            .map(|(t, u)| {
                BTreeMap::from([
                    ("ProductType".to_string(), t.to_string()),
                    ("Usage".to_string(), u.to_string()),
                ])
            })
            .collect()
    }

    #[test]
    fn repeat_factors_follow_the_rarity_of_each_group() {
        // 100 samples: 80 in one group, 16 in a second, 4 in a third. With t = 0.16 the
        // factors are 1 (f = 0.8 >= t), 1 (f = t) and sqrt(0.16 / 0.04) = 2.
        let mut v = vec![("Jeans", "Casual"); 80];
        v.extend(vec![("Heels", "Ethnic"); 16]);
        v.extend(vec![("Heels", "Formal"); 4]);
        let rows = rows(&v);
        let refs: Vec<&BTreeMap<String, String>> = rows.iter().collect();
        let cols = ["ProductType".to_string(), "Usage".to_string()];
        let w = repeat_weights(&refs, &cols, 0.16).unwrap();
        let unit = 1u64 << 20;
        assert_eq!(&w[..80], &vec![unit; 80][..]);
        assert_eq!(&w[80..96], &vec![unit; 16][..]);
        assert_eq!(&w[96..], &vec![2 * unit; 4][..]);
        // One column alone: the two Heels groups are one (f = 0.2 >= t).
        let w = repeat_weights(&refs, &cols[..1], 0.16).unwrap();
        assert!(w.iter().all(|&x| x == unit));
        // A column the catalog lacks is named.
        let err = repeat_weights(&refs, &["Season".to_string()], 0.16).unwrap_err();
        assert!(
            err.contains("\"Season\"") && err.contains("ProductType, Usage"),
            "{err}"
        );
    }

    #[test]
    fn a_weighted_epoch_draws_each_sample_by_its_weight() {
        // Samples 10..20 (ids), the last two weighted 3x: per epoch 12 draws are spread as
        // 8 x (10/14) + 2 x (30/14); each count is the floor or ceiling of its expectation,
        // the epoch holds exactly as many samples as the split, and the same epoch and seed
        // draw the same order.
        let train: Vec<usize> = (10..20).collect();
        let mut w = vec![1u64 << 20; 10];
        w[8] = 3 << 20;
        w[9] = 3 << 20;
        let mut seen_rare = 0usize;
        for epoch in 0..50 {
            let order = weighted_epoch_order(&train, &w, 7, epoch);
            assert_eq!(order.len(), train.len());
            assert_eq!(order, weighted_epoch_order(&train, &w, 7, epoch));
            let count = |id: usize| order.iter().filter(|&&x| x == id).count();
            for id in 10..18 {
                assert!(count(id) <= 1, "epoch {epoch}: {order:?}");
            }
            for id in 18..20 {
                assert!((2..=3).contains(&count(id)), "epoch {epoch}: {order:?}");
            }
            seen_rare += count(18) + count(19);
        }
        // 50 epochs x 2 x 30/14 = 214.3 expected draws of the two heavy samples.
        assert!((210..=219).contains(&seen_rare), "{seen_rare}");
        // Equal weights: every sample exactly once.
        let mut order = weighted_epoch_order(&train, &[5; 10], 3, 1);
        order.sort_unstable();
        assert_eq!(order, train);
    }
}
