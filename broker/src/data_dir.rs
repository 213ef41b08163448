//! The data directory: created at start and locked, so two brokers can
//! never share one (their state would interleave).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use crate::StartError;

/// The file whose exclusive lock marks the directory as in use.
const LOCK_FILE: &str = "LOCK";

/// An open, locked data directory. The lock is released when this is dropped
/// (or the process dies: the kernel releases it).
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Held for the lock; never read.
    _lock: File,
}

impl DataDir {
    /// Creates `path` if needed and takes its lock.
    pub fn open(path: &Path) -> Result<DataDir, StartError> {
        let io = |source| StartError::DataDir {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(io)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join(LOCK_FILE))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {
                // Who holds it, for `ferrymq reload` (a hint only: the
                // lock is what counts).
                let mut lock = lock;
                let _ = lock.set_len(0);
                let _ = std::io::Write::write_all(
                    &mut lock,
                    format!("{}\n", std::process::id()).as_bytes(),
                );
                Ok(DataDir {
                    path: path.to_path_buf(),
                    _lock: lock,
                })
            }
            Err(TryLockError::WouldBlock) => Err(StartError::DataDirInUse(path.to_path_buf())),
            Err(TryLockError::Error(e)) => Err(io(e)),
        }
    }

    /// Whether a running broker holds the data directory at `path`.
    pub fn is_in_use(path: &Path) -> bool {
        match std::fs::File::open(path.join(LOCK_FILE)) {
            Ok(file) => matches!(file.try_lock(), Err(TryLockError::WouldBlock)),
            Err(_) => false,
        }
    }

    /// The process id of the running broker that holds the data directory
    /// at `path`, if one does.
    pub fn holder_pid(path: &Path) -> Option<u32> {
        if !Self::is_in_use(path) {
            return None;
        }
        std::fs::read_to_string(path.join(LOCK_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_of_the_same_dir_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferrymq-datadir-{}", std::process::id()));
        let first = DataDir::open(&dir).expect("first open");
        assert!(matches!(
            DataDir::open(&dir),
            Err(StartError::DataDirInUse(_))
        ));
        assert_eq!(DataDir::holder_pid(&dir), Some(std::process::id()));
        drop(first);
        assert_eq!(DataDir::holder_pid(&dir), None);
        assert!(DataDir::open(&dir).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
