//! Where committed checkpoints live. A checkpoint is a flat set of files (PEFT layout:
//! adapter_model.safetensors, adapter_config.json, optimizer.safetensors,
//! trainer_state.json, …) named `checkpoint-<step>`; it appears whole or not at all.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Names, offsets or digests that do not add up; nothing was written.
    #[error("checkpoint-{step}: {msg}")]
    Invalid { step: u64, msg: String },
    #[error("checkpoint-{0} does not exist")]
    Missing(u64),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// The size and SHA-256 a file of a checkpoint must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    pub path: String,
    pub size: u64,
    pub sha256: [u8; 32],
}

impl FileDigest {
    pub fn of(path: &str, data: &[u8]) -> Self {
        Self { path: path.to_string(), size: data.len() as u64, sha256: Sha256::digest(data).into() }
    }
}

/// [`FileDigest`] of a file that arrives in pieces.
pub struct FileHasher {
    path: String,
    size: u64,
    sha: Sha256,
}

impl FileHasher {
    pub fn new(path: &str) -> Self {
        Self { path: path.to_string(), size: 0, sha: Sha256::new() }
    }
    pub fn update(&mut self, data: &[u8]) {
        self.size += data.len() as u64;
        self.sha.update(data);
    }
    pub fn finish(self) -> FileDigest {
        FileDigest { path: self.path, size: self.size, sha256: self.sha.finalize().into() }
    }
}

/// One checkpoint being written. Dropping it without [`CheckpointWriter::commit`] leaves
/// nothing behind.
pub trait CheckpointWriter: Send {
    /// Appends `data` at `offset` of the file `path` (relative, '/'-separated). Chunks of
    /// one file arrive in order, so `offset` must equal what was written so far.
    fn write(&mut self, path: &str, offset: u64, data: &[u8]) -> Result<(), StoreError>;
    /// Checks the files against `expected` (same set, sizes and SHA-256), then makes the
    /// checkpoint durable and visible at once. Returns the bytes stored.
    fn commit(self: Box<Self>, expected: &[FileDigest]) -> Result<u64, StoreError>;
}

pub trait CheckpointStore: Send + Sync {
    fn begin(&self, step: u64) -> Result<Box<dyn CheckpointWriter>, StoreError>;
    /// Steps of the stored checkpoints, ascending.
    fn list(&self) -> Result<Vec<u64>, StoreError>;
    /// Relative paths of the files of checkpoint-<step>, sorted.
    fn files(&self, step: u64) -> Result<Vec<String>, StoreError>;
    fn open(&self, step: u64, path: &str) -> Result<Box<dyn Read + Send>, StoreError>;
    /// Publishes checkpoint-<step> as the job's final model.
    fn finalize(&self, step: u64) -> Result<(), StoreError>;
    /// Deletes checkpoint-<step> (save_total_limit).
    fn remove(&self, step: u64) -> Result<(), StoreError>;
}

/// Checks a relative file name coming off the network: no absolute paths, no `..`, no
/// empty or hidden-temp components, so a writer can only ever touch its own directory.
pub fn check_relative(step: u64, path: &str) -> Result<PathBuf, StoreError> {
    let bad = |why: &str| StoreError::Invalid { step, msg: format!("file name {path:?} {why}") };
    if path.is_empty() || path.len() > 512 {
        return Err(bad("is empty or longer than 512 bytes"));
    }
    if path.contains('\\') || path.contains('\0') {
        return Err(bad("contains '\\' or NUL"));
    }
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) if !s.is_empty() => out.push(s),
            _ => return Err(bad("must be relative and must not contain '.', '..' or empty parts")),
        }
    }
    if path.split('/').any(|s| s.is_empty()) {
        return Err(bad("must be relative and must not contain '.', '..' or empty parts"));
    }
    Ok(out)
}

/// Checkpoints as directories under a root (the job's output_dir):
/// `<root>/checkpoint-<step>/…` and `<root>/final_model/…`.
pub struct LocalDirStore {
    root: PathBuf,
}

impl LocalDirStore {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io(&root))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, step: u64) -> PathBuf {
        self.root.join(format!("checkpoint-{step}"))
    }
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

/// Moves the finished temp dir `tmp` to `dest`, replacing an older `dest` (a checkpoint
/// of a step that was rolled back and trained again), and makes the rename durable.
fn publish(tmp: &Path, dest: &Path) -> Result<(), StoreError> {
    let parent = dest.parent().expect("checkpoint dirs live under a root");
    if dest.exists() {
        let old = parent.join(format!(".{}.old-{}", dest.file_name().unwrap().to_string_lossy(), std::process::id()));
        let _ = fs::remove_dir_all(&old);
        fs::rename(dest, &old).map_err(io(dest))?;
        fs::rename(tmp, dest).map_err(io(dest))?;
        fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        fs::rename(tmp, dest).map_err(io(dest))?;
    }
    fsync_dir(parent)
}

