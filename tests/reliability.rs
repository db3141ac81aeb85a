//! Reliability suite (issue 8): send kill trials with resume, deterministic output,
//! output-folder faults (disk full, file-size limit, unwritable folders), file-ingest kill
//! trials, and the tenant isolation matrix and SQL refusal corpus over real TCP.
//!
//! Each scenario prints one `figure <scenario> k=v …` line so runs can be compared;
//! docs/reliability.md keeps the last measured values. `BROADSIDE_LONG=1` runs the long
//! variants (50 kill trials on a larger campaign); `BROADSIDE_SEED=N` changes the kill moments.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broadside_pipeline::run::RunStatus;
use common::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const WS: &str = "demo";
const CAMPAIGN: &str = "generated-42";

fn long_run() -> bool {
    std::env::var("BROADSIDE_LONG").is_ok_and(|v| v == "1")
}

fn seed() -> u64 {
    std::env::var("BROADSIDE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0008)
}

/// splitmix64: seeded kill moments without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n == 0`).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// A generated campaign with small roll and part sizes, so a short send has many commit points.
fn campaign(dir: &Path, rows: u64, roll: u64, part: u64) -> PathBuf {
    let spec = generate(dir, rows, rows / 10, &[]);
    set_spec(&spec, "ifur_roll_rows", &roll.to_string());
    let text = std::fs::read_to_string(&spec).unwrap().replace(
        &format!("ifur_roll_rows = {roll}"),
        &format!("ifur_roll_rows = {roll}\nledger_part_rows = {part}"),
    );
    std::fs::write(&spec, text).unwrap();
    spec
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `broadside send SPEC --run-id RUN` (the same command starts and resumes a run).
fn send_cmd(spec: &Path, run_id: &str) -> Command {
    let mut c = exe();
    c.args(["send", s(spec), "--run-id", run_id, "--no-progress"])
        .args(new_run_flag(spec, run_id))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Where one campaign directory's outputs live.
struct Outputs {
    store: PathBuf,
    hot: PathBuf,
}

impl Outputs {
    fn of(dir: &Path) -> Self {
        Outputs {
            store: dir.join("store"),
            hot: dir.join("megasys/hot"),
        }
    }

    fn record_path(&self, run: &str) -> PathBuf {
        self.store
            .join(format!("campaign_runs/workspace_id={WS}/{run}.json"))
    }

    fn ledger_dir(&self, run: &str) -> PathBuf {
        self.store.join(format!(
            "recipient_logs/workspace_id={WS}/campaign_id={CAMPAIGN}/run_id={run}"
        ))
    }

    fn staging_dir(&self, run: &str) -> PathBuf {
        self.store.join(format!("staging/run_id={run}"))
    }

    fn manifest(&self, run: &str) -> PathBuf {
        self.hot.join(format!("{CAMPAIGN}_{run}.manifest.json"))
    }

    /// Names of the run's delivered IFUR files.
    fn ifur_names(&self, run: &str) -> Vec<String> {
        let prefix = format!("{CAMPAIGN}_{run}_");
        let mut v = names_in(&self.hot, |n| {
            n.starts_with(&prefix) && n.ends_with(".ifur")
        });
        v.sort();
        v
    }

    /// Paths of the run's committed `submitted` event parts.
    fn event_parts(&self, run: &str) -> Vec<PathBuf> {
        let prefix = format!("submitted-{run}-");
        let mut out = Vec::new();
        let root = self.store.join(format!("events/workspace_id={WS}"));
        for day in std::fs::read_dir(root).into_iter().flatten().flatten() {
            for n in names_in(&day.path(), |n| {
                n.starts_with(&prefix) && n.ends_with(".parquet")
            }) {
                out.push(day.path().join(n));
            }
        }
        out
    }

    /// Commit points the run has passed: record, IFUR files, ledger parts, event parts,
    /// manifest. Kill moments are thresholds on this count.
    fn progress(&self, run: &str) -> u64 {
        self.record_path(run).exists() as u64
            + self.ifur_names(run).len() as u64
            + names_in(&self.ledger_dir(run), |n| n.ends_with(".parquet")).len() as u64
            + self.event_parts(run).len() as u64
            + self.manifest(run).exists() as u64
    }

    /// Every file that belongs to the run, in the store and the hot folder.
    fn run_files(&self, run: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for root in [&self.store, &self.hot] {
            walk(root, &mut |p| {
                let text = p.to_string_lossy();
                if text.contains(&format!("run_id={run}/"))
                    || text.contains(&format!("_{run}_"))
                    || text.contains(&format!("_{run}.manifest"))
                    || text.contains(&format!("submitted-{run}-"))
                    || text.contains(&format!("/{run}.json"))
                {
                    out.push(p.to_path_buf());
                }
            });
        }
        out.sort();
        out
    }
}

fn names_in(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| keep(n))
        .collect()
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

/// What a sweep of a run's files found. Every file under a final name must open: Parquet
/// parts are read to the end, IFUR files parsed with their count and checksum verified, JSON
/// (run records, manifests) parsed. Anything unreadable panics, naming the file.
#[derive(Debug, Default)]
struct Sweep {
    temps: Vec<PathBuf>,
    parquet: u64,
    ifur: u64,
    json: u64,
}

fn sweep(out: &Outputs, run: &str) -> Sweep {
    let mut sw = Sweep::default();
    for p in out.run_files(run) {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".tmp") {
            sw.temps.push(p);
        } else if name.ends_with(".parquet") {
            let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap())
                .unwrap_or_else(|e| panic!("{} does not open: {e}", p.display()))
                .build()
                .unwrap();
            for b in reader {
                b.unwrap_or_else(|e| panic!("{} does not read: {e}", p.display()));
            }
            sw.parquet += 1;
        } else if name.ends_with(".ifur") {
            broadside_sinks::ifur::parse(&std::fs::read(&p).unwrap())
                .unwrap_or_else(|e| panic!("{} is not a complete IFUR file: {e}", p.display()));
            sw.ifur += 1;
        } else if name.ends_with(".json") {
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(&p).unwrap())
                .unwrap_or_else(|e| panic!("{} is not readable JSON: {e}", p.display()));
            sw.json += 1;
        } else {
            panic!("unexpected file {}", p.display());
        }
    }
    sw
}

/// One ledger row with the run id taken out of its file name, for comparing runs.
type LedgerKey = (
    u64,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<u32>,
);

fn ledger_keys(out: &Outputs, run: &str) -> Vec<LedgerKey> {
    read_ledger(&out.store, WS, CAMPAIGN, run)
        .into_iter()
        .map(|r| {
            (
                r.row,
                r.key,
                r.decision,
                r.variant,
                r.reason,
                r.file.map(|f| f.replacen(&format!("_{run}_"), "_RUN_", 1)),
                r.line,
            )
        })
        .collect()
}

/// What an uninterrupted run of the campaign produced.
struct Reference {
    rows: u64,
    sent: HashSet<String>,
    /// IFUR file name without campaign and run → bytes.
    files: BTreeMap<String, Vec<u8>>,
    ledger: Vec<LedgerKey>,
}

impl Reference {
    fn take(out: &Outputs, run: &str, rows: u64) -> Self {
        let ledger = ledger_keys(out, run);
        assert_eq!(ledger.len() as u64, rows);
        let sent = ledger
            .iter()
            .filter(|r| r.2 == "sent")
            .map(|r| r.1.clone().unwrap())
            .collect();
        let prefix = format!("{CAMPAIGN}_{run}_");
        let files = out
            .ifur_names(run)
            .into_iter()
            .map(|n| {
                let bytes = std::fs::read(out.hot.join(&n)).unwrap();
                (n[prefix.len()..].to_string(), bytes)
            })
            .collect();
        Reference {
            rows,
            sent,
            files,
            ledger,
        }
    }
}

/// The figures of one finished run compared with the reference.
#[derive(Debug, Default, Clone, Copy)]
struct Check {
    missing: u64,
    duplicates: u64,
    unexpected: u64,
    ledger_rows: u64,
    ledger_diff: u64,
    files_differ: u64,
    temps_left: u64,
}

/// Checks a finished run: exactly one IFUR line per sent recipient, one ledger row per input
/// row, every file complete and equal to the uninterrupted run's, manifest consistent, no temp
/// files anywhere, every Parquet file readable.
fn check_run(out: &Outputs, run: &str, reference: &Reference) -> Check {
    let mut c = Check::default();
    let rec = record(&out.store, WS, run);
    assert_eq!(rec.status, RunStatus::Done, "run {run} is not done");
    assert_eq!(rec.rows, reference.rows);

    let sw = sweep(out, run);
    c.temps_left = sw.temps.len() as u64;
    assert!(
        !out.staging_dir(run).exists()
            || std::fs::read_dir(out.staging_dir(run)).unwrap().count() == 0,
        "staging of {run} not empty"
    );

    // IFUR lines per recipient.
    let mut lines: HashMap<String, u64> = HashMap::new();
    let prefix = format!("{CAMPAIGN}_{run}_");
    let mut parsed = BTreeMap::new();
    for n in out.ifur_names(run) {
        let bytes = std::fs::read(out.hot.join(&n)).unwrap();
        let f = broadside_sinks::ifur::parse(&bytes).unwrap();
        for (key, _) in &f.details {
            *lines.entry(key.clone()).or_default() += 1;
        }
        let short = n[prefix.len()..].to_string();
        if reference.files.get(&short) != Some(&bytes) {
            c.files_differ += 1;
        }
        parsed.insert(n, f);
    }
    c.files_differ += reference
        .files
        .keys()
        .filter(|k| !parsed.contains_key(&format!("{prefix}{k}")))
        .count() as u64;
    c.missing = reference
        .sent
        .iter()
        .filter(|k| !lines.contains_key(*k))
        .count() as u64;
    c.duplicates = lines.values().map(|n| n - 1).sum();
    c.unexpected = lines
        .keys()
        .filter(|k| !reference.sent.contains(*k))
        .count() as u64;

    // Ledger: one row per input row, the same decisions and placements as the reference.
    let ledger = ledger_keys(out, run);
    c.ledger_rows = ledger.len() as u64;
    let distinct: HashSet<u64> = ledger.iter().map(|r| r.0).collect();
    assert_eq!(distinct.len(), ledger.len(), "a ledger row number repeats");
    c.ledger_diff = ledger
        .iter()
        .zip(&reference.ledger)
        .filter(|(a, b)| a != b)
        .count() as u64
        + (ledger.len() as i64 - reference.ledger.len() as i64).unsigned_abs();

    // The manifest lists exactly the run's files with their trailers.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.manifest(run)).unwrap()).unwrap();
    let listed = manifest["files"].as_array().unwrap();
    assert_eq!(listed.len(), parsed.len(), "manifest of {run}: file count");
    for f in listed {
        let p = &parsed[f["file"].as_str().unwrap()];
        assert_eq!(f["rows"].as_u64().unwrap(), p.details.len() as u64);
        assert_eq!(
            f["checksum"].as_str().unwrap(),
            format!("{:016x}", p.checksum)
        );
    }
    assert_eq!(
        manifest["total_rows"].as_u64().unwrap(),
        reference.sent.len() as u64
    );

    // One submitted event per sent recipient, ids unique.
    let events = submitted_event_rows(&out.store, WS, CAMPAIGN, run);
    let ids: HashSet<&String> = events.iter().map(|e| &e.0).collect();
    assert_eq!(ids.len(), events.len(), "a submitted event repeats");
    assert_eq!(events.len(), reference.sent.len(), "submitted events");
    c
}

