//! Deterministic synthetic recipients and suppression lists, for examples, tests and benchmarks.
//!
//! Row `i` depends only on `(seed, i)`, so a generated file, a synthetic source and a
//! suppression list built for it always agree, whatever the batch size or thread count.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::StringBuilder;
use arrow_array::{ArrayRef, RecordBatch};
use broadside_pipeline::model::{RecipientBatch, RecipientLayout};
use broadside_pipeline::runner::{Source, SourceItem};
use broadside_pipeline::{Error, Result};

use crate::{SizeHint, BATCH_ROWS};

const FIRST: &[&str] = &[
    "Ann", "Ben", "Cara", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi",
    "Luca", "Maya", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera",
    "Wen", "Xena", "Yusuf", "Zoe", "Amir", "Bea", "Chloé", "Dmitri", "Eva", "Finn", "Gita", "Hugo",
    "Isla", "Jae", "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya", "Rafael", "Sofia", "Tomás",
    "Uma", "Viktor", "Willa", "Yara", "Zane",
];
const LAST: &[&str] = &[
    "Smith", "Garcia", "Nguyen", "Okafor", "Müller", "Rossi", "Kowalski", "Tanaka", "Silva",
    "Khan", "Johnson", "Lee", "Brown", "Martin", "Dubois", "Ivanova", "O'Brien", "Haddad",
    "Larsen", "Costa", "Novak", "Schmidt", "Patel", "Kim", "Lopez", "Wilson", "Moreau", "Fischer",
    "Andersen", "Sato", "Mendes", "Popescu", "Yilmaz", "Cohen", "Jensen", "Walker", "Young",
    "Hall", "Allen", "King",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "mail.example.org",
    "inbox.example.net",
    "post.example.io",
    "example.co.uk",
    "corp.example.com",
];
const STREETS: &[&str] = &[
    "Main St",
    "Oak Ave",
    "Pine Rd",
    "Maple Dr",
    "Cedar Ln",
    "Elm St",
    "Lake View Blvd",
    "Hillcrest Rd",
    "Sunset Ave",
    "River Rd",
    "Park Pl",
    "Washington St",
];
const CITIES: &[(&str, &str, &str)] = &[
    ("Springfield", "IL", "62701"),
    ("Portland", "OR", "97201"),
    ("Austin", "TX", "73301"),
    ("Denver", "CO", "80202"),
    ("Madison", "WI", "53703"),
    ("Raleigh", "NC", "27601"),
    ("Boise", "ID", "83702"),
    ("Albany", "NY", "12207"),
    ("Tucson", "AZ", "85701"),
    ("Omaha", "NE", "68102"),
];

/// Names of the columns generated files carry, in order.
pub const COLUMNS: [&str; 11] = [
    "email",
    "first_name",
    "last_name",
    "account_number",
    "address1",
    "address2",
    "city",
    "state",
    "zip",
    "country",
    "points",
];

#[inline]
fn mix(mut z: u64) -> u64 {
    // splitmix64 finaliser.
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[inline]
fn pick<'a>(list: &[&'a str], h: u64) -> &'a str {
    list[(h % list.len() as u64) as usize]
}

/// Kinds of deliberately bad rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    /// A clean row.
    None,
    /// Email without `@`.
    BadEmail,
    /// Blank email.
    NoEmail,
    /// `*` in the first name.
    StarName,
    /// Neither first nor last name.
    NoName,
    /// Blank address1.
    NoAddress,
    /// Non-US country.
    Foreign,
}

/// Generates recipient `i` of a seeded population.
#[derive(Debug, Clone)]
pub struct Generator {
    seed: u64,
    invalid_per_million: u64,
    duplicate_per_million: u64,
}

/// One generated recipient (borrowing reusable buffers).
#[derive(Debug, Default, Clone)]
pub struct Row {
    /// Values in [`COLUMNS`] order.
    pub fields: [String; 11],
}

impl Generator {
    /// A generator; `invalid_share` of rows get one defect.
    pub fn new(seed: u64, invalid_share: f64) -> Self {
        Generator {
            seed,
            invalid_per_million: (invalid_share.clamp(0.0, 1.0) * 1_000_000.0) as u64,
            duplicate_per_million: 0,
        }
    }

