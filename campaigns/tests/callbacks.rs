//! Event callbacks delivered to a real HTTP receiver on 127.0.0.1 (an axum server started
//! by the test); the test flushes instead of waiting for windows to end.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use broadside_campaigns::callbacks::{
    Address, CallbackConfig, CallbackEvent, CallbackQueue, LifecycleEvent,
};

/// One request: the raw query string and the decoded form pairs.
type Received = (Option<String>, Vec<(String, String)>);

#[derive(Default)]
struct Receiver {
    /// Every request, in arrival order.
    got: Mutex<Vec<Received>>,
    /// Answer these statuses first, then 200.
    script: Mutex<Vec<StatusCode>>,
}

async fn hook(State(r): State<Arc<Receiver>>, RawQuery(q): RawQuery, body: Bytes) -> StatusCode {
    let pairs = form_urlencoded::parse(&body).into_owned().collect();
    r.got.lock().unwrap().push((q, pairs));
    let mut script = r.script.lock().unwrap();
    if script.is_empty() {
        StatusCode::OK
    } else {
        script.remove(0)
    }
}

/// Starts the receiver; returns its state and base URL.
async fn receiver(script: Vec<StatusCode>) -> (Arc<Receiver>, String) {
    let r = Arc::new(Receiver {
        script: Mutex::new(script),
        ..Default::default()
    });
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (r, format!("http://{addr}"))
}

fn cfg() -> CallbackConfig {
    CallbackConfig {
        window_secs: 300,
        backoff_ms: 1,
        max_attempts: 4,
        ..Default::default()
    }
}

fn event(url: &str, event: CallbackEvent, when: i64, address: Address) -> LifecycleEvent {
    LifecycleEvent {
        campaign_id: 42,
        url: url.to_string(),
        event,
        when,
        address,
    }
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(k, val)| (k.to_string(), val.to_string()))
        .collect()
}

#[tokio::test]
async fn aggregated_events_arrive_as_one_post_per_event_with_the_query_forwarded() {
    let (r, base) = receiver(vec![]).await;
    let url = format!("{base}/hook?token=abc&tag=spring%202024");
    let (queue, worker) = CallbackQueue::new(cfg(), Arc::new(|| 1_000)).unwrap();
    let task = tokio::spawn(worker.run());
    assert!(queue.notify(event(
        &url,
        CallbackEvent::Delivered,
        990,
        Address::Email("a@x.no".into())
    )));
    assert!(queue.notify(event(
        &url,
        CallbackEvent::Delivered,
        985,
        Address::Email("b+1@x.no".into())
    )));
    assert!(queue.notify(event(
        &url,
        CallbackEvent::Delivered,
        995,
        Address::Telephone("+4740769126".into())
    )));
    queue.flush().await;

    let got = r.got.lock().unwrap().clone();
    assert_eq!(
        got.len(),
        2,
        "one POST for the emails, one for the phone: {got:?}"
    );
    for (q, _) in &got {
        assert_eq!(
            q.as_deref(),
            Some("token=abc&tag=spring%202024"),
            "query string forwarded unchanged"
        );
    }
    assert_eq!(
        got[0].1,
        pairs(&[
            ("event", "delivered"),
            ("when", "985"),
            ("email[0]", "a@x.no"),
            ("email[1]", "b+1@x.no")
        ])
    );
    assert_eq!(
        got[1].1,
        pairs(&[
            ("event", "delivered"),
            ("when", "995"),
            ("telephone[0]", "+4740769126")
        ])
    );
    let st = queue.stats();
    assert_eq!(
        (
            st.posted.load(Ordering::Relaxed),
            st.events_posted.load(Ordering::Relaxed)
        ),
        (2, 3)
    );
    assert_eq!(st.retries.load(Ordering::Relaxed), 0);
    drop(queue);
    task.await.unwrap();
}

#[tokio::test]
async fn server_errors_are_retried_until_accepted() {
    let (r, base) = receiver(vec![
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::BAD_GATEWAY,
    ])
    .await;
    let url = format!("{base}/hook");
    let (queue, worker) = CallbackQueue::new(cfg(), Arc::new(|| 1_000)).unwrap();
    tokio::spawn(worker.run());
    queue.notify(event(
        &url,
        CallbackEvent::Bounced,
        900,
        Address::Email("gone@x.no".into()),
    ));
    queue.flush().await;
    let got = r.got.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "two refusals and the success");
    assert!(
        got.iter().all(|g| g.1 == got[0].1),
        "the same body each time"
    );
    let st = queue.stats();
    assert_eq!(st.retries.load(Ordering::Relaxed), 2);
    assert_eq!(st.posted.load(Ordering::Relaxed), 1);
    assert_eq!(st.failed.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn client_errors_are_not_retried_and_attempts_are_bounded() {
    let (r, base) = receiver(vec![StatusCode::NOT_FOUND]).await;
    let (queue, worker) = CallbackQueue::new(cfg(), Arc::new(|| 1_000)).unwrap();
    tokio::spawn(worker.run());
    queue.notify(event(
        &format!("{base}/hook"),
        CallbackEvent::Opened,
        1,
        Address::Email("a@x.no".into()),
    ));
    queue.flush().await;
    assert_eq!(r.got.lock().unwrap().len(), 1, "404 is final");
    assert_eq!(queue.stats().failed.load(Ordering::Relaxed), 1);

    // nobody listens on this port any more: every attempt fails to connect
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}/hook", gone.local_addr().unwrap());
    drop(gone);
    queue.notify(event(
        &dead,
        CallbackEvent::Clicked,
        1,
        Address::Email("a@x.no".into()),
    ));
    queue.flush().await;
    let st = queue.stats();
    assert_eq!(st.failed.load(Ordering::Relaxed), 2);
    assert_eq!(
        st.retries.load(Ordering::Relaxed),
        3,
        "max_attempts 4 = 3 retries"
    );
    assert_eq!(st.events_failed.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_instead_of_blocking() {
    let (r, base) = receiver(vec![]).await;
    let url = format!("{base}/hook");
    let small = CallbackConfig { queue: 2, ..cfg() };
    let (queue, worker) = CallbackQueue::new(small, Arc::new(|| 1_000)).unwrap();
    // the worker is not running yet, so nothing drains the queue
    let accepted: Vec<bool> = (0..5)
        .map(|i| {
            queue.notify(event(
                &url,
                CallbackEvent::Submitted,
                i,
                Address::Email(format!("{i}@x.no")),
            ))
        })
        .collect();
    assert_eq!(accepted, [true, true, false, false, false]);
    assert_eq!(queue.stats().dropped.load(Ordering::Relaxed), 3);
    tokio::spawn(worker.run());
    queue.flush().await;
    let got = r.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].1,
        pairs(&[
            ("event", "submitted"),
            ("when", "0"),
            ("email[0]", "0@x.no"),
            ("email[1]", "1@x.no")
        ])
    );
}
