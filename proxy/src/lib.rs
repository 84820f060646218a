//! A SOCKS5 server (RFC 1928 CONNECT, BIND and UDP ASSOCIATE; RFC 1929 username/password) with one sans-IO protocol
//! core and interchangeable concurrency models.
//!
//! A program binds a listener and calls [`modes::run`] with a [`Config`], a [`Mode`] and a
//! [`Shutdown`] trigger; or, inside a tokio runtime, [`modes::async_tokio::serve`].

pub mod config;
pub mod modes;
pub mod net;
pub mod relay;
pub mod shutdown;
pub mod socks5;
pub mod workers;

pub use config::{Acl, Config};
pub use modes::Mode;
pub use shutdown::Shutdown;
