//! A small disk of its own for a test's data directory: a tmpfs with a size limit mounted
//! on a directory of the test's work directory (the tests run as root here and on CI,
//! where `mount` is permitted), filled to a chosen free space, grown back, or remounted
//! read-only. Unmounted when dropped, so drop it after the processes that use it.
//!
//! Root writes through file permissions, so a read-only data directory needs a read-only
//! mount: `mount -o remount,ro` is what an operator's disk does after errors, and the
//! processes see `Read-only file system` (EROFS) as they would there.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted at `dir`.
pub struct SmallDisk {
    /// Where it is mounted.
    pub dir: PathBuf,
}

/// The file that takes the space [`SmallDisk::fill`] takes.
const FILLER: &str = ".filler";

fn mount(args: &[&str]) {
    let out = Command::new("mount").args(args).output().expect("mount runs");
    assert!(
        out.status.success(),
        "mount {args:?} failed (the disk tests need root, as on CI): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl SmallDisk {
    /// Mounts a tmpfs of `mib` MiB at `dir` (made if missing).
    pub fn mount(dir: &Path, mib: u64) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        mount(&["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "tmpfs", super::s(dir)]);
        Self { dir: dir.to_owned() }
    }

    /// Takes all the free space but `leave` bytes, with a file of its own.
    pub fn fill(&self, leave: u64) {
        let path = self.dir.join(FILLER);
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        // Write until the disk refuses: what it took is exactly the free space.
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        file.set_len(written.saturating_sub(leave)).unwrap();
        file.sync_all().unwrap();
    }

    /// Gives the filled space back.
    pub fn free(&self) {
        std::fs::remove_file(self.dir.join(FILLER)).unwrap();
    }

    /// Remounts it read-only (`true`) or writable again.
    pub fn read_only(&self, read_only: bool) {
        let mode = if read_only { "remount,ro" } else { "remount,rw" };
        mount(&["-o", mode, super::s(&self.dir)]);
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
