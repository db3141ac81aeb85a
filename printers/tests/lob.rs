//! The Lob client against the local Lob test server: exactly one mailpiece per recipient under
//! injected faults, no retry of refused pieces, `Retry-After`, and the per-printer limits.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broadside_printers::lob::{
    Creative, LobClient, LobConfig, MailPiece, Origin, Pause, PieceOwner, RunScope, SubmitError,
    TokioPause,
};
use broadside_printers::{Address, RecipientState};
use support::lob_server::{Fault, LobServer};

const KEY: &str = "test_0123456789abcdef";
const CAMPAIGN: &str = "spring-2026";

/// The run the tests' pieces belong to, in attempt `attempt`.
fn owner(run_id: &str, attempt: &str) -> PieceOwner {
    PieceOwner {
        run: RunScope {
            workspace_id: "acme".into(),
            campaign_id: CAMPAIGN.into(),
            run_id: run_id.into(),
        },
        attempt_id: attempt.into(),
    }
}

/// Records every wait and returns at once, so retries cost no wall-clock time.
#[derive(Default)]
struct RecordingPause {
    waits: Mutex<Vec<Duration>>,
}

impl Pause for RecordingPause {
    fn pause(
        &self,
        d: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        self.waits.lock().unwrap().push(d);
        Box::pin(tokio::task::yield_now())
    }
}

impl RecordingPause {
    fn waits(&self) -> Vec<Duration> {
        self.waits.lock().unwrap().clone()
    }
}

fn config(server: &LobServer) -> LobConfig {
    LobConfig {
        base_url: server.base_url.clone(),
        max_in_flight: 4,
        requests_per_second: None,
        max_attempts: 20,
        backoff_ms: 100,
        max_backoff_ms: 2000,
        timeout_ms: 10_000,
        ..LobConfig::default()
    }
}

fn client(cfg: LobConfig) -> (Arc<LobClient>, Arc<RecordingPause>) {
    let pause = Arc::new(RecordingPause::default());
    let client = LobClient::with_pause(cfg, KEY, pause.clone()).unwrap();
    (Arc::new(client), pause)
}

fn recipient(i: usize) -> MailPiece {
    piece_of(&owner("run-1", "attempt-1"), i)
}

/// Recipient `i`'s postcard in `owner`'s run, its metadata naming the owner.
fn piece_of(owner: &PieceOwner, i: usize) -> MailPiece {
    let mut merge = serde_json::Map::new();
    merge.insert("first_name".into(), format!("Ada{i}").into());
    let mut metadata: BTreeMap<String, String> = owner
        .metadata()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    metadata.insert("recipient".to_string(), format!("acct-{i}"));
    MailPiece {
        key: owner.run.key(&format!("acct-{i}"), "postcard"),
        description: Some(format!("{CAMPAIGN} acct-{i}")),
        to: Address {
            name: Some(format!("Ada Lovelace {i}")),
            address_line1: Some(format!("{} King St", 100 + i)),
            address_city: Some("San Francisco".into()),
            address_state: Some("CA".into()),
            address_zip: Some("94107".into()),
            address_country: Some("US".into()),
            ..Address::default()
        },
        from: None,
        creative: Creative::Postcard {
            front: "<html>Hi {{first_name}}</html>".into(),
            back: "<html>back</html>".into(),
            size: Some("4x6".into()),
        },
        merge_variables: merge,
        metadata,
    }
}

/// Submits every piece concurrently; results in input order.
async fn submit_all(
    client: &Arc<LobClient>,
    pieces: &[MailPiece],
) -> Vec<Result<broadside_printers::lob::Created, SubmitError>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, p) in pieces.iter().enumerate() {
        let (client, p) = (client.clone(), p.clone());
        set.spawn(async move { (i, client.create(&p).await) });
    }
    let mut out: Vec<_> = (0..pieces.len()).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, r) = r.unwrap();
        out[i] = Some(r);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Every piece has exactly one mailpiece on the server, and the client got its id.
