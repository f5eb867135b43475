//! The amidala client library: the wire protocol shared with `amidalad` ([`proto`]) and a
//! blocking [`Client`] that speaks it over the daemon's Unix socket.

pub mod proto;

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use proto::{decode, encode_frame, ErrorReply, FrameDecoder, FrameError, Request, Response};

/// The socket the daemon listens on unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/amidala/amidala.sock";

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    // The messages hold their causes; none is also given as a `source`, so that an error
    // chain printed in full (`{:#}`) does not say the cause twice.
    #[error("cannot reach amidalad at {path}: {error}; {}", connect_hint(.error))]
    Connect {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("talking to amidalad: {0}")]
    Io(std::io::Error),
    #[error("talking to amidalad: {0}")]
    Frame(FrameError),
    #[error("amidalad closed the connection")]
    Closed,
    #[error("amidalad speaks protocol {daemon}, this client speaks {client}")]
    ProtocolMismatch { daemon: u32, client: u32 },
    #[error("{}: {}", .0.code, .0.message)]
    Daemon(ErrorReply),
    #[error("amidalad sent an unexpected answer: {0}")]
    Unexpected(String),
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        ClientError::Frame(e)
    }
}

/// A connection to `amidalad`.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    decoder: FrameDecoder,
    daemon_version: String,
}

/// What to do about a socket that cannot be reached.
fn connect_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            "only members of group amidala may use it: ask for membership \
             (`sudo usermod -aG amidala $USER`), then log in again"
        }
        _ => {
            "is amidalad running? (`systemctl status amidalad.socket amidalad`; a daemon \
             elsewhere: --socket PATH or AMIDALA_SOCKET)"
        }
    }
}

impl Client {
    /// Connects and exchanges hellos.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|error| ClientError::Connect {
            path: path.to_owned(),
            error,
        })?;
        let mut client = Client {
            stream,
            decoder: FrameDecoder::new(),
            daemon_version: String::new(),
        };
        let sent = client.send(
            &Request::Hello {
                protocol: proto::PROTOCOL_VERSION,
                client: format!("amidala {}", env!("CARGO_PKG_VERSION")),
            },
            None,
        );
        // A daemon that refuses the connection (a limit reached) says why at once and closes
        // it, maybe before the hello arrives: its answer is read whatever the send did.
        let answer = client.recv();
        if let (Err(sent), Err(ClientError::Closed | ClientError::Io(_))) = (&sent, &answer) {
            return Err(ClientError::Io(std::io::Error::new(
                sent_kind(sent),
                sent.to_string(),
            )));
        }
        match answer? {
            Response::Hello { protocol, daemon } if protocol == proto::PROTOCOL_VERSION => {
                client.daemon_version = daemon;
                Ok(client)
            }
            Response::Hello { protocol, .. } => Err(ClientError::ProtocolMismatch {
                daemon: protocol,
                client: proto::PROTOCOL_VERSION,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// The version string the daemon sent in its hello.
    pub fn daemon_version(&self) -> &str {
        &self.daemon_version
    }

    /// Sends one request, with `fd` attached by `SCM_RIGHTS` if given.
    pub fn send(
        &mut self,
        request: &Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ClientError> {
        let frame = encode_frame(request)?;
        match fd {
            None => self.stream.write_all(&frame)?,
            Some(fd) => {
                let fds = [fd.as_raw_fd()];
                let cmsg = [ControlMessage::ScmRights(&fds)];
                // The descriptor rides on the first chunk; the rest of the frame follows plainly.
                let sent = sendmsg::<()>(
                    self.stream.as_fd().as_raw_fd(),
                    &[IoSlice::new(&frame)],
                    &cmsg,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)?;
                self.stream.write_all(&frame[sent..])?;
            }
        }
        Ok(())
    }

    /// Reads the next frame. An error frame is returned as [`ClientError::Daemon`].
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        loop {
            if let Some(body) = self.decoder.next_frame()? {
                return match decode::<Response>(&body)? {
                    Response::Error(err) => Err(ClientError::Daemon(err)),
                    other => Ok(other),
                };
            }
            let mut buf = [0u8; 16 * 1024];
            let n = self.stream.read(&mut buf)?;
            if n == 0 {
                self.decoder.finish()?;
                return Err(ClientError::Closed);
            }
            self.decoder.push(&buf[..n]);
        }
    }

    /// Reads the next frame, and the descriptor that came with it (`SCM_RIGHTS`), if any.
    pub fn recv_with_fd(&mut self) -> Result<(Response, Option<OwnedFd>), ClientError> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut received: Option<OwnedFd> = None;
        loop {
            if let Some(body) = self.decoder.next_frame()? {
                return match decode::<Response>(&body)? {
                    Response::Error(err) => Err(ClientError::Daemon(err)),
                    other => Ok((other, received)),
                };
            }
            let mut buf = [0u8; 16 * 1024];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let n = msg.bytes;
            for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = cmsg {
                    for fd in fds {
                        // SAFETY: the kernel just installed this descriptor for us; nothing
                        // else owns it. All but the first are closed right away.
                        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                        received.get_or_insert(fd);
                    }
                }
            }
            if n == 0 {
                self.decoder.finish()?;
                return Err(ClientError::Closed);
            }
            self.decoder.push(&buf[..n]);
        }
    }

    /// A second handle on the connection that sends requests while this one reads (a run's
    /// keystrokes).
    pub fn writer(&self) -> Result<Writer, ClientError> {
        Ok(Writer(self.stream.try_clone()?))
    }

    /// Sends a request and reads the single answer.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.send(request, None)?;
        self.recv()
    }
}

/// Sends requests on a connection another handle reads (see [`Client::writer`]).
#[derive(Debug)]
pub struct Writer(UnixStream);

impl Writer {
    pub fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        let frame = encode_frame(request)?;
        self.0.write_all(&frame)?;
        Ok(())
    }

    /// Says that nothing more will be sent; the other handle still reads.
    pub fn shutdown_write(&self) -> std::io::Result<()> {
        self.0.shutdown(std::net::Shutdown::Write)
    }
}

fn sent_kind(e: &ClientError) -> std::io::ErrorKind {
    match e {
        ClientError::Io(e) => e.kind(),
        _ => std::io::ErrorKind::Other,
    }
}

/// The error for an answer that does not fit the request.
pub fn unexpected(response: Response) -> ClientError {
    let text = serde_json::to_string(&response).unwrap_or_else(|_| format!("{response:?}"));
    ClientError::Unexpected(text)
}
