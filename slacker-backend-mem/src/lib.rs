//! The in-memory reference backend for slacker.
//!
//! [`State`] is a pure, synchronous value: volumes and snapshots are maps from block index to
//! immutable [`bytes::Bytes`] blocks, so a snapshot or a clone shares every block with its
//! source and costs O(blocks written), never O(volume size). A write replaces whole blocks
//! (read, modify, freeze), so a shared block is never mutated. Being obviously correct, the
//! same `State` is the model the testkit compares every other backend against.
//!
//! [`MemBackend`] puts a `State` behind a mutex and implements
//! [`Backend`](slacker_core::Backend). [`MemBackend::reopen`] gives a new handle on the
//! same state: what a reopened persistent backend would see.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod state;

pub use backend::{MemBackend, SCHEME};
pub use state::State;
