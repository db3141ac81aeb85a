//! The delivery journal: every file a run hands to MegaSys (IFUR files and the manifest), recorded
//! durably before the file can be taken, so that a resume never delivers a file twice, whether
//! or not MegaSys has already taken it out of the hot folder.
//!
//! The journal is one JSON line per delivery, appended and fsynced after the file's staged copy
//! is complete and durable and before its rename into the hot folder (see docs/store.md,
//! "Delivery journal"). A kill in the middle of an append leaves a last line without its newline:
//! that delivery never happened (its rename comes after the append), so the torn line is cut off
//! when the journal is opened again.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use broadside_pipeline::store::{create_dir_all, sync_dir};
use broadside_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};

/// One delivery: a file about to be renamed into the hot folder, with what identifies its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryRecord {
    /// File name in the hot folder.
    pub file: String,
    /// Detail lines (an IFUR file's trailer count; the manifest's `total_rows`).
    pub rows: u64,
    /// xxh3-64, 16 hex digits: an IFUR file's trailer checksum; the manifest's bytes.
    pub checksum: String,
}

/// A run's delivery journal, loaded and open for appending.
#[derive(Debug)]
pub struct DeliveryJournal {
    path: PathBuf,
    /// The records in journal order, and by file name.
    order: Vec<String>,
    records: HashMap<String, DeliveryRecord>,
    file: Option<File>,
}

impl DeliveryJournal {
    /// Reads the journal at `path` (none yet: empty), cutting off a torn last line.
    pub fn open(path: &Path) -> Result<Self> {
        let mut journal = DeliveryJournal {
            path: path.to_path_buf(),
            order: Vec::new(),
            records: HashMap::new(),
            file: None,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(journal),
            Err(e) => return Err(Error::io(path, e)),
        };
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for (n, line) in bytes[..whole].split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let rec: DeliveryRecord = serde_json::from_slice(line).map_err(|e| {
                Error::sink(
                    path.display().to_string(),
                    format!("line {}: not a delivery record: {e}", n + 1),
                )
            })?;
            journal.insert(rec);
        }
        if whole < bytes.len() {
            tracing::warn!(journal = %path.display(), "cutting off a delivery record torn by a kill");
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Error::io(path, e))?;
            f.set_len(whole as u64)
                .and_then(|()| f.sync_all())
                .map_err(|e| Error::io(path, e))?;
        }
        Ok(journal)
    }

    fn insert(&mut self, rec: DeliveryRecord) {
        if !self.records.contains_key(&rec.file) {
            self.order.push(rec.file.clone());
        }
        self.records.insert(rec.file.clone(), rec);
    }

    /// The record of a file, if an attempt has delivered (or begun to deliver) it.
    pub fn get(&self, file: &str) -> Option<&DeliveryRecord> {
        self.records.get(file)
    }

    /// Every record, in the order the deliveries happened.
    pub fn records(&self) -> impl Iterator<Item = &DeliveryRecord> {
        self.order.iter().map(|f| &self.records[f])
    }

    /// Appends `rec` and makes it durable; only then may the file be renamed into the hot folder.
    pub fn record(&mut self, rec: DeliveryRecord) -> Result<()> {
        if self.records.get(&rec.file) == Some(&rec) {
            return Ok(());
        }
        if self.file.is_none() {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            create_dir_all(dir)?;
            let created = !self.path.exists();
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| Error::io(&self.path, e))?;
            if created {
                // The journal's own name must survive a crash, not only its bytes.
                sync_dir(dir)?;
            }
            self.file = Some(f);
        }
        let mut line = serde_json::to_vec(&rec).expect("delivery record serialises");
        line.push(b'\n');
        let f = self.file.as_mut().expect("opened above");
        f.write_all(&line)
            .and_then(|()| f.sync_data())
            .map_err(|e| Error::io(&self.path, e))?;
        self.insert(rec);
        Ok(())
    }
}

/// Test-only crash points. With `BROADSIDE_FAULT=<point>` or `<point>:<n>` set, the process
/// SIGKILLs itself the n-th time (default: the first) it passes `<point>`; unset, nothing happens.
/// Points: `ifur-recorded` (an IFUR file's delivery recorded, not yet renamed), `ifur-landed`
/// (across file systems: the landing copy complete, the staging copy removed, not yet renamed),
/// `ifur-delivered` (renamed into the hot folder), `manifest-recorded`, `manifest-delivered`
/// (the manifest is in the hot folder, the run record not yet `done`).
pub(crate) fn fault_point(point: &str) {
    static FAULT: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static PASSED: AtomicU64 = AtomicU64::new(0);
    let fault = FAULT.get_or_init(|| {
        let v = std::env::var("BROADSIDE_FAULT").ok()?;
        Some(match v.split_once(':') {
            Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
            None => (v, 1),
        })
    });
    let Some((at, nth)) = fault else { return };
    if at != point || PASSED.fetch_add(1, Ordering::SeqCst) + 1 != *nth {
        return;
    }
    tracing::warn!(point, "BROADSIDE_FAULT: killing the process here");
    // SAFETY: kill(2) on our own pid has no memory effects.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(file: &str, rows: u64) -> DeliveryRecord {
        DeliveryRecord {
            file: file.into(),
            rows,
            checksum: format!("{rows:016x}"),
        }
    }

    #[test]
    fn records_survive_reopening_and_a_torn_line_is_cut_off() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("runs/r1.deliveries.jsonl");
        let mut j = DeliveryJournal::open(&path).unwrap();
        assert!(j.get("a.ifur").is_none());
        j.record(rec("a.ifur", 3)).unwrap();
        j.record(rec("b.ifur", 4)).unwrap();
        j.record(rec("a.ifur", 3)).unwrap();
        drop(j);
        // A kill in the middle of the next append.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"file":"c.ifur","ro"#).unwrap();
        drop(f);

        let mut j = DeliveryJournal::open(&path).unwrap();
        let names: Vec<&str> = j.records().map(|r| r.file.as_str()).collect();
        assert_eq!(names, ["a.ifur", "b.ifur"]);
        assert_eq!(j.get("b.ifur"), Some(&rec("b.ifur", 4)));
        j.record(rec("c.ifur", 5)).unwrap();
        drop(j);
        let j = DeliveryJournal::open(&path).unwrap();
        assert_eq!(j.records().count(), 3);
        assert_eq!(j.get("c.ifur"), Some(&rec("c.ifur", 5)));
    }

    #[test]
    fn a_corrupt_complete_line_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("j.jsonl");
        std::fs::write(&path, "not json\n").unwrap();
        let e = DeliveryJournal::open(&path).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
