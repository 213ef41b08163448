//! WebSocket listeners (`protocol = "ws"` and `"wss"`): MQTT over
//! WebSocket (MQTT 5 §6, MQTT 3.1.1 §6). The HTTP upgrade is checked
//! against the listener's path and the `mqtt` subprotocol
//! ([`upgrade_answer`], a pure function); after it the binary messages are
//! one byte stream ([`WsReader`], [`WsWriter`]) that the same connection
//! engine as TCP reads and writes. MQTT packets and WebSocket messages
//! need not line up: a packet may span messages and a message may carry
//! several packets.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The subprotocols we answer, in order of preference: `mqtt` is the
/// standard's name; `mqttv3.1` is what some MQTT 3.1 era clients offer.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// What a WebSocket message may carry beyond one packet of the largest
/// size we accept: a client may put several packets in one message.
const MESSAGE_SLACK: usize = 1 << 20;

/// Read buffer of one WebSocket connection. Small: most MQTT packets are,
/// and every idle WebSocket connection keeps one.
const READ_BUFFER: usize = 8 * 1024;

/// Why an upgrade request is refused, as the HTTP answer says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) reason: &'static str,
}

/// Decides the answer to an upgrade request for `path` offering the
/// subprotocols `offered` (the `Sec-WebSocket-Protocol` values, comma
/// separated, possibly several headers) on a listener serving
/// `listener_path`: the subprotocol to select, `None` when the client
/// offered none (accepted: some clients never send the header), or why
/// not. The query string does not take part in the match.
pub(crate) fn upgrade_answer<'a>(
    path: &str,
    offered: impl IntoIterator<Item = &'a str>,
    listener_path: &str,
) -> Result<Option<&'static str>, Refusal> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if path != listener_path {
        return Err(Refusal {
            status: 404,
            reason: "no MQTT endpoint at this path",
        });
    }
    let offered: Vec<&str> = offered
        .into_iter()
        .flat_map(|header| header.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(None);
    }
    SUBPROTOCOLS
        .iter()
        .find(|ours| offered.iter().any(|p| p.eq_ignore_ascii_case(ours)))
        .map(|ours| Some(*ours))
        .ok_or(Refusal {
            status: 400,
            reason: "the WebSocket subprotocol must be mqtt",
        })
}

/// Runs the HTTP upgrade on `stream` for `listener_path` and returns the
/// connection's two halves. Messages larger than `max_packet_size` plus
/// [`MESSAGE_SLACK`] are refused by the WebSocket layer.
pub(crate) async fn accept<S>(
    stream: S,
    listener_path: &str,
    max_packet_size: u32,
) -> Result<(WsReader<S>, WsWriter<S>), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max_message = usize::try_from(max_packet_size)
        .unwrap_or(usize::MAX)
        .saturating_add(MESSAGE_SLACK);
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // Our connection engine gathers what it owes into one write;
        // each write is one message, sent at once.
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    // The shape tungstenite's `Callback` asks for, large error included.
    #[allow(clippy::result_large_err)]
    let answer = |request: &Request, mut response: Response| {
        let offered = request
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok());
        match upgrade_answer(request.uri().path(), offered, listener_path) {
            Ok(Some(protocol)) => {
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(protocol),
                );
                Ok(response)
            }
            Ok(None) => Ok(response),
            Err(refusal) => Err(refused(&refusal)),
        }
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, answer, Some(config)).await?;
    let (sink, stream) = ws.split();
    Ok((
        WsReader {
            stream,
            pending: Bytes::new(),
        },
        WsWriter { sink, sent: None },
    ))
}

/// The HTTP answer of a refused upgrade.
fn refused(refusal: &Refusal) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(refusal.reason.to_owned()));
    *response.status_mut() =
        StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST);
    response
}

/// The receiving half: the payloads of binary messages, in order, as one
/// byte stream. A close (or the end of the connection) is the end of the
/// stream; a text message is an error ([MQTT-6.0.0-1]: MQTT travels in
/// binary messages only, and the connection is closed otherwise).
pub(crate) struct WsReader<S> {
    stream: SplitStream<WebSocketStream<S>>,
    /// What is left of the last binary message.
    pending: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsReader<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(self.stream.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                // Pings are answered by the WebSocket layer itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                // A peer that goes without the closing handshake has
                // ended the stream as a TCP peer does with its FIN.
                None
                | Some(Ok(Message::Close(_)))
                | Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text WebSocket message: MQTT travels in binary messages only",
                    )));
                }
                Some(Err(e)) => return Poll::Ready(Err(into_io(e))),
            }
        }
    }
}

/// The sending half: each write is one binary message, and a write
/// completes once its message is on the socket (the split sink and the
/// WebSocket layer both hold what they accept until flushed; our engine
/// never flushes a TCP stream, so the writer does it). Shutting down sends
/// a WebSocket close.
///
/// A write that returned `Pending` has already taken its bytes: the caller
/// must call again with the same bytes first (more may follow them), as
/// the connection engine does, whose write buffer only ever grows at the
/// end until a write completes.
pub(crate) struct WsWriter<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    /// The length of a message handed over whose flush has not completed.
    sent: Option<usize>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsWriter<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.sent.is_none() {
            ready!(self.sink.poll_ready_unpin(cx)).map_err(into_io)?;
            Pin::new(&mut self.sink)
                .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
                .map_err(into_io)?;
            self.sent = Some(buf.len());
        }
        ready!(self.sink.poll_flush_unpin(cx)).map_err(into_io)?;
        Poll::Ready(Ok(self.sent.take().unwrap_or(0)))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.sink.poll_flush_unpin(cx).map_err(into_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.sink.poll_close_unpin(cx).map_err(into_io)
    }
}

