//! A campaign's send configuration given through the API (`PUT /campaign/{id}/spec`,
//! `broadside campaign import`), and the operator's sources file it names things in.
//!
//! A client may not name files, databases or folders of the sending host: it names a
//! **source** (and suppression lists and a printer) that the operator defined for its workspace
//! in `<campaign specs>/sources.toml`, and chooses everything else a campaign spec holds
//! (channel, columns, variants, holdout, caps, dedupe, suppression policy, mail rules). The two
//! are assembled into a [`CampaignSpec`] whose `campaign_id` is the campaign's API id and whose
//! `workspace_id` is the campaign's workspace, then checked by the spec file's own validator:
//! one validator, one set of messages, for files and for the API.
//!
//! ```toml
//! # <campaign specs>/sources.toml (the operator's)
//! [workspaces.demo.output]          # the spec's [output]: where the workspace's sends write
//! store = "store"
//! [workspaces.demo.megasys]         # the spec's [megasys] (email channel)
//! hot_folder = "hot"
//! [workspaces.demo.sources.customers]
//! list = 7                          # campaigns with "list": 7 send to this source by default
//! input = { type = "csv", path = "customers.csv" }   # the spec's [source]
//! columns = { email = "email", first_name = "first_name" }   # the spec's [columns]
//! [workspaces.demo.suppression_lists.legal]   # a spec's [[suppression]] entry
//! path = "legal-blocklist.csv"
//! reason = "blocklist"
//! [workspaces.demo.printers.lob]    # a spec's [printer] table (mail channel)
//! kind = "lob"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use broadside_pipeline::spec::{
    CampaignSpec, Caps, Channel, ColumnMapping, Dedupe, MailRules, MegasysSpec, OutputSpec,
    SourceSpec, SuppressionListSpec, VariantSpec,
};
use serde::Deserialize;

use crate::store::Campaign;

/// The operator's sources file name, inside the campaign specs folder.
pub const SOURCES_FILE: &str = "sources.toml";

/// The operator's sources file: what each workspace's API-configured campaigns may use.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesFile {
    /// Per workspace id.
    #[serde(default)]
    pub workspaces: BTreeMap<String, WorkspaceSources>,
}

/// What one workspace's campaigns may send from and to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSources {
    /// The spec's `[output]` for the workspace's sends (its store).
    pub output: OutputSpec,
    /// The spec's `[megasys]` (needed by the email channel).
    #[serde(default)]
    pub megasys: Option<MegasysSpec>,
    /// Named recipient sources.
    #[serde(default)]
    pub sources: BTreeMap<String, NamedSource>,
    /// Named suppression lists a configuration may add (`suppression = ["legal"]`).
    #[serde(default)]
    pub suppression_lists: BTreeMap<String, SuppressionListSpec>,
    /// Named printers (the spec's `[printer]` table) for the mail channel.
    #[serde(default)]
    pub printers: BTreeMap<String, toml::Table>,
    /// Sender domains by the campaign `domain` id (`3 = "news.example.com"`): the domain a
    /// campaign's templates are synced to the creative API with.
    #[serde(default)]
    pub domains: BTreeMap<String, String>,
}

/// A recipient source the operator defined: where rows come from and how its columns map.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedSource {
    /// The campaign `list` id this source serves: a configuration without `source` sends to the
    /// source of its campaign's list.
    #[serde(default)]
    pub list: Option<i64>,
    /// The spec's `[source]`.
    pub input: SourceSpec,
    /// The spec's `[columns]` (a configuration may give its own).
    #[serde(default)]
    pub columns: ColumnMapping,
}

/// The keys a campaign's send configuration may have.
pub const CONFIG_KEYS: [&str; 11] = [
    "channel",
    "source",
    "columns",
    "suppression",
    "store_suppression",
    "caps",
    "holdout_percent",
    "dedupe",
    "variants",
    "mail",
    "printer",
];

