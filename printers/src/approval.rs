//! Per-printer approval rules: checks a recipient's address against what one printer accepts
//! (field lengths, countries, required lines, character set) before any money is spent on
//! proofing. A recipient that fails is `Skipped(PrinterApprovalFailed)`; every failure is
//! returned, not just the first, so the ledger can keep the whole list (`approval_errors`).
//!
//! Rules are plain serde config, one table per printer:
//!
//! ```toml
//! [lob]
//! allowed_countries = ["US"]
//! required = ["address_line1", "address_city", "address_state", "address_zip"]
//! require_name_or_company = true
//! charset = "latin1"
//! us_format = true
//! [lob.max_lengths]
//! name = 40
//! address_line1 = 64
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::address::{Address, AddressField};
use crate::state::{RecipientState, SkipReason};

/// The characters a printer can print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Charset {
    /// Anything.
    Any,
    /// Printable ASCII (space to `~`).
    Ascii,
    /// Printable ISO 8859-1: ASCII plus U+00A0..=U+00FF (accented Western European letters).
    #[default]
    Latin1,
}

impl Charset {
    /// Whether the character is accepted.
    pub fn accepts(self, c: char) -> bool {
        match self {
            Charset::Any => true,
            Charset::Ascii => (' '..='~').contains(&c),
            Charset::Latin1 => (' '..='~').contains(&c) || ('\u{a0}'..='\u{ff}').contains(&c),
        }
    }
}

/// What one printer accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalRules {
    /// Most characters per field (Unicode scalar values); fields not listed are unlimited.
    pub max_lengths: BTreeMap<AddressField, usize>,
    /// ISO 3166 two-letter codes accepted (an absent country counts as `US`); empty accepts all.
    pub allowed_countries: Vec<String>,
    /// Fields that must be present and not blank.
    pub required: Vec<AddressField>,
    /// Whether at least one of `name` and `company` must be present.
    pub require_name_or_company: bool,
    /// Characters accepted in every field.
    pub charset: Charset,
    /// For US addresses, whether the state must be two letters and the ZIP `12345` or
    /// `12345-6789`.
    pub us_format: bool,
}

impl Default for ApprovalRules {
    /// No rule at all: every address passes.
    fn default() -> Self {
        ApprovalRules {
            max_lengths: BTreeMap::new(),
            allowed_countries: Vec::new(),
            required: Vec::new(),
            require_name_or_company: false,
            charset: Charset::Any,
            us_format: false,
        }
    }
}

/// Why a rule rejected an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum RuleFailure {
    /// A required field is absent or blank.
    Missing {
        /// The field.
        field: AddressField,
    },
    /// Neither name nor company is given.
    NameOrCompanyMissing,
    /// A field is longer than the printer allows.
    TooLong {
        /// The field.
        field: AddressField,
        /// Its length in characters.
        len: usize,
        /// The printer's limit.
        max: usize,
    },
    /// The country is not one the printer mails to.
    CountryNotAllowed {
        /// The address's country.
        country: String,
    },
    /// A character the printer cannot print.
    Character {
        /// The field.
        field: AddressField,
        /// The character.
        ch: char,
        /// Its position in the field, in characters from 0.
        at: usize,
    },
    /// A US state that is not two letters.
    UsState {
        /// The value given.
        value: String,
    },
    /// A US ZIP that is not `12345` or `12345-6789`.
    UsZip {
        /// The value given.
        value: String,
    },
}

impl fmt::Display for RuleFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleFailure::Missing { field } => write!(f, "{}: required", field.as_str()),
            RuleFailure::NameOrCompanyMissing => f.write_str("name or company: one is required"),
            RuleFailure::TooLong { field, len, max } => {
                write!(f, "{}: {len} characters, at most {max}", field.as_str())
            }
            RuleFailure::CountryNotAllowed { country } => {
                write!(
                    f,
                    "address_country: {country} is not mailed by this printer"
                )
            }
            RuleFailure::Character { field, ch, at } => write!(
                f,
                "{}: character {ch:?} (U+{:04X}) at {at} cannot be printed",
                field.as_str(),
                *ch as u32
            ),
            RuleFailure::UsState { value } => {
                write!(f, "address_state: {value:?} is not a two-letter US state")
            }
            RuleFailure::UsZip { value } => {
                write!(f, "address_zip: {value:?} is not 12345 or 12345-6789")
            }
        }
    }
}

/// The result of checking one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// Every rule passed.
    Approved,
    /// At least one rule failed; all failures, in field order.
    Rejected(Vec<RuleFailure>),
}

impl Approval {
    /// The state a `Pending` recipient moves to: none when approved (it stays Pending and goes
    /// on to proofing), `Skipped(PrinterApprovalFailed)` when rejected.
    pub fn rejection_state(&self) -> Option<RecipientState> {
        match self {
            Approval::Approved => None,
            Approval::Rejected(_) => {
                Some(RecipientState::skipped(SkipReason::PrinterApprovalFailed))
            }
        }
    }

