//! Where things live under a store root, and the atomic-write primitive every commit uses.
//!
//! ```text
//! <store>/campaign_runs/workspace_id=<w>/<run_id>.json                       run records
//! <store>/campaign_runs/workspace_id=<w>/<run_id>.deliveries.jsonl           delivery journal
//! <store>/recipient_logs/workspace_id=<w>/campaign_id=<c>/run_id=<r>/part-NNNNN.parquet
//! <store>/events/workspace_id=<w>/date=<YYYY-MM-DD>/*.parquet                events
//! <store>/staging/run_id=<r>/                                                IFUR files being written
//! <store>/locks/workspace_id=<w>/run_id=<r>.lock                              held by a running send
//! ```

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Paths under a store root.
#[derive(Debug, Clone)]
pub struct StoreLayout {
    root: PathBuf,
}

impl StoreLayout {
    /// A layout rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StoreLayout { root: root.into() }
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Folder of a workspace's run records.
    pub fn runs_dir(&self, workspace: &str) -> PathBuf {
        self.root
            .join("campaign_runs")
            .join(format!("workspace_id={workspace}"))
    }

    /// A run record file.
    pub fn run_record(&self, workspace: &str, run_id: &str) -> PathBuf {
        self.runs_dir(workspace).join(format!("{run_id}.json"))
    }

    /// A run's delivery journal: one JSON line per file handed to MegaSys, appended and
    /// fsynced before the file is renamed into the hot folder (see docs/store.md).
    pub fn delivery_journal(&self, workspace: &str, run_id: &str) -> PathBuf {
        self.runs_dir(workspace)
            .join(format!("{run_id}.deliveries.jsonl"))
    }

    /// Folder of one campaign's recipient logs: a `run_id=<r>` folder per run.
    pub fn campaign_log_dir(&self, workspace: &str, campaign: &str) -> PathBuf {
        self.root
            .join("recipient_logs")
            .join(format!("workspace_id={workspace}"))
            .join(format!("campaign_id={campaign}"))
    }

    /// Folder of one run's recipient-log parts.
    pub fn recipient_log_dir(&self, workspace: &str, campaign: &str, run_id: &str) -> PathBuf {
        self.campaign_log_dir(workspace, campaign)
            .join(format!("run_id={run_id}"))
    }

    /// The lock file a send holds while it runs (see [`crate::run::RunLock`]).
    pub fn run_lock(&self, workspace: &str, run_id: &str) -> PathBuf {
        self.locks_dir(workspace)
            .join(format!("run_id={run_id}.lock"))
    }

    /// The lock file held while a new run of a campaign is checked against its earlier runs
    /// and recorded, so two sends started together cannot both be the first.
    pub fn campaign_lock(&self, workspace: &str, campaign: &str) -> PathBuf {
        self.locks_dir(workspace)
            .join(format!("campaign_id={campaign}.lock"))
    }

    fn locks_dir(&self, workspace: &str) -> PathBuf {
        self.root
            .join("locks")
            .join(format!("workspace_id={workspace}"))
    }

    /// Folder where a run's IFUR files are written before delivery.
    pub fn staging_dir(&self, run_id: &str) -> PathBuf {
        self.root.join("staging").join(format!("run_id={run_id}"))
    }
}

/// Refuses a store named by a URL (`s3://bucket/store`, `gs://…`, `file:///…`): the store
/// is a local or mounted folder, and such a name would otherwise become a folder called `s3:`
/// in the working directory. The error says so and names the value.
pub fn check_store_location(store: &Path) -> std::result::Result<(), String> {
    let s = store.to_string_lossy();
    let scheme = s
        .split_once("://")
        .map(|(scheme, _)| scheme)
        .filter(|scheme| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        });
    match scheme {
        Some(scheme) => Err(format!(
            "store {s:?} is a {scheme}:// URL; the store must be a local or mounted folder \
             (object storage is not supported: mount the bucket, or give a path such as /mnt/store)"
        )),
        None => Ok(()),
    }
}

/// `--store` on the command line: a path, refused when it is a URL ([`check_store_location`]).
pub fn store_arg(s: &str) -> std::result::Result<PathBuf, String> {
    let p = PathBuf::from(s);
    check_store_location(&p)?;
    Ok(p)
}

/// Creates a folder and its parents, naming it on failure.
pub fn create_dir_all(p: &Path) -> Result<()> {
    fs::create_dir_all(p).map_err(|e| Error::io(p, e))
}

/// fsyncs a folder so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// The temporary name a file is written under before its atomic rename.
pub fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the folder.
/// A reader sees the old file or the whole new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dir_all(dir)?;
    let tmp = temp_name(path);
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    commit_file(&tmp, path)
}

/// Renames a finished, fsynced temp file to its final name and makes the rename durable.
pub fn commit_file(tmp: &Path, path: &Path) -> Result<()> {
    fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// The Arrow type of dictionary-encoded string columns in the store (Int32 keys).
pub fn dictionary_utf8() -> arrow_schema::DataType {
    use arrow_schema::DataType;
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// Arrow schema of recipient-log (ledger) files, `recipient_logs/workspace_id=…/campaign_id=…/
/// run_id=…/part-NNNNN.parquet` (see docs/store.md). Written by the send path, read by analytics.
pub fn ledger_schema() -> arrow_schema::SchemaRef {
    use arrow_schema::{DataType, Field, Schema};
    std::sync::Arc::new(Schema::new(vec![
        Field::new("row", DataType::UInt64, false),
        Field::new("key", DataType::Utf8, true),
        Field::new("variant", dictionary_utf8(), true),
        Field::new("decision", dictionary_utf8(), false),
        Field::new("reason", dictionary_utf8(), true),
        Field::new("detail", DataType::Utf8, true),
        Field::new("suppression_list", dictionary_utf8(), true),
        Field::new("ifur_file", dictionary_utf8(), true),
        Field::new("ifur_line", DataType::UInt32, true),
        // Mail channel with a printer (null otherwise); parts written before these columns
        // existed read them as null.
        Field::new("mail_state", dictionary_utf8(), true),
        Field::new("printer_id", DataType::Utf8, true),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_named_by_a_url_is_refused() {
        for bad in [
            "s3://bucket/store",
            "gs://b/x",
            "file:///tmp/store",
            "az://c/d",
        ] {
            let e = check_store_location(Path::new(bad)).unwrap_err();
            assert!(
                e.contains(bad) && e.contains("local or mounted folder"),
                "{e}"
            );
            assert!(store_arg(bad).is_err());
        }
        for good in ["store", "/mnt/store", "./a:b/store", "dir/with://inside"] {
            assert!(check_store_location(Path::new(good)).is_ok(), "{good}");
        }
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/run.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert!(!temp_name(&p).exists());
    }
}