/// A campaign's send configuration as a client gives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientConfig {
    channel: Channel,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    columns: Option<ColumnMapping>,
    #[serde(default)]
    suppression: Vec<String>,
    #[serde(default = "yes")]
    store_suppression: bool,
    #[serde(default)]
    caps: Caps,
    #[serde(default)]
    holdout_percent: f64,
    #[serde(default)]
    dedupe: Dedupe,
    variants: Vec<ClientVariant>,
    #[serde(default)]
    mail: MailRules,
    #[serde(default)]
    printer: Option<String>,
}

fn yes() -> bool {
    true
}

/// A variant as a client gives it: its template content is text (a spec file names a file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientVariant {
    name: String,
    weight: u32,
    template: String,
    /// The template's content: its merge tags are checked against the columns, and the
    /// campaign service syncs it to the creative API before a sending.
    #[serde(default)]
    content: Option<String>,
}

/// Keys a spec file has that belong to the operator or to the campaign service.
const NOT_CLIENT_KEYS: [(&str, &str); 4] = [
    (
        "campaign_id",
        "is the campaign's id; the configuration cannot choose it",
    ),
    (
        "workspace_id",
        "is the campaign's workspace; the configuration cannot choose it",
    ),
    (
        "output",
        "is set for the workspace by the operator (sources.toml)",
    ),
    (
        "megasys",
        "is set for the workspace by the operator (sources.toml)",
    ),
];

/// The campaign specs folder of a process, with its operator's sources file.
#[derive(Debug, Clone)]
pub struct SendConfigs {
    dir: PathBuf,
}

impl SendConfigs {
    /// Configurations resolved against `dir`'s [`SOURCES_FILE`] (read at each use, so the
    /// operator's edits apply without a restart).
    pub fn new(dir: &Path) -> SendConfigs {
        SendConfigs {
            dir: dir.to_path_buf(),
        }
    }

    /// The specs folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the spec assembled for campaign `id` is written for its sends.
    pub fn spec_path(&self, id: i64) -> PathBuf {
        self.dir.join(format!("{id}.api.toml"))
    }

