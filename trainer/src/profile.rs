//! Where an epoch's time goes, for the metrics file: the wall time of each part of the epoch
//! and how busy the CPUs this process may run on were meanwhile (from `/proc/stat`, so
//! hypervisor steal and idle cores show), so that a slow epoch can be told apart from a starved
//! one. A process confined to some of the machine's CPUs (`taskset`, a container's or a batch
//! job's cpuset) is measured on those alone, not diluted by the machine's others.

use std::time::{Duration, Instant};

/// CPU time counters at one moment (`/proc/stat`, in clock ticks): the CPUs this process may
/// run on together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Ticks spent running anything (user, nice, system, irq, softirq).
    pub busy: u64,
    /// Ticks idle or waiting for I/O.
    pub idle: u64,
    /// Ticks the hypervisor gave to other machines (steal).
    pub steal: u64,
}

impl CpuTimes {
    /// The counters now, of the CPUs this process may run on, or `None` where `/proc/stat`
    /// cannot be read (not Linux).
    pub fn now() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        Self::of_cpus(&text, allowed_cpus().as_deref())
    }

    /// The counters of `/proc/stat`'s text `text`: the sum of the lines `cpuN` for the CPUs in
    /// `cpus`, or the aggregate line `cpu` (all CPUs) when `cpus` is `None`, names none of the
    /// lines, or is not a strict subset of them.
    pub fn of_cpus(text: &str, cpus: Option<&[usize]>) -> Option<Self> {
        let aggregate = text.lines().find_map(Self::parse);
        let Some(cpus) = cpus else {
            return aggregate;
        };
        let lines: Vec<(usize, Self)> = text.lines().filter_map(Self::parse_one).collect();
        let mine: Vec<&Self> = lines
            .iter()
            .filter(|(n, _)| cpus.contains(n))
            .map(|(_, t)| t)
            .collect();
        if mine.is_empty() || mine.len() == lines.len() {
            return aggregate;
        }
        Some(mine.iter().fold(Self::default(), |acc, t| Self {
            busy: acc.busy + t.busy,
            idle: acc.idle + t.idle,
            steal: acc.steal + t.steal,
        }))
    }

    /// Parses `/proc/stat`'s aggregate line: `cpu user nice system idle iowait irq softirq
    /// steal ...` (guest time is already counted in user and nice).
    pub fn parse(line: &str) -> Option<Self> {
        let (name, times) = Self::fields(line)?;
        (name == "cpu").then_some(times)
    }

    /// Parses one CPU's line, `cpuN user nice ...`: (N, its counters).
    fn parse_one(line: &str) -> Option<(usize, Self)> {
        let (name, times) = Self::fields(line)?;
        Some((name.strip_prefix("cpu")?.parse().ok()?, times))
    }

    /// A CPU line's name and counters.
    fn fields(line: &str) -> Option<(&str, Self)> {
        let mut fields = line.split_whitespace();
        let name = fields.next()?;
        if !name.starts_with("cpu") {
            return None;
        }
        let v: Vec<u64> = fields.map_while(|f| f.parse().ok()).collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        if v.len() < 4 {
            return None;
        }
        Some((
            name,
            Self {
                busy: at(0) + at(1) + at(2) + at(5) + at(6),
                idle: at(3) + at(4),
                steal: at(7),
            },
        ))
    }

    /// Shares of the ticks since `earlier`: (busy, steal), each in [0, 1]; `None` when no
    /// tick passed.
    pub fn since(&self, earlier: &Self) -> Option<(f64, f64)> {
        let busy = self.busy.saturating_sub(earlier.busy);
        let idle = self.idle.saturating_sub(earlier.idle);
        let steal = self.steal.saturating_sub(earlier.steal);
        let total = busy + idle + steal;
        (total > 0).then(|| (busy as f64 / total as f64, steal as f64 / total as f64))
    }
}

/// The CPUs this process may run on (its affinity mask), or `None` where it cannot be read.
#[cfg(target_os = "linux")]
fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: `set` is a plain bit set that sched_getaffinity fills in for this process (pid 0);
    // CPU_ISSET reads it within its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        Some(
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect(),
        )
    }
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Option<Vec<usize>> {
    None
}

