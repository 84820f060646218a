//! OS plumbing shared by every server mode.

pub mod connect;
pub mod limits;
pub mod listener;
pub mod resolver;