fn assert_one_piece_each(
    server: &LobServer,
    pieces: &[MailPiece],
    results: &[Result<broadside_printers::lob::Created, SubmitError>],
) {
    let on_server = server.pieces();
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for p in &on_server {
        by_key
            .entry(p.idempotency_key.clone().expect("every piece has a key"))
            .or_default()
            .push(p.id.clone());
    }
    assert_eq!(on_server.len(), pieces.len(), "mailpieces on the server");
    for (piece, result) in pieces.iter().zip(results) {
        let created = result
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", piece.key));
        let ids = &by_key[piece.key.as_str()];
        assert_eq!(ids, &vec![created.id.clone()], "{}", piece.key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_postcards_and_letters_with_lobs_shapes() {
    let server = LobServer::start(KEY, Duration::ZERO).await;
    let (client, pause) = client(config(&server));
    let card = recipient(1);
    let created = client.create(&card).await.unwrap();
    assert!(created.id.starts_with("psc_"), "{}", created.id);
    assert_eq!(created.attempts, 1);

    let letter = MailPiece {
        key: owner("run-1", "attempt-1").run.key("acct-1", "letter"),
        from: Some(card.to.clone()),
        creative: Creative::Letter {
            file: "<html>Dear {{first_name}}</html>".into(),
            color: true,
        },
        ..card.clone()
    };
    let created_letter = client.create(&letter).await.unwrap();
    assert!(
        created_letter.id.starts_with("ltr_"),
        "{}",
        created_letter.id
    );

    let pieces = server.pieces();
    assert_eq!(pieces.len(), 2);
    assert_eq!(pieces[0].request["merge_variables"]["first_name"], "Ada1");
    assert_eq!(pieces[0].request["metadata"]["recipient"], "acct-1");
    assert_eq!(pieces[0].request["to"]["address_zip"], "94107");
    assert_eq!(
        pieces[0].idempotency_key.as_deref(),
        Some(card.key.as_str())
    );
    assert!(pause.waits().is_empty());
    let stats = client.stats();
    assert_eq!((stats.requests, stats.created, stats.retries), (2, 2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_twice_returns_the_first_mailpiece_with_its_metadata() {
    let server = LobServer::start(KEY, Duration::ZERO).await;
    let (client, _) = client(config(&server));
    let first_attempt = owner("run-1", "attempt-1");
    let piece = piece_of(&first_attempt, 7);
    let first = client.create(&piece).await.unwrap();
    assert_eq!(first.metadata, piece.metadata, "Lob keeps the metadata");
    assert_eq!(
        first_attempt.origin(&piece.key, &first),
        Ok(Origin::Created)
    );
    // A resumed attempt of the run submits the same recipient again (same key, its own
    // attempt id): the printer answers with the first piece, as made by the first attempt.
    let resumed = owner("run-1", "attempt-2");
    let again = client.create(&piece_of(&resumed, 7)).await.unwrap();
    assert_eq!(first.id, again.id);
    assert_eq!(again.metadata, piece.metadata);
    assert_eq!(resumed.origin(&piece.key, &again), Ok(Origin::Returned));
    assert_eq!(server.pieces().len(), 1);
    assert_eq!(server.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_run_has_its_own_keys_and_a_piece_of_another_run_is_refused() {
    let server = LobServer::start(KEY, Duration::ZERO).await;
    let (client, _) = client(config(&server));
    // Two runs of the same campaign: each makes its own piece for the recipient.
    let (r1, r2) = (owner("run-1", "a"), owner("run-2", "b"));
    let one = client.create(&piece_of(&r1, 3)).await.unwrap();
    let two = client.create(&piece_of(&r2, 3)).await.unwrap();
    assert_ne!(one.id, two.id);
    assert_eq!(server.pieces().len(), 2);
    // A piece made under run 3's key with run 1's metadata: run 3 gets it back and refuses it.
    let r3 = owner("run-3", "c");
    let squatter = MailPiece {
        key: r3.run.key("acct-3", "postcard"),
        ..piece_of(&r1, 3)
    };
    client.create(&squatter).await.unwrap();
    let returned = client.create(&piece_of(&r3, 3)).await.unwrap();
    assert_eq!(server.pieces().len(), 3, "the replay made nothing");
    let err = r3
        .origin(&squatter.key, &returned)
        .expect_err("another run's piece");
    let msg = err.to_string();
    assert!(
        msg.contains("belongs to run run-1") && msg.contains(&returned.id),
        "{msg}"
    );
}

/// Issue 8 scenario 6, "printer faults: 1 mailpiece per recipient": 429, 500, connections
/// dropped before and after the piece is made, on 40% of calls, with 8 requests in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn printer_faults_leave_exactly_one_mailpiece_per_recipient() {
    const N: usize = 300;
    let server = LobServer::start(KEY, Duration::ZERO).await;
    server.fault_plan(|call| match call % 10 {
        2 => Some(Fault::TooManyRequests {
            retry_after_secs: 1,
        }),
        5 => Some(Fault::ServerError),
        7 => Some(Fault::DropAfterProcessing),
        9 => Some(Fault::ResetBeforeProcessing),
        _ => None,
    });
    let (client, pause) = client(LobConfig {
        max_in_flight: 8,
        ..config(&server)
    });
    let pieces: Vec<MailPiece> = (0..N).map(recipient).collect();
    let results = submit_all(&client, &pieces).await;
    assert_one_piece_each(&server, &pieces, &results);

    let stats = client.stats();
    let retries: u64 = results
        .iter()
        .map(|r| u64::from(r.as_ref().unwrap().attempts - 1))
        .sum();
    assert_eq!(stats.retries, retries);
    assert_eq!(stats.requests, server.calls());
    assert_eq!(stats.requests, N as u64 + retries);
    assert!(stats.rate_limited > 0 && stats.server_errors > 0 && stats.transport_errors > 0);
    // Every 429 waited its Retry-After (1 s); nothing waited longer than the backoff cap.
    let waits = pause.waits();
    assert!(
        waits
            .iter()
            .filter(|w| **w == Duration::from_secs(1))
            .count() as u64
            >= stats.rate_limited
    );
    assert!(waits.iter().all(|w| *w <= Duration::from_secs(2)));
    println!(
        "figure printer_faults recipients={N} pieces={} retries={retries}",
        server.pieces().len()
    );

    // The run crashes and resumes: every recipient is submitted again; nothing new is printed.
    let again = submit_all(&client, &pieces).await;
    assert_one_piece_each(&server, &pieces, &again);
}

/// Issue 6's test: the printer accepts every request but drops 10% of the answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_of_answers_dropped_still_one_mailpiece_each() {
    const N: usize = 500;
    let server = LobServer::start(KEY, Duration::ZERO).await;
    server.fault_plan(|call| (call % 10 == 3).then_some(Fault::DropAfterProcessing));
    let (client, _) = client(LobConfig {
        max_in_flight: 8,
        ..config(&server)
    });
    let pieces: Vec<MailPiece> = (0..N).map(recipient).collect();
    let results = submit_all(&client, &pieces).await;
    assert_one_piece_each(&server, &pieces, &results);
    let stats = client.stats();
    assert_eq!(stats.transport_errors, stats.retries);
    assert_eq!(stats.requests, server.calls());
    assert!(stats.retries >= (N / 10) as u64, "{stats:?}");
}

/// The fault matrix: each fault at each of the first calls of a three-recipient send, one
/// request at a time, and the same fault three times in a row on one recipient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_at_each_call() {
    for fault in Fault::ALL {
        for call in 0..4u64 {
            let server = LobServer::start(KEY, Duration::ZERO).await;
            server.fault_at(call, fault);
            let (client, _) = client(LobConfig {
                max_in_flight: 1,
                ..config(&server)
            });
            let pieces: Vec<MailPiece> = (0..3).map(recipient).collect();
            let mut results = Vec::new();
            for p in &pieces {
                results.push(client.create(p).await);
            }
            assert_one_piece_each(&server, &pieces, &results);
            // The fault hit the piece submitted at that call (call 3 is never reached).
            let want_retries = u64::from(call < 3);
            assert_eq!(
                client.stats().retries,
                want_retries,
                "{fault:?} at call {call}"
            );
        }
        let server = LobServer::start(KEY, Duration::ZERO).await;
        for call in 0..3 {
            server.fault_at(call, fault);
        }
        let (client, _) = client(config(&server));
        let pieces = vec![recipient(0)];
        let results = vec![client.create(&pieces[0]).await];
        assert_one_piece_each(&server, &pieces, &results);
        assert_eq!(results[0].as_ref().unwrap().attempts, 4, "{fault:?} x3");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_become_error_states_without_retries() {
    let server = LobServer::start(KEY, Duration::ZERO).await;
    let (client, pause) = client(config(&server));
    let mut piece = recipient(3);
    piece.to.address_line1 = Some("x".repeat(65));
    let err = client.create(&piece).await.unwrap_err();
    match &err {
        SubmitError::Rejected {
            status,
            code,
            message,
        } => {
            assert_eq!((*status, code.as_str()), (422, "invalid"));
            assert!(message.contains("to.address_line1"), "{message}");
        }
        other => panic!("expected a rejection, got {other}"),
    }
    assert_eq!(server.calls(), 1, "a refused piece is not retried");
    assert!(server.pieces().is_empty());
    assert!(pause.waits().is_empty());
    match err.recipient_state() {
        RecipientState::Error { message } => {
            assert!(
                message
                    .starts_with("Failed to make mail piece for this recipient: to.address_line1"),
                "{message}"
            );
            assert!(message.ends_with("(422 invalid)"), "{message}");
        }
        other => panic!("{other}"),
    }
    assert!(RecipientState::Sending.allowed(&err.recipient_state()));
    assert!(!err.stops_the_printer());
    assert_eq!(client.stats().refused, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_api_key_stops_the_printer() {
    let server = LobServer::start(KEY, Duration::ZERO).await;
    let pause = Arc::new(RecordingPause::default());
    let client = LobClient::with_pause(config(&server), "test_wrong", pause).unwrap();
    let err = client.create(&recipient(1)).await.unwrap_err();
    assert!(
        matches!(&err, SubmitError::Rejected { status: 401, code, .. } if code == "unauthorized"),
        "{err}"
    );
    assert!(err.stops_the_printer());
    assert_eq!(server.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_for_every_request_to_the_printer() {
    let server = LobServer::start(KEY, Duration::ZERO).await;
    server.fault_at(
        0,
        Fault::TooManyRequests {
            retry_after_secs: 7,
        },
    );
    let (client, pause) = client(LobConfig {
        requests_per_second: Some(1000.0),
        ..config(&server)
    });
    client.create(&recipient(1)).await.unwrap();
    assert!(
        pause.waits().contains(&Duration::from_secs(7)),
        "{:?}",
        pause.waits()
    );
    // The 429 held back the whole printer: the next request waits out the rest of it too.
    client.create(&recipient(2)).await.unwrap();
    let waits = pause.waits();
    let last = *waits.last().unwrap();
    assert!(last > Duration::from_secs(6), "{waits:?}");
    assert_eq!(client.stats().rate_limited, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_after_max_attempts_with_capped_backoff() {
    let server = LobServer::start(KEY, Duration::ZERO).await;
    server.fault_plan(|_| Some(Fault::ServerError));
    let (client, pause) = client(LobConfig {
        max_attempts: 6,
        backoff_ms: 100,
        max_backoff_ms: 800,
        ..config(&server)
    });
    let err = client.create(&recipient(1)).await.unwrap_err();
    match &err {
        SubmitError::GaveUp { attempts, last } => {
            assert_eq!(*attempts, 6);
            assert!(last.contains("HTTP 500 internal_server_error"), "{last}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(server.calls(), 6);
    let waits = pause.waits();
    assert_eq!(waits.len(), 5, "{waits:?}");
    for (i, (w, full)) in waits.iter().zip([100u64, 200, 400, 800, 800]).enumerate() {
        let ms = w.as_millis() as u64;
        assert!((full / 2..=full).contains(&ms), "wait {i}: {ms} ms");
    }
    match err.recipient_state() {
        RecipientState::Error { message } => {
            assert!(
                message.starts_with("Failed submission to Printer: "),
                "{message}"
            )
        }
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_is_respected() {
    // The server takes 20 ms per request so concurrent requests overlap.
    let server = LobServer::start(KEY, Duration::from_millis(20)).await;
    let (client, _) = client(LobConfig {
        max_in_flight: 3,
        ..config(&server)
    });
    let pieces: Vec<MailPiece> = (0..24).map(recipient).collect();
    let results = submit_all(&client, &pieces).await;
    assert_one_piece_each(&server, &pieces, &results);
    let max = server.max_in_flight();
    assert!(max <= 3, "server saw {max} requests at once");
    assert!(max >= 2, "requests never overlapped (max {max})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_spaces_requests() {
    let server = LobServer::start(KEY, Duration::ZERO).await;
    let client = Arc::new(
        LobClient::with_pause(
            LobConfig {
                requests_per_second: Some(50.0),
                max_in_flight: 8,
                ..config(&server)
            },
            KEY,
            Arc::new(TokioPause),
        )
        .unwrap(),
    );
    let pieces: Vec<MailPiece> = (0..11).map(recipient).collect();
    let started = Instant::now();
    let results = submit_all(&client, &pieces).await;
    let elapsed = started.elapsed();
    assert_one_piece_each(&server, &pieces, &results);
    // 11 starts at most 20 ms apart take at least 200 ms (the first starts at once).
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    let distinct: HashSet<_> = results
        .iter()
        .map(|r| r.as_ref().unwrap().id.clone())
        .collect();
    assert_eq!(distinct.len(), 11);
}
