//! A service clone's own view of the current token: the request path's fast lane.
//!
//! [`arc_swap::Cache`] turns the shared `ArcSwapOption` load into one relaxed pointer
//! comparison while the token is unchanged. Each clone also keeps its own copy of the
//! `Authorization` value, so that the reference count bumped for every request lives
//! in memory that other threads' clones do not touch.
//!
//! A clone copies the header when it first sends a request with a token. A clone made
//! from a service that has already sent requests starts out sharing its original's
//! copy (cloning a service allocates nothing) until the token changes; services cloned
//! per request share it that way.

use std::ops::Deref;
use std::sync::Arc;

use arc_swap::{ArcSwapOption, Cache};
use bytes::Bytes;
use http::HeaderValue;

use super::cell::TokenCell;
use super::key::CellKey;
use super::value::Token;

/// Lets an `arc_swap::Cache` reach the token cell's `ArcSwapOption`.
#[derive(Clone)]
pub(crate) struct Current(pub(crate) Arc<TokenCell>);

impl Deref for Current {
    type Target = ArcSwapOption<Token>;
    fn deref(&self) -> &Self::Target {
        self.0.current()
    }
}

#[derive(Clone)]
pub(crate) struct LocalToken {
    cell: Arc<TokenCell>,
    /// The cell's key, kept here so that the request path reads it from this clone.
    key: CellKey,
    swap: Cache<Current, Option<Arc<Token>>>,
    /// This clone's copy of the header, and the generation it was copied from (0: no
    /// copy yet; generations start at 1).
    header: HeaderValue,
    copied: u64,
}

impl LocalToken {
    pub(crate) fn new(cell: Arc<TokenCell>) -> Self {
        LocalToken {
            swap: Cache::new(Current(cell.clone())),
            key: cell.key(),
            cell,
            header: HeaderValue::from_static(""),
            copied: 0,
        }
    }

    pub(crate) fn cell(&self) -> &Arc<TokenCell> {
        &self.cell
    }

    /// The key response futures carry to reach the cell after a 401.
    #[inline]
    pub(crate) fn key(&self) -> CellKey {
        self.key
    }

    /// Like [`TokenCell::get`], from this clone's `arc_swap::Cache`: the header and generation of
    /// a usable token, or `None` when the request must wait for a refresh.
    #[inline]
    pub(crate) fn get(&mut self) -> Option<(HeaderValue, u64)> {
        let token = self.swap.load().as_ref()?;
        if !self.cell.admit(token) {
            return None;
        }
        let generation = token.generation;
        if self.copied != generation {
            self.header = own_copy(token.header());
            self.copied = generation;
        }
        Some((self.header.clone(), generation))
    }
}

/// A copy of `value` in a buffer of its own (still marked sensitive). The buffer is
/// owned by a reference-counted box from the start (`Bytes::from_owner`), so a clone
/// is one increment of that count, without the check a `Vec`-backed `Bytes` makes on
/// every clone to see whether it has been shared yet.
fn own_copy(value: &HeaderValue) -> HeaderValue {
    let bytes = Bytes::from_owner(Box::<[u8]>::from(value.as_bytes()));
    let mut copy = HeaderValue::from_maybe_shared(bytes).unwrap_or_else(|_| value.clone());
    copy.set_sensitive(true);
    copy
}
