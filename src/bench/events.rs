//! Deterministic engagement events for the ingest and query measurements, as NDJSON in the
//! documented JSON shape (docs/events.md).
//!
//! Events come from *messages*: message `m` (a pure function of the seed and `m`) is one
//! campaign's mail to one recipient of the generated population (the benchmark's recipients,
//! so addresses are real rows of its data set). Each message yields its funnel in order:
//! `submitted`, then `delivered` (or `bounced`, 3 %: a third hard), then maybe `opened`
//! (35 % of delivered, within about three days, skewed early), `clicked` (30 % of opens),
//! `unsubscribed` (1.5 % of opens) and `complained` (0.2 % of delivered). Messages are
//! generated until the requested number of events is written (the last funnel may be cut).
//!
//! Campaigns: the first is the benchmark's generated campaign and gets 40 % of the messages;
//! the others (`<campaign>-earlier-NN`) share the rest. Campaign `c` sends on day
//! `c·days/campaigns` of the range (spread over four hours), so days, campaigns and
//! recipients all vary.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use broadside_sources::synthetic::{Defect, Generator};
use chrono::{DateTime, Duration, NaiveDate, SecondsFormat, Utc};
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// What to generate.
#[derive(Debug, Clone)]
pub struct EventPlan {
    /// Workspace of every event.
    pub workspace: String,
    /// Campaign ids; the first is the benchmark's.
    pub campaigns: Vec<String>,
    /// Recipients of the generated data set (rows `0..population`).
    pub population: u64,
    /// The data set's generator (addresses of its rows).
    pub generator: Generator,
    /// First day.
    pub start: NaiveDate,
    /// Days the sends spread over.
    pub days: u32,
    /// Seed.
    pub seed: u64,
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct EventsInfo {
    /// Events (lines).
    pub events: u64,
    /// Messages they came from.
    pub messages: u64,
    /// Events per type.
    pub by_type: std::collections::BTreeMap<String, u64>,
    /// Events per campaign.
    pub by_campaign: std::collections::BTreeMap<String, u64>,
    /// Earliest and latest event time.
    pub first_ts: DateTime<Utc>,
    /// Latest event time.
    pub last_ts: DateTime<Utc>,
    /// A recipient with events (the recipient of message 0), for the history query.
    pub sample_email: String,
    /// Distinct recipients of message 0's campaign (approximation not needed: counted).
    pub distinct_recipients: u64,
}

struct Ev {
    kind: &'static str,
    bounce: Option<&'static str>,
    ts: DateTime<Utc>,
    url: Option<String>,
}

impl EventPlan {
    fn h(&self, m: u64, k: u64) -> u64 {
        xxh3_64_with_seed(
            &m.to_le_bytes(),
            self.seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )
    }

    fn campaign(&self, m: u64) -> usize {
        let n = self.campaigns.len();
        let x = self.h(m, 1) % 100;
        if n <= 1 || x < 40 {
            0
        } else {
            1 + (x as usize - 40) % (n - 1)
        }
    }

    /// A valid address of the population near row `r`.
    fn email(&self, mut r: u64) -> String {
        loop {
            if !matches!(self.generator.defect(r), Defect::BadEmail | Defect::NoEmail) {
                if let Some(k) = self.generator.key(r) {
                    return k;
                }
            }
            r = (r + 1) % self.population.max(1);
        }
    }

