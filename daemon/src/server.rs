//! The Unix socket: one task per connection, peer credentials read at accept, frames decoded
//! with a size cap, descriptors received with `SCM_RIGHTS`. A bad frame closes only its own
//! connection, after an error frame saying what was wrong.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use amidala::proto::{
    self, decode, encode_frame, owner_uid, validate_id, validate_user_tags, BuildPlan, BuildSpec,
    BuildState, ErrorCode, FrameDecoder, FrameError, ImageInfo, ImportSpec, Request, Response,
    SnapshotInfo, Source, MAX_COMMAND_ARGS, MAX_COMMAND_BYTES, PROTOCOL_VERSION, PUBLISHED_TAG,
};
use chrono::Utc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::watch;

use crate::build::{self, BuildHandle, LogProgress};
use crate::catalog::{BuildRecord, SnapshotRecord};
use crate::error::Failure;
use crate::ids::new_id;
use crate::import::{self, Requester};
use crate::provider::{not_yours, Viewer, NO_OWNER};
use crate::Daemon;

/// Most descriptors one request may carry.
const MAX_FDS: usize = 2;

/// `CMSG_SPACE` of `fds` descriptors, as a constant.
const fn cmsg_space(fds: usize) -> usize {
    let align = std::mem::size_of::<usize>();
    let header = (std::mem::size_of::<libc::cmsghdr>() + align - 1) & !(align - 1);
    let data = (fds * std::mem::size_of::<RawFd>() + align - 1) & !(align - 1);
    header + data
}
/// Most provisioner options, and their sizes.
const MAX_OPTIONS: usize = 64;
const MAX_OPTION_VALUE: usize = 64 * 1024;

use crate::policy::Action;
pub use crate::policy::Peer;

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("no complete request within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("a request carried more than {MAX_FDS} descriptors")]
    TooManyFds,
}

impl ReadError {
    fn code(&self) -> ErrorCode {
        match self {
            ReadError::Frame(e) => e.code(),
            ReadError::Io(_) => ErrorCode::Io,
            ReadError::Timeout(_) | ReadError::TooManyFds => ErrorCode::BadRequest,
        }
    }
}

/// How long a client that streams a VM's console may take to read what it is sent.
const STALLED: Duration = Duration::from_secs(60);

struct Conn {
    stream: UnixStream,
    timeout: Duration,
    decoder: FrameDecoder,
    fds: VecDeque<OwnedFd>,
}

impl Conn {
    /// One `recvmsg`: the bytes read, the descriptors that came with them, and whether the
    /// kernel had to drop control data (more descriptors than the buffer holds). Every
    /// descriptor the kernel installed is owned (and so closed) whatever the message held:
    /// a truncated one is where a naive reader leaks them.
    fn recv_some(&self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
        // Room for one descriptor more than a request may carry, so that one too many is
        // seen as such rather than as a truncation.
        const SPACE: usize = cmsg_space(MAX_FDS + 1);
        let mut control = [0u64; SPACE.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; all zeroes is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = SPACE as _;
        // SAFETY: `msg` points at `iov` (into `buf`) and `control`, both valid for writes of
        // the lengths given, for the duration of the call.
        let n = unsafe {
            libc::recvmsg(
                self.stream.as_raw_fd(),
                &mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fds = Vec::new();
        // SAFETY: the kernel filled `msg.msg_control` with `msg.msg_controllen` bytes of
        // well-formed control messages (a truncated message is cut at a header boundary);
        // CMSG_FIRSTHDR/CMSG_NXTHDR stay within them.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: `cmsg` is a header within the control buffer (see above).
            let header = unsafe { &*cmsg };
            if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: as above; the data of the header follows it in the buffer.
                let data = unsafe { libc::CMSG_DATA(cmsg) };
                // SAFETY: CMSG_LEN(0) is a constant computation.
                let payload = header.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    // SAFETY: `i` indexes a descriptor within the header's data (which may be
                    // unaligned, hence read_unaligned).
                    let fd = unsafe { data.cast::<RawFd>().add(i).read_unaligned() };
                    // SAFETY: the kernel just installed this descriptor in our table for
                    // us; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            // SAFETY: as above.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
        Ok((n as usize, fds, truncated))
    }

    /// The next request and the descriptors that came with it; `None` at a clean end.
    async fn read_request(&mut self) -> Result<Option<(Request, Vec<OwnedFd>)>, ReadError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.read_request_inner())
            .await
            .unwrap_or(Err(ReadError::Timeout(timeout)))
    }

    async fn read_request_inner(&mut self) -> Result<Option<(Request, Vec<OwnedFd>)>, ReadError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(body) = self.decoder.next_frame()? {
                let request = decode::<Request>(&body)?;
                return Ok(Some((request, self.fds.drain(..).collect())));
            }
            let (n, fds, truncated) = self
                .stream
                .async_io(Interest::READABLE, || self.recv_some(&mut buf))
                .await?;
            self.fds.extend(fds);
            if truncated || self.fds.len() > MAX_FDS {
                return Err(ReadError::TooManyFds);
            }
            if n == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
            self.decoder.push(&buf[..n]);
        }
    }

    async fn send(&mut self, response: &Response) -> io::Result<()> {
        let frame = encode_frame(response).map_err(io::Error::other)?;
        self.stream.write_all(&frame).await
    }

    /// Sends `response` with `fd` attached (`SCM_RIGHTS`) to its first bytes.
    async fn send_with_fd(&mut self, response: &Response, fd: BorrowedFd<'_>) -> io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let frame = encode_frame(response).map_err(io::Error::other)?;
        let fds = [fd.as_raw_fd()];
        let sent = self
            .stream
            .async_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    self.stream.as_raw_fd(),
                    &[io::IoSlice::new(&frame)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                    None,
                )
                .map_err(io::Error::from)
            })
            .await?;
        self.stream.write_all(&frame[sent..]).await
    }

    /// [`send`](Self::send), given up (as if the client had gone) when the client has not
    /// taken it within [`STALLED`]: what waits on a client that reads nothing must not hold a
    /// VM, a build slot or the daemon's shutdown.
    async fn send_or_drop(&mut self, response: &Response) -> io::Result<()> {
        tokio::time::timeout(STALLED, self.send(response))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client read nothing for a minute",
                ))
            })
    }

    async fn send_error(&mut self, failure: &Failure) -> io::Result<()> {
        self.send(&Response::Error(failure.reply())).await
    }
}

/// One of a user's open connections; released when dropped.
struct ConnectionSlot<'a> {
    daemon: &'a Daemon,
    uid: u32,
}

