//! OS plumbing every server mode shares: listening sockets and the ready line, outgoing
//! connects, descriptor limits and the reserve, name resolution off the event loops, and
//! burst-limited warnings.

pub mod burst_log;
pub mod connect;
pub mod limits;
pub mod listener;
pub mod resolver;

pub use burst_log::BurstLog;
