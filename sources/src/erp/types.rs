//! SQL Server column types and how their values become recipient text (documented in `docs/erp.md`).

use std::fmt::Write;

use tiberius::{ColumnData, ColumnType, FromSql};

/// How a column's values are written as recipient text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextForm {
    /// tinyint/smallint/int/bigint: decimal digits.
    Integer,
    /// bit: `true` / `false`.
    Boolean,
    /// decimal/numeric: exact digits with the column's scale (`12.50`).
    Decimal,
    /// money/smallmoney: exact, four decimals (`12.5000`).
    Money,
    /// float/real: the shortest text that reads back as the same number.
    Float,
    /// varchar/nvarchar/text/ntext/xml: as stored.
    Text,
    /// char/nchar: as stored, trailing padding removed.
    FixedText,
    /// uniqueidentifier: upper-case hyphenated, as SQL Server prints it.
    Guid,
    /// date: `YYYY-MM-DD`.
    Date,
    /// datetime/smalldatetime/datetime2: `YYYY-MM-DDTHH:MM:SS[.fffffff]`.
    DateTime,
    /// datetimeoffset: `YYYY-MM-DDTHH:MM:SS[.fffffff]+HH:MM` (the stored offset).
    DateTimeOffset,
    /// time: `HH:MM:SS[.fffffff]`.
    Time,
    /// A column of the NULL type: always NULL.
    Null,
}

impl TextForm {
    /// What `broadside erp check` prints for the mapping.
    pub fn describe(self) -> &'static str {
        match self {
            TextForm::Integer => "integer digits",
            TextForm::Boolean => "true/false",
            TextForm::Decimal => "exact decimal",
            TextForm::Money => "exact decimal, 4 places",
            TextForm::Float => "shortest round-trip float",
            TextForm::Text => "text as stored",
            TextForm::FixedText => "text, trailing spaces trimmed",
            TextForm::Guid => "GUID, upper case",
            TextForm::Date => "ISO 8601 date",
            TextForm::DateTime => "ISO 8601 date-time",
            TextForm::DateTimeOffset => "ISO 8601 date-time with offset",
            TextForm::Time => "ISO 8601 time",
            TextForm::Null => "always NULL",
        }
    }
}

/// The SQL type name of a result column as the wire describes it (nullable integer and float
/// columns do not say their width in the metadata: see [`value_type_name`]).
pub fn column_type_name(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Null => "null",
        ColumnType::Bit | ColumnType::Bitn => "bit",
        ColumnType::Int1 => "tinyint",
        ColumnType::Int2 => "smallint",
        ColumnType::Int4 => "int",
        ColumnType::Int8 => "bigint",
        ColumnType::Intn => "int (nullable)",
        ColumnType::Float4 => "real",
        ColumnType::Float8 => "float",
        ColumnType::Floatn => "float (nullable)",
        ColumnType::Money => "money",
        ColumnType::Money4 => "smallmoney",
        ColumnType::Datetime4 => "smalldatetime",
        ColumnType::Datetime | ColumnType::Datetimen => "datetime",
        ColumnType::Guid => "uniqueidentifier",
        ColumnType::Decimaln => "decimal",
        ColumnType::Numericn => "numeric",
        ColumnType::Daten => "date",
        ColumnType::Timen => "time",
        ColumnType::Datetime2 => "datetime2",
        ColumnType::DatetimeOffsetn => "datetimeoffset",
        ColumnType::BigVarBin => "varbinary",
        ColumnType::BigBinary => "binary",
        ColumnType::BigVarChar => "varchar",
        ColumnType::BigChar => "char",
        ColumnType::NVarchar => "nvarchar",
        ColumnType::NChar => "nchar",
        ColumnType::Xml => "xml",
        ColumnType::Udt => "user-defined type",
        ColumnType::Text => "text",
        ColumnType::NText => "ntext",
        ColumnType::Image => "image",
        ColumnType::SSVariant => "sql_variant",
    }
}

