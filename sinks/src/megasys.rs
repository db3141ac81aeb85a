//! Writes IFUR files per variant, rolls them every N lines and delivers each finished file
//! atomically into the MegaSys hot folder; the manifest, written last, is the ready signal.
//! "Last" means after the run's other outputs (ledger, events) are committed too, which only
//! the caller knows: it writes the manifest through [`IfurWriter::manifest`] once the pipeline
//! has finished.
//!
//! Commit protocol (what makes resume exactly-once): a file is written under a temporary name
//! in the staging folder, fsynced, then renamed into the hot folder. File names and contents
//! are a pure function of the input and the spec, so a resumed run regenerates the same files:
//! a file already in the hot folder is not rewritten, only verified (its trailer count and
//! checksum must equal the regenerated ones, otherwise the input changed and we refuse).
//!
//! MegaSys takes files out of the hot folder, so the hot folder alone cannot tell a resume what
//! was delivered. Each delivery (IFUR file or manifest) is therefore recorded in the run's
//! [`DeliveryJournal`] after its staged copy is durable and before its rename; a resume delivers
//! no recorded file again. The staged copy stays until the rename (across file systems: until
//! the landing copy in the hot folder is durable), so a recorded file whose final name and
//! staged copies are all gone was taken by MegaSys, never lost (docs/store.md).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use broadside_pipeline::model::{Decision, RecipientBatch};
use broadside_pipeline::run::DeliveredFile;
use broadside_pipeline::runner::OrderedStage;
use broadside_pipeline::stages::Stage;
use broadside_pipeline::store::{commit_file, create_dir_all, sync_dir, temp_name};
use broadside_pipeline::{Error, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::delivery::{fault_point, DeliveryJournal, DeliveryRecord};
use crate::direct::{self, Block};
use crate::ifur::{header_line, read_trailer, trailer_line};

/// Settings of an [`IfurWriter`].
#[derive(Debug, Clone)]
pub struct IfurWriterConfig {
    /// Campaign id.
    pub campaign_id: String,
    /// Run id (part of every file name).
    pub run_id: String,
    /// Workspace id (in the manifest).
    pub workspace_id: String,
    /// Variant (name, template), by variant index.
    pub variants: Vec<(String, String)>,
    /// Field names of the detail records, in batch column order.
    pub fields: Vec<String>,
    /// Detail lines per file.
    pub roll_rows: u64,
    /// Where files are written before delivery (ideally on the hot folder's file system).
    pub staging: PathBuf,
    /// The MegaSys hot folder.
    pub hot_folder: PathBuf,
    /// The run's delivery journal (`StoreLayout::delivery_journal`).
    pub deliveries: PathBuf,
}

/// The manifest MegaSys waits for before picking a run's files up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Campaign.
    pub campaign_id: String,
    /// Run.
    pub run_id: String,
    /// Tenant.
    pub workspace_id: String,
    /// When the manifest was written.
    pub created_at: DateTime<Utc>,
    /// Every file of the run, by variant then sequence.
    pub files: Vec<DeliveredFile>,
    /// Sum of the files' detail lines.
    pub total_rows: u64,
}

/// The manifest's file name for a run.
pub fn manifest_name(campaign: &str, run_id: &str) -> String {
    format!("{campaign}_{run_id}.manifest.json")
}

/// A file name for (campaign, run, variant, seq).
pub fn ifur_name(campaign: &str, run_id: &str, variant: &str, seq: u32) -> String {
    format!("{campaign}_{run_id}_{variant}_{seq:05}.ifur")
}

struct OpenFile {
    name: Arc<str>,
    variant: usize,
    seq: u32,
    final_path: PathBuf,
    /// `None` when the file was already delivered by an earlier attempt: verify only.
    writing: Option<Writing>,
    /// The earlier attempt's delivery record, if there was one.
    recorded: Option<DeliveryRecord>,
    hasher: Xxh3,
    rows: u64,
}

/// A file being written: its handle (shared with the commit thread, which writes the full
/// blocks) and the block being filled.
struct Writing {
    file: Arc<File>,
    tmp_path: Arc<Path>,
    block: Block,
}

