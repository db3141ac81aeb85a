//! Event JSON (one Kafka message value, NDJSON line or webhook item): `decode_event`. Every
//! input is either rows that can be written (a valid workspace id, a real date) or a dead
//! letter with a reason code; a row written back as the event JSON the webhook's Kafka sink
//! produces (`to_event`) decodes to the same row, so what one side accepts the other takes.
#![no_main]

use broadside_fuzz::decode::{decode_event, valid_workspace_id, EventRow};
use libfuzzer_sys::fuzz_target;

/// The row, produced as `to_event` JSON and decoded again, is unchanged.
fn survives_produce_and_ingest(row: &EventRow<'_>) {
    let json = serde_json::to_vec(&row.to_event()).unwrap();
    match decode_event(&json) {
        Ok(again) => assert_eq!(again.rows(), std::slice::from_ref(row)),
        Err(e) => panic!(
            "{row:?} re-encoded as {} is refused: {e}",
            String::from_utf8_lossy(&json)
        ),
    }
}

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
                let owned = row.clone().into_owned();
                assert_eq!(&owned, row);
                survives_produce_and_ingest(row);
            }
        }
        Err(reason) => assert!(!reason.code().is_empty()),
    }
});