    /// The same generator where `share` of rows repeat the email of an earlier row (up to
    /// 100 000 rows back), in another case and padding: the same person exported twice.
    pub fn with_duplicates(mut self, share: f64) -> Self {
        self.duplicate_per_million = (share.clamp(0.0, 1.0) * 1_000_000.0) as u64;
        self
    }

    /// The earlier row whose person row `i` repeats, if it is a repeat (never itself one).
    pub fn duplicate_of(&self, i: u64) -> Option<u64> {
        let repeat = |i: u64| -> Option<u64> {
            let h = self.h(i, 4);
            (i > 0 && h % 1_000_000 < self.duplicate_per_million)
                .then(|| i - 1 - (h >> 24) % i.min(100_000))
        };
        let mut at = repeat(i)?;
        while let Some(earlier) = repeat(at) {
            at = earlier;
        }
        Some(at)
    }

    fn h(&self, i: u64, salt: u64) -> u64 {
        mix(self.seed ^ mix(i.wrapping_mul(31).wrapping_add(salt)))
    }

    /// The defect row `i` carries.
    pub fn defect(&self, i: u64) -> Defect {
        let h = self.h(i, 1);
        if h % 1_000_000 >= self.invalid_per_million {
            return Defect::None;
        }
        match (h >> 32) % 6 {
            0 => Defect::BadEmail,
            1 => Defect::NoEmail,
            2 => Defect::StarName,
            3 => Defect::NoName,
            4 => Defect::NoAddress,
            _ => Defect::Foreign,
        }
    }

    /// The email of row `i` as written (mixed case, maybe padded); blank or malformed for defects.
    pub fn email(&self, i: u64, out: &mut String) {
        out.clear();
        // A repeated person has the earlier row's address; only case and padding are its own.
        let person = self.duplicate_of(i).unwrap_or(i);
        let h = self.h(person, 2);
        let look = self.h(i, 2);
        match self.defect(i) {
            Defect::NoEmail => return,
            Defect::BadEmail => {
                out.push_str(pick(FIRST, h));
                out.push('.');
                out.push_str(&i.to_string());
                out.push_str(".at.");
                out.push_str(pick(DOMAINS, h >> 16));
                return;
            }
            _ => {}
        }
        let first = pick(FIRST, h);
        let last = pick(LAST, h >> 8);
        let upper = (look >> 40).is_multiple_of(5);
        let pad = (look >> 44).is_multiple_of(20);
        if pad {
            out.push(' ');
        }
        for (k, part) in [first, last].iter().enumerate() {
            if k > 0 {
                out.push('.');
            }
            for c in part.chars().filter(|c| c.is_ascii_alphabetic()) {
                out.push(if upper { c } else { c.to_ascii_lowercase() });
            }
        }
        out.push('.');
        out.push_str(&person.to_string());
        out.push('@');
        let d = pick(DOMAINS, h >> 16);
        if upper {
            out.push_str(&d.to_ascii_uppercase());
        } else {
            out.push_str(d);
        }
        if pad {
            out.push_str("  ");
        }
    }

    /// The normalised (trimmed, lowercased) email key of row `i`, or `None` if blank.
    pub fn key(&self, i: u64) -> Option<String> {
        let mut s = String::new();
        self.email(i, &mut s);
        let t = s.trim().to_lowercase();
        (!t.is_empty()).then_some(t)
    }

    /// Fills `row` with recipient `i`.
    pub fn row(&self, i: u64, row: &mut Row) {
        let h = self.h(i, 3);
        let d = self.defect(i);
        let f = &mut row.fields;
        let mut email = std::mem::take(&mut f[0]);
        self.email(i, &mut email);
        f[0] = email;
        let h2 = self.h(i, 2);
        for s in f.iter_mut().skip(1) {
            s.clear();
        }
        if d != Defect::NoName {
            f[1].push_str(pick(FIRST, h2));
            if d == Defect::StarName {
                f[1].push('*');
            }
            if !(h >> 8).is_multiple_of(50) {
                f[2].push_str(pick(LAST, h2 >> 8));
            }
        }
        f[3].push_str(&format!("AC{:010}", i + 1));
        if d != Defect::NoAddress {
            f[4].push_str(&format!(
                "{} {}",
                1 + (h >> 12) % 9_999,
                pick(STREETS, h >> 24)
            ));
        }
        if (h >> 30).is_multiple_of(7) {
            f[5].push_str(&format!("Apt {}", 1 + (h >> 34) % 400));
        }
        let (city, state, zip) = CITIES[((h >> 40) % CITIES.len() as u64) as usize];
        f[6].push_str(city);
        f[7].push_str(state);
        f[8].push_str(zip);
        f[9].push_str(if d == Defect::Foreign { "CA" } else { "US" });
        f[10].push_str(&((h >> 48) % 5_000).to_string());
    }

