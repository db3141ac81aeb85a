//! The recipient model: decisions, reason codes, standard fields and the batch that flows between stages.

use std::sync::Arc;

use arrow_array::{Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field as ArrowField, Schema, SchemaRef};

/// The final (or not yet final) decision for one input recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Decision {
    /// Not decided yet: still flowing through the stages.
    Pending = 0,
    /// Written to exactly one IFUR line (or printer submission).
    Sent = 1,
    /// On a suppression list (hard bounce, unsubscribe, complaint, blocklist).
    Suppressed = 2,
    /// Failed validation or the billing cap.
    Skipped = 3,
    /// Deliberately not sent: control group.
    Holdout = 4,
    /// The input row itself could not be read.
    Errored = 5,
}

impl Decision {
    /// Every decision, in code order.
    pub const ALL: [Decision; 6] = [
        Decision::Pending,
        Decision::Sent,
        Decision::Suppressed,
        Decision::Skipped,
        Decision::Holdout,
        Decision::Errored,
    ];

    /// The lowercase name used in the ledger, the run record and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Pending => "pending",
            Decision::Sent => "sent",
            Decision::Suppressed => "suppressed",
            Decision::Skipped => "skipped",
            Decision::Holdout => "holdout",
            Decision::Errored => "errored",
        }
    }

    /// Parses the name produced by [`Decision::as_str`].
    pub fn parse(s: &str) -> Option<Decision> {
        Decision::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

/// Why a recipient got its decision. Codes are stable: they are stored in the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Reason {
    /// No reason needed (sent, or pending).
    None = 0,
    /// Email channel: the email field is empty.
    MissingEmail = 1,
    /// Email channel: the email is not syntactically valid.
    InvalidEmail = 2,
    /// Neither first nor last name is present.
    MissingName = 3,
    /// A name contains `*`.
    InvalidName = 4,
    /// Mail channel: no address1.
    NoAddress = 5,
    /// Mail channel: no zip.
    MissingZip = 6,
    /// Mail channel: no country.
    MissingCountry = 7,
    /// Mail channel: the country is not one the campaign mails to.
    International = 8,
    /// On a hard-bounce list.
    HardBounce = 9,
    /// On an unsubscribe list.
    Unsubscribed = 10,
    /// On a complaint list.
    Complaint = 11,
    /// On the organisation blocklist.
    Blocklisted = 12,
    /// Past the campaign's billing cap.
    CapExceeded = 13,
    /// In the control group.
    Holdout = 14,
    /// The source row could not be parsed (wrong field count and the like).
    MalformedRow = 15,
    /// A field is not valid UTF-8.
    InvalidUtf8 = 16,
    /// The recipient key (email, or account number for mail) is empty.
    MissingKey = 17,
    /// Mail channel: the printer's approval rules refused the address (details list each rule).
    PrinterApprovalFailed = 18,
    /// Mail channel: the creative could not be rendered (a merge tag without a value).
    CouldNotGenerateCreative = 19,
    /// Mail channel: the printer refused the mailpiece (a 4xx such as 422).
    PrinterRejected = 20,
    /// Mail channel: the printer could not be reached or kept failing (retries exhausted).
    PrinterFailed = 21,
    /// Mail channel: no address1, and the enrichment provider found none.
    EnrichmentFailed = 22,
    /// An earlier valid row of the run has the same recipient key (or household); the detail
    /// names that row.
    Duplicate = 23,
    /// An earlier run of the campaign already sent to this key (`--exclude-sent`); the detail
    /// names that run.
    AlreadySent = 24,
    /// On the repeated-soft-bounce list of the store's suppression snapshot.
    SoftBounceRepeated = 25,
}

impl Reason {
    /// Every reason, in code order.
    pub const ALL: [Reason; 26] = [
        Reason::None,
        Reason::MissingEmail,
        Reason::InvalidEmail,
        Reason::MissingName,
        Reason::InvalidName,
        Reason::NoAddress,
        Reason::MissingZip,
        Reason::MissingCountry,
        Reason::International,
        Reason::HardBounce,
        Reason::Unsubscribed,
        Reason::Complaint,
        Reason::Blocklisted,
        Reason::CapExceeded,
        Reason::Holdout,
        Reason::MalformedRow,
        Reason::InvalidUtf8,
        Reason::MissingKey,
        Reason::PrinterApprovalFailed,
        Reason::CouldNotGenerateCreative,
        Reason::PrinterRejected,
        Reason::PrinterFailed,
        Reason::EnrichmentFailed,
        Reason::Duplicate,
        Reason::AlreadySent,
        Reason::SoftBounceRepeated,
    ];