/// How far a killed send got, judged from what it left.
fn phase(out: &Outputs, run: &str) -> &'static str {
    if !out.record_path(run).exists() {
        return "startup";
    }
    let rec = record(&out.store, WS, run);
    if rec.status == RunStatus::Done {
        "after-done"
    } else if out.manifest(run).exists() {
        "manifest-written"
    } else if out.progress(run) <= 1 {
        "deciding"
    } else {
        "writing"
    }
}

/// Starts a send and SIGKILLs it once it has passed `threshold` commit points and then
/// `delay` more. Returns false when the send finished before the kill.
fn send_and_kill(out: &Outputs, spec: &Path, run: &str, threshold: u64, delay: Duration) -> bool {
    let mut child = send_cmd(spec, run).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "send {run} failed by itself: {status}");
            return false;
        }
        if out.progress(run) >= threshold {
            break;
        }
        assert!(Instant::now() < deadline, "send {run} stalled");
        // Polling interval, not synchronisation: the condition above is what we wait for.
        std::thread::sleep(Duration::from_millis(1));
    }
    // The random part of the kill moment.
    std::thread::sleep(delay);
    let _ = child.kill();
    let status = child.wait().unwrap();
    match status.signal() {
        Some(9) => true,
        _ => {
            assert!(status.success(), "send {run} failed by itself: {status}");
            false
        }
    }
}

#[derive(Debug, Default)]
struct TrialFigures {
    kills: u64,
    phases: BTreeMap<&'static str, u64>,
    torn_temps_seen: u64,
    verified_after_kill: u64,
    check: Check,
}

/// One trial: one or two SIGKILLs at seeded moments, each followed by the resume command, the
/// last resume left to finish. Right after each kill every final-named file must be readable.
fn kill_trial(
    out: &Outputs,
    spec: &Path,
    run: &str,
    rng: &mut Rng,
    max_progress: u64,
    step: Duration,
    reference: &Reference,
) -> TrialFigures {
    let mut t = TrialFigures::default();
    let kills = 1 + rng.below(2);
    for _ in 0..kills {
        let now = out.progress(run).min(max_progress);
        // Aim at each phase: start-up (lists loading), the first decisions, anywhere in the
        // writing, and the end (last parts, manifest, run record).
        let threshold = match rng.below(4) {
            0 => 0,
            1 => 1,
            2 => now + rng.below(max_progress - now + 1),
            _ => max_progress - rng.below(2),
        }
        .max(now);
        // Up to about one commit point's worth of time past the threshold.
        let delay = Duration::from_micros(rng.below(step.as_micros() as u64 + 1));
        if !send_and_kill(out, spec, run, threshold, delay) {
            *t.phases.entry("finished-first").or_default() += 1;
            break;
        }
        t.kills += 1;
        *t.phases.entry(phase(out, run)).or_default() += 1;
        let sw = sweep(out, run);
        t.torn_temps_seen += sw.temps.len() as u64;
        t.verified_after_kill += sw.parquet + sw.ifur + sw.json;
        if out.manifest(run).exists() {
            // The manifest is the ready signal, written last: every IFUR file, ledger part
            // and event part of the run is committed before it.
            assert_eq!(
                out.progress(run),
                max_progress,
                "{run}: manifest before every output was committed"
            );
        }
    }
    let resumed = exe()
        .args(["send", s(spec), "--run-id", run, "--no-progress"])
        .args(new_run_flag(spec, run))
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "resume of {run} failed: {}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    t.check = check_run(out, run, reference);
    // Checked: free the hot folder (a tmpfs in the cross-device trials) for the next trial.
    for n in out.ifur_names(run) {
        std::fs::remove_file(out.hot.join(n)).unwrap();
    }
    std::fs::remove_file(out.manifest(run)).unwrap();
    t
}