/// Replaces the file `path` by `data` so that a crash at any point leaves either the old
/// file or the new one, never a mix: write a temp file beside it, sync, rename, sync the
/// directory.
pub fn write_file_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}-{:016x}", std::process::id(), rand::random::<u64>()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(data).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), StoreError> {
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        if e.file_type().map_err(io(&e.path()))?.is_dir() {
            walk(&e.path(), &rel, out)?;
        } else {
            out.push(rel);
        }
    }
    Ok(())
}

struct LocalWriter {
    step: u64,
    tmp: PathBuf,
    dest: PathBuf,
    /// Open files and how many bytes each has so far.
    files: Vec<(String, File, u64)>,
    done: bool,
}

impl CheckpointWriter for LocalWriter {
    fn write(&mut self, path: &str, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let step = self.step;
        let i = match self.files.iter().position(|(p, _, _)| p == path) {
            Some(i) => i,
            None => {
                let rel = check_relative(step, path)?;
                let full = self.tmp.join(&rel);
                if let Some(d) = full.parent() {
                    fs::create_dir_all(d).map_err(io(d))?;
                }
                let f = OpenOptions::new().write(true).create_new(true).open(&full).map_err(io(&full))?;
                self.files.push((path.to_string(), f, 0));
                self.files.len() - 1
            }
        };
        let (_, f, len) = &mut self.files[i];
        if offset != *len {
            return Err(StoreError::Invalid { step, msg: format!("{path}: chunk at offset {offset}, but {len} bytes were written so far") });
        }
        f.write_all(data).map_err(io(&self.tmp.join(path)))?;
        *len += data.len() as u64;
        Ok(())
    }

