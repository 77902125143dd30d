//! The system calls the first stage makes, issued directly (x86_64 Linux): no C library is
//! linked, so there is nothing to load or initialise before `_start` runs.

use core::arch::asm;

use nixenv_runc::{FileId, Stat};

const SYS_WRITE: usize = 1;
const SYS_STAT: usize = 4;
const SYS_MMAP: usize = 9;
const SYS_EXECVE: usize = 59;
const SYS_READLINK: usize = 89;
const SYS_EXIT_GROUP: usize = 231;

/// A raw system call with up to six arguments; returns the kernel's result (`-errno` on
/// failure).
///
/// # Safety
/// The arguments must be valid for system call `nr`.
unsafe fn syscall(nr: usize, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller passes arguments valid for `nr`; `syscall` clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// `Err(errno)` for a negative result.
fn check(ret: isize) -> Result<usize, isize> {
    if ret < 0 {
        Err(-ret)
    } else {
        Ok(ret as usize)
    }
}

/// `stat(2)` through the kernel.
pub struct Kernel;

impl Stat for Kernel {
    fn stat(&self, path: &[u8]) -> Option<FileId> {
        if path.last() != Some(&0) {
            return None;
        }
        // struct stat on x86_64: st_dev at 0, st_ino at 8, st_mode at 24; 144 bytes.
        let mut st = [0u64; 18];
        // SAFETY: `path` is NUL-terminated and `st` is as large as struct stat.
        let ret = unsafe {
            syscall(
                SYS_STAT,
                [path.as_ptr() as usize, st.as_mut_ptr() as usize, 0, 0, 0, 0],
            )
        };
        check(ret).ok()?;
        Some(FileId {
            dev: st[0],
            ino: st[1],
            mode: st[3] as u32,
        })
    }
}

/// `readlink(2)` of the NUL-terminated `path` into `buf`; the length read.
pub fn readlink(path: &[u8], buf: &mut [u8]) -> Result<usize, isize> {
    if path.last() != Some(&0) {
        return Err(22);
    }
    // SAFETY: `path` is NUL-terminated and `buf` is writable for its length.
    let ret = unsafe {
        syscall(
            SYS_READLINK,
            [
                path.as_ptr() as usize,
                buf.as_mut_ptr() as usize,
                buf.len(),
                0,
                0,
                0,
            ],
        )
    };
    check(ret)
}

/// Anonymous private memory of `len` bytes, zeroed, never freed (the process execs or exits).
pub fn alloc(len: usize) -> Result<*mut u8, isize> {
    const PROT_READ_WRITE: usize = 0x1 | 0x2;
    const MAP_PRIVATE_ANONYMOUS: usize = 0x02 | 0x20;
    // SAFETY: an anonymous mapping touches no existing memory.
    let ret = unsafe {
        syscall(
            SYS_MMAP,
            [
                0,
                len,
                PROT_READ_WRITE,
                MAP_PRIVATE_ANONYMOUS,
                usize::MAX,
                0,
            ],
        )
    };
    check(ret).map(|addr| addr as *mut u8)
}

/// `execve(2)`; returns the errno when it fails.
///
/// # Safety
/// `path` must be NUL-terminated, `argv` and `envp` NULL-terminated arrays of NUL-terminated
/// strings.
pub unsafe fn execve(path: *const u8, argv: *const *const u8, envp: *const *const u8) -> isize {
    // SAFETY: upheld by the caller.
    let ret = unsafe {
        syscall(
            SYS_EXECVE,
            [path as usize, argv as usize, envp as usize, 0, 0, 0],
        )
    };
    -ret
}

/// Writes all of `bytes` to file descriptor `fd`, giving up on an error.
pub fn write_all(fd: usize, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is readable for its length.
        let ret = unsafe {
            syscall(
                SYS_WRITE,
                [fd, bytes.as_ptr() as usize, bytes.len(), 0, 0, 0],
            )
        };
        match check(ret) {
            Ok(0) => return,
            Ok(n) => bytes = &bytes[n.min(bytes.len())..],
            Err(4) => continue, // EINTR
            Err(_) => return,
        }
    }
}

/// Ends the process.
pub fn exit(code: i32) -> ! {
    loop {
        // SAFETY: exit_group takes no pointers.
        unsafe {
            syscall(SYS_EXIT_GROUP, [code as usize, 0, 0, 0, 0, 0]);
        }
    }
}
