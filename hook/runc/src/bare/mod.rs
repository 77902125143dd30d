//! The x86_64 first stage: `_start`, raw system calls and no C library.

mod mem;
mod sys;

use core::ptr;

use nixenv_runc::{env_value, exec_error_line, find_runc, needs_full_stage, sibling};
use nixenv_runc::{FULL_STAGE, HOOK_NAME, PATH_BUF};

// The kernel starts a static executable at `_start` with the stack pointer at argc, followed
// by argv[0..argc], NULL, envp…, NULL.
core::arch::global_asm!(
    ".globl _start",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {entry}",
    "ud2",
    entry = sym entry,
);

/// The length of the NUL-terminated string at `p`, as a slice.
///
/// # Safety
/// `p` must point to a NUL-terminated string that lives for the whole process.
unsafe fn c_str(p: *const u8) -> &'static [u8] {
    let mut n = 0;
    // SAFETY: the string is NUL-terminated. A volatile read, so the loop is not turned into
    // a call to `strlen`, which nothing provides here.
    unsafe {
        while core::ptr::read_volatile(p.add(n)) != 0 {
            n += 1;
        }
        core::slice::from_raw_parts(p, n)
    }
}

/// A NULL-terminated array of C strings, as slices.
#[derive(Clone)]
struct CStrs(*const *const u8);

impl Iterator for CStrs {
    type Item = &'static [u8];
    fn next(&mut self) -> Option<&'static [u8]> {
        // SAFETY: the kernel's argv/envp arrays are NULL-terminated arrays of C strings.
        unsafe {
            let p = *self.0;
            if p.is_null() {
                return None;
            }
            self.0 = self.0.add(1);
            Some(c_str(p))
        }
    }
}

/// # Safety
/// `sp` must be the initial stack pointer the kernel gave `_start`.
unsafe extern "C" fn entry(sp: *const usize) -> ! {
    // SAFETY: the initial stack layout described above.
    unsafe {
        let argc = *sp;
        let argv = sp.add(1) as *mut *const u8;
        let envp = argv.add(argc + 1) as *const *const u8;
        run(argc, argv, envp)
    }
}

/// # Safety
/// `argv` (`argc` entries and a NULL) and `envp` as the kernel passes them.
unsafe fn run(argc: usize, argv: *mut *const u8, envp: *const *const u8) -> ! {
    let args = CStrs(unsafe { argv.add(1) });
    if argc > 0 && !needs_full_stage(&sys::Kernel, args) {
        let mut runc = [0u8; PATH_BUF];
        let me = nixenv_runc::Stat::stat(&sys::Kernel, b"/proc/self/exe\0");
        let found = find_runc(
            &sys::Kernel,
            env_value(CStrs(envp), b"NIXENV_RUNC"),
            env_value(CStrs(envp), b"PATH"),
            me,
            &mut runc,
        );
        if found.is_some() {
            // SAFETY: argv[0] is replaced by a NUL-terminated path that outlives the exec;
            // argv and envp are the kernel's. On failure nixenv-hook reports the error.
            unsafe {
                *argv = runc.as_ptr();
                sys::execve(runc.as_ptr(), argv, envp);
            }
        }
    }
    // SAFETY: as for this function.
    unsafe { full_stage(argc, argv, envp) }
}

/// Execs `nixenv-hook runc ARGS…` next to this binary; never returns.
///
/// # Safety
/// As for [`run`].
unsafe fn full_stage(argc: usize, argv: *const *const u8, envp: *const *const u8) -> ! {
    let mut exe = [0u8; PATH_BUF];
    let mut hook = [0u8; PATH_BUF];
    let hook_len = match sys::readlink(b"/proc/self/exe\0", &mut exe) {
        Ok(n) if n < exe.len() => sibling(&mut hook, &exe[..n], HOOK_NAME),
        Ok(_) => fail(b"/proc/self/exe", 36),
        Err(errno) => fail(b"/proc/self/exe", errno),
    };
    let Some(hook_len) = hook_len else {
        fail(&exe, 36)
    };
    let mut stage = [0u8; 8];
    stage[..FULL_STAGE.len()].copy_from_slice(FULL_STAGE);
    // [hook, "runc", argv[1..argc]…, NULL]
    let count = argc.max(1) + 2;
    let new = match sys::alloc(count * core::mem::size_of::<*const u8>()) {
        Ok(p) => p as *mut *const u8,
        Err(errno) => fail(&hook[..hook_len], errno),
    };
    // SAFETY: `new` holds `count` pointers; argv has `argc` entries; the buffers outlive the
    // exec.
    let errno = unsafe {
        *new = hook.as_ptr();
        *new.add(1) = stage.as_ptr();
        for i in 1..argc {
            *new.add(i + 1) = *argv.add(i);
        }
        *new.add(count - 1) = ptr::null();
        sys::execve(hook.as_ptr(), new, envp)
    };
    fail(&hook[..hook_len], errno)
}

/// Reports that `path` could not be executed, on stderr, and exits 1 (runc's failure code).
fn fail(path: &[u8], errno: isize) -> ! {
    let mut line = [0u8; 512];
    let n = exec_error_line(&mut line, path, errno);
    sys::write_all(2, &line[..n]);
    sys::exit(1)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    sys::write_all(2, b"nixenv-runc: internal error\n");
    sys::exit(1)
}