    /// Message `m`: campaign, variant, recipient and its funnel.
    fn message(&self, m: u64) -> (usize, &'static str, String, Vec<Ev>) {
        let c = self.campaign(m);
        let day = (c as u64 * self.days as u64 / self.campaigns.len().max(1) as u64) as i64;
        let sent = self.start.and_hms_opt(6, 0, 0).expect("06:00").and_utc()
            + Duration::days(day)
            + Duration::seconds((self.h(m, 2) % (4 * 3600)) as i64);
        let email = self.email(self.h(m, 3) % self.population.max(1));
        let variant = if self.h(m, 4).is_multiple_of(2) {
            "A"
        } else {
            "B"
        };
        let ev = |kind, ts| Ev {
            kind,
            bounce: None,
            ts,
            url: None,
        };
        let mut f = vec![ev("submitted", sent)];
        let arrived = sent + Duration::seconds(1 + (self.h(m, 5) % 120) as i64);
        let fate = self.h(m, 6) % 1000;
        if fate < 30 {
            f.push(Ev {
                bounce: Some(if fate < 10 { "hard" } else { "soft" }),
                ..ev("bounced", arrived)
            });
            return (c, variant, email, f);
        }
        f.push(ev("delivered", arrived));
        if self.h(m, 7) % 100 < 35 {
            // Opens cluster in the first hours: the square of a uniform draw over ~3 days.
            let u = (self.h(m, 8) % 10_000) as f64 / 10_000.0;
            let opened = arrived + Duration::seconds((u * u * 3.0 * 86_400.0) as i64 + 30);
            f.push(ev("opened", opened));
            if self.h(m, 9) % 100 < 30 {
                f.push(Ev {
                    url: Some(format!("https://example.com/offer/{}", self.h(m, 10) % 5)),
                    ..ev(
                        "clicked",
                        opened + Duration::seconds(5 + (self.h(m, 11) % 600) as i64),
                    )
                });
            }
            if self.h(m, 12) % 1000 < 15 {
                f.push(ev(
                    "unsubscribed",
                    opened + Duration::seconds(20 + (self.h(m, 13) % 900) as i64),
                ));
            }
        }
        if self.h(m, 14) % 1000 < 2 {
            f.push(ev(
                "complained",
                arrived + Duration::seconds(600 + (self.h(m, 15) % 86_400) as i64),
            ));
        }
        (c, variant, email, f)
    }

    /// Writes `n` events to `path` (NDJSON, via a temporary file).
    pub fn write(&self, n: u64, path: &Path) -> Result<EventsInfo> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let tmp = path.with_extension("tmp");
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut info = EventsInfo {
            events: 0,
            messages: 0,
            by_type: Default::default(),
            by_campaign: Default::default(),
            first_ts: DateTime::<Utc>::MAX_UTC,
            last_ts: DateTime::<Utc>::MIN_UTC,
            sample_email: String::new(),
            distinct_recipients: 0,
        };
        let mut recipients = std::collections::HashSet::new();
        let mut m = 0;
        while info.events < n {
            let (c, variant, email, funnel) = self.message(m);
            if m == 0 {
                info.sample_email = email.clone();
            }
            recipients.insert(xxh3_64_with_seed(email.as_bytes(), 0));
            let campaign = &self.campaigns[c];
            for (k, e) in funnel.iter().enumerate() {
                if info.events == n {
                    break;
                }
                let line = serde_json::json!({
                    "event_id": format!("bench-{}-{m}-{k}", self.seed),
                    "workspace_id": self.workspace,
                    "campaign_id": campaign,
                    "variant": variant,
                    "run_id": format!("{campaign}-run-1"),
                    "email": email,
                    "event_type": e.kind,
                    "bounce_type": e.bounce,
                    "url": e.url,
                    "ts": e.ts.to_rfc3339_opts(SecondsFormat::Secs, true),
                });
                serde_json::to_writer(&mut w, &line)?;
                w.write_all(b"\n")?;
                info.events += 1;
                *info.by_type.entry(e.kind.to_string()).or_default() += 1;
                *info.by_campaign.entry(campaign.clone()).or_default() += 1;
                info.first_ts = info.first_ts.min(e.ts);
                info.last_ts = info.last_ts.max(e.ts);
            }
            m += 1;
        }
        info.messages = m;
        info.distinct_recipients = recipients.len() as u64;
        w.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_deterministic_and_spread() {
        let plan = EventPlan {
            workspace: "demo".into(),
            campaigns: (0..4).map(|i| format!("c{i}")).collect(),
            population: 1000,
            generator: Generator::new(42, 0.02),
            start: NaiveDate::from_ymd_opt(2026, 1, 5).unwrap(),
            days: 30,
            seed: 7,
        };
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.ndjson"), dir.path().join("b.ndjson"));
        let ia = plan.write(5000, &a).unwrap();
        plan.write(5000, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(ia.events, 5000);
        assert_eq!(std::fs::read_to_string(&a).unwrap().lines().count(), 5000);
        assert_eq!(ia.by_campaign.len(), 4);
        assert!(ia.by_type.len() >= 6, "{:?}", ia.by_type);
        assert!(ia.last_ts - ia.first_ts > Duration::days(20));
        assert!(ia.distinct_recipients > 500);
    }
}
