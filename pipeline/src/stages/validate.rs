//! Normalize + validate: trims every field, derives the recipient key and skips rows that cannot be sent.

use std::collections::HashSet;
use std::sync::Arc;

use arrow_array::builder::StringBuilder;
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};

use super::Stage;
use crate::error::{Error, Result};
use crate::model::{Decision, Reason, RecipientBatch, RecipientLayout, StdField};
use crate::spec::{CampaignSpec, Channel};
use crate::strings::{normalised, readable_blocks};

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
///
/// Each part is checked in one pass that folds every rule into a flag instead of branching on
/// each byte (where the dots fall is unpredictable); [`is_valid_email_within`] is the fast path.
pub fn is_valid_email(s: &str) -> bool {
    let s = s.as_bytes();
    if s.len() > 254 {
        return false;
    }
    let Some(at) = memchr::memchr(b'@', s) else {
        return false;
    };
    let (local, d) = (&s[..at], &s[at + 1..]);
    if local.len() > 64 || d.is_empty() || d.len() > 253 {
        return false;
    }
    // Dot-atom: atext characters, no leading, trailing or doubled dots (an empty local part
    // ends "after a dot" and fails too).
    let (mut ok, mut after_dot) = (true, true);
    for &b in local {
        let dot = b == b'.';
        ok &= (LOCAL_BYTE[b as usize] | dot) & !(dot & after_dot);
        after_dot = dot;
    }
    if !ok || after_dot {
        return false;
    }
    // Labels: label bytes or dots (a second `@` is neither); a dot may not follow the start,
    // a dot or a hyphen (empty label, trailing hyphen), a hyphen may not follow the start or a
    // dot (leading hyphen); at most 63 bytes between dots.
    let (mut prev, mut len, mut dots) = (b'.', 0usize, false);
    for &b in d {
        let dot = b == b'.';
        let hyphen = b == b'-';
        ok &= LABEL_BYTE[b as usize] | dot;
        ok &= !(dot & (prev == b'.' || prev == b'-'));
        ok &= !(hyphen & (prev == b'.'));
        len = if dot { 0 } else { len + 1 };
        ok &= len <= 63;
        dots |= dot;
        prev = b;
    }
    // The last label: at least two bytes (so it is not empty and does not end right after a
    // dot), no trailing hyphen, and not all digits.
    ok && dots && len >= 2 && prev != b'-' && !d[d.len() - len..].iter().all(u8::is_ascii_digit)
}

/// [`is_valid_email`] for a value lying in `within` (its column's bytes). Addresses of up to 64
/// bytes made of letters, digits and `.-_+@` (nearly all of them) are checked with 16-byte
/// compares: each rule becomes a test on bit masks of the address's dots, hyphens and `@`.
/// Others, and those whose 16-byte blocks would run past `within`, take the byte-wise check.
#[inline]
pub fn is_valid_email_within(s: &str, within: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if s.len() <= 64 && readable_blocks(s.as_bytes(), within).is_some() {
            // SAFETY: the blocks covering the value lie inside `within` (checked above).
            let masks = unsafe { EmailMasks::load(s.as_ptr(), s.len()) };
            if let Some(ok) = masks.verdict() {
                return ok;
            }
        }
    }
    let _ = within;
    is_valid_email(s)
}

/// Bit i of each mask describes byte i of an address of `len` ≤ 64 bytes.
#[cfg(target_arch = "x86_64")]
struct EmailMasks {
    len: u32,
    /// Bytes other than letters, digits and `.-_+@`.
    other: u64,
    dot: u64,
    at: u64,
    hyphen: u64,
    /// `_` and `+`: fine in the local part, not in a domain.
    local_only: u64,
    digit: u64,
}

#[cfg(target_arch = "x86_64")]
impl EmailMasks {
    /// # Safety
    /// The `len.div_ceil(16)` 16-byte blocks from `p` must be readable.
    #[inline]
    unsafe fn load(p: *const u8, len: usize) -> Self {
        use std::arch::x86_64::*;
        let mut m = EmailMasks {
            len: len as u32,
            other: 0,
            dot: 0,
            at: 0,
            hyphen: 0,
            local_only: 0,
            digit: 0,
        };
        for k in 0..len.div_ceil(16) {
            let v = _mm_loadu_si128(p.add(16 * k).cast());
            let eq = |b: u8| _mm_cmpeq_epi8(v, _mm_set1_epi8(b as i8));
            // `lo <= x <= hi` (unsigned): shifted so the range starts at -128, one signed compare.
            let within = |x: __m128i, lo: u8, hi: u8| {
                let t = _mm_add_epi8(x, _mm_set1_epi8(0x80u8.wrapping_sub(lo) as i8));
                _mm_cmplt_epi8(t, _mm_set1_epi8((-128i16 + (hi - lo) as i16 + 1) as i8))
            };
            let alpha = within(_mm_or_si128(v, _mm_set1_epi8(0x20)), b'a', b'z');
            let digit = within(v, b'0', b'9');
            let (dot, at, hyphen) = (eq(b'.'), eq(b'@'), eq(b'-'));
            let local_only = _mm_or_si128(eq(b'_'), eq(b'+'));
            let known = _mm_or_si128(
                _mm_or_si128(_mm_or_si128(alpha, digit), _mm_or_si128(dot, at)),
                _mm_or_si128(hyphen, local_only),
            );
            let bits = |v: __m128i| (_mm_movemask_epi8(v) as u32 as u64 & 0xFFFF) << (16 * k);
            m.other |= !bits(known) & (0xFFFF << (16 * k));
            m.dot |= bits(dot);
            m.at |= bits(at);
            m.hyphen |= bits(hyphen);
            m.local_only |= bits(local_only);
            m.digit |= bits(digit);
        }
        let valid = if len == 64 {
            u64::MAX
        } else {
            (1u64 << len) - 1
        };
        for x in [
            &mut m.other,
            &mut m.dot,
            &mut m.at,
            &mut m.hyphen,
            &mut m.local_only,
            &mut m.digit,
        ] {
            *x &= valid;
        }
        m
    }