    /// The operator's sources file (an empty one when it does not exist).
    pub fn sources(&self) -> Result<SourcesFile, String> {
        let path = self.dir.join(SOURCES_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SourcesFile::default()),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))
    }

    /// Checks `text` (TOML) as campaign `c`'s send configuration and assembles the spec it
    /// sends with; every problem at once otherwise, each naming its field.
    pub fn assemble(&self, c: &Campaign, text: &str) -> Result<Assembled, Vec<String>> {
        let table: toml::Table = toml::from_str(text).map_err(|e| vec![toml_problem(text, &e)])?;
        let mut problems: Vec<String> = NOT_CLIENT_KEYS
            .iter()
            .filter(|(k, _)| table.contains_key(*k))
            .map(|(k, why)| format!("{k} {why}"))
            .collect();
        if !problems.is_empty() {
            return Err(problems);
        }
        let cfg: ClientConfig = toml::from_str(text).map_err(|e| vec![toml_problem(text, &e)])?;
        let sources = self.sources().map_err(|e| vec![e])?;
        let Some(ws) = sources.workspaces.get(&c.workspace_id) else {
            return Err(vec![format!(
                "source: workspace {:?} has no sources defined by the operator ({} in {})",
                c.workspace_id,
                SOURCES_FILE,
                self.dir.display()
            )]);
        };
        let source = match (&cfg.source, c.list) {
            (Some(name), _) => ws.sources.get(name).ok_or_else(|| {
                format!(
                    "source: {name:?} is not a source of workspace {:?}; known: {}",
                    c.workspace_id,
                    known(ws.sources.keys())
                )
            }),
            (None, Some(list)) => ws
                .sources
                .values()
                .find(|s| s.list == Some(list))
                .ok_or_else(|| {
                    format!(
                        "source: campaign {}'s list {list} is not served by any source of workspace {:?}; name one: {}",
                        c.id,
                        c.workspace_id,
                        known(ws.sources.keys())
                    )
                }),
            (None, None) => Err(format!(
                "source: name a source of workspace {:?} ({}); campaign {} has no list to take it from",
                c.workspace_id,
                known(ws.sources.keys()),
                c.id
            )),
        };
        let mut lists = Vec::new();
        for (i, name) in cfg.suppression.iter().enumerate() {
            match ws.suppression_lists.get(name) {
                Some(l) => lists.push(l.clone()),
                None => problems.push(format!(
                    "suppression[{i}]: {name:?} is not a suppression list of workspace {:?}; known: {}",
                    c.workspace_id,
                    known(ws.suppression_lists.keys())
                )),
            }
        }
        let printer = match &cfg.printer {
            None => None,
            Some(name) => match ws.printers.get(name) {
                Some(p) => Some(p.clone()),
                None => {
                    problems.push(format!(
                        "printer: {name:?} is not a printer of workspace {:?}; known: {}",
                        c.workspace_id,
                        known(ws.printers.keys())
                    ));
                    None
                }
            },
        };
        let source = match source {
            Ok(s) => s,
            Err(e) => {
                problems.push(e);
                return Err(problems);
            }
        };
        let columns = cfg.columns.unwrap_or_else(|| source.columns.clone());
        let layout = columns.layout();
        let names: Vec<&str> = layout.names().iter().map(String::as_str).collect();
        for (i, v) in cfg.variants.iter().enumerate() {
            if let Some(content) = &v.content {
                if let Err(e) = crate::templates::check_merge_tags(&v.template, content, &names) {
                    problems.push(format!("variants[{i}].content: {e}"));
                }
            }
        }
        if let Some(d) = c.domain {
            if let Err(e) = ws.sender_domain(&c.workspace_id, d) {
                problems.push(e);
            }
        }
        let dir = self.content_dir(c.id);
        let contents: Vec<(String, String)> = cfg
            .variants
            .iter()
            .filter_map(|v| v.content.clone().map(|t| (v.name.clone(), t)))
            .collect();
        let spec = CampaignSpec {
            campaign_id: c.id.to_string(),
            workspace_id: c.workspace_id.clone(),
            channel: cfg.channel,
            source: source.input.clone(),
            columns,
            suppression: lists,
            store_suppression: cfg.store_suppression,
            caps: cfg.caps,
            holdout_percent: cfg.holdout_percent,
            dedupe: cfg.dedupe,
            variants: cfg
                .variants
                .into_iter()
                .map(|v| VariantSpec {
                    content: v
                        .content
                        .as_ref()
                        .map(|_| dir.join(format!("{}.tpl", v.name))),
                    name: v.name,
                    weight: v.weight,
                    template: v.template,
                })
                .collect(),
            mail: cfg.mail,
            output: ws.output.clone(),
            megasys: ws.megasys.clone(),
            printer,
            base_dir: self.dir.clone(),
        };
        problems.extend(spec.validate());
        if problems.is_empty() {
            Ok(Assembled { spec, contents })
        } else {
            Err(problems)
        }
    }

    /// Where campaign `id`'s template contents are written (`<id>.api/<variant>.tpl`, relative
    /// to the specs folder, as the assembled spec names them).
    fn content_dir(&self, id: i64) -> PathBuf {
        PathBuf::from(format!("{id}.api"))
    }

    /// The sender domain campaign `c`'s `domain` stands for (`None` without a domain).
    pub fn sender_domain(&self, c: &Campaign) -> Result<Option<String>, String> {
        c.domain
            .map(|d| self.domain(&c.workspace_id, d))
            .transpose()
    }

    /// Where the operator defined named sources for workspace `ws`, a campaign `list` must be
    /// served by one of them (the source a configuration without `source` sends to).
    pub fn check_list(&self, ws: &str, list: i64) -> Result<(), String> {
        let sources = self.sources()?;
        let Some(w) = sources.workspaces.get(ws) else {
            return Ok(());
        };
        if w.sources.values().any(|s| s.list == Some(list)) {
            return Ok(());
        }
        Err(format!(
            "list {list} is served by no source of workspace {ws:?} (sources with a `list`: {})",
            known(
                w.sources
                    .iter()
                    .filter(|(_, s)| s.list.is_some())
                    .map(|(n, _)| n)
            )
        ))
    }

    /// The sender domain domain id `d` stands for in workspace `ws`, or why there is none.
    pub fn domain(&self, ws: &str, d: i64) -> Result<String, String> {
        let sources = self.sources()?;
        let Some(w) = sources.workspaces.get(ws) else {
            return Err(format!(
                "domain: workspace {ws:?} has no sender domains defined by the operator ({SOURCES_FILE})"
            ));
        };
        w.sender_domain(ws, d)
    }

    /// Assembles campaign `c`'s spec from its stored configuration and writes it to
    /// [`SendConfigs::spec_path`] (only when its content changed, so a resumed send finds the
    /// same file); `None` when the campaign has no stored configuration.
    pub fn write_spec(&self, c: &Campaign) -> Result<Option<PathBuf>, String> {
        let Some(text) = &c.send_spec else {
            return Ok(None);
        };
        let Assembled { spec, contents } = self.assemble(c, text).map_err(|p| {
            format!(
                "campaign {}: the send configuration is not valid: {}",
                c.id,
                p.join("; ")
            )
        })?;
        if !contents.is_empty() {
            let dir = self.dir.join(self.content_dir(c.id));
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            for (variant, content) in &contents {
                write_if_changed(&dir.join(format!("{variant}.tpl")), content)?;
            }
        }
        let path = self.spec_path(c.id);
        write_if_changed(&path, &render(&spec))?;
        Ok(Some(path))
    }
}

