//! Cached guest states (issue 11): a qcow2 disk saved after some preparation
//! (e.g. the old system with dualroot installed and the migration initramfs
//! built), keyed by the sha256 of everything that preparation depends on, kept
//! under `$DUALROOT_CACHE/states/<name>-<key>/` and used read-only as the backing
//! file of scenario overlays. A changed input (binary, dracut module, bundle,
//! plan, base image, recipe) gives a new key, so exactly what depends on it is
//! built again; an old entry of the same name is removed then. The cache is
//! never required: a missing state is built on first use.

use crate::error::{Context, Result};
use crate::images;
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One input of a state's key.
pub enum Input<'a> {
    /// A file's content (not its path).
    File(&'a Path),
    /// Every file under a directory (relative names and contents, sorted).
    Dir(&'a Path),
    /// A large file named by its path, size and mtime (content hashing would
    /// cost seconds per scenario; its path already carries a recipe hash).
    Stamp(&'a Path),
    Text(&'a str),
}

pub fn key(inputs: &[Input]) -> Result<String> {
    let mut h = Sha256::new();
    for i in inputs {
        match i {
            // Content only, names relative to the input: the same binary or
            // module in another checkout (CI's clone, DUALROOT_BIN) is the same key.
            Input::File(p) => {
                let data = fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                h.update(format!("file {}\n", data.len()));
                h.update(data);
            }
            Input::Dir(d) => {
                let mut files = Vec::new();
                collect(d, &mut files)?;
                files.sort();
                for f in files {
                    let rel = f.strip_prefix(d).unwrap_or(&f);
                    h.update(format!("file {}\n", rel.display()));
                    h.update(fs::read(&f).with_context(|| format!("reading {}", f.display()))?);
                }
            }
            Input::Stamp(p) => {
                let m = fs::metadata(p).with_context(|| format!("stat {}", p.display()))?;
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                h.update(format!("stamp {} {} {mtime}\n", p.display(), m.len()));
            }
            Input::Text(t) => {
                h.update(format!("text {}\n", t.len()));
                h.update(t.as_bytes());
            }
        }
    }
    Ok(hex::encode(h.finalize())[..16].to_string())
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            collect(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// A state ready to be the backing file of an overlay.
#[derive(Debug, Clone)]
pub struct State {
    pub name: String,
    pub key: String,
    /// qcow2; never written after it was built.
    pub disk: PathBuf,
    /// Seconds it took to build in this run; `None` when it came from the cache.
    pub built_secs: Option<f64>,
}

impl State {
    /// For the result table: `name:key (built N s)` or `name:key (cached)`.
    pub fn describe(&self) -> String {
        match self.built_secs {
            Some(s) => format!("{}:{} (built {s:.0} s)", self.name, &self.key[..8]),
            None => format!("{}:{} (cached)", self.name, &self.key[..8]),
        }
    }
}

/// The state `name` for `key`: from the cache, or built by `build`, which must
/// leave a qcow2 disk at the path it is given (powered off, synced).
pub fn get_or_build(
    name: &str,
    key: &str,
    build: impl FnOnce(&Path) -> Result<()>,
) -> Result<State> {
    let root = images::cache_dir().join("states");
    let dir = root.join(format!("{name}-{key}"));
    let disk = dir.join("disk.qcow2");
    if dir.join("ready").is_file() && disk.is_file() {
        println!("[state] {name}: using cached {}", dir.display());
        return Ok(State {
            name: name.into(),
            key: key.into(),
            disk,
            built_secs: None,
        });
    }
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    // Entries of this name with another key depend on something that changed.
    for e in fs::read_dir(&root)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        // `<name>-<key>` exactly: "prepared-old" must not take "prepared-old-lvm-…".
        let stale = n.strip_prefix(&format!("{name}-")).is_some_and(|k| {
            k.len() == key.len() && k.bytes().all(|b| b.is_ascii_hexdigit()) && k != key
        });
        if stale {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let building = root.join(format!(".{name}-{key}.building"));
    if building.exists() {
        fs::remove_dir_all(&building)?;
    }
    fs::create_dir_all(&building)?;
    println!("[state] {name}: building {key} (not cached)");
    let t = Instant::now();
    build(&building.join("disk.qcow2")).with_context(|| format!("building state {name}"))?;
    let secs = t.elapsed().as_secs_f64();
    fs::write(
        building.join("build-info"),
        format!("build_secs={secs:.0}\n"),
    )?;
    fs::write(building.join("ready"), "")?;
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::rename(&building, &dir)
        .with_context(|| format!("renaming {} to {}", building.display(), dir.display()))?;
    println!("[state] {name}: built in {secs:.0} s: {}", dir.display());
    Ok(State {
        name: name.into(),
        key: key.into(),
        disk,
        built_secs: Some(secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same binary and module in another checkout give the same key (CI
    /// clones elsewhere); a changed byte gives another.
    #[test]
    fn keys_follow_content_not_where_the_checkout_is() {
        let d = tempfile::tempdir().unwrap();
        let tree = |at: &str, module: &str| {
            let root = d.path().join(at);
            fs::create_dir_all(root.join("module/sub")).unwrap();
            fs::write(root.join("module/sub/setup.sh"), module).unwrap();
            fs::write(root.join("dualroot"), b"\x7fELF binary").unwrap();
            root
        };
        let of = |root: &Path| {
            key(&[
                Input::File(&root.join("dualroot")),
                Input::Dir(&root.join("module")),
                Input::Text("recipe"),
            ])
            .unwrap()
        };
        let (a, b) = (tree("main", "install x"), tree("ci-clone", "install x"));
        assert_eq!(of(&a), of(&b));
        let c = tree("changed", "install y");
        assert_ne!(of(&a), of(&c));
        // a file moved inside the module is another module
        fs::rename(c.join("module/sub/setup.sh"), c.join("module/setup.sh")).unwrap();
        fs::write(c.join("module/setup.sh"), "install x").unwrap();
        assert_ne!(of(&a), of(&c));
    }
}
