//! The printer clients' HTTP/1.1 transport: one connection per request over plain TCP (hyper).
//! `https://` endpoints are refused when the client is built; docs/printers.md says what
//! enabling them takes (a rustls connector wrapping the TCP stream before the handshake).

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::Uri;

/// Most answer bytes read (a Lob mailpiece answer is a few KiB).
const MAX_ANSWER: usize = 1 << 20;

/// Where requests go: host, port and the path prefix of the base URL.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    host: String,
    port: u16,
    host_header: String,
    prefix: String,
}

impl Endpoint {
    /// Parses a base URL such as `http://127.0.0.1:4010` or `http://printer.local/lob`.
    pub(crate) fn parse(base_url: &str) -> Result<Endpoint, String> {
        let uri: Uri = base_url
            .parse()
            .map_err(|e| format!("{base_url:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "{base_url:?}: https needs a TLS connector, which this build lacks (docs/printers.md)"
                ))
            }
            _ => return Err(format!("{base_url:?}: only http:// URLs can be called")),
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("{base_url:?}: no host"))?
            .to_string();
        let port = uri.port_u16().unwrap_or(80);
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
        })
    }
}

impl Endpoint {
    /// Parses a full URL into its endpoint and its path (with the query), for services called
    /// at one URL rather than under a base.
    pub(crate) fn parse_url(url: &str) -> Result<(Endpoint, String), String> {
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
pub(crate) struct Answer {
    pub(crate) status: u16,
    /// The raw `Retry-After` header, when present.
    pub(crate) retry_after: Option<String>,
    pub(crate) body: Bytes,
}

/// POSTs a JSON body. Any failure before the whole answer was read (connect, reset, a body cut
/// short) is an `Err`: the request may or may not have been processed by the server.
pub(crate) async fn post_json(
    endpoint: &Endpoint,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Answer, String> {
    let stream = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| format!("connecting to {}: {e}", endpoint.host_header))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake with {}: {e}", endpoint.host_header))?;
    let conn = tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(hyper::Method::POST)
        .uri(format!("{}{path}", endpoint.prefix))
        .header(hyper::header::HOST, &endpoint.host_header)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::USER_AGENT, "broadside-printers");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("building the request: {e}"))?;
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

/// `Basic` credentials for a user with an empty password (how Lob takes its API key).
pub(crate) fn basic_auth(user: &str) -> String {
    format!("Basic {}", base64(format!("{user}:").as_bytes()))
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded, "{plain:?}");
        }
        assert_eq!(basic_auth("test_key"), "Basic dGVzdF9rZXk6");
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
        let https = Endpoint::parse("https://api.lob.com").unwrap_err();
        assert!(https.contains("TLS connector"), "{https}");
        assert!(Endpoint::parse("ftp://x").is_err());
        let (e, path) = Endpoint::parse_url("http://enrich.local:8080/v2/lookup?x=1").unwrap();
        assert_eq!((e.prefix.as_str(), path.as_str()), ("", "/v2/lookup?x=1"));
    }
}
