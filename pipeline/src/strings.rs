//! String columns: the normalisation every value gets (trimmed, blank = null) and a column
//! builder that copies short values with 16-byte moves.
//!
//! The send path copies about ten short fields per recipient (names, zip codes, emails) into
//! Arrow columns and IFUR lines. Through `memcpy` each copy is a call that sorts the length
//! into size classes before moving a few bytes; [`append_short`] instead moves whole 16-byte
//! blocks when the bytes around the value may be read and the destination has room, which is
//! almost always the case inside a chunk of input.

use arrow_array::{Array, StringArray};
use arrow_buffer::{
    BooleanBuffer, Buffer, NullBuffer, NullBufferBuilder, OffsetBuffer, ScalarBuffer,
};

/// True when `s` is non-empty and has no leading or trailing whitespace (in `str::trim`'s
/// sense, Unicode whitespace included). Decided from the first and last bytes when both are
/// printable ASCII, the usual case.
#[inline]
pub(crate) fn is_trimmed(s: &str) -> bool {
    let b = s.as_bytes();
    let plain = |c: u8| c > b' ' && c < 0x80;
    match (b.first(), b.last()) {
        (Some(&f), Some(&l)) if plain(f) && plain(l) => true,
        (Some(_), Some(_)) => s.trim().len() == s.len(),
        _ => false,
    }
}

/// `s` trimmed (without looking further than its ends when it already is).
#[inline]
pub fn trimmed(s: &str) -> &str {
    if is_trimmed(s) {
        s
    } else {
        s.trim()
    }
}

/// Values up to this long take the block-copy path.
const SHORT: usize = 64;

/// The bytes of the 16-byte blocks covering `src` (its length rounded up to 16) when they
/// all lie inside `within`, a slice `src` lies in: then they may be read whole, past `src`'s
/// end, without leaving memory that is known to be readable.
#[inline(always)]
pub fn readable_blocks(src: &[u8], within: &[u8]) -> Option<usize> {
    let start = src.as_ptr() as usize;
    let lo = within.as_ptr() as usize;
    let blocks = src.len().div_ceil(16) * 16;
    (start >= lo && start - lo + blocks <= within.len()).then_some(blocks)
}

