//! A token cell's key: a copyable name for a cell, which a response future carries
//! instead of an `Arc` of the cell.
//!
//! A request whose answer may be a 401 must be able to reach its cell later, to
//! invalidate the token it carried. Holding an `Arc<TokenCell>` for that costs an
//! atomic increment and decrement of the cell's reference count on every request, and
//! that count is one cache line written by every request on every thread: the very
//! contention the lock-free token read avoids. A [`CellKey`] is a plain number; the
//! future copies it, and nothing is written when the future is made or dropped.
//!
//! The key is resolved through a process-wide registry (key → `Weak<TokenCell>`)
//! only on the rare paths: after a 401 and to resend. The registry is written when a
//! cell is made and when it is dropped, and read, under its mutex, when a key is
//! resolved. Keys come from a 64-bit counter and are never reused, so a key whose cell
//! is gone resolves to nothing, never to another cell.
//!
//! No `Arc<TokenCell>` is ever dropped while the registry's mutex is held (dropping
//! the last one unregisters the cell, which takes the mutex).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use super::cell::TokenCell;

/// The cells alive in this process, by key.
struct Registry {
    /// The next key to hand out (0 is never handed out).
    next: u64,
    cells: BTreeMap<u64, Weak<TokenCell>>,
}

static CELLS: Mutex<Registry> = Mutex::new(Registry {
    next: 1,
    cells: BTreeMap::new(),
});

/// The registry, also after a panic elsewhere while it was held (each of its
/// operations leaves it consistent).
fn registry() -> MutexGuard<'static, Registry> {
    CELLS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A copyable name for a [`TokenCell`], resolved only when needed (see the module
/// documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CellKey(u64);

impl CellKey {
    /// Makes a cell under a fresh key, registered until the cell is dropped (the cell
    /// calls [`CellKey::unregister`] from its `Drop`).
    pub(crate) fn register(make: impl FnOnce(CellKey) -> TokenCell) -> Arc<TokenCell> {
        Arc::new_cyclic(|weak| {
            let key = {
                let mut registry = registry();
                let key = registry.next;
                registry.next += 1;
                registry.cells.insert(key, weak.clone());
                CellKey(key)
            };
            make(key)
        })
    }

    /// The cell, if it is still alive.
    pub(crate) fn resolve(self) -> Option<Arc<TokenCell>> {
        let weak = registry().cells.get(&self.0)?.clone();
        // Upgraded after the mutex is released: should the cell be dropped meanwhile,
        // the `Weak` simply fails to upgrade.
        weak.upgrade()
    }

    /// Forgets the cell of this key.
    pub(crate) fn unregister(self) {
        let removed = registry().cells.remove(&self.0);
        // A `Weak`: dropping it never drops a cell, so no re-entry.
        drop(removed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::cell::test_cell as cell;

    #[test]
    fn a_key_resolves_to_its_own_cell_while_it_lives_and_to_nothing_after() {
        let a = cell();
        let b = cell();
        assert_ne!(a.key(), b.key());
        let resolved = a.key().resolve().expect("a lives");
        assert!(Arc::ptr_eq(&resolved, &a));
        assert!(Arc::ptr_eq(&b.key().resolve().expect("b lives"), &b));
        drop(resolved);

        let key = a.key();
        drop(a);
        assert!(key.resolve().is_none(), "a dropped cell is not resolved");
        assert!(
            !registry().cells.contains_key(&key.0),
            "a dropped cell is unregistered"
        );
        // A new cell never takes an old key.
        let c = cell();
        assert_ne!(c.key(), key);
        assert!(Arc::ptr_eq(&b.key().resolve().expect("b lives"), &b));
    }
}
