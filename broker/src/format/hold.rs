//! `gantry cluster upgrade hold`: a node that holds keeps every shard at
//! the format it has, so the previous release can still be started on the
//! data (a rollback). Kept in the data directory (`UPGRADE_HOLD`), so it
//! outlives restarts until `finalize` lifts it; a shard's leader raises no
//! format while any member reports a hold.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

const HOLD_FILE: &str = "UPGRADE_HOLD";

#[derive(Debug)]
pub struct UpgradeHold {
    file: PathBuf,
    held: AtomicBool,
}

impl UpgradeHold {
    pub fn open(data_dir: &Path) -> UpgradeHold {
        let file = data_dir.join(HOLD_FILE);
        let held = file.exists();
        UpgradeHold { file, held: AtomicBool::new(held) }
    }

    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Holds or lifts the hold, durably.
    pub fn set(&self, hold: bool) -> io::Result<()> {
        let dir = self.file.parent().unwrap_or(Path::new("."));
        if hold {
            fs::write(&self.file, "the shards' formats are held here: `gantry cluster upgrade finalize` lifts it\n")?;
            fs::File::open(&self.file)?.sync_all()?;
        } else {
            match fs::remove_file(&self.file) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        fs::File::open(dir)?.sync_all()?;
        self.held.store(hold, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_outlives_a_restart_until_lifted() {
        let dir = tempfile::tempdir().unwrap();
        let hold = UpgradeHold::open(dir.path());
        assert!(!hold.is_held());
        hold.set(true).unwrap();
        assert!(UpgradeHold::open(dir.path()).is_held());
        hold.set(false).unwrap();
        assert!(!UpgradeHold::open(dir.path()).is_held());
        hold.set(false).unwrap();
    }
}