    /// The answer, or `None` when a byte outside the fast path's alphabet needs the byte-wise
    /// check.
    #[inline]
    fn verdict(&self) -> Option<bool> {
        if self.other != 0 {
            return None;
        }
        // Exactly one `@` (none, or a second in the domain, fails), with a local part before it.
        if self.at.count_ones() != 1 || self.at == 1 {
            return Some(false);
        }
        let at = self.at.trailing_zeros();
        // The bits of bytes 0..i.
        let below = |i: u32| if i >= 64 { u64::MAX } else { (1u64 << i) - 1 };
        let local = below(at);
        let domain = below(self.len) & !below(at + 1);
        let last = 1u64 << (self.len - 1);
        // Local part: no leading, trailing or doubled dot.
        let ld = self.dot & local;
        if ld & 1 != 0 || ld & (self.at >> 1) != 0 || ld & (ld >> 1) != 0 {
            return Some(false);
        }
        // Domain: label bytes only, at least two labels, none empty.
        let dd = self.dot & domain;
        let first = self.at << 1;
        if domain == 0
            || self.local_only & domain != 0
            || dd == 0
            || dd & (first | last | dd >> 1) != 0
        {
            return Some(false);
        }
        // No label starts (after the `@` or a dot) or ends (before a dot or the end) with `-`.
        let hy = self.hyphen & domain;
        if hy & (first | dd << 1 | dd >> 1 | last) != 0 {
            return Some(false);
        }
        // The top-level label: two bytes or more, not all digits (a 64-byte address has no
        // label over 63 bytes and no local part over 64).
        let tld = !below(64 - dd.leading_zeros()) & domain;
        Some(tld.count_ones() >= 2 && self.digit & tld != tld)
    }
}

impl Stage for Validator {
    fn name(&self) -> &'static str {
        "validate"
    }

    fn process(&mut self, batch: &mut RecipientBatch) -> Result<()> {
        let trimmed: Vec<StringArray> = (0..batch.columns.num_columns())
            .map(|i| match batch.trimmed {
                true => batch.column(i).clone(),
                false => normalised(batch.column(i)),
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
        // Name columns whose bytes hold no `*` at all (the usual case) need no per-row search.
        fn starred(a: Option<&StringArray>) -> Option<&StringArray> {
            a.filter(|a| memchr::memchr(b'*', a.value_data()).is_some())
        }
        let (first_starred, last_starred) = (starred(first), starred(last));
        let email_bytes = email.map_or(&[][..], |a| a.value_data());

        for i in 0..batch.len() {
            if batch.decisions[i] != Decision::Pending {
                continue;
            }
            let reason = if self.channel == Channel::Email && !present(email, i) {
                Some(Reason::MissingEmail)
            } else if present(email, i)
                && self.channel == Channel::Email
                && !is_valid_email_within(email.unwrap().value(i), email_bytes)
            {
                Some(Reason::InvalidEmail)
            } else if !present(first, i) && !present(last, i) {
                Some(Reason::MissingName)
            } else if [first_starred, last_starred]
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

        /// The 16-byte path gives the byte-wise answer, whether or not its 32 bytes fit in the
        /// buffer around the value.
        #[test]
        fn email_fast_path_agrees_with_the_bytewise_check(
            s in "[a-cA-C0-9._+-]{0,30}@[a-cA-C0-9._+-]{0,36}|[a-c0-9.@_+ö-]{0,66}",
            pad in 0usize..40,
        ) {
            let mut buf = s.clone().into_bytes();
            buf.resize(s.len() + pad, b'x');
            let v = std::str::from_utf8(&buf[..s.len()]).unwrap();
            proptest::prop_assert_eq!(is_valid_email_within(v, &buf), is_valid_email(&s), "{:?}", s);
        }

        /// Around the length limits: 64-byte local parts, 63-byte labels, 253-byte domains.
        #[test]
        fn email_check_agrees_with_reference_at_the_limits(
            s in "(a{1,9}\\.){0,2}\\.?a{50,64}@(-?b{58,65}-?\\.){1,4}[c1-]{1,3}"
        ) {
            proptest::prop_assert_eq!(is_valid_email(&s), reference_email(&s), "{:?}", s);
        }
    }

    #[test]
    fn trim_turns_blank_into_null_and_keeps_clean_arrays() {
        let a = StringArray::from(vec![Some(" x "), Some("   "), None, Some("y")]);
        let t = normalised(&a);
        assert_eq!(t.value(0), "x");
        assert!(t.is_null(1));
        assert!(t.is_null(2));
        assert_eq!(t.value(3), "y");
        let clean = StringArray::from(vec!["a", "b"]);
        let t = normalised(&clean);
        assert_eq!(t.values().as_ptr(), clean.values().as_ptr());
    }
}
