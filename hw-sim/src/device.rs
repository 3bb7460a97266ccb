//! The emulated NIC as a PCI function: BAR0 registers from the register map, DMA into
//! host memory, MSI-X vectors as eventfds, running the `nic-firmware` pipeline.
//!
//! The model is sans-I/O: a transport (in-process, vfio-user) hands it register
//! accesses, DMA mappings and eventfds; traffic sources hand it packets. Work happens
//! inside those calls — a doorbell write processes the command ring before it returns,
//! a burst of packets writes its telemetry before it returns — so the same inputs give
//! the same device state on every transport, and the in-process device is
//! deterministic.
//!
//! Flash keeps two slots. The running image's slot is never written; BEGIN erases the
//! other one, COMMIT verifies it (structure, CRC32C, ed25519 signature, table sizes) and
//! marks it to boot at the next reset. A reset boots the marked slot and falls back to
//! the last good one if the new image does not boot (its tables do not fit the
//! device's memory), or to the other slot if the running one no longer boots either. A
//! flash stopped anywhere leaves the running slot as it was. With a [`FlashStore`] the
//! slots and the boot selection outlive the process, as a real NIC's flash does.

use ed25519_dalek::VerifyingKey;
use hdl_bindings::image::{ImageError, MAX_IMAGE_LEN};
use hdl_bindings::regs::{cmd, flash, ident, telem};
use hdl_bindings::ring::{
    CMD_DESC_LEN, COMPLETION_LEN, CmdDesc, Completion, CounterSnapshot, EntryKind, FLOW_IPV6,
    FLOW_LIST_ENTRY_LEN, FlowListEntry, FlowResult, MAX_CLASSIFIER_LEN, MAX_CMD_RING_LOG2,
    MAX_LIST_ENTRIES, MAX_TELEMETRY_RING_LOG2, NO_FLOW_NODE, NO_NODE, NODE_ENTRY_LEN, Opcode,
    Scope, Status, TELEMETRY_ENTRY_LEN, TELEMETRY_VERSION, Table, TelemetryHeader,
};
use hdl_bindings::telemetry::FEATURE_RECORD_LEN;
use hdl_bindings::{IRQ_CMD, IRQ_TELEMETRY, IRQ_VECTORS, PCI_DEVICE_ID, PCI_VENDOR_ID};
use nic_firmware::pipeline::{Decision, FlowCounters, Packet, PinRefused};
use nic_firmware::profile::ClassifierTables;
use nic_firmware::{Class, FlowTuple, LinkType, Pipeline, PipelineConfig, ipproto};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use crate::dma::{DmaSpace, EventFd, Mapping};
use crate::image;

/// Flash commands (`flash.CMD.OP`).
pub mod flash_op {
    pub const BEGIN: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const COMMIT: u32 = 3;
    pub const ABORT: u32 = 4;
}

/// Flash states (`flash.STATUS.STATE`).
pub mod flash_state {
    pub const IDLE: u32 = 0;
    pub const WRITING: u32 = 1;
    pub const COMMITTED: u32 = 2;
    pub const FAILED: u32 = 3;
}

/// Where a device keeps its flash beyond the process (the emulator's files). The
/// device calls it in an order that keeps the stored state bootable if the process
/// dies between any two calls: a slot is written before the boot selection names it,
/// and the selection stops naming a slot before the slot is erased.
pub trait FlashStore: Send + std::fmt::Debug {
    /// Store a verified image in `slot`, replacing what was there.
    fn write_slot(&mut self, slot: usize, image: &[u8]) -> std::io::Result<()>;
    fn erase_slot(&mut self, slot: usize) -> std::io::Result<()>;
    /// Store which slot runs and which, if any, boots at the next reset.
    fn write_boot(&mut self, active: usize, pending: Option<usize>) -> std::io::Result<()>;
}

/// Flash contents as a [`FlashStore`] kept them: what a device restarts from.
#[derive(Clone, Debug, Default)]
pub struct FlashState {
    /// Slot images, A and B (`None`: empty or unreadable).
    pub slots: [Option<Vec<u8>>; 2],
    pub active: usize,
    pub pending: Option<usize>,
}

fn storage_error(e: std::io::Error) -> ImageError {
    ImageError::Storage {
        errno: e.raw_os_error().unwrap_or(0) as u32,
    }
}

/// What the device is built with.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// The only key whose images the flash accepts.
    pub trusted_key: VerifyingKey,
    /// Memory for the data plane's tables; an image whose tables need more fails to boot.
    pub memory_bytes: u64,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            trusted_key: image::dev_verifying_key(),
            memory_bytes: 4 << 30,
        }
    }
}

/// Memory the data plane of `config` needs: connection table entries, bucket and shard
/// tables and the feature staging area.
pub fn memory_needed(config: &PipelineConfig) -> u64 {
    u64::from(config.flow_capacity).next_power_of_two()
        * nic_firmware::conntable::ENTRY_BYTES as u64
        + u64::from(config.buckets) * 2
        + u64::from(config.shards) * 2
        + u64::from(config.feature_slots) * 128
}

#[derive(Debug)]
enum Slot {
    Empty,
    Writing(Vec<u8>),
    Valid { image: Vec<u8>, version: u32 },
}

#[derive(Debug, Default)]
struct CmdRing {
    ring: u64,
    cq: u64,
    log2: u32,
    tail: u32,
    head: u32,
    epoch: u32,
    errors: u32,
}

#[derive(Debug, Default)]
struct TelemRing {
    ring: u64,
    log2: u32,
    head: u32,
    tail: u32,
    overflow: u32,
    snapshot_us: u32,
    next_snapshot_ns: u64,
    seq: u32,
}

/// The emulated NIC.
#[derive(Debug)]
pub struct NicDevice {
    opts: DeviceOptions,
    slots: [Slot; 2],
    active: usize,
    pending: Option<usize>,
    fell_back: bool,
    resets: u32,
    flash_src: u64,
    flash_len: u32,
    flash_offset: u32,
    flash_state: u32,
    flash_error: (u8, u32),
    store: Option<Box<dyn FlashStore>>,
    pipeline: Option<Pipeline>,
    fw_version: u32,
    dma: DmaSpace,
    irqs: Vec<Option<EventFd>>,
    cmd: CmdRing,
    telem: TelemRing,
    scratch: u32,
    /// High words latched by reads of TIME_LO, PACKETS_LO, FORWARDED_LO, FLOWS_LO.
    time_hi: u32,
    packets_hi: u32,
    forwarded_hi: u32,
    flows_hi: u32,
}

/// Size of the PCI configuration space the device serves.
pub const CONFIG_SPACE_LEN: usize = 256;
/// VFIO region index of BAR0.
pub const REGION_BAR0: u32 = 0;
/// VFIO region index of the PCI configuration space.
pub const REGION_CONFIG: u32 = 7;

/// A region access the device cannot serve.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("region {region}: {len} bytes at {offset:#x}: {why}")]
pub struct RegionError {
    pub region: u32,
    pub offset: u64,
    pub len: usize,
    pub why: &'static str,
}

/// BAR0 accesses are whole aligned 32-bit words inside the BAR.
fn bar0_access(offset: u64, len: usize) -> Result<u32, RegionError> {
    let fail = |why| RegionError {
        region: REGION_BAR0,
        offset,
        len,
        why,
    };
    if !offset.is_multiple_of(4) || !len.is_multiple_of(4) || len == 0 {
        return Err(fail("registers are aligned 32-bit words"));
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= u64::from(hdl_bindings::BAR0_SIZE) => Ok(offset as u32),
        _ => Err(fail("outside BAR0")),
    }
}