impl<'a> ConnectionSlot<'a> {
    /// A connection of `peer`'s, within their share and the daemon's total (which admins may
    /// exceed, so that one can always look at a daemon others flood).
    fn take(daemon: &'a Daemon, peer: &Peer) -> Result<ConnectionSlot<'a>, Failure> {
        let limits = &daemon.config.limits;
        let admin = daemon.policy.role(peer) == crate::policy::Role::Admin;
        let mut open = daemon.connections.lock().expect("connections lock");
        let total: usize = open.values().sum();
        let uid = peer.uid;
        let count = open.get(&uid).copied().unwrap_or(0);
        if count >= limits.max_connections_per_user {
            return Err(Failure::new(
                ErrorCode::LimitExceeded,
                format!(
                    "uid {uid} has {count} connections open; the limit is {}",
                    limits.max_connections_per_user
                ),
            ));
        }
        if total >= limits.max_connections && !admin {
            return Err(Failure::new(
                ErrorCode::LimitExceeded,
                format!(
                    "amidalad has {total} connections open; the limit is {} (max_connections)",
                    limits.max_connections
                ),
            ));
        }
        *open.entry(uid).or_insert(0) += 1;
        Ok(ConnectionSlot { daemon, uid })
    }
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        let mut open = self.daemon.connections.lock().expect("connections lock");
        if let Some(count) = open.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// Serves one connection until the client closes it or breaks the protocol.
pub async fn handle_connection(daemon: Arc<Daemon>, stream: UnixStream) {
    use std::os::fd::AsFd;
    let credentials = stream.peer_cred().and_then(|cred| {
        Ok(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups: crate::policy::peer_groups(stream.as_fd())?,
        })
    });
    let peer = match credentials {
        Ok(peer) => peer,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials; closing");
            return;
        }
    };
    let mut conn = Conn {
        stream,
        timeout: Duration::from_secs(daemon.config.limits.request_timeout),
        decoder: FrameDecoder::new(),
        fds: VecDeque::new(),
    };
    let _slot = match ConnectionSlot::take(&daemon, &peer) {
        Ok(slot) => slot,
        Err(refused) => {
            tracing::warn!(uid = peer.uid, pid = ?peer.pid, "refused: {}", refused.message);
            // Said at once, without waiting for a request, and the connection closed: a
            // refused connection holds nothing (the client reads the answer to its hello).
            let _ = conn.send_error(&refused).await;
            return;
        }
    };
    let mut greeted = false;
    loop {
        let (request, fds) = match conn.read_request().await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(uid = peer.uid, pid = ?peer.pid, error = %e, "closing connection");
                let _ = conn
                    .send_error(&Failure::new(e.code(), e.to_string()))
                    .await;
                return;
            }
        };
        let result = match (greeted, request) {
            (false, Request::Hello { protocol, client }) if protocol == PROTOCOL_VERSION => {
                tracing::debug!(uid = peer.uid, pid = ?peer.pid, client, "hello");
                greeted = true;
                conn.send(&Response::Hello {
                    protocol: PROTOCOL_VERSION,
                    daemon: format!("amidalad {}", env!("CARGO_PKG_VERSION")),
                })
                .await
            }
            (false, Request::Hello { protocol, .. }) => {
                let _ = conn
                    .send_error(&Failure::new(
                        ErrorCode::ProtocolMismatch,
                        format!(
                            "client speaks protocol {protocol}, amidalad speaks {PROTOCOL_VERSION}"
                        ),
                    ))
                    .await;
                return;
            }
            (false, _) => {
                let _ = conn
                    .send_error(&Failure::new(
                        ErrorCode::BadRequest,
                        "the first request must be hello",
                    ))
                    .await;
                return;
            }
            (true, Request::Hello { .. }) => {
                conn.send_error(&Failure::new(ErrorCode::BadRequest, "hello sent twice"))
                    .await
            }
            (true, request) => dispatch(&daemon, &mut conn, &peer, request, fds).await,
        };
        if let Err(e) = result {
            tracing::debug!(uid = peer.uid, error = %e, "client went away");
            return;
        }
    }
}

/// The one descriptor a request carries, which must be open for reading: an `O_PATH`
/// descriptor proves no read access (one can be had for a directory nobody may list), and
/// the daemon acts on a descriptor only with the access the client was given to it.
fn one_fd(fds: Vec<OwnedFd>, what: &str) -> Result<OwnedFd, Failure> {
    let mut fds = fds.into_iter();
    let fd = match (fds.next(), fds.next()) {
        (Some(fd), None) => fd,
        _ => {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("the request must carry exactly one descriptor: {what}"),
            ))
        }
    };
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| Failure::io(format!("reading the flags of {what}"), e))?;
    let readable = matches!(flags & libc::O_ACCMODE, libc::O_RDONLY | libc::O_RDWR);
    if flags & libc::O_PATH != 0 || !readable {
        return Err(Failure::invalid(format!(
            "{what} must be a descriptor opened for reading (not O_PATH, not write-only)"
        )));
    }
    Ok(fd)
}

/// The action a request asks for, as the policy judges it (for a build: once its owner is known).
fn action_of(request: &Request) -> Action {
    match request {
        // A boot test is a build's worth of CPU and memory.
        Request::Build(_)
        | Request::Validate(_)
        | Request::BootTest { .. }
        | Request::Run { .. } => Action::Build,
        // Judged as the run it belongs to.
        Request::Input { .. } => Action::Describe,
        Request::ImportBase(_) => Action::Import,
        Request::List => Action::ListBuilds,
        Request::Images | Request::Snapshots => Action::ListImages,
        Request::Hello { .. } | Request::Plugins | Request::Version => Action::Describe,
        Request::Gc { .. } => Action::Gc,
        Request::Publish { .. } => Action::Publish,
        // Judged against the owner once the image or snapshot is found.
        Request::Delete { .. } | Request::Export { .. } => Action::ManageImages,
        // Judged against the build's owner once it is found; builders at least.
        Request::Status { .. } | Request::Logs { .. } | Request::Cancel { .. } => {
            Action::ListBuilds
        }
    }
}

