//! The readiness modes: select, poll, epoll and epoll-et.

pub mod event_loop;
pub mod poller;
mod sys;
