//! The dashboard page (`src/ui/`), end to end: a real send and ingest, `broadside serve
//! --tokens`, and Debian's headless Chromium loading the page with a token in the URL fragment
//! (`#token=…&workspace=…&page=…`). Every figure the page shows is compared with the API's own
//! answer (fetched here over TCP) or with the ledger; nothing is hard-coded.
//!
//! Chromium runs with `--virtual-time-budget`, its own wait for the page's fetches, then
//! `--dump-dom`; the dumped DOM is parsed by the small parser below. The browser is
//! `/usr/bin/chromium` (installed in CI by deploy/ci-setup.sh), or `BROADSIDE_CHROMIUM`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;

const WS: &str = "demo";
const CAMPAIGN: &str = "generated-42";

// ---------- a minimal parser for Chromium's serialised DOM ----------

/// An element of the dumped DOM.
#[derive(Debug, Default)]
struct El {
    tag: String,
    attrs: HashMap<String, String>,
    kids: Vec<Node>,
}

#[derive(Debug)]
enum Node {
    El(El),
    Text(String),
}

const VOID: [&str; 13] = [
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
    "wbr",
];

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// Parses the serialisation Chromium writes (`--dump-dom`): quoted attributes, closed
/// non-void elements, escaped text.
fn parse_dom(html: &str) -> El {
    let mut stack = vec![El {
        tag: "#document".into(),
        ..El::default()
    }];
    let mut rest = html;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = after.split_once("-->").map(|x| x.1).unwrap_or("");
        } else if rest.starts_with("<!") {
            rest = rest.split_once('>').map(|x| x.1).unwrap_or("");
        } else if let Some(after) = rest.strip_prefix("</") {
            let (name, tail) = after.split_once('>').expect("closing tag ends");
            rest = tail;
            let name = name.trim().to_ascii_lowercase();
            // Close up to the matching element (the serialiser closes everything it opens).
            if stack.iter().skip(1).any(|e| e.tag == name) {
                loop {
                    let el = stack.pop().unwrap();
                    let done = el.tag == name;
                    stack.last_mut().unwrap().kids.push(Node::El(el));
                    if done {
                        break;
                    }
                }
            }
        } else if rest.starts_with('<') && rest[1..].starts_with(|c: char| c.is_ascii_alphabetic())
        {
            let (el, tail, closed) = parse_tag(&rest[1..]);
            rest = tail;
            if closed || VOID.contains(&el.tag.as_str()) {
                stack.last_mut().unwrap().kids.push(Node::El(el));
            } else {
                stack.push(el);
            }
        } else {
            let end = rest
                .char_indices()
                .skip(1)
                .find(|(_, c)| *c == '<')
                .map_or(rest.len(), |(i, _)| i);
            let text = unescape(&rest[..end]);
            stack.last_mut().unwrap().kids.push(Node::Text(text));
            rest = &rest[end..];
        }
    }
    while stack.len() > 1 {
        let el = stack.pop().unwrap();
        stack.last_mut().unwrap().kids.push(Node::El(el));
    }
    stack.pop().unwrap()
}

/// One start tag (after its `<`): the element, the text after it, whether it was `/>`.
fn parse_tag(s: &str) -> (El, &str, bool) {
    let name_end = s
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .unwrap();
    let mut el = El {
        tag: s[..name_end].to_ascii_lowercase(),
        ..El::default()
    };
    let mut rest = &s[name_end..];
    loop {
        rest = rest.trim_start();
        if let Some(t) = rest.strip_prefix("/>") {
            return (el, t, true);
        }
        if let Some(t) = rest.strip_prefix('>') {
            return (el, t, false);
        }
        let n = rest
            .find(|c: char| c.is_whitespace() || c == '=' || c == '>' || c == '/')
            .unwrap();
        let name = rest[..n].to_ascii_lowercase();
        rest = &rest[n..];
        let value = if let Some(t) = rest.strip_prefix("=\"") {
            let end = t.find('"').expect("attribute value ends");
            rest = &t[end + 1..];
            unescape(&t[..end])
        } else {
            if rest.starts_with('/') && !rest.starts_with("/>") {
                rest = &rest[1..];
            }
            String::new()
        };
        el.attrs.insert(name, value);
    }
}