async fn dispatch(
    daemon: &Arc<Daemon>,
    conn: &mut Conn,
    peer: &Peer,
    request: Request,
    fds: Vec<OwnedFd>,
) -> io::Result<()> {
    if let Err(refused) = daemon.policy.authorize(peer, action_of(&request)) {
        return conn.send_error(&refused).await;
    }
    match request {
        Request::Hello { .. } => unreachable!("handled by the caller"),
        Request::Build(spec) => match start_build(daemon, peer, spec, fds).await {
            Err(f) => conn.send_error(&f).await,
            Ok(handle) => {
                let detached = handle.record().spec.detach;
                let watch = second_handle(conn);
                let sent = conn
                    .send(&Response::Accepted {
                        build_id: handle.id.clone(),
                    })
                    .await;
                if detached {
                    return sent;
                }
                let progress = handle.log.subscribe();
                let log = daemon.catalog.build_log(&handle.id);
                let streamed = match (sent, watch) {
                    (Ok(()), Ok(watch)) => tokio::select! {
                        streamed = stream_log(conn, &log, Some(progress)) => streamed,
                        () = closed(&watch) => Ok(false),
                    },
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
                if !matches!(streamed, Ok(true)) && !handle.log.subscribe().borrow().done {
                    tracing::info!(build = %handle.id, uid = peer.uid, "the client went away: cancelling its build");
                    handle.note("amidala: the client went away: cancelling the build (amidala build --detach lets a build go on)");
                    handle.cancel.cancel();
                }
                streamed.map(drop)
            }
        },
        Request::ImportBase(spec) => import_base(daemon, conn, peer, spec, fds).await,
        Request::List => {
            // A live build's record is the one in memory (its progress is not all on disk);
            // taken first, so that a build ending meanwhile shows its final record from disk.
            let live: std::collections::HashMap<String, BuildRecord> = daemon
                .builds
                .lock()
                .expect("builds lock")
                .iter()
                .map(|(id, handle)| (id.clone(), handle.record()))
                .collect();
            let mut builds = daemon.catalog.builds().map_err(io::Error::other)?;
            for build in &mut builds {
                match live.get(&build.id) {
                    Some(record) if !build.state.is_terminal() => *build = record.clone(),
                    _ => {}
                }
            }
            builds.retain(|b| daemon.policy.sees(peer, b.owner_uid));
            builds.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
            conn.send(&Response::Builds(
                builds.iter().map(BuildRecord::info).collect(),
            ))
            .await
        }
        Request::Status { id } => match readable_build(daemon, peer, &id) {
            Ok(record) => conn.send(&Response::Build(record.info())).await,
            Err(f) => conn.send_error(&f).await,
        },
        Request::Logs { id, follow } => match readable_build(daemon, peer, &id) {
            Err(f) => conn.send_error(&f).await,
            Ok(_) => {
                let progress = if follow {
                    live(daemon, &id).map(|h| h.log.subscribe())
                } else {
                    None
                };
                let terminal = stream_log(conn, &daemon.catalog.build_log(&id), progress).await?;
                if !terminal {
                    conn.send(&Response::LogEnd).await?;
                }
                Ok(())
            }
        },
        Request::Cancel { id } => match cancel(daemon, peer, &id).await {
            Ok(record) => conn.send(&Response::Build(record.info())).await,
            Err(f) => conn.send_error(&f).await,
        },
        // A member sees their own images, and their own snapshots and the published ones (the
        // ones their builds may start from); admins see all.
        Request::Images => match daemon.provider.list_images().await {
            Ok(mut images) => {
                let viewer = daemon.policy.viewer(peer);
                images.retain(|i| viewer.owns(owner_uid(&i.tags).unwrap_or(NO_OWNER)));
                conn.send(&Response::Images(images)).await
            }
            Err(f) => conn.send_error(&f).await,
        },
        Request::Snapshots => match daemon.provider.list_snapshots().await {
            Ok(mut snapshots) => {
                let viewer = daemon.policy.viewer(peer);
                snapshots
                    .retain(|s| viewer.may_use(owner_uid(&s.tags).unwrap_or(NO_OWNER), &s.tags));
                conn.send(&Response::Snapshots(snapshots)).await
            }
            Err(f) => conn.send_error(&f).await,
        },
        Request::Publish {
            snapshot,
            published,
        } => match publish(daemon, peer, &snapshot, published).await {
            Ok(info) => conn.send(&Response::Snapshot(info)).await,
            Err(f) => conn.send_error(&f).await,
        },
        Request::Delete { id } => match delete(daemon, peer, &id).await {
            Ok(ids) => conn.send(&Response::Deleted { ids }).await,
            Err(f) => conn.send_error(&f).await,
        },
        Request::Export { id } => match export(daemon, peer, &id).await {
            Ok((info, file)) => {
                conn.send_with_fd(&Response::Export(info), file.as_fd())
                    .await
            }
            Err(f) => conn.send_error(&f).await,
        },
        Request::BootTest { id, test } => boot_test(daemon, conn, peer, &id, test).await,
        Request::Run { id, firmware } => run_vm(daemon, conn, peer, &id, firmware).await,
        Request::Input { .. } => {
            conn.send_error(&Failure::new(
                ErrorCode::BadRequest,
                "console input outside a run",
            ))
            .await
        }
        Request::Plugins => conn.send(&Response::Plugins(daemon.plugins.infos())).await,
        Request::Gc { dry_run } => {
            tracing::info!(uid = peer.uid, pid = ?peer.pid, dry_run, "gc");
            let scope = crate::gc::Scope {
                failed_snapshots: true,
                dry_run,
            };
            match crate::gc::collect(daemon, scope).await {
                Ok(items) => {
                    tracing::info!(dry_run, "gc: {}", crate::gc::describe(&items));
                    conn.send(&Response::Collected { dry_run, items }).await
                }
                Err(f) => conn.send_error(&f).await,
            }
        }
        Request::Validate(spec) => match plan_build(daemon, peer, spec).await {
            Ok(plan) => conn.send(&Response::Plan(plan)).await,
            Err(f) => conn.send_error(&f).await,
        },
        Request::Version => {
            conn.send(&Response::Version {
                daemon: env!("CARGO_PKG_VERSION").to_owned(),
                protocol: PROTOCOL_VERSION,
                provider: daemon.provider.name().to_owned(),
            })
            .await
        }
    }
}

/// A build `peer` may read: their own, or any for an admin.
fn readable_build(daemon: &Daemon, peer: &Peer, id: &str) -> Result<BuildRecord, Failure> {
    let record = find_build(daemon, id)?;
    daemon.policy.authorize(
        peer,
        Action::ReadBuild {
            owner: record.owner_uid,
        },
    )?;
    Ok(record)
}

fn live(daemon: &Daemon, id: &str) -> Option<Arc<BuildHandle>> {
    daemon.builds.lock().expect("builds lock").get(id).cloned()
}

fn find_build(daemon: &Daemon, id: &str) -> Result<BuildRecord, Failure> {
    validate_id("bld", id)?;
    if let Some(handle) = live(daemon, id) {
        return Ok(handle.record());
    }
    daemon
        .catalog
        .get_build(id)
        .map_err(|e| Failure::io("reading the build record", e))?
        .ok_or_else(|| Failure::new(ErrorCode::NotFound, format!("build {id} does not exist")))
}

async fn cancel(daemon: &Daemon, peer: &Peer, id: &str) -> Result<BuildRecord, Failure> {
    let record = find_build(daemon, id)?;
    daemon.policy.authorize(
        peer,
        Action::CancelBuild {
            owner: record.owner_uid,
        },
    )?;
    let Some(handle) = live(daemon, id) else {
        return Err(Failure::invalid(format!(
            "build {id} has already ended: {}",
            record.state.as_str()
        )));
    };
    tracing::info!(uid = peer.uid, build = id, "cancel requested");
    handle.cancel.cancel();
    let mut progress = handle.log.subscribe();
    // Wait for the teardown: the log is finished once the build has recorded its end.
    let _ = progress.wait_for(|p| p.done).await;
    Ok(handle.record())
}

/// Refuses a build beyond the user's share or a full queue.
fn check_build_limits(
    daemon: &Daemon,
    builds: &std::collections::HashMap<String, Arc<BuildHandle>>,
    peer: &Peer,
) -> Result<(), Failure> {
    let limits = &daemon.config.limits;
    let mine = builds.values().filter(|b| b.owner_uid == peer.uid).count();
    if mine >= limits.max_builds_per_user {
        return Err(Failure::new(
            ErrorCode::LimitExceeded,
            format!(
                "you have {mine} builds queued or running; the limit is {}",
                limits.max_builds_per_user
            ),
        ));
    }
    if builds.len() >= daemon.config.max_builds + limits.max_queued_builds {
        return Err(Failure::new(
            ErrorCode::LimitExceeded,
            format!(
                "the build queue is full ({} builds queued or running)",
                builds.len()
            ),
        ));
    }
    Ok(())
}

/// Checks a build request completely before anything is made.
fn check_spec(daemon: &Daemon, spec: &BuildSpec) -> Result<(), Failure> {
    match &spec.source {
        Source::Tag(tag) => tag.validate()?,
        Source::Snapshot(id) => validate_id("snap", id)?,
    }
    validate_user_tags("image tags", &spec.image_tags)?;
    validate_user_tags("snapshot tags", &spec.snapshot_tags)?;
    proto::validate_build_options(spec)?;
    daemon.provider.check_options(spec)?;
    if let Some(test) = &spec.boot_test {
        crate::bootvm::check_test(test, &daemon.config.boot_test, daemon.provider.name())?;
    }
    if spec.network.as_deref() == Some("no-metadata") && daemon.cgroups.is_none() {
        return Err(Failure::invalid(
            "--network no-metadata needs a cgroup v2 hierarchy to filter the build's traffic, and \
             this host has none (amidalad's log says why); use --network none",
        ));
    }
    for name in &spec.caches {
        if !daemon.config.caches.contains_key(name) {
            let known: Vec<&str> = daemon.config.caches.keys().map(String::as_str).collect();
            return Err(Failure::invalid(if known.is_empty() {
                format!(
                    "--cache {name}: this daemon has no package caches ([caches] in amidalad.toml)"
                )
            } else {
                format!(
                    "--cache {name}: no such cache; this daemon has {}",
                    known.join(", ")
                )
            }));
        }
    }
    // The name template must give a valid name whatever the build id and date.
    build::image_name(spec.name.as_deref(), &new_id("bld"), &Utc::now())?;
    if let Some(n) = spec.partition {
        if !(1..=128).contains(&n) {
            return Err(Failure::invalid(format!(
                "--partition {n} is out of range 1..128"
            )));
        }
    }
    if spec.command.len() > MAX_COMMAND_ARGS
        || spec.command.iter().map(String::len).sum::<usize>() > MAX_COMMAND_BYTES
    {
        return Err(Failure::invalid(format!(
            "the command is longer than {MAX_COMMAND_ARGS} arguments or {MAX_COMMAND_BYTES} bytes"
        )));
    }
    if spec.command.iter().any(|a| a.contains('\0')) {
        return Err(Failure::invalid("the command contains a NUL byte"));
    }
    if spec.options.len() > MAX_OPTIONS
        || spec
            .options
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > MAX_OPTION_VALUE)
    {
        return Err(Failure::invalid(format!("at most {MAX_OPTIONS} options, keys of 1 to 128 bytes, values up to {MAX_OPTION_VALUE} bytes")));
    }
    if !daemon.plugins.names().contains(&spec.provisioner.as_str()) {
        return Err(Failure::new(
            ErrorCode::UnknownProvisioner,
            format!(
                "no provisioner named {:?} is loaded (loaded: {})",
                spec.provisioner,
                daemon.plugins.names().join(", ")
            ),
        ));
    }
    Ok(())
}