    /// The failures as the text list kept in the ledger (`approval_errors`).
    pub fn errors(&self) -> Vec<String> {
        match self {
            Approval::Approved => Vec::new(),
            Approval::Rejected(f) => f.iter().map(ToString::to_string).collect(),
        }
    }
}

impl ApprovalRules {
    /// Lob, US mail: Lob's documented limits for US addresses (name and company 40 characters,
    /// address lines 64, city 200, two-letter state, ZIP or ZIP+4) and Latin-1 text.
    pub fn lob_us() -> ApprovalRules {
        use AddressField as F;
        ApprovalRules {
            max_lengths: [
                (F::Name, 40),
                (F::Company, 40),
                (F::AddressLine1, 64),
                (F::AddressLine2, 64),
                (F::AddressCity, 200),
            ]
            .into_iter()
            .collect(),
            allowed_countries: vec!["US".into()],
            required: vec![
                F::AddressLine1,
                F::AddressCity,
                F::AddressState,
                F::AddressZip,
            ],
            require_name_or_company: true,
            charset: Charset::Latin1,
            us_format: true,
        }
    }

    /// Reports every problem with the rules themselves at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        for (field, max) in &self.max_lengths {
            if *max == 0 {
                p.push(format!(
                    "max_lengths.{}: must be at least 1",
                    field.as_str()
                ));
            }
        }
        for c in &self.allowed_countries {
            if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                p.push(format!(
                    "allowed_countries: {c:?} is not a two-letter upper-case ISO 3166 code"
                ));
            }
        }
        for (i, f) in self.required.iter().enumerate() {
            if self.required[..i].contains(f) {
                p.push(format!("required: {} is listed twice", f.as_str()));
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }

    /// Checks one address against every rule.
    pub fn evaluate(&self, address: &Address) -> Approval {
        let mut failures = Vec::new();
        for field in &self.required {
            if address.get(*field).is_none() {
                failures.push(RuleFailure::Missing { field: *field });
            }
        }
        if self.require_name_or_company
            && address.get(AddressField::Name).is_none()
            && address.get(AddressField::Company).is_none()
        {
            failures.push(RuleFailure::NameOrCompanyMissing);
        }
        let country = address.country();
        if !self.allowed_countries.is_empty()
            && !self
                .allowed_countries
                .iter()
                .any(|c| c.eq_ignore_ascii_case(country))
        {
            failures.push(RuleFailure::CountryNotAllowed {
                country: country.to_string(),
            });
        }
        for field in AddressField::ALL {
            let Some(value) = address.get(field) else {
                continue;
            };
            if let Some(max) = self.max_lengths.get(&field) {
                let len = value.chars().count();
                if len > *max {
                    failures.push(RuleFailure::TooLong {
                        field,
                        len,
                        max: *max,
                    });
                }
            }
            // One failure per field is enough to find the problem; a line of CJK text would
            // otherwise list every character.
            if let Some((at, ch)) = value
                .chars()
                .enumerate()
                .find(|(_, c)| !self.charset.accepts(*c))
            {
                failures.push(RuleFailure::Character { field, ch, at });
            }
        }
        if self.us_format && country.eq_ignore_ascii_case("US") {
            if let Some(state) = address.get(AddressField::AddressState) {
                if !(state.len() == 2 && state.bytes().all(|b| b.is_ascii_alphabetic())) {
                    failures.push(RuleFailure::UsState {
                        value: state.to_string(),
                    });
                }
            }
            if let Some(zip) = address.get(AddressField::AddressZip) {
                if !is_us_zip(zip) {
                    failures.push(RuleFailure::UsZip {
                        value: zip.to_string(),
                    });
                }
            }
        }
        if failures.is_empty() {
            Approval::Approved
        } else {
            Approval::Rejected(failures)
        }
    }
}