/// The SQL type of one value (exact for integers and floats, where the metadata is not).
pub fn value_type_name(v: &ColumnData<'_>) -> Option<&'static str> {
    Some(match v {
        ColumnData::U8(_) => "tinyint",
        ColumnData::I16(_) => "smallint",
        ColumnData::I32(_) => "int",
        ColumnData::I64(_) => "bigint",
        ColumnData::F32(_) => "real",
        ColumnData::F64(_) => "float",
        _ => return None,
    })
}

/// How a column type becomes text, or `None` when it has no text form (binary, sql_variant, UDT).
pub fn text_form(t: ColumnType) -> Option<TextForm> {
    Some(match t {
        ColumnType::Null => TextForm::Null,
        ColumnType::Bit | ColumnType::Bitn => TextForm::Boolean,
        ColumnType::Int1
        | ColumnType::Int2
        | ColumnType::Int4
        | ColumnType::Int8
        | ColumnType::Intn => TextForm::Integer,
        ColumnType::Float4 | ColumnType::Float8 | ColumnType::Floatn => TextForm::Float,
        ColumnType::Money | ColumnType::Money4 => TextForm::Money,
        ColumnType::Decimaln | ColumnType::Numericn => TextForm::Decimal,
        ColumnType::Guid => TextForm::Guid,
        ColumnType::Datetime4 | ColumnType::Datetime | ColumnType::Datetimen => TextForm::DateTime,
        ColumnType::Datetime2 => TextForm::DateTime,
        ColumnType::Daten => TextForm::Date,
        ColumnType::Timen => TextForm::Time,
        ColumnType::DatetimeOffsetn => TextForm::DateTimeOffset,
        ColumnType::BigVarChar
        | ColumnType::NVarchar
        | ColumnType::Text
        | ColumnType::NText
        | ColumnType::Xml => TextForm::Text,
        ColumnType::BigChar | ColumnType::NChar => TextForm::FixedText,
        ColumnType::BigVarBin
        | ColumnType::BigBinary
        | ColumnType::Image
        | ColumnType::Udt
        | ColumnType::SSVariant => return None,
    })
}

/// Money arrives from tiberius as `f64` (the scaled integer divided by 10⁴). Below 2⁵⁰ scaled
/// units (±112 589 990 684.2624) the scaled integer is recovered exactly; above, it might not be.
const MONEY_EXACT_LIMIT: f64 = (1u64 << 50) as f64;

/// Writes one value's text into `out` (cleared first). `Ok(false)` means NULL; `Err` says why
/// the value does not fit its text form.
pub fn write_text(
    form: TextForm,
    v: &ColumnData<'static>,
    out: &mut String,
) -> Result<bool, String> {
    out.clear();
    let written = match v {
        ColumnData::U8(Some(x)) => write!(out, "{x}").ok(),
        ColumnData::I16(Some(x)) => write!(out, "{x}").ok(),
        ColumnData::I32(Some(x)) => write!(out, "{x}").ok(),
        ColumnData::I64(Some(x)) => write!(out, "{x}").ok(),
        ColumnData::Bit(Some(b)) => {
            out.push_str(if *b { "true" } else { "false" });
            Some(())
        }
        ColumnData::F32(Some(x)) => write!(out, "{x}").ok(),
        ColumnData::F64(Some(x)) if form == TextForm::Money => {
            let scaled = (x * 1e4).round();
            if !scaled.is_finite() || scaled.abs() >= MONEY_EXACT_LIMIT {
                return Err(format!(
                    "money value {x} is beyond ±112589990684 and cannot be read exactly; CAST it to decimal(19,4) in the query"
                ));
            }
            write_scaled(out, scaled as i128, 4);
            Some(())
        }
        ColumnData::F64(Some(x)) => write!(out, "{x}").ok(),
        ColumnData::Numeric(Some(n)) => {
            write_scaled(out, n.value(), n.scale());
            Some(())
        }
        ColumnData::String(Some(s)) => {
            if form == TextForm::FixedText {
                out.push_str(s.trim_end_matches(' '));
            } else {
                out.push_str(s);
            }
            Some(())
        }
        ColumnData::Guid(Some(g)) => {
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            out.push_str(g.hyphenated().encode_upper(&mut buf));
            Some(())
        }
        ColumnData::Xml(Some(x)) => write!(out, "{x}").ok(),
        ColumnData::Date(Some(_)) => push_date(out, date_of(v)?),
        ColumnData::DateTime(Some(_))
        | ColumnData::SmallDateTime(Some(_))
        | ColumnData::DateTime2(Some(_)) => {
            let dt = chrono::NaiveDateTime::from_sql(v)
                .map_err(|e| e.to_string())?
                .ok_or("no value")?;
            push_date(out, dt.date()).and_then(|_| push_time(out, 'T', dt.time()))
        }
        ColumnData::DateTimeOffset(Some(_)) => {
            let dt = chrono::DateTime::<chrono::FixedOffset>::from_sql(v)
                .map_err(|e| e.to_string())?
                .ok_or("no value")?;
            let local = dt.naive_local();
            push_date(out, local.date())
                .and_then(|_| push_time(out, 'T', local.time()))
                .and_then(|_| push_offset(out, dt.offset().local_minus_utc()))
        }
        ColumnData::Time(Some(_)) => {
            let t = chrono::NaiveTime::from_sql(v)
                .map_err(|e| e.to_string())?
                .ok_or("no value")?;
            push_time(out, '\0', t)
        }
        ColumnData::Binary(Some(_)) => {
            return Err("binary values have no text form; CONVERT them in the query".into())
        }
        _ => return Ok(false),
    };
    written.ok_or_else(|| "value could not be formatted".to_string())?;
    Ok(true)
}

fn date_of(v: &ColumnData<'static>) -> Result<chrono::NaiveDate, String> {
    chrono::NaiveDate::from_sql(v)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "no value".to_string())
}

