//! Helpers shared by the end-to-end tests: run the real binary, read what it wrote.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use arrow_array::{Array, StringArray, UInt32Array, UInt64Array};
use arrow_cast::cast;
use arrow_schema::DataType;
use broadside_pipeline::run::RunRecord;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The binary under test.
pub fn exe() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_broadside"));
    c.env("BROADSIDE_LOG", "warn");
    c
}

/// Runs the binary and returns its output; panics with stderr when `expect_ok` is not met.
pub fn run(args: &[&str], expect_ok: bool) -> Output {
    run_env(args, &[], expect_ok)
}

/// [`run`] with environment variables set.
pub fn run_env(args: &[&str], env: &[(&str, &str)], expect_ok: bool) -> Output {
    let mut cmd = exe();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.args(args).output().expect("binary runs");
    if out.status.success() != expect_ok {
        panic!(
            "broadside {args:?} exited {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Generates a data set in `dir`; returns the spec path.
pub fn generate(dir: &Path, rows: u64, suppressions: u64, extra: &[&str]) -> PathBuf {
    let mut args = vec![
        "generate".to_string(),
        "--out".into(),
        dir.display().to_string(),
        "--rows".into(),
        rows.to_string(),
        "--suppressions".into(),
        suppressions.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&a, true);
    dir.join("campaign.toml")
}

/// Replaces a `key = value` line in a spec file.
pub fn set_spec(spec: &Path, key: &str, value: &str) {
    let text = std::fs::read_to_string(spec).unwrap();
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with(&format!("{key} =")) {
                found = true;
                format!("{key} = {value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(found, "{key} not in spec");
    std::fs::write(spec, out.join("\n") + "\n").unwrap();
}

/// One ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub row: u64,
    pub key: Option<String>,
    pub variant: Option<String>,
    pub decision: String,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub list: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Mail with a printer: the recipient state and the printer's piece id.
    pub mail_state: Option<String>,
    pub printer_id: Option<String>,
}

fn strings(col: &dyn Array) -> Vec<Option<String>> {
    let c = cast(col, &DataType::Utf8).unwrap();
    let s = c.as_any().downcast_ref::<StringArray>().unwrap();
    (0..s.len())
        .map(|i| s.is_valid(i).then(|| s.value(i).to_string()))
        .collect()
}

/// Every ledger row of a run, in `row` order (a part lists each batch's sent rows first when
/// their keys were packed on a worker; see docs/store.md).
pub fn read_ledger(store: &Path, workspace: &str, campaign: &str, run_id: &str) -> Vec<LedgerRow> {
    let dir = store
        .join("recipient_logs")
        .join(format!("workspace_id={workspace}"))
        .join(format!("campaign_id={campaign}"))
        .join(format!("run_id={run_id}"));
    let mut parts: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    parts.sort();
    let mut out = Vec::new();
    for p in parts {
        assert_eq!(
            p.extension().unwrap(),
            "parquet",
            "stray file {}",
            p.display()
        );
        let r = ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for b in r {
            let b = b.unwrap();
            let col = |n: &str| b.column_by_name(n).unwrap().clone();
            let rows = col("row");
            let rows = rows.as_any().downcast_ref::<UInt64Array>().unwrap();
            let lines = col("ifur_line");
            let lines = lines.as_any().downcast_ref::<UInt32Array>().unwrap();
            let key = strings(&col("key"));
            let variant = strings(&col("variant"));
            let decision = strings(&col("decision"));
            let reason = strings(&col("reason"));
            let detail = strings(&col("detail"));
            let list = strings(&col("suppression_list"));
            let file = strings(&col("ifur_file"));
            let mail_state = strings(&col("mail_state"));
            let printer_id = strings(&col("printer_id"));
            for i in 0..b.num_rows() {
                out.push(LedgerRow {
                    row: rows.value(i),
                    key: key[i].clone(),
                    variant: variant[i].clone(),
                    decision: decision[i].clone().unwrap(),
                    reason: reason[i].clone(),
                    detail: detail[i].clone(),
                    list: list[i].clone(),
                    file: file[i].clone(),
                    line: lines.is_valid(i).then(|| lines.value(i)),
                    mail_state: mail_state[i].clone(),
                    printer_id: printer_id[i].clone(),
                });
            }
        }
    }
    out.sort_by_key(|r| r.row);
    out
}

/// Parses every `.ifur` file of a folder (verifying count and checksum): name → file.
pub fn read_ifur_files(dir: &Path) -> HashMap<String, broadside_sinks::ifur::IfurFile> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(!name.ends_with(".tmp"), "temp file left behind: {name}");
        if name.ends_with(".ifur") {
            let f = broadside_sinks::ifur::parse(&std::fs::read(&p).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            out.insert(name, f);
        }
    }
    out
}

/// Loads a run record.
pub fn record(store: &Path, workspace: &str, run_id: &str) -> RunRecord {
    RunRecord::load(
        &store
            .join("campaign_runs")
            .join(format!("workspace_id={workspace}"))
            .join(format!("{run_id}.json")),
    )
    .unwrap()
}

/// Reads the normalised keys of a one-column suppression CSV.
pub fn suppression_keys(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.trim_matches('"').trim().to_lowercase())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Counts rows of the `submitted` event files of a run.
pub fn submitted_events(store: &Path, workspace: &str, run_id: &str) -> u64 {
    let root = store
        .join("events")
        .join(format!("workspace_id={workspace}"));
    let mut n = 0;
    for day in std::fs::read_dir(root).unwrap() {
        for f in std::fs::read_dir(day.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with(&format!("submitted-{run_id}-")) && name.ends_with(".parquet") {
                let r = ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap()).unwrap();
                n += r.metadata().file_metadata().num_rows() as u64;
            }
        }
    }
    n
}

/// The (event_id, email, variant) of every `submitted` event of a run, with its run and type checked.
pub fn submitted_event_rows(
    store: &Path,
    workspace: &str,
    campaign: &str,
    run_id: &str,
) -> Vec<(String, String, Option<String>)> {
    let root = store
        .join("events")
        .join(format!("workspace_id={workspace}"));
    let mut out = Vec::new();
    for day in std::fs::read_dir(root).unwrap() {
        for f in std::fs::read_dir(day.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if !(name.starts_with(&format!("submitted-{run_id}-")) && name.ends_with(".parquet")) {
                continue;
            }
            let r = ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap())
                .unwrap()
                .build()
                .unwrap();
            for b in r {
                let b = b.unwrap();
                let col = |n: &str| strings(b.column_by_name(n).unwrap());
                let (ids, emails, variants) = (col("event_id"), col("email"), col("variant"));
                let (runs, types, camps) = (col("run_id"), col("event_type"), col("campaign_id"));
                for i in 0..b.num_rows() {
                    assert_eq!(runs[i].as_deref(), Some(run_id));
                    assert_eq!(types[i].as_deref(), Some("submitted"));
                    assert_eq!(camps[i].as_deref(), Some(campaign));
                    out.push((
                        ids[i].clone().unwrap(),
                        emails[i].clone().unwrap(),
                        variants[i].clone(),
                    ));
                }
            }
        }
    }
    out
}

/// A running `broadside serve`, killed on drop.
pub struct Server {
    child: Child,
    /// `host:port` it listens on.
    pub addr: String,
}

impl Server {
    /// Starts `broadside serve --listen 127.0.0.1:0 ARGS…` (with `env` set) and waits for the
    /// line naming its address. Its later log lines are drained (and echoed) so it never writes
    /// into a closed pipe.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = exe();
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("BROADSIDE_WEBHOOK_SECRET")
            .env_remove("BROADSIDE_WEBHOOK_WORKSPACE")
            .env_remove("BROADSIDE_WEBHOOK_TOKENS")
            .env_remove("BROADSIDE_LOB_WEBHOOK_SECRET")
            .env_remove("BROADSIDE_LOB_WEBHOOK_WORKSPACE")
            .env_remove("BROADSIDE_TOKENS")
            .env_remove("BROADSIDE_UI_DIR")
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("serve exited before listening")
                .unwrap();
            if let Some((_, rest)) = line
                .strip_prefix("serving ")
                .and_then(|l| l.split_once(" on http://"))
            {
                break rest.trim().to_string();
            }
        };
        std::thread::spawn(move || {
            lines.for_each(|l| eprintln!("serve: {}", l.unwrap_or_default()))
        });
        Server { child, addr }
    }

    /// The server's process id (for reading its memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Server {
    /// Sends SIGTERM and waits (at most `deadline`) for the exit status.
    pub fn terminate(&mut self, deadline: std::time::Duration) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill -TERM {}", self.child.id());
        let until = std::time::Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < until,
                "serve did not stop within {deadline:?} of SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Splits one line of a generated CSV (fields are quoted only when they must be).
