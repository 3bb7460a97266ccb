//! Host memory shared with the device, and interrupts, as a PCI transport carries them.
//!
//! The host allocates ring and buffer memory as a [`SharedMemory`] (a memfd mapped
//! shared) and maps it for the device at an IOVA. The device sees it through a
//! [`DmaSpace`]: every access names an IOVA range, which must lie inside one mapping or
//! the access fails with [`DmaFault`] — never a wild read. Both transports use the same
//! types: in-process the device maps the host's memfd itself, over vfio-user the memfd
//! arrives with the DMA_MAP message, and kernel VFIO maps the same memory in the IOMMU.
//!
//! Memory that another party writes concurrently is only touched with raw copies
//! (`ptr::copy_nonoverlapping`), never through references.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// An access outside every DMA mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DMA access to {len} bytes at IOVA {iova:#x} is outside every mapping")]
pub struct DmaFault {
    pub iova: u64,
    pub len: usize,
}

/// A shared mapping of (part of) a file: the bytes behind an IOVA range.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; all access goes
// through raw copies bounded by `len`, so moving it to another thread is sound.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Map `len` bytes of `fd` from `offset`, shared and read-write.
    pub fn new(fd: &impl AsFd, offset: u64, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: a fresh shared mapping of a valid fd; the kernel picks the address and
        // checks fd, length and offset. The result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Mapping { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address, for a kernel IOMMU mapping of the same memory.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Copy out `buf.len()` bytes at `offset`; false when out of bounds.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> bool {
        if offset
            .checked_add(buf.len())
            .is_none_or(|end| end > self.len)
        {
            return false;
        }
        // SAFETY: the range is inside the mapping (checked above) and `buf` is a
        // distinct Rust buffer, so the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        true
    }

    /// Copy `data` in at `offset`; false when out of bounds.
    pub fn write(&self, offset: usize, data: &[u8]) -> bool {
        if offset
            .checked_add(data.len())
            .is_none_or(|end| end > self.len)
        {
            return false;
        }
        // SAFETY: as in `read`, with the copy going the other way.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        true
    }
}

impl Mapping {
    /// One 32-bit volatile load at `offset` (device registers: exactly one bus access);
    /// `None` when misaligned or out of bounds.
    pub fn read32_volatile(&self, offset: usize) -> Option<u32> {
        if !offset.is_multiple_of(4) || offset.checked_add(4)? > self.len {
            return None;
        }
        // SAFETY: in bounds and 4-aligned (mmap returns page-aligned memory); a volatile
        // load through a raw pointer, no reference to memory the device may change.
        Some(u32::from_le(unsafe {
            std::ptr::read_volatile(self.ptr.as_ptr().add(offset).cast::<u32>())
        }))
    }

    /// One 32-bit volatile store at `offset`; false when misaligned or out of bounds.
    pub fn write32_volatile(&self, offset: usize, v: u32) -> bool {
        if !offset.is_multiple_of(4) || offset.checked_add(4).is_none_or(|e| e > self.len) {
            return false;
        }
        // SAFETY: as in `read32_volatile`, storing instead of loading.
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(offset).cast::<u32>(), v.to_le()) };
        true
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, unmapped once here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Host memory that can be shared with a device: an anonymous memfd, mapped here.
#[derive(Debug)]
pub struct SharedMemory {
    fd: OwnedFd,
    map: Mapping,
}