    /// The snake_case code stored in the ledger (empty for [`Reason::None`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::None => "",
            Reason::MissingEmail => "missing_email",
            Reason::InvalidEmail => "invalid_email",
            Reason::MissingName => "missing_name",
            Reason::InvalidName => "invalid_name",
            Reason::NoAddress => "no_address",
            Reason::MissingZip => "missing_zip",
            Reason::MissingCountry => "missing_country",
            Reason::International => "international",
            Reason::HardBounce => "hard_bounce",
            Reason::Unsubscribed => "unsubscribed",
            Reason::Complaint => "complaint",
            Reason::Blocklisted => "blocklisted",
            Reason::CapExceeded => "cap_exceeded",
            Reason::Holdout => "holdout",
            Reason::MalformedRow => "malformed_row",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::MissingKey => "missing_key",
            Reason::PrinterApprovalFailed => "printer_approval_failed",
            Reason::CouldNotGenerateCreative => "could_not_generate_creative",
            Reason::PrinterRejected => "printer_rejected",
            Reason::PrinterFailed => "printer_failed",
            Reason::EnrichmentFailed => "enrichment_failed",
            Reason::Duplicate => "duplicate",
            Reason::AlreadySent => "already_sent",
            Reason::SoftBounceRepeated => "soft_bounce_repeated",
        }
    }

    /// Parses a code produced by [`Reason::as_str`].
    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// A sentence for `broadside why`.
    pub fn explain(self) -> &'static str {
        match self {
            Reason::None => "no reason recorded",
            Reason::MissingEmail => "the email field is empty after trimming",
            Reason::InvalidEmail => "the email address is not syntactically valid",
            Reason::MissingName => "neither first_name nor last_name is present",
            Reason::InvalidName => "a name contains '*'",
            Reason::NoAddress => "mail needs address1, which is empty",
            Reason::MissingZip => "mail needs a zip, which is empty",
            Reason::MissingCountry => "mail needs a country, which is empty",
            Reason::International => "the country is not in the campaign's mail.countries",
            Reason::HardBounce => "the address hard-bounced before",
            Reason::Unsubscribed => "the recipient unsubscribed",
            Reason::Complaint => "the recipient complained (marked as spam)",
            Reason::Blocklisted => "the recipient is on the organisation blocklist",
            Reason::CapExceeded => "the campaign's billing cap was already reached",
            Reason::Holdout => "the recipient falls in the holdout (control) group",
            Reason::MalformedRow => "the source row could not be parsed",
            Reason::InvalidUtf8 => "a field of the source row is not valid UTF-8",
            Reason::MissingKey => "the recipient key (account_number for mail) is empty",
            Reason::PrinterApprovalFailed => {
                "the printer's approval rules refused the address (the detail lists each rule)"
            }
            Reason::CouldNotGenerateCreative => {
                "the mail creative could not be rendered for this recipient"
            }
            Reason::PrinterRejected => "the printer refused the mailpiece",
            Reason::PrinterFailed => "the printer could not be reached or kept failing",
            Reason::EnrichmentFailed => {
                "mail needs address1; the address enrichment provider found none"
            }
            Reason::Duplicate => {
                "an earlier valid row of this run has the same recipient (the detail names it)"
            }
            Reason::AlreadySent => {
                "an earlier run of this campaign already sent to this recipient (the detail names it)"
            }
            Reason::SoftBounceRepeated => {
                "the address soft-bounced repeatedly (the store's soft-bounce policy)"
            }
        }
    }
}

/// The recipient fields Broadside knows by name. Anything else is a merge field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StdField {
    /// Email address.
    Email,
    /// Given name.
    FirstName,
    /// Family name.
    LastName,
    /// ERP account number.
    AccountNumber,
    /// First address line.
    Address1,
    /// Second address line.
    Address2,
    /// City.
    City,
    /// State or region.
    State,
    /// Postal code.
    Zip,
    /// Country (name or ISO code).
    Country,
}

impl StdField {
    /// Every standard field, in IFUR column order.
    pub const ALL: [StdField; 10] = [
        StdField::Email,
        StdField::FirstName,
        StdField::LastName,
        StdField::AccountNumber,
        StdField::Address1,
        StdField::Address2,
        StdField::City,
        StdField::State,
        StdField::Zip,
        StdField::Country,
    ];