/// A campaign's spec assembled from its configuration, with its variants' template contents.
#[derive(Debug, Clone)]
pub struct Assembled {
    /// The spec.
    pub spec: CampaignSpec,
    /// Variant name → template content given in the configuration.
    pub contents: Vec<(String, String)>,
}

impl WorkspaceSources {
    /// The sender domain for domain id `d`, or why there is none.
    fn sender_domain(&self, ws: &str, d: i64) -> Result<String, String> {
        self.domains.get(&d.to_string()).cloned().ok_or_else(|| {
            format!(
                "domain: {d} is not a sender domain of workspace {ws:?}; known: {}",
                known(self.domains.keys())
            )
        })
    }
}

/// Writes `text` to `path` through a temporary file of this process and call (the API's READY
/// check and the scheduler may write the same spec at once), unless it holds that already (a
/// resumed send must find the same input).
fn write_if_changed(path: &Path, text: &str) -> Result<(), String> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("{}.{n}.tmp", std::process::id()));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// A spec as TOML text (paths as given: relative ones resolve against the specs folder).
pub fn render(spec: &CampaignSpec) -> String {
    let body = toml::to_string(spec).expect("a campaign spec serialises as TOML");
    format!(
        "# Assembled by the campaign service from campaign {}'s send configuration and the\n\
         # operator's {SOURCES_FILE}; rewritten before each send. Edit the configuration instead.\n{body}",
        spec.campaign_id
    )
}

/// Converts a JSON object (the configuration in a JSON body) into TOML text.
pub fn json_to_toml(v: &serde_json::Value) -> Result<String, String> {
    let table = toml::Table::try_from(v).map_err(|e| format!("not representable as TOML: {e}"))?;
    toml::to_string(&table).map_err(|e| format!("not representable as TOML: {e}"))
}

/// A TOML error as one line naming the key (and line) it is about.
fn toml_problem(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or_default();
    let table = text
        .lines()
        .take(line_no)
        .filter_map(|l| {
            let l = l.trim();
            (l.starts_with('[') && l.ends_with(']')).then(|| l.trim_matches(['[', ']']).trim())
        })
        .last();
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty());
    let field = match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (None, Some(k)) => k.to_string(),
        (Some(t), None) => t.to_string(),
        (None, None) => String::new(),
    };
    if field.is_empty() {
        format!("line {line_no}: {}", e.message())
    } else {
        format!("{field} (line {line_no}): {}", e.message())
    }
}

fn known<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::CampaignState;

    const SOURCES: &str = r#"