/// One epoch's profile, filled in as the epoch runs.
#[derive(Debug, Clone)]
pub struct EpochProfile {
    started: Instant,
    cpu_at_start: Option<CpuTimes>,
    /// Forward and backward passes of the micro-batches (batching and augmentation
    /// included).
    pub micro_batches: Duration,
    /// Gradient clipping and the optimizer's updates.
    pub optimizer: Duration,
}

impl EpochProfile {
    /// Starts the epoch's clock and CPU counters.
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
            cpu_at_start: CpuTimes::now(),
            micro_batches: Duration::ZERO,
            optimizer: Duration::ZERO,
        }
    }

    /// The wall time since [`EpochProfile::start`].
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The JSON object for the epoch's metrics record: seconds per part (`other` is the rest:
    /// checkpoints, the plot, the main thread between micro-batches) and the CPUs' busy and
    /// steal shares over the epoch (`null` where they cannot be read).
    pub fn to_json(&self, validation: Duration, total: Duration) -> serde_json::Value {
        let shares = CpuTimes::now()
            .zip(self.cpu_at_start)
            .and_then(|(now, then)| now.since(&then));
        let known = self.micro_batches + self.optimizer + validation;
        serde_json::json!({
            "micro_batches_s": self.micro_batches.as_secs_f64(),
            "optimizer_s": self.optimizer.as_secs_f64(),
            "validation_s": validation.as_secs_f64(),
            "other_s": total.saturating_sub(known).as_secs_f64(),
            "cpu_busy": shares.map(|s| s.0),
            "cpu_steal": shares.map(|s| s.1),
            "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aggregate_line_is_read_and_shared_out() {
        let a = CpuTimes::parse("cpu  100 0 50 800 50 0 0 0 0 0").expect("a");
        assert_eq!(
            a,
            CpuTimes {
                busy: 150,
                idle: 850,
                steal: 0
            }
        );
        let b = CpuTimes::parse("cpu  250 0 100 850 50 0 0 50 0 0").expect("b");
        // 200 busy, 50 idle, 50 steal ticks in between.
        let (busy, steal) = b.since(&a).expect("ticks passed");
        assert!((busy - 200.0 / 300.0).abs() < 1e-12, "{busy}");
        assert!((steal - 50.0 / 300.0).abs() < 1e-12, "{steal}");
        assert_eq!(a.since(&a), None);
        assert_eq!(CpuTimes::parse("cpu0 1 2 3 4"), None);
        assert_eq!(CpuTimes::parse("intr 1 2"), None);
    }

    #[test]
    fn a_confined_process_counts_its_own_cpus() {
        let text = "cpu  60 0 0 340 0 0 0 0 0 0\n\
                    cpu0 40 0 0 60 0 0 0 0 0 0\n\
                    cpu1 10 0 0 90 0 0 0 0 0 0\n\
                    cpu2 10 0 0 90 0 0 0 0 0 0\n\
                    cpu3 0 0 0 100 0 0 0 0 0 0\n\
                    intr 1 2 3\n";
        let all = CpuTimes {
            busy: 60,
            idle: 340,
            steal: 0,
        };
        assert_eq!(CpuTimes::of_cpus(text, None), Some(all));
        assert_eq!(
            CpuTimes::of_cpus(text, Some(&[0, 2])),
            Some(CpuTimes {
                busy: 50,
                idle: 150,
                steal: 0
            })
        );
        // Every CPU, or none of those listed: the aggregate line.
        assert_eq!(CpuTimes::of_cpus(text, Some(&[0, 1, 2, 3])), Some(all));
        assert_eq!(CpuTimes::of_cpus(text, Some(&[7])), Some(all));
    }

    #[test]
    fn this_machine_reports_its_counters() {
        // Linux is where the trainer runs its tests; the counters must be readable there.
        if cfg!(target_os = "linux") {
            let t = CpuTimes::now().expect("/proc/stat");
            assert!(t.busy + t.idle > 0);
        }
    }
}
