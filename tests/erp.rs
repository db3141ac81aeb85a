//! End-to-end tests of the ERP (SQL Server) source over the real TDS wire protocol: the real
//! tiberius code path against `pysqlbridge` (a TDS server with TLS that serves CSV files as
//! read-only tables; installed by `sources/ci-setup.sh`), started on a free loopback port per test.
//! `real_sql_server_*` runs against a real SQL Server when `BROADSIDE_MSSQL_URL` is set.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const WS: &str = "demo";
const CAMPAIGN: &str = "generated-42";
const USER: &str = "broadside";
const PASSWORD: &str = "erp-test-Secret1";

/// A pysqlbridge process serving `tables` (name → CSV file) on a free 127.0.0.1 port; killed on drop.
struct Bridge {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Bridge {
    fn start(dir: &Path, tables: &[(&str, &Path)]) -> Bridge {
        let exe = std::env::var("BROADSIDE_PYSQLBRIDGE").unwrap_or_else(|_| "pysqlbridge".into());
        let config = dir.join(format!("bridge-{}.json", tables[0].0));
        let tables_json: Vec<serde_json::Value> = tables
            .iter()
            .map(|(n, p)| serde_json::json!({"name": n, "csv": p}))
            .collect();
        let cfg = serde_json::json!({
            "tables": tables_json,
            "logins": [{"user": USER, "password": "${BRIDGE_TEST_PASSWORD}"}],
        });
        std::fs::write(&config, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let log = dir.join(format!("bridge-{}.log", tables[0].0));
        let mut child = Command::new(&exe)
            .args(["--host", "127.0.0.1", "--port", "0", "--config"])
            .arg(&config)
            .env("BRIDGE_TEST_PASSWORD", PASSWORD)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {exe} ({e}); install it with `bash sources/ci-setup.sh`")
            });
        // The bridge logs its bound port; keep draining its log so it never blocks on stderr.
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log_path = log.clone();
        std::thread::spawn(move || {
            let mut out = std::fs::File::create(log_path).unwrap();
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                use std::io::Write;
                let _ = writeln!(out, "{line}");
                if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
                    let _ = tx.send(rest.trim().parse::<u16>().unwrap());
                }
            }
        });
        let mut bridge = Bridge {
            child,
            port: 0,
            log,
        };
        bridge.port = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(p) => p,
            Err(_) => panic!(
                "pysqlbridge did not start:\n{}",
                std::fs::read_to_string(&bridge.log).unwrap_or_default()
            ),
        };
        // Ready when it accepts a connection.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", bridge.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pysqlbridge never accepted a connection"
            );
            std::thread::yield_now();
        }
        bridge
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A generated data set served as table `customers` with an integer `customer_id` key (1..=rows in
/// file order), and the generated campaign spec beside it (a CSV send of the same recipients).
struct Erp {
    dir: tempfile::TempDir,
    csv_spec: PathBuf,
    customers: PathBuf,
}

fn erp_data(rows: u64, suppressions: u64) -> Erp {
    let dir = tempfile::tempdir().unwrap();
    let csv_spec = generate(dir.path(), rows, suppressions, &["--invalid-share", "0.03"]);
    let customers = dir.path().join("customers.csv");
    write_customers(&dir.path().join("recipients.csv"), &customers, |_| true);
    Erp {
        dir,
        csv_spec,
        customers,
    }
}

/// Copies the generated recipients with a `customer_id` column (line number) in front, keeping
/// the lines `keep` accepts (by customer id).
fn write_customers(from: &Path, to: &Path, keep: impl Fn(u64) -> bool) {
    let text = std::fs::read_to_string(from).unwrap();
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for (i, line) in text.lines().enumerate() {
        if i == 0 {
            out.push_str("customer_id,");
        } else {
            if !keep(i as u64) {
                continue;
            }
            out.push_str(&format!("{i},"));
        }
        out.push_str(line);
        out.push('\n');
    }
    std::fs::write(to, out).unwrap();
}

const QUERY: &str = "SELECT customer_id, email, first_name, last_name, account_number, address1, city, state, zip, country, points FROM customers";

/// Writes an ERP variant of the generated spec: same mapping, lists and variants; `source` is the
/// `[source]` body.
fn erp_spec(e: &Erp, name: &str, source: &str) -> PathBuf {
    let text = std::fs::read_to_string(&e.csv_spec).unwrap();
    let text = text.replace(
        "[source]\ntype = \"csv\"\npath = \"recipients.csv\"\n",
        &format!("[source]\n{source}\n"),
    );
    assert!(text.contains("type = \"erp\""), "source block not replaced");
    let p = e.dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn source_block(port: u16, extra: &str) -> String {
    format!(
        "type = \"erp\"\nhost = \"127.0.0.1\"\nport = {port}\ndatabase = \"ERP\"\nuser = \"{USER}\"\n\
         password_env = \"BROADSIDE_TEST_ERP_PASSWORD\"\ntrust_server_certificate = true\n\
         key_column = \"customer_id\"\nquery = \"{QUERY}\"\n{extra}"
    )
}

fn send(spec: &Path, args: &[&str], expect_ok: bool) -> std::process::Output {
    let out = exe()
        .arg("send")
        .arg(spec)
        .args(args)
        .env("BROADSIDE_TEST_ERP_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    if out.status.success() != expect_ok {
        panic!(
            "send {args:?} exited {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// (key, decision, reason, variant) per ledger row, in row order.
type Decided = Vec<(Option<String>, String, Option<String>, Option<String>)>;

fn decided(ledger: &[LedgerRow]) -> Decided {
    let mut rows: Vec<&LedgerRow> = ledger.iter().collect();
    rows.sort_by_key(|r| r.row);
    rows.iter()
        .map(|r| {
            (
                r.key.clone(),
                r.decision.clone(),
                r.reason.clone(),
                r.variant.clone(),
            )
        })
        .collect()
}

/// Every sent row is in exactly one IFUR line where the ledger says; counts agree with the record.
fn assert_outputs_agree(dir: &Path, run_id: &str, rows: u64) -> Vec<LedgerRow> {
    let store = dir.join("store");
    let ledger = read_ledger(&store, WS, CAMPAIGN, run_id);
    assert_eq!(ledger.len() as u64, rows);
    let numbers: HashSet<u64> = ledger.iter().map(|r| r.row).collect();
    assert_eq!(numbers.len() as u64, rows, "ledger row numbers repeat");
    let files = read_ifur_files(&dir.join("megasys/hot"));
    let mut lines: HashMap<String, (String, u32)> = HashMap::new();
    for (name, f) in files
        .iter()
        .filter(|(n, _)| n.contains(&format!("_{run_id}_")))
    {
        for (n, (key, _)) in f.details.iter().enumerate() {
            assert!(
                lines
                    .insert(key.clone(), (name.clone(), n as u32 + 1))
                    .is_none(),
                "{key} is in two IFUR lines"
            );
        }
    }
    let sent: Vec<&LedgerRow> = ledger.iter().filter(|r| r.decision == "sent").collect();
    assert_eq!(sent.len(), lines.len(), "IFUR lines != sent rows");
    for r in &sent {
        let (file, line) = &lines[r.key.as_ref().unwrap()];
        assert_eq!(r.file.as_ref(), Some(file));
        assert_eq!(r.line, Some(*line));
    }
    let rec = record(&store, WS, run_id);
    assert_eq!(rec.status, broadside_pipeline::run::RunStatus::Done);
    assert_eq!(rec.rows, rows);
    assert_eq!(rec.decisions["sent"], sent.len() as u64);
    assert_eq!(submitted_events(&store, WS, run_id), sent.len() as u64);
    ledger
}

#[test]
fn erp_send_decides_exactly_like_the_same_rows_from_csv() {
    let e = erp_data(30_000, 4_000);
    let bridge = Bridge::start(e.dir.path(), &[("customers", &e.customers)]);
    let spec = erp_spec(&e, "erp.toml", &source_block(bridge.port, ""));

    run(
        &["send", e.csv_spec.to_str().unwrap(), "--run-id", "csv"],
        true,
    );
    let out = send(&spec, &["--run-id", "erp", "--new-run"], true);
    assert!(String::from_utf8_lossy(&out.stdout).contains("30000 recipients"));

    let erp = assert_outputs_agree(e.dir.path(), "erp", 30_000);
    let csv = read_ledger(&e.dir.path().join("store"), WS, CAMPAIGN, "csv");
    // Ordered by customer_id = file order, the ERP read is the CSV read row for row.
    assert_eq!(decided(&erp), decided(&csv));
    let d = decided(&erp);
    for want in ["sent", "suppressed", "skipped", "holdout"] {
        assert!(
            d.iter().any(|r| r.1 == want),
            "no {want} row: the data should exercise it"
        );
    }

    // The run record names the server and identifies the query, never the password.
    let rec = record(&e.dir.path().join("store"), WS, "erp");
    assert!(
        rec.input
            .path
            .starts_with(&format!("erp 127.0.0.1:{}/ERP query=", bridge.port)),
        "{}",
        rec.input.path
    );
    assert!(
        rec.input.path.contains("key=customer_id shard=all"),
        "{}",
        rec.input.path
    );
    let text = std::fs::read_to_string(
        e.dir
            .path()
            .join("store/campaign_runs/workspace_id=demo/erp.json"),
    )
    .unwrap();
    assert!(!text.contains(PASSWORD));
}

#[test]
fn shards_add_up_exactly_to_the_unsharded_run() {
    // Repeated people (another case or padding, another customer_id) across the whole export:
    // shards are cut by the normalised recipient key, so each person lives in one shard and
    // deduplication holds across shards.
    let dir = tempfile::tempdir().unwrap();
    let csv_spec = generate(
        dir.path(),
        20_000,
        3_000,
        &["--invalid-share", "0.03", "--duplicate-share", "0.02"],
    );
    let customers = dir.path().join("customers.csv");
    write_customers(&dir.path().join("recipients.csv"), &customers, |_| true);
    let e = Erp {
        dir,
        csv_spec,
        customers,
    };
    let bridge = Bridge::start(e.dir.path(), &[("customers", &e.customers)]);
    let spec = erp_spec(&e, "erp.toml", &source_block(bridge.port, ""));
    send(&spec, &["--run-id", "all"], true);
    let all = assert_outputs_agree(e.dir.path(), "all", 20_000);
    let duplicates = all
        .iter()
        .filter(|r| r.reason.as_deref() == Some("duplicate"))
        .count();
    assert!(duplicates > 100, "the export repeats people: {duplicates}");

    // Per key: the decisions of its rows, in input order.
    type Decisions = Vec<(String, Option<String>, Option<String>)>;
    let by_key = |rows: &[LedgerRow]| {
        let mut m: HashMap<String, Decisions> = HashMap::new();
        for r in rows {
            if let Some(k) = &r.key {
                m.entry(k.clone()).or_default().push((
                    r.decision.clone(),
                    r.reason.clone(),
                    r.variant.clone(),
                ));
            }
        }
        m
    };
    let n = 3;
    let mut shards: HashMap<String, Decisions> = HashMap::new();
    let mut total = 0;
    for i in 0..n {
        let out = send(
            &spec,
            &[
                "--run-id",
                "sh",
                "--shard",
                &format!("{i}/{n}"),
                "--new-run",
            ],
            true,
        );
        let run_id = format!("sh-s{i}of{n}");
        assert!(String::from_utf8_lossy(&out.stdout).contains(&run_id));
        let rows = record(&e.dir.path().join("store"), WS, &run_id).rows;
        assert!(rows > 20_000 / n / 2, "shard {i} is lopsided: {rows} rows");
        let ledger = assert_outputs_agree(e.dir.path(), &run_id, rows);
        total += rows;
        for (k, d) in by_key(&ledger) {
            assert!(
                shards.insert(k.clone(), d).is_none(),
                "{k:?} is in two shards"
            );
        }
        // Re-running a shard is the same run: nothing to do.
        let again = send(
            &spec,
            &["--run-id", "sh", "--shard", &format!("{i}/{n}")],
            true,
        );
        assert!(String::from_utf8_lossy(&again.stdout).contains("already done"));
    }
    assert_eq!(total, 20_000);
    let whole = by_key(&all);
    assert_eq!(whole.len(), shards.len());
    for (k, d) in &whole {
        assert_eq!(&shards[k], d, "{k:?} decided differently in its shard");
        let reached = d
            .iter()
            .filter(|x| x.0 == "sent" || x.0 == "holdout")
            .count();
        assert!(reached <= 1, "{k:?} reached {reached} times");
    }

    // A billing cap cannot be split across shards; --shard needs an ERP source.
    let capped = e.dir.path().join("capped.toml");
    std::fs::write(
        &capped,
        std::fs::read_to_string(&spec).unwrap().replace(
            "holdout_percent = 5.0",
            "holdout_percent = 5.0\n[caps]\nbilling_cap = 100",
        ),
    )
    .unwrap();
    let out = send(&capped, &["--shard", "0/2", "--new-run"], false);
    assert!(String::from_utf8_lossy(&out.stderr).contains("billing_cap"));
    let out = run(
        &["send", e.csv_spec.to_str().unwrap(), "--shard", "0/2"],
        false,
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not erp"));
}

#[test]
fn a_failed_erp_run_is_not_finished_and_resumes_once_the_data_is_fixed() {
    let e = erp_data(20_000, 2_000);
    // The reference: a clean read of the same rows.
    let clean = Bridge::start(e.dir.path(), &[("customers", &e.customers)]);
    let spec = erp_spec(&e, "erp.toml", &source_block(clean.port, ""));
    send(&spec, &["--run-id", "ref"], true);
    let reference = decided(&assert_outputs_agree(e.dir.path(), "ref", 20_000));
    drop(clean);

    // The same table with customer 15000 entered twice: the key is not unique.
    let broken = e.dir.path().join("broken/customers.csv");
    std::fs::create_dir_all(broken.parent().unwrap()).unwrap();
    write_customers(&e.dir.path().join("recipients.csv"), &broken, |_| true);
    let mut text = std::fs::read_to_string(&broken).unwrap();
    let dup = text
        .lines()
        .find(|l| l.starts_with("15000,"))
        .unwrap()
        .to_string();
    text.push_str(&dup);
    text.push('\n');
    std::fs::write(&broken, text).unwrap();
    let bridge = Bridge::start(&e.dir.path().join("broken"), &[("customers", &broken)]);
    let spec = erp_spec(&e, "erp2.toml", &source_block(bridge.port, ""));
    let out = send(&spec, &["--run-id", "r1", "--new-run"], false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rows 15000 and 15001"), "{err}");
    assert!(err.contains("\"customer_id\""), "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{}/ERP", bridge.port)),
        "{err}"
    );
    let store = e.dir.path().join("store");
    let rec = record(&store, WS, "r1");
    assert_eq!(rec.status, broadside_pipeline::run::RunStatus::Failed);
    assert!(!e
        .dir
        .path()
        .join(format!("megasys/hot/{CAMPAIGN}_r1.manifest.json"))
        .exists());

    // A resume with another query is refused: it would not replay the same rows.
    let changed = e.dir.path().join("erp3.toml");
    std::fs::write(
        &changed,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("FROM customers", "FROM customers WHERE customer_id < 15000"),
    )
    .unwrap();
    let out = send(&changed, &["--run-id", "r1"], false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot resume run r1"), "{err}");
    assert!(err.contains("the input erp"), "{err}");

    // Fix the data and resume with the same spec: the run replays every row and ends with the
    // result of a clean read. The fixed server listens on a new port; a forwarder keeps the
    // address the run started with.
    let old_port = bridge.port;
    drop(bridge);
    write_customers(&e.dir.path().join("recipients.csv"), &broken, |_| true);
    let fixed = Bridge::start(&e.dir.path().join("broken"), &[("customers", &broken)]);
    let _fwd = Forwarder::start(old_port, fixed.port);
    let out = send(&spec, &["--run-id", "r1"], true);
    assert!(String::from_utf8_lossy(&out.stdout).contains("20000 recipients"));
    let resumed = assert_outputs_agree(e.dir.path(), "r1", 20_000);
    assert_eq!(record(&store, WS, "r1").attempts, 2);
    assert_eq!(decided(&resumed), reference);
}

/// Forwards TCP connections from 127.0.0.1:`from` to 127.0.0.1:`to` (stops when dropped).
struct Forwarder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    port: u16,
}

impl Forwarder {
    fn start(from: u16, to: u16) -> Forwarder {
        let listener = std::net::TcpListener::bind(("127.0.0.1", from)).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(a) = conn else { continue };
                let Ok(b) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
                std::thread::spawn(move || pipe(a, b2));
                std::thread::spawn(move || pipe(b, a2));
            }
        });
        Forwarder { stop, port: from }
    }
}

fn pipe(mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn erp_check(spec: &Path, args: &[&str]) -> std::process::Output {
    exe()
        .args(["erp", "check"])
        .arg(spec)
        .args(args)
        .env("BROADSIDE_TEST_ERP_PASSWORD", PASSWORD)
        .output()
        .unwrap()
}

#[test]
fn erp_check_shows_columns_types_and_the_mapping() {
    let e = erp_data(500, 50);
    let bridge = Bridge::start(e.dir.path(), &[("customers", &e.customers)]);
    let spec = erp_spec(&e, "erp.toml", &source_block(bridge.port, ""));
    let out = erp_check(&spec, &["--rows", "3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("the query returns 11 columns"), "{text}");
    let line = |col: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(col))
            .unwrap_or_else(|| panic!("no line for {col}:\n{text}"))
            .to_string()
    };
    assert!(
        line("customer_id").contains("int") && line("customer_id").ends_with("key"),
        "{text}"
    );
    assert!(
        line("email").contains("nvarchar") && line("email").ends_with("email"),
        "{text}"
    );
    assert!(line("points").ends_with("points"), "{text}");
    assert!(text.contains("sample (3 rows)"), "{text}");
    // The sample is the first rows in the result, as text.
    let first_email = std::fs::read_to_string(&e.customers).unwrap();
    let first_email = first_email
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .nth(1)
        .unwrap();
    assert!(text.contains(first_email), "{text}");
    assert!(text.contains("ok: the mapping is satisfied"), "{text}");

    // A mapped column the query does not return is named, and the check fails.
    let bad = erp_spec(
        &e,
        "bad.toml",
        &source_block(bridge.port, "").replace(", points FROM", " FROM"),
    );
    let out = erp_check(&bad, &[]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("points") && text.contains("MISSING"),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not satisfy"));
}

/// Runs `erp check --rows 2` on `spec` and returns its output and the two sample rows, each as
/// column name → shown text.
fn check_samples(
    spec: &Path,
    names: &[&'static str],
) -> (String, Vec<BTreeMap<&'static str, String>>) {
    let out = erp_check(spec, &["--rows", "2"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<BTreeMap<&'static str, String>> = text
        .lines()
        .skip_while(|l| !l.starts_with("sample"))
        .skip(1)
        .take(2)
        .map(|l| {
            let cells: Vec<&str> = l.trim().split(" | ").collect();
            assert_eq!(cells.len(), names.len(), "{text}");
            names
                .iter()
                .copied()
                .zip(cells.iter().map(|c| c.to_string()))
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    (text, rows)
}

/// Each (column, SQL type, text form) is what `erp check` printed on that column's line.
fn assert_column_types(text: &str, expected: &[(&str, &str, &str)]) {
    for (col, ty, form) in expected {
        let l = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(*col))
            .unwrap_or_else(|| panic!("no line for {col}: {text}"));
        assert!(
            l.contains(&format!(" {ty} ")) && l.contains(form),
            "{col} should be {ty}, {form}: {l}"
        );
    }
}

#[test]
fn sql_server_types_map_to_documented_text() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("t.csv");
    std::fs::write(
        &csv,
        "id,email,amount,when_at,flag,n\n1,a@example.com,12.5,2024-02-29 13:04:05,1,\n2,b@example.com,-0.125,1999-12-31 00:00:00,0,\n",
    )
    .unwrap();
    let bridge = Bridge::start(dir.path(), &[("t", &csv)]);
    // pysqlbridge answers CAST to decimal/money/real with float, date/datetime2 with datetime and
    // nchar with nvarchar; iridium-server covers those (typed_erp_columns_…), the unit tests in
    // sources/src/erp/types.rs and the real-server test the rest. Here: the types it does send.
    let query =
        "SELECT id, email, amount AS f, CAST(flag AS BIT) AS b, CAST(when_at AS DATETIME) AS dt, \
                 CAST(email AS VARCHAR(40)) AS vc, n FROM t";
    let spec = dir.path().join("types.toml");
    std::fs::write(
        &spec,
        format!(
            "campaign_id = \"types\"\nchannel = \"email\"\n[source]\n{}\n[columns]\nemail = \"email\"\nfirst_name = \"vc\"\n\
             [[variants]]\nname = \"A\"\nweight = 1\ntemplate = \"t\"\n[output]\nstore = \"store\"\n[megasys]\nhot_folder = \"hot\"\n",
            source_block(bridge.port, "")
                .replace(QUERY, query)
                .replace("key_column = \"customer_id\"", "key_column = \"id\"")
        ),
    )
    .unwrap();
    let names = ["id", "email", "f", "b", "dt", "vc", "n"];
    let (text, rows) = check_samples(&spec, &names);
    let (a, b) = (&rows[0], &rows[1]);
    assert_eq!((a["id"].as_str(), b["id"].as_str()), ("1", "2"));
    assert_eq!((a["f"].as_str(), b["f"].as_str()), ("12.5", "-0.125"));
    assert_eq!((a["b"].as_str(), b["b"].as_str()), ("true", "false"));
    assert_eq!(a["dt"], "2024-02-29T13:04:05");
    assert_eq!(b["dt"], "1999-12-31T00:00:00");
    assert_eq!(a["vc"], "a@example.com");
    assert_eq!((a["n"].as_str(), b["n"].as_str()), ("NULL", "NULL"));
    assert_column_types(
        &text,
        &[
            ("id", "int", "integer digits"),
            ("f", "float", "shortest round-trip float"),
            ("b", "bit", "true/false"),
            ("dt", "datetime", "ISO 8601 date-time"),
            ("vc", "nvarchar", "text as stored"),
        ],
    );
}

#[test]
fn bad_input_gets_one_clear_error_and_no_finished_run() {
    let e = erp_data(2_000, 200);
    let bridge = Bridge::start(e.dir.path(), &[("customers", &e.customers)]);
    let server = format!("127.0.0.1:{}/ERP", bridge.port);
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "wrong-password",
            source_block(bridge.port, "")
                .replace("BROADSIDE_TEST_ERP_PASSWORD", "BROADSIDE_TEST_WRONG"),
            vec!["login failed for user \"broadside\"", &server],
        ),
        (
            "unset-password",
            source_block(bridge.port, "")
                .replace("BROADSIDE_TEST_ERP_PASSWORD", "BROADSIDE_TEST_UNSET"),
            vec!["BROADSIDE_TEST_UNSET", "not set"],
        ),
        (
            "tls-untrusted",
            source_block(bridge.port, "").replace(
                "trust_server_certificate = true",
                "trust_server_certificate = false",
            ),
            vec!["TLS handshake failed", "certificate", &server],
        ),
        (
            "query-error",
            source_block(bridge.port, "").replace("FROM customers", "FROM no_such_table"),
            vec!["the query failed", "no_such_table", &server],
        ),
        (
            "missing-column",
            source_block(bridge.port, "").replace("last_name, ", ""),
            vec![
                "\"last_name\" (columns.last_name) not found",
                "the query returns",
                &server,
            ],
        ),
        (
            "missing-key",
            source_block(bridge.port, "").replace("customer_id, email", "email"),
            vec!["\"customer_id\" (source.key_column) not found"],
        ),
    ];
    for (name, source, wants) in &cases {
        let spec = erp_spec(&e, &format!("{name}.toml"), source);
        let out = exe()
            .arg("send")
            .arg(&spec)
            .args(["--run-id", name])
            .env("BROADSIDE_TEST_ERP_PASSWORD", PASSWORD)
            .env("BROADSIDE_TEST_WRONG", "not-the-password")
            .env_remove("BROADSIDE_TEST_UNSET")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} succeeded");
        for w in wants {
            assert!(err.contains(w), "{name}: {w:?} not in:\n{err}");
        }
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error:")).count(),
            1,
            "{name}:\n{err}"
        );
        assert!(!err.contains("not-the-password") && !err.contains(PASSWORD));
        // Configuration and connection problems are found before a run is recorded.
        assert!(
            !e.dir
                .path()
                .join(format!("store/campaign_runs/workspace_id=demo/{name}.json"))
                .exists(),
            "{name} left a run record"
        );
    }

    // Nothing listens: the host and port are named.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let spec = erp_spec(
        &e,
        "unreachable.toml",
        &source_block(port, "login_timeout_secs = 5"),
    );
    let out = send(&spec, &[], false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{port}/ERP")) && err.contains("cannot reach the server"),
        "{err}"
    );

    // A NULL key does not fit the key column: the run stops naming row and column, and is
    // recorded as failed, never done. (A money value beyond what can be read exactly fails the
    // same way; pysqlbridge sends money as float, so that one is unit-tested in types.rs.)
    let spec = erp_spec(
        &e,
        "nullkey.toml",
        &source_block(bridge.port, "").replace(
            "SELECT customer_id,",
            "SELECT CASE WHEN customer_id = 1500 THEN NULL ELSE customer_id END AS customer_id,",
        ),
    );
    let out = send(&spec, &["--run-id", "nullkey"], false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("row 1: key column \"customer_id\" (source.key_column) is NULL"),
        "{err}"
    );
    assert!(err.contains(&server), "{err}");
    let rec = record(&e.dir.path().join("store"), WS, "nullkey");
    assert_eq!(rec.status, broadside_pipeline::run::RunStatus::Failed);
    assert!(rec.error.unwrap().contains("is NULL"));
    assert!(!e
        .dir
        .path()
        .join(format!("megasys/hot/{CAMPAIGN}_nullkey.manifest.json"))
        .exists());
}

/// `BROADSIDE_MSSQL_URL=mssql://USER:PASSWORD@HOST:PORT/DATABASE` (the docker-compose service:
/// `mssql://sa:Broadside-Dev-1@localhost:1433/BroadsideDemo`) runs the example campaign's query
/// against a real SQL Server.
#[test]
fn real_sql_server_check_and_sharded_send() {
    let Ok(url) = std::env::var("BROADSIDE_MSSQL_URL") else {
        println!("skipped: set BROADSIDE_MSSQL_URL=mssql://sa:PASSWORD@localhost:1433/BroadsideDemo (docker compose up mssql) to run against a real SQL Server");
        return;
    };
    let rest = url
        .strip_prefix("mssql://")
        .expect("mssql://USER:PASSWORD@HOST:PORT/DATABASE");
    let (cred, hostdb) = rest.split_once('@').unwrap();
    let (user, password) = cred.split_once(':').unwrap();
    let (hostport, database) = hostdb.split_once('/').unwrap();
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "1433"));
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/erp-docker.toml"
    ))
    .unwrap();
    let text = example
        .replace("host = \"localhost\"", &format!("host = \"{host}\""))
        .replace("port = 1433", &format!("port = {port}"))
        .replace(
            "database = \"BroadsideDemo\"",
            &format!("database = \"{database}\""),
        )
        .replace("user = \"sa\"", &format!("user = \"{user}\""))
        .replace("../out/", "out/");
    let spec = dir.path().join("erp.toml");
    std::fs::write(&spec, text).unwrap();
    let with_pw = |c: &mut Command| {
        c.env("BROADSIDE_ERP_PASSWORD", password);
    };
    let mut c = exe();
    c.args(["erp", "check"]).arg(&spec);
    with_pw(&mut c);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut c = exe();
    c.arg("send").arg(&spec).args(["--run-id", "all"]);
    with_pw(&mut c);
    assert!(c.output().unwrap().status.success());
    let store = dir.path().join("out/store");
    let all = record(&store, "acme", "all");
    let mut sum = 0;
    for i in 0..2 {
        let mut c = exe();
        c.arg("send")
            .arg(&spec)
            .args(["--run-id", "sh", "--shard", &format!("{i}/2")]);
        with_pw(&mut c);
        assert!(c.output().unwrap().status.success());
        sum += record(&store, "acme", &format!("sh-s{i}of2")).rows;
    }
    assert_eq!(sum, all.rows);
}