[workspaces.ws1.output]
store = "store"
[workspaces.ws1.megasys]
hot_folder = "hot"
[workspaces.ws1.sources.customers]
list = 7
input = { type = "csv", path = "customers.csv" }
columns = { email = "email", first_name = "first_name", city = "city" }
[workspaces.ws1.sources.prospects]
input = { type = "parquet", path = "prospects.parquet" }
columns = { email = "mail", last_name = "surname" }
[workspaces.ws1.suppression_lists.legal]
path = "legal.csv"
reason = "blocklist"
[workspaces.ws1.domains]
3 = "news.example.com"
[workspaces.ws2.output]
store = "store2"
[workspaces.ws2.sources.secret]
input = { type = "csv", path = "ws2.csv" }
columns = { email = "email", first_name = "first_name" }
"#;

    fn configs() -> (tempfile::TempDir, SendConfigs) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SOURCES_FILE), SOURCES).unwrap();
        let c = SendConfigs::new(dir.path());
        (dir, c)
    }

    fn campaign(ws: &str, list: Option<i64>) -> Campaign {
        Campaign {
            id: 12,
            workspace_id: ws.into(),
            name: "c".into(),
            domain: None,
            list,
            segments: Vec::new(),
            state: CampaignState::Draft,
            when: None,
            event_callback: None,
            created_at: 0,
            updated_at: 0,
            send_spec: None,
            default_sending: None,
        }
    }

    const OK: &str = r#"channel = "email"