/// The record of a new build of `spec` by `peer`, once every check a build makes before it
/// starts has passed (the policy's network, the spec, the provisioner's own validation), and
/// the plugin that will provision it. Makes nothing.
async fn checked_build(
    daemon: &Daemon,
    peer: &Peer,
    mut spec: BuildSpec,
) -> Result<(BuildRecord, Arc<crate::plugins::Plugin>), Failure> {
    proto::validate_build_options(&spec)?;
    spec.network = Some(daemon.policy.network(peer, spec.network.as_deref())?);
    spec.timeout = Some(build_timeout(daemon, peer, spec.timeout)?);
    check_spec(daemon, &spec)?;
    let record = BuildRecord {
        id: new_id("bld"),
        owner_uid: peer.uid,
        owner_pid: peer.pid,
        state: BuildState::Queued,
        phase: Some(proto::Phase::Queued),
        spec,
        source_snapshot: None,
        created: Utc::now(),
        finished: None,
        image_id: None,
        snapshot_id: None,
        error: None,
        volume_id: None,
        device: None,
    };
    let plugin = daemon
        .plugins
        .get(&record.spec.provisioner)
        .expect("checked by check_spec")
        .clone();
    plugin
        .validate_isolated(&build::plugin_build_info(&record, ""))
        .await?;
    Ok((record, plugin))
}

/// The snapshot `id` names (a snapshot, or an image's snapshot), if `viewer` may use it; and
/// the image, if it named one.
async fn find_snapshot(
    daemon: &Daemon,
    viewer: Viewer,
    id: &str,
) -> Result<(SnapshotInfo, Option<ImageInfo>), Failure> {
    let (snapshot_id, image) = if id.starts_with("ami-") {
        validate_id("ami", id)?;
        let image = daemon
            .provider
            .list_images()
            .await?
            .into_iter()
            .find(|i| i.id == id && viewer.owns(owner_uid(&i.tags).unwrap_or(NO_OWNER)))
            .ok_or_else(|| not_yours("image", id))?;
        (image.snapshot_id.clone(), Some(image))
    } else {
        validate_id("snap", id)?;
        (id.to_owned(), None)
    };
    let snapshot = daemon
        .provider
        .list_snapshots()
        .await?
        .into_iter()
        .find(|s| {
            s.id == snapshot_id && viewer.may_use(owner_uid(&s.tags).unwrap_or(NO_OWNER), &s.tags)
        })
        .ok_or_else(|| not_yours("snapshot", &snapshot_id))?;
    Ok((snapshot, image))
}

/// Publishes a snapshot for every member's builds, or takes it back (admins only).
async fn publish(
    daemon: &Daemon,
    peer: &Peer,
    id: &str,
    published: bool,
) -> Result<SnapshotInfo, Failure> {
    validate_id("snap", id)?;
    let (snapshot, _) = find_snapshot(daemon, daemon.policy.viewer(peer), id).await?;
    if published {
        let tags = [(PUBLISHED_TAG.to_owned(), "true".to_owned())].into();
        daemon.provider.tag_snapshot(id, &tags).await?;
    } else {
        daemon.provider.untag_snapshot(id, PUBLISHED_TAG).await?;
    }
    tracing::info!(uid = peer.uid, snapshot = id, published, owner = ?snapshot.tags.get(amidala::proto::OWNER_TAG), "publication changed");
    // The warm pool serves published snapshots.
    daemon.pool.wake();
    let (snapshot, _) = find_snapshot(daemon, daemon.policy.viewer(peer), id).await?;
    Ok(snapshot)
}