/// Runs `trials` kill trials on a generated campaign and prints the `figure` line.
fn kill_trials(figure: &str, trials: u64, rows: u64, roll: u64, part: u64, cross_device: bool) {
    let started = Instant::now();
    let d = tempfile::tempdir().unwrap();
    let spec = campaign(d.path(), rows, roll, part);
    let out = Outputs::of(d.path());
    let _fs = if cross_device {
        std::fs::create_dir_all(&out.hot).unwrap();
        match Tmpfs::mount(&out.hot, "512m") {
            Some(fs) => Some(fs),
            None => {
                println!("figure {figure} skipped=mount-not-permitted");
                return;
            }
        }
    } else {
        None
    };

    let ref_started = Instant::now();
    run(
        &["send", s(&spec), "--run-id", "ref", "--no-progress"],
        true,
    );
    let ref_time = ref_started.elapsed();
    let reference = Reference::take(&out, "ref", rows);
    let max_progress = out.progress("ref");
    assert!(
        reference.files.len() >= 10,
        "the campaign should roll files"
    );
    let step = ref_time / max_progress as u32;

    let mut rng = Rng(seed() ^ cross_device as u64);
    let mut total = TrialFigures::default();
    // A trial whose send finished before its kill tested nothing: it does not count, and
    // another run is tried (at most 3× the trials in all).
    let (mut runs, mut landed) = (0u64, 0u64);
    while landed < trials && runs < 3 * trials {
        let run_id = format!("trial{runs:03}");
        runs += 1;
        let t = kill_trial(
            &out,
            &spec,
            &run_id,
            &mut rng,
            max_progress,
            step,
            &reference,
        );
        total.kills += t.kills;
        landed += (t.kills > 0) as u64;
        total.torn_temps_seen += t.torn_temps_seen;
        total.verified_after_kill += t.verified_after_kill;
        for (p, n) in t.phases {
            *total.phases.entry(p).or_default() += n;
        }
        let c = &mut total.check;
        c.missing += t.check.missing;
        c.duplicates += t.check.duplicates;
        c.unexpected += t.check.unexpected;
        c.ledger_rows += t.check.ledger_rows;
        c.ledger_diff += t.check.ledger_diff;
        c.files_differ += t.check.files_differ;
        c.temps_left += t.check.temps_left;
    }
    let c = total.check;
    let phases: Vec<String> = total
        .phases
        .iter()
        .map(|(p, n)| format!("{p}:{n}"))
        .collect();
    println!(
        "figure {figure} trials={landed} runs={runs} rows={rows} files={} kills={} missing={} \
         duplicates={} \
         unexpected={} ledger_rows={}/{} ledger_diff={} files_differ={} temps_left={} \
         torn_temps_seen={} final_files_verified_after_kills={} phases={} seed={} \
         clean_run_secs={:.2} secs={:.1}",
        reference.files.len(),
        total.kills,
        c.missing,
        c.duplicates,
        c.unexpected,
        c.ledger_rows,
        rows * runs,
        c.ledger_diff,
        c.files_differ,
        c.temps_left,
        total.torn_temps_seen,
        total.verified_after_kill,
        phases.join(","),
        seed(),
        ref_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(c.missing, 0, "recipients missing from the IFUR files");
    assert_eq!(c.duplicates, 0, "recipients in two IFUR lines");
    assert_eq!(c.unexpected, 0, "IFUR lines for recipients not sent");
    assert_eq!(c.ledger_rows, rows * runs, "ledger rows != input rows");
    assert_eq!(
        c.ledger_diff, 0,
        "resumed ledgers differ from the clean run"
    );
    assert_eq!(
        c.files_differ, 0,
        "resumed IFUR files differ from the clean run"
    );
    assert_eq!(c.temps_left, 0, "temp files left after resume");
    assert_eq!(
        landed, trials,
        "kills landed in too few trials ({runs} runs)"
    );
}

/// Scenario 1 (send kill trials) and the IFUR half of scenario 7 (torn writes), with the hot
/// folder on the store's file system (delivery by rename).
#[test]
fn send_kill_trials() {
    if long_run() {
        kill_trials("kill_trials", 50, 200_000, 5_000, 16_384, false);
    } else {
        kill_trials("kill_trials", 10, 50_000, 1_000, 4_096, false);
    }
}

/// The same with the hot folder on its own file system (a tmpfs), so every delivery is the
/// copy-to-temp, fsync, rename path.
#[test]
fn send_kill_trials_cross_device() {
    if long_run() {
        kill_trials("kill_trials_cross_device", 25, 200_000, 5_000, 16_384, true);
    } else {
        kill_trials("kill_trials_cross_device", 5, 50_000, 1_000, 4_096, true);
    }
}

/// Scenario 7, a state too narrow for random kills to hit: a cross-device delivery killed
/// after its rename but before removing the staging copy. The resume must not leave that
/// copy behind (before the fix it stayed in staging forever, holding a whole file).
#[test]
fn stale_staging_copy_is_removed_on_resume() {
    let d = tempfile::tempdir().unwrap();
    let spec = campaign(d.path(), 5_000, 1_000, 2_048);
    let out = Outputs::of(d.path());
    run_ok(&spec, "stale");
    let path = out.record_path("stale");
    let mut rec = record(&out.store, WS, "stale");
    rec.status = RunStatus::Running;
    rec.save(&path).unwrap();
    let name = out.ifur_names("stale").remove(0);
    std::fs::create_dir_all(out.staging_dir("stale")).unwrap();
    std::fs::copy(
        out.hot.join(&name),
        out.staging_dir("stale").join(format!("{name}.tmp")),
    )
    .unwrap();
    run_ok(&spec, "stale");
    let rec = record(&out.store, WS, "stale");
    assert_eq!((rec.status, rec.attempts), (RunStatus::Done, 2));
    let left = names_in(&out.staging_dir("stale"), |_| true);
    println!("figure stale_staging_copy left_after_resume={}", left.len());
    assert!(left.is_empty(), "staging copy left behind: {left:?}");
}

/// A consuming MegaSys: a thread that moves every IFUR file and manifest out of the hot folder
/// as soon as it appears, as MegaSys does. Each take gets a numbered name in `taken/`, so a file
/// delivered twice is taken twice and shows twice.
struct MegaSys {
    hot: PathBuf,
    taken: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MegaSys {
    fn start(hot: &Path, taken: &Path) -> Self {
        std::fs::create_dir_all(hot).unwrap();
        std::fs::create_dir_all(taken).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (from, to, stopped) = (hot.to_path_buf(), taken.to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut seq = 0u64;
            loop {
                let last = stopped.load(Ordering::SeqCst);
                for n in names_in(&from, |n| {
                    n.ends_with(".ifur") || n.ends_with(".manifest.json")
                }) {
                    if take(&from.join(&n), &to.join(format!("{seq:06}-{n}"))) {
                        seq += 1;
                    }
                }
                if last {
                    break;
                }
                // The consumer's polling interval, not synchronisation.
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        MegaSys {
            hot: hot.to_path_buf(),
            taken: taken.to_path_buf(),
            stop,
            thread: Some(thread),
        }
    }

    /// Every take of a run's files, in take order: (file name, where the taken copy is).
    fn taken(&self, run: &str) -> Vec<(String, PathBuf)> {
        let mut v = names_in(&self.taken, |n| {
            let n = n.get(7..).unwrap_or_default();
            n.starts_with(&format!("{CAMPAIGN}_{run}_"))
                || n == format!("{CAMPAIGN}_{run}.manifest.json")
        });
        v.sort();
        v.into_iter()
            .map(|n| (n[7..].to_string(), self.taken.join(n)))
            .collect()
    }

    /// Waits until MegaSys has taken every file of the run that is in the hot folder.
    fn drain(&self, run: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !names_in(&self.hot, |n| {
            (n.ends_with(".ifur") || n.ends_with(".manifest.json"))
                && (n.contains(&format!("_{run}_")) || n.contains(&format!("_{run}.")))
        })
        .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "MegaSys did not take {run}'s files"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for MegaSys {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Takes one file (false if it is gone); across file systems by copy and removal.
fn take(from: &Path, to: &Path) -> bool {
    match std::fs::rename(from, to) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            std::fs::copy(from, to).unwrap();
            std::fs::remove_file(from).unwrap();
            true
        }
        Err(e) => panic!("MegaSys cannot take {}: {e}", from.display()),
    }
}

/// How a consuming trial stops a send.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// `BROADSIDE_FAULT`: the send SIGKILLs itself at this point.
    At(&'static str),
    /// SIGKILL from outside once MegaSys has taken this many of the run's files.
    AfterTaken(usize),
}

/// Figures of the consuming trials.
#[derive(Debug, Default)]
struct Consumed {
    kills: u64,
    takes: u64,
    taken_twice: u64,
    keys_missing: u64,
    keys_twice: u64,
    missing_listed: u64,
}

/// One trial against a consuming MegaSys: the kills, a resume after each (the last one left to
/// finish), MegaSys taking everything before each resume. Whatever MegaSys took, over all
/// attempts, must hold every sent key exactly once, and the manifest once.
fn consumed_trial(
    out: &Outputs,
    spec: &Path,
    megasys: &MegaSys,
    run: &str,
    kills: &[Kill],
) -> Consumed {
    let mut f = Consumed::default();
    for (i, kill) in kills.iter().enumerate() {
        let status = match *kill {
            Kill::At(point) => send_cmd(spec, run)
                .env("BROADSIDE_FAULT", point)
                .status()
                .unwrap(),
            Kill::AfterTaken(n) => {
                let mut child = send_cmd(spec, run).spawn().unwrap();
                let deadline = Instant::now() + Duration::from_secs(120);
                while megasys.taken(run).len() < n && child.try_wait().unwrap().is_none() {
                    assert!(Instant::now() < deadline, "send {run} stalled");
                    std::thread::sleep(Duration::from_millis(1));
                }
                let _ = child.kill();
                child.wait().unwrap()
            }
        };
        assert_eq!(
            status.signal(),
            Some(9),
            "{run}: kill {i} ({kill:?}) did not land: {status}"
        );
        f.kills += 1;
        if let Kill::At("manifest-delivered") = kill {
            assert_eq!(
                record(&out.store, WS, run).status,
                RunStatus::Running,
                "{run}: the kill should land between the manifest and the run record"
            );
        }
        megasys.drain(run);
    }
    let before: BTreeSet<String> = megasys.taken(run).into_iter().map(|t| t.0).collect();
    let resumed = exe()
        .args(["send", s(spec), "--run-id", run, "--no-progress"])
        .args(new_run_flag(spec, run))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "resume of {run} failed: {log}");
    megasys.drain(run);

    // The resume names every delivered file it found gone, in its log and its run record.
    let rec = record(&out.store, WS, run);
    assert_eq!(rec.status, RunStatus::Done);
    assert_eq!(rec.attempts as usize, kills.len() + 1);
    let listed: BTreeSet<String> = rec.delivered_missing.iter().cloned().collect();
    assert_eq!(listed.len(), rec.delivered_missing.len());
    assert_eq!(listed, before, "{run}: delivered_missing");
    for n in &before {
        assert!(
            log.contains(n.as_str()),
            "{run}: the log does not name {n}: {log}"
        );
    }
    f.missing_listed = listed.len() as u64;

    // Every file taken once, the manifest among them.
    let taken = megasys.taken(run);
    f.takes = taken.len() as u64;
    let mut times: BTreeMap<&str, u64> = BTreeMap::new();
    for (n, _) in &taken {
        *times.entry(n.as_str()).or_default() += 1;
    }
    f.taken_twice = times.values().map(|t| t - 1).sum();
    let manifest_name = format!("{CAMPAIGN}_{run}.manifest.json");
    assert_eq!(
        times.get(manifest_name.as_str()),
        Some(&1),
        "{run}: manifest takes"
    );

    // Every sent key (from the recipient log) in exactly one line of what MegaSys took.
    let mut lines: HashMap<String, u64> = HashMap::new();
    let mut files = BTreeMap::new();
    for (n, p) in taken.iter().filter(|t| t.0.ends_with(".ifur")) {
        let parsed = broadside_sinks::ifur::parse(&std::fs::read(p).unwrap())
            .unwrap_or_else(|e| panic!("{run}: MegaSys took a bad {n}: {e}"));
        for (key, _) in &parsed.details {
            *lines.entry(key.clone()).or_default() += 1;
        }
        files.insert(n.clone(), parsed);
    }
    let sent: HashSet<String> = read_ledger(&out.store, WS, CAMPAIGN, run)
        .into_iter()
        .filter(|r| r.decision == "sent")
        .map(|r| r.key.unwrap())
        .collect();
    f.keys_missing = sent.iter().filter(|k| !lines.contains_key(*k)).count() as u64;
    f.keys_twice = lines.values().map(|n| n - 1).sum();
    assert!(
        lines.keys().all(|k| sent.contains(k)),
        "{run}: MegaSys took lines for recipients not sent"
    );

    // The manifest MegaSys took lists exactly the files it took, with their trailers.
    let (_, mpath) = taken.iter().find(|t| t.0 == manifest_name).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mpath).unwrap()).unwrap();
    let entries = manifest["files"].as_array().unwrap();
    assert_eq!(entries.len(), files.len(), "{run}: manifest file count");
    for e in entries {
        let p = &files[e["file"].as_str().unwrap()];
        assert_eq!(e["rows"].as_u64().unwrap(), p.details.len() as u64);
        assert_eq!(
            e["checksum"].as_str().unwrap(),
            format!("{:016x}", p.checksum)
        );
    }
    assert_eq!(manifest["total_rows"].as_u64().unwrap(), sent.len() as u64);
    let temps = names_in(&out.hot, |n| {
        n.ends_with(".tmp") && n.contains(&format!("_{run}"))
    });
    assert!(
        temps.is_empty(),
        "{run}: temp files left in the hot folder: {temps:?}"
    );
    f
}

/// Scenario 9: a MegaSys that consumes the hot folder. Sends are killed at every phase of
/// delivery (mid-run from outside; between an IFUR file's delivery record and its rename;
/// after the rename; the same for the manifest; between the manifest and the run record; twice
/// in a row), then resumed: the union of what MegaSys took holds every sent key exactly once.
fn consuming_megasys_trials(figure: &str, cross_device: bool) {
    let d = tempfile::tempdir().unwrap();
    let spec = campaign(d.path(), 20_000, 500, 4_096);
    let out = Outputs::of(d.path());
    std::fs::create_dir_all(&out.hot).unwrap();
    let _fs = if cross_device {
        match Tmpfs::mount(&out.hot, "256m") {
            Some(fs) => Some(fs),
            None => {
                println!("figure {figure} skipped=mount-not-permitted");
                return;
            }
        }
    } else {
        None
    };
    let megasys = MegaSys::start(&out.hot, &d.path().join("megasys/taken"));
    let base: &[&[Kill]] = &[
        &[Kill::AfterTaken(2)],
        &[Kill::At("ifur-recorded:2")],
        &[Kill::At("ifur-delivered:3")],
        &[Kill::At("manifest-recorded")],
        &[Kill::At("manifest-delivered")],
        &[Kill::At("ifur-recorded:3"), Kill::At("manifest-delivered")],
        &[
            Kill::At("ifur-delivered:1"),
            Kill::AfterTaken(6),
            Kill::At("manifest-recorded"),
        ],
    ];
    let mut trials = base.to_vec();
    if cross_device {
        // Between the staging copy's removal and the landing copy's rename.
        trials.push(&[Kill::At("ifur-landed:2")]);
    }
    let mut total = Consumed::default();
    for (i, kills) in trials.iter().enumerate() {
        let f = consumed_trial(&out, &spec, &megasys, &format!("consumed{i}"), kills);
        total.kills += f.kills;
        total.takes += f.takes;
        total.taken_twice += f.taken_twice;
        total.keys_missing += f.keys_missing;
        total.keys_twice += f.keys_twice;
        total.missing_listed += f.missing_listed;
    }
    println!(
        "figure {figure} trials={} kills={} takes={} taken_twice={} keys_missing={} \
         keys_twice={} delivered_missing_listed={}",
        trials.len(),
        total.kills,
        total.takes,
        total.taken_twice,
        total.keys_missing,
        total.keys_twice,
        total.missing_listed
    );
    assert_eq!(total.taken_twice, 0, "files delivered twice");
    assert_eq!(total.keys_missing, 0, "sent keys MegaSys never got");
    assert_eq!(total.keys_twice, 0, "sent keys MegaSys got twice");
    assert!(total.missing_listed > 0, "no resume found a taken file");
}

#[test]
fn consuming_megasys_gets_every_key_once_whatever_the_kill() {
    consuming_megasys_trials("consuming_megasys", false);
}

/// The same with the hot folder on its own file system (delivery by copy, then rename).
#[test]
fn consuming_megasys_gets_every_key_once_whatever_the_kill_cross_device() {
    consuming_megasys_trials("consuming_megasys_cross_device", true);
}

/// Copies the generated inputs (not the outputs) of a campaign folder.
fn copy_inputs(from: &Path, to: &Path) {
    for n in names_in(from, |n| n.ends_with(".csv") || n.ends_with(".toml")) {
        std::fs::copy(from.join(&n), to.join(&n)).unwrap();
    }
}

/// Scenario 2: the same campaign in two folders (different worker counts) gives byte-identical
/// IFUR files and the same decision and variant for every recipient.
#[test]
fn same_campaign_in_two_folders_is_byte_identical() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let rows = 30_000;
    let spec_a = campaign(a.path(), rows, 2_500, 8_192);
    copy_inputs(a.path(), b.path());
    let spec_b = b.path().join("campaign.toml");
    run(&["send", s(&spec_a), "--run-id", "same"], true);
    run(
        &["send", s(&spec_b), "--run-id", "same", "--workers", "1"],
        true,
    );
    let (oa, ob) = (Outputs::of(a.path()), Outputs::of(b.path()));

    let names = oa.ifur_names("same");
    assert_eq!(names, ob.ifur_names("same"), "different file sets");
    assert!(names.len() >= 8, "expected rolled files: {names:?}");
    let mut differing_bytes = 0u64;
    for n in &names {
        let (x, y) = (
            std::fs::read(oa.hot.join(n)).unwrap(),
            std::fs::read(ob.hot.join(n)).unwrap(),
        );
        differing_bytes += x.iter().zip(&y).filter(|(p, q)| p != q).count() as u64
            + (x.len() as i64 - y.len() as i64).unsigned_abs();
    }

    // Manifests: equal but for `created_at`, the moment the manifest was written.
    let manifest = |o: &Outputs| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(o.manifest("same")).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("created_at");
        v
    };
    assert_eq!(manifest(&oa), manifest(&ob), "manifests differ");

    // Ledgers: the same decision, variant, reason and placement per row. The suppression
    // list column holds the resolved path of the list, which names the folder, so only its
    // file name is compared.
    let ledger = |o: &Outputs| -> Vec<LedgerRow> {
        read_ledger(&o.store, WS, CAMPAIGN, "same")
            .into_iter()
            .map(|mut r| {
                r.list = r.list.map(|l| {
                    Path::new(&l)
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .to_string()
                });
                r
            })
            .collect()
    };
    let (la, lb) = (ledger(&oa), ledger(&ob));
    assert_eq!(la.len() as u64, rows);
    let variant_changes = la
        .iter()
        .zip(&lb)
        .filter(|(x, y)| (&x.decision, &x.variant) != (&y.decision, &y.variant))
        .count();
    let other_changes = la.iter().zip(&lb).filter(|(x, y)| x != y).count();
    println!(
        "figure determinism files={} differing_bytes={differing_bytes} variant_changes={:.3}% \
         ledger_row_changes={other_changes} rows={rows}",
        names.len(),
        100.0 * variant_changes as f64 / rows as f64
    );
    assert_eq!(differing_bytes, 0, "IFUR files are not byte-identical");
    assert_eq!(variant_changes, 0);
    assert_eq!(other_changes, 0);
}