/// A WebSocket error as the connection engine sees errors: a closed
/// connection is a broken pipe, a protocol violation invalid data.
fn into_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn upgrade_answers() {
        let not_here = Err(Refusal {
            status: 404,
            reason: "no MQTT endpoint at this path",
        });
        let wrong_protocol = Err(Refusal {
            status: 400,
            reason: "the WebSocket subprotocol must be mqtt",
        });
        type Case<'a> = (
            &'a str,
            &'a [&'a str],
            &'a str,
            Result<Option<&'a str>, Refusal>,
        );
        let cases: &[Case] = &[
            ("/mqtt", &["mqtt"], "/mqtt", Ok(Some("mqtt"))),
            ("/mqtt?token=1", &["mqtt"], "/mqtt", Ok(Some("mqtt"))),
            ("/mqtt", &["MQTT"], "/mqtt", Ok(Some("mqtt"))),
            ("/mqtt", &["mqttv3.1"], "/mqtt", Ok(Some("mqttv3.1"))),
            ("/mqtt", &["mqttv3.1, mqtt"], "/mqtt", Ok(Some("mqtt"))),
            ("/mqtt", &["chat", "mqtt"], "/mqtt", Ok(Some("mqtt"))),
            ("/mqtt", &[], "/mqtt", Ok(None)),
            ("/mqtt", &[" , "], "/mqtt", Ok(None)),
            ("/", &["mqtt"], "/", Ok(Some("mqtt"))),
            ("/mqtt", &["chat"], "/mqtt", wrong_protocol),
            ("/", &["mqtt"], "/mqtt", not_here.clone()),
            ("/mqtt/", &["mqtt"], "/mqtt", not_here.clone()),
            ("/MQTT", &["mqtt"], "/mqtt", not_here),
        ];
        for (path, offered, listener, expected) in cases {
            assert_eq!(
                &upgrade_answer(path, offered.iter().copied(), listener),
                expected,
                "{path} offering {offered:?} on {listener}"
            );
        }
    }

    /// A client WebSocket over an in-memory pipe to [`accept`].
    async fn pair() -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WsReader<tokio::io::DuplexStream>,
        WsWriter<tokio::io::DuplexStream>,
    ) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { accept(server, "/mqtt", 1024).await });
        let request = {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut request = "ws://localhost/mqtt".into_client_request().unwrap();
            request.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static("mqtt"),
            );
            request
        };
        let (client, response) = tokio_tungstenite::client_async(request, client)
            .await
            .unwrap();
        assert_eq!(
            response
                .headers()
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .unwrap(),
            "mqtt"
        );
        let (reader, writer) = server.await.unwrap().unwrap();
        (client, reader, writer)
    }

    #[tokio::test]
    async fn messages_are_one_byte_stream_both_ways() {
        let (mut client, mut reader, mut writer) = pair().await;
        // One packet split over two messages, then two in one message.
        for part in [&b"\x10\x02"[..], b"ab", b"\xc0\x00\xe0\x00"] {
            client
                .send(Message::Binary(Bytes::copy_from_slice(part)))
                .await
                .unwrap();
        }
        client.send(Message::Ping(Bytes::new())).await.unwrap();
        let mut got = [0u8; 8];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x10\x02ab\xc0\x00\xe0\x00");

        // No flush: the connection engine never flushes, so a write must
        // reach the peer by itself (it stayed in the split sink once, and
        // no CONNACK ever reached a WebSocket client).
        writer.write_all(b"\x20\x02\x00\x00").await.unwrap();
        let mut received = Vec::new();
        while received.len() < 4 {
            match client.next().await.unwrap().unwrap() {
                Message::Binary(data) => received.extend_from_slice(&data),
                Message::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(received, b"\x20\x02\x00\x00");

        // Our shutdown is a WebSocket close; the client's close ends our
        // byte stream.
        writer.shutdown().await.unwrap();
        assert!(matches!(
            client.next().await.unwrap().unwrap(),
            Message::Close(_)
        ));
        drop(client);
        let mut rest = Vec::new();
        assert_eq!(reader.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_text_message_is_an_error() {
        let (mut client, mut reader, _writer) = pair().await;
        client.send(Message::Text("hello".into())).await.unwrap();
        let e = reader.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_an_error() {
        let (mut client, mut reader, _writer) = pair().await;
        let big = vec![0u8; 1024 + MESSAGE_SLACK + 1];
        // The client's write stalls once we stop reading; the reader's
        // error is what matters.
        tokio::spawn(async move { client.send(Message::Binary(big.into())).await });
        let e = reader.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_wrong_path_is_refused_with_404() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { accept(server, "/mqtt", 1024).await });
        let e = tokio_tungstenite::client_async("ws://localhost/other", client)
            .await
            .unwrap_err();
        match e {
            WsError::Http(response) => assert_eq!(response.status(), 404),
            other => panic!("unexpected {other:?}"),
        }
        assert!(server.await.unwrap().is_err());
    }
}
