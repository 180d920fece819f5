//! The channel between a running VMM and the process it hands its guest to
//! (`lucos upgrade`): a Unix stream socket pair carrying length-prefixed
//! JSON messages, some with open files attached (SCM_RIGHTS, through
//! vmm-sys-util's `ScmSocket`).
//!
//! A message is an 8-byte header, sent with the message's descriptors
//! attached (little-endian u32 body length, u32 descriptor count), then the
//! body. A receiver takes descriptors only from a header, and checks their
//! number against the one the header gives.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 16;
/// Largest message body (64 MiB).
pub const MAX_BODY: usize = 64 << 20;

/// One end of the channel.
#[derive(Debug)]
pub struct Channel {
    stream: UnixStream,
}

fn bad(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

impl Channel {
    /// A channel over `stream`.
    pub fn new(stream: UnixStream) -> Self {
        Self { stream }
    }

    /// How long a receive may wait (`None`: for ever).
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(t)
    }

    /// Sends `msg` with `fds` attached.
    pub fn send<T: Serialize>(&mut self, msg: &T, fds: &[RawFd]) -> io::Result<usize> {
        if fds.len() > MAX_FDS {
            return Err(bad(format!("{} descriptors in one message", fds.len())));
        }
        let body = serde_json::to_vec(msg).map_err(|e| bad(e.to_string()))?;
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
        header[4..].copy_from_slice(&(fds.len() as u32).to_le_bytes());
        let sent = if fds.is_empty() {
            self.stream.write(&header)?
        } else {
            self.stream
                .send_with_fds(&[&header[..]], fds)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?
        };
        self.stream.write_all(&header[sent..])?;
        self.stream.write_all(&body)?;
        Ok(header.len() + body.len())
    }

    /// Receives a message and the files attached to it. The end of the
    /// stream (the other process is gone) is `UnexpectedEof`; a receive
    /// past the timeout is `WouldBlock` or `TimedOut`.
    pub fn recv<T: DeserializeOwned>(&mut self) -> io::Result<(T, Vec<File>)> {
        let mut header = [0u8; 8];
        let mut raw = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: header.len(),
        }];
        // SAFETY: the iovec points at `header`, 8 writable bytes alive for
        // the call; `raw` has room for MAX_FDS descriptors.
        let (n, nfds) = unsafe { self.stream.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: the first `nfds` entries are descriptors just received,
        // owned by nobody else: each File closes its own.
        let files: Vec<File> = raw[..nfds]
            .iter()
            .map(|&fd| unsafe { File::from_raw_fd(fd) })
            .collect();
        // Received descriptors are inheritable (recvmsg without
        // MSG_CMSG_CLOEXEC): they must not leak into processes this one
        // starts (the next upgrade's).
        for f in &files {
            use std::os::fd::AsRawFd;
            // SAFETY: fcntl on a descriptor this process owns (in `f`).
            if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other process closed the channel",
            ));
        }
        self.stream.read_exact(&mut header[n..])?;
        let len = u32::from_le_bytes(header[..4].try_into().unwrap_or_default()) as usize;
        let want = u32::from_le_bytes(header[4..].try_into().unwrap_or_default()) as usize;
        if want != files.len() {
            return Err(bad(format!(
                "a message announced {want} descriptors and carried {}",
                files.len()
            )));
        }
        if len > MAX_BODY {
            return Err(bad(format!("a message of {len} bytes")));
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        let msg = serde_json::from_slice(&body).map_err(|e| bad(format!("bad message: {e}")))?;
        Ok((msg, files))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;
    use std::os::fd::AsRawFd;

    #[test]
    fn messages_and_files_cross_in_order() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (mut a, mut b) = (Channel::new(a), Channel::new(b));
        let memfd = crate::memory::new_memfd(c"handoff-test", 4096).expect("memfd");
        let mut f = memfd.try_clone().expect("clone");
        f.write_all(b"guest").expect("write");
        a.send(&vec![1u32, 2, 3], &[memfd.as_raw_fd()])
            .expect("send");
        a.send(&"second".to_owned(), &[]).expect("send");
        let (v, files): (Vec<u32>, _) = b.recv().expect("recv");
        assert_eq!(v, [1, 2, 3]);
        assert_eq!(files.len(), 1);
        let mut got = files.into_iter().next().expect("file");
        got.rewind().expect("seek");
        let mut buf = [0u8; 5];
        got.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"guest", "the same memory");
        let (s, files): (String, _) = b.recv().expect("recv");
        assert_eq!((s.as_str(), files.len()), ("second", 0));
        drop(a);
        let e = b.recv::<String>().expect_err("closed");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_receive_times_out() {
        let (_a, b) = UnixStream::pair().expect("pair");
        let mut b = Channel::new(b);
        b.set_timeout(Some(Duration::from_millis(10)))
            .expect("timeout");
        let e = b.recv::<String>().expect_err("nothing sent");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
    }
}