fn is_us_zip(zip: &str) -> bool {
    let b = zip.as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    match b.len() {
        5 => digits(b),
        10 => digits(&b[..5]) && b[5] == b'-' && digits(&b[6..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressField as F;

    fn good() -> Address {
        Address {
            name: Some("Harry Zhang".into()),
            address_line1: Some("210 King St".into()),
            address_city: Some("San Francisco".into()),
            address_state: Some("CA".into()),
            address_zip: Some("94107".into()),
            address_country: Some("US".into()),
            ..Address::default()
        }
    }

    #[test]
    fn approval_table() {
        let lob = ApprovalRules::lob_us();
        type Edit = fn(&mut Address);
        let cases: Vec<(&str, Edit, Vec<RuleFailure>)> = vec![
            ("valid", |_| {}, vec![]),
            (
                "zip+4",
                |a| a.address_zip = Some("94107-1234".into()),
                vec![],
            ),
            (
                "country defaults to US",
                |a| a.address_country = None,
                vec![],
            ),
            (
                "Latin-1 accents are fine",
                |a| a.name = Some("Zoë Ångström".into()),
                vec![],
            ),
            (
                "company instead of name",
                |a| {
                    a.name = None;
                    a.company = Some("Lob".into())
                },
                vec![],
            ),
            (
                "no address line",
                |a| a.address_line1 = Some("   ".into()),
                vec![RuleFailure::Missing {
                    field: F::AddressLine1,
                }],
            ),
            (
                "no name or company",
                |a| a.name = None,
                vec![RuleFailure::NameOrCompanyMissing],
            ),
            (
                "line too long",
                |a| a.address_line1 = Some("x".repeat(65)),
                vec![RuleFailure::TooLong {
                    field: F::AddressLine1,
                    len: 65,
                    max: 64,
                }],
            ),
            (
                "limit is in characters, not bytes",
                |a| a.name = Some("é".repeat(40)),
                vec![],
            ),
            (
                "country not mailed",
                |a| a.address_country = Some("NO".into()),
                vec![RuleFailure::CountryNotAllowed {
                    country: "NO".into(),
                }],
            ),
            (
                "outside Latin-1",
                |a| a.address_city = Some("Łódź".into()),
                vec![RuleFailure::Character {
                    field: F::AddressCity,
                    ch: 'Ł',
                    at: 0,
                }],
            ),
            (
                "control character",
                |a| a.address_line2 = Some("Apt\t4".into()),
                vec![RuleFailure::Character {
                    field: F::AddressLine2,
                    ch: '\t',
                    at: 3,
                }],
            ),
            (
                "bad state and zip",
                |a| {
                    a.address_state = Some("Calif".into());
                    a.address_zip = Some("9410".into())
                },
                vec![
                    RuleFailure::UsState {
                        value: "Calif".into(),
                    },
                    RuleFailure::UsZip {
                        value: "9410".into(),
                    },
                ],
            ),
        ];
        for (name, edit, want) in cases {
            let mut a = good();
            edit(&mut a);
            let got = lob.evaluate(&a);
            let want = if want.is_empty() {
                Approval::Approved
            } else {
                Approval::Rejected(want)
            };
            assert_eq!(got, want, "case {name:?}");
        }
    }

    #[test]
    fn every_failure_is_reported() {
        let a = Address {
            name: Some("x".repeat(41)),
            address_line1: Some("Øvre gate 1\u{2603}".into()),
            address_country: Some("NO".into()),
            ..Address::default()
        };
        let approval = ApprovalRules::lob_us().evaluate(&a);
        assert_eq!(
            approval.rejection_state(),
            Some(RecipientState::skipped(SkipReason::PrinterApprovalFailed))
        );
        let errors = approval.errors();
        assert_eq!(
            errors,
            vec![
                "address_city: required",
                "address_state: required",
                "address_zip: required",
                "address_country: NO is not mailed by this printer",
                "name: 41 characters, at most 40",
                "address_line1: character '☃' (U+2603) at 11 cannot be printed",
            ],
        );
        assert_eq!(ApprovalRules::lob_us().evaluate(&good()).errors().len(), 0);
        assert_eq!(
            ApprovalRules::lob_us().evaluate(&good()).rejection_state(),
            None
        );
    }

    #[test]
    fn charsets() {
        assert!(Charset::Ascii.accepts('~') && !Charset::Ascii.accepts('é'));
        assert!(Charset::Latin1.accepts('é') && Charset::Latin1.accepts('\u{a0}'));
        assert!(!Charset::Latin1.accepts('\u{7f}') && !Charset::Latin1.accepts('\u{9f}'));
        assert!(!Charset::Latin1.accepts('€'));
        assert!(Charset::Any.accepts('€'));
    }

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../approval.example.toml");
        let printers: BTreeMap<String, ApprovalRules> = toml::from_str(text).unwrap();
        assert_eq!(printers.len(), 2);
        for (name, rules) in &printers {
            rules.validate().unwrap_or_else(|p| panic!("{name}: {p:?}"));
        }
        assert_eq!(printers["lob"], ApprovalRules::lob_us());
        assert_eq!(printers["intelliprint"].allowed_countries, ["GB"]);
    }

    #[test]
    fn validate_lists_every_problem_and_unknown_fields_are_refused() {
        let rules: ApprovalRules = toml::from_str(
            "allowed_countries = [\"usa\", \"GB\"]\nrequired = [\"name\", \"name\"]\n[max_lengths]\ncompany = 0\n",
        )
        .unwrap();
        let problems = rules.validate().unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(toml::from_str::<ApprovalRules>("max_len = 3").is_err());
        assert!(toml::from_str::<ApprovalRules>("charset = \"utf16\"").is_err());
    }

    #[test]
    fn failures_serialize_for_the_ledger() {
        let f = RuleFailure::TooLong {
            field: F::Name,
            len: 41,
            max: 40,
        };
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"rule":"too_long","field":"name","len":41,"max":40}"#
        );
    }
}