fn lo(v: u64) -> u32 {
    v as u32
}

fn set_lo(v: &mut u64, x: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(x);
}

fn set_hi(v: &mut u64, x: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(x) << 32);
}

impl NicDevice {
    /// A device at power-on: both flash slots empty, no image running.
    pub fn new(opts: DeviceOptions) -> NicDevice {
        NicDevice {
            opts,
            slots: [Slot::Empty, Slot::Empty],
            active: 0,
            pending: None,
            fell_back: false,
            resets: 0,
            flash_src: 0,
            flash_len: 0,
            flash_offset: 0,
            flash_state: flash_state::IDLE,
            flash_error: (0, 0),
            store: None,
            pipeline: None,
            fw_version: 0,
            dma: DmaSpace::default(),
            irqs: (0..IRQ_VECTORS).map(|_| None).collect(),
            cmd: CmdRing::default(),
            telem: TelemRing::default(),
            scratch: 0,
            time_hi: 0,
            packets_hi: 0,
            forwarded_hi: 0,
            flows_hi: 0,
        }
    }

    /// A device whose flash lives in `store`, powered on with the flash `state` it
    /// kept: slots that no longer verify are treated as empty, then the device boots
    /// as after a reset (the pending slot, else the active one, else the other).
    pub fn restore(
        opts: DeviceOptions,
        state: FlashState,
        store: Box<dyn FlashStore>,
    ) -> NicDevice {
        let mut dev = NicDevice::new(opts);
        for (i, img) in state.slots.into_iter().enumerate() {
            if let Some(img) = img
                && let Ok(info) = image::verify(&img, Some(&dev.opts.trusted_key))
            {
                dev.slots[i] = Slot::Valid {
                    image: img,
                    version: info.image_version,
                };
            }
        }
        dev.active = state.active.min(1);
        dev.pending = state.pending.filter(|p| *p < 2);
        dev.store = Some(store);
        if dev.slots.iter().any(|s| matches!(s, Slot::Valid { .. })) {
            dev.reset();
        }
        dev
    }

    /// The slot running (A = 0) and whether the last reset fell back from the slot it
    /// meant to boot, or `None` when nothing runs.
    pub fn running_slot(&self) -> Option<(usize, u32, bool)> {
        self.pipeline
            .as_ref()
            .map(|_| (self.active, self.fw_version, self.fell_back))
    }

