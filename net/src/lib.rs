//! The HTTP/1.1 client Broadside's outbound calls share (printers, address enrichment, event
//! callbacks, template sync): hyper-util's pooled client, over plain TCP for `http://` and
//! over TLS for `https://` (hyper-rustls, with the platform's trust store loaded once per
//! process; `SSL_CERT_FILE` / `SSL_CERT_DIR` add a private CA).
//!
//! Connections are kept alive and reused per host. Each thread has its own pool: a
//! current-thread tokio runtime (the send's printer and enrichment stages each run one) only
//! drives its connections while its thread is inside `block_on`, so a connection opened on one
//! thread's runtime must not be handed to another thread.
#![warn(missing_docs, unreachable_pub)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Most answer bytes read (a Lob mailpiece answer is a few KiB).
const MAX_ANSWER: usize = 1 << 20;
/// Idle connections kept per host and thread.
const IDLE_PER_HOST: usize = 8;
/// How long an idle connection is kept.
const IDLE_FOR: Duration = Duration::from_secs(30);

type Body = Full<Bytes>;
type PlainPool = Client<HttpConnector, Body>;
type TlsPool = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// Where requests go: scheme, host and port, and the path prefix of the base URL.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `http` or `https`.
    scheme: &'static str,
    /// `host` or `host:port`, as the URL gave it (the `Host` header).
    authority: String,
    prefix: String,
}

