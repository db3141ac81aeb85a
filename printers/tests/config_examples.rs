//! The example config files parse, with every key known, and validate.

use std::collections::BTreeMap;

use broadside_printers::approval::ApprovalRules;
use broadside_printers::batch::BatchConfig;
use broadside_printers::enrichment::EnrichmentConfig;
use broadside_printers::lob::LobConfig;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Example {
    lob: LobConfig,
    batch: BatchConfig,
    enrichment: EnrichmentConfig,
}

#[test]
fn printers_example_parses_and_validates() {
    let text = include_str!("../printers.example.toml");
    let ex: Example = toml::from_str(text).unwrap();
    ex.lob.validate().unwrap();
    assert_eq!(ex.lob.requests_per_second, Some(25.0));
    assert_eq!(ex.batch.batch_size, 500);
    assert_eq!(ex.enrichment.batch_size, 100);
}

#[test]
fn approval_example_parses_and_validates() {
    let text = include_str!("../approval.example.toml");
    let printers: BTreeMap<String, ApprovalRules> = toml::from_str(text).unwrap();
    for (name, rules) in &printers {
        rules.validate().unwrap_or_else(|p| panic!("{name}: {p:?}"));
    }
}

#[test]
fn unknown_keys_are_refused() {
    assert!(toml::from_str::<LobConfig>("max_inflight = 3").is_err());
    assert!(toml::from_str::<BatchConfig>("folder = \"/x\"\nrows = 3").is_err());
}