impl Writing {
    /// Appends `data`, handing each block that fills up to the commit thread.
    fn append(&mut self, mut data: &[u8], committer: &mut Committer) -> Result<()> {
        while !data.is_empty() {
            data = &data[self.block.push(data)..];
            if self.block.is_full() {
                let full = std::mem::replace(&mut self.block, committer.block());
                committer.send(Job::Write {
                    file: self.file.clone(),
                    tmp_path: self.tmp_path.clone(),
                    block: full,
                })?;
            }
        }
        Ok(())
    }
}

/// Work for the commit thread, in the order the sequencer hands it over.
enum Job {
    /// A full block of an open file.
    Write {
        file: Arc<File>,
        tmp_path: Arc<Path>,
        block: Block,
    },
    /// A file's last bytes; then fsync, the delivery record and the rename into the hot folder.
    Finish {
        file: Arc<File>,
        tmp_path: Arc<Path>,
        final_path: PathBuf,
        block: Block,
        record: DeliveryRecord,
    },
}

/// Jobs queued for the commit thread at most (the sequencer waits beyond that): 8 MiB of
/// blocks, or fewer blocks and some finished files.
const JOBS_IN_FLIGHT: usize = 8;

/// The thread that writes the IFUR files' blocks (see [`crate::direct`]), fsyncs finished
/// files and renames them into the hot folder, so the sequencer (which every batch passes
/// through) neither waits on the disk nor copies into the page cache: that copy was 11 % of
/// a send's CPU, and a roll's fsync took up to 50 ms. The protocol is unchanged, only its
/// thread: a file is in the hot folder only once it is complete and durable, and the manifest
/// is written only after [`OrderedStage::finish`] has waited for every commit.
struct Committer {
    tx: Option<SyncSender<Job>>,
    /// Blocks the thread has written, back for reuse.
    free: Receiver<Block>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Committer {
    fn start(journal: Arc<Mutex<DeliveryJournal>>) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(JOBS_IN_FLIGHT);
        let (free_tx, free) = std::sync::mpsc::channel::<Block>();
        let thread = std::thread::Builder::new()
            .name("bs-ifur-commit".into())
            .spawn(move || -> Result<()> {
                // Stop at the first failure: dropping the receiver fails the next send, which
                // tells the sequencer, and the error itself comes back from the join.
                for job in rx {
                    let mut block = match job {
                        Job::Write {
                            file,
                            tmp_path,
                            block,
                        } => {
                            direct::write_all(&file, block.bytes())
                                .map_err(|e| Error::io(&*tmp_path, e))?;
                            block
                        }
                        Job::Finish {
                            file,
                            tmp_path,
                            final_path,
                            block,
                            record,
                        } => {
                            direct::write_tail(&file, block.bytes())
                                .and_then(|()| file.sync_all())
                                .map_err(|e| Error::io(&*tmp_path, e))?;
                            drop(file);
                            journal
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .record(record)?;
                            fault_point("ifur-recorded");
                            deliver(&tmp_path, &final_path)?;
                            fault_point("ifur-delivered");
                            tracing::info!(file = %final_path.display(), "ifur file delivered");
                            block
                        }
                    };
                    block.clear();
                    // The sequencer may be gone (a failed run): the block is then just freed.
                    let _ = free_tx.send(block);
                }
                Ok(())
            })
            .map_err(|e| Error::io("ifur commit thread", e))?;
        Ok(Committer {
            tx: Some(tx),
            free,
            thread: Some(thread),
        })
    }

    /// An empty block, one the thread has written if there is one.
    fn block(&self) -> Block {
        self.free.try_recv().unwrap_or_default()
    }

    /// Hands a job over; if the thread has stopped, returns its error.
    fn send(&mut self, job: Job) -> Result<()> {
        let sent = self.tx.as_ref().map(|tx| tx.send(job).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        self.wait()?;
        Err(Error::sink(
            "ifur commit thread",
            "stopped before the run ended",
        ))
    }

    /// Waits for every file handed over; the first failure, if any.
    fn wait(&mut self) -> Result<()> {
        drop(self.tx.take());
        match self.thread.take().map(|t| t.join()) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(Error::sink("ifur commit thread", "panicked")),
        }
    }
}