    /// PCI configuration space: ids, class (network controller), BAR0 as 32-bit memory.
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut c = [0u8; CONFIG_SPACE_LEN];
        c[0..2].copy_from_slice(&PCI_VENDOR_ID.to_le_bytes());
        c[2..4].copy_from_slice(&PCI_DEVICE_ID.to_le_bytes());
        c[0x0a] = 0x00; // subclass: Ethernet
        c[0x0b] = 0x02; // class: network controller
        c[0x2c..0x2e].copy_from_slice(&PCI_VENDOR_ID.to_le_bytes());
        c[0x2e..0x30].copy_from_slice(&PCI_DEVICE_ID.to_le_bytes());
        c
    }

    /// Serve a region read: BAR0 as aligned 32-bit registers, the configuration space
    /// as bytes. Every transport goes through here, so all present the same device.
    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), RegionError> {
        match region {
            REGION_BAR0 => {
                let base = bar0_access(offset, buf.len())?;
                for (i, w) in buf.chunks_exact_mut(4).enumerate() {
                    w.copy_from_slice(&self.read(base + 4 * i as u32).to_le_bytes());
                }
                Ok(())
            }
            REGION_CONFIG => {
                let cs = self.config_space();
                let src = usize::try_from(offset)
                    .ok()
                    .and_then(|o| cs.get(o..o.checked_add(buf.len())?))
                    .ok_or(RegionError {
                        region,
                        offset,
                        len: buf.len(),
                        why: "outside the configuration space",
                    })?;
                buf.copy_from_slice(src);
                Ok(())
            }
            _ => Err(RegionError {
                region,
                offset,
                len: buf.len(),
                why: "no such region",
            }),
        }
    }

    /// Serve a region write. Configuration-space writes (command register, BAR sizing)
    /// have no effect on a function whose BAR is fixed.
    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), RegionError> {
        match region {
            REGION_BAR0 => {
                let base = bar0_access(offset, data.len())?;
                for (i, w) in data.chunks_exact(4).enumerate() {
                    self.write(
                        base + 4 * i as u32,
                        u32::from_le_bytes([w[0], w[1], w[2], w[3]]),
                    );
                }
                Ok(())
            }
            REGION_CONFIG if (offset as usize).saturating_add(data.len()) <= CONFIG_SPACE_LEN => {
                Ok(())
            }
            REGION_CONFIG => Err(RegionError {
                region,
                offset,
                len: data.len(),
                why: "outside the configuration space",
            }),
            _ => Err(RegionError {
                region,
                offset,
                len: data.len(),
                why: "no such region",
            }),
        }
    }

    /// The host went away (connection closed, driver unbound): drop its DMA mappings
    /// and interrupts and stop the rings, which pointed into its memory. Tables,
    /// counters and flash slots stay, as on a real NIC.
    pub fn detach(&mut self) {
        self.dma = DmaSpace::default();
        self.irqs.iter_mut().for_each(|i| *i = None);
        self.cmd.log2 = 0;
        self.telem.log2 = 0;
    }

    /// The running data plane, if an image booted.
    pub fn pipeline(&self) -> Option<&Pipeline> {
        self.pipeline.as_ref()
    }

    pub fn dma_map(&mut self, iova: u64, map: Mapping) -> std::io::Result<()> {
        self.dma.map(iova, map)
    }

    pub fn dma_unmap(&mut self, iova: u64, len: u64) {
        self.dma.unmap(iova, len);
    }

    /// Connect (or, with `None`, disconnect) an MSI-X vector.
    pub fn set_irq(&mut self, vector: u32, fd: Option<EventFd>) -> Result<(), String> {
        let slot = self
            .irqs
            .get_mut(vector as usize)
            .ok_or_else(|| format!("no MSI-X vector {vector} (the device has {IRQ_VECTORS})"))?;
        *slot = fd;
        Ok(())
    }

    fn raise(&self, vector: u32) {
        if let Some(Some(fd)) = self.irqs.get(vector as usize) {
            // An interrupt the host stopped listening to is lost, as on a real bus; the
            // ring indices still tell the host everything.
            let _ = fd.signal();
        }
    }

    /// Read a 32-bit register; offsets that hold no register read 0, as on hardware.
    pub fn read(&mut self, offset: u32) -> u32 {
        let (block, reg) = (offset & !0xff, offset & 0xff);
        let header = |ty: u32, major: u16, minor: u16, next: u32| match reg {
            0x00 => Some(ty),
            0x04 => Some((u32::from(major) << 16) | u32::from(minor)),
            0x08 => Some(next),
            _ => None,
        };
        let hdr = match block {
            ident::BASE => header(
                ident::TYPE_ID,
                ident::VERSION_MAJOR,
                ident::VERSION_MINOR,
                ident::NEXT,
            ),
            cmd::BASE => header(
                cmd::TYPE_ID,
                cmd::VERSION_MAJOR,
                cmd::VERSION_MINOR,
                cmd::NEXT,
            ),
            telem::BASE => header(
                telem::TYPE_ID,
                telem::VERSION_MAJOR,
                telem::VERSION_MINOR,
                telem::NEXT,
            ),
            flash::BASE => header(
                flash::TYPE_ID,
                flash::VERSION_MAJOR,
                flash::VERSION_MINOR,
                flash::NEXT,
            ),
            _ => return 0,
        };
        if let Some(v) = hdr {
            return v;
        }
        let p = self.pipeline.as_ref();
        match (block, reg) {
            (ident::BASE, ident::FW_VERSION) => self.fw_version,
            (ident::BASE, ident::BOOT) => {
                let mut v = ident::boot::SLOT.set(0, self.active as u32);
                v = ident::boot::RUNNING.set(v, u32::from(p.is_some()));
                v = ident::boot::FELL_BACK.set(v, u32::from(self.fell_back));
                ident::boot::RESETS.set(v, self.resets)
            }
            (ident::BASE, ident::TIME_LO) => {
                let now = p.map_or(0, |p| p.now_ns());
                self.time_hi = (now >> 32) as u32;
                now as u32
            }
            (ident::BASE, ident::TIME_HI) => self.time_hi,
            (ident::BASE, ident::SCRATCH) => self.scratch,
            (ident::BASE, ident::FLOW_CAPACITY) => p.map_or(0, |p| p.table().capacity()),
            (ident::BASE, ident::FLOWS_ACTIVE) => p.map_or(0, |p| p.table().len()),
            (ident::BASE, ident::BUCKETS) => p.map_or(0, |p| p.bucket_table().len() as u32),
            (ident::BASE, ident::SHARDS) => p.map_or(0, |p| p.shard_table().len() as u32),
            (ident::BASE, ident::NODES) => p.map_or(0, |p| p.counters().nodes.len() as u32),
            (ident::BASE, ident::PACKETS_LO) => {
                let v = p.map_or(0, |p| p.counters().packets());
                self.packets_hi = (v >> 32) as u32;
                v as u32
            }
            (ident::BASE, ident::PACKETS_HI) => self.packets_hi,
            (ident::BASE, ident::FORWARDED_LO) => {
                let v = p.map_or(0, |p| p.counters().verdict(nic_firmware::Verdict::Forward));
                self.forwarded_hi = (v >> 32) as u32;
                v as u32
            }
            (ident::BASE, ident::FORWARDED_HI) => self.forwarded_hi,
            (ident::BASE, ident::FLOWS_LO) => {
                let v = p.map_or(0, |p| p.counters().flows_created);
                self.flows_hi = (v >> 32) as u32;
                v as u32
            }
            (ident::BASE, ident::FLOWS_HI) => self.flows_hi,
            (cmd::BASE, cmd::RING_LO) => lo(self.cmd.ring),
            (cmd::BASE, cmd::RING_HI) => (self.cmd.ring >> 32) as u32,
            (cmd::BASE, cmd::CQ_LO) => lo(self.cmd.cq),
            (cmd::BASE, cmd::CQ_HI) => (self.cmd.cq >> 32) as u32,
            (cmd::BASE, cmd::SIZE) => self.cmd.log2,
            (cmd::BASE, cmd::TAIL) => self.cmd.tail,
            (cmd::BASE, cmd::HEAD) => self.cmd.head,
            (cmd::BASE, cmd::EPOCH) => self.cmd.epoch,
            (cmd::BASE, cmd::ERRORS) => self.cmd.errors,
            (telem::BASE, telem::RING_LO) => lo(self.telem.ring),
            (telem::BASE, telem::RING_HI) => (self.telem.ring >> 32) as u32,
            (telem::BASE, telem::SIZE) => self.telem.log2,
            (telem::BASE, telem::HEAD) => self.telem.head,
            (telem::BASE, telem::TAIL) => self.telem.tail,
            (telem::BASE, telem::OVERFLOW) => self.telem.overflow,
            (telem::BASE, telem::SNAPSHOT_US) => self.telem.snapshot_us,
            (flash::BASE, flash::SRC_LO) => lo(self.flash_src),
            (flash::BASE, flash::SRC_HI) => (self.flash_src >> 32) as u32,
            (flash::BASE, flash::LEN) => self.flash_len,
            (flash::BASE, flash::OFFSET) => self.flash_offset,
            (flash::BASE, flash::STATUS) => {
                let v = flash::status::STATE.set(0, self.flash_state);
                flash::status::ERROR.set(v, u32::from(self.flash_error.0))
            }
            (flash::BASE, flash::DETAIL) => self.flash_error.1,
            (flash::BASE, flash::SLOTS) => {
                let valid = |i: usize| u32::from(matches!(self.slots[i], Slot::Valid { .. }));
                let mut v = flash::slots::A_VALID.set(0, valid(0));
                v = flash::slots::B_VALID.set(v, valid(1));
                v = flash::slots::ACTIVE.set(v, self.active as u32);
                v = flash::slots::PENDING.set(v, u32::from(self.pending.is_some()));
                v = flash::slots::NEXT.set(v, self.pending.unwrap_or(self.active) as u32);
                flash::slots::SIG_REQUIRED.set(v, 1)
            }
            (flash::BASE, flash::A_VERSION) => self.slot_version(0),
            (flash::BASE, flash::B_VERSION) => self.slot_version(1),
            (flash::BASE, flash::MAX_LEN) => MAX_IMAGE_LEN as u32,
            _ => 0,
        }
    }

    fn slot_version(&self, i: usize) -> u32 {
        match self.slots[i] {
            Slot::Valid { version, .. } => version,
            _ => 0,
        }
    }

    /// Write a 32-bit register; read-only and unknown offsets ignore writes.
    pub fn write(&mut self, offset: u32, v: u32) {
        match (offset & !0xff, offset & 0xff) {
            (ident::BASE, ident::SCRATCH) => self.scratch = v,
            (ident::BASE, ident::CONTROL) if ident::control::RESET.get(v) == 1 => self.reset(),
            (cmd::BASE, cmd::RING_LO) => set_lo(&mut self.cmd.ring, v),
            (cmd::BASE, cmd::RING_HI) => set_hi(&mut self.cmd.ring, v),
            (cmd::BASE, cmd::CQ_LO) => set_lo(&mut self.cmd.cq, v),
            (cmd::BASE, cmd::CQ_HI) => set_hi(&mut self.cmd.cq, v),
            (cmd::BASE, cmd::SIZE) => {
                self.cmd.log2 = cmd::size::LOG2.get(v).min(MAX_CMD_RING_LOG2);
                self.cmd.head = 0;
                self.cmd.tail = 0;
            }
            (cmd::BASE, cmd::TAIL) => {
                self.cmd.tail = v;
                self.process_commands();
            }
            (telem::BASE, telem::RING_LO) => set_lo(&mut self.telem.ring, v),
            (telem::BASE, telem::RING_HI) => set_hi(&mut self.telem.ring, v),
            (telem::BASE, telem::SIZE) => {
                self.telem.log2 = telem::size::LOG2.get(v).min(MAX_TELEMETRY_RING_LOG2);
                self.telem.head = 0;
                self.telem.tail = 0;
                self.drain_records();
            }
            (telem::BASE, telem::TAIL) => {
                self.telem.tail = v;
                self.drain_records();
            }
            (telem::BASE, telem::SNAPSHOT_US) => self.telem.snapshot_us = v,
            (flash::BASE, flash::SRC_LO) => set_lo(&mut self.flash_src, v),
            (flash::BASE, flash::SRC_HI) => set_hi(&mut self.flash_src, v),
            (flash::BASE, flash::LEN) => self.flash_len = v,
            (flash::BASE, flash::OFFSET) => self.flash_offset = v,
            (flash::BASE, flash::CMD) => self.flash_command(flash::cmd::OP.get(v)),
            _ => {}
        }
    }

    // ---- flash ---------------------------------------------------------------------

    /// The slot a flash writes: the one not running.
    fn target_slot(&self) -> usize {
        1 - self.active
    }

    fn flash_command(&mut self, op: u32) {
        let result = match op {
            flash_op::BEGIN => self.flash_begin(),
            flash_op::WRITE => self.flash_write(),
            flash_op::COMMIT => self.flash_commit(),
            flash_op::ABORT => {
                self.flash_state = flash_state::IDLE;
                self.erase_target()
            }
            _ => Err(ImageError::Sequence { offset: 0 }),
        };
        match result {
            Ok(()) => self.flash_error = (0, 0),
            Err(e) => {
                self.flash_error = e.to_code();
                if op != flash_op::WRITE || !matches!(e, ImageError::DmaFault { .. }) {
                    // The error reported is the first one; a store that also fails to
                    // erase leaves a slot the boot selection does not name.
                    let _ = self.erase_target();
                    self.flash_state = flash_state::FAILED;
                }
            }
        }
    }

    fn erase_target(&mut self) -> Result<(), ImageError> {
        let t = self.target_slot();
        self.slots[t] = Slot::Empty;
        if self.pending == Some(t) {
            self.pending = None;
            if let Some(s) = self.store.as_mut() {
                s.write_boot(self.active, None).map_err(storage_error)?;
            }
        }
        if let Some(s) = self.store.as_mut() {
            s.erase_slot(t).map_err(storage_error)?;
        }
        Ok(())
    }

    fn flash_begin(&mut self) -> Result<(), ImageError> {
        self.erase_target()?;
        if self.flash_len as usize > MAX_IMAGE_LEN {
            return Err(ImageError::TooLarge {
                len: self.flash_len,
            });
        }
        self.slots[self.target_slot()] = Slot::Writing(vec![0; self.flash_len as usize]);
        self.flash_state = flash_state::WRITING;
        Ok(())
    }

    fn flash_write(&mut self) -> Result<(), ImageError> {
        let t = self.target_slot();
        let (off, len) = (self.flash_offset as usize, self.flash_len as usize);
        let Slot::Writing(buf) = &mut self.slots[t] else {
            return Err(ImageError::Sequence {
                offset: self.flash_offset,
            });
        };
        let chunk = off
            .checked_add(len)
            .and_then(|end| buf.get_mut(off..end))
            .ok_or(ImageError::Sequence {
                offset: self.flash_offset,
            })?;
        self.dma
            .read(self.flash_src, chunk)
            .map_err(|f| ImageError::DmaFault {
                addr: f.iova as u32,
            })
    }

    fn flash_commit(&mut self) -> Result<(), ImageError> {
        let t = self.target_slot();
        let Slot::Writing(buf) = std::mem::replace(&mut self.slots[t], Slot::Empty) else {
            return Err(ImageError::Sequence { offset: 0 });
        };
        let info = image::verify(&buf, Some(&self.opts.trusted_key))?;
        if let Some(s) = self.store.as_mut() {
            s.write_slot(t, &buf).map_err(storage_error)?;
            s.write_boot(self.active, Some(t)).map_err(storage_error)?;
        }
        self.slots[t] = Slot::Valid {
            image: buf,
            version: info.image_version,
        };
        self.pending = Some(t);
        self.flash_state = flash_state::COMMITTED;
        Ok(())
    }

    /// Put an image straight into slot A and boot it, as a factory programmer would;
    /// it is verified exactly as a flashed one.
    pub fn preload(&mut self, img: Vec<u8>) -> Result<(), ImageError> {
        let info = image::verify(&img, Some(&self.opts.trusted_key))?;
        if let Some(s) = self.store.as_mut() {
            s.write_slot(0, &img).map_err(storage_error)?;
            s.write_boot(0, Some(0)).map_err(storage_error)?;
        }
        self.slots[0] = Slot::Valid {
            image: img,
            version: info.image_version,
        };
        self.active = 0;
        self.pending = Some(0);
        self.reset();
        Ok(())
    }

    // ---- reset and boot ------------------------------------------------------------

    /// Reset the data plane: boot the pending slot if any, falling back to the last good
    /// slot if it does not boot. Rings are disabled until the host sets them up again.
    pub fn reset(&mut self) {
        self.resets = (self.resets + 1) & 0xff;
        self.cmd = CmdRing::default();
        self.telem = TelemRing::default();
        self.flash_state = flash_state::IDLE;
        self.fell_back = false;
        let previous = self.active;
        let booted = match self.pending.take() {
            Some(next) if self.boot(next) => Some(next),
            pending => {
                self.fell_back = pending.is_some();
                if self.boot(previous) {
                    Some(previous)
                } else if self.boot(1 - previous) {
                    self.fell_back = true;
                    Some(1 - previous)
                } else {
                    None
                }
            }
        };
        match booted {
            Some(slot) => self.active = slot,
            None => {
                self.pipeline = None;
                self.fw_version = 0;
            }
        }
        if let Some(s) = self.store.as_mut() {
            // A store that cannot record the new selection reports it itself; the
            // stored one still names a slot that boots, so the device stays bootable.
            let _ = s.write_boot(self.active, None);
        }
    }

    fn boot(&mut self, slot: usize) -> bool {
        let Slot::Valid { image, .. } = &self.slots[slot] else {
            return false;
        };
        let Ok((info, tables)) = image::verify_with_tables(image, Some(&self.opts.trusted_key))
        else {
            return false;
        };
        if memory_needed(&info.config) > self.opts.memory_bytes {
            return false;
        }
        match Pipeline::new(&info.config) {
            Ok(mut p) => {
                if p.load_classifier(tables).is_err() {
                    return false;
                }
                self.pipeline = Some(p);
                self.fw_version = info.image_version;
                true
            }
            Err(_) => false,
        }
    }

    // ---- command ring --------------------------------------------------------------

    /// Consume every complete batch between HEAD and TAIL.
    fn process_commands(&mut self) {
        let entries = 1u32 << self.cmd.log2;
        if self.cmd.log2 == 0 || self.cmd.tail.wrapping_sub(self.cmd.head) > entries {
            // Not set up, or a tail beyond the ring: nothing can be read safely.
            self.cmd.errors = self.cmd.errors.wrapping_add(1);
            return;
        }
        let pending = self.cmd.tail.wrapping_sub(self.cmd.head);
        if pending == 0 {
            return;
        }
        let mut descs = vec![CmdDesc::default(); pending as usize];
        for (i, d) in descs.iter_mut().enumerate() {
            let idx = self.cmd.head.wrapping_add(i as u32) & (entries - 1);
            let at = self.cmd.ring + u64::from(idx) * CMD_DESC_LEN as u64;
            if self.dma.read(at, d.as_mut_bytes()).is_err() {
                self.cmd.errors = self.cmd.errors.wrapping_add(1);
                return;
            }
        }
        let mut start = 0;
        let mut done = false;
        while let Some(len) = descs[start..]
            .iter()
            .position(|d| d.is_commit())
            .map(|p| p + 1)
        {
            let batch = &descs[start..start + len];
            let statuses = self.apply_batch(batch);
            for (i, (d, s)) in batch.iter().zip(&statuses).enumerate() {
                let index = self.cmd.head.wrapping_add((start + i) as u32);
                let c = Completion {
                    index: U32::new(index),
                    status: U16::new(*s as u16),
                    opcode: d.opcode,
                };
                let at = self.cmd.cq + u64::from(index & (entries - 1)) * COMPLETION_LEN as u64;
                if self.dma.write(at, c.as_bytes()).is_err() {
                    self.cmd.errors = self.cmd.errors.wrapping_add(1);
                }
                if *s != Status::Ok {
                    self.cmd.errors = self.cmd.errors.wrapping_add(1);
                }
            }
            start += len;
            done = true;
        }
        if start == 0 && pending == entries {
            // A full ring with no COMMIT can never complete: refuse it whole.
            for i in 0..pending {
                let index = self.cmd.head.wrapping_add(i);
                let c = Completion {
                    index: U32::new(index),
                    status: U16::new(Status::BadArgument as u16),
                    opcode: descs[i as usize].opcode,
                };
                let at = self.cmd.cq + u64::from(index & (entries - 1)) * COMPLETION_LEN as u64;
                let _ = self.dma.write(at, c.as_bytes());
            }
            self.cmd.errors = self.cmd.errors.wrapping_add(pending);
            start = pending as usize;
            done = true;
        }
        self.cmd.head = self.cmd.head.wrapping_add(start as u32);
        if done {
            self.raise(IRQ_CMD);
        }
    }

    /// Check every descriptor of a batch — reading the lists and tables it names from
    /// host memory — then apply all of them or none.
    fn apply_batch(&mut self, batch: &[CmdDesc]) -> Vec<Status> {
        let Some(p) = self.pipeline.as_mut() else {
            return vec![Status::NotRunning; batch.len()];
        };
        let mut payloads = Vec::with_capacity(batch.len());
        let mut statuses = Vec::with_capacity(batch.len());
        for d in batch {
            let (status, payload) = match check(p, d) {
                Status::Ok => match read_payload(p, &self.dma, d) {
                    Ok(payload) => (Status::Ok, payload),
                    Err(s) => (s, Payload::None),
                },
                s => (s, Payload::None),
            };
            statuses.push(status);
            payloads.push(payload);
        }
        for (d, s) in batch.iter().zip(statuses.iter_mut()) {
            if *s == Status::Ok && d.opcode.get() == Opcode::ReadTable as u16 {
                let table = Table::from_u32(d.arg0.get()).map(|t| table_bytes(p, t));
                if table.is_none_or(|t| self.dma.write(d.iova(), &t).is_err()) {
                    *s = Status::BadArgument;
                }
            }
        }
        if statuses.iter().any(|s| *s != Status::Ok) {
            return statuses
                .into_iter()
                .map(|s| if s == Status::Ok { Status::Aborted } else { s })
                .collect();
        }
        for (d, payload) in batch.iter().zip(payloads) {
            // Checked above against the same tables, so applying cannot fail.
            let (a0, a1) = (d.arg0.get(), d.arg1.get());
            let op = Opcode::from_u16(d.opcode.get());
            let _ = match (op, payload) {
                (Some(Opcode::LoadClassifier), Payload::Classifier(t)) => p.load_classifier(t),
                (
                    Some(op),
                    Payload::Flows {
                        iova,
                        mut raw,
                        flows,
                    },
                ) => {
                    let results = apply_flows(p, op, &flows);
                    for (e, r) in raw.chunks_exact_mut(FLOW_LIST_ENTRY_LEN).zip(results) {
                        e[40] = r as u8;
                    }
                    // The check read the list from this mapping within this same call,
                    // which no unmap can interleave with, so the write lands.
                    let _ = self.dma.write(iova, &raw);
                    Ok(())
                }
                (op, _) => match op {
                    Some(Opcode::SetBucket) => p.set_bucket(a0, a1 as u16),
                    Some(Opcode::SetShardNode) => p.set_shard_node(a0 as u16, a1 as u16),
                    Some(Opcode::SetNodeState) => match image::node_state_from_code(a1) {
                        Some(s) => p.set_node_state(a0 as u16, s),
                        None => Ok(()),
                    },
                    Some(Opcode::SetClassGroup) => match Class::from_index(a0 as u8) {
                        Some(c) => p.set_class_group(c, a1 as u8),
                        None => Ok(()),
                    },
                    Some(
                        Opcode::Nop
                        | Opcode::ReadTable
                        | Opcode::HandOffFlows
                        | Opcode::PinFlows
                        | Opcode::SetFlowClasses
                        | Opcode::LoadClassifier,
                    )
                    | None => Ok(()),
                },
            };
        }
        self.cmd.epoch = self.cmd.epoch.wrapping_add(1);
        statuses
    }

    // ---- traffic and telemetry -----------------------------------------------------

    /// Offer a burst of packets to the data plane (dropped, uncounted by the device,
    /// when no image runs — as a NIC without firmware receives nothing); decisions are
    /// appended to `out`. Telemetry produced by the burst is written before it returns.
    pub fn receive(&mut self, link: LinkType, pkts: &[Packet<'_>], out: &mut Vec<Decision>) {
        let Some(p) = self.pipeline.as_mut() else {
            return;
        };
        p.process_burst(link, pkts, out);
        self.drain_records();
        self.snapshot_if_due();
    }

    /// End every flow (flow-end records go to the telemetry ring).
    pub fn flush(&mut self) {
        if let Some(p) = self.pipeline.as_mut() {
            p.flush();
        }
        self.drain_records();
    }

    fn ring_space(&self) -> u32 {
        if self.telem.log2 == 0 {
            return 0;
        }
        (1u32 << self.telem.log2).saturating_sub(self.telem.head.wrapping_sub(self.telem.tail))
    }

    /// Write one entry at HEAD; false (and counted) when the ring is full or off.
    fn push_entry(&mut self, kind: EntryKind, payload: &[u8]) -> bool {
        if self.ring_space() == 0 {
            self.telem.overflow = self.telem.overflow.wrapping_add(1);
            return false;
        }
        let mut entry = [0u8; TELEMETRY_ENTRY_LEN];
        let h = TelemetryHeader {
            kind: kind as u8,
            version: TELEMETRY_VERSION,
            len: U16::new(payload.len() as u16),
            seq: U32::new(self.telem.seq),
        };
        entry[..8].copy_from_slice(h.as_bytes());
        entry[8..8 + payload.len()].copy_from_slice(payload);
        let idx = self.telem.head & ((1 << self.telem.log2) - 1);
        let at = self.telem.ring + u64::from(idx) * TELEMETRY_ENTRY_LEN as u64;
        if self.dma.write(at, &entry).is_err() {
            self.telem.overflow = self.telem.overflow.wrapping_add(1);
            return false;
        }
        self.telem.seq = self.telem.seq.wrapping_add(1);
        self.telem.head = self.telem.head.wrapping_add(1);
        true
    }

    /// Move feature records from the pipeline into the ring; those that find it full
    /// are counted in OVERFLOW. With the ring off they wait in the pipeline's queue
    /// (which counts its own overflow).
    fn drain_records(&mut self) {
        if self.telem.log2 == 0 {
            return;
        }
        let Some(p) = self.pipeline.as_mut() else {
            return;
        };
        let records: Vec<[u8; FEATURE_RECORD_LEN]> =
            p.drain_records().map(|r| r.to_bytes()).collect();
        let mut wrote = false;
        for r in &records {
            wrote |= self.push_entry(EntryKind::FeatureRecord, r);
        }
        if wrote {
            self.raise(IRQ_TELEMETRY);
        }
    }

    fn snapshot_if_due(&mut self) {
        let Some(p) = self.pipeline.as_ref() else {
            return;
        };
        if self.telem.snapshot_us == 0 || p.now_ns() < self.telem.next_snapshot_ns {
            return;
        }
        let now = p.now_ns();
        let c = p.counters();
        let mut snaps = Vec::with_capacity(1 + c.nodes.len() + c.shards.len() + Class::COUNT + 1);
        let snap = |scope: Scope, id: usize, f: FlowCounters, active: u64| CounterSnapshot {
            scope: scope as u8,
            id: U16::new(id as u16),
            nic_time_ns: U64::new(now),
            packets: U64::new(f.packets),
            bytes: U64::new(f.bytes),
            flows: U64::new(f.flows),
            active_flows: U64::new(active),
            ..CounterSnapshot::default()
        };
        let device = FlowCounters {
            packets: c.packets(),
            bytes: c.bytes,
            flows: c.flows_created,
        };
        snaps.push(snap(Scope::Device, 0, device, u64::from(p.table().len())));
        for (i, n) in c.nodes.iter().enumerate() {
            let f = FlowCounters {
                packets: n.packets,
                bytes: n.bytes,
                flows: n.flows,
            };
            snaps.push(snap(Scope::Node, i, f, n.active_flows));
        }
        for (i, s) in c.shards.iter().enumerate() {
            snaps.push(snap(Scope::Shard, i, *s, 0));
        }
        for (i, s) in c.classes.iter().enumerate() {
            snaps.push(snap(Scope::Class, i, *s, 0));
        }
        self.telem.next_snapshot_ns = now + u64::from(self.telem.snapshot_us) * 1000;
        let mut wrote = false;
        for s in &snaps {
            wrote |= self.push_entry(EntryKind::Counters, s.as_bytes());
        }
        if wrote {
            self.raise(IRQ_TELEMETRY);
        }
    }
}

