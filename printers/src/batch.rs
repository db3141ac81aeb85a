//! The batch-file printer (IntelliPrint-style): recipients are written to CSV batches of
//! `batch_size` rows dropped in a folder the printer collects, then a manifest listing every
//! batch is written last; the printer starts on a run only once its manifest is there.
//!
//! Every file is written to a hidden temp name in the same folder, fsynced, renamed into
//! place and the folder fsynced, so the printer never sees a partial file. Names are
//! deterministic per campaign, run and batch number: rewriting a batch after a crash replaces
//! it whole. The CSV is RFC 4180: a header row, CRLF line ends, fields holding `,`, `"`, CR or
//! LF quoted with `"` doubled. Columns: `idempotency_key` (the recipient's key in this run,
//! [`crate::lob::IdempotencyKey::derive`]: a re-dropped batch of the run repeats it, another
//! run never does), the address fields in Lob's names, then the campaign's merge fields in the
//! order configured.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::address::{Address, AddressField};
use crate::error::{Error, Result};
use crate::lob::IdempotencyKey;

/// Settings of a batch-file printer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// The folder the printer collects from.
    pub folder: PathBuf,
    /// Recipients per CSV file (default 500).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_batch_size() -> usize {
    500
}

/// One batch file written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchFile {
    /// File name within the folder.
    pub name: String,
    /// Recipient rows (the header not counted).
    pub rows: usize,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

/// The manifest, written last: `{campaign}-{run}.manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The campaign.
    pub campaign: String,
    /// The run.
    pub run: String,
    /// Every batch, in order.
    pub files: Vec<BatchFile>,
    /// Recipient rows over all files.
    pub total_rows: usize,
}

/// Writes one run's recipients as CSV batches plus a manifest.
#[derive(Debug)]
pub struct BatchPrinter {
    cfg: BatchConfig,
    campaign: String,
    run: String,
    merge_fields: Vec<String>,
    /// The current batch's CSV text, header included.
    current: String,
    current_rows: usize,
    files: Vec<BatchFile>,
}

