//! The socket frontends connect to.
//!
//! Binding never deletes what it should not: only a stale stream socket nobody
//! listens on is removed; a live socket, a symbolic link and anything that is not a
//! socket are refused, naming the path. The socket is created under a temporary
//! name beside it, given its mode (0600 unless asked otherwise, whatever the umask)
//! and group, and only then renamed into place: nobody can connect before its
//! permissions are right. The temporary name is `.NAME.fbPID.N` for a socket `NAME`:
//! the kernel keeps listing a listening socket under the name it was bound at
//! (`/proc/net/unix`), so a tool that asks whether something listens at `NAME`
//! without connecting looks for that name too.

use std::fs::{self, Permissions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// `sun_path` holds this many bytes, the terminating NUL included.
const SUN_PATH_LEN: usize = 108;

#[derive(Debug, Error)]
pub enum BindError {
    #[error("socket {path}: another backend is already listening there")]
    InUse { path: String },
    #[error("socket {path}: {what} is there, not a socket; refusing to replace it")]
    NotASocket { path: String, what: &'static str },
    #[error("socket {path}: a socket of another kind is there and in use; refusing to replace it")]
    OtherSocket { path: String },
    #[error("cannot check {path}")]
    Inspect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale socket {path}")]
    RemoveStale {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot give {path} mode {mode:o} and group {group:?}")]
    Permissions {
        path: String,
        mode: u32,
        group: Option<u32>,
        #[source]
        source: io::Error,
    },
}

/// Who may connect: the socket file's mode and group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketAccess {
    pub mode: u32,
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        Self {
            mode: 0o600,
            group: None,
        }
    }
}

/// A bound, listening socket; its file is removed when dropped (if it is still ours).
pub struct PublicSocket {
    pub listener: UnixListener,
    pub path: PathBuf,
    /// The socket file's inode, so a file someone put there since is left alone.
    inode: (u64, u64),
}

impl Drop for PublicSocket {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.inode {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

fn describe(file_type: &fs::FileType) -> &'static str {
    if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "a device node"
    } else {
        "a regular file"
    }
}

/// Make room at `path`: nothing there, or a stale stream socket (removed).
fn clear(path: &Path, display: &str) -> Result<(), BindError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(BindError::Inspect {
                path: display.to_string(),
                source,
            })
        }
    };
    let file_type = meta.file_type();
    if !file_type.is_socket() {
        return Err(BindError::NotASocket {
            path: display.to_string(),
            what: describe(&file_type),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(BindError::InUse {
            path: display.to_string(),
        }),
        // Nobody listens: left by a backend that was killed.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            fs::remove_file(path).map_err(|source| BindError::RemoveStale {
                path: display.to_string(),
                source,
            })
        }
        // EPROTOTYPE: a datagram or seqpacket socket someone uses.
        Err(_) => Err(BindError::OtherSocket {
            path: display.to_string(),
        }),
    }
}

/// A name beside `path` to bind before the permissions are set.
fn temporary_beside(path: &Path) -> Option<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        ".{}.fb{:x}.{}",
        path.file_name()?.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let temporary = path.with_file_name(name);
    (temporary.as_os_str().len() < SUN_PATH_LEN).then_some(temporary)
}

fn set_access(path: &Path, access: SocketAccess) -> io::Result<()> {
    fs::set_permissions(path, Permissions::from_mode(access.mode))?;
    if access.group.is_some() {
        std::os::unix::fs::chown(path, None, access.group)?;
    }
    Ok(())
}

/// Bind and listen at `path` (see the module documentation).
pub fn bind(path: &Path, access: SocketAccess) -> Result<PublicSocket, BindError> {
    let display = path.display().to_string();
    clear(path, &display)?;
    let permissions_error = |source| BindError::Permissions {
        path: display.clone(),
        mode: access.mode,
        group: access.group,
        source,
    };
    let listener = match temporary_beside(path) {
        Some(temporary) => {
            let listener = UnixListener::bind(&temporary).map_err(|source| BindError::Listen {
                path: display.clone(),
                source,
            })?;
            let placed = set_access(&temporary, access).and_then(|()| fs::rename(&temporary, path));
            if let Err(source) = placed {
                let _ = fs::remove_file(&temporary);
                return Err(permissions_error(source));
            }
            listener
        }
        // No room for a longer name: bind in place; the mode follows at once.
        None => {
            let listener = UnixListener::bind(path).map_err(|source| BindError::Listen {
                path: display.clone(),
                source,
            })?;
            if let Err(source) = set_access(path, access) {
                let _ = fs::remove_file(path);
                return Err(permissions_error(source));
            }
            listener
        }
    };
    let meta = fs::symlink_metadata(path).map_err(|source| BindError::Inspect {
        path: display.clone(),
        source,
    })?;
    Ok(PublicSocket {
        listener,
        path: path.to_path_buf(),
        inode: (meta.dev(), meta.ino()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::os::unix::net::UnixDatagram;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fb-bind-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn refuses_and_keeps_what_is_not_a_stale_stream_socket() {
        let dir = scratch("refuse");
        let file = dir.join("passwd");
        fs::write(&file, "root:x:0:0\n").unwrap();
        let link = dir.join("link");
        symlink(&file, &link).unwrap();
        let datagram_path = dir.join("dgram");
        let _datagram = UnixDatagram::bind(&datagram_path).unwrap();
        let live_path = dir.join("live");
        let _live = bind(&live_path, SocketAccess::default()).unwrap();

        for (path, says) in [
            (&file, "a regular file is there"),
            (&link, "a symbolic link is there"),
            (&dir, "a directory is there"),
            (&datagram_path, "a socket of another kind"),
            (&live_path, "already listening"),
        ] {
            let err = bind(path, SocketAccess::default()).err().expect("refused");
            assert!(err.to_string().contains(says), "{err}");
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }
        assert_eq!(fs::read_to_string(&file).unwrap(), "root:x:0:0\n");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replaces_a_stale_socket_and_sets_the_mode_whatever_the_umask() {
        let dir = scratch("stale");
        let path = dir.join("s.sock");
        drop(UnixListener::bind(&path).unwrap()); // left behind, nobody listens
                                                  // SAFETY: umask(2) only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let socket = bind(&path, SocketAccess::default());
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let socket = socket.unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(UnixStream::connect(&path).is_ok());
        let others = fs::read_dir(&dir).unwrap().count();
        assert_eq!(others, 1, "no temporary name left behind");
        drop(socket);
        assert!(!path.exists(), "removed when dropped");

        let socket = bind(
            &path,
            SocketAccess {
                mode: 0o660,
                group: None,
            },
        )
        .unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o660
        );
        // A file someone put in its place since is not ours to remove.
        fs::remove_file(&path).unwrap();
        fs::write(&path, "theirs").unwrap();
        drop(socket);
        assert_eq!(fs::read_to_string(&path).unwrap(), "theirs");
        fs::remove_dir_all(&dir).unwrap();
    }
}
