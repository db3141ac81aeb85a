//! The small HTTP/1.1 client event callbacks and template sync share: one connection per
//! request, plain `http://` only (docs/campaigns.md says what https needs).

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};

/// Most answer bytes kept (answers are only logged).
const MAX_ANSWER: usize = 4096;

/// Sends one request; returns the status and the start of the answer body, or why it failed.
pub(crate) async fn send(
    method: &str,
    url: &str,
    content_type: &str,
    bearer: Option<&str>,
    body: String,
) -> Result<(u16, String), String> {
    let uri: axum::http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err("https needs a TLS connector, which this build lacks".into());
        }
        _ => return Err("only http:// URLs can be called".into()),
    }
    let host = uri.host().ok_or("no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let host_header = match uri.port_u16() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    // The path and query go out as configured: a callback URL's query string is forwarded.
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = hyper::Request::builder().method(method);
    if let Some(token) = bearer {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req
        .uri(path)
        .header(hyper::header::HOST, host_header)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header(hyper::header::USER_AGENT, "broadside-campaigns")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("building the request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let status = resp.status().as_u16();
    let answer = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let answer = String::from_utf8_lossy(&answer[..answer.len().min(MAX_ANSWER)]).into_owned();
    Ok((status, answer))
}
