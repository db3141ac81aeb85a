//! Schedule strings and `schedule` objects: `parse_relative` (`"2 days"`),
//! `parse_instant_text` (unix seconds or RFC 3339), and `Schedule::from_json` + `resolve` as
//! the campaign API and CLI run them. Whatever parses must re-parse to the same value.
#![no_main]

use broadside_campaigns::schedule::{
    format_instant, parse_instant_text, parse_relative, Schedule, ScheduleConfig, Timing,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// Accepting "now" values: a realistic clock and the ends of the calendar chrono knows.
const NOWS: [i64; 3] = [1_764_672_000, 0, 8_210_298_412_799];

fn check_schedule(v: &Value) {
    let Ok(s) = Schedule::from_json(Some(v), "schedule") else {
        return;
    };
    // The store keeps schedules as JSON.
    let stored = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<Schedule>(&stored).unwrap(), s);
    for cfg in [
        ScheduleConfig::default(),
        ScheduleConfig {
            prepare_lead_secs: 86_400,
            fail_after_secs: 7 * 86_400,
        },
    ] {
        for now in NOWS {
            if let Ok(Some(Timing {
                desired_at,
                prepare_at,
                fail_at,
            })) = s.resolve(now, &cfg, "schedule")
            {
                assert!(prepare_at <= desired_at, "{s:?} at {now}");
                assert!(desired_at < fail_at, "{s:?} at {now}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok((amount, unit)) = parse_relative(text, "in") {
        let unit_name = serde_json::to_value(unit).unwrap();
        let again = format!("{amount} {}s", unit_name.as_str().unwrap());
        assert_eq!(parse_relative(&again, "in").unwrap(), (amount, unit));
    }

    if let Ok(at) = parse_instant_text(text, "at") {
        let shown = format_instant(at);
        assert_eq!(parse_instant_text(&shown, "at").unwrap(), at, "{shown}");
    }

    // The text as each kind of `when` value, then as a whole schedule object.
    check_schedule(&json!({"type": "relative", "in": text}));
    check_schedule(&json!({"type": "absolute", "at": text, "prescheduled": true}));
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        check_schedule(&v);
        check_schedule(&json!({"type": "absolute", "at": v}));
    }
});
