//! The migration's peak memory as it really happens (issue 25): dualroot's
//! resident memory and the staging tmpfs *at the same moment*, sampled every
//! 100 ms on a thread of its own, with the step it happened in. (The two
//! high-water marks alone add up to more than was ever used at once: the
//! tmpfs is fullest during the window, the decoder busiest during unpack,
//! after the tmpfs is gone.)

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The largest coincident use seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peak {
    /// RSS + tmpfs at the same sample.
    pub bytes: u64,
    pub rss_bytes: u64,
    pub tmpfs_bytes: u64,
    /// The step running then.
    pub step: String,
}

impl Peak {
    /// Keeps the larger of the two.
    pub fn merge(&mut self, other: &Peak) {
        if other.bytes > self.bytes {
            *self = other.clone();
        }
    }
}

/// Resident bytes of this process (`/proc/self/statm`, second field, pages).
pub fn rss_bytes(statm: &str) -> Option<u64> {
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64)
}

/// Used bytes of `dir` when a tmpfs is mounted there (else 0: after the
/// staging tmpfs is unmounted its mount point belongs to another filesystem).
pub fn tmpfs_used(dir: &Path) -> u64 {
    match nix::sys::statfs::statfs(dir) {
        Ok(s) if s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC => {
            crate::fsutil::used_bytes(dir).unwrap_or(0)
        }
        _ => 0,
    }
}

/// Samples until dropped.
pub struct Sampler {
    peak: Arc<Mutex<Peak>>,
    step: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling this process and the tmpfs at `ram`, from `start` (the
    /// journal's peak of earlier boots).
    pub fn start(ram: PathBuf, start: Peak) -> Sampler {
        let peak = Arc::new(Mutex::new(start));
        let step = Arc::new(Mutex::new(String::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s, st) = (peak.clone(), step.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("memory-sampler".into())
            .spawn(move || {
                while !st.load(Ordering::SeqCst) {
                    sample(&ram, &p, &s);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .ok();
        Sampler {
            peak,
            step,
            stop,
            handle,
        }
    }

    pub fn set_step(&self, name: &str) {
        *self.step.lock().unwrap_or_else(|e| e.into_inner()) = name.to_string();
    }

    /// The peak so far (sampled once more now).
    pub fn peak(&self, ram: &Path) -> Peak {
        sample(ram, &self.peak, &self.step);
        self.peak.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn sample(ram: &Path, peak: &Mutex<Peak>, step: &Mutex<String>) {
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|t| rss_bytes(&t))
        .unwrap_or(0);
    let tmpfs = tmpfs_used(ram);
    let now = Peak {
        bytes: rss + tmpfs,
        rss_bytes: rss,
        tmpfs_bytes: tmpfs,
        step: step.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    };
    peak.lock().unwrap_or_else(|e| e.into_inner()).merge(&now);
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_resident_pages() {
        assert_eq!(
            rss_bytes("5000 1200 300 10 0 900 0\n"),
            Some(1200 * page_size())
        );
        assert_eq!(rss_bytes(""), None);
    }

    #[test]
    fn a_directory_that_is_no_tmpfs_counts_nothing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), vec![1u8; 1 << 20]).unwrap();
        let on_tmpfs = nix::sys::statfs::statfs(d.path())
            .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
            .unwrap_or(false);
        if !on_tmpfs {
            assert_eq!(tmpfs_used(d.path()), 0);
        }
    }

    #[test]
    fn the_sampler_sees_memory_held_between_two_steps() {
        let d = tempfile::tempdir().unwrap();
        let s = Sampler::start(d.path().to_path_buf(), Peak::default());
        s.set_step("unpack");
        let before = s.peak(d.path()).rss_bytes;
        // 64 MiB touched, then released before anyone asks for the peak.
        let mut v = vec![0u8; 64 << 20];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        std::thread::sleep(Duration::from_millis(350));
        drop(v);
        let p = s.peak(d.path());
        assert!(p.rss_bytes >= before + (60 << 20), "{p:?}, before {before}");
        assert_eq!(p.step, "unpack");
        // An earlier boot's larger peak stays.
        let mut kept = Peak {
            bytes: u64::MAX,
            ..Default::default()
        };
        kept.merge(&p);
        assert_eq!(kept.bytes, u64::MAX);
    }
}