pub fn csv_fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Writes one CSV field, quoting it when it must be (delimiter, quote, surrounding spaces).
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) || s.starts_with(' ') || s.ends_with(' ') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Serves `app` on 127.0.0.1 (a free port) in a runtime of its own: keep the runtime alive as
/// long as the server is needed. Returns it and the address.
pub fn serve_local(app: axum::Router) -> (tokio::runtime::Runtime, std::net::SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (rt, addr)
}

/// POSTs `body` over a fresh HTTP/1.1 connection with extra `headers` (`Name: value` lines)
/// and returns the whole raw answer (status line, headers, body).
pub fn post_raw(addr: &str, path: &str, headers: &[String], body: &str) -> String {
    request_raw(addr, "POST", path, headers, body)
}

/// `post_raw` with another method.
pub fn request_raw(addr: &str, method: &str, path: &str, headers: &[String], body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `--new-run` when `run_id` is not yet a run of the spec's store (the campaign may already
/// have other runs, which a new run must acknowledge), nothing when it is (a resume).
pub fn new_run_flag(spec: &Path, run_id: &str) -> Option<&'static str> {
    let spec = broadside_pipeline::spec::CampaignSpec::load(spec).ok()?;
    let store = broadside_pipeline::store::StoreLayout::new(spec.resolve(&spec.output.store));
    (!store.run_record(&spec.workspace_id, run_id).exists()).then_some("--new-run")
}