    fn commit(mut self: Box<Self>, expected: &[FileDigest]) -> Result<u64, StoreError> {
        let step = self.step;
        let mut got: Vec<&str> = self.files.iter().map(|(p, _, _)| p.as_str()).collect();
        let mut want: Vec<&str> = expected.iter().map(|d| d.path.as_str()).collect();
        got.sort_unstable();
        want.sort_unstable();
        if got != want {
            return Err(StoreError::Invalid { step, msg: format!("received files {got:?}, but the trailer lists {want:?}") });
        }
        let mut total = 0;
        for (path, f, len) in &mut self.files {
            let full = self.tmp.join(&*path);
            f.sync_all().map_err(io(&full))?;
            let d = expected.iter().find(|d| d.path == *path).expect("same set");
            let mut h = Sha256::new();
            let mut r = File::open(&full).map_err(io(&full))?;
            std::io::copy(&mut r, &mut h).map_err(io(&full))?;
            let sha: [u8; 32] = h.finalize().into();
            if d.size != *len || d.sha256 != sha {
                return Err(StoreError::Invalid { step, msg: format!("{path}: {len} bytes with another SHA-256 than the trailer's ({} bytes)", d.size) });
            }
            total += *len;
        }
        self.files.clear();
        fsync_dir(&self.tmp)?;
        publish(&self.tmp, &self.dest)?;
        self.done = true;
        Ok(total)
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

impl CheckpointStore for LocalDirStore {
    fn begin(&self, step: u64) -> Result<Box<dyn CheckpointWriter>, StoreError> {
        let tmp = self.root.join(format!(".checkpoint-{step}.tmp-{}-{:016x}", std::process::id(), rand::random::<u64>()));
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        Ok(Box::new(LocalWriter { step, tmp, dest: self.dir(step), files: Vec::new(), done: false }))
    }

    fn list(&self) -> Result<Vec<u64>, StoreError> {
        let mut steps = Vec::new();
        for e in fs::read_dir(&self.root).map_err(io(&self.root))? {
            let e = e.map_err(io(&self.root))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_prefix("checkpoint-").and_then(|n| n.parse::<u64>().ok()) {
                if e.path().is_dir() {
                    steps.push(n);
                }
            }
        }
        steps.sort_unstable();
        Ok(steps)
    }

    fn files(&self, step: u64) -> Result<Vec<String>, StoreError> {
        let dir = self.dir(step);
        if !dir.is_dir() {
            return Err(StoreError::Missing(step));
        }
        let mut out = Vec::new();
        walk(&dir, "", &mut out)?;
        out.sort();
        Ok(out)
    }

    fn open(&self, step: u64, path: &str) -> Result<Box<dyn Read + Send>, StoreError> {
        let full = self.dir(step).join(check_relative(step, path)?);
        Ok(Box::new(File::open(&full).map_err(io(&full))?))
    }

    fn finalize(&self, step: u64) -> Result<(), StoreError> {
        let src = self.dir(step);
        let files = self.files(step)?;
        let tmp = self.root.join(format!(".final_model.tmp-{}-{:016x}", std::process::id(), rand::random::<u64>()));
        let result = (|| {
            for rel in &files {
                let (from, to) = (src.join(rel), tmp.join(rel));
                if let Some(d) = to.parent() {
                    fs::create_dir_all(d).map_err(io(d))?;
                }
                fs::copy(&from, &to).map_err(io(&from))?;
                File::open(&to).and_then(|f| f.sync_all()).map_err(io(&to))?;
            }
            fs::create_dir_all(&tmp).map_err(io(&tmp))?;
            fsync_dir(&tmp)?;
            publish(&tmp, &self.root.join("final_model"))
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    fn remove(&self, step: u64) -> Result<(), StoreError> {
        let dir = self.dir(step);
        if !dir.is_dir() {
            return Err(StoreError::Missing(step));
        }
        // Rename first so that a crash mid-delete never leaves a half checkpoint-<step>.
        let trash = self.root.join(format!(".checkpoint-{step}.deleting-{}", std::process::id()));
        fs::rename(&dir, &trash).map_err(io(&dir))?;
        fs::remove_dir_all(&trash).map_err(io(&trash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &LocalDirStore, step: u64, files: &[(&str, &[u8])]) -> Result<u64, StoreError> {
        let mut w = store.begin(step)?;
        let mut digests = Vec::new();
        for (p, data) in files {
            // Two chunks per file, as a stream would bring them.
            let mid = data.len() / 2;
            w.write(p, 0, &data[..mid])?;
            w.write(p, mid as u64, &data[mid..])?;
            digests.push(FileDigest::of(p, data));
        }
        w.commit(&digests)
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_committed_checkpoint_reads_back_byte_for_byte() {
        let root = tempfile::tempdir().unwrap();
        let store = LocalDirStore::new(root.path()).unwrap();
        let big: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let n = put(&store, 3, &[("adapter_model.safetensors", &big), ("sub/trainer_state.json", b"{\"global_step\":3}")]).unwrap();
        assert_eq!(n, big.len() as u64 + 17);
        assert_eq!(store.list().unwrap(), vec![3]);
        assert_eq!(store.files(3).unwrap(), vec!["adapter_model.safetensors", "sub/trainer_state.json"]);
        let mut back = Vec::new();
        store.open(3, "adapter_model.safetensors").unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, big);
        assert_eq!(fs::read(root.path().join("checkpoint-3/sub/trainer_state.json")).unwrap(), b"{\"global_step\":3}");
        // No temp dirs left behind.
        assert_eq!(entries(root.path()), vec!["checkpoint-3"]);

        // Storing the same step again (after a rollback) replaces it whole.
        put(&store, 3, &[("adapter_model.safetensors", b"new")]).unwrap();
        assert_eq!(store.files(3).unwrap(), vec!["adapter_model.safetensors"]);
        assert_eq!(entries(root.path()), vec!["checkpoint-3"]);

        store.finalize(3).unwrap();
        put(&store, 5, &[("x", b"y")]).unwrap();
        store.remove(3).unwrap();
        assert_eq!(store.list().unwrap(), vec![5]);
        assert_eq!(fs::read(root.path().join("final_model/adapter_model.safetensors")).unwrap(), b"new");
        assert_eq!(entries(root.path()), vec!["checkpoint-5", "final_model"]);
        assert!(matches!(store.files(9), Err(StoreError::Missing(9))));
    }

    #[test]
    fn bad_streams_never_become_checkpoints() {
        let root = tempfile::tempdir().unwrap();
        let store = LocalDirStore::new(root.path()).unwrap();
        // A digest that does not match.
        let mut w = store.begin(1).unwrap();
        w.write("a", 0, b"hello").unwrap();
        let e = w.commit(&[FileDigest::of("a", b"hellO")]).unwrap_err();
        assert!(e.to_string().contains("another SHA-256"), "{e}");
        // A file the trailer does not list.
        let mut w = store.begin(1).unwrap();
        w.write("a", 0, b"x").unwrap();
        w.write("b", 0, b"y").unwrap();
        assert!(w.commit(&[FileDigest::of("a", b"x")]).unwrap_err().to_string().contains("trailer lists"));
        // A chunk out of order.
        let mut w = store.begin(1).unwrap();
        w.write("a", 0, b"xy").unwrap();
        assert!(w.write("a", 5, b"z").unwrap_err().to_string().contains("offset 5"));
        drop(w);
        // A stream that just stops (the writer is dropped).
        let mut w = store.begin(1).unwrap();
        w.write("a", 0, b"partial").unwrap();
        drop(w);
        assert!(store.list().unwrap().is_empty());
        assert!(entries(root.path()).is_empty(), "{:?}", entries(root.path()));
    }

    #[test]
    fn file_names_cannot_escape_the_checkpoint() {
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b", "a/", "nul\0"] {
            assert!(check_relative(1, bad).is_err(), "{bad:?} was accepted");
        }
        for good in ["adapter_model.safetensors", "sub/dir/f.json"] {
            assert_eq!(check_relative(1, good).unwrap(), PathBuf::from(good));
        }
        let root = tempfile::tempdir().unwrap();
        let store = LocalDirStore::new(root.path().join("out")).unwrap();
        let mut w = store.begin(1).unwrap();
        assert!(w.write("../escape", 0, b"x").is_err());
        assert!(!root.path().join("escape").exists());
    }
}
