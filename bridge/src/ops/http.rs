//! A minimal HTTP/1.1 server for the metrics port: `GET` (and `HEAD`)
//! only, one request per connection, bounded in size and time, no
//! keep-alive. A scraper and a browser need no more, and the node carries
//! no HTTP stack for it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::debug;

/// A request's head may be at most this long.
const MAX_HEAD: usize = 8 << 10;
/// A client has this long to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// An answer: status, content type, body.
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) body: Vec<u8>,
}

impl Response {
    pub(crate) fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type,
            body: body.into(),
        }
    }

    pub(crate) fn text(status: u16, body: &str) -> Self {
        Response::new(status, "text/plain; charset=utf-8", body)
    }
}

/// What answers a `GET` of a path.
pub(crate) trait Routes: Send + Sync + 'static {
    /// The answer for `path` (without the query string).
    fn get(&self, path: &str) -> Response;
}

/// Serves `listener` until `stop` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    routes: Arc<dyn Routes>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // Cancel-safe: a connection not yet accepted stays in the backlog.
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let routes = routes.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, routes.as_ref()).await {
                            debug!("metrics port: {e}");
                        }
                    });
                }
                Err(e) => {
                    debug!("metrics port: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = crate::link::stopped(&mut stop) => break,
        }
    }
}

/// A request's method and path, or the status that refuses it.
type Head<'a> = Result<(&'a str, &'a str), u16>;

/// The method and path of a request head, if it is complete and valid.
pub(crate) fn parse_head(head: &[u8]) -> Head<'_> {
    let text = std::str::from_utf8(head).map_err(|_| 400u16)?;
    let line = text.lines().next().ok_or(400u16)?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(target), Some(version), None) if version.starts_with("HTTP/1.") => {
            let path = target.split('?').next().unwrap_or(target);
            Ok((method, path))
        }
        _ => Err(400),
    }
}

async fn answer(mut stream: TcpStream, routes: &dyn Routes) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(false);
            }
            head.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let complete = match read {
        Ok(Ok(complete)) => complete,
        Ok(Err(e)) => return Err(e),
        Err(_) => false,
    };
    let (response, with_body) = if !complete {
        (
            Response::text(400, "incomplete or oversized request\n"),
            true,
        )
    } else {
        match parse_head(&head) {
            Ok(("GET", path)) => (routes.get(path), true),
            Ok(("HEAD", path)) => (routes.get(path), false),
            Ok(_) => (Response::text(405, "only GET and HEAD\n"), true),
            Err(status) => (Response::text(status, "bad request\n"), true),
        }
    };
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(&response.body);
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        let cases: [(&[u8], Head); 6] = [
            (
                b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                Ok(("GET", "/metrics")),
            ),
            (b"GET /?a=b HTTP/1.0\r\n\r\n", Ok(("GET", "/"))),
            (b"HEAD /healthz HTTP/1.1\r\n\r\n", Ok(("HEAD", "/healthz"))),
            (b"POST / HTTP/1.1\r\n\r\n", Ok(("POST", "/"))),
            (b"GET /\r\n\r\n", Err(400)),
            (b"\xff\xfe\r\n\r\n", Err(400)),
        ];
        for (head, expected) in cases {
            assert_eq!(parse_head(head), expected, "{head:?}");
        }
    }
}
