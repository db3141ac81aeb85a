//! The HTTP/1.1 client Broadside's outbound calls share (printers, address enrichment, event
//! callbacks, template sync): one connection per request (hyper), over plain TCP for `http://`
//! and over TLS for `https://` (rustls with the platform's trust store, loaded once per
//! process; `SSL_CERT_FILE` / `SSL_CERT_DIR` add a private CA).
#![warn(missing_docs, unreachable_pub)]

use std::sync::{Arc, OnceLock};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::Uri;
use rustls::pki_types::ServerName;

/// Most answer bytes read (a Lob mailpiece answer is a few KiB).
const MAX_ANSWER: usize = 1 << 20;

/// Where requests go: host, port, TLS and the path prefix of the base URL.
#[derive(Debug, Clone)]
pub struct Endpoint {
    host: String,
    port: u16,
    host_header: String,
    prefix: String,
    /// `https://`: the name the server's certificate must carry.
    tls: Option<ServerName<'static>>,
}

impl Endpoint {
    /// Parses a base URL such as `http://127.0.0.1:4010` or `http://printer.local/lob`.
    pub fn parse(base_url: &str) -> Result<Endpoint, String> {
        let uri: Uri = base_url
            .parse()
            .map_err(|e| format!("{base_url:?} is not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(format!(
                    "{base_url:?}: only http:// and https:// URLs can be called"
                ))
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("{base_url:?}: no host"))?
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let name = host.trim_matches(['[', ']']).to_string();
            Some(ServerName::try_from(name).map_err(|e| format!("{base_url:?}: {e}"))?)
        } else {
            None
        };
        let host_header = match uri.port_u16() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(Endpoint {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
            host_header,
            prefix,
            tls,
        })
    }
}

/// The TLS client settings, built once: the platform's trust store (rustls-native-certs reads
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` when set, e.g. to trust a private CA), TLS 1.2 and 1.3.
fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    static CONNECTOR: OnceLock<Result<tokio_rustls::TlsConnector, String>> = OnceLock::new();
    CONNECTOR
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
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS settings: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
        })
        .clone()
}

/// Sends one request over an established connection and reads the whole answer.
async fn exchange<S>(
    endpoint: &Endpoint,
    stream: S,
    req: hyper::Request<Full<Bytes>>,
) -> Result<Answer, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake with {}: {e}", endpoint.host_header))?;
    let conn = tokio::spawn(conn);
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("sending to {}: {e}", endpoint.host_header))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer from {}: {e}", endpoint.host_header))?
            .to_bytes();
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }
    .await;
    // One request per connection: close it whatever happened.
    conn.abort();
    result
}

impl Endpoint {
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

/// Sends one request (`path` is appended to the endpoint's prefix and may carry a query) with
/// `defaults` and then `headers` (a `User-Agent` and `Host` are added). Any failure before the
/// whole answer was read (connect, TLS, reset, a body cut short) is an `Err`: the request may
/// or may not have been processed by the server.
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
    let stream = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| format!("connecting to {}: {e}", endpoint.host_header))?;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", endpoint.prefix))
        .header(hyper::header::HOST, &endpoint.host_header)
        .header(hyper::header::USER_AGENT, "broadside");
    for (name, value) in defaults.iter().chain(headers) {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("building the request: {e}"))?;
    match &endpoint.tls {
        None => exchange(endpoint, stream, req).await,
        Some(name) => {
            let tls = tls_connector()?
                .connect(name.clone(), stream)
                .await
                .map_err(|e| format!("TLS with {}: {e}", endpoint.host_header))?;
            exchange(endpoint, tls, req).await
        }
    }
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

    #[test]
    fn basic_credentials_are_base64_of_user_and_empty_password() {
        assert_eq!(basic_auth("test_key"), "Basic dGVzdF9rZXk6");
        assert_eq!(basic_auth("f"), "Basic Zjo=");
    }

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("http://127.0.0.1:4010/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.prefix.as_str()),
            ("127.0.0.1", 4010, "")
        );
        let e = Endpoint::parse("http://printer.local/lob").unwrap();
        assert_eq!(
            (e.port, e.prefix.as_str(), e.host_header.as_str()),
            (80, "/lob", "printer.local")
        );
        let https = Endpoint::parse("https://api.lob.com").unwrap();
        assert_eq!((https.port, https.tls.is_some()), (443, true));
        assert!(Endpoint::parse("ftp://x").is_err());
        let (e, path) = Endpoint::parse_url("http://enrich.local:8080/v2/lookup?x=1").unwrap();
        assert_eq!((e.prefix.as_str(), path.as_str()), ("", "/v2/lookup?x=1"));
    }
}
