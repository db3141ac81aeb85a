//! Rows/s of the ERP source alone: connect, stream the campaign's query over TDS and decode
//! every batch into recipient columns, as `broadside send` does before its stages.
//!
//! ```text
//! cargo run --release -p broadside-sources --example erp_read -- CAMPAIGN.toml
//! ```
//!
//! Prints rows, wall seconds, rows/s, and how the time split between connecting (the probe
//! query), waiting for the server (TDS parsing included, on the source's I/O thread) and
//! decoding (on this thread; in a send the pipeline's workers do it in parallel).
//! `benches/erp-source.sh` runs it against a local TDS server.

use std::sync::Arc;
use std::time::Instant;

use broadside_pipeline::runner::{Source, SourceItem};
use broadside_pipeline::spec::{CampaignSpec, SourceSpec};
use broadside_sources::erp::{ErpSettings, ErpSource};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [spec] => read(spec),
        _ => {
            eprintln!("usage: erp_read CAMPAIGN.toml");
            std::process::exit(2);
        }
    }
}

fn read(spec_path: &str) {
    let spec = CampaignSpec::load(std::path::Path::new(spec_path)).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let SourceSpec::Erp(e) = &spec.source else {
        eprintln!("{spec_path}: the source is not an ERP source");
        std::process::exit(1)
    };
    let layout = Arc::new(spec.columns.layout());
    let start = Instant::now();
    let settings = ErpSettings::new(e, |p| spec.resolve(p));
    let mut src =
        ErpSource::open(settings, &spec.columns.source_columns(), layout).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1)
        });
    let opened = start.elapsed().as_secs_f64();
    let (mut rows, mut wait, mut decode) = (0usize, 0f64, 0f64);
    loop {
        let t = Instant::now();
        let item = src.next_item().expect("read");
        wait += t.elapsed().as_secs_f64();
        let t = Instant::now();
        match item {
            Some(SourceItem::Raw(f)) => rows += f().expect("decode").len(),
            Some(SourceItem::Ready(b)) => rows += b.len(),
            None => break,
        }
        decode += t.elapsed().as_secs_f64();
    }
    let wall = start.elapsed().as_secs_f64();
    println!(
        "RESULT erp_read rows={rows} wall_s={wall:.2} rows_per_s={:.0} connect_s={opened:.2} \
         wait_server_s={wait:.2} decode_s={decode:.2} decode_us_per_row={:.3}",
        rows as f64 / wall,
        decode * 1e6 / rows.max(1) as f64
    );
}
