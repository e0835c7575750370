//! A global allocator that counts, per thread, the allocations made and the bytes
//! held, for the tests that measure what a request allocates. A test binary installs
//! it with `#[global_allocator] static GLOBAL: alloc::Counting = alloc::Counting;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use tower::Service;

/// Counts the allocations made by the current thread, and the bytes it holds.
pub struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn track(allocated: isize) {
    let _ = LIVE.try_with(|n| n.set(n.get() + allocated));
}

fn count() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: forwards to the system allocator; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        track(layout.size() as isize);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        track(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

/// The bytes the current thread holds (allocated minus freed), since it started.
#[allow(dead_code)] // not every test binary measures held bytes
pub fn live() -> isize {
    LIVE.with(Cell::get)
}

/// Allocations made by building a request with `request` and sending it through
/// `svc`, which must answer at once.
pub fn allocations_of<S, R>(svc: &mut S, request: impl FnOnce() -> R) -> usize
where
    S: Service<R>,
    S::Error: std::fmt::Debug,
{
    let before = ALLOCATIONS.with(Cell::get);
    {
        let req = request();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(svc.poll_ready(&mut cx).is_ready());
        let fut = pin!(svc.call(req));
        match fut.poll(&mut cx) {
            Poll::Ready(res) => drop(res.unwrap()),
            Poll::Pending => panic!("the request did not complete at once"),
        }
    }
    ALLOCATIONS.with(Cell::get) - before
}