    /// The field's name in the spec's `[columns]` table, in batches and in IFUR headers.
    pub fn name(self) -> &'static str {
        match self {
            StdField::Email => "email",
            StdField::FirstName => "first_name",
            StdField::LastName => "last_name",
            StdField::AccountNumber => "account_number",
            StdField::Address1 => "address1",
            StdField::Address2 => "address2",
            StdField::City => "city",
            StdField::State => "state",
            StdField::Zip => "zip",
            StdField::Country => "country",
        }
    }
}

/// Which fields a campaign's batches carry, and where: built once from the spec, shared by all stages.
#[derive(Debug, Clone)]
pub struct RecipientLayout {
    /// Column index in the batch of each standard field, if mapped.
    std: [Option<usize>; 10],
    /// Names of all columns, in batch order (standard fields first, then merge fields).
    names: Vec<String>,
    schema: SchemaRef,
}

impl RecipientLayout {
    /// Builds a layout from the mapped standard fields and the merge field names, in that order.
    pub fn new(std_fields: &[StdField], merge: &[String]) -> Self {
        let mut std = [None; 10];
        let mut names = Vec::new();
        for f in StdField::ALL {
            if std_fields.contains(&f) {
                std[f as usize] = Some(names.len());
                names.push(f.name().to_string());
            }
        }
        names.extend(merge.iter().cloned());
        let schema = Arc::new(Schema::new(
            names
                .iter()
                .map(|n| ArrowField::new(n, DataType::Utf8, true))
                .collect::<Vec<_>>(),
        ));
        RecipientLayout { std, names, schema }
    }

    /// The batch column of a standard field, if the campaign maps it.
    pub fn index(&self, f: StdField) -> Option<usize> {
        self.std[f as usize]
    }

    /// Column names in batch order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The Arrow schema of the recipient columns (all nullable Utf8).
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

/// A per-row note that explains a decision beyond its reason code (file, line, field, list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowDetail {
    /// Row index within the batch.
    pub row: u32,
    /// Human-readable detail, naming file, line and field where relevant.
    pub text: String,
}

/// Variant index meaning "no variant" (suppressed, skipped, errored).
pub const NO_VARIANT: u8 = u8::MAX;
/// Variant index meaning "holdout group".
pub const HOLDOUT_VARIANT: u8 = u8::MAX - 1;

/// The keys of a batch's sendable rows (pending, with a variant, key present), in row order,
/// as the body of one compressed Parquet data page: `DELTA_LENGTH_BYTE_ARRAY` (the lengths
/// `DELTA_BINARY_PACKED`, then the values back to back) in one LZ4 block, without definition
/// levels. Made once on a worker, the block becomes a data page of both the recipient log's
/// `key` column and the submitted events' `email` column, which hold these keys in this
/// order, so each address is compressed once rather than once per file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackedKeys {
    /// Batch rows whose keys the block holds, ascending.
    pub rows: Vec<u32>,
    /// The LZ4 block.
    pub block: Vec<u8>,
    /// Length of the page body before compression.
    pub raw_len: usize,
}

/// The unit of flow: a few thousand recipients as Arrow columns plus their decisions so far.
#[derive(Debug, Clone)]
pub struct RecipientBatch {
    /// Position of the batch in the source stream; outputs are ordered by it.
    pub seq: u64,
    /// Input row number (0-based, across the whole source) of the batch's first row.
    pub first_row: u64,
    /// Recipient columns as laid out by [`RecipientLayout`] (Utf8, null = absent).
    pub columns: RecordBatch,
    /// The source already normalised `columns` (every value trimmed, blank values null), so
    /// the validate stage need not look at every value again.
    pub trimmed: bool,
    /// Decision per row.
    pub decisions: Vec<Decision>,
    /// Reason per row.
    pub reasons: Vec<Reason>,
    /// Sparse details, ascending by row.
    pub details: Vec<RowDetail>,
    /// Normalised recipient key per row (set by the normalize stage; null when absent).
    pub keys: Option<StringArray>,
    /// Variant index per row, [`HOLDOUT_VARIANT`] or [`NO_VARIANT`].
    pub variants: Vec<u8>,
    /// For suppressed rows: index of the suppression list that matched.
    pub lists: Vec<u16>,
    /// Encoded output lines (IFUR detail records) of the rows that will be sent, back to back.
    pub payload: Vec<u8>,
    /// End offset in `payload` of each row's line (a row without a line has an empty range).
    pub payload_ends: Vec<u32>,
    /// The sendable rows' keys, compressed for the Parquet sinks (email sends only).
    pub packed_keys: Option<PackedKeys>,
    /// Where each sent row went: index into `placement_files`, or `u32::MAX`.
    pub placement_file: Vec<u32>,
    /// 1-based line within that file.
    pub placement_line: Vec<u32>,
    /// File names referenced by `placement_file`.
    pub placement_files: Vec<Arc<str>>,
    /// Mail channel with a printer: each row's recipient state name (`Sent`, `Skipped`, ...);
    /// empty otherwise.
    pub mail_states: Vec<&'static str>,
    /// Mail channel with a printer: the printer's id for each mailed row; empty otherwise.
    pub printer_ids: Vec<Option<Box<str>>>,
    /// Rows decided `duplicate`, ascending, with the earlier row each repeats.
    pub duplicates: Vec<DuplicateRow>,
}