/// A tmpfs mounted for the length of a test (unmounted on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` at `at`; `None` where mounting is not permitted.
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success(), "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The run's committed files (final names) with their bytes.
fn committed(out: &Outputs, run: &str) -> BTreeMap<PathBuf, Vec<u8>> {
    out.run_files(run)
        .into_iter()
        .filter(|p| {
            let n = p.to_string_lossy();
            (n.ends_with(".ifur") || n.ends_with(".parquet")) && !n.contains("/staging/")
        })
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

/// After an output fault: the run failed with an error naming `must_name`, is recorded as
/// failed, and left only complete files. Returns what it had committed.
fn assert_failed_cleanly(
    out: &Outputs,
    run: &str,
    stderr: &str,
    must_name: &str,
) -> BTreeMap<PathBuf, Vec<u8>> {
    assert!(
        stderr.contains(must_name),
        "the error should name {must_name}: {stderr}"
    );
    let rec = record(&out.store, WS, run);
    assert_eq!(
        rec.status,
        RunStatus::Failed,
        "the run should be recorded as failed"
    );
    assert!(
        rec.error.as_deref().is_some_and(|e| e.contains(must_name)),
        "the run record's error should name {must_name}: {:?}",
        rec.error
    );
    assert!(!out.manifest(run).exists(), "a failed run has no manifest");
    sweep(out, run);
    committed(out, run)
}

/// After the fault is gone: the resume finishes, keeps every file committed before the
/// fault unchanged, and matches an uninterrupted run.
fn assert_resumes(
    out: &Outputs,
    spec: &Path,
    run: &str,
    rows: u64,
    before: &BTreeMap<PathBuf, Vec<u8>>,
) -> Check {
    run_ok(spec, run);
    let rec = record(&out.store, WS, run);
    assert_eq!(rec.attempts, 2);
    let mut lost = 0;
    for (p, bytes) in before {
        if std::fs::read(p).ok().as_ref() != Some(bytes) {
            lost += 1;
        }
    }
    assert_eq!(
        lost, 0,
        "files committed before the fault changed or vanished"
    );
    run_ok(spec, "clean");
    let reference = Reference::take(out, "clean", rows);
    let c = check_run(out, run, &reference);
    assert_eq!(
        (
            c.missing,
            c.duplicates,
            c.unexpected,
            c.ledger_diff,
            c.files_differ,
            c.temps_left
        ),
        (0, 0, 0, 0, 0, 0),
        "{c:?}"
    );
    assert_eq!(c.ledger_rows, rows);
    c
}

fn run_ok(spec: &Path, run_id: &str) {
    let mut args = vec!["send", s(spec), "--run-id", run_id, "--no-progress"];
    args.extend(new_run_flag(spec, run_id));
    run(&args, true);
}

/// Scenario 8, disk full: the hot folder is a small tmpfs (so delivery is a cross-device
/// copy). The send fails with ENOSPC naming the file, is recorded as failed, keeps what it
/// delivered, and resumes to the right totals once the file system is grown.
#[test]
fn disk_full_hot_folder_fails_clearly_and_resumes() {
    let d = tempfile::tempdir().unwrap();
    let rows = 20_000;
    let spec = campaign(d.path(), rows, 1_000, 2_048);
    let out = Outputs::of(d.path());
    std::fs::create_dir_all(&out.hot).unwrap();
    let Some(fs) = Tmpfs::mount(&out.hot, "700k") else {
        println!("figure disk_full skipped=mount-not-permitted");
        return;
    };
    let failed = exe()
        .args(["send", s(&spec), "--run-id", "full", "--no-progress"])
        .output()
        .unwrap();
    assert!(
        !failed.status.success(),
        "the send should fail on a full disk"
    );
    let stderr = String::from_utf8_lossy(&failed.stderr).to_string();
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let hot = out.hot.display().to_string();
    let before = assert_failed_cleanly(&out, "full", &stderr, &hot);
    let delivered_before = out.ifur_names("full").len();
    let temps_in_hot = names_in(&out.hot, |n| n.ends_with(".tmp")).len();

    fs.resize("64m");
    let c = assert_resumes(&out, &spec, "full", rows, &before);
    println!(
        "figure disk_full error=ENOSPC delivered_before_fault={delivered_before} \
         temps_in_hot_after_fault={temps_in_hot} committed_kept={} missing={} duplicates={} \
         ledger_rows={}/{rows}",
        before.len(),
        c.missing,
        c.duplicates,
        c.ledger_rows
    );
    assert!(delivered_before >= 1, "the fault should land mid-run");
    assert_eq!(
        temps_in_hot, 0,
        "a failed delivery left a partial file in the hot folder"
    );
}

/// Scenario 8, file-size limit (works without privileges): the send runs under
/// `RLIMIT_FSIZE`, so writes past the limit fail with EFBIG mid-run.
#[test]
fn file_size_limit_fails_clearly_and_resumes() {
    // The sinks meet the limit (the deduplication stage's working file, which grows by 16
    // bytes per row from the first batch on, is tested on its own below).
    let (before, c, rows) = send_under_file_size_limit(false, "efbig");
    assert!(!before.is_empty(), "the fault should land mid-run");
    println!(
        "figure file_size_limit error=EFBIG committed_kept={} missing={} duplicates={} \
         ledger_rows={}/{rows}",
        before.len(),
        c.missing,
        c.duplicates,
        c.ledger_rows
    );
}

#[test]
fn a_working_file_over_the_file_size_limit_fails_clearly_and_resumes() {
    let (_, c, rows) = send_under_file_size_limit(true, "efbig-dedupe");
    assert_eq!((c.missing, c.duplicates), (0, 0));
    assert_eq!(c.ledger_rows, rows);
}

/// Sends 20 000 rows under a 120 kB file size limit (`RLIMIT_FSIZE`, SIGXFSZ ignored so writes
/// fail with EFBIG), checks the failure is clean and names the file, then resumes without the
/// limit. Returns what was committed before the fault and the resume's check.
fn send_under_file_size_limit(dedupe: bool, run: &str) -> (BTreeMap<PathBuf, Vec<u8>>, Check, u64) {
    let d = tempfile::tempdir().unwrap();
    let rows = 20_000;
    // Small IFUR files (500 lines) commit under the limit; a ledger or event part (16 384
    // rows, written at its close) does not.
    let spec = campaign(d.path(), rows, 500, 16_384);
    if !dedupe {
        let text = std::fs::read_to_string(&spec).unwrap();
        std::fs::write(&spec, format!("dedupe = false\n{text}")).unwrap();
    }
    let out = Outputs::of(d.path());
    let mut cmd = exe();
    cmd.args(["send", s(&spec), "--run-id", run, "--no-progress"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 120_000,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Ignored SIGXFSZ survives exec: writes then fail with EFBIG instead of killing.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let failed = cmd.output().unwrap();
    assert!(
        !failed.status.success(),
        "the send should fail at the limit"
    );
    let stderr = String::from_utf8_lossy(&failed.stderr).to_string();
    assert!(stderr.contains("File too large"), "{stderr}");
    let must_name = match dedupe {
        true => out
            .store
            .join(format!("campaign_runs/workspace_id={WS}/.dedupe-{run}-"))
            .display()
            .to_string(),
        false => d.path().display().to_string(),
    };
    let before = assert_failed_cleanly(&out, run, &stderr, &must_name);
    let c = assert_resumes(&out, &spec, run, rows, &before);
    (before, c, rows)
}

/// Whether mode 0o500 stops this process from writing (it does not for root).
fn chmod_blocks_writes(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let probe = dir.join("probe");
    std::fs::create_dir_all(&probe).unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o500)).unwrap();
    let blocked = File::create(probe.join("x")).is_err();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::remove_dir_all(&probe).unwrap();
    blocked
}

/// Makes `target` uncreatable: its parent gets mode 0o500, or (for root, which ignores the
/// mode) the parent is replaced by a regular file. Returns how, and the undo.
fn block(target: &Path) -> (&'static str, Box<dyn FnOnce()>) {
    use std::os::unix::fs::PermissionsExt;
    let parent = target.parent().unwrap().to_path_buf();
    let scratch = parent.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&scratch).unwrap();
    if chmod_blocks_writes(&scratch) {
        std::fs::create_dir_all(&parent).unwrap();
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o500)).unwrap();
        let undo = move || {
            std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)).unwrap()
        };
        ("chmod-0500", Box::new(undo))
    } else {
        assert!(!parent.exists(), "{} exists", parent.display());
        std::fs::write(&parent, b"not a folder").unwrap();
        let undo = move || std::fs::remove_file(&parent).unwrap();
        ("parent-is-a-file", Box::new(undo))
    }
}

