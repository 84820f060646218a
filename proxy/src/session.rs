//! Why a session ended early, common to every mode.

use std::io;

use thiserror::Error;

use crate::handshake::HandshakeError;

/// The end of a session before or during its relay.
#[derive(Debug, Error)]
pub enum SessionError {
    /// The client closed before completing the handshake.
    #[error("client closed during the handshake")]
    ClientClosed,
    /// The handshake failed (a reply, if any, was sent).
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// A socket error.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// A state the protocol core should never produce.
    #[error("protocol state error: {0}")]
    Protocol(&'static str),
}