impl El {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.get(name).map(String::as_str)
    }

    /// Every descendant element matching `pred`, in document order.
    fn all<'a>(&'a self, pred: &dyn Fn(&El) -> bool) -> Vec<&'a El> {
        let mut out = Vec::new();
        fn walk<'a>(e: &'a El, pred: &dyn Fn(&El) -> bool, out: &mut Vec<&'a El>) {
            for k in &e.kids {
                if let Node::El(c) = k {
                    if pred(c) {
                        out.push(c);
                    }
                    walk(c, pred, out);
                }
            }
        }
        walk(self, pred, &mut out);
        out
    }

    /// Descendants with `data-test="name"`.
    fn tests(&self, name: &str) -> Vec<&El> {
        self.all(&|e| e.attr("data-test") == Some(name))
    }

    /// The one descendant with `data-test="name"`.
    fn test(&self, name: &str) -> &El {
        let found = self.tests(name);
        assert_eq!(found.len(), 1, "data-test={name}: {} elements", found.len());
        found[0]
    }

    /// The concatenated text of the element.
    fn text(&self) -> String {
        let mut out = String::new();
        fn walk(e: &El, out: &mut String) {
            for k in &e.kids {
                match k {
                    Node::Text(t) => out.push_str(t),
                    Node::El(c) => walk(c, out),
                }
            }
        }
        walk(self, &mut out);
        out
    }

    /// The cell with `data-field="field"` in this row.
    fn field(&self, field: &str) -> &El {
        let f = self.all(&|e| e.attr("data-field") == Some(field));
        assert_eq!(f.len(), 1, "data-field={field} in {:?}", self.text());
        f[0]
    }
}

// ---------- the browser ----------

/// Percent-encodes everything but unreserved characters (Chromium's command line mishandles
/// some raw characters, such as `'`, in a URL).
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Where each page's screenshot is kept (a test artifact): `<target>/tmp/ui-screenshots/`,
/// named after the fragment without its token.
fn screenshot_path(fragment: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let name: String = fragment
        .split('&')
        .filter(|p| !p.starts_with("token="))
        .collect::<Vec<_>>()
        .join("_")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    dir.join(format!(
        "{}.png",
        if name.is_empty() { "login" } else { &name }
    ))
}

/// Loads `http://ADDR/#FRAGMENT` in a fresh headless Chromium profile and returns the DOM once
/// the page's fetches are done (Chromium's virtual time budget): the raw text and its tree. A
/// screenshot of the page is kept ([`screenshot_path`]).
fn dump(addr: &str, fragment: &str) -> (String, El) {
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/#{fragment}");
    let shot = screenshot_path(fragment);
    let _ = std::fs::remove_file(&shot);
    let child = headless_chromium(profile.path())
        .args(["--virtual-time-budget=10000", "--window-size=1280,1000"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--dump-dom")
        .arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("chromium did not finish within 120 s: {url}");
        }
    };
    let html = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && html.contains("data-test=\"app\""),
        "chromium {:?} for {url}\nstdout:\n{html}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG"),
        "no screenshot of {url} in {}",
        shot.display()
    );
    let dom = parse_dom(&html);
    (html, dom)
}

/// Loads a page signed in with `token`, and checks the token left the address bar and the DOM.
fn page(addr: &str, token: &str, rest: &str) -> El {
    let (html, dom) = dump(addr, &format!("token={token}&workspace={WS}{rest}"));
    assert!(!html.contains(token), "the token is in the DOM: {html}");
    let app = dom.test("app");
    let href = app
        .attr("data-href")
        .expect("the page records location.href");
    assert!(href.starts_with(&format!("http://{addr}/#/")), "{href}");
    assert!(!href.contains("token"), "token left in the URL: {href}");
    dom
}