    /// Suppression entry `j` of `total`: with probability `overlap` the email of a generated
    /// recipient (as written, mixed case), otherwise an address outside the population.
    pub fn suppression_email(&self, j: u64, rows: u64, overlap: f64, out: &mut String) {
        let h = mix(self.seed ^ 0x5EED_5EED ^ mix(j));
        if rows > 0 && ((h % 1_000_000) as f64) < overlap * 1_000_000.0 {
            self.email(mix(h) % rows, out);
            if out.trim().is_empty() {
                out.clear();
                out.push_str(&format!("blank{j}@gone.example.com"));
            }
        } else {
            out.clear();
            out.push_str(&format!("gone{j}@bounced.example.com"));
        }
    }
}

/// Writes one CSV field, quoting when it holds a delimiter, quote or newline.
fn write_csv_field(out: &mut Vec<u8>, s: &str) {
    if s.bytes().any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r')) || s.starts_with(' ') {
        out.push(b'"');
        for b in s.bytes() {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(s.as_bytes());
    }
}

/// Writes `rows` recipients as CSV with a header; returns bytes written.
pub fn write_recipients_csv(path: &Path, gen: &Generator, rows: u64) -> Result<u64> {
    let mut file = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).map_err(|e| Error::io(path, e))?,
    );
    let mut buf = Vec::with_capacity(1 << 20);
    buf.extend_from_slice(COLUMNS.join(",").as_bytes());
    buf.push(b'\n');
    let mut row = Row::default();
    let mut written = 0u64;
    for i in 0..rows {
        gen.row(i, &mut row);
        for (k, f) in row.fields.iter().enumerate() {
            if k > 0 {
                buf.push(b',');
            }
            write_csv_field(&mut buf, f);
        }
        buf.push(b'\n');
        if buf.len() >= 1 << 20 {
            file.write_all(&buf).map_err(|e| Error::io(path, e))?;
            written += buf.len() as u64;
            buf.clear();
        }
    }
    file.write_all(&buf).map_err(|e| Error::io(path, e))?;
    written += buf.len() as u64;
    file.flush().map_err(|e| Error::io(path, e))?;
    Ok(written)
}

/// Writes a one-column (`email`) suppression CSV of entries `range` of the generator's list.
pub fn write_suppression_csv(
    path: &Path,
    gen: &Generator,
    range: std::ops::Range<u64>,
    rows: u64,
    overlap: f64,
) -> Result<()> {
    let mut file = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).map_err(|e| Error::io(path, e))?,
    );
    let mut s = String::new();
    let mut buf = b"email\n".to_vec();
    for j in range {
        gen.suppression_email(j, rows, overlap, &mut s);
        write_csv_field(&mut buf, &s);
        buf.push(b'\n');
        if buf.len() >= 1 << 20 {
            file.write_all(&buf).map_err(|e| Error::io(path, e))?;
            buf.clear();
        }
    }
    file.write_all(&buf)
        .and_then(|_| file.flush())
        .map_err(|e| Error::io(path, e))
}

/// Recipients generated on the fly (`source.type = "synthetic"`).
pub struct SyntheticSource {
    gen: Generator,
    rows: u64,
    next: u64,
    /// For each layout column, the generator column it reads.
    columns: Vec<usize>,
    layout: Arc<RecipientLayout>,
}

impl SyntheticSource {
    /// A source of `rows` recipients; mapped column names must be generator columns.
    pub fn new(
        gen: Generator,
        rows: u64,
        mapping: &[(String, String)],
        layout: Arc<RecipientLayout>,
    ) -> Result<Self> {
        let header: Vec<String> = COLUMNS.iter().map(|s| s.to_string()).collect();
        let columns = crate::csv::resolve_columns("synthetic source", &header, mapping)?;
        Ok(SyntheticSource {
            gen,
            rows,
            next: 0,
            columns,
            layout,
        })
    }