/// An `iridium-server` process (an in-memory T-SQL engine speaking TDS 7.4, without TLS;
/// installed by `sources/ci-setup.sh` with `cargo install iridium_server`) on a free loopback
/// port, for the column types pysqlbridge cannot send: tables are created and filled over TDS.
struct Iridium {
    child: Child,
    port: u16,
}

impl Iridium {
    fn start(dir: &Path) -> Iridium {
        let exe = std::env::var("BROADSIDE_IRIDIUM").unwrap_or_else(|_| "iridium-server".into());
        let mut child = Command::new(&exe)
            .args(["--host", "127.0.0.1", "--port", "0", "--memory", "--no-tls"])
            .args(["--user", USER, "--password", PASSWORD, "--database", "ERP"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {exe} ({e}); install it with `bash sources/ci-setup.sh`")
            });
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log = dir.join("iridium.log");
        let log_path = log.clone();
        std::thread::spawn(move || {
            let mut out = std::fs::File::create(log_path).unwrap();
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                use std::io::Write;
                let _ = writeln!(out, "{line}");
                if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
                    let _ = tx.send(rest.trim().parse::<u16>().unwrap());
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "iridium-server did not start:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        Iridium { child, port }
    }

    /// Runs statements over TDS (tiberius, no TLS), in order.
    fn execute(&self, statements: &[&str]) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio_util::compat::TokioAsyncWriteCompatExt;
            let mut config = tiberius::Config::new();
            config.host("127.0.0.1");
            config.port(self.port);
            config.database("ERP");
            config.authentication(tiberius::AuthMethod::sql_server(USER, PASSWORD));
            config.encryption(tiberius::EncryptionLevel::NotSupported);
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .unwrap();
            let mut client = tiberius::Client::connect(config, tcp.compat_write())
                .await
                .unwrap();
            for s in statements {
                client
                    .execute(*s, &[])
                    .await
                    .unwrap_or_else(|e| panic!("{s}: {e}"));
            }
        });
    }
}