// ---------- comparisons ----------

/// A figure cell shows the API's value: `data-value` exactly, the text formatted from it.
fn assert_figure(cell: &El, want: &Value, what: &str) {
    let value = cell.attr("data-value").unwrap();
    let text = cell.text();
    if want.is_null() {
        assert_eq!(value, "", "{what}");
        assert_eq!(text, "—", "{what}");
        return;
    }
    let want = want.as_f64().unwrap_or_else(|| panic!("{what}: {want}"));
    // serde_json (without `float_roundtrip`) may read a float one ulp off the text it was
    // sent as, which the page (JavaScript) reads exactly: compare up to that.
    let got: f64 = value.parse().unwrap();
    assert!(
        (got - want).abs() <= 1e-12 * want.abs().max(1.0),
        "{what}: data-value {value}, API {want}"
    );
    if let Some(pct) = text.strip_suffix('%') {
        let shown: f64 = pct.trim_start_matches('+').parse().unwrap();
        assert!(
            (shown - want * 100.0).abs() <= 0.005 + 1e-9,
            "{what}: {text} for {want}"
        );
    } else {
        assert_eq!(
            text.replace(',', "").parse::<f64>().unwrap(),
            want,
            "{what}"
        );
    }
}

/// Every figure of an API object (`totals` or a variant) in a table row.
fn assert_figures(row: &El, api: &Value, what: &str) {
    let obj = api.as_object().unwrap();
    let mut n = 0;
    for (k, v) in obj {
        if k == "variant" {
            continue;
        }
        assert!(v.is_number() || v.is_null(), "{what}.{k}: {v}");
        assert_figure(row.field(k), v, &format!("{what}.{k}"));
        n += 1;
    }
    assert!(n >= 10, "{what}: only {n} figures");
}

fn api_post_sql(addr: &str, token: &str, sql: &str) -> (u16, Value) {
    let body = serde_json::json!({ "sql": sql }).to_string();
    let raw = post_raw(
        addr,
        "/sql",
        &[
            format!("Authorization: Bearer {token}"),
            format!("workspace_id: {WS}"),
        ],
        &body,
    );
    let status: u16 = raw[9..12].parse().unwrap();
    let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap())
}

fn api_error(addr: &str, token: &str, ws: &str) -> (u16, String) {
    let (status, body) = api_get(addr, "/campaign-statistics/", token, ws);
    let v: Value = serde_json::from_str(&body).unwrap();
    (status, v["error"].as_str().unwrap().to_string())
}

