//! A stream that replays bytes already read from it. The edge reads each HTTP/1 request head
//! before Pingora does; plaintext TCP streams can take those bytes back (`Stream::rewind`),
//! TLS streams cannot, so they are wrapped in a `Replay` that serves the head first and then
//! reads the inner stream. Everything else (writes, TLS and socket digests, ALPN, the
//! connection id) is the inner stream's.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::SslDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Debug)]
pub struct Replay {
    head: Vec<u8>,
    pos: usize,
    inner: Stream,
}

impl Replay {
    /// Puts `head` in front of the stream's next reads. A stream that is a `Replay` already
    /// takes the new head itself (the previous one was fully read by then): the wrapper is
    /// allocated once per connection, not once per request.
    pub fn rewind(stream: Stream, head: &[u8]) -> Stream {
        if stream.as_any().is::<Replay>() {
            let mut replay = stream
                .into_any()
                .downcast::<Replay>()
                .expect("checked by `is` above");
            replay.head.drain(..replay.pos);
            replay.pos = 0;
            replay.head.splice(0..0, head.iter().copied());
            return replay;
        }
        Box::new(Replay {
            head: head.to_vec(),
            pos: 0,
            inner: stream,
        })
    }
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.head.len() {
            let n = (this.head.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.head[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.head.len() {
                this.head.clear();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Replay {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Replay {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Replay {
    fn get_ssl(&self) -> Option<&pingora_core::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Replay {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Replay {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Replay {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

/// Peeking is only used to sniff the h2c preface, which never applies to a replayed stream.
#[async_trait]
impl Peek for Replay {}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn replays_the_head_then_reads_the_stream() {
        let (client, server) = tokio::net::UnixStream::pair().unwrap();
        let server: Stream = Box::new(pingora_core::protocols::l4::stream::Stream::from(server));
        let mut client = client;
        client.write_all(b"rest").await.unwrap();
        let mut s = Replay::rewind(server, b"head:");
        let mut got = vec![0u8; 9];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"head:rest");
        // A second rewind reuses the wrapper.
        let mut s = Replay::rewind(s, b"again");
        assert!(s.as_any().is::<Replay>());
        let mut got = vec![0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"again");
        s.write_all(b"pong").await.unwrap();
        s.flush().await.unwrap();
        let mut back = [0u8; 4];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"pong");
    }
}
