//! The memory functions the compiler may call (no C library provides them here). Byte loops
//! through volatile accesses, so the optimiser cannot turn them back into calls to
//! themselves; the first stage only copies a few short buffers.

use core::ptr::{read_volatile, write_volatile};

/// # Safety
/// As C's `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: as C's memcpy.
    unsafe {
        for i in 0..n {
            write_volatile(dest.add(i), read_volatile(src.add(i)));
        }
    }
    dest
}

/// # Safety
/// As C's `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: as C's memmove; copies backwards when dest overlaps the end of src.
    unsafe {
        if (dest as usize) <= (src as usize) {
            for i in 0..n {
                write_volatile(dest.add(i), read_volatile(src.add(i)));
            }
        } else {
            for i in (0..n).rev() {
                write_volatile(dest.add(i), read_volatile(src.add(i)));
            }
        }
    }
    dest
}

/// # Safety
/// As C's `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: as C's memset.
    unsafe {
        for i in 0..n {
            write_volatile(dest.add(i), c as u8);
        }
    }
    dest
}

/// # Safety
/// As C's `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: as C's memcmp.
    unsafe {
        for i in 0..n {
            let (x, y) = (read_volatile(a.add(i)), read_volatile(b.add(i)));
            if x != y {
                return i32::from(x) - i32::from(y);
            }
        }
    }
    0
}

/// # Safety
/// As C's `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Referenced by the precompiled `core` in unoptimised builds; never called with
/// `panic = "abort"`.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