/// The ordered IFUR stage: assigns every sent row its file and line and writes it.
pub struct IfurWriter {
    cfg: IfurWriterConfig,
    open: Vec<Option<OpenFile>>,
    next_seq: Vec<u32>,
    delivered: Arc<Mutex<Vec<DeliveredFile>>>,
    journal: Arc<Mutex<DeliveryJournal>>,
    /// Recorded deliveries gone from the hot folder when this attempt started.
    missing: Vec<String>,
    committer: Committer,
}

impl IfurWriter {
    /// Creates the staging and hot folders, reads the delivery journal and finishes the
    /// deliveries an earlier attempt recorded but did not rename (see [`recover`]).
    pub fn new(cfg: IfurWriterConfig) -> Result<Self> {
        create_dir_all(&cfg.staging)?;
        create_dir_all(&cfg.hot_folder)?;
        let journal = DeliveryJournal::open(&cfg.deliveries)?;
        let missing = recover(&journal, &cfg)?;
        let journal = Arc::new(Mutex::new(journal));
        let n = cfg.variants.len();
        Ok(IfurWriter {
            open: (0..n).map(|_| None).collect(),
            next_seq: vec![1; n],
            delivered: Arc::new(Mutex::new(Vec::new())),
            committer: Committer::start(journal.clone())?,
            journal,
            missing,
            cfg,
        })
    }

    /// Files (IFUR files, the manifest) an earlier attempt delivered that were gone from the
    /// hot folder when this one started: taken by MegaSys, and not delivered again.
    pub fn delivered_missing(&self) -> Vec<String> {
        self.missing.clone()
    }

    /// Handle to the list of delivered files, readable after the run.
    pub fn delivered(&self) -> Arc<Mutex<Vec<DeliveredFile>>> {
        self.delivered.clone()
    }

