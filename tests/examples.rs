//! Every example spec parses and validates, and the quickstart decides as documented.

mod common;

use broadside_pipeline::spec::CampaignSpec;

#[test]
fn every_example_spec_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            CampaignSpec::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 4, "expected the example specs, found {n}");
}

#[test]
fn quickstart_dry_run_applies_suppression_and_the_cap() {
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart.toml");
    let out = common::run(&["send", spec, "--dry-run"], true);
    let text = String::from_utf8_lossy(&out.stdout);
    let count = |label: &str| -> u64 {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(label))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {label} line in:\n{text}"))
    };
    assert!(text.contains("1000000 recipients"), "{text}");
    // The lists were generated for this population, so they suppress; the cap of 900 000
    // eligible recipients bites, so sent + holdout is exactly the cap.
    assert!(count("suppressed") > 1_000, "{text}");
    assert!(count("cap_exceeded") > 0, "{text}");
    assert_eq!(count("sent") + count("holdout"), 900_000, "{text}");
}
