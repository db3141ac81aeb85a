//! Normalize + validate: trims every field, derives the recipient key and skips rows that cannot be sent.

use std::collections::HashSet;
use std::sync::Arc;

use arrow_array::builder::StringBuilder;
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};

use super::Stage;
use crate::error::{Error, Result};
use crate::model::{Decision, Reason, RecipientBatch, RecipientLayout, StdField};
use crate::spec::{CampaignSpec, Channel};
use crate::strings::{is_trimmed, StringColumnBuilder};

/// Trims all strings (empty → null), lowercases the key and applies the channel's validation rules.
#[derive(Debug, Clone)]
pub struct Validator {
    layout: Arc<RecipientLayout>,
    channel: Channel,
    key: StdField,
    /// Upper-cased allowed countries (mail).
    countries: Arc<HashSet<String>>,
}

impl Validator {
    /// Builds the stage for a campaign.
    pub fn new(spec: &CampaignSpec, layout: Arc<RecipientLayout>) -> Self {
        Validator {
            layout,
            channel: spec.channel,
            key: spec.key_field(),
            countries: Arc::new(
                spec.mail
                    .countries
                    .iter()
                    .map(|c| c.trim().to_uppercase())
                    .collect(),
            ),
        }
    }

    fn get<'a>(&self, cols: &'a [StringArray], f: StdField) -> Option<&'a StringArray> {
        self.layout.index(f).map(|i| &cols[i])
    }

    /// The mail channel's address rules, in order: address1, zip, country present, and the
    /// country one the campaign mails to. Also used for addresses filled in later (enrichment).
    pub fn mail_address(
        &self,
        has_address1: bool,
        has_zip: bool,
        country: Option<&str>,
    ) -> Option<Reason> {
        if !has_address1 {
            Some(Reason::NoAddress)
        } else if !has_zip {
            Some(Reason::MissingZip)
        } else {
            match country {
                None => Some(Reason::MissingCountry),
                Some(c) if !self.countries.contains(&c.to_uppercase()) => {
                    Some(Reason::International)
                }
                Some(_) => None,
            }
        }
    }
}

/// Returns the array with every value trimmed and empty values turned into nulls.
/// Already-clean arrays are returned without copying.
pub fn trim_column(a: &StringArray) -> StringArray {
    let needs_work = (0..a.len()).any(|i| a.is_valid(i) && !is_trimmed(a.value(i)));
    if !needs_work {
        return a.clone();
    }
    let mut b = StringColumnBuilder::with_capacity(a.len(), a.value_data().len());
    for i in 0..a.len() {
        if a.is_null(i) {
            b.append_null();
        } else {
            b.append_trimmed(a.value(i), a.value_data());
        }
    }
    b.finish()
}

fn lowercase_keys(a: &StringArray) -> StringArray {
    let data = a.value_data();
    if data.is_ascii() {
        // One pass over the whole buffer; offsets and nulls are unchanged.
        let mut lower = data.to_vec();
        lower.make_ascii_lowercase();
        return StringArray::new(
            a.offsets().clone(),
            arrow_buffer::Buffer::from_vec(lower),
            a.nulls().cloned(),
        );
    }
    let mut b = StringBuilder::with_capacity(a.len(), a.value_data().len());
    let mut buf = String::new();
    for i in 0..a.len() {
        if a.is_null(i) {
            b.append_null();
            continue;
        }
        let v = a.value(i);
        if v.is_ascii() {
            buf.clear();
            buf.push_str(v);
            buf.make_ascii_lowercase();
            b.append_value(&buf);
        } else {
            b.append_value(v.to_lowercase());
        }
    }
    b.finish()
}

/// Bytes allowed in a dot-atom local part besides `.`: atext, and any non-ASCII byte.
const LOCAL_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || b >= 0x80;
        c += 1;
    }
    let special = b"!#$%&'*+/=?^_`{|}~-";
    let mut i = 0;
    while i < special.len() {
        t[special[i] as usize] = true;
        i += 1;
    }
    t
};

/// Bytes allowed in a domain label: letters, digits, hyphen, and any non-ASCII byte.
const LABEL_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || b == b'-' || b >= 0x80;
        c += 1;
    }
    t
};

/// Syntactic email check: one `@`, a dot-atom local part of at most 64 bytes, and a domain of
/// at least two labels (letters, digits, hyphens; no leading or trailing hyphen), 254 bytes in all.
/// Non-ASCII characters are allowed (internationalised addresses).
pub fn is_valid_email(s: &str) -> bool {
    let s = s.as_bytes();
    if s.len() > 254 {
        return false;
    }
    let Some(at) = memchr::memchr(b'@', s) else {
        return false;
    };
    let (local, d) = (&s[..at], &s[at + 1..]);
    if local.len() > 64 {
        return false;
    }
    // Dot-atom: atext characters, no leading, trailing or doubled dots (an empty local part
    // ends "after a dot" and fails too).
    let mut after_dot = true;
    for &b in local {
        if b == b'.' {
            if after_dot {
                return false;
            }
            after_dot = true;
        } else if LOCAL_BYTE[b as usize] {
            after_dot = false;
        } else {
            return false;
        }
    }
    if after_dot {
        return false;
    }
    // Labels are checked in one pass over the bytes, without allocating; a second `@` is
    // not a label byte.
    if d.is_empty() || d.len() > 253 {
        return false;
    }
    let (mut labels, mut start, mut tld_digits) = (0usize, 0usize, true);
    for i in 0..=d.len() {
        if i == d.len() || d[i] == b'.' {
            let label = &d[start..i];
            if label.is_empty()
                || label.len() > 63
                || label[0] == b'-'
                || label[label.len() - 1] == b'-'
            {
                return false;
            }
            if i == d.len() {
                if label.len() < 2 {
                    return false;
                }
                tld_digits = label.iter().all(u8::is_ascii_digit);
            }
            labels += 1;
            start = i + 1;
        } else if !LABEL_BYTE[d[i] as usize] {
            return false;
        }
    }
    labels >= 2 && !tld_digits
}