/// A batch row found to repeat an earlier row: `(row in batch, input position of the earliest
/// occurrence, the positions the worker compared with)`; the ordered path turns it into the
/// ledger's detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateRow {
    /// Row within the batch.
    pub row: u32,
    /// Input position (batch sequence and row) of the earlier occurrence it repeats.
    pub first: u64,
    /// The smallest positions the table held for each fingerprint when the worker looked.
    pub(crate) seen: [Option<u64>; 2],
}

impl RecipientBatch {
    /// Wraps freshly read columns: every row pending.
    pub fn new(seq: u64, first_row: u64, columns: RecordBatch) -> Self {
        let n = columns.num_rows();
        RecipientBatch {
            seq,
            first_row,
            columns,
            trimmed: false,
            decisions: vec![Decision::Pending; n],
            reasons: vec![Reason::None; n],
            details: Vec::new(),
            keys: None,
            variants: vec![NO_VARIANT; n],
            lists: Vec::new(),
            payload: Vec::new(),
            payload_ends: Vec::new(),
            packed_keys: None,
            placement_file: Vec::new(),
            placement_line: Vec::new(),
            placement_files: Vec::new(),
            mail_states: Vec::new(),
            printer_ids: Vec::new(),
            duplicates: Vec::new(),
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.decisions.len()
    }

    /// True when the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty()
    }

    /// True when row `i` will be sent unless the ordered stages decide otherwise (billing
    /// cap, printer): still pending, and given a variant rather than the holdout.
    #[inline]
    pub fn sendable(&self, i: usize) -> bool {
        self.decisions[i] == Decision::Pending && self.variants[i] < HOLDOUT_VARIANT
    }

    /// Decides a pending row; rows already decided keep their first decision.
    #[inline]
    pub fn decide(&mut self, row: usize, decision: Decision, reason: Reason) -> bool {
        if self.decisions[row] == Decision::Pending {
            self.decisions[row] = decision;
            self.reasons[row] = reason;
            true
        } else {
            false
        }
    }

    /// A column as strings, by batch index.
    pub fn column(&self, idx: usize) -> &StringArray {
        self.columns
            .column(idx)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("recipient columns are Utf8")
    }

    /// The detail text for a row, if any.
    pub fn detail(&self, row: usize) -> Option<&str> {
        self.details
            .binary_search_by_key(&(row as u32), |d| d.row)
            .ok()
            .map(|i| self.details[i].text.as_str())
    }

    /// Adds a detail for a row, keeping `details` ascending (a row keeps its first detail).
    pub fn add_detail(&mut self, row: usize, text: String) {
        let row = row as u32;
        if let Err(at) = self.details.binary_search_by_key(&row, |d| d.row) {
            self.details.insert(at, RowDetail { row, text });
        }
    }

    /// The encoded output line of a row (empty when it has none).
    pub fn payload_line(&self, row: usize) -> &[u8] {
        if self.payload_ends.is_empty() {
            return &[];
        }
        let start = if row == 0 {
            0
        } else {
            self.payload_ends[row - 1] as usize
        };
        &self.payload[start..self.payload_ends[row] as usize]
    }

    /// Where a sent row went: file name and 1-based line.
    pub fn placement(&self, row: usize) -> Option<(&str, u32)> {
        let f = *self.placement_file.get(row)?;
        (f != u32::MAX).then(|| (&*self.placement_files[f as usize], self.placement_line[row]))
    }

    /// The normalised key of a row, if present.
    pub fn key(&self, row: usize) -> Option<&str> {
        let keys = self.keys.as_ref()?;
        keys.is_valid(row).then(|| keys.value(row))
    }
}