impl Drop for Iridium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The types pysqlbridge cannot send, over the wire from a T-SQL engine: exact decimals, money,
/// GUIDs, fixed-width char, the integer widths, datetime and NULLs, through `erp check` (the
/// same decode the send uses), against the documented text forms.
///
/// iridium_server 0.1.12 cannot send date, datetime2, time or datetimeoffset values (protocol
/// errors or NULLs), counts datetime days from 2000 instead of 1900, swaps the halves of an
/// 8-byte money value and keeps bigint as a double;
/// those are covered by the unit tests in sources/src/erp/types.rs (values built by tiberius
/// itself) and by `real_sql_server_check_and_sharded_send`.
#[test]
fn typed_erp_columns_over_the_wire_map_to_documented_text() {
    let dir = tempfile::tempdir().unwrap();
    let server = Iridium::start(dir.path());
    server.execute(&[
        "CREATE TABLE typed (id INT NOT NULL PRIMARY KEY, email NVARCHAR(200), code CHAR(6), \
         nc NCHAR(4), amount DECIMAL(12,2), fee SMALLMONEY, ref UNIQUEIDENTIFIER, \
         flag BIT, tiny TINYINT, small SMALLINT, big BIGINT, ratio FLOAT)",
        "INSERT INTO typed VALUES (1, N'a@example.com', 'AB', N'xy', 1234.50, 12.3456, \
         '6F9619FF-8B86-D011-B42D-00C04FC964FF', 1, 255, -32768, \
         4294967296007, 0.1)",
        "INSERT INTO typed (id, email, amount) VALUES (2, N'b@example.com', -0.05)",
    ]);
    let names = [
        "id", "email", "code", "nc", "amount", "fee", "ref", "flag", "tiny", "small", "big",
        "ratio",
    ];
    let spec = dir.path().join("typed.toml");
    std::fs::write(
        &spec,
        format!(
            "campaign_id = \"typed\"\nchannel = \"email\"\n[source]\ntype = \"erp\"\nhost = \"127.0.0.1\"\n\
             port = {}\ndatabase = \"ERP\"\nuser = \"{USER}\"\npassword_env = \"BROADSIDE_TEST_ERP_PASSWORD\"\n\
             encryption = \"not_supported\"\nkey_column = \"id\"\nquery = \"SELECT {} FROM typed\"\n\
             [columns]\nemail = \"email\"\nfirst_name = \"code\"\n\
             [[variants]]\nname = \"A\"\nweight = 1\ntemplate = \"t\"\n[output]\nstore = \"store\"\n\
             [megasys]\nhot_folder = \"hot\"\n",
            server.port,
            names.join(", ")
        ),
    )
    .unwrap();
    let (text, rows) = check_samples(&spec, &names);
    let (a, b) = (&rows[0], &rows[1]);
    let expect_a = [
        ("id", "1"),
        ("email", "a@example.com"),
        ("code", "AB"),
        ("nc", "xy"),
        ("amount", "1234.50"),
        ("fee", "12.3456"),
        ("ref", "6F9619FF-8B86-D011-B42D-00C04FC964FF"),
        ("flag", "true"),
        ("tiny", "255"),
        ("small", "-32768"),
        ("big", "4294967296007"),
        ("ratio", "0.1"),
    ];
    let got_a: Vec<(&str, &str)> = names.iter().map(|n| (*n, a[n].as_str())).collect();
    assert_eq!(got_a, expect_a, "{text}");
    assert_eq!(b["amount"], "-0.05", "{text}");
    for n in names
        .iter()
        .filter(|n| !["id", "email", "amount"].contains(n))
    {
        assert_eq!(b[n], "NULL", "{n} of row 2: {text}");
    }
    assert_column_types(
        &text,
        &[
            ("code", "char", "text, trailing spaces trimmed"),
            ("nc", "nchar", "text, trailing spaces trimmed"),
            ("amount", "numeric", "exact decimal"),
            ("fee", "money", "exact decimal, 4 places"),
            ("ref", "uniqueidentifier", "GUID, upper case"),
            ("tiny", "tinyint", "integer digits"),
            ("big", "bigint", "integer digits"),
        ],
    );
}

