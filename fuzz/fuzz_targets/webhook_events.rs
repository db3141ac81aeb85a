//! JSON batches (`POST /webhooks/events`): an array, one object or NDJSON, through
//! `decode_batch`.
//!
//! Asserted: accepted rows are valid, and the rows produced to Kafka as `to_event` JSON,
//! sent again as an array and as NDJSON, decode to the same rows (what the intake accepts,
//! ingest takes back unchanged); a refused batch names its bad items, in order.
#![no_main]

use broadside_fuzz::decode::valid_workspace_id;
use broadside_fuzz::intake::{decode_batch, decode_batch_for, BatchRejection};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Bound to a workspace, nothing accepted belongs to another.
    if let Ok(rows) = decode_batch_for(data, "fuzz") {
        assert!(rows.iter().all(|r| r.workspace_id == "fuzz"));
    }
    match decode_batch(data) {
        Ok(rows) => {
            for row in &rows {
                assert!(valid_workspace_id(&row.workspace_id));
                assert!(!row.event_id.trim().is_empty(), "{:?}", row.event_id);
            }
            let events: Vec<_> = rows.iter().map(|r| r.to_event()).collect();
            let array = serde_json::to_vec(&events).unwrap();
            assert_eq!(
                decode_batch(&array).as_ref(),
                Ok(&rows),
                "{}",
                String::from_utf8_lossy(&array)
            );
            let lines: Vec<String> = events
                .iter()
                .map(|e| serde_json::to_string(e).unwrap())
                .collect();
            assert_eq!(decode_batch(lines.join("\n").as_bytes()), Ok(rows));
        }
        Err(BatchRejection::InvalidItems(items)) => {
            assert!(!items.is_empty());
            assert!(items.windows(2).all(|w| w[0].0 < w[1].0));
            assert!(items.iter().all(|(_, r)| !r.code().is_empty()));
        }
        Err(BatchRejection::MalformedArray { .. } | BatchRejection::MalformedLine { .. }) => {}
        Err(BatchRejection::ForeignWorkspace(_)) => unreachable!("no workspace is bound"),
    }
});
