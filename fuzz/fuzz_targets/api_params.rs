//! Query parameters of the analytics API (`Params::parse` with each route's accepted names,
//! then `range`, `limit`, `granularity`, `time_zone`, `event_type`). Input: the first byte
//! picks the route, the rest is the query string.
//!
//! Asserted: only the route's names and no empty values are kept, and they written back as a
//! query string parse to the same; an accepted range has `from < to` and its bounds, written
//! as RFC 3339, read back as the same instants; `limit` is within 1..=MAX_PAGE; an accepted
//! granularity, time zone or event type re-parses from its canonical name.
#![no_main]

use broadside_fuzz::params::{
    parse_event_type, parse_event_types, parse_instant, parse_tz, Granularity, Params, MAX_PAGE,
    ROUTE_PARAMS,
};
use chrono::SecondsFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&route, rest)) = data.split_first() else {
        return;
    };
    let allowed = ROUTE_PARAMS[usize::from(route) % ROUTE_PARAMS.len()];
    let query = String::from_utf8_lossy(rest);
    let Ok(p) = Params::parse(Some(&query), allowed) else {
        return;
    };
    for (k, v) in p.iter() {
        assert!(allowed.contains(&k), "{k:?}");
        assert!(!v.is_empty());
    }
    let written = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(p.iter())
        .finish();
    assert_eq!(Params::parse(Some(&written), allowed).as_ref(), Ok(&p));

    if let Ok((from, to)) = p.range() {
        if let (Some(f), Some(t)) = (from, to) {
            assert!(f < t);
        }
        for t in [from, to].into_iter().flatten() {
            let text = t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
            assert_eq!(parse_instant(&text, false), Ok(t), "{text}");
        }
    }
    if let Ok(n) = p.limit() {
        assert!((1..=MAX_PAGE).contains(&n));
    }
    if let Some(Ok(g)) = p.get("granularity").map(Granularity::parse) {
        assert_eq!(Granularity::parse(g.as_str()), Ok(g));
    }
    if let Some(Ok(tz)) = p.get("time_zone").map(parse_tz) {
        assert_eq!(parse_tz(tz.name()), Ok(tz));
    }
    if let Some(Ok(types)) = p.get("event_type").map(parse_event_types) {
        assert!(!types.is_empty());
        for t in types {
            assert_eq!(parse_event_type(t.as_str()), Ok(t));
        }
    }
});