impl Stage for Validator {
    fn name(&self) -> &'static str {
        "validate"
    }

    fn process(&mut self, batch: &mut RecipientBatch) -> Result<()> {
        let trimmed: Vec<StringArray> = (0..batch.columns.num_columns())
            .map(|i| match batch.trimmed {
                true => batch.column(i).clone(),
                false => trim_column(batch.column(i)),
            })
            .collect();
        let key_col = self.get(&trimmed, self.key).ok_or_else(|| Error::Stage {
            stage: "validate".into(),
            message: format!("key field {} is not in the batch", self.key.name()),
        })?;
        batch.keys = Some(match self.key {
            StdField::Email => lowercase_keys(key_col),
            _ => key_col.clone(),
        });

        let email = self.get(&trimmed, StdField::Email);
        let first = self.get(&trimmed, StdField::FirstName);
        let last = self.get(&trimmed, StdField::LastName);
        let addr = self.get(&trimmed, StdField::Address1);
        let zip = self.get(&trimmed, StdField::Zip);
        let country = self.get(&trimmed, StdField::Country);
        let present = |a: Option<&StringArray>, i: usize| a.is_some_and(|a| a.is_valid(i));

        for i in 0..batch.len() {
            if batch.decisions[i] != Decision::Pending {
                continue;
            }
            let reason = if self.channel == Channel::Email && !present(email, i) {
                Some(Reason::MissingEmail)
            } else if present(email, i)
                && self.channel == Channel::Email
                && !is_valid_email(email.unwrap().value(i))
            {
                Some(Reason::InvalidEmail)
            } else if !present(first, i) && !present(last, i) {
                Some(Reason::MissingName)
            } else if [first, last]
                .into_iter()
                .any(|a| present(a, i) && a.unwrap().value(i).contains('*'))
            {
                Some(Reason::InvalidName)
            } else if self.channel == Channel::Mail {
                self.mail_address(
                    present(addr, i),
                    present(zip, i),
                    country.filter(|c| c.is_valid(i)).map(|c| c.value(i)),
                )
            } else {
                None
            };
            let reason = reason.or_else(|| {
                batch
                    .keys
                    .as_ref()
                    .is_some_and(|k| k.is_null(i))
                    .then_some(Reason::MissingKey)
            });
            if let Some(r) = reason {
                batch.decide(i, Decision::Skipped, r);
            }
        }
        if !batch.trimmed {
            let arrays: Vec<ArrayRef> = trimmed
                .into_iter()
                .map(|a| Arc::new(a) as ArrayRef)
                .collect();
            batch.columns =
                RecordBatch::try_new(batch.columns.schema(), arrays).map_err(|e| Error::Stage {
                    stage: "validate".into(),
                    message: e.to_string(),
                })?;
            batch.trimmed = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_syntax() {
        for ok in [
            "a@b.co",
            "first.last+tag@sub.example.org",
            "o'brien@example.ie",
            "jörg@bücher.de",
        ] {
            assert!(is_valid_email(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "a@",
            "@b.co",
            "a@b",
            "a@@b.co",
            "a b@c.co",
            ".a@b.co",
            "a..b@c.co",
            "a@-b.co",
            "a@b.c",
            "a@b.123",
            "a@b..co",
        ] {
            assert!(!is_valid_email(bad), "{bad}");
        }
    }

    /// The email check as first written (slices, `windows`, `contains`): the table-driven
    /// version must agree with it on every input.
    fn reference_email(s: &str) -> bool {
        if s.len() > 254 {
            return false;
        }
        let Some(at) = s.find('@') else { return false };
        let (local, domain) = (&s.as_bytes()[..at], &s.as_bytes()[at + 1..]);
        if local.is_empty() || local.len() > 64 || domain.contains(&b'@') {
            return false;
        }
        if local[0] == b'.'
            || local[local.len() - 1] == b'.'
            || local.windows(2).any(|w| w == b"..")
        {
            return false;
        }
        if !local.iter().all(|&b| {
            b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~-.".contains(&b) || b >= 0x80
        }) {
            return false;
        }
        if domain.is_empty() || domain.len() > 253 {
            return false;
        }
        let labels: Vec<&[u8]> = domain.split(|&b| b == b'.').collect();
        labels.len() >= 2
            && labels.iter().all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l[0] != b'-'
                    && l[l.len() - 1] != b'-'
                    && l.iter()
                        .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b >= 0x80)
            })
            && labels[labels.len() - 1].len() >= 2
            && !labels[labels.len() - 1].iter().all(u8::is_ascii_digit)
    }

    proptest::proptest! {
        #[test]
        fn email_check_agrees_with_reference(s in "[a-c.@\\-_+ ö1]{0,12}(@[a-z0-9.-]{0,8})?") {
            proptest::prop_assert_eq!(is_valid_email(&s), reference_email(&s), "{:?}", s);
        }
    }

    #[test]
    fn trim_turns_blank_into_null_and_keeps_clean_arrays() {
        let a = StringArray::from(vec![Some(" x "), Some("   "), None, Some("y")]);
        let t = trim_column(&a);
        assert_eq!(t.value(0), "x");
        assert!(t.is_null(1));
        assert!(t.is_null(2));
        assert_eq!(t.value(3), "y");
        let clean = StringArray::from(vec!["a", "b"]);
        let t = trim_column(&clean);
        assert_eq!(t.values().as_ptr(), clean.values().as_ptr());
    }
}
