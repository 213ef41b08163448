//! Disk space: the store's files against its budget (and the bridges'
//! reserve), the filesystem's free space against the headroom.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{info, warn};

use super::Inner;

/// How often disk use and free space are checked, at least.
pub(super) const SPACE_CHECK: Duration = Duration::from_secs(1);
/// Bytes written between two space checks, at most: a fast writer must
/// not run a small disk full between two timed checks.
pub(super) const SPACE_CHECK_BYTES: usize = 4 << 20;

/// Updates `over_budget` (the store's files reached `max_disk_bytes`: the
/// queue_full policy applies), `over_shared` (they reached the part
/// outside the bridges' reserve: it applies to every other queue) and
/// `low_space` (the filesystem has less
/// free space than the headroom acknowledgements, flushes and compactions
/// need: new messages that need the store are refused).
pub(super) fn check_space(inner: &Inner) {
    let path = &inner.path;
    let used: u64 = std::fs::read_dir(path)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let (free, total) = filesystem_space(path).unwrap_or((u64::MAX, u64::MAX));
    inner.used_bytes.store(used, Ordering::Relaxed);
    inner.fs_free.store(free, Ordering::Relaxed);
    inner.fs_total.store(total, Ordering::Relaxed);
    // A twentieth of the filesystem, at least three memtables' worth (a
    // flush and a compaction must fit), at most 256 MiB.
    let headroom = (total / 20).clamp(48 << 20, 256 << 20);
    let over_shared = used >= inner.options.shared_bytes();
    if inner.over_shared.swap(over_shared, Ordering::AcqRel) != over_shared
        && inner.options.bridge_reserve_percent > 0
    {
        if over_shared {
            warn!(
                used,
                bridge_reserve_percent = inner.options.bridge_reserve_percent,
                "disk budget reached outside the bridges' reserve: queue_full applies to new \
                 messages for persistent sessions other than bridges"
            );
        } else {
            info!(
                used,
                "disk budget outside the bridges' reserve available again"
            );
        }
    }
    let over = used >= inner.options.max_disk_bytes;
    if inner.over_budget.swap(over, Ordering::AcqRel) != over {
        if over {
            warn!(
                used,
                max_disk_bytes = inner.options.max_disk_bytes,
                "disk budget reached: queue_full applies to new messages for persistent sessions"
            );
        } else {
            info!(used, "disk budget available again");
        }
    }
    let low = free < headroom;
    if inner.low_space.swap(low, Ordering::AcqRel) != low {
        if low {
            warn!(
                free,
                headroom, "disk almost full: refusing new messages that need the store"
            );
        } else {
            info!(free, "disk space available again");
        }
    }
}

/// Free and total bytes of the filesystem holding `path`.
fn filesystem_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    #[allow(unsafe_code)]
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points
    // to writable memory of the right type; statvfs initialises it on success.
    let stat = unsafe {
        if libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    let block = stat.f_frsize as u64;
    Some((stat.f_bavail as u64 * block, stat.f_blocks as u64 * block))
}