/// A table as [`Opcode::ReadTable`] lays it out in host memory.
fn table_bytes(p: &Pipeline, table: Table) -> Vec<u8> {
    match table {
        Table::BucketShard => p
            .bucket_table()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        Table::ShardNode => p
            .shard_table()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        Table::Nodes => {
            let ids = p.counters().nodes.len();
            let mut out = vec![0u8; ids * NODE_ENTRY_LEN];
            for e in out.chunks_exact_mut(NODE_ENTRY_LEN) {
                e[..4].copy_from_slice(&NO_NODE.to_le_bytes());
            }
            for n in p.nodes() {
                let at = usize::from(n.id) * NODE_ENTRY_LEN;
                let state = u32::from(image::node_state_code(n.state));
                out[at..at + 4].copy_from_slice(&state.to_le_bytes());
                out[at + 4..at + 8].copy_from_slice(&n.weight.to_le_bytes());
            }
            out
        }
    }
}

/// What checking a descriptor read from host memory, kept to apply it.
enum Payload {
    None,
    /// A flow list: where it lies, its bytes (to write the results back into) and its
    /// entries as tuples with their values.
    Flows {
        iova: u64,
        raw: Vec<u8>,
        flows: Vec<(FlowTuple, u16)>,
    },
    Classifier(Option<ClassifierTables>),
}