/// Scenario 8, permission denied: the hot folder, then the recipient-log folder cannot be
/// created. The send fails naming the folder, the run is recorded as failed (not left
/// `running`), and once the folder can be created the resume completes.
#[test]
fn unwritable_output_folders_fail_clearly_and_resume() {
    let mut figures = Vec::new();
    for which in ["hot-folder", "ledger-folder"] {
        let d = tempfile::tempdir().unwrap();
        let rows = 5_000;
        let spec = campaign(d.path(), rows, 1_000, 2_048);
        let out = Outputs::of(d.path());
        let target = match which {
            "hot-folder" => out.hot.clone(),
            _ => out.ledger_dir("denied"),
        };
        let (how, undo) = block(&target);
        let failed = exe()
            .args(["send", s(&spec), "--run-id", "denied", "--no-progress"])
            .output()
            .unwrap();
        assert!(!failed.status.success(), "{which}: the send should fail");
        let stderr = String::from_utf8_lossy(&failed.stderr).to_string();
        let named = target.parent().unwrap().display().to_string();
        let before = assert_failed_cleanly(&out, "denied", &stderr, &named);
        undo();
        let c = assert_resumes(&out, &spec, "denied", rows, &before);
        figures.push(format!(
            "{which}:{how}:missing={},duplicates={},ledger_rows={}/{rows}",
            c.missing, c.duplicates, c.ledger_rows
        ));
    }
    println!("figure permission_denied {}", figures.join(" "));
}

// ---------------------------------------------------------------------------------------------
// Scenarios 10 and 11 over real TCP: `broadside serve` with two workspaces, `demo` (the caller)
// and `canary`, whose rows must never reach the caller.

const DEMO_TOKEN: &str = "bs_reliability_demo_token_0001";
const CANARY_TOKEN: &str = "bs_reliability_canary_token_0002";

/// A running API over a store holding a real send and events of both workspaces.
struct ApiFixture {
    _dir: tempfile::TempDir,
    server: Server,
    store: PathBuf,
    /// Strings only canary rows contain (event ids, emails, the run id).
    markers: Vec<String>,
    /// A canary Parquet file, by path.
    canary_file: PathBuf,
}

fn event_line(id: &str, ws: &str, campaign: &str, run: &str, email: &str, kind: &str) -> String {
    let bounce = if kind == "bounced" {
        r#","bounce_type":"hard""#
    } else {
        ""
    };
    format!(
        r#"{{"event_id":"{id}","workspace_id":"{ws}","campaign_id":"{campaign}","run_id":"{run}","variant":"A","email":"{email}","event_type":"{kind}"{bounce},"ts":"2026-11-20T10:00:00Z"}}"#
    )
}

fn api_fixture(limits: &[&str]) -> ApiFixture {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let quoted_store = format!("\"{}\"", store.display());

    // The caller's workspace: a real send (run record, recipient log, submitted events).
    let own = d.path().join("own");
    std::fs::create_dir_all(&own).unwrap();
    let spec = generate(&own, 2_000, 200, &[]);
    set_spec(&spec, "store", &quoted_store);
    run_ok(&spec, "r1");

    // The canary workspace: another send (other seed, other ids) into the same store.
    let canary = d.path().join("canary");
    std::fs::create_dir_all(&canary).unwrap();
    let cspec = generate(&canary, 500, 50, &["--seed", "99"]);
    set_spec(&cspec, "store", &quoted_store);
    set_spec(&cspec, "workspace_id", "\"canary\"");
    set_spec(&cspec, "campaign_id", "\"canarycamp\"");
    run_ok(&cspec, "canaryrun");
    let demo_keys: HashSet<String> = read_ledger(&store, WS, CAMPAIGN, "r1")
        .into_iter()
        .filter_map(|r| r.key)
        .collect();
    let mut markers: Vec<String> = read_ledger(&store, "canary", "canarycamp", "canaryrun")
        .into_iter()
        .filter_map(|r| r.key)
        .filter(|k| k.contains('@') && !demo_keys.contains(k))
        .take(200)
        .collect();
    markers.extend([
        "CANARYEV".to_string(),
        "canary-only.example".into(),
        "canaryrun".into(),
    ]);

    // Engagement events for both, bounces included.
    let mut lines = Vec::new();
    for (i, kind) in ["delivered", "opened", "clicked", "bounced"]
        .iter()
        .cycle()
        .take(40)
        .enumerate()
    {
        lines.push(event_line(
            &format!("ev-demo-{i}"),
            WS,
            CAMPAIGN,
            "r1",
            &format!("d{i}@example.com"),
            kind,
        ));
        lines.push(event_line(
            &format!("CANARYEV-{i}"),
            "canary",
            "canarycamp",
            "canaryrun",
            &format!("c{i}@canary-only.example"),
            kind,
        ));
    }
    let events = d.path().join("events.ndjson");
    std::fs::write(&events, lines.join("\n") + "\n").unwrap();
    run(
        &["ingest", "--store", s(&store), "--from", s(&events)],
        true,
    );

    let tokens = d.path().join("tokens.toml");
    let hash = broadside_analytics::api::token_hash;
    std::fs::write(
        &tokens,
        format!(
            "[[tokens]]\nname = \"demo\"\nsha256 = \"{}\"\nworkspaces = [\"demo\"]\n\n\
             [[tokens]]\nname = \"canary\"\nsha256 = \"{}\"\nworkspaces = [\"canary\"]\n",
            hash(DEMO_TOKEN),
            hash(CANARY_TOKEN)
        ),
    )
    .unwrap();
    let mut args = vec![
        "--store",
        s(&store),
        "--tokens",
        s(&tokens),
        "--rollup-every",
        "0",
    ];
    args.extend_from_slice(limits);
    let server = Server::start(&args, &[]);
    let mut canary_file = None;
    walk(&store.join("events/workspace_id=canary"), &mut |p| {
        canary_file.get_or_insert(p.to_path_buf());
    });
    ApiFixture {
        _dir: d,
        server,
        store,
        markers,
        canary_file: canary_file.expect("canary events were ingested"),
    }
}

/// One HTTP/1.1 request over a fresh connection: (status, body), chunked bodies decoded.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" || !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    sock.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    sock.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head[9..12].parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    if !chunked {
        return (status, rest.to_string());
    }
    let mut out = String::new();
    let mut rest = rest;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    (status, out)
}