// Dates and times are written by hand: chrono's `format` interprets its pattern for every value,
// which made a typed row several times dearer to decode than a row of text.

/// `YYYY-MM-DD`.
fn push_date(out: &mut String, d: chrono::NaiveDate) -> Option<()> {
    use chrono::Datelike;
    write!(out, "{:04}-{:02}-{:02}", d.year(), d.month(), d.day()).ok()
}

/// `HH:MM:SS` and the fraction with 3, 6 or 9 digits as needed (none when whole), after `sep`
/// unless it is NUL: chrono's `%H:%M:%S%.f`.
fn push_time(out: &mut String, sep: char, t: chrono::NaiveTime) -> Option<()> {
    use chrono::Timelike;
    if sep != '\0' {
        out.push(sep);
    }
    write!(out, "{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second()).ok()?;
    match t.nanosecond() {
        0 => Some(()),
        n if n % 1_000_000 == 0 => write!(out, ".{:03}", n / 1_000_000).ok(),
        n if n % 1_000 == 0 => write!(out, ".{:06}", n / 1_000).ok(),
        n => write!(out, ".{n:09}").ok(),
    }
}

/// `+HH:MM` / `-HH:MM`: chrono's `%:z`.
fn push_offset(out: &mut String, seconds: i32) -> Option<()> {
    let sign = if seconds < 0 { '-' } else { '+' };
    let m = seconds.unsigned_abs() / 60;
    write!(out, "{sign}{:02}:{:02}", m / 60, m % 60).ok()
}

/// Writes an unscaled integer with `scale` decimal places (`1250`, 2 → `12.50`).
fn write_scaled(out: &mut String, value: i128, scale: u8) {
    if value < 0 {
        out.push('-');
    }
    let abs = value.unsigned_abs();
    // Most values fit 64 bits, where division and formatting are far cheaper than on 128.
    match (u64::try_from(abs), 10u64.checked_pow(scale as u32)) {
        (Ok(a), Some(p)) => put_scaled(out, a / p, a % p, scale),
        _ => {
            let p = 10u128.pow(scale as u32);
            put_scaled(out, abs / p, abs % p, scale)
        }
    }
}

fn put_scaled<T: std::fmt::Display>(out: &mut String, int: T, frac: T, scale: u8) {
    let _ = if scale == 0 {
        write!(out, "{int}")
    } else {
        write!(out, "{int}.{frac:0width$}", width = scale as usize)
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use tiberius::numeric::Numeric;

    fn text(form: TextForm, v: ColumnData<'static>) -> Option<String> {
        let mut s = String::new();
        write_text(form, &v, &mut s).unwrap().then_some(s)
    }

    #[test]
    fn integers_bits_and_nulls() {
        assert_eq!(
            text(TextForm::Integer, ColumnData::U8(Some(255))).unwrap(),
            "255"
        );
        assert_eq!(
            text(TextForm::Integer, ColumnData::I16(Some(-7))).unwrap(),
            "-7"
        );
        assert_eq!(
            text(TextForm::Integer, ColumnData::I64(Some(i64::MIN))).unwrap(),
            i64::MIN.to_string()
        );
        assert_eq!(
            text(TextForm::Boolean, ColumnData::Bit(Some(true))).unwrap(),
            "true"
        );
        assert_eq!(text(TextForm::Integer, ColumnData::I32(None)), None);
        assert_eq!(text(TextForm::Text, ColumnData::String(None)), None);
        assert_eq!(text(TextForm::Guid, ColumnData::Guid(None)), None);
    }

    #[test]
    fn decimals_keep_their_scale_exactly() {
        let n = |v: i128, s: u8| ColumnData::Numeric(Some(Numeric::new_with_scale(v, s)));
        assert_eq!(text(TextForm::Decimal, n(1250, 2)).unwrap(), "12.50");
        assert_eq!(text(TextForm::Decimal, n(-5, 3)).unwrap(), "-0.005");
        assert_eq!(text(TextForm::Decimal, n(42, 0)).unwrap(), "42");
        let big = 99_999_999_999_999_999_999_999_999_999_999_999_999i128;
        assert_eq!(text(TextForm::Decimal, n(big, 4)).unwrap(), {
            let s = big.to_string();
            format!("{}.{}", &s[..s.len() - 4], &s[s.len() - 4..])
        });
    }

    #[test]
    fn money_is_exact_to_four_places_and_refuses_what_it_cannot_hold() {
        // What tiberius decodes for money 922337.2036 (scaled 9223372036).
        let decoded = 9_223_372_036f64 / 1e4;
        assert_eq!(
            text(TextForm::Money, ColumnData::F64(Some(decoded))).unwrap(),
            "922337.2036"
        );
        assert_eq!(
            text(TextForm::Money, ColumnData::F64(Some(-0.5))).unwrap(),
            "-0.5000"
        );
        let mut s = String::new();
        let err = write_text(TextForm::Money, &ColumnData::F64(Some(9.2e14)), &mut s).unwrap_err();
        assert!(err.contains("decimal(19,4)"), "{err}");
        // The same f64 as a float column is not rescaled.
        assert_eq!(
            text(TextForm::Float, ColumnData::F64(Some(0.1))).unwrap(),
            "0.1"
        );
        assert_eq!(
            text(TextForm::Float, ColumnData::F32(Some(1.1))).unwrap(),
            "1.1"
        );
    }

    #[test]
    fn strings_guids_and_dates() {
        let s = |x: &'static str| ColumnData::String(Some(Cow::Borrowed(x)));
        assert_eq!(text(TextForm::FixedText, s("AB   ")).unwrap(), "AB");
        assert_eq!(text(TextForm::Text, s(" AB ")).unwrap(), " AB ");
        let g = uuid::Uuid::parse_str("6f9619ff-8b86-d011-b42d-00c04fc964ff").unwrap();
        assert_eq!(
            text(TextForm::Guid, ColumnData::Guid(Some(g))).unwrap(),
            "6F9619FF-8B86-D011-B42D-00C04FC964FF"
        );
        use tiberius::IntoSql;
        let d = chrono::NaiveDate::from_ymd_opt(2024, 2, 29).unwrap();
        assert_eq!(text(TextForm::Date, d.into_sql()).unwrap(), "2024-02-29");
        let dt = d.and_hms_milli_opt(13, 4, 5, 120).unwrap();
        assert_eq!(
            text(TextForm::DateTime, dt.into_sql()).unwrap(),
            "2024-02-29T13:04:05.120"
        );
        let whole = d.and_hms_opt(0, 0, 0).unwrap();
        assert_eq!(
            text(TextForm::DateTime, whole.into_sql()).unwrap(),
            "2024-02-29T00:00:00"
        );
        let off = chrono::FixedOffset::east_opt(2 * 3600)
            .unwrap()
            .from_local_datetime(&dt)
            .unwrap();
        assert_eq!(
            text(TextForm::DateTimeOffset, off.into_sql()).unwrap(),
            "2024-02-29T13:04:05.120+02:00"
        );
    }

    #[test]
    fn binary_has_no_text_form() {
        assert_eq!(text_form(ColumnType::BigVarBin), None);
        let mut s = String::new();
        let v = ColumnData::Binary(Some(Cow::Borrowed(&[1u8, 2][..])));
        assert!(write_text(TextForm::Text, &v, &mut s).is_err());
    }

    use chrono::TimeZone;

    proptest::proptest! {
        /// The hand-written date/time text is exactly chrono's `%Y-%m-%dT%H:%M:%S%.f[%:z]`, and
        /// decimals match the exact digits, for any value SQL Server can hold.
        #[test]
        fn date_time_and_decimal_text_match_the_reference(
            days in 0i64..3_652_058,
            nanos in 0u64..86_400_000_000_000,
            offset_min in -840i32..=840,
            coarse in 0u8..3,
            unscaled in proptest::num::i128::ANY,
            scale in 0u8..=18,
        ) {
            use tiberius::IntoSql;
            // Whole seconds, whole milliseconds or 100 ns units, as datetime2 stores them.
            let nanos = match coarse {
                0 => nanos / 1_000_000_000 * 1_000_000_000,
                1 => nanos / 1_000_000 * 1_000_000,
                _ => nanos / 100 * 100,
            };
            let base = chrono::NaiveDate::from_ymd_opt(1, 1, 1).unwrap();
            let dt = base.and_hms_opt(0, 0, 0).unwrap()
                + chrono::Duration::days(days)
                + chrono::Duration::nanoseconds(nanos as i64);
            proptest::prop_assert_eq!(
                text(TextForm::DateTime, dt.into_sql()).unwrap(),
                dt.format("%Y-%m-%dT%H:%M:%S%.f").to_string()
            );
            proptest::prop_assert_eq!(
                text(TextForm::Date, dt.date().into_sql()).unwrap(),
                dt.date().format("%Y-%m-%d").to_string()
            );
            proptest::prop_assert_eq!(
                text(TextForm::Time, dt.time().into_sql()).unwrap(),
                dt.time().format("%H:%M:%S%.f").to_string()
            );
            let off = chrono::FixedOffset::east_opt(offset_min * 60).unwrap();
            if let chrono::LocalResult::Single(at) = off.from_local_datetime(&dt) {
                proptest::prop_assert_eq!(
                    text(TextForm::DateTimeOffset, at.into_sql()).unwrap(),
                    at.format("%Y-%m-%dT%H:%M:%S%.f%:z").to_string()
                );
            }
            // Decimal digits: the unscaled value's digits with a point `scale` from the right.
            let unscaled = unscaled % 10i128.pow(38);
            let digits = format!("{:0>width$}", unscaled.unsigned_abs(), width = scale as usize + 1);
            let (int, frac) = digits.split_at(digits.len() - scale as usize);
            let sign = if unscaled < 0 { "-" } else { "" };
            let want = if scale == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") };
            let n = ColumnData::Numeric(Some(Numeric::new_with_scale(unscaled, scale)));
            proptest::prop_assert_eq!(text(TextForm::Decimal, n).unwrap(), want);
        }
    }
}