/// The flow a list entry names, if the entry is well formed.
fn entry_tuple(e: &FlowListEntry) -> Option<FlowTuple> {
    let ipv6 = e.flags & FLOW_IPV6 != 0;
    let padded = |a: &[u8; 16]| ipv6 || a[4..].iter().all(|b| *b == 0);
    if e.flags & !FLOW_IPV6 != 0
        || e.result != 0
        || e.reserved != [0; 7]
        || !padded(&e.src)
        || !padded(&e.dst)
    {
        return None;
    }
    Some(FlowTuple {
        src: e.src,
        dst: e.dst,
        sport: e.sport.get(),
        dport: e.dport.get(),
        proto: e.proto,
        ipv6,
        has_ports: matches!(e.proto, ipproto::TCP | ipproto::UDP),
    })
}

/// The list entry of `tuple` with `value`, as the host writes it.
pub fn flow_list_entry(tuple: &FlowTuple, value: u16) -> FlowListEntry {
    FlowListEntry {
        src: tuple.src,
        dst: tuple.dst,
        sport: U16::new(tuple.sport),
        dport: U16::new(tuple.dport),
        proto: tuple.proto,
        flags: if tuple.ipv6 { FLOW_IPV6 } else { 0 },
        value: U16::new(value),
        ..FlowListEntry::default()
    }
}

