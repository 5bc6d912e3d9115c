//! What every stage does before it writes: refuse an output that is one of its inputs, take
//! an exclusive lock on the output, and clear the temp files a killed run of that output
//! left behind.
//!
//! The lock is a file `<out>.lock` beside the output (file or folder) created with
//! `create_new` and holding `pid host`; it is removed when the [`OutputLock`] drops. A lock
//! whose process is gone (same host, no such pid) is stale and taken over; any other held
//! lock makes the second run fail at once, naming the holder.

use crate::error::{CoreError, Result};
use std::path::{Path, PathBuf};

/// An exclusive claim on one output path; released on drop.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
}

/// `<out>.lock`.
pub fn lock_path(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    out.with_file_name(format!("{name}.lock"))
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Whether process `pid` runs on this host; `None` where we cannot tell (no /proc).
fn pid_alive(pid: u32) -> Option<bool> {
    if !Path::new("/proc/self").exists() {
        return None;
    }
    Some(Path::new(&format!("/proc/{pid}")).exists())
}

impl OutputLock {
    /// Takes the lock of `out` (its parent folder is created), or fails naming the process
    /// that holds it.
    pub fn acquire(out: &Path) -> Result<Self> {
        let path = lock_path(out);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
        }
        let me = format!("{} {}\n", std::process::id(), host());
        for _ in 0..3 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(me.as_bytes()).map_err(|e| CoreError::io(&path, e))?;
                    return Ok(OutputLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let mut it = text.split_whitespace();
                    let pid: Option<u32> = it.next().and_then(|p| p.parse().ok());
                    let their_host = it.next().unwrap_or("").to_string();
                    let stale = match pid {
                        // An empty lock: its writer died between create and write.
                        None => std::fs::metadata(&path)
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|m| m.elapsed().ok())
                            .is_some_and(|d| d.as_secs() > 10),
                        Some(p) => their_host == host() && pid_alive(p) == Some(false),
                    };
                    if stale {
                        tracing::warn!("{}: taking over a stale lock ({})", path.display(), text.trim());
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    let holder = match pid {
                        Some(p) if their_host == host() => format!("process {p} on this host"),
                        Some(p) => format!("process {p} on host '{their_host}'"),
                        None => "a process that is starting".into(),
                    };
                    return Err(CoreError::Invalid(format!(
                        "{} is being written by {holder} (lock {}): wait for it to finish, or remove \
                         the lock file if that process is gone",
                        out.display(),
                        path.display()
                    )));
                }
                Err(e) => return Err(CoreError::io(&path, e)),
            }
        }
        Err(CoreError::Invalid(format!("{}: could not take the lock {}", out.display(), path.display())))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The absolute, normalized form of `p` (symlinks of the existing part resolved), for
/// comparing paths that may not exist yet.
fn normalize(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match (parent.canonicalize(), p.file_name()) {
        (Ok(d), Some(n)) => d.join(n),
        _ => std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf()),
    }
}