/// Every route of analytics/src/api.rs, with the concrete request the matrix sends.
const ROUTES: &[(&str, &str, &str, &str)] = &[
    ("GET", "/campaign-statistics/", "/campaign-statistics/", ""),
    ("GET", "/campaign-statistics", "/campaign-statistics", ""),
    (
        "GET",
        "/campaign-statistics/{campaign_id}",
        "/campaign-statistics/generated-42",
        "",
    ),
    (
        "GET",
        "/campaign-statistics/{campaign_id}/time-series",
        "/campaign-statistics/generated-42/time-series?granularity=day",
        "",
    ),
    ("GET", "/campaign-events/", "/campaign-events/", ""),
    ("GET", "/campaign-events", "/campaign-events", ""),
    ("GET", "/bounce-events/", "/bounce-events/", ""),
    ("GET", "/bounce-events", "/bounce-events", ""),
    ("GET", "/bounce-events/{id}", "/bounce-events/ev-demo-3", ""),
    ("GET", "/historical-bounces/", "/historical-bounces/", ""),
    ("GET", "/historical-bounces", "/historical-bounces", ""),
    (
        "GET",
        "/historical-bounces/export",
        "/historical-bounces/export",
        "",
    ),
    (
        "POST",
        "/historical-bounces/backfill",
        "/historical-bounces/backfill",
        r#"{"full_backfill": true}"#,
    ),
    (
        "GET",
        "/historical-bounces/backfill/{job_id}",
        "/historical-bounces/backfill/1",
        "",
    ),
    ("GET", "/campaign-runs/", "/campaign-runs/", ""),
    ("GET", "/campaign-runs", "/campaign-runs", ""),
    ("GET", "/campaign-runs/{id}", "/campaign-runs/r1", ""),
    (
        "GET",
        "/campaign-recipient-logs/",
        "/campaign-recipient-logs/",
        "",
    ),
    (
        "GET",
        "/campaign-recipient-logs",
        "/campaign-recipient-logs",
        "",
    ),
    (
        "GET",
        "/campaign-recipient-logs/{id}",
        "/campaign-recipient-logs/r1:0",
        "",
    ),
    (
        "GET",
        "/recipients/{email}/history",
        "/recipients/d1@example.com/history",
        "",
    ),
    (
        "POST",
        "/sql",
        "/sql",
        r#"{"sql": "SELECT event_id, email FROM events"}"#,
    ),
];

fn leaked(body: &str, markers: &[String]) -> bool {
    let hit = markers.iter().find(|m| body.contains(m.as_str()));
    if let Some(m) = hit {
        eprintln!("canary marker {m:?} in: {}", &body[..body.len().min(2000)]);
    }
    hit.is_some()
}

/// (name, headers, extra query, expected status) of one unauthorised attempt.
type Attempt<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, u16);

/// The authenticated route paths a router source file declares (`.route("…"`).
fn declared_routes(file: &str) -> HashSet<String> {
    let source = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    source
        .split(".route(")
        .skip(1)
        .filter_map(|r| r.trim_start().strip_prefix('"')?.split('"').next())
        .filter(|p| *p != "/healthz" && *p != "/openapi.json")
        .map(String::from)
        .collect()
}

/// The refused attempts of the isolation matrices.
fn refused_attempts<'a>(demo: &'a str, canary: &'a str, wrong: &'a str) -> Vec<Attempt<'a>> {
    vec![
        ("no-token", vec![("workspace_id", WS)], "", 401),
        (
            "wrong-token",
            vec![("Authorization", wrong), ("workspace_id", WS)],
            "",
            401,
        ),
        (
            "malformed-auth",
            vec![
                ("Authorization", "Basic ZGVtbzpkZW1v"),
                ("workspace_id", WS),
            ],
            "",
            401,
        ),
        (
            "other-workspace-token",
            vec![("Authorization", canary), ("workspace_id", WS)],
            "",
            403,
        ),
        (
            "header-names-other-workspace",
            vec![("Authorization", demo), ("workspace_id", "canary")],
            "",
            403,
        ),
        ("no-header", vec![("Authorization", demo)], "", 403),
        (
            "query-mismatches-header",
            vec![("Authorization", demo), ("workspace_id", WS)],
            "workspace_id=canary",
            403,
        ),
        (
            "dotdot",
            vec![("Authorization", demo), ("workspace_id", "../canary")],
            "",
            403,
        ),
        (
            "dotdot-inside",
            vec![("Authorization", demo), ("workspace_id", "demo/../canary")],
            "",
            403,
        ),
        (
            "encoded-dotdot",
            vec![("Authorization", demo), ("workspace_id", "..%2Fcanary")],
            "",
            403,
        ),
        (
            "sql-quote",
            vec![("Authorization", demo), ("workspace_id", "demo' OR '1'='1")],
            "",
            403,
        ),
        (
            "sql-statement",
            vec![
                ("Authorization", demo),
                ("workspace_id", "demo; DROP TABLE events; --"),
            ],
            "",
            403,
        ),
    ]
}

/// Scenario 10: every authenticated route × {no token, wrong or malformed token, another
/// workspace's token, a workspace the token may not read, no header, header/query mismatch,
/// ids with `../` or SQL} over TCP: 401/403 and no canary row in any answer.
#[test]
fn tenant_isolation_matrix_over_tcp() {
    let f = api_fixture(&[]);
    let addr = f.server.addr.clone();

    // The matrix covers every authenticated route the router declares.
    let covered: HashSet<String> = ROUTES.iter().map(|r| r.1.to_string()).collect();
    assert_eq!(
        declared_routes("analytics/src/api.rs"),
        covered,
        "routes missing from the matrix"
    );

    let bearer = |t: &str| format!("Bearer {t}");
    let demo = bearer(DEMO_TOKEN);
    let canary = bearer(CANARY_TOKEN);
    let wrong = bearer("bs_not_a_token");
    let attempts = refused_attempts(&demo, &canary, &wrong);

    let (mut requests, mut wrong_status, mut leaks) = (0, Vec::new(), 0);
    for (method, _, path, body) in ROUTES {
        for (name, headers, query, want) in &attempts {
            let path = if query.is_empty() {
                path.to_string()
            } else {
                let sep = if path.contains('?') { '&' } else { '?' };
                format!("{path}{sep}{query}")
            };
            let (status, text) = http(&addr, method, &path, headers, body);
            requests += 1;
            if status != *want {
                wrong_status.push(format!("{method} {path} {name}: {status} {text}"));
            }
            if leaked(&text, &f.markers) {
                leaks += 1;
            }
        }
        // The rightful caller gets an answer without canary rows.
        let (status, text) = http(
            &addr,
            method,
            path,
            &[("Authorization", &demo), ("workspace_id", WS)],
            body,
        );
        requests += 1;
        assert!(status < 500, "{method} {path}: {status} {text}");
        if leaked(&text, &f.markers) {
            leaks += 1;
        }
    }

    // The caller asking for canary rows by id finds nothing.
    let mut lookups = 0;
    for path in [
        "/campaign-runs/canaryrun",
        "/bounce-events/CANARYEV-3",
        "/campaign-recipient-logs/canaryrun:0",
    ] {
        let (status, text) = http(
            &addr,
            "GET",
            path,
            &[("Authorization", &demo), ("workspace_id", WS)],
            "",
        );
        lookups += 1;
        assert_eq!(status, 404, "{path}: {text}");
        let id = path.rsplit('/').next().unwrap().split(':').next().unwrap();
        // The answer may echo the id asked for; anything else of the canary is a leak.
        if leaked(&text.replace(id, ""), &f.markers) {
            leaks += 1;
        }
    }
    // A canary recipient's history, asked by the caller: empty.
    let (status, text) = http(
        &addr,
        "GET",
        "/recipients/c1@canary-only.example/history",
        &[("Authorization", &demo), ("workspace_id", WS)],
        "",
    );
    lookups += 1;
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["items"], serde_json::json!([]), "{text}");
    if leaked(&text.replace("c1@canary-only.example", ""), &f.markers) {
        leaks += 1;
    }
    let (status, text) = http(
        &addr,
        "GET",
        "/campaign-statistics/canarycamp",
        &[("Authorization", &demo), ("workspace_id", WS)],
        "",
    );
    assert!(
        status == 404 || !text.contains("\"delivered\":10"),
        "{status} {text}"
    );
    if leaked(&text, &f.markers) {
        leaks += 1;
    }

    // The markers are real: the canary's own token sees them.
    let (status, text) = http(
        &addr,
        "GET",
        "/campaign-events",
        &[("Authorization", &canary), ("workspace_id", "canary")],
        "",
    );
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("CANARYEV"), "{text}");
    let (status, text) = http(
        &addr,
        "GET",
        "/campaign-events",
        &[("Authorization", &demo), ("workspace_id", WS)],
        "",
    );
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("ev-demo-"),
        "the caller sees its own rows: {text}"
    );

    println!(
        "figure tenant_isolation_tcp routes={} attempts_per_route={} requests={} \
         wrong_status={} canary_leaks={leaks} cross_workspace_lookups={lookups}",
        ROUTES.len(),
        attempts.len() + 1,
        requests + lookups + 3,
        wrong_status.len()
    );
    assert!(wrong_status.is_empty(), "{wrong_status:#?}");
    assert_eq!(leaks, 0, "canary rows leaked");
}

