//! NFSv4.2 backend for slacker (work in progress: the protocol client lands first).
#![forbid(unsafe_code)]

pub mod client;