/// Refuses an output that is one of the inputs, or a folder output that contains one (the
/// run would overwrite or delete what it reads). `inputs` name their flag: `("--samples", path)`.
pub fn refuse_overlap(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let o = normalize(out);
    for (flag, input) in inputs {
        let i = normalize(input);
        if i == o {
            return Err(CoreError::Invalid(format!(
                "--out {} is the input {flag} {}: the run would overwrite what it reads; choose another --out",
                out.display(),
                input.display()
            )));
        }
        if o.is_dir() && i.starts_with(&o) {
            return Err(CoreError::Invalid(format!(
                "--out {} contains the input {flag} {}: the run would overwrite what it reads; choose another --out",
                out.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// Removes the temp files (`.<name>.tmp-<pid>-...`, see `shard::atomic_write`) that runs
/// which are gone left beside `out` and, for a folder output, inside it (recursively, with
/// the trainer's `*.partial-<pid>` checkpoint folders).
/// Called with the output's lock held; returns how many were removed.
pub fn sweep_stale_temps(out: &Path) -> usize {
    let mut removed = 0;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    // Beside the output: its own temps (`.x.parquet.tmp-...`) and its manifest's.
    let stem = out.with_extension("").file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Ok(rd) = std::fs::read_dir(parent) {
        for e in rd.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            let ours = f.starts_with(&format!(".{name}.tmp-")) || f.starts_with(&format!(".{stem}.manifest.json.tmp-"));
            if ours && dead_temp(&f) && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    if out.is_dir() {
        removed += sweep_dir(out, 0);
    }
    if removed > 0 {
        tracing::info!("{}: removed {removed} temp file(s) of killed runs", out.display());
    }
    removed
}

fn sweep_dir(dir: &Path, depth: usize) -> usize {
    let mut removed = 0;
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    for e in rd.flatten() {
        let p = e.path();
        let f = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            // A checkpoint folder a killed trainer was writing (`step-000500.partial-<pid>`).
            let partial = f.rsplit_once(".partial-").and_then(|(_, pid)| pid.parse::<u32>().ok());
            if let Some(pid) = partial {
                if pid != std::process::id() && pid_alive(pid) == Some(false) && std::fs::remove_dir_all(&p).is_ok() {
                    removed += 1;
                }
            } else if depth < 4 {
                removed += sweep_dir(&p, depth + 1);
            }
        } else if f.starts_with('.') && f.contains(".tmp-") && dead_temp(&f) && std::fs::remove_file(&p).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A temp name `.x.tmp-<pid>-<nanos>-<n>` whose process is gone on this host.
fn dead_temp(name: &str) -> bool {
    let Some(rest) = name.rsplit_once(".tmp-").map(|(_, r)| r) else { return false };
    let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { return false };
    pid != std::process::id() && pid_alive(pid) == Some(false)
}

/// Everything a stage does before writing `out`: refuse an output that is an input, take the
/// lock, clear temp files of killed runs. Keep the returned lock until the output is written.
pub fn claim_output(out: &Path, inputs: &[(&str, &Path)]) -> Result<OutputLock> {
    refuse_overlap(out, inputs)?;
    let lock = OutputLock::acquire(out)?;
    sweep_stale_temps(out);
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_released_and_stale_locks_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.parquet");
        let a = OutputLock::acquire(&out).unwrap();
        let e = OutputLock::acquire(&out).unwrap_err().to_string();
        assert!(e.contains(&format!("process {}", std::process::id())) && e.contains("x.parquet.lock"), "{e}");
        drop(a);
        let b = OutputLock::acquire(&out).unwrap();
        drop(b);
        // A lock of a process that is gone: pid 2^22+1 is above Linux's pid_max.
        std::fs::write(lock_path(&out), format!("4194305 {}\n", host())).unwrap();
        let c = OutputLock::acquire(&out).unwrap();
        assert!(std::fs::read_to_string(c.path()).unwrap().starts_with(&std::process::id().to_string()));
    }

    #[test]
    fn overlap_and_temp_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.parquet");
        std::fs::write(&input, b"x").unwrap();
        let e = refuse_overlap(&dir.path().join("./in.parquet"), &[("--samples", &input)]).unwrap_err().to_string();
        assert!(e.contains("--samples") && e.contains("overwrite"), "{e}");
        let e = refuse_overlap(dir.path(), &[("--init", &input)]).unwrap_err().to_string();
        assert!(e.contains("contains the input --init"), "{e}");
        refuse_overlap(&dir.path().join("out.parquet"), &[("--samples", &input)]).unwrap();
        // Temps of a dead pid go; ours and unrelated files stay.
        let out = dir.path().join("pred.parquet");
        let dead = dir.path().join(".pred.parquet.tmp-4194305-1a-0");
        let mine = dir.path().join(format!(".pred.parquet.tmp-{}-1b-0", std::process::id()));
        let other = dir.path().join(".other.parquet.tmp-4194305-1c-0");
        for f in [&dead, &mine, &other] {
            std::fs::write(f, b"t").unwrap();
        }
        assert_eq!(sweep_stale_temps(&out), 1);
        assert!(!dead.exists() && mine.exists() && other.exists());
        // Folder outputs: temps inside, at any depth.
        let model = dir.path().join("sft");
        std::fs::create_dir_all(model.join("checkpoints/step-4")).unwrap();
        let deep = model.join("checkpoints/step-4/.model.safetensors.tmp-4194305-2-0");
        std::fs::write(&deep, b"t").unwrap();
        let partial = model.join("checkpoints/step-000008.partial-4194305");
        std::fs::create_dir_all(&partial).unwrap();
        assert_eq!(sweep_stale_temps(&model), 2);
        assert!(!deep.exists() && !partial.exists() && model.join("checkpoints/step-4").is_dir());
    }
}