// ---------- the test ----------

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn dashboard_pages_show_what_the_api_answers() {
    let d = tempfile::tempdir().unwrap();
    let spec = generate(d.path(), 1_000, 80, &[]);
    let store = d.path().join("store");
    run(&["send", s(&spec), "--run-id", "r1", "--no-progress"], true);
    let ledger = read_ledger(&store, WS, CAMPAIGN, "r1");

    // Engagement for some sent addresses, over three days; one click carries markup in its URL.
    let sent: Vec<&LedgerRow> = ledger
        .iter()
        .filter(|r| r.decision == "sent" && r.key.is_some())
        .take(30)
        .collect();
    assert_eq!(sent.len(), 30);
    let events = d.path().join("events.ndjson");
    let mut f = std::fs::File::create(&events).unwrap();
    let mut n = 0;
    for (i, r) in sent.iter().enumerate() {
        let email = r.key.as_deref().unwrap();
        for (kind, hour) in [
            ("delivered", 8),
            ("opened", 9 + i % 5),
            ("clicked", 12 + i % 4),
        ] {
            if (kind == "opened" && i % 3 == 0) || (kind == "clicked" && i % 2 == 0) {
                continue;
            }
            n += 1;
            let mut e = serde_json::json!({
                "event_id": format!("ui-{n}"), "workspace_id": WS, "campaign_id": CAMPAIGN,
                "event_type": kind, "email": email,
                "ts": format!("2026-03-{:02}T{hour:02}:00:00Z", 10 + i % 3),
            });
            if kind == "clicked" {
                e["url"] = Value::from(format!("https://example.com/?q=<img src=x>&i={i}"));
            }
            writeln!(f, "{e}").unwrap();
        }
    }
    // Another tenant's campaign in the same store, with events for the same people.
    for (i, r) in sent.iter().enumerate().take(5) {
        let e = serde_json::json!({
            "event_id": format!("rival-{i}"), "workspace_id": "rival",
            "campaign_id": "rival-secret-campaign", "event_type": "opened",
            "email": r.key.as_deref().unwrap(), "ts": "2026-03-10T09:00:00Z",
        });
        writeln!(f, "{e}").unwrap();
    }
    drop(f);
    ingest(&store, &events);

    let (tokens, token) = new_token(d.path(), WS);
    let server = Server::start(
        &[
            "--store",
            s(&store),
            "--tokens",
            s(&tokens),
            "--rollup-every",
            "0",
            "--sql-max-rows",
            "50",
        ],
        &[],
    );
    let addr = server.addr.as_str();

    // The page and its assets, without a token, under a CSP that forbids inline script.
    for path in ["/", "/ui/app.js", "/ui/app.css"] {
        let raw = request_raw(addr, "GET", path, &[], "");
        assert!(raw.starts_with("HTTP/1.1 200"), "GET {path}: {raw}");
        let head = raw.split_once("\r\n\r\n").unwrap().0.to_ascii_lowercase();
        assert!(
            head.contains("content-security-policy: default-src 'none'; script-src 'self';"),
            "{head}"
        );
    }

    // 1. Campaigns: one row per campaign of the API, every figure as the API says.
    let api = api_get_ok(addr, "/campaign-statistics/", &token, WS);
    let items = api["items"].as_array().unwrap();
    assert!(!items.is_empty());
    let dom = page(addr, &token, "");
    assert_eq!(dom.test("app").attr("data-route"), Some("campaigns"));
    assert_eq!(dom.test("workspace").text(), WS);
    let table = dom.test("campaigns");
    assert_eq!(table.attr("data-state"), Some("ready"));
    let rows = table.tests("campaign-row");
    assert_eq!(rows.len(), items.len());
    for item in items {
        let id = item["campaign_id"].as_str().unwrap();
        let row = rows
            .iter()
            .find(|r| r.attr("data-campaign") == Some(id))
            .unwrap_or_else(|| panic!("no row for campaign {id}"));
        let link = row.all(&|e| e.tag == "a")[0];
        assert_eq!(link.attr("href"), Some(format!("#/campaign/{id}").as_str()));
        assert_figures(row, &item["totals"], id);
    }
    let (html, _) = dump(
        addr,
        &format!("token={token}&workspace={WS}&page=/campaigns"),
    );
    assert!(
        !html.contains("rival-secret-campaign"),
        "another workspace's campaign is listed"
    );

    // 2. Campaign: variants, time series (chosen types, zone, granularity), runs.
    let stats = api_get_ok(
        addr,
        &format!("/campaign-statistics/{CAMPAIGN}"),
        &token,
        WS,
    );
    let series = api_get_ok(
        addr,
        &format!("/campaign-statistics/{CAMPAIGN}/time-series?granularity=day&time_zone=UTC&event_type=opened,clicked"),
        &token,
        WS,
    );
    let runs = api_get_ok(
        addr,
        &format!("/campaign-runs/?campaign_id={CAMPAIGN}"),
        &token,
        WS,
    );
    let dom = page(
        addr,
        &token,
        &format!(
            "&page={}&types=opened%2Cclicked&tz=UTC&granularity=day",
            pct(&format!("/campaign/{CAMPAIGN}"))
        ),
    );
    assert_eq!(dom.test("app").attr("data-route"), Some("campaign"));
    assert_eq!(dom.test("campaign-id").text(), CAMPAIGN);
    let variants = dom.test("variants");
    assert_eq!(variants.attr("data-state"), Some("ready"));
    let api_variants = stats["variants"].as_array().unwrap();
    let rows = variants.tests("variant-row");
    assert_eq!(rows.len(), api_variants.len());
    assert!(rows.len() >= 2);
    for (row, v) in rows.iter().zip(api_variants) {
        let name = v["variant"].as_str().unwrap_or("");
        assert_eq!(row.attr("data-variant"), Some(name));
        assert_figures(row, v, &format!("variant {name}"));
    }
    assert_figures(variants.test("totals-row"), &stats["totals"], "totals");

    let chart_box = dom.test("timeseries");
    assert_eq!(chart_box.attr("data-state"), Some("ready"));
    let chart = chart_box.test("chart");
    assert_eq!(chart.tag, "svg");
    assert_eq!(chart.attr("data-granularity"), Some("day"));
    assert_eq!(chart.attr("data-time-zone"), Some("UTC"));
    let buckets = series["buckets"].as_array().unwrap();
    assert_eq!(
        chart.attr("data-buckets"),
        Some(buckets.len().to_string().as_str())
    );
    let checked: Vec<&str> = dom
        .tests("event-type")
        .into_iter()
        .filter(|c| c.attr("checked").is_some())
        .map(|c| c.attr("value").unwrap())
        .collect();
    assert_eq!(checked, ["opened", "clicked"]);
    let paths = chart.tests("series");
    assert_eq!(paths.len(), checked.len(), "one path per selected type");
    for (p, t) in paths.iter().zip(&checked) {
        assert_eq!(p.tag, "path");
        assert_eq!(p.attr("data-event-type"), Some(*t));
        let total: u64 = buckets
            .iter()
            .map(|b| b["counts"][*t].as_u64().unwrap())
            .sum();
        assert!(total > 0, "{t}");
        assert_eq!(
            p.attr("data-total"),
            Some(total.to_string().as_str()),
            "{t}"
        );
        let points = p.attr("d").unwrap().matches(['M', 'L']).count();
        assert_eq!(points, buckets.len(), "{t}: a point per bucket");
    }
    let bucket_rows = chart_box.tests("bucket-row");
    assert_eq!(bucket_rows.len(), buckets.len());
    for (row, b) in bucket_rows.iter().zip(buckets) {
        assert_eq!(row.attr("data-start"), b["start"].as_str());
        for t in &checked {
            assert_figure(row.field(t), &b["counts"][*t], &format!("bucket {t}"));
        }
    }
    assert_eq!(dom.test("legend").all(&|e| e.tag == "li").len(), 2);

    let api_runs = runs["items"].as_array().unwrap();
    let run_rows = dom.test("runs").tests("run-row");
    assert_eq!(run_rows.len(), api_runs.len());
    for (row, r) in run_rows.iter().zip(api_runs) {
        assert_eq!(row.attr("data-run"), r["run_id"].as_str());
        assert_figure(row.field("rows"), &r["rows"], "run rows");
        for (k, v) in r["decisions"].as_object().unwrap() {
            assert_figure(row.field(k), v, &format!("run {k}"));
        }
    }

    // The default event types in another zone and granularity: still a path per checked box.
    let dom = page(
        addr,
        &token,
        &format!(
            "&page={}",
            pct(&format!(
                "/campaign/{CAMPAIGN}?granularity=hour&tz=Asia/Kolkata"
            ))
        ),
    );
    let chart = dom.test("chart");
    assert_eq!(chart.attr("data-time-zone"), Some("Asia/Kolkata"));
    let checked: Vec<&str> = dom
        .tests("event-type")
        .into_iter()
        .filter(|c| c.attr("checked").is_some())
        .map(|c| c.attr("value").unwrap())
        .collect();
    assert!(!checked.is_empty());
    let types: Vec<&str> = chart
        .tests("series")
        .iter()
        .map(|p| p.attr("data-event-type").unwrap())
        .collect();
    assert_eq!(types, checked);
    let series = api_get_ok(
        addr,
        &format!(
            "/campaign-statistics/{CAMPAIGN}/time-series?granularity=hour&time_zone=Asia/Kolkata&event_type={}",
            checked.join(",")
        ),
        &token,
        WS,
    );
    assert_eq!(
        chart.attr("data-buckets"),
        Some(
            series["buckets"]
                .as_array()
                .unwrap()
                .len()
                .to_string()
                .as_str()
        )
    );

    // 3. Recipient: a sent, a suppressed and a skipped recipient, explained like `why`.
    let suppressed = ledger
        .iter()
        .find(|r| r.decision == "suppressed" && r.list.is_some() && r.key.is_some())
        .expect("a suppressed recipient");
    let skipped = ledger
        .iter()
        .find(|r| r.decision == "skipped" && r.key.is_some() && r.reason.is_some())
        .expect("a skipped recipient with a key");
    let clicker = sent[1]; // i = 1: delivered, opened and clicked
    for r in [clicker, suppressed, skipped] {
        let key = r.key.as_deref().unwrap();
        // Look the address up as typed, in upper case: the page normalises emails like `why`.
        let typed = if key.contains('@') {
            key.to_uppercase()
        } else {
            key.to_string()
        };
        let dom = page(
            addr,
            &token,
            &format!("&page={}", pct(&format!("/recipient/{}", pct(&typed)))),
        );
        let ledger_box = dom.test("ledger");
        assert_eq!(ledger_box.attr("data-state"), Some("ready"), "{key}");
        // Newest first, then by id (`run:row`, as text) from the last: one run here.
        let mut want: Vec<&LedgerRow> = ledger
            .iter()
            .filter(|l| l.key.as_deref() == Some(key))
            .collect();
        want.sort_by_key(|l| std::cmp::Reverse(l.row.to_string()));
        let rows = ledger_box.tests("ledger-row");
        assert_eq!(rows.len(), want.len(), "{key}");
        for (row, l) in rows.iter().zip(&want) {
            assert_eq!(row.attr("data-decision"), Some(l.decision.as_str()));
            assert_eq!(
                row.attr("data-reason"),
                Some(l.reason.as_deref().unwrap_or(""))
            );
            assert_eq!(row.attr("data-row"), Some(l.row.to_string().as_str()));
            let why = row.test("explanation").text();
            match l.decision.as_str() {
                "sent" => assert_eq!(
                    why,
                    format!(
                        "sent: variant {}, IFUR file {} line {}",
                        l.variant.as_deref().unwrap(),
                        l.file.as_deref().unwrap(),
                        l.line.unwrap()
                    )
                ),
                decision => {
                    let head = format!("{decision}: {} — ", l.reason.as_deref().unwrap());
                    assert!(why.starts_with(&head), "{why}");
                    if let Some(list) = &l.list {
                        assert!(why.contains(&format!("on list {list}")), "{why}");
                    }
                    if let Some(detail) = &l.detail {
                        assert!(why.contains(detail.as_str()), "{why}");
                    }
                }
            }
        }
        let events_box = dom.test("events");
        assert_eq!(events_box.attr("data-state"), Some("ready"), "{key}");
        let shown: Vec<&str> = events_box
            .tests("event-row")
            .iter()
            .map(|e| e.attr("data-event-id").unwrap())
            .collect();
        if key.contains('@') {
            let api = api_get_ok(
                addr,
                &format!("/campaign-events/?email={}", pct(key)),
                &token,
                WS,
            );
            // The event list's order (oldest first), the other way round.
            let want: Vec<&str> = api["items"]
                .as_array()
                .unwrap()
                .iter()
                .rev()
                .map(|e| e["event_id"].as_str().unwrap())
                .collect();
            assert_eq!(shown, want, "{key}");
        } else {
            assert!(shown.is_empty());
        }
        if std::ptr::eq(r, clicker) {
            assert_eq!(shown.len(), 4, "submitted, delivered, opened, clicked");
            // The click's URL is text, not markup.
            assert!(dom.all(&|e| e.tag == "img").is_empty());
            assert!(events_box
                .text()
                .contains("https://example.com/?q=<img src=x>&i=1"));
        }
    }

    // 4. SQL: the query of the fragment runs; its rows are the ledger's counts.
    let query = "SELECT decision, count(*) AS n, 'a,b' AS s FROM recipient_logs GROUP BY decision ORDER BY decision";
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for r in &ledger {
        *counts.entry(r.decision.as_str()).or_default() += 1;
    }
    let dom = page(addr, &token, &format!("&page=%2Fsql&sql={}", pct(query)));
    let result = dom.test("sql-result");
    assert_eq!(result.attr("data-state"), Some("ready"));
    assert_eq!(
        result.test("sql-count").attr("data-value"),
        Some(counts.len().to_string().as_str())
    );
    assert!(result.tests("sql-truncated").is_empty());
    let rows: Vec<(String, u64)> = result
        .tests("sql-row")
        .iter()
        .map(|r| {
            let cells = r.all(&|e| e.tag == "td");
            assert_eq!(cells[2].text(), "a,b");
            (cells[0].text(), cells[1].text().parse().unwrap())
        })
        .collect();
    let want: Vec<(String, u64)> = counts.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(rows, want);
    assert_eq!(dom.test("sql-input").text(), query);

    // A cut answer says so; an error shows the API's text.
    let long = "SELECT row, key FROM recipient_logs ORDER BY row";
    let (status, api) = api_post_sql(addr, &token, long);
    assert_eq!(status, 200);
    assert_eq!(api["truncated"], true);
    let dom = page(addr, &token, &format!("&page=%2Fsql&sql={}", pct(long)));
    let result = dom.test("sql-result");
    assert_eq!(result.tests("sql-row").len(), 50);
    let notice = result.test("sql-truncated").text();
    assert!(
        notice.contains(api["truncated_reason"].as_str().unwrap()),
        "{notice}"
    );
    let bad = "SELECT * FROM no_such_table";
    let (status, api) = api_post_sql(addr, &token, bad);
    assert_eq!(status, 400);
    let dom = page(addr, &token, &format!("&page=%2Fsql&sql={}", pct(bad)));
    let result = dom.test("sql-result");
    assert_eq!(result.attr("data-state"), Some("error"));
    let error = result.test("error");
    assert_eq!(error.attr("data-status"), Some("400"));
    assert!(
        error.text().contains(api["error"].as_str().unwrap()),
        "{}",
        error.text()
    );

    // 5. A wrong token, and a workspace the token may not read: back to the login form with
    // the API's error text.
    for (tok, ws) in [("bs_not_a_token", WS), (token.as_str(), "other")] {
        let (status, message) = api_error(addr, tok, ws);
        assert!(status == 401 || status == 403, "{status}");
        let (html, dom) = dump(addr, &format!("token={tok}&workspace={ws}"));
        assert!(!html.contains(tok), "the token is in the DOM");
        assert_eq!(dom.test("app").attr("data-route"), Some("login"));
        dom.test("login-form");
        assert_eq!(
            dom.test("login-error").text(),
            format!("{message} (HTTP {status})")
        );
        assert!(!dom.test("app").attr("data-href").unwrap().contains("token"));
    }
}