#[test]
fn an_audience_is_a_where_with_bound_values_on_the_erp_query() {
    let e = erp_data(600, 50);
    // last names with quotes: a value pasted into the SQL text would break the query or match
    // the wrong rows; bound as a parameter it matches itself only
    let names = ["O'Brien", "OBrien", "O''Brien", "x' OR '1'='1"];
    let text = std::fs::read_to_string(&e.customers).unwrap();
    let mut lines = text.lines();
    let header = csv_fields(lines.next().unwrap());
    let col = |n: &str| header.iter().position(|h| h == n).unwrap();
    let (id, email, last, country) = (
        col("customer_id"),
        col("email"),
        col("last_name"),
        col("country"),
    );
    let mut out = header.join(",") + "\n";
    let mut expect = Vec::new();
    for l in lines {
        let mut f = csv_fields(l);
        let n: usize = f[id].parse().unwrap();
        let name = names[n % names.len()];
        f[last] = name.to_string();
        if name == "O'Brien" && f[country] == "US" {
            expect.push(f[email].trim().to_lowercase());
        }
        let f: Vec<String> = f.iter().map(|v| csv_field(v)).collect();
        out.push_str(&f.join(","));
        out.push('\n');
    }
    std::fs::write(&e.customers, out).unwrap();
    expect.sort();
    assert!(expect.len() > 100, "{}", expect.len());

    let bridge = Bridge::start(e.dir.path(), &[("customers", &e.customers)]);
    // the spec's own parameter comes first: the audience's are numbered after it
    let spec = erp_spec(
        &e,
        "erp.toml",
        &source_block(bridge.port, "")
            .replace("FROM customers", "FROM customers WHERE customer_id > @P1")
            .replace(
                "key_column",
                "params = [{ type = \"int\", value = 0 }]\nkey_column",
            ),
    );
    let audience = e.dir.path().join("audience.json");
    std::fs::write(
        &audience,
        serde_json::json!({"type": "inline", "conditions": [
            {"condition_group": "member_properties", "field": "last_name", "operator": "eq", "value": "O'Brien"},
            {"condition_group": "member_properties", "field": "country", "operator": "in", "value": ["US", "x' OR '1'='1"]}
        ]})
        .to_string(),
    )
    .unwrap();
    let aud = audience.to_str().unwrap();
    send(&spec, &["--run-id", "aud", "--audience", aud], true);

    let ledger = assert_outputs_agree(e.dir.path(), "aud", expect.len() as u64);
    let mut keys: Vec<String> = ledger
        .iter()
        .map(|r| r.key.clone().unwrap_or_default().trim().to_string())
        .collect();
    keys.sort();
    assert_eq!(keys, expect);
    let rec = record(&e.dir.path().join("store"), WS, "aud");
    assert!(rec.input.path.contains(" audience="), "{}", rec.input.path);
    assert!(!rec.input.path.contains("Brien"), "{}", rec.input.path);

    // a condition on a field the spec does not map is refused before anything is recorded
    std::fs::write(
        &audience,
        r#"[{"condition_group": "member_properties", "field": "language", "operator": "eq", "value": "en"}]"#,
    )
    .unwrap();
    let out = send(&spec, &["--run-id", "lang", "--audience", aud], false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "audience.conditions[0].field: member_properties.language is not a known field"
        ),
        "{err}"
    );
    assert!(!e
        .dir
        .path()
        .join("store/campaign_runs/workspace_id=demo/lang.json")
        .exists());
}
