//! Event JSON (one Kafka message value, NDJSON line or webhook item): `decode_event`. Every
//! input is either rows that can be written (a valid workspace id, a real date) or a dead
//! letter with a reason code.
//!
//! Needs `--features analytics` (DataFusion and librdkafka): see ../README.md.
#![no_main]

use broadside_analytics::decode::{decode_event, valid_workspace_id};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode_event(data) {
        Ok(decoded) => {
            for row in decoded.rows() {
                assert!(
                    valid_workspace_id(&row.workspace_id),
                    "{:?}",
                    row.workspace_id
                );
                assert!(!row.event_id.trim().is_empty());
                let _ = row.date();
                let _ = row.to_event();
                let owned = row.clone().into_owned();
                assert_eq!(owned.ts_micros, row.ts_micros);
            }
        }
        Err(reason) => assert!(!reason.code().is_empty()),
    }
});