/// Deletes an image and its snapshot, or a snapshot no image uses: the caller's, or any for an
/// admin. The snapshot of a deleted image stays if it is not the caller's, another image uses
/// it, or a running build starts from it. Returns the ids of what it removed.
async fn delete(daemon: &Daemon, peer: &Peer, id: &str) -> Result<Vec<String>, Failure> {
    if id.starts_with("bld-") {
        return delete_build(daemon, peer, id).await;
    }
    let viewer = daemon.policy.viewer(peer);
    let (snapshot, image) = find_snapshot(daemon, viewer, id).await?;
    let owned = viewer.owns(owner_uid(&snapshot.tags).unwrap_or(NO_OWNER));
    if image.is_none() && !owned {
        return Err(not_yours("snapshot", id));
    }
    let used_by: Vec<String> = daemon
        .provider
        .list_images()
        .await?
        .into_iter()
        .filter(|i| i.snapshot_id == snapshot.id && Some(&i.id) != image.as_ref().map(|i| &i.id))
        .map(|i| i.id)
        .collect();
    let building = daemon
        .builds
        .lock()
        .expect("builds lock")
        .values()
        .any(|b| b.record().source_snapshot.as_deref() == Some(snapshot.id.as_str()));
    let mut removed = Vec::new();
    match &image {
        Some(image) => {
            daemon.provider.deregister_image(&image.id).await?;
            tracing::info!(uid = peer.uid, image = %image.id, "image deregistered");
            removed.push(image.id.clone());
        }
        None if !used_by.is_empty() => {
            return Err(Failure::invalid(format!(
                "snapshot {} is the snapshot of image {}: delete the image",
                snapshot.id,
                used_by.join(", ")
            )))
        }
        None if building => {
            return Err(Failure::invalid(format!(
                "snapshot {} is the source of a running build: delete it once the build ends",
                snapshot.id
            )))
        }
        None => {}
    }
    if owned && used_by.is_empty() && !building {
        daemon.provider.delete_snapshot(&snapshot.id).await?;
        tracing::info!(uid = peer.uid, snapshot = %snapshot.id, "snapshot deleted");
        removed.push(snapshot.id);
    }
    Ok(removed)
}

/// Removes the record and log of a finished build of `peer`'s (an admin: anyone's).
async fn delete_build(daemon: &Daemon, peer: &Peer, id: &str) -> Result<Vec<String>, Failure> {
    let record = readable_build(daemon, peer, id)?;
    // A build leaves the live builds only once its record is final, and an id is never live
    // again: one not live now is finished for good, and its files can go without the lock.
    let live = daemon.builds.lock().expect("builds lock").contains_key(id);
    if live {
        return Err(Failure::invalid(format!(
            "build {id} is {}: cancel it first (amidala cancel {id}), or delete it once it ends",
            if record.state == BuildState::Queued {
                "queued"
            } else {
                "running"
            }
        )));
    }
    let (catalog, owned_id) = (daemon.catalog.clone(), id.to_owned());
    crate::error::blocking(move || {
        catalog
            .delete_build(&owned_id)
            .map_err(|e| Failure::io(format!("deleting the record and log of {owned_id}"), e))
    })
    .await?;
    tracing::info!(uid = peer.uid, build = %id, "build record and log deleted");
    Ok(vec![id.to_owned()])
}

/// A read-only descriptor of the disk image of the snapshot `id` names, for its owner (or an
/// admin, or anyone for a published one), and the snapshot.
async fn export(
    daemon: &Daemon,
    peer: &Peer,
    id: &str,
) -> Result<(SnapshotInfo, std::fs::File), Failure> {
    let (snapshot, _) = find_snapshot(daemon, daemon.policy.viewer(peer), id).await?;
    let path = daemon.provider.snapshot_path(&snapshot.id).ok_or_else(|| {
        Failure::invalid(format!(
            "snapshot {} is an EBS snapshot: the {} provider has no file of it to export",
            snapshot.id,
            daemon.provider.name()
        ))
    })?;
    let file = std::fs::File::open(&path)
        .map_err(|e| Failure::io(format!("opening {}", path.display()), e))?;
    tracing::info!(uid = peer.uid, snapshot = %snapshot.id, "export");
    Ok((snapshot, file))
}

/// The checks of `build --boot-test`, said as `amidala boot-test`'s.
fn check_boot_test(daemon: &Daemon, test: &proto::BootTestSpec) -> Result<(), Failure> {
    crate::bootvm::check_test(test, &daemon.config.boot_test, daemon.provider.name())
        .map_err(|f| Failure::invalid(f.message.replacen("--boot-test: ", "boot-test: ", 1)))
}

/// `amidala boot-test ID`: boots an image or snapshot of the caller's (admins: anyone's) as
/// a build's `--boot-test` does, the console streamed as log lines. It waits for, and holds, one
/// of the caller's build slots (a VM costs what a build costs), and ends, QEMU killed, when the
/// client goes away or the daemon stops. The image (or the snapshot, if that is what was named)
/// is tagged with the outcome: `amidala:boot-test` `passed` or `failed`, and the detail.
async fn boot_test(
    daemon: &Arc<Daemon>,
    conn: &mut Conn,
    peer: &Peer,
    id: &str,
    test: proto::BootTestSpec,
) -> io::Result<()> {
    if daemon.provider.boots_images() {
        return boot_test_image(daemon, conn, peer, id, test).await;
    }
    let found = async {
        check_boot_test(daemon, &test)?;
        let disk = own_disk(daemon, peer, id).await?;
        let arch = crate::bootvm::arch_of(&disk.snapshot.tags)?;
        Ok((disk, arch))
    }
    .await;
    let (
        Disk {
            snapshot,
            image,
            owner,
            path,
        },
        arch,
    ) = match found {
        Ok(found) => found,
        Err(f) => return conn.send_error(&f).await,
    };
    tracing::info!(uid = peer.uid, snapshot = %snapshot.id, "boot test");
    let watch = second_handle(conn)?;
    let Some(slot) = vm_slot(daemon, conn, peer, &watch).await? else {
        return Ok(());
    };
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let console = move |line: String| {
        let _ = tx.send(line);
    };
    let made_for = snapshot.tags.get(proto::BOOT_TAG).cloned();
    // Boxed, so that dropping it stops QEMU before the last lines are sent.
    let mut booting = Box::pin(crate::bootvm::boot_all(
        daemon,
        owner,
        &path,
        made_for.as_deref(),
        arch,
        &test,
        &console,
    ));
    let result = loop {
        tokio::select! {
            result = &mut booting => break result,
            Some(line) = lines.recv() => conn.send_or_drop(&Response::Log { line }).await?,
            () = daemon.shutdown.cancelled() => {
                break Err(Failure::new(ErrorCode::ShuttingDown, "amidalad is shutting down"))
            }
            () = closed(&watch) => {
                tracing::info!(snapshot = %snapshot.id, "the client went away: boot test stopped");
                return Ok(());
            }
        }
    };
    drop(booting);
    drop(slot);
    while let Ok(line) = lines.try_recv() {
        conn.send_or_drop(&Response::Log { line }).await?;
    }
    let outcome = result.as_ref().map(|passed| crate::bootvm::detail(passed));
    let tested = match &image {
        Some(image) => Tested::Image(&image.id),
        None => Tested::Snapshot(&snapshot.id),
    };
    if let Err(f) = tag_tested(daemon, tested, outcome.as_deref().map_err(|f| *f)).await {
        return conn.send_error(&f).await;
    }
    match result {
        Ok(passed) => {
            let detail = crate::bootvm::detail(&passed);
            tracing::info!(snapshot = %snapshot.id, %detail, "boot test passed");
            conn.send(&Response::BootTested {
                id: id.to_owned(),
                detail,
            })
            .await
        }
        Err(f) => conn.send_error(&f).await,
    }
}