/// Read and check the list or tables a descriptor names (nothing for other opcodes).
fn read_payload(p: &Pipeline, dma: &DmaSpace, d: &CmdDesc) -> Result<Payload, Status> {
    let op = Opcode::from_u16(d.opcode.get());
    let count = d.arg0.get();
    match op {
        Some(Opcode::LoadClassifier) => {
            if count == 0 {
                return Ok(Payload::Classifier(None));
            }
            if count > MAX_CLASSIFIER_LEN {
                return Err(Status::BadCount);
            }
            let mut bytes = vec![0u8; count as usize];
            dma.read(d.iova(), &mut bytes)
                .map_err(|_| Status::DmaFault)?;
            let t = ClassifierTables::from_bytes(&bytes).map_err(|_| Status::BadClassifier)?;
            if t.packets() != p.config().feature_packets {
                return Err(Status::BadClassifier);
            }
            Ok(Payload::Classifier(Some(t)))
        }
        Some(Opcode::HandOffFlows | Opcode::PinFlows | Opcode::SetFlowClasses) => {
            if count == 0 || count > MAX_LIST_ENTRIES {
                return Err(Status::BadCount);
            }
            let mut raw = vec![0u8; count as usize * FLOW_LIST_ENTRY_LEN];
            dma.read(d.iova(), &mut raw).map_err(|_| Status::DmaFault)?;
            let classes = op == Some(Opcode::SetFlowClasses);
            let mut flows = Vec::with_capacity(count as usize);
            for chunk in raw.chunks_exact(FLOW_LIST_ENTRY_LEN) {
                let e = FlowListEntry::ref_from_bytes(chunk).map_err(|_| Status::BadFlow)?;
                let tuple = entry_tuple(e).ok_or(Status::BadFlow)?;
                let v = e.value.get();
                if classes && usize::from(v) >= Class::COUNT {
                    return Err(Status::BadClass);
                }
                if !classes && v != NO_FLOW_NODE && p.node_state(v).is_none() {
                    return Err(Status::BadNode);
                }
                flows.push((tuple, v));
            }
            Ok(Payload::Flows {
                iova: d.iova(),
                raw,
                flows,
            })
        }
        _ => Ok(Payload::None),
    }
}

/// Apply a checked flow list in order; one result per entry.
fn apply_flows(p: &mut Pipeline, op: Opcode, flows: &[(FlowTuple, u16)]) -> Vec<FlowResult> {
    let done = |ok: bool| {
        if ok {
            FlowResult::Applied
        } else {
            FlowResult::NoSuchFlow
        }
    };
    flows
        .iter()
        .map(|(t, v)| match (op, *v) {
            (Opcode::HandOffFlows, NO_FLOW_NODE) => done(p.cancel_hand_off(t)),
            (Opcode::HandOffFlows, node) => done(p.hand_off(t, node)),
            (Opcode::PinFlows, NO_FLOW_NODE) => done(p.unpin_flow(t)),
            (Opcode::PinFlows, node) => match p.pin_flow(t, node) {
                Ok(()) => FlowResult::Applied,
                Err(PinRefused::NoSuchFlow) => FlowResult::NoSuchFlow,
                Err(PinRefused::NodeNotActive) => FlowResult::NodeNotActive,
            },
            (_, class) => match Class::from_index(class as u8) {
                Some(c) => done(p.set_flow_class(t, c)),
                None => FlowResult::NotApplied,
            },
        })
        .collect()
}

