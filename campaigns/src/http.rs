//! Event callbacks and template sync call out through the shared HTTP/1.1 client
//! (`broadside-net`: one connection per request, `http://` and `https://`).

/// Most answer bytes kept (answers are only logged).
const MAX_ANSWER: usize = 4096;

/// Sends one request to `url` (its path and query go out as configured: a callback URL's
/// query string is forwarded); returns the status and the start of the answer body, or why it
/// failed.
pub(crate) async fn send(
    method: &str,
    url: &str,
    content_type: &str,
    bearer: Option<&str>,
    body: String,
) -> Result<(u16, String), String> {
    let (endpoint, path) = broadside_net::Endpoint::parse_url(url)?;
    let auth = bearer.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", content_type)];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let answer =
        broadside_net::send(method, &endpoint, &path, &[], &headers, body.into_bytes()).await?;
    let text =
        String::from_utf8_lossy(&answer.body[..answer.body.len().min(MAX_ANSWER)]).into_owned();
    Ok((answer.status, text))
}