suppression = ["legal"]
holdout_percent = 5
[[variants]]
name = "A"
weight = 2
template = "t_a"
content = "Hi {{first_name}} in {{city}}"
[[variants]]
name = "B"
weight = 1
template = "t_b"
"#;

    #[test]
    fn a_configuration_is_assembled_with_the_campaigns_ids_and_the_operators_parts() {
        let (dir, configs) = configs();
        let c = campaign("ws1", Some(7));
        let a = configs.assemble(&c, OK).unwrap();
        let s = &a.spec;
        assert_eq!(
            (s.campaign_id.as_str(), s.workspace_id.as_str()),
            ("12", "ws1")
        );
        assert!(
            matches!(&s.source, SourceSpec::Csv(csv) if csv.path == Path::new("customers.csv"))
        );
        assert_eq!(s.columns.city.as_deref(), Some("city"));
        assert_eq!(s.output.store, Path::new("store"));
        assert_eq!(s.suppression.len(), 1);
        assert_eq!(s.suppression[0].path, Path::new("legal.csv"));
        assert_eq!(s.holdout_percent, 5.0);
        assert_eq!(
            s.variants[0].content.as_deref(),
            Some(Path::new("12.api/A.tpl"))
        );
        assert_eq!(s.variants[1].content, None);
        assert_eq!(
            a.contents,
            vec![("A".to_string(), "Hi {{first_name}} in {{city}}".to_string())]
        );

        // written for the send, it loads as the same spec, and its template beside it
        let stored = Campaign {
            send_spec: Some(OK.into()),
            ..c.clone()
        };
        let path = configs.write_spec(&stored).unwrap().unwrap();
        assert_eq!(path, dir.path().join("12.api.toml"));
        let loaded = CampaignSpec::load(&path).unwrap();
        assert_eq!(render(&loaded), render(s));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("12.api/A.tpl")).unwrap(),
            "Hi {{first_name}} in {{city}}"
        );
        // a named source instead of the list's, with columns of the configuration's own
        let named = "channel = \"email\"\nsource = \"prospects\"\n[[variants]]\nname = \"A\"\nweight = 1\ntemplate = \"t\"\n";
        let s = configs
            .assemble(&campaign("ws1", None), named)
            .unwrap()
            .spec;
        assert!(
            matches!(&s.source, SourceSpec::Parquet(p) if p.path == Path::new("prospects.parquet"))
        );
        assert_eq!(s.columns.email.as_deref(), Some("mail"));
        // a campaign without a configuration has nothing to write
        assert_eq!(configs.write_spec(&c).unwrap(), None);
    }

    #[test]
    fn every_problem_is_named() {
        let (_dir, configs) = configs();
        let c = campaign("ws1", Some(7));
        let problems = |text: &str, c: &Campaign| configs.assemble(c, text).unwrap_err();
        let p = problems("campaign_id = \"x\"\noutput = { store = \"/etc\" }\n", &c);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with("campaign_id is the campaign's id"),
            "{p:?}"
        );
        assert!(
            p[1].starts_with("output is set for the workspace by the operator"),
            "{p:?}"
        );

        let p = problems(
            "channel = \"email\"\nholdout_percent = \"lots\"\nvariants = []\n",
            &c,
        );
        assert_eq!(
            p,
            ["holdout_percent (line 2): invalid type: string \"lots\", expected f64"]
        );
        let p = problems(
            "channel = \"email\"\n[[variants]]\nname = \"A\"\nweight = 1\ntemplate = \"t\"\nwidth = 3\n",
            &c,
        );
        assert!(
            p[0].starts_with("variants.width (line 6): unknown field `width`"),
            "{p:?}"
        );

        let p = problems(
            "channel = \"email\"\nsource = \"secret\"\nsuppression = [\"gdpr\"]\nprinter = \"lob\"\n[[variants]]\nname = \"A\"\nweight = 0\ntemplate = \"t\"\n",
            &c,
        );
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with("suppression[0]: \"gdpr\" is not a suppression list of workspace \"ws1\"; known: legal"), "{p:?}");
        assert!(
            p[1].starts_with("printer: \"lob\" is not a printer"),
            "{p:?}"
        );
        // another workspace's source is not known here
        assert_eq!(
            p[2],
            "source: \"secret\" is not a source of workspace \"ws1\"; known: customers, prospects"
        );

        let body = "channel = \"email\"\n[[variants]]\nname = \"A\"\nweight = 0\ntemplate = \"t\"\ncontent = \"{{voucher}}\"\n";
        let p = problems(
            body,
            &Campaign {
                domain: Some(4),
                ..c.clone()
            },
        );
        assert_eq!(
            p,
            [
                "variants[0].content: template t: line 1: unknown merge tag {{voucher}}",
                "domain: 4 is not a sender domain of workspace \"ws1\"; known: 3",
                "variants[0].weight must be greater than 0",
            ]
        );
        let fine =
            "channel = \"email\"\n[[variants]]\nname = \"A\"\nweight = 1\ntemplate = \"t\"\n";
        let p = problems(fine, &campaign("ws1", Some(8)));
        assert!(
            p[0].starts_with("source: campaign 12's list 8 is not served by any source"),
            "{p:?}"
        );
        let p = problems(fine, &campaign("ws1", None));
        assert!(
            p[0].contains("campaign 12 has no list to take it from"),
            "{p:?}"
        );
        let p = problems(fine, &campaign("ws3", Some(7)));
        assert!(
            p[0].starts_with("source: workspace \"ws3\" has no sources defined by the operator"),
            "{p:?}"
        );
        // the mail channel's own needs come from the spec validator
        let p = problems(
            "channel = \"mail\"\n[[variants]]\nname = \"A\"\nweight = 1\ntemplate = \"t\"\n",
            &c,
        );
        assert!(
            p.iter()
                .any(|m| m == "columns.address1 must be mapped for the mail channel"),
            "{p:?}"
        );
    }

    #[test]
    fn lists_and_domains_resolve_in_their_workspace() {
        let (_dir, configs) = configs();
        assert!(configs.check_list("ws1", 7).is_ok());
        let e = configs.check_list("ws1", 8).unwrap_err();
        assert_eq!(
            e,
            "list 8 is served by no source of workspace \"ws1\" (sources with a `list`: customers)"
        );
        // a workspace the operator did not configure keeps lists as labels
        assert!(configs.check_list("ws9", 8).is_ok());
        assert_eq!(configs.domain("ws1", 3).unwrap(), "news.example.com");
        assert!(configs.domain("ws2", 3).is_err());
        assert_eq!(
            json_to_toml(&serde_json::json!({"channel": "email", "holdout_percent": 5.0})).unwrap(),
            "channel = \"email\"\nholdout_percent = 5.0\n"
        );
    }
}