/// `GET path` on the analytics API with a bearer token and workspace header: (status, body).
pub fn api_get(addr: &str, path: &str, token: &str, ws: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nworkspace_id: {ws}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status: u16 = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    // The API answers with Content-Length (no chunking) for JSON.
    (status, body)
}

/// `GET path` on the analytics API that must answer `200`: the JSON body.
pub fn api_get_ok(addr: &str, path: &str, token: &str, ws: &str) -> serde_json::Value {
    let (status, body) = api_get(addr, path, token, ws);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// A token of workspace `ws` from `broadside token new`, stored in `<dir>/tokens.toml`:
/// (tokens file, token).
pub fn new_token(dir: &Path, ws: &str) -> (PathBuf, String) {
    let out = run(&["token", "new", "--name", "test", "--workspace", ws], true);
    let tokens = dir.join("tokens.toml");
    std::fs::write(&tokens, &out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let token = stderr.split_whitespace().last().unwrap().to_string();
    assert!(token.starts_with("bs_"), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&token),
        "token stored in clear"
    );
    (tokens, token)
}

/// `broadside ingest --from FILE` into `store`; its summary.
pub fn ingest(store: &Path, events: &Path) -> String {
    let out = run(
        &[
            "ingest",
            "--store",
            store.to_str().unwrap(),
            "--from",
            events.to_str().unwrap(),
        ],
        true,
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Debian's headless Chromium (or `BROADSIDE_CHROMIUM`) with a fresh profile in `profile`, the
/// flags a closed machine needs (no background networking, no sandbox as root), and no page
/// yet: the caller adds its own flags and the URL.
pub fn headless_chromium(profile: &Path) -> Command {
    let path = std::env::var_os("BROADSIDE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} is missing: install Chromium (deploy/ci-setup.sh) or set BROADSIDE_CHROMIUM",
        path.display()
    );
    let mut c = Command::new(path);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}