impl BatchPrinter {
    /// A printer for one run; `merge_fields` are the merge-variable columns, in order.
    pub fn new(
        cfg: BatchConfig,
        campaign: &str,
        run: &str,
        merge_fields: Vec<String>,
    ) -> Result<BatchPrinter> {
        let mut problems = Vec::new();
        if cfg.batch_size == 0 {
            problems.push("batch_size: must be at least 1".to_string());
        }
        if !cfg.folder.is_dir() {
            problems.push(format!("folder: {} is not a folder", cfg.folder.display()));
        }
        for (what, v) in [("campaign", campaign), ("run", run)] {
            if v.is_empty()
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            {
                problems.push(format!(
                    "{what}: {v:?} must be letters, digits, '-' or '_' (it names files)"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(Error::Config {
                what: "batch printer".into(),
                problems,
            });
        }
        Ok(BatchPrinter {
            cfg,
            campaign: campaign.into(),
            run: run.into(),
            merge_fields,
            current: String::new(),
            current_rows: 0,
            files: Vec::new(),
        })
    }

    fn header(&self) -> String {
        let mut cols: Vec<&str> = vec!["idempotency_key"];
        cols.extend(AddressField::ALL.iter().map(|f| f.as_str()));
        cols.extend(self.merge_fields.iter().map(String::as_str));
        let mut line = String::new();
        push_row(&mut line, cols);
        line
    }

    /// Adds a recipient; returns the batch file when this row filled one.
    pub fn push(
        &mut self,
        key: &IdempotencyKey,
        to: &Address,
        merge: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<BatchFile>> {
        if self.current_rows == 0 {
            self.current = self.header();
        }
        let merged: Vec<String> = self
            .merge_fields
            .iter()
            .map(|f| match merge.get(f) {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            })
            .collect();
        let mut cols: Vec<&str> = vec![key.as_str()];
        cols.extend(AddressField::ALL.iter().map(|f| to.get(*f).unwrap_or("")));
        cols.extend(merged.iter().map(String::as_str));
        push_row(&mut self.current, cols);
        self.current_rows += 1;
        if self.current_rows == self.cfg.batch_size {
            return self.flush().map(Some);
        }
        Ok(None)
    }

    /// The file the next pushed recipient goes into.
    pub fn current_file(&self) -> String {
        format!(
            "{}-{}-{:05}.csv",
            self.campaign,
            self.run,
            self.files.len() + 1
        )
    }

    fn flush(&mut self) -> Result<BatchFile> {
        let name = self.current_file();
        write_atomically(&self.cfg.folder, &name, self.current.as_bytes())?;
        let file = BatchFile {
            name,
            rows: self.current_rows,
            sha256: hex_sha256(self.current.as_bytes()),
        };
        self.files.push(file.clone());
        self.current.clear();
        self.current_rows = 0;
        Ok(file)
    }

    /// Writes the last, partial batch and then the manifest.
    pub fn finish(mut self) -> Result<Manifest> {
        if self.current_rows > 0 {
            self.flush()?;
        }
        let manifest = Manifest {
            total_rows: self.files.iter().map(|f| f.rows).sum(),
            campaign: self.campaign.clone(),
            run: self.run.clone(),
            files: std::mem::take(&mut self.files),
        };
        let name = format!("{}-{}.manifest.json", self.campaign, self.run);
        let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        write_atomically(&self.cfg.folder, &name, &json)?;
        Ok(manifest)
    }
}

fn push_row<'a>(out: &mut String, cols: impl IntoIterator<Item = &'a str>) {
    for (i, c) in cols.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if c.contains([',', '"', '\r', '\n']) {
            out.push('"');
            out.push_str(&c.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(c);
        }
    }
    out.push_str("\r\n");
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Temp name in the same folder, write, fsync, rename, fsync the folder.
fn write_atomically(folder: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let tmp = folder.join(format!(".{name}.tmp"));
    let target = folder.join(name);
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, &target).map_err(io(&target))?;
    // The rename is durable only once the folder entry is.
    File::open(folder)
        .and_then(|d| d.sync_all())
        .map_err(io(folder))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: usize) -> Address {
        Address {
            name: Some(format!("Ada {i}")),
            address_line1: Some(format!("{i} High St")),
            address_city: Some("London".into()),
            address_zip: Some("N1 9GU".into()),
            address_country: Some("GB".into()),
            ..Address::default()
        }
    }

    fn run1() -> crate::lob::RunScope {
        crate::lob::RunScope {
            workspace_id: "acme".into(),
            campaign_id: "spring".into(),
            run_id: "run1".into(),
        }
    }

    #[test]
    fn batches_of_n_then_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = BatchConfig {
            folder: dir.path().into(),
            batch_size: 3,
        };
        let mut p = BatchPrinter::new(cfg, "spring", "run1", vec!["offer".into()]).unwrap();
        let mut filled = 0;
        for i in 0..7 {
            let mut merge = serde_json::Map::new();
            merge.insert("offer".into(), format!("{i}0% off").into());
            let key = run1().key(&i.to_string(), "letter");
            if p.push(&key, &addr(i), &merge).unwrap().is_some() {
                filled += 1;
            }
        }
        assert_eq!(filled, 2);
        let manifest = p.finish().unwrap();
        assert_eq!(manifest.total_rows, 7);
        let rows: Vec<usize> = manifest.files.iter().map(|f| f.rows).collect();
        assert_eq!(rows, [3, 3, 1]);
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "spring-run1-00001.csv",
                "spring-run1-00002.csv",
                "spring-run1-00003.csv",
                "spring-run1.manifest.json",
            ],
            "no temp file is left behind"
        );
        for f in &manifest.files {
            let bytes = fs::read(dir.path().join(&f.name)).unwrap();
            assert_eq!(hex_sha256(&bytes), f.sha256);
        }
        let last = fs::read_to_string(dir.path().join("spring-run1-00003.csv")).unwrap();
        let key = run1().key("6", "letter");
        assert_eq!(
            last,
            format!(
                "idempotency_key,name,company,address_line1,address_line2,address_city,address_state,address_zip,address_country,offer\r\n\
                 {key},Ada 6,,6 High St,,London,,N1 9GU,GB,60% off\r\n"
            )
        );
        let on_disk: Manifest = serde_json::from_slice(
            &fs::read(dir.path().join("spring-run1.manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(on_disk, manifest);
    }

    #[test]
    fn fields_are_quoted_as_rfc_4180_says() {
        let mut line = String::new();
        push_row(&mut line, ["plain", "a,b", "say \"hi\"", "two\nlines", ""]);
        assert_eq!(line, "plain,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",\r\n");
    }

    #[test]
    fn bad_settings_are_all_reported() {
        let err = BatchPrinter::new(
            BatchConfig {
                folder: "/nonexistent/printer".into(),
                batch_size: 0,
            },
            "spring/../x",
            "",
            vec![],
        )
        .unwrap_err();
        match err {
            Error::Config { problems, .. } => assert_eq!(problems.len(), 4, "{problems:?}"),
            other => panic!("{other}"),
        }
    }
}