/// Scenario 11: DDL, DML, COPY, SET, file-path tables and table functions are refused over
/// TCP without touching a file; a runaway cross join is stopped by the time limit and a
/// memory-hungry one by the memory limit, while the other tenant's queries keep answering.
#[test]
fn sql_refusal_corpus_over_tcp() {
    let f = api_fixture(&["--query-timeout-secs", "3", "--query-memory-mb", "32"]);
    let addr = f.server.addr.clone();
    let demo = format!("Bearer {DEMO_TOKEN}");
    let canary = format!("Bearer {CANARY_TOKEN}");
    let as_demo = [("Authorization", demo.as_str()), ("workspace_id", WS)];
    let as_canary = [
        ("Authorization", canary.as_str()),
        ("workspace_id", "canary"),
    ];
    let sql = |sql: &str| serde_json::json!({ "sql": sql }).to_string();

    let escape = f.store.parent().unwrap().join("escaped.parquet");
    let canary_file = f.canary_file.display().to_string();
    let canary_dir = f
        .store
        .join("events/workspace_id=canary")
        .display()
        .to_string();
    let canary_before = std::fs::read(&f.canary_file).unwrap();
    let e = escape.display().to_string();
    let corpus: Vec<String> = vec![
        "CREATE TABLE t AS SELECT 1".into(),
        format!("CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '{canary_dir}'"),
        "CREATE VIEW v AS SELECT * FROM events".into(),
        "DROP TABLE events".into(),
        "INSERT INTO events SELECT * FROM events".into(),
        "UPDATE events SET email = 'x'".into(),
        "DELETE FROM events".into(),
        format!("COPY events TO '{e}'"),
        format!("COPY (SELECT * FROM events) TO '{e}' STORED AS PARQUET"),
        format!("EXPLAIN COPY events TO '{e}'"),
        "SET datafusion.execution.target_partitions = 1".into(),
        "SET datafusion.runtime.memory_limit = '64G'".into(),
        "RESET datafusion.execution.target_partitions".into(),
        "SELECT * FROM '/etc/passwd'".into(),
        format!("SELECT * FROM '{canary_file}'"),
        format!("SELECT * FROM '{canary_dir}/'"),
        "SELECT * FROM '../workspace_id=canary/'".into(),
        format!("SELECT * FROM read_parquet('{canary_file}')"),
        "SELECT * FROM read_csv('/etc/passwd')".into(),
        format!("SELECT * FROM parquet_scan('{canary_file}')"),
        "SELECT * FROM \"workspace_id=canary\".events".into(),
        "SELECT 1; DROP TABLE events".into(),
        "PREPARE p AS SELECT 1".into(),
        "ATTACH DATABASE 'x.db' AS x".into(),
    ];
    let mut refused = 0;
    let mut accepted = Vec::new();
    let mut leaks = 0;
    for q in &corpus {
        let (status, text) = http(&addr, "POST", "/sql", &as_demo, &sql(q));
        if status == 400 {
            refused += 1;
        } else {
            accepted.push(format!("{q}: {status} {text}"));
        }
        // An error may echo the path the statement named (the canary file's name holds the
        // canary run id); anything else of the canary is a leak.
        if leaked(&text.replace(&canary_file, ""), &f.markers) {
            leaks += 1;
        }
    }
    assert!(!escape.exists(), "COPY wrote a file");
    assert_eq!(
        std::fs::read(&f.canary_file).unwrap(),
        canary_before,
        "a canary file changed"
    );

    // Runaway queries in the caller's workspace; the canary tenant keeps being answered.
    let runaway = [
        (
            "cross-join-timeout",
            "SELECT max(a.key || b.key || c.key) AS m FROM recipient_logs a, recipient_logs b, recipient_logs c",
        ),
        (
            "cross-join-memory",
            "SELECT count(*) AS n FROM \
             (SELECT a.key || b.key AS k FROM recipient_logs a, recipient_logs b) x JOIN \
             (SELECT a.key || b.key AS k FROM recipient_logs a, recipient_logs b) y ON x.k = y.k",
        ),
    ];
    let mut outcomes = Vec::new();
    for (name, q) in runaway {
        let (a, body) = (addr.clone(), sql(q));
        let headers: Vec<(String, String)> = as_demo
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let h = std::thread::spawn(move || {
            let hs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            http(&a, "POST", "/sql", &hs, &body)
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut answered_meanwhile, mut other_errors) = (0, 0);
        while !h.is_finished() {
            assert!(Instant::now() < deadline, "{name} never stopped");
            let (status, text) = http(
                &addr,
                "POST",
                "/sql",
                &as_canary,
                &sql("SELECT count(*) AS n FROM events"),
            );
            if status == 200 && text.contains("\"n\"") {
                if !h.is_finished() {
                    answered_meanwhile += 1;
                }
            } else {
                other_errors += 1;
            }
        }
        let (status, text) = h.join().unwrap();
        if leaked(&text, &f.markers) {
            leaks += 1;
        }
        let stopped_by = if status == 504 {
            "time-limit"
        } else if text.contains("esources exhausted") {
            "memory-limit"
        } else {
            "other"
        };
        outcomes.push(format!(
            "{name}:status={status},stopped_by={stopped_by},other_tenant_answered={answered_meanwhile},other_tenant_errors={other_errors}"
        ));
        eprintln!("{name}: {status} {}", &text[..text.len().min(400)]);
        assert_ne!(
            status,
            200,
            "{name} was not stopped: {}",
            &text[..text.len().min(300)]
        );
        assert!(status >= 400, "{name}: {status} {text}");
        if name == "cross-join-timeout" {
            // Constant memory: only the time limit can stop it.
            assert_eq!(stopped_by, "time-limit", "{text}");
        }
        assert!(
            answered_meanwhile >= 1,
            "{name}: the other tenant got no answer meanwhile"
        );
        assert_eq!(other_errors, 0, "{name}: the other tenant got errors");
    }
    // The server still answers the caller afterwards.
    let (status, text) = http(
        &addr,
        "POST",
        "/sql",
        &as_demo,
        &sql("SELECT count(*) AS n FROM events"),
    );
    assert_eq!(status, 200, "{text}");

    println!(
        "figure sql_refusals_tcp statements={} refused={refused} accepted={} canary_leaks={leaks} {}",
        corpus.len(),
        accepted.len(),
        outcomes.join(" ")
    );
    assert!(accepted.is_empty(), "accepted: {accepted:#?}");
    assert_eq!(leaks, 0);
}

/// Scenario 10 for the campaign API (`broadside serve --campaigns`, same token file): every
/// route × the refused attempts over TCP, and the caller's reads and writes of the canary's
/// campaign, sending and audience by id.
#[test]
fn campaign_api_isolation_matrix_over_tcp() {
    let d = tempfile::tempdir().unwrap();
    let tokens = d.path().join("tokens.toml");
    let hash = broadside_analytics::api::token_hash;
    std::fs::write(
        &tokens,
        format!(
            "[[tokens]]\nname = \"demo\"\nsha256 = \"{}\"\nworkspaces = [\"demo\"]\n\n\
             [[tokens]]\nname = \"canary\"\nsha256 = \"{}\"\nworkspaces = [\"canary\"]\n",
            hash(DEMO_TOKEN),
            hash(CANARY_TOKEN)
        ),
    )
    .unwrap();
    let db = d.path().join("campaigns.db");
    let server = Server::start(&["--tokens", s(&tokens), "--campaigns", s(&db)], &[]);
    let addr = server.addr.clone();
    let demo = format!("Bearer {DEMO_TOKEN}");
    let canary = format!("Bearer {CANARY_TOKEN}");
    let wrong = "Bearer bs_not_a_token".to_string();
    let as_demo = [("Authorization", demo.as_str()), ("workspace_id", WS)];
    let as_canary = [
        ("Authorization", canary.as_str()),
        ("workspace_id", "canary"),
    ];

    // Each workspace creates a campaign, a sending and an audience.
    let create = |who: &[(&str, &str)], path: &str, body: &str| -> i64 {
        let (status, text) = http(&addr, "POST", path, who, body);
        assert!(status == 201 || status == 200, "{path}: {status} {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("{path}: no id in {text}"))
    };
    let demo_c = create(&as_demo, "/campaign", r#"{"name": "demo-camp"}"#);
    let demo_s = create(
        &as_demo,
        &format!("/campaign/{demo_c}/sendings"),
        r#"{"recipients": [{"email": "d1@example.com"}]}"#,
    );
    let demo_a = create(
        &as_demo,
        "/audience",
        r#"{"name": "demo-aud", "conditions": []}"#,
    );
    let canary_c = create(&as_canary, "/campaign", r#"{"name": "CANARYCAMP-secret"}"#);
    let canary_s = create(
        &as_canary,
        &format!("/campaign/{canary_c}/sendings"),
        r#"{"recipients": [{"email": "c1@canary-only.example"}]}"#,
    );
    let canary_a = create(
        &as_canary,
        "/audience",
        r#"{"name": "CANARYAUD", "conditions": []}"#,
    );
    let markers: Vec<String> = ["CANARYCAMP", "canary-only.example", "CANARYAUD"]
        .map(String::from)
        .to_vec();

    let (c, sd, a) = (demo_c, demo_s, demo_a);
    let routes: Vec<(&str, &str, String, &str)> = vec![
        ("GET", "/campaign", "/campaign".into(), ""),
        ("POST", "/campaign", "/campaign".into(), r#"{"name": "x"}"#),
        ("GET", "/campaign/{id}", format!("/campaign/{c}"), ""),
        (
            "PUT",
            "/campaign/{id}",
            format!("/campaign/{c}"),
            r#"{"name": "renamed"}"#,
        ),
        ("DELETE", "/campaign/{id}", format!("/campaign/{c}"), ""),
        (
            "GET",
            "/campaign/{id}/spec",
            format!("/campaign/{c}/spec"),
            "",
        ),
        (
            "PUT",
            "/campaign/{id}/spec",
            format!("/campaign/{c}/spec"),
            "channel = \"email\"",
        ),
        (
            "DELETE",
            "/campaign/{id}/spec",
            format!("/campaign/{c}/spec"),
            "",
        ),
        (
            "GET",
            "/campaign/{id}/sendings",
            format!("/campaign/{c}/sendings"),
            "",
        ),
        (
            "POST",
            "/campaign/{id}/sendings",
            format!("/campaign/{c}/sendings"),
            r#"{"recipients": [{"email": "x@example.com"}]}"#,
        ),
        (
            "GET",
            "/campaign/{id}/sendings/{sid}",
            format!("/campaign/{c}/sendings/{sd}"),
            "",
        ),
        (
            "PUT",
            "/campaign/{id}/sendings/{sid}",
            format!("/campaign/{c}/sendings/{sd}"),
            r#"{"when": "2030-01-01T00:00:00Z"}"#,
        ),
        (
            "DELETE",
            "/campaign/{id}/sendings/{sid}",
            format!("/campaign/{c}/sendings/{sd}"),
            "",
        ),
        (
            "POST",
            "/audience",
            "/audience".into(),
            r#"{"name": "x", "conditions": []}"#,
        ),
        ("GET", "/audience/{id}", format!("/audience/{a}"), ""),
    ];
    let covered: HashSet<String> = routes.iter().map(|r| r.1.to_string()).collect();
    assert_eq!(
        declared_routes("campaigns/src/api.rs"),
        covered,
        "routes missing from the matrix"
    );

    let attempts = refused_attempts(&demo, &canary, &wrong);
    let (mut requests, mut wrong_status, mut leaks) = (0, Vec::new(), 0);
    for (method, _, path, body) in &routes {
        for (name, headers, query, want) in &attempts {
            let path = if query.is_empty() {
                path.clone()
            } else {
                format!("{path}?{query}")
            };
            let (status, text) = http(&addr, method, &path, headers, body);
            requests += 1;
            if leaked(&text, &markers) {
                leaks += 1;
            }
            if status != *want {
                wrong_status.push(format!("{method} {path} {name}: {status} {text}"));
            }
        }
    }
    // Nothing the refused attempts sent changed anything: the caller's rows are intact.
    for path in [
        format!("/campaign/{c}"),
        format!("/campaign/{c}/sendings/{sd}"),
        format!("/audience/{a}"),
    ] {
        let (status, text) = http(&addr, "GET", &path, &as_demo, "");
        assert_eq!(status, 200, "{path}: {text}");
        assert!(!text.contains("renamed"), "{path} was changed: {text}");
        if leaked(&text, &markers) {
            leaks += 1;
        }
    }
    let (status, text) = http(&addr, "GET", "/campaign", &as_demo, "");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("demo-camp"), "{text}");
    if leaked(&text, &markers) {
        leaks += 1;
    }

    // The caller reading, changing or deleting the canary's rows by id finds nothing.
    let (cc, cs, ca) = (canary_c, canary_s, canary_a);
    let mut lookups = 0;
    for (method, path, body) in [
        ("GET", format!("/campaign/{cc}"), ""),
        ("PUT", format!("/campaign/{cc}"), r#"{"name": "taken"}"#),
        ("DELETE", format!("/campaign/{cc}"), ""),
        ("GET", format!("/campaign/{cc}/sendings"), ""),
        (
            "POST",
            format!("/campaign/{cc}/sendings"),
            r#"{"recipients": [{"email": "x@example.com"}]}"#,
        ),
        ("GET", format!("/campaign/{cc}/sendings/{cs}"), ""),
        ("DELETE", format!("/campaign/{cc}/sendings/{cs}"), ""),
        ("GET", format!("/campaign/{c}/sendings/{cs}"), ""),
        ("GET", format!("/audience/{ca}"), ""),
    ] {
        let (status, text) = http(&addr, method, &path, &as_demo, body);
        lookups += 1;
        if status != 404 {
            wrong_status.push(format!("{method} {path} as demo: {status} {text}"));
        }
        if leaked(&text, &markers) {
            leaks += 1;
        }
    }
    let (status, text) = http(&addr, "GET", &format!("/campaign/{cc}"), &as_canary, "");
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("CANARYCAMP-secret"),
        "the canary campaign changed: {text}"
    );
    let (status, text) = http(
        &addr,
        "GET",
        &format!("/campaign/{cc}/sendings/{cs}"),
        &as_canary,
        "",
    );
    assert_eq!(status, 200, "{text}");
    assert!(
        !text.contains("CANCEL"),
        "the canary sending was cancelled: {text}"
    );

    println!(
        "figure campaign_api_isolation_tcp routes={} attempts_per_route={} requests={} \
         wrong_status={} canary_leaks={leaks} cross_workspace_by_id={lookups}",
        covered.len(),
        attempts.len(),
        requests + lookups,
        wrong_status.len()
    );
    assert!(wrong_status.is_empty(), "{wrong_status:#?}");
    assert_eq!(leaks, 0, "canary rows leaked");
}

// ---------------------------------------------------------------------------------------------
// Scenario 3 (file half) and the ingest Parquet half of scenario 7: `broadside ingest --from`
// SIGKILLed at seeded moments and re-run.

/// Event ids (and rows) of every committed events Parquet file under the store; panics,
/// naming the file, on one that does not read.
fn stored_event_ids(store: &Path) -> (Vec<String>, u64) {
    let (mut ids, mut files) = (Vec::new(), 0);
    walk(&store.join("events"), &mut |p| {
        if p.extension().is_some_and(|x| x == "parquet") {
            files += 1;
            let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(p).unwrap())
                .unwrap_or_else(|e| panic!("{} does not open: {e}", p.display()))
                .build()
                .unwrap();
            for b in reader {
                let b = b.unwrap_or_else(|e| panic!("{} does not read: {e}", p.display()));
                let col = arrow_cast::cast(
                    b.column_by_name("event_id").unwrap(),
                    &arrow_schema::DataType::Utf8,
                )
                .unwrap();
                let col = col
                    .as_any()
                    .downcast_ref::<arrow_array::StringArray>()
                    .unwrap();
                ids.extend(col.iter().map(|v| v.unwrap().to_string()));
            }
        }
    });
    (ids, files)
}

#[test]
fn ingest_kill_trials_file_source() {
    let (events, kills, per_commit) = if long_run() {
        (1_000_000u64, 20u64, 20_000)
    } else {
        (100_000, 5, 2_000)
    };
    let started = Instant::now();
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let input = d.path().join("events.ndjson");
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(File::create(&input).unwrap());
        let kinds = ["delivered", "opened", "clicked", "bounced"];
        for i in 0..events {
            let ws = if i % 3 == 0 { "canary" } else { WS };
            let day = 10 + i % 5;
            let kind = kinds[(i % 4) as usize];
            let bounce = if kind == "bounced" {
                r#","bounce_type":"soft""#
            } else {
                ""
            };
            writeln!(
                w,
                r#"{{"event_id":"ik-{i}","workspace_id":"{ws}","campaign_id":"c{}","email":"u{i}@example.com","event_type":"{kind}"{bounce},"ts":"2026-11-{day}T10:00:00Z"}}"#,
                i % 7
            )
            .unwrap();
        }
    }
    let per = per_commit.to_string();
    let args = [
        "ingest",
        "--store",
        s(&store),
        "--from",
        s(&input),
        "--max-records",
        &per,
    ];
    let commits = events / per_commit;
    let mut rng = Rng(seed() ^ 0x1);
    let (mut landed, mut finished_first, mut torn_temps_seen) = (0, 0, 0);
    let mut kill_points = Vec::new();
    for _ in 0..kills {
        // Kill once the store holds a seeded number of committed files, plus a seeded delay.
        let (_, now) = stored_event_ids(&store);
        // Each commit covers consecutive events, so it writes one file per partition
        // (2 workspaces × 5 days): thresholds spread the kills over the whole file.
        let threshold = now + rng.below(10 * commits / kills * 2 + 1);
        let delay = Duration::from_micros(rng.below(5_000));
        let mut child = exe()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut files = 0;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "ingest failed by itself: {st}");
                break;
            }
            walk(&store.join("events"), &mut |p| {
                files += p.extension().is_some_and(|x| x == "parquet") as u64
            });
            if files >= threshold {
                break;
            }
            files = 0;
            assert!(Instant::now() < deadline, "ingest stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(delay);
        let _ = child.kill();
        let st = child.wait().unwrap();
        if st.signal() == Some(9) {
            landed += 1;
            kill_points.push(stored_event_ids(&store).1.to_string());
        } else {
            assert!(st.success(), "ingest failed by itself: {st}");
            finished_first += 1;
            break;
        }
        // Right after the kill every committed Parquet file reads to the end.
        stored_event_ids(&store);
        walk(&store, &mut |p| {
            torn_temps_seen += p.to_string_lossy().contains("/staging/") as u64
        });
    }
    run(&args, true);
    let (ids, files) = stored_event_ids(&store);
    // Re-running a finished file adds nothing (replay).
    run(&args, true);
    let (again, _) = stored_event_ids(&store);
    let distinct: HashSet<&String> = ids.iter().collect();
    let duplicates = ids.len() as u64 - distinct.len() as u64;
    let missing = (0..events)
        .filter(|i| !distinct.contains(&format!("ik-{i}")))
        .count();
    let mut staged_left = 0;
    walk(&store, &mut |p| {
        staged_left += p.to_string_lossy().contains("/staging/") as u64
    });
    let dead_letters = store.join("dead_letters").exists();
    println!(
        "figure ingest_kill_trials_file events={events} kills={landed} finished_first={finished_first} \
         rows={} duplicates={duplicates} missing={missing} replay_added={} files={files} \
         staged_seen_at_kill={torn_temps_seen} staged_left={staged_left} dead_letters={dead_letters} \
         files_at_kills={} secs={:.1}",
        ids.len(),
        again.len() as i64 - ids.len() as i64,
        kill_points.join(","),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(duplicates, 0, "count - count(distinct id)");
    assert_eq!(missing, 0, "missing ids");
    assert_eq!(again.len(), ids.len(), "re-running added rows");
    assert_eq!(staged_left, 0, "staged files left after the final run");
    assert!(!dead_letters, "valid events went to dead letters");
    assert!(landed >= 1, "no kill landed");
}

/// `count(*)` and `count(DISTINCT event_id)` of the store's events, through `broadside sql`.
fn event_counts(store: &Path) -> (u64, u64) {
    let out = run(
        &[
            "sql",
            "--store",
            s(store),
            "--format",
            "csv",
            "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events",
        ],
        true,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text.lines().nth(1).expect("a result row");
    let (n, d) = row.split_once(',').expect("two columns");
    (n.trim().parse().unwrap(), d.trim().parse().unwrap())
}

/// Regression (issue: graceful stop): `broadside ingest --from FILE` had no stop handler, so
/// SIGTERM killed it mid-commit-cycle. Now SIGTERM, like Ctrl-C, commits every line read so
/// far and exits cleanly; the next run resumes after them, and every line lands once.
#[test]
fn sigterm_during_file_ingest_commits_and_resumes_exactly_once() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let input = d.path().join("events.ndjson");
    let n: u64 = 300_000;
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(File::create(&input).unwrap());
        for i in 0..n {
            let line = event_line(
                &format!("st-{i}"),
                WS,
                CAMPAIGN,
                "r1",
                &format!("u{i}@example.com"),
                "delivered",
            );
            writeln!(w, "{line}").unwrap();
        }
    }
    let mut child = exe()
        .args(["ingest", "--store", s(&store), "--from", s(&input)])
        .args(["--max-records", "5000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stop it once its first commit is on disk (a data file appeared), or it finished.
    let deadline = Instant::now() + Duration::from_secs(120);
    let events = store.join("events");
    loop {
        let mut any = false;
        walk(&events, &mut |p| {
            any |= p.extension().is_some_and(|x| x == "parquet");
        });
        if any || child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no commit within 2 minutes");
        std::thread::sleep(Duration::from_millis(10));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "SIGTERM is a clean stop, not a kill: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (at_stop, _) = event_counts(&store);
    run(&["ingest", "--store", s(&store), "--from", s(&input)], true);
    let (rows, distinct) = event_counts(&store);
    println!(
        "figure ingest_sigterm lines={n} rows_at_stop={at_stop} rows={rows} distinct={distinct}"
    );
    assert_eq!((rows, distinct), (n, n));
}