    fn open_file(&mut self, v: usize) -> Result<()> {
        let seq = self.next_seq[v];
        self.next_seq[v] += 1;
        let (variant, template) = &self.cfg.variants[v];
        let name = ifur_name(&self.cfg.campaign_id, &self.cfg.run_id, variant, seq);
        let final_path = self.cfg.hot_folder.join(&name);
        let tmp_path = self.cfg.staging.join(format!("{name}.tmp"));
        let header = header_line(
            &self.cfg.campaign_id,
            variant,
            template,
            seq,
            &self.cfg.fields,
        );
        let recorded = self
            .journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .cloned();
        let writing = if recorded.is_some() || final_path.exists() {
            // Delivered by an earlier attempt (and perhaps taken since). A staging copy left
            // now is stale: `recover` delivered every recorded file that had not reached the
            // hot folder, and a cross-device delivery killed by an older version between its
            // rename and the removal of the staging copy left one behind.
            let _ = fs::remove_file(&tmp_path);
            None
        } else {
            let file = direct::create(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
            let mut w = Writing {
                file: Arc::new(file),
                tmp_path: tmp_path.as_path().into(),
                block: self.committer.block(),
            };
            w.append(&header, &mut self.committer)?;
            Some(w)
        };
        self.open[v] = Some(OpenFile {
            name: name.into(),
            variant: v,
            seq,
            final_path,
            writing,
            recorded,
            hasher: Xxh3::new(),
            rows: 0,
        });
        Ok(())
    }

    fn close_file(&mut self, v: usize) -> Result<()> {
        let Some(mut f) = self.open[v].take() else {
            return Ok(());
        };
        let checksum = f.hasher.digest();
        match f.writing.take() {
            Some(mut w) => {
                w.append(&trailer_line(f.rows, checksum), &mut self.committer)?;
                self.committer.send(Job::Finish {
                    file: w.file,
                    tmp_path: w.tmp_path,
                    final_path: f.final_path.clone(),
                    block: w.block,
                    record: DeliveryRecord {
                        file: f.name.to_string(),
                        rows: f.rows,
                        checksum: format!("{checksum:016x}"),
                    },
                })?;
            }
            None => {
                // The record names what was delivered even once MegaSys has taken the file; a
                // copy still in the hot folder is checked too (unless it is taken meanwhile).
                let on_disk = match read_trailer(&f.final_path) {
                    Ok(t) => Some(t),
                    Err(_) if f.recorded.is_some() && !f.final_path.exists() => None,
                    Err(e) => {
                        return Err(Error::sink(
                            f.final_path.display().to_string(),
                            e.to_string(),
                        ))
                    }
                };
                let recorded = f.recorded.as_ref().map(|r| {
                    let sum = u64::from_str_radix(&r.checksum, 16).unwrap_or(!checksum);
                    (r.rows, sum)
                });
                let mut found = on_disk.into_iter().chain(recorded);
                if let Some((count, sum)) = found.find(|t| *t != (f.rows, checksum)) {
                    return Err(Error::Resume {
                        run_id: self.cfg.run_id.clone(),
                        message: format!(
                            "{} was delivered by an earlier attempt with {count} records (checksum {sum:016x}), \
                             but the same input now gives {} records (checksum {checksum:016x}): \
                             the input, the suppression lists or the spec changed since the run started",
                            f.final_path.display(),
                            f.rows
                        ),
                    });
                }
            }
        }
        self.delivered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(DeliveredFile {
                file: f.name.to_string(),
                variant: self.cfg.variants[f.variant].0.clone(),
                rows: f.rows,
                checksum: format!("{checksum:016x}"),
            });
        tracing::info!(file = %f.name, seq = f.seq, rows = f.rows, "ifur file finished");
        Ok(())
    }

    /// The handle that writes the run's manifest, once every other output is committed.
    pub fn manifest(&self) -> ManifestWriter {
        ManifestWriter {
            cfg: self.cfg.clone(),
            delivered: self.delivered.clone(),
            journal: self.journal.clone(),
        }
    }
}

/// Finishes what an earlier attempt's journal says it began: every recorded delivery whose final
/// name is not in the hot folder is either still staged (the kill came between the record and
/// the rename: the staged copy is complete, as it was fsynced before the record, and is renamed
/// now) or gone (MegaSys took it). Returns the names of the taken ones.
fn recover(journal: &DeliveryJournal, cfg: &IfurWriterConfig) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for rec in journal.records() {
        let final_path = cfg.hot_folder.join(&rec.file);
        if final_path.exists() {
            continue;
        }
        // An IFUR file is staged in the staging folder, then (across file systems) copied to
        // its landing name in the hot folder; the manifest is staged under that landing name.
        let staged = cfg.staging.join(format!("{}.tmp", rec.file));
        let landing = temp_name(&final_path);
        if staged.exists() {
            deliver(&staged, &final_path)?;
        } else if landing.exists() {
            commit_file(&landing, &final_path)?;
        } else {
            tracing::warn!(
                file = %rec.file,
                hot_folder = %cfg.hot_folder.display(),
                "delivered by an earlier attempt and no longer in the hot folder \
                 (taken by MegaSys): not delivering it again"
            );
            missing.push(rec.file.clone());
            continue;
        }
        tracing::info!(file = %rec.file, "delivery recorded by an earlier attempt completed");
    }
    Ok(missing)
}

/// Writes a run's manifest (the ready signal) from the files an [`IfurWriter`] delivered.
pub struct ManifestWriter {
    cfg: IfurWriterConfig,
    delivered: Arc<Mutex<Vec<DeliveredFile>>>,
    journal: Arc<Mutex<DeliveryJournal>>,
}

impl ManifestWriter {
    /// Writes the manifest atomically; call it after the pipeline has finished. A manifest an
    /// earlier attempt delivered is not written again (MegaSys may have taken it already).
    pub fn write(&self) -> Result<()> {
        let name = manifest_name(&self.cfg.campaign_id, &self.cfg.run_id);
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        if journal.get(&name).is_some() {
            return Ok(());
        }
        let mut files = self
            .delivered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let order: std::collections::HashMap<&str, usize> = self
            .cfg
            .variants
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.as_str(), i))
            .collect();
        files.sort_by(|a, b| {
            (order[a.variant.as_str()], &a.file).cmp(&(order[b.variant.as_str()], &b.file))
        });
        let manifest = Manifest {
            campaign_id: self.cfg.campaign_id.clone(),
            run_id: self.cfg.run_id.clone(),
            workspace_id: self.cfg.workspace_id.clone(),
            created_at: Utc::now(),
            total_rows: files.iter().map(|f| f.rows).sum(),
            files,
        };
        let path = self.cfg.hot_folder.join(&name);
        let text = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        // write_atomic, with the delivery recorded between the durable temp file and the rename.
        let tmp = temp_name(&path);
        File::create(&tmp)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, &text)?;
                f.sync_all()
            })
            .map_err(|e| Error::io(&tmp, e))?;
        journal.record(DeliveryRecord {
            file: name,
            rows: manifest.total_rows,
            checksum: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&text)),
        })?;
        fault_point("manifest-recorded");
        commit_file(&tmp, &path)?;
        fault_point("manifest-delivered");
        Ok(())
    }
}