/// What `amidala boot-test` tested.
#[derive(Clone, Copy)]
enum Tested<'a> {
    Image(&'a str),
    Snapshot(&'a str),
}

/// Tags what was tested with how it went: passed with the detail (firmware, time, accelerator
/// or instance type), or failed and when; a test that could not run (cancelled, the daemon
/// stopping, an error of the host's) changes nothing.
async fn tag_tested(
    daemon: &Daemon,
    tested: Tested<'_>,
    outcome: Result<&str, &Failure>,
) -> Result<(), Failure> {
    let (verdict, detail) = match outcome {
        Ok(detail) => ("passed", detail.to_owned()),
        Err(f) if f.code == ErrorCode::BootTestFailed => (
            "failed",
            format!("failed {}", Utc::now().format("%Y-%m-%dT%H:%M:%SZ")),
        ),
        Err(_) => return Ok(()),
    };
    let tags = [
        (proto::BOOT_TEST_TAG.to_owned(), verdict.to_owned()),
        (proto::BOOT_TEST_DETAIL_TAG.to_owned(), detail),
    ]
    .into();
    let (tagged, id) = match tested {
        Tested::Image(id) => (daemon.provider.tag_image(id, &tags).await, id),
        Tested::Snapshot(id) => (daemon.provider.tag_snapshot(id, &tags).await, id),
    };
    tagged.map_err(|f| {
        tracing::error!(id, error = %f, "tagging what the boot test tested");
        Failure::new(
            f.code,
            format!(
                "the boot test {verdict}, but tagging {id} failed: {}",
                f.message
            ),
        )
    })
}

/// The disk image of an image or snapshot of the caller's (admins: anyone's), to boot.
struct Disk {
    snapshot: SnapshotInfo,
    /// The image, if `id` named one.
    image: Option<ImageInfo>,
    owner: u32,
    path: std::path::PathBuf,
}

async fn own_disk(daemon: &Daemon, peer: &Peer, id: &str) -> Result<Disk, Failure> {
    refuse_when_shutting_down(daemon)?;
    let viewer = daemon.policy.viewer(peer);
    let (snapshot, image) = find_snapshot(daemon, viewer, id).await?;
    let owner = owner_uid(&snapshot.tags).unwrap_or(NO_OWNER);
    if !viewer.owns(owner) {
        return Err(not_yours("snapshot", id));
    }
    let path = daemon
        .provider
        .snapshot_path(&snapshot.id)
        .ok_or_else(|| Failure::invalid(format!("{id} has no disk image on this host")))?;
    Ok(Disk {
        snapshot,
        image,
        owner,
        path,
    })
}

/// One of `peer`'s build slots for a VM (a VM costs what a build costs), waited for until
/// the client goes away (`None`, nothing sent) or the daemon stops (said, then `None`).
async fn vm_slot(
    daemon: &Daemon,
    conn: &mut Conn,
    peer: &Peer,
    watch: &UnixStream,
) -> io::Result<Option<crate::schedule::Slot>> {
    let slot = tokio::select! {
        slot = daemon.scheduler.acquire(peer.uid) => slot,
        () = daemon.shutdown.cancelled() => Err(crate::schedule::Closed),
        () = closed(watch) => return Ok(None),
    };
    match slot {
        Ok(slot) => Ok(Some(slot)),
        Err(crate::schedule::Closed) => {
            conn.send_error(&Failure::new(
                ErrorCode::ShuttingDown,
                "amidalad is shutting down",
            ))
            .await?;
            Ok(None)
        }
    }
}

/// `amidala run ID`: boots an image or snapshot of the caller's (admins: anyone's) in QEMU on
/// a throw-away overlay, as the boot test does, with its serial console connected to the
/// client: [`Response::Running`], then [`Response::Console`] frames one way and
/// [`Request::Input`] frames the other, until [`Response::RunEnded`]. It holds one of the
/// caller's build slots; the connection ends with the run.
async fn run_vm(
    daemon: &Arc<Daemon>,
    conn: &mut Conn,
    peer: &Peer,
    id: &str,
    firmware: Option<String>,
) -> io::Result<()> {
    let found = async {
        if daemon.provider.name() != "local" {
            return Err(Failure::invalid(format!(
                "run: the {} provider has no disk image to boot here (only the local provider \
                 runs images, in QEMU)",
                daemon.provider.name()
            )));
        }
        let disk = own_disk(daemon, peer, id).await?;
        let made_for = disk.snapshot.tags.get(proto::BOOT_TAG).map(String::as_str);
        let firmware = crate::bootvm::run_firmware(firmware.as_deref(), made_for)?;
        let arch = crate::bootvm::arch_of(&disk.snapshot.tags)?;
        crate::bootvm::check_firmware(arch, &[firmware])?;
        Ok((disk, firmware, arch))
    }
    .await;
    let (disk, firmware, arch) = match found {
        Ok(found) => found,
        Err(f) => return conn.send_error(&f).await,
    };
    tracing::info!(uid = peer.uid, snapshot = %disk.snapshot.id, "run");
    let watch = second_handle(conn)?;
    let Some(slot) = vm_slot(daemon, conn, peer, &watch).await? else {
        return Ok(());
    };
    conn.send_or_drop(&Response::Running {
        id: id.to_owned(),
        firmware: firmware.name().to_owned(),
    })
    .await?;
    // The client's keystrokes: Input frames, read off the second handle (nothing else reads
    // the connection now); its end, or any other frame, ends the run.
    let (typed, mut input) = tokio::sync::mpsc::channel(16);
    let reader = tokio::spawn(async move {
        let mut decoder = amidala::proto::FrameDecoder::new();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            while let Some(body) = decoder.next_frame().ok().flatten() {
                match amidala::proto::decode::<Request>(&body) {
                    Ok(Request::Input { data }) => {
                        if typed.send(data).await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
            if decoder.next_frame().is_err() {
                return;
            }
            if watch.readable().await.is_err() {
                return;
            }
            match watch.try_read(&mut buf) {
                Ok(0) => return,
                Ok(n) => decoder.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    });
    let (tx, mut shown) = tokio::sync::mpsc::channel(16);
    // Boxed, so that dropping it stops QEMU before the last frames are sent.
    let mut running = Box::pin(crate::bootvm::run_console(
        daemon, disk.owner, &disk.path, firmware, arch, &mut input, &tx,
    ));
    let mut sent = Ok(());
    let ended = loop {
        tokio::select! {
            ended = &mut running => break ended,
            Some(what) = shown.recv(), if sent.is_ok() => {
                sent = match what {
                    crate::bootvm::Shown::Note(line) => conn.send_or_drop(&Response::Log { line }).await,
                    crate::bootvm::Shown::Console(data) => conn.send_or_drop(&Response::Console { data }).await,
                };
                // The client is gone: the run ends once QEMU has been stopped.
                if sent.is_err() {
                    shown.close();
                }
            }
            () = daemon.shutdown.cancelled() => {
                break Err(Failure::new(ErrorCode::ShuttingDown, "amidalad is shutting down"))
            }
        }
    };
    reader.abort();
    drop(running);
    drop(slot);
    sent?;
    while let Ok(what) = shown.try_recv() {
        match what {
            crate::bootvm::Shown::Note(line) => conn.send_or_drop(&Response::Log { line }).await?,
            crate::bootvm::Shown::Console(data) => {
                conn.send_or_drop(&Response::Console { data }).await?
            }
        }
    }
    tracing::info!(snapshot = %disk.snapshot.id, ended = ?ended.as_ref().map_err(|f| &f.message), "run ended");
    match ended {
        Ok(why) => conn.send_or_drop(&Response::RunEnded { why }).await?,
        Err(f) => conn.send_or_drop(&Response::Error(f.reply())).await?,
    }
    // Frames of the run may be half read: nothing more is taken on this connection.
    Err(io::Error::other("the run ended"))
}

/// `amidala boot-test ID` where the provider boots registered images (ec2): ID is an image of
/// the caller's (admins: anyone's); a snapshot boots only once an image is registered from it.
/// Holds one of the caller's build slots; the instance is terminated when the test ends, the
/// client goes away or the daemon stops (the test is cancelled and awaited, never dropped).
async fn boot_test_image(
    daemon: &Arc<Daemon>,
    conn: &mut Conn,
    peer: &Peer,
    id: &str,
    test: proto::BootTestSpec,
) -> io::Result<()> {
    let found = async {
        refuse_when_shutting_down(daemon)?;
        check_boot_test(daemon, &test)?;
        if !id.starts_with("ami-") {
            return Err(Failure::invalid(format!(
                "boot-test {id}: on EC2 an image boots, not a snapshot: name the image (AMI) \
                 registered from it (`amidala images`), or build with --boot-test"
            )));
        }
        let (_, image) = find_snapshot(daemon, daemon.policy.viewer(peer), id).await?;
        let image = image.ok_or_else(|| not_yours("image", id))?;
        Ok(owner_uid(&image.tags).unwrap_or(NO_OWNER))
    }
    .await;
    let owner = match found {
        Ok(owner) => owner,
        Err(f) => return conn.send_error(&f).await,
    };
    let job = new_id("boot");
    tracing::info!(uid = peer.uid, image = id, %job, "boot test");
    let watch = second_handle(conn)?;
    let Some(slot) = vm_slot(daemon, conn, peer, &watch).await? else {
        return Ok(());
    };
    // Live for gc while it runs: its instance is no leftover. Awaited by the daemon's stop
    // as a build is, so that the instance is terminated before the daemon ends.
    let _running = BootTestRunning::new(daemon, &job);
    let _awaited = daemon.build_tasks.token();
    let cancel = tokio_util::sync::CancellationToken::new();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let console = move |line: String| {
        let _ = tx.send(line);
    };
    let owner_name = build::owner_name(owner);
    let booting = daemon.provider.boot_image(crate::provider::BootJob {
        image_id: id,
        job_id: &job,
        owner: &owner_name,
        test: &test,
        default_timeout: daemon.config.boot_test.timeout,
        cancel: &cancel,
        console: &console,
    });
    tokio::pin!(booting);
    let mut client_gone = false;
    let result = loop {
        tokio::select! {
            result = &mut booting => break result,
            Some(line) = lines.recv(), if !client_gone => {
                if conn.send_or_drop(&Response::Log { line }).await.is_err() {
                    client_gone = true;
                    cancel.cancel();
                }
            }
            () = daemon.shutdown.cancelled(), if !cancel.is_cancelled() => cancel.cancel(),
            () = closed(&watch), if !client_gone => {
                tracing::info!(image = id, "the client went away: boot test stopped");
                client_gone = true;
                cancel.cancel();
            }
        }
    };
    drop(slot);
    if client_gone {
        return Ok(());
    }
    while let Ok(line) = lines.try_recv() {
        conn.send_or_drop(&Response::Log { line }).await?;
    }
    if let Err(f) = tag_tested(daemon, Tested::Image(id), result.as_deref()).await {
        return conn.send_error(&f).await;
    }
    match result {
        Ok(detail) => {
            tracing::info!(image = id, %detail, "boot test passed");
            conn.send(&Response::BootTested {
                id: id.to_owned(),
                detail,
            })
            .await
        }
        Err(f) if f.code == ErrorCode::Cancelled => {
            conn.send_error(&Failure::new(
                ErrorCode::ShuttingDown,
                "amidalad is shutting down",
            ))
            .await
        }
        Err(f) => conn.send_error(&f).await,
    }
}

/// Marks an `amidala boot-test` request as running (see [`Daemon::boot_tests`]).
struct BootTestRunning<'a>(&'a Daemon, String);

impl<'a> BootTestRunning<'a> {
    fn new(daemon: &'a Daemon, job: &str) -> Self {
        daemon
            .boot_tests
            .lock()
            .expect("boot tests lock")
            .insert(job.to_owned());
        BootTestRunning(daemon, job.to_owned())
    }
}

impl Drop for BootTestRunning<'_> {
    fn drop(&mut self) {
        self.0
            .boot_tests
            .lock()
            .expect("boot tests lock")
            .remove(&self.1);
    }
}

/// The provisioner's time limit of a build of `peer`'s that asks for `requested` seconds: the
/// default when it asks for none; refused beyond the longest a member may ask for.
fn build_timeout(daemon: &Daemon, peer: &Peer, requested: Option<u64>) -> Result<u64, Failure> {
    let limits = &daemon.config.limits;
    let Some(asked) = requested else {
        return Ok(limits.build_timeout);
    };
    let admin = daemon.policy.role(peer) == crate::policy::Role::Admin;
    if asked > limits.max_build_timeout && !admin {
        return Err(Failure::new(
            ErrorCode::LimitExceeded,
            format!(
                "--timeout {asked}s is longer than builds may run here ({}s, [limits] \
                 max_build_timeout)",
                limits.max_build_timeout
            ),
        ));
    }
    Ok(asked)
}

/// A snapshot as the client shows it, with its disk image's path where the provider has one.
fn snapshot_info(daemon: &Daemon, record: &SnapshotRecord) -> amidala::proto::SnapshotInfo {
    amidala::proto::SnapshotInfo {
        path: daemon
            .provider
            .snapshot_path(&record.id)
            .map(|p| p.display().to_string()),
        ..daemon.catalog.snapshot_info(record)
    }
}

fn refuse_when_shutting_down(daemon: &Daemon) -> Result<(), Failure> {
    if daemon.shutdown.is_cancelled() {
        return Err(Failure::new(
            ErrorCode::ShuttingDown,
            "amidalad is shutting down",
        ));
    }
    Ok(())
}

/// What a build of `spec` by `peer` would do: every check of a build request, and the source
/// resolved as the build would resolve it now. Makes nothing.
async fn plan_build(daemon: &Daemon, peer: &Peer, spec: BuildSpec) -> Result<BuildPlan, Failure> {
    refuse_when_shutting_down(daemon)?;
    check_build_limits(daemon, &daemon.builds.lock().expect("builds lock"), peer)?;
    let (record, plugin) = checked_build(daemon, peer, spec).await?;
    let source = daemon
        .provider
        .resolve(&record.spec.source, daemon.policy.viewer(peer))
        .await?;
    let image_name = build::image_name(record.spec.name.as_deref(), &record.id, &record.created)?;
    Ok(BuildPlan {
        provider: daemon.provider.name().to_owned(),
        source_snapshot: snapshot_info(daemon, &source),
        image_name,
        example_build_id: record.id,
        volume_size: daemon.provider.volume_size(source.size, record.spec.size),
        provisioner_version: plugin.version.clone(),
        spec: record.spec,
    })
}

async fn start_build(
    daemon: &Arc<Daemon>,
    peer: &Peer,
    spec: BuildSpec,
    fds: Vec<OwnedFd>,
) -> Result<Arc<BuildHandle>, Failure> {
    refuse_when_shutting_down(daemon)?;
    let workspace = one_fd(fds, "the workspace directory")?;
    let meta = std::fs::File::from(
        workspace
            .try_clone()
            .map_err(|e| Failure::io("reading the workspace", e))?,
    )
    .metadata()
    .map_err(|e| Failure::io("reading the workspace", e))?;
    if !meta.is_dir() {
        return Err(Failure::invalid(
            "the workspace descriptor is not a directory",
        ));
    }
    // A cheap early refusal; the binding check is made again when the build is registered.
    check_build_limits(daemon, &daemon.builds.lock().expect("builds lock"), peer)?;
    let (record, plugin) = checked_build(daemon, peer, spec).await?;
    let handle = {
        // Checked and registered under one lock: concurrent requests cannot both slip in.
        let mut builds = daemon.builds.lock().expect("builds lock");
        check_build_limits(daemon, &builds, peer)?;
        let handle = Arc::new(BuildHandle::create(
            &daemon.catalog,
            record,
            peer.gid,
            daemon.policy.viewer(peer),
            daemon.config.limits.build_log,
        )?);
        builds.insert(handle.id.clone(), handle.clone());
        handle
    };
    tracing::info!(build = %handle.id, uid = peer.uid, pid = ?peer.pid, provisioner = %plugin.name, "build accepted");
    daemon
        .build_tasks
        .spawn(build::run(daemon.clone(), handle.clone(), workspace));
    Ok(handle)
}

async fn import_base(
    daemon: &Arc<Daemon>,
    conn: &mut Conn,
    peer: &Peer,
    spec: ImportSpec,
    fds: Vec<OwnedFd>,
) -> io::Result<()> {
    if daemon.shutdown.is_cancelled() {
        return conn
            .send_error(&Failure::new(
                ErrorCode::ShuttingDown,
                "amidalad is shutting down",
            ))
            .await;
    }
    let source = match one_fd(fds, "the source") {
        Ok(fd) => fd,
        Err(f) => return conn.send_error(&f).await,
    };
    if spec.publish {
        if let Err(refused) = daemon.policy.authorize(peer, Action::Publish) {
            return conn.send_error(&refused).await;
        }
    }
    // Debug-formatted: the name is the client's, and may hold anything until it is checked.
    tracing::info!(uid = peer.uid, pid = ?peer.pid, source = ?spec.source_name, "base import");
    let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    let requester = Requester {
        uid: peer.uid,
        gid: peer.gid,
        groups: peer.groups.clone(),
    };
    // In flight (gc leaves its files alone, its claims count) until the task ends.
    let viewer = daemon.policy.viewer(peer);
    let in_flight = match daemon
        .imports
        .enter(viewer, daemon.config.limits.max_imports_per_user)
    {
        Ok(in_flight) => in_flight,
        Err(f) => return conn.send_error(&f).await,
    };
    let bounds = match import_bounds(daemon, &in_flight).await {
        Ok(bounds) => bounds,
        Err(f) => return conn.send_error(&f).await,
    };
    // Runs to its end (and cleans up) even if the client goes away.
    let daemon_for_import = daemon.clone();
    let task = daemon.build_tasks.spawn(async move {
        import::import(
            &daemon_for_import,
            spec,
            source,
            requester,
            bounds,
            &in_flight,
            move |line| {
                let _ = tx.send(line);
            },
        )
        .await
    });
    while let Some(line) = notes.recv().await {
        conn.send(&Response::Log { line }).await?;
    }
    match task.await {
        Ok(Ok(record)) => {
            tracing::info!(snapshot = %record.id, "base imported");
            daemon.pool.wake();
            conn.send(&Response::Imported(snapshot_info(daemon, &record)))
                .await
        }
        Ok(Err(f)) => {
            tracing::warn!(error = ?f.to_string(), "base import failed");
            conn.send_error(&f).await
        }
        Err(e) => {
            conn.send_error(&Failure::new(
                ErrorCode::Internal,
                format!("import task failed: {e}"),
            ))
            .await
        }
    }
}

/// What an import may take at most (what it takes is claimed once it is known: see
/// [`crate::claims`]): the state directory's free space beyond its reserve, and the quota,
/// less what the other imports in flight have claimed.
async fn import_bounds(
    daemon: &Daemon,
    in_flight: &crate::claims::InFlight,
) -> Result<import::Bounds, Failure> {
    let available = daemon.imports.available(daemon, in_flight).await?;
    if available.bytes == 0 {
        return Err(available.no_import_fits(daemon.catalog.root()));
    }
    Ok(import::Bounds {
        bytes: available.bytes,
        id_base: daemon.config.import_id_base,
        timeout: Duration::from_secs(daemon.config.limits.import_timeout),
        claimed: available.claimed(),
    })
}

/// A second handle on the connection, to notice the client leave while nothing is sent.
fn second_handle(conn: &Conn) -> io::Result<UnixStream> {
    let fd = conn.stream.as_fd().try_clone_to_owned()?;
    UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
}

/// Returns once the peer has closed its end of `stream` (or the connection failed); what it
/// sends meanwhile is read and dropped.
async fn closed(stream: &UnixStream) {
    let mut buf = [0u8; 256];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Sends a build's logged events; with `progress`, follows until the build ends. Returns
/// whether a terminal event (finished or failed) was sent.
async fn stream_log(
    conn: &mut Conn,
    path: &Path,
    mut progress: Option<watch::Receiver<LogProgress>>,
) -> io::Result<bool> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut pos: u64 = 0;
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let (limit, done) = match &mut progress {
            Some(rx) => {
                let p = *rx.borrow_and_update();
                (Some(p.len), p.done)
            }
            None => (None, true),
        };
        loop {
            let want = match limit {
                Some(l) if pos >= l => break,
                Some(l) => ((l - pos) as usize).min(chunk.len()),
                None => chunk.len(),
            };
            let n = file.read(&mut chunk[..want]).await?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            pending.extend_from_slice(&chunk[..n]);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let event: Response = serde_json::from_slice(&line[..nl])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let terminal = matches!(event, Response::Finished(_) | Response::Failed(_));
                conn.send(&event).await?;
                if terminal {
                    return Ok(true);
                }
            }
        }
        if done {
            return Ok(false);
        }
        if let Some(rx) = &mut progress {
            if rx.changed().await.is_err() {
                progress = None;
            }
        }
    }
}
