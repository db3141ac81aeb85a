//! CSV rows: `CsvRecordReader` over arbitrary bytes (whole, and fed in small reads that cut
//! records at every possible place) and `last_record_end`, the cut the chunked CSV source
//! makes, which must not change the records csv-core sees.
#![no_main]

use std::io::Read;

use broadside_sources::csv::{last_record_end, CsvRecordReader};
use libfuzzer_sys::fuzz_target;

/// A `Read` that hands out the input a few bytes at a time, the sizes taken from `steps`.
struct Trickle<'a> {
    data: &'a [u8],
    steps: &'a [u8],
    n: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let step = self
            .steps
            .get(self.n % self.steps.len().max(1))
            .copied()
            .unwrap_or(1);
        self.n += 1;
        // The first read is at least 4 bytes, as from a file. csv-core strips a leading BOM
        // only when it sees it whole, and a first input that is exactly the BOM becomes empty,
        // which csv-core takes for the end of input (only a pipe could hand out such a read;
        // see fuzz/README.md).
        let least = if self.n == 1 { 4 } else { 1 };
        let k = (usize::from(step % 8) + 1)
            .max(least)
            .min(self.data.len())
            .min(buf.len());
        buf[..k].copy_from_slice(&self.data[..k]);
        self.data = &self.data[k..];
        Ok(k)
    }
}

/// Whether the first record of `data` starts with a BOM (the reader skips blank lines first).
fn opens_with_bom(data: &[u8]) -> bool {
    data.iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .is_some_and(|i| data[i..].starts_with(b"\xEF\xBB\xBF"))
}

type Records = Vec<(u64, Vec<Vec<u8>>)>;

fn records(input: impl Read, delimiter: u8) -> Records {
    let mut rdr = CsvRecordReader::new(input, delimiter, "fuzz.csv");
    let mut out: Records = Vec::new();
    while let Some(line) = rdr.read_record().expect("reading from memory cannot fail") {
        assert!(line >= 1);
        out.push((
            line,
            (0..rdr.len()).map(|i| rdr.field(i).to_vec()).collect(),
        ));
    }
    out
}

/// Records as the chunk decoder keeps them: fields only, blank lines dropped. A reader made
/// here strips a BOM starting its input, as csv-core does; the chunk decoder keeps one
/// (`keep_leading_bom`, a fuzz find), which this public reader cannot ask for, so a BOM
/// opening any record is left out on both sides.
fn kept(r: &Records) -> Vec<Vec<&[u8]>> {
    r.iter()
        .map(|(_, f)| f)
        .filter(|f| !(f.len() == 1 && f[0].is_empty()))
        .map(|f| {
            f.iter()
                .enumerate()
                .map(|(i, v)| match v.strip_prefix(b"\xEF\xBB\xBF") {
                    Some(rest) if i == 0 => rest,
                    _ => v.as_slice(),
                })
                .collect()
        })
        .collect()
}

fuzz_target!(|input: &[u8]| {
    let Some((&d, rest)) = input.split_first() else {
        return;
    };
    // The delimiters a spec accepts: one ASCII character other than '"' and newline.
    let delimiter = match d & 0x7f {
        b'"' | b'\n' => b',',
        c => c,
    };
    let (steps, data) = rest.split_at(rest.len().min(4));

    let whole = records(data, delimiter);
    let trickled = records(Trickle { data, steps, n: 0 }, delimiter);
    // csv-core's BOM handling depends on its first input slice (see `Trickle`), so inputs
    // holding a BOM are left out of this comparison; fuzz/README.md lists what was found.
    if !data.windows(3).any(|w| w == b"\xEF\xBB\xBF") {
        assert_eq!(whole, trickled, "read boundaries changed the records");
    }
    for w in whole.windows(2) {
        assert!(w[0].0 <= w[1].0, "line numbers went backwards");
    }

    // decode_chunk trusts this to skip per-field UTF-8 checks (its `from_utf8_unchecked`).
    if std::str::from_utf8(data).is_ok() {
        for (_, fields) in &whole {
            for f in fields {
                assert!(
                    std::str::from_utf8(f).is_ok(),
                    "a UTF-8 input gave a non-UTF-8 field"
                );
            }
        }
    }

    // A tail starting with a BOM is left out: a reader made here strips it (and a `"` after
    // it then opens a quoted field), while the chunk decoder keeps it (`keep_leading_bom`,
    // covered by `fuzz_bom_at_a_chunk_start_is_kept_like_anywhere_else` in sources).
    // Likewise a file that starts with a BOM: csv-core drops it, and a `"` after it opens a
    // quoted field that `last_record_end` reads as literal. The source never cuts there: the
    // header reader takes the file's first record, and cuts are made after it.
    let cut = last_record_end(data, delimiter)
        .filter(|_| !opens_with_bom(data))
        .filter(|&c| !opens_with_bom(&data[c..]));
    if let Some(cut) = cut {
        assert!(cut >= 1 && cut <= data.len());
        assert_eq!(data[cut - 1], b'\n', "the cut is not just past a newline");
        let head = records(&data[..cut], delimiter);
        let tail = records(&data[cut..], delimiter);
        let mut split = kept(&head);
        split.extend(kept(&tail));
        assert_eq!(kept(&whole), split, "cutting at {cut} changed the records");
    }
});
