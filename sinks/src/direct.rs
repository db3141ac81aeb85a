//! Files written around the page cache (`O_DIRECT` on Linux), for the IFUR files.
//!
//! A 10M send writes about 1.1 GB of IFUR. Through the page cache, the kernel's copy of those
//! bytes into cache pages cost 11 % of the send's CPU (perf, 2026-12-04), all of it on the
//! sequencer thread every batch passes through, and the fsync at each roll then wrote them out
//! again. With `O_DIRECT` the disk reads the writer's buffer itself, so the copy is gone; the
//! data is on the device when the write returns, and the fsync before the rename only makes
//! the file's size and blocks durable.
//!
//! `O_DIRECT` wants the buffer, the file offset and the length aligned to the device's logical
//! block size; [`Block`] is aligned to [`ALIGN`] (4096, the largest in common use) and full
//! blocks are a multiple of it. The last bytes of a file are written after the flag is cleared.
//! Where the flag is refused (a file system without direct I/O, an unusual alignment), the file
//! is written through the page cache as before: [`create`] retries without it, and
//! [`write_all`] clears it on `EINVAL` and goes on where the refused write stopped.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Alignment of [`Block`]s and of the writes through a direct file.
pub const ALIGN: usize = 4096;

/// Capacity of a [`Block`], a multiple of [`ALIGN`].
pub const BLOCK_BYTES: usize = 1 << 20;

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; ALIGN]);

/// A write buffer of [`BLOCK_BYTES`] aligned to [`ALIGN`], filled from the front.
pub struct Block {
    pages: Vec<Page>,
    len: usize,
}

impl Default for Block {
    fn default() -> Self {
        Block {
            pages: vec![Page([0; ALIGN]); BLOCK_BYTES / ALIGN],
            len: 0,
        }
    }
}

impl Block {
    /// The bytes written so far.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `Page` is `repr(C)` around a byte array, so the pages are `BLOCK_BYTES`
        // contiguous initialised bytes, and `len <= BLOCK_BYTES`.
        let all = unsafe {
            std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.pages.len() * ALIGN)
        };
        &all[..self.len]
    }

    /// Copies as much of `data` as fits; returns how much did.
    pub fn push(&mut self, data: &[u8]) -> usize {
        // SAFETY: as in `bytes`, and the pages are borrowed mutably through `self`.
        let all = unsafe {
            std::slice::from_raw_parts_mut(
                self.pages.as_mut_ptr().cast::<u8>(),
                self.pages.len() * ALIGN,
            )
        };
        let n = data.len().min(all.len() - self.len);
        all[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    /// Whether the block has no room left.
    pub fn is_full(&self) -> bool {
        self.len == self.pages.len() * ALIGN
    }

    /// Empties the block for reuse.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// Creates (or truncates) `path` for writing, with `O_DIRECT` where the file system takes it.
pub fn create(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match o.clone().custom_flags(libc::O_DIRECT).open(path) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            r => return r,
        }
    }
    o.open(path)
}

/// `f`'s file status flags (`F_GETFL`).
#[cfg(target_os = "linux")]
fn status_flags(f: &File) -> io::Result<libc::c_int> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL on a descriptor `f` owns for the duration of the call.
    match unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) } {
        -1 => Err(io::Error::last_os_error()),
        flags => Ok(flags),
    }
}

/// Whether `f` is open with `O_DIRECT`.
pub fn is_direct(f: &File) -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        Ok(status_flags(f)? & libc::O_DIRECT != 0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = f;
        Ok(false)
    }
}

/// Clears `O_DIRECT` on `f`; whether it was set.
pub fn clear_direct(f: &File) -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let flags = status_flags(f)?;
        if flags & libc::O_DIRECT == 0 {
            return Ok(false);
        }
        // SAFETY: F_SETFL on a descriptor `f` owns for the duration of the call.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = f;
        Ok(false)
    }
}

/// Writes all of `data` at `f`'s position. A write the kernel refuses for direct I/O
/// (`EINVAL`: unaligned buffer, offset or length) is repeated through the page cache, with
/// `O_DIRECT` cleared for the rest of the file.
pub fn write_all(mut f: &File, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match f.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_einval(&e) && clear_direct(f)? => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a file's last bytes: the aligned front directly, the rest through the page cache.
pub fn write_tail(f: &File, data: &[u8]) -> io::Result<()> {
    let aligned = data.len() / ALIGN * ALIGN;
    write_all(f, &data[..aligned])?;
    if aligned < data.len() {
        clear_direct(f)?;
        write_all(f, &data[aligned..])?;
    }
    Ok(())
}

fn is_einval(e: &io::Error) -> bool {
    #[cfg(target_os = "linux")]
    {
        e.raw_os_error() == Some(libc::EINVAL)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = e;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn block_fills_to_capacity_and_stays_aligned() {
        let mut b = Block::default();
        assert_eq!(b.bytes().as_ptr() as usize % ALIGN, 0);
        let data = pattern(BLOCK_BYTES + 10);
        assert_eq!(b.push(&data[..7]), 7);
        assert_eq!(b.push(&data[7..]), BLOCK_BYTES - 7);
        assert!(b.is_full());
        assert_eq!(b.push(b"x"), 0);
        assert_eq!(b.bytes(), &data[..BLOCK_BYTES]);
        b.clear();
        assert!(b.bytes().is_empty());
    }

    #[test]
    fn full_blocks_then_an_unaligned_tail_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = create(&path).unwrap();
        let data = pattern(2 * BLOCK_BYTES + 12_345);
        let mut block = Block::default();
        let mut rest = &data[..];
        while !rest.is_empty() {
            rest = &rest[block.push(rest)..];
            if block.is_full() {
                write_all(&f, block.bytes()).unwrap();
                block.clear();
            }
        }
        write_tail(&f, block.bytes()).unwrap();
        f.sync_all().unwrap();
        assert!(!is_direct(&f).unwrap(), "the tail cleared O_DIRECT");
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn a_write_refused_for_direct_io_goes_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = create(&path).unwrap();
        let direct = is_direct(&f).unwrap();
        // One byte in: neither the buffer nor the length is aligned, which direct I/O refuses.
        let mut block = Block::default();
        let data = pattern(3 * ALIGN + 1);
        block.push(&data);
        write_all(&f, &block.bytes()[1..]).unwrap();
        write_all(&f, b"end").unwrap();
        assert!(!is_direct(&f).unwrap());
        let mut want = data[1..].to_vec();
        want.extend_from_slice(b"end");
        assert_eq!(std::fs::read(&path).unwrap(), want);
        // Where the file system takes O_DIRECT (ext4 here), the refusal path was the one taken.
        if cfg!(target_os = "linux") && !direct {
            eprintln!("O_DIRECT not supported under {}", dir.path().display());
        }
    }
}