/// Moves a finished temp file into its final place atomically. Across file systems it copies
/// to a temporary name inside the target folder first, so the final name never shows a torn file.
///
/// Until the final name holds the file, a complete copy stays under the staging name or the
/// landing name: so a recorded file under none of the three was taken from the hot folder
/// (see [`recover`]).
fn deliver(tmp: &Path, final_path: &Path) -> Result<()> {
    let dir = final_path.parent().unwrap_or(Path::new("."));
    match fs::rename(tmp, final_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            let landing = temp_name(final_path);
            let landed = fs::copy(tmp, &landing)
                .and_then(|_| File::open(&landing)?.sync_all())
                .map_err(|e| Error::io(&landing, e));
            if let Err(e) = landed {
                // A partial copy (a full disk) must not stay in the hot folder, holding space.
                let _ = fs::remove_file(&landing);
                return Err(e);
            }
            // The staging copy goes before the rename, not after: a staging copy left next to
            // a final name that MegaSys has taken would look like a delivery never renamed.
            fs::remove_file(tmp).map_err(|e| Error::io(tmp, e))?;
            sync_dir(tmp.parent().unwrap_or(Path::new(".")))?;
            fault_point("ifur-landed");
            fs::rename(&landing, final_path).map_err(|e| Error::io(final_path, e))?;
        }
        Err(e) => return Err(Error::io(final_path, e)),
    }
    sync_dir(dir)
}

impl Stage for IfurWriter {
    fn name(&self) -> &'static str {
        "ifur-write"
    }

    fn process(&mut self, batch: &mut RecipientBatch) -> Result<()> {
        let n = batch.len();
        batch.placement_file = vec![u32::MAX; n];
        batch.placement_line = vec![0; n];
        batch.placement_files.clear();
        // Index into batch.placement_files of each variant's currently open file.
        let mut file_idx: Vec<Option<u32>> = vec![None; self.open.len()];
        for i in 0..n {
            if batch.decisions[i] != Decision::Sent {
                continue;
            }
            let v = batch.variants[i] as usize;
            if self.open[v].is_none() {
                self.open_file(v)?;
                file_idx[v] = None;
            }
            let idx = match file_idx[v] {
                Some(x) => x,
                None => {
                    let name = self.open[v].as_ref().expect("opened").name.clone();
                    batch.placement_files.push(name);
                    let x = (batch.placement_files.len() - 1) as u32;
                    file_idx[v] = Some(x);
                    x
                }
            };
            let line = batch.payload_line(i);
            if line.is_empty() {
                return Err(Error::Stage {
                    stage: "ifur-write".into(),
                    message: format!(
                        "row {} is sent but was not encoded",
                        batch.first_row + i as u64
                    ),
                });
            }
            let f = self.open[v].as_mut().expect("opened");
            if let Some(w) = f.writing.as_mut() {
                w.append(line, &mut self.committer)?;
            }
            f.hasher.update(line);
            f.rows += 1;
            batch.placement_file[i] = idx;
            batch.placement_line[i] = f.rows as u32;
            if f.rows >= self.cfg.roll_rows {
                self.close_file(v)?;
                file_idx[v] = None;
            }
        }
        Ok(())
    }
}

impl OrderedStage for IfurWriter {
    fn finish(&mut self) -> Result<()> {
        for v in 0..self.open.len() {
            self.close_file(v)?;
        }
        self.committer.wait()
    }

    fn abort(&mut self) {
        // A verified file has no temp file (it was removed when the file was opened).
        for w in self.open.iter_mut().filter_map(|f| f.take()?.writing) {
            let Writing { file, tmp_path, .. } = w;
            drop(file);
            let _ = fs::remove_file(&tmp_path);
        }
        // Files already finished are complete: let their commits end (a later attempt
        // verifies them) rather than leave the thread running past the run.
        let _ = self.committer.wait();
    }
}