impl Endpoint {
    /// Parses a base URL such as `http://127.0.0.1:4010` or `http://printer.local/lob`.
    pub fn parse(base_url: &str) -> Result<Endpoint, String> {
        let uri: Uri = base_url
            .parse()
            .map_err(|e| format!("{base_url:?} is not a URL: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => "http",
            Some("https") => "https",
            _ => {
                return Err(format!(
                    "{base_url:?}: only http:// and https:// URLs can be called"
                ))
            }
        };
        let host = uri.host().ok_or_else(|| format!("{base_url:?}: no host"))?;
        if scheme == "https" {
            rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']))
                .map_err(|e| format!("{base_url:?}: {e}"))?;
        }
        let authority = match uri.port_u16() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(Endpoint {
            scheme,
            authority,
            prefix,
        })
    }

    /// Parses a full URL into its endpoint and its path (with the query), for services called
    /// at one URL rather than under a base.
    pub fn parse_url(url: &str) -> Result<(Endpoint, String), String> {
        let mut endpoint = Endpoint::parse(url)?;
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let path = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        endpoint.prefix.clear();
        Ok((endpoint, path))
    }
}

/// The TLS client settings, built once: the platform's trust store (rustls-native-certs reads
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` when set, e.g. to trust a private CA), TLS 1.2 and 1.3.
fn tls_config() -> Result<rustls::ClientConfig, String> {
    static CONFIG: OnceLock<Result<rustls::ClientConfig, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "a trusted certificate could not be loaded");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "no trusted CA certificates found (system store, SSL_CERT_FILE)".into(),
                );
            }
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            Ok(rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS settings: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth())
        })
        .clone()
}

fn connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http
}

fn pool<C>(connector: C) -> Client<C, Body>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(IDLE_PER_HOST)
        .pool_idle_timeout(IDLE_FOR)
        .build(connector)
}

thread_local! {
    static PLAIN: PlainPool = pool(connector());
    static TLS: Result<TlsPool, String> = tls_config().map(|config| {
        pool(
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_only()
                .enable_http1()
                .wrap_connector(connector()),
        )
    });
}

/// A complete answer.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The raw `Retry-After` header, when present.
    pub retry_after: Option<String>,
    /// The body (at most 1 MiB is read).
    pub body: Bytes,
}

/// POSTs a JSON body; see [`send`].
pub async fn post_json(
    endpoint: &Endpoint,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Answer, String> {
    send(
        "POST",
        endpoint,
        path,
        &[
            ("content-type", "application/json"),
            ("accept", "application/json"),
        ],
        headers,
        body,
    )
    .await
}

/// An error and its causes, outermost first.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Whether a TLS handshake failed somewhere in `e`'s causes (an unknown certificate
/// authority, a name the certificate does not carry, …).
fn tls_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut causes = vec![e];
    while let Some(c) = causes.pop() {
        if c.is::<rustls::Error>() {
            return true;
        }
        // An I/O error's `source` skips the error it wraps: look at that one too.
        if let Some(inner) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            causes.push(inner);
        }
        causes.extend(c.source());
    }
    false
}

/// Sends one request (`path` is appended to the endpoint's prefix and may carry a query) with
/// `defaults` and then `headers` (a `User-Agent` and `Host` are added), on a kept-alive
/// connection to the host when this thread has an idle one. Any failure before the whole
/// answer was read (connect, TLS, reset, a body cut short) is an `Err`: the request may or
/// may not have been processed by the server. A request is only sent again by the pool when
/// a reused connection turned out closed before any of it was written.
pub async fn send(
    method: &str,
    endpoint: &Endpoint,
    path: &str,
    defaults: &[(&str, &str)],
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Answer, String> {
    let method = hyper::Method::from_bytes(method.as_bytes())
        .map_err(|e| format!("method {method:?}: {e}"))?;
    let host = &endpoint.authority;
    let uri = format!("{}://{host}{}{path}", endpoint.scheme, endpoint.prefix);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(&uri)
        .header(hyper::header::USER_AGENT, "broadside");
    for (name, value) in defaults.iter().chain(headers) {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("building the request for {uri}: {e}"))?;
    let answer = match endpoint.scheme {
        "https" => TLS.with(|p| p.clone())?.request(req),
        _ => PLAIN.with(|p| p.clone()).request(req),
    };
    let resp = answer.await.map_err(|e| {
        let what = match () {
            _ if tls_failed(&e) => "TLS with",
            _ if e.is_connect() => "connecting to",
            _ => "sending to",
        };
        format!("{what} {host}: {}", chain(&e))
    })?;
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("reading the answer from {host}: {}", chain(e.as_ref())))?
        .to_bytes();
    Ok(Answer {
        status,
        retry_after,
        body,
    })
}

/// `Basic` credentials for a user with an empty password (how Lob takes its API key).
pub fn basic_auth(user: &str) -> String {
    use base64::Engine;
    let coded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
    format!("Basic {coded}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn basic_credentials_are_base64_of_user_and_empty_password() {
        assert_eq!(basic_auth("test_key"), "Basic dGVzdF9rZXk6");
        assert_eq!(basic_auth("f"), "Basic Zjo=");
    }

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("http://127.0.0.1:4010/").unwrap();
        assert_eq!(
            (e.scheme, e.authority.as_str(), e.prefix.as_str()),
            ("http", "127.0.0.1:4010", "")
        );
        let e = Endpoint::parse("http://printer.local/lob").unwrap();
        assert_eq!(
            (e.prefix.as_str(), e.authority.as_str()),
            ("/lob", "printer.local")
        );
        let https = Endpoint::parse("https://api.lob.com").unwrap();
        assert_eq!(https.scheme, "https");
        assert!(Endpoint::parse("ftp://x").is_err());
        let (e, path) = Endpoint::parse_url("http://enrich.local:8080/v2/lookup?x=1").unwrap();
        assert_eq!((e.prefix.as_str(), path.as_str()), ("", "/v2/lookup?x=1"));
    }

    /// A local HTTP/1.1 server (127.0.0.1) answering each request with the number of its
    /// connection, the path and the body; with `close` it ends every connection after one
    /// answer. Returns its base URL and the count of accepted connections.
    async fn server(close: bool) -> (String, Arc<AtomicUsize>) {
        use hyper::body::Incoming;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/base", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let svc =
                    hyper::service::service_fn(move |req: hyper::Request<Incoming>| async move {
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await?.to_bytes();
                        let text = format!("{n} {path} {}", String::from_utf8_lossy(&body));
                        let mut answer = hyper::Response::new(Full::new(Bytes::from(text)));
                        if close {
                            answer
                                .headers_mut()
                                .insert(hyper::header::CONNECTION, "close".parse().unwrap());
                        }
                        Ok::<_, hyper::Error>(answer)
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(!close)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
                );
            }
        });
        (url, accepted)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Requests to one host reuse one kept-alive connection; a server that closes each
    /// connection gets a new one per request, and every answer is still read whole.
    #[test]
    fn requests_share_a_kept_alive_connection_per_host() {
        runtime().block_on(async {
            let (url, accepted) = server(false).await;
            let e = Endpoint::parse(&url).unwrap();
            for i in 0..5 {
                let a = post_json(&e, "/x", &[], format!("b{i}").into_bytes())
                    .await
                    .unwrap();
                assert_eq!(a.status, 200);
                assert_eq!(a.body, format!("1 /base/x b{i}"));
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1);

            let (url, accepted) = server(true).await;
            let e = Endpoint::parse(&url).unwrap();
            for i in 0..3 {
                let a = send("PUT", &e, "/y?q=1", &[], &[], b"z".to_vec())
                    .await
                    .unwrap();
                assert_eq!(a.body, format!("{} /base/y z", i + 1));
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 3);
        });
    }

    /// A host nobody listens on is named in the error, as a connection failure.
    #[test]
    fn a_refused_connection_names_the_host() {
        runtime().block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            drop(listener);
            let e = Endpoint::parse(&format!("http://{addr}")).unwrap();
            let err = post_json(&e, "/", &[], Vec::new()).await.unwrap_err();
            assert!(err.starts_with(&format!("connecting to {addr}: ")), "{err}");
        });
    }
}