/// Copies `src` to `dst` and returns its length. `within` is a slice `src` lies in: when the
/// 16-byte blocks covering `src` stay inside it and `src` is short, whole blocks are moved
/// (up to 15 bytes past `src`'s end are read, and written past `dst + src.len()`); otherwise
/// exactly `src` is copied.
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` rounded up to a multiple of 16 bytes, and
/// must not overlap `within`.
#[inline(always)]
pub unsafe fn copy_short(dst: *mut u8, src: &[u8], within: &[u8]) -> usize {
    match readable_blocks(src, within) {
        Some(blocks) if src.len() <= SHORT => {
            let s = src.as_ptr();
            let mut k = 0;
            while k < blocks {
                // SAFETY: the `blocks` bytes read from `src`'s start lie inside `within`
                // (checked by `readable_blocks`); the caller guarantees room for them at `dst`.
                unsafe {
                    let v = std::ptr::read_unaligned(s.add(k).cast::<[u8; 16]>());
                    std::ptr::write_unaligned(dst.add(k).cast::<[u8; 16]>(), v);
                }
                k += 16;
            }
        }
        // SAFETY: the caller guarantees room for `src.len()` bytes at `dst`, apart from `src`.
        _ => unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) },
    }
    src.len()
}

/// Appends `src` to `dst`. `within` is a slice `src` lies in (its chunk or column buffer):
/// when the 16-byte blocks covering `src` stay inside `within` and fit in `dst`'s spare
/// capacity, they are moved whole (the extra bytes land past `dst`'s length, where they are
/// not part of the vector); otherwise this is `extend_from_slice`.
#[inline(always)]
pub fn append_short(dst: &mut Vec<u8>, src: &[u8], within: &[u8]) {
    if dst.capacity() - dst.len() >= src.len().div_ceil(16) * 16 {
        // SAFETY: the spare capacity holds `src.len()` rounded up to 16 bytes, and a vector's
        // spare capacity overlaps no other slice; only `src.len()` bytes become part of the
        // vector, and those are exactly `src`'s.
        unsafe {
            let n = copy_short(dst.as_mut_ptr().add(dst.len()), src, within);
            dst.set_len(dst.len() + n);
        }
    } else {
        dst.extend_from_slice(src);
    }
}

/// Builds a `StringArray` of normalised values: each appended value trimmed, blank ones null.
#[derive(Debug)]
pub struct StringColumnBuilder {
    values: Vec<u8>,
    offsets: Vec<i32>,
    nulls: NullBufferBuilder,
}

impl StringColumnBuilder {
    /// A builder expecting about `rows` values and `bytes` bytes of them.
    pub fn with_capacity(rows: usize, bytes: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        StringColumnBuilder {
            // Room for the last value's block copy.
            values: Vec::with_capacity(bytes + SHORT),
            offsets,
            nulls: NullBufferBuilder::new(rows),
        }
    }

    /// Appends a null.
    #[inline]
    pub fn append_null(&mut self) {
        self.offsets.push(self.end());
        self.nulls.append_null();
    }

    /// Appends `s` trimmed, or a null when nothing is left. `within` is a slice `s` lies in
    /// (see [`append_short`]); any slice will do, at worst the copy takes the slow path.
    /// Always inlined: the CSV decoder calls it for every field, and as a call its register
    /// saves and restores cost about a third of its time.
    #[inline(always)]
    pub fn append_trimmed(&mut self, s: &str, within: &[u8]) {
        let t = trimmed(s);
        if t.is_empty() {
            self.append_null();
            return;
        }
        self.values.reserve(t.len() + SHORT);
        append_short(&mut self.values, t.as_bytes(), within);
        self.offsets.push(self.end());
        self.nulls.append_non_null();
    }

    fn end(&self) -> i32 {
        i32::try_from(self.values.len()).expect("a string column holds less than 2 GiB")
    }

    /// Bytes of values so far.
    pub fn values_len(&self) -> usize {
        self.values.len()
    }

    /// The column.
    pub fn finish(mut self) -> StringArray {
        let offsets = OffsetBuffer::new(ScalarBuffer::from(self.offsets));
        let values = Buffer::from_vec(self.values);
        // SAFETY: every value was appended whole from a `&str` (a trimmed `str` slice), so the
        // bytes are UTF-8 and each offset falls on a character boundary.
        unsafe { StringArray::new_unchecked(offsets, values, self.nulls.finish()) }
    }
}

/// `a` normalised (every value trimmed, blank values null). A column that already is comes
/// back as it is; one whose only blank values are empty strings gets a new null buffer and
/// keeps its offsets and bytes; any other is copied, each value trimmed.
pub fn normalised(a: &StringArray) -> StringArray {
    let offsets = a.value_offsets();
    let mut empty = false;
    for i in 0..a.len() {
        if a.is_null(i) {
            continue;
        }
        let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
        if start == end {
            empty = true;
        } else if !is_trimmed(a.value(i)) {
            return normalised_copy(a);
        }
    }
    if !empty {
        return a.clone();
    }
    let valid =
        BooleanBuffer::collect_bool(a.len(), |i| a.is_valid(i) && offsets[i + 1] > offsets[i]);
    StringArray::new(
        a.offsets().clone(),
        a.values().clone(),
        Some(NullBuffer::new(valid)),
    )
}

/// `a` normalised into a new column, each value trimmed.
fn normalised_copy(a: &StringArray) -> StringArray {
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the value's length and place in its buffer, and however much room the
        /// destination has, the result is `extend_from_slice`'s.
        #[test]
        fn append_short_is_extend_from_slice(
            buf in proptest::collection::vec(any::<u8>(), 0..200),
            a in 0usize..200,
            b in 0usize..200,
            prefix in proptest::collection::vec(any::<u8>(), 0..40),
            spare in 0usize..100,
        ) {
            let (a, b) = (a.min(buf.len()), b.min(buf.len()));
            let src = &buf[a.min(b)..a.max(b)];
            let mut dst = Vec::with_capacity(prefix.len() + spare);
            dst.extend_from_slice(&prefix);
            append_short(&mut dst, src, &buf);
            let mut want = prefix.clone();
            want.extend_from_slice(src);
            prop_assert_eq!(dst, want);
        }

        /// The builder gives each value trimmed, blanks and nulls as nulls.
        #[test]
        fn builder_trims_and_nulls(values in proptest::collection::vec(
            proptest::option::of("[ a-zé\t\u{a0}]{0,40}"), 0..50)
        ) {
            let all: String = values.iter().flatten().map(String::as_str).collect();
            let mut b = StringColumnBuilder::with_capacity(1, 0);
            let mut at = 0;
            for v in &values {
                match v {
                    Some(s) => {
                        b.append_trimmed(&all[at..at + s.len()], all.as_bytes());
                        at += s.len();
                    }
                    None => b.append_null(),
                }
            }
            let a = b.finish();
            prop_assert_eq!(a.len(), values.len());
            for (i, v) in values.iter().enumerate() {
                let want = v.as_deref().map(str::trim).filter(|t| !t.is_empty());
                prop_assert_eq!(a.is_valid(i).then(|| a.value(i)), want);
            }
        }

        /// Normalising gives each value trimmed and blanks as nulls, whichever path it takes
        /// (nothing to do, only empty strings, values to trim); the first two share the bytes.
        #[test]
        fn normalised_trims_each_value(values in proptest::collection::vec(
            proptest::option::of(prop_oneof![
                Just(String::new()),
                "[a-zé]{1,20}",
                "[ a-zé\t\u{a0}]{0,40}",
            ]), 0..80)
        ) {
            let want: Vec<Option<&str>> = values
                .iter()
                .map(|v| v.as_deref().map(str::trim).filter(|t| !t.is_empty()))
                .collect();
            let a = StringArray::from(values.clone());
            let n = normalised(&a);
            prop_assert_eq!(n.len(), values.len());
            let got: Vec<Option<&str>> = (0..n.len()).map(|i| n.is_valid(i).then(|| n.value(i))).collect();
            prop_assert_eq!(&got, &want);
            let in_place = values.iter().flatten().all(|v| v.is_empty() || v.trim() == v);
            prop_assert_eq!(in_place, n.values().as_ptr() == a.values().as_ptr());
        }

        #[test]
        fn is_trimmed_agrees_with_trim(s in "[ \t\u{b}\u{a0}\u{2003}xé]{0,5}") {
            prop_assert_eq!(is_trimmed(&s), !s.is_empty() && s.trim() == s);
            prop_assert_eq!(trimmed(&s), s.trim());
        }
    }
}
