//! `broadside serve` end to end: a real HTTP request to the webhook intake lands in the store.

mod common;

fn post(addr: &str, path: &str, token: Option<&str>, body: &str) -> String {
    let auth: Vec<String> = token
        .map(|t| format!("Authorization: Bearer {t}"))
        .into_iter()
        .collect();
    common::post_raw(addr, path, &auth, body)
}

#[test]
fn webhook_events_reach_the_store_and_need_the_secret() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let secret = "a-long-enough-test-secret";
    let server = common::Server::start(
        &["--store", store.to_str().unwrap()],
        &[("BROADSIDE_WEBHOOK_SECRET", secret)],
    );
    let addr = server.addr.clone();
    let body = r#"[{"event_id":"w-1","workspace_id":"demo","campaign_id":"c1","email":"a@example.com","event_type":"opened","ts":"2026-11-20T10:00:00Z"},
                  {"event_id":"w-2","workspace_id":"demo","campaign_id":"c1","email":"b@example.com","event_type":"clicked","url":"https://example.com/x","ts":"2026-11-20T10:01:00Z"}]"#;
    let denied = post(
        &addr,
        "/webhooks/events",
        Some("wrong-secret-wrong-secret"),
        body,
    );
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    let ok = post(&addr, "/webhooks/events", Some(secret), body);
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    drop(server);

    let day = store.join("events/workspace_id=demo/date=2026-11-20");
    let rows: i64 = std::fs::read_dir(&day)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .map(|p| {
            parquet::file::reader::SerializedFileReader::new(std::fs::File::open(p).unwrap())
                .map(|r| {
                    parquet::file::reader::FileReader::metadata(&r)
                        .file_metadata()
                        .num_rows()
                })
                .unwrap()
        })
        .sum();
    assert_eq!(rows, 2);
}