impl SharedMemory {
    /// Allocate `len` zeroed bytes (rounded up to a page).
    pub fn new(len: usize) -> io::Result<SharedMemory> {
        let len = len.max(1).next_multiple_of(4096);
        // SAFETY: memfd_create with a static NUL-terminated name; the fd is checked and
        // owned right away.
        let raw = unsafe { libc::memfd_create(c"flowshard-dma".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        File::from(fd.try_clone()?).set_len(len as u64)?;
        let map = Mapping::new(&fd, 0, len)?;
        Ok(SharedMemory { fd, map })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    pub fn mapping(&self) -> &Mapping {
        &self.map
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The device's view of host memory: IOVA ranges and what backs them.
#[derive(Debug, Default)]
pub struct DmaSpace {
    maps: Vec<(u64, Mapping)>,
}

impl DmaSpace {
    /// Make `map` visible at `iova`; refuses an overlap with an existing mapping.
    pub fn map(&mut self, iova: u64, map: Mapping) -> io::Result<()> {
        let end = iova
            .checked_add(map.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "IOVA range wraps"))?;
        if self
            .maps
            .iter()
            .any(|(a, m)| iova < a + m.len() as u64 && *a < end)
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("IOVA range {iova:#x}..{end:#x} overlaps a mapping"),
            ));
        }
        self.maps.push((iova, map));
        Ok(())
    }

    /// Remove every mapping inside `iova..iova + len`.
    pub fn unmap(&mut self, iova: u64, len: u64) {
        self.maps
            .retain(|(a, m)| !(*a >= iova && a + m.len() as u64 <= iova.saturating_add(len)));
    }

    fn find(&self, iova: u64, len: usize) -> Result<(&Mapping, usize), DmaFault> {
        self.maps
            .iter()
            .find(|(a, m)| iova >= *a && iova - a + len as u64 <= m.len() as u64)
            .map(|(a, m)| (m, (iova - a) as usize))
            .ok_or(DmaFault { iova, len })
    }

    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let (m, off) = self.find(iova, buf.len())?;
        m.read(off, buf).then_some(()).ok_or(DmaFault {
            iova,
            len: buf.len(),
        })
    }

    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        let (m, off) = self.find(iova, data.len())?;
        m.write(off, data).then_some(()).ok_or(DmaFault {
            iova,
            len: data.len(),
        })
    }
}

/// An interrupt line as an eventfd: the device signals, the host waits.
#[derive(Debug)]
pub struct EventFd(File);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd with valid flags; the fd is checked and owned right away.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd owned by nothing else.
        Ok(EventFd(unsafe { File::from_raw_fd(raw) }))
    }

    /// Wrap an eventfd received from elsewhere (vfio-user SET_IRQS).
    pub fn from_file(f: File) -> EventFd {
        EventFd(f)
    }

    /// The eventfd as a plain owned descriptor, for APIs with their own eventfd type.
    pub fn into_owned_fd(self) -> OwnedFd {
        OwnedFd::from(self.0)
    }

    pub fn try_clone(&self) -> io::Result<EventFd> {
        Ok(EventFd(self.0.try_clone()?))
    }

    pub fn signal(&self) -> io::Result<()> {
        (&self.0).write_all(&1u64.to_ne_bytes())
    }

    /// Wait up to `timeout_ms` for signals; returns how many arrived (0 on time-out).
    pub fn wait(&self, timeout_ms: i32) -> io::Result<u64> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(0);
        }
        let mut b = [0u8; 8];
        (&self.0).read_exact(&mut b)?;
        Ok(u64::from_ne_bytes(b))
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_sees_host_memory_only_inside_mappings() {
        let host = SharedMemory::new(8192).unwrap();
        let mut dma = DmaSpace::default();
        dma.map(0x10_000, Mapping::new(host.fd(), 0, host.len()).unwrap())
            .unwrap();
        assert!(host.mapping().write(100, b"ring"));
        let mut b = [0u8; 4];
        dma.read(0x10_000 + 100, &mut b).unwrap();
        assert_eq!(&b, b"ring");
        dma.write(0x10_000 + 8190, b"ok").unwrap();
        assert_eq!(
            dma.write(0x10_000 + 8191, b"ok"),
            Err(DmaFault {
                iova: 0x10_000 + 8191,
                len: 2
            })
        );
        assert!(dma.read(0xfff, &mut b).is_err());
        let again = Mapping::new(host.fd(), 0, 4096).unwrap();
        assert!(dma.map(0x11_000, again).is_err(), "overlap refused");
        dma.unmap(0x10_000, 8192);
        assert!(dma.read(0x10_000, &mut b).is_err());
    }

    #[test]
    fn eventfds_count_signals_and_time_out() {
        let e = EventFd::new().unwrap();
        assert_eq!(e.wait(0).unwrap(), 0);
        let d = e.try_clone().unwrap();
        d.signal().unwrap();
        d.signal().unwrap();
        assert_eq!(e.wait(100).unwrap(), 2);
    }
}
