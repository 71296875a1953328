//! The exit hot path allocates nothing: the VMM's allocations while running
//! a guest must not grow with the number of exits it serves (PIO, MMIO, and
//! emulation-failure exits completed by the emulator, with and without
//! vector state). One test in its own binary, so no other test's
//! allocations are counted.

mod common;

use guest::programs::bench;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made while running `program`, which must end normally.
fn allocations_during(program: &guest::Program, stats: bool) -> u64 {
    let mut cfg = common::config_for(program);
    cfg.stats = stats;
    common::require_kvm();
    let sink = common::Capture::default();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let out = vmm::vm::run(&cfg, Box::new(sink)).expect("VM set-up");
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    assert_eq!(
        out.status, program.expect.status,
        "{}: {}",
        program.name, out.message
    );
    after - before
}

#[test]
fn allocations_do_not_grow_with_exits() {
    type Build = fn(u32) -> Result<guest::Program, iced_x86::IcedError>;
    let paths: [(&str, Build); 4] = [
        ("pio", bench::pio),
        ("mmio", bench::mmio),
        ("emulated adcx", bench::adcx),
        ("emulated vmovdqu ymm on MMIO", bench::vmovdqu),
    ];
    // iced-x86 builds its decoder and encoder tables on first use, once
    // per process: warm every path up first.
    for (_, build) in paths {
        allocations_during(&build(10).unwrap(), true);
    }
    for stats in [false, true] {
        for (name, build) in paths {
            let few = allocations_during(&build(200).unwrap(), stats);
            let many = allocations_during(&build(2200).unwrap(), stats);
            // 2,000 more exits: set-up costs cancel; a per-exit allocation
            // would add about 2,000.
            assert!(
                many.abs_diff(few) < 50,
                "{name} (stats {stats}): {few} allocations for 200 exits, {many} for 2200"
            );
        }
    }
}