/// Whether a descriptor can be applied to `p` as it is now.
fn check(p: &Pipeline, d: &CmdDesc) -> Status {
    let (a0, a1) = (d.arg0.get(), d.arg1.get());
    let node_known = |n: u32| p.nodes().any(|c| u32::from(c.id) == n);
    let ok = match Opcode::from_u16(d.opcode.get()) {
        None => return Status::BadOpcode,
        Some(Opcode::Nop) => true,
        Some(Opcode::ReadTable) => Table::from_u32(a0).is_some(),
        // Their lists and tables are checked as they are read (`read_payload`).
        Some(
            Opcode::HandOffFlows
            | Opcode::PinFlows
            | Opcode::SetFlowClasses
            | Opcode::LoadClassifier,
        ) => true,
        Some(Opcode::SetBucket) => {
            (a0 as usize) < p.bucket_table().len() && (a1 as usize) < p.shard_table().len()
        }
        Some(Opcode::SetShardNode) => (a0 as usize) < p.shard_table().len() && node_known(a1),
        Some(Opcode::SetNodeState) => node_known(a0) && image::node_state_from_code(a1).is_some(),
        Some(Opcode::SetClassGroup) => {
            a0 < Class::COUNT as u32
                && (1..=u32::from(nic_firmware::config::MAX_GROUP)).contains(&a1)
                && a1 <= p.shard_table().len() as u32
        }
    };
    if ok { Status::Ok } else { Status::BadArgument }
}

/// Telemetry entries as the host reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TelemetryItem {
    Record(hdl_bindings::telemetry::FeatureRecord),
    Counters(CounterSnapshot),
}

/// Decode one telemetry entry; `None` for a kind or layout this build does not know.
pub fn decode_entry(entry: &[u8]) -> Option<(u32, TelemetryItem)> {
    let (h, rest) = TelemetryHeader::read_from_prefix(entry).ok()?;
    if h.version != TELEMETRY_VERSION {
        return None;
    }
    let payload = rest.get(..h.len.get() as usize)?;
    let item = match h.kind {
        k if k == EntryKind::FeatureRecord as u8 => {
            TelemetryItem::Record(hdl_bindings::telemetry::FeatureRecord::from_bytes(payload).ok()?)
        }
        k if k == EntryKind::Counters as u8 => {
            TelemetryItem::Counters(CounterSnapshot::read_from_bytes(payload).ok()?)
        }
        _ => return None,
    };
    Some((h.seq.get(), item))
}

#[cfg(test)]
mod tests {
    use hdl_bindings::ring::{FLOW_LIST_ENTRY_LEN, MAX_LIST_ENTRIES};
    use nic_firmware::profile::{Forest, Node, SCORE_ONE};

    use super::*;
    use crate::dma::SharedMemory;
    use crate::generate::{FRAME_LEN, WIRE_LEN, write_frame};

    const IOVA: u64 = 0x1000_0000;
    /// Where the tests put lists, inside the one mapping.
    const LIST: u64 = IOVA + 4096;

    /// A booted device with a command ring of 16 entries in one host buffer.
    struct Host {
        dev: NicDevice,
        mem: SharedMemory,
    }

    impl Host {
        fn new() -> Host {
            let config = PipelineConfig {
                flow_capacity: 4096,
                buckets: 256,
                shards: 16,
                feature_packets: 4,
                ..PipelineConfig::default()
            };
            let img = image::sign(
                &image::build(&config, 1).unwrap(),
                &image::dev_signing_key(),
            )
            .unwrap();
            let mut dev = NicDevice::new(DeviceOptions::default());
            dev.preload(img).unwrap();
            let mem = SharedMemory::new(1 << 20).unwrap();
            dev.dma_map(IOVA, Mapping::new(mem.fd(), 0, mem.len()).unwrap())
                .unwrap();
            Host { dev, mem }
        }

        /// Run one batch on a freshly reset ring; the statuses in order.
        fn submit(&mut self, batch: &[CmdDesc]) -> Vec<Status> {
            let cq = IOVA + 16 * CMD_DESC_LEN as u64;
            self.dev.write(cmd::BASE + cmd::RING_LO, IOVA as u32);
            self.dev
                .write(cmd::BASE + cmd::RING_HI, (IOVA >> 32) as u32);
            self.dev.write(cmd::BASE + cmd::CQ_LO, cq as u32);
            self.dev.write(cmd::BASE + cmd::CQ_HI, 0);
            self.dev.write(cmd::BASE + cmd::SIZE, 4);
            for (i, d) in batch.iter().enumerate() {
                let d = if i + 1 == batch.len() { d.commit() } else { *d };
                assert!(self.mem.mapping().write(i * CMD_DESC_LEN, d.as_bytes()));
            }
            self.dev.write(cmd::BASE + cmd::TAIL, batch.len() as u32);
            (0..batch.len())
                .map(|i| {
                    let mut c = Completion::default();
                    let at = 16 * CMD_DESC_LEN + i * COMPLETION_LEN;
                    assert!(self.mem.mapping().read(at, c.as_mut_bytes()));
                    Status::from_u16(c.status.get()).unwrap()
                })
                .collect()
        }

        /// Write list entries at `LIST + offset`.
        fn put(&self, offset: u64, entries: &[FlowListEntry]) {
            for (i, e) in entries.iter().enumerate() {
                let at = (LIST - IOVA + offset) as usize + i * FLOW_LIST_ENTRY_LEN;
                assert!(self.mem.mapping().write(at, e.as_bytes()));
            }
        }

        fn result(&self, offset: u64, i: usize) -> FlowResult {
            let mut b = [0u8; 1];
            let at = (LIST - IOVA + offset) as usize + i * FLOW_LIST_ENTRY_LEN + 40;
            assert!(self.mem.mapping().read(at, &mut b));
            FlowResult::from_u8(b[0]).unwrap()
        }

        /// One packet of generated flow `f` at `ts_ns`, and its tuple.
        fn packet(&mut self, f: u32, ts_ns: u64) -> (Decision, FlowTuple) {
            let mut frame = [0u8; FRAME_LEN];
            write_frame(f, &mut frame);
            let pkt = Packet {
                ts_ns,
                data: &frame,
                wire_len: WIRE_LEN,
            };
            let mut out = Vec::new();
            self.dev.receive(LinkType::Ethernet, &[pkt], &mut out);
            let tuple = nic_firmware::parse::parse(LinkType::Ethernet, &frame, WIRE_LEN)
                .unwrap()
                .tuple;
            (out[0], tuple)
        }

        fn pipeline(&self) -> &Pipeline {
            self.dev.pipeline().unwrap()
        }
    }

    fn tables(packets: u8) -> ClassifierTables {
        let mut scores = [0; Class::COUNT];
        scores[Class::Bulk as usize] = SCORE_ONE;
        ClassifierTables::compile(&Forest {
            packets,
            trees: vec![vec![Node::Leaf { scores }]],
        })
        .unwrap()
    }

