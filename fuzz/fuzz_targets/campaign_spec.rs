//! Campaign spec TOML (`CampaignSpec::parse`) and the small text parsers a spec's values go
//! through (ERP parameter decimals and datetimes, `--shard I/N`).
#![no_main]

use std::path::{Path, PathBuf};

use broadside_pipeline::spec::{parse_datetime, parse_decimal, CampaignSpec, Shard, SourceSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = CampaignSpec::parse(text, Path::new("fuzz.toml"), PathBuf::from("/base")) {
        // A spec that parses is one `validate` has nothing against.
        assert!(spec.validate().is_empty());
        let _ = spec.key_field();
        let _ = spec.columns.source_columns();
        match &spec.source {
            SourceSpec::Csv(c) => {
                assert!(spec.resolve(&c.path).is_absolute());
            }
            SourceSpec::Erp(e) => {
                let _ = e.server();
                assert!(e.problems().is_empty());
            }
            _ => {}
        }
        for s in &spec.suppression {
            assert!(spec.resolve(&s.path).is_absolute());
        }
    }

    if let Some((v, scale)) = parse_decimal(text) {
        assert!(scale <= 38);
        // The digits it was given are the digits it returns.
        let digits: String = text.chars().filter(char::is_ascii_digit).collect();
        let digits = digits.trim_start_matches('0');
        assert_eq!(v.unsigned_abs().to_string().trim_start_matches('0'), digits);
    }
    let _ = parse_datetime(text);
    if let Ok(shard) = Shard::parse(text) {
        assert!(shard.index < shard.count);
        assert_eq!(Shard::parse(&shard.to_string()), Ok(shard));
    }
});