    /// Progress information: the configured row count.
    pub fn size_hint(&self) -> SizeHint {
        SizeHint {
            total_rows: Some(self.rows),
            bytes: None,
        }
    }
}

impl Source for SyntheticSource {
    fn describe(&self) -> String {
        format!("synthetic({} rows)", self.rows)
    }

    fn next_batch(&mut self) -> Result<Option<RecipientBatch>> {
        self.next_item()?.map(SourceItem::into_batch).transpose()
    }

    /// Rows are generated on the worker threads: each item is a row range.
    fn next_item(&mut self) -> Result<Option<SourceItem>> {
        if self.next >= self.rows {
            return Ok(None);
        }
        let n = (self.rows - self.next).min(BATCH_ROWS as u64);
        let (first, gen, columns, layout) = (
            self.next,
            self.gen.clone(),
            self.columns.clone(),
            self.layout.clone(),
        );
        self.next += n;
        Ok(Some(SourceItem::Raw(Box::new(move || {
            generate_rows(&gen, first, n, &columns, &layout)
        }))))
    }
}

/// Generates rows `first .. first + n` as a batch of the layout's columns.
fn generate_rows(
    gen: &Generator,
    first: u64,
    n: u64,
    columns: &[usize],
    layout: &RecipientLayout,
) -> Result<RecipientBatch> {
    let mut builders: Vec<StringBuilder> = columns
        .iter()
        .map(|_| StringBuilder::with_capacity(n as usize, n as usize * 12))
        .collect();
    let mut row = Row::default();
    for i in first..first + n {
        gen.row(i, &mut row);
        for (b, &c) in builders.iter_mut().zip(columns) {
            b.append_value(&row.fields[c]);
        }
    }
    let arrays: Vec<ArrayRef> = builders
        .iter_mut()
        .map(|b| Arc::new(b.finish()) as ArrayRef)
        .collect();
    let cols = RecordBatch::try_new(layout.schema(), arrays)
        .map_err(|e| Error::source("synthetic source", e.to_string()))?;
    Ok(RecipientBatch::new(0, first, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_deterministic_and_emails_unique() {
        let g = Generator::new(7, 0.1);
        let mut a = Row::default();
        let mut b = Row::default();
        g.row(123, &mut a);
        g.row(123, &mut b);
        assert_eq!(a.fields, b.fields);
        let keys: std::collections::HashSet<String> = (0..5_000).filter_map(|i| g.key(i)).collect();
        let with_email = (0..5_000).filter(|i| g.key(*i).is_some()).count();
        assert_eq!(keys.len(), with_email);
    }

    #[test]
    fn duplicates_repeat_an_earlier_persons_key() {
        let g = Generator::new(5, 0.0).with_duplicates(0.01);
        let mut repeats = 0;
        for i in 0..50_000 {
            if let Some(j) = g.duplicate_of(i) {
                assert!(j < i);
                assert_eq!(g.duplicate_of(j), None);
                assert_eq!(g.key(i), g.key(j));
                repeats += 1;
            }
        }
        assert!(
            (350..650).contains(&repeats),
            "{repeats} repeats in 50 000 rows"
        );
        let keys: std::collections::HashSet<_> = (0..50_000).filter_map(|i| g.key(i)).collect();
        assert_eq!(keys.len(), 50_000 - repeats);
    }

    #[test]
    fn invalid_share_is_roughly_respected() {
        let g = Generator::new(1, 0.05);
        let bad = (0..100_000)
            .filter(|i| g.defect(*i) != Defect::None)
            .count();
        assert!((4_000..6_000).contains(&bad), "{bad}");
        let g = Generator::new(1, 0.0);
        assert!((0..10_000).all(|i| g.defect(i) == Defect::None));
    }

    #[test]
    fn suppression_overlap_hits_recipients() {
        let g = Generator::new(3, 0.0);
        let rows = 10_000;
        let keys: std::collections::HashSet<String> = (0..rows).filter_map(|i| g.key(i)).collect();
        let mut s = String::new();
        let hits = (0..2_000)
            .filter(|j| {
                g.suppression_email(*j, rows, 0.5, &mut s);
                keys.contains(&s.trim().to_lowercase())
            })
            .count();
        assert!((850..1_150).contains(&hits), "{hits}");
    }
}