    #[test]
    fn every_bad_list_or_table_names_its_problem_and_nothing_of_the_batch_applies() {
        let mut h = Host::new();
        let (d, tuple) = h.packet(1, 1_000);
        let node = (d.node + 1) % 4;
        let good = flow_list_entry(&tuple, node);
        let class = flow_list_entry(&tuple, Class::Video as u16);
        h.put(0, &[class]);
        h.put(1024, &[good]);
        let mut bad_flags = good;
        bad_flags.flags = 0x80;
        let mut bad_pad = good;
        bad_pad.src[7] = 1;
        let mut dirty = good;
        dirty.result = 1;
        let mut reserved = good;
        reserved.reserved[6] = 1;
        let undefined = flow_list_entry(&tuple, 4);
        let no_class = flow_list_entry(&tuple, Class::COUNT as u16);
        h.put(
            2048,
            &[bad_flags, bad_pad, dirty, reserved, undefined, no_class],
        );
        let at = |i: u64| LIST + 2048 + i * FLOW_LIST_ENTRY_LEN as u64;
        let classes = CmdDesc::list(Opcode::SetFlowClasses, 1, LIST);
        let corrupt = {
            let mut b = tables(4).to_bytes();
            let n = b.len();
            b[n - 3] ^= 0xff;
            b[20] ^= 1;
            b
        };
        assert!(h.mem.mapping().write(8192, &corrupt));
        let wrong_n = tables(8).to_bytes();
        assert!(h.mem.mapping().write(16384, &wrong_n));
        let cases = [
            (
                CmdDesc::list(Opcode::HandOffFlows, 1, 0x9_0000_0000),
                Status::DmaFault,
            ),
            // The list runs past the end of the mapping.
            (
                CmdDesc::list(Opcode::PinFlows, 30_000, LIST),
                Status::DmaFault,
            ),
            (
                CmdDesc::list(Opcode::HandOffFlows, 0, LIST),
                Status::BadCount,
            ),
            (
                CmdDesc::list(Opcode::HandOffFlows, MAX_LIST_ENTRIES + 1, LIST),
                Status::BadCount,
            ),
            (
                CmdDesc::list(Opcode::HandOffFlows, 1, at(0)),
                Status::BadFlow,
            ),
            (
                CmdDesc::list(Opcode::HandOffFlows, 1, at(1)),
                Status::BadFlow,
            ),
            (CmdDesc::list(Opcode::PinFlows, 1, at(2)), Status::BadFlow),
            (
                CmdDesc::list(Opcode::SetFlowClasses, 1, at(3)),
                Status::BadFlow,
            ),
            (
                CmdDesc::list(Opcode::HandOffFlows, 1, at(4)),
                Status::BadNode,
            ),
            (CmdDesc::list(Opcode::PinFlows, 1, at(4)), Status::BadNode),
            (
                CmdDesc::list(Opcode::SetFlowClasses, 1, at(5)),
                Status::BadClass,
            ),
            (
                CmdDesc::list(Opcode::LoadClassifier, corrupt.len() as u32, IOVA + 8192),
                Status::BadClassifier,
            ),
            (
                CmdDesc::list(Opcode::LoadClassifier, wrong_n.len() as u32, IOVA + 16384),
                Status::BadClassifier,
            ),
            (
                CmdDesc::list(Opcode::LoadClassifier, MAX_CLASSIFIER_LEN + 1, IOVA),
                Status::BadCount,
            ),
        ];
        for (desc, want) in cases {
            // A good class push first: it must not apply when the next descriptor fails.
            let st = h.submit(&[classes, desc]);
            assert_eq!(st, [Status::Aborted, want], "{desc:?}");
            assert_eq!(h.pipeline().counters().class_pushes, 0);
            assert_eq!(h.result(0, 0), FlowResult::NotApplied);
            assert_eq!(h.pipeline().pending_hand_offs(), 0);
            assert!(h.pipeline().classifier().is_none());
        }
        assert_eq!(
            h.submit(&[classes, CmdDesc::list(Opcode::HandOffFlows, 1, LIST + 1024)]),
            [Status::Ok, Status::Ok]
        );
        assert_eq!(
            (h.result(0, 0), h.result(1024, 0)),
            (FlowResult::Applied, FlowResult::Applied)
        );
        assert_eq!(h.pipeline().pending_hand_offs(), 1);
        // The flow's next flowlet reaches the new node, with the pushed class.
        let (d, _) = h.packet(1, 1_000_000);
        assert_eq!((d.node, d.class), (node, Class::Video as u8));
        // A list whose result bytes the host did not clear is refused.
        assert_eq!(
            h.submit(&[CmdDesc::list(Opcode::SetFlowClasses, 1, LIST)]),
            [Status::BadFlow]
        );
    }

    #[test]
    fn lists_report_each_flow_and_the_classifier_loads_and_clears() {
        let mut h = Host::new();
        let (d, tuple) = h.packet(1, 1_000);
        let (_, gone) = h.packet(2, 1_000);
        let gone = FlowTuple {
            sport: gone.sport ^ 1,
            ..gone
        };
        let target = (d.node + 1) % 4;
        h.dev
            .pipeline
            .as_mut()
            .unwrap()
            .set_node_state((d.node + 2) % 4, nic_firmware::NodeState::Draining)
            .unwrap();
        h.put(
            0,
            &[
                flow_list_entry(&tuple.reversed(), target),
                flow_list_entry(&gone, target),
                flow_list_entry(&tuple, (d.node + 2) % 4),
            ],
        );
        assert_eq!(
            h.submit(&[CmdDesc::list(Opcode::PinFlows, 3, LIST)]),
            [Status::Ok]
        );
        assert_eq!(
            [h.result(0, 0), h.result(0, 1), h.result(0, 2)],
            [
                FlowResult::Applied,
                FlowResult::NoSuchFlow,
                FlowResult::NodeNotActive
            ]
        );
        assert_eq!(h.packet(1, 2_000).0.node, target, "a pin moves at once");
        let c = h.pipeline().counters();
        assert_eq!((c.flows_pinned, c.pins_refused), (1, 2));
        h.put(
            0,
            &[
                flow_list_entry(&tuple, NO_FLOW_NODE),
                flow_list_entry(&gone, NO_FLOW_NODE),
            ],
        );
        assert_eq!(
            h.submit(&[CmdDesc::list(Opcode::PinFlows, 2, LIST)]),
            [Status::Ok]
        );
        assert_eq!(
            [h.result(0, 0), h.result(0, 1)],
            [FlowResult::Applied, FlowResult::NoSuchFlow]
        );
        h.put(
            0,
            &[
                flow_list_entry(&tuple, d.node),
                flow_list_entry(&tuple, NO_FLOW_NODE),
            ],
        );
        assert_eq!(
            h.submit(&[CmdDesc::list(Opcode::HandOffFlows, 2, LIST)]),
            [Status::Ok]
        );
        assert_eq!(
            [h.result(0, 0), h.result(0, 1)],
            [FlowResult::Applied, FlowResult::Applied],
            "scheduled, then cancelled, in order"
        );
        assert_eq!(h.pipeline().pending_hand_offs(), 0);

        let bytes = tables(4).to_bytes();
        assert!(h.mem.mapping().write(8192, &bytes));
        let load = CmdDesc::list(Opcode::LoadClassifier, bytes.len() as u32, IOVA + 8192);
        assert_eq!(h.submit(&[load]), [Status::Ok]);
        assert_eq!(h.pipeline().classifier().unwrap().to_bytes(), bytes);
        for i in 0..4 {
            h.packet(3, 10_000 + i);
        }
        assert_eq!(
            h.packet(3, 20_000).0.class,
            Class::Bulk as u8,
            "classified on the NIC"
        );
        assert_eq!(
            h.submit(&[CmdDesc::list(Opcode::LoadClassifier, 0, 0)]),
            [Status::Ok]
        );
        assert!(h.pipeline().classifier().is_none());
    }
}
