//! The flowshard NIC driver, written once over [`Device`]: finds the register blocks,
//! flashes images, runs the command and telemetry rings, reports status.

use std::collections::HashSet;

use hdl_bindings::image::ImageError;
use hdl_bindings::regs::{cmd, flash, ident, telem};
use hdl_bindings::ring::{
    CMD_DESC_LEN, COMPLETION_LEN, CmdDesc, Completion, FLOW_LIST_ENTRY_LEN, FlowResult,
    MAX_CLASSIFIER_LEN, MAX_CMD_RING_LOG2, MAX_LIST_ENTRIES, MAX_TELEMETRY_RING_LOG2, NO_NODE,
    NODE_ENTRY_LEN, Opcode, Status, TELEMETRY_ENTRY_LEN, Table,
};
use hdl_bindings::{BAR0_SIZE, BLOCKS, IRQ_CMD, IRQ_TELEMETRY, PCI_DEVICE_ID, PCI_VENDOR_ID};
use hw_sim::device::{TelemetryItem, decode_entry, flash_op, flash_state, flow_list_entry};
use hw_sim::dma::{EventFd, SharedMemory};
use nic_firmware::profile::ClassifierTables;
use nic_firmware::{Class, FlowTuple};
use serde::Serialize;
use zerocopy::IntoBytes;

use crate::device::{Device, DeviceError, REGION_CONFIG};

/// Where the driver maps its host memory for the device.
const CMD_IOVA: u64 = 0x1_0000_0000;
const TELEM_IOVA: u64 = 0x2_0000_0000;
const FLASH_IOVA: u64 = 0x3_0000_0000;
const TABLES_IOVA: u64 = 0x4_0000_0000;
/// Flow lists and classifier tables for the command ring: a buffer kept mapped between
/// commands and grown when a list needs more, so a steady stream of updates costs no
/// mapping (a socket round trip over vfio-user) per batch.
const LIST_IOVA: u64 = 0x5_0000_0000;
/// Most bytes of steering tables the driver accepts from a device (2^24 buckets).
const MAX_TABLE_BYTES: usize = 40 << 20;
/// Longest the driver waits for the device to finish a request.
const TIMEOUT_MS: i32 = 2_000;
/// Most register blocks a BAR0 list may have before the driver calls it a loop.
const MAX_BLOCKS: usize = 64;

/// Everything that can go wrong driving a NIC.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    /// Opening the device failed; the transports' errors name the device already.
    #[error(transparent)]
    Open(DeviceError),
    #[error("{device}: {source}")]
    Device {
        device: String,
        #[source]
        source: DeviceError,
    },
    #[error(
        "{device}: not a flowshard NIC (PCI id {vendor:04x}:{dev:04x}, expected {PCI_VENDOR_ID:04x}:{PCI_DEVICE_ID:04x})"
    )]
    NotFlowshard {
        device: String,
        vendor: u16,
        dev: u16,
    },
    #[error("{device}: register block list: {why}")]
    BlockList { device: String, why: String },
    #[error("{device}: no {block} register block")]
    MissingBlock { device: String, block: &'static str },
    #[error(
        "{device}: {block} register block has version {major}.{minor}; this driver supports major version {supported}"
    )]
    Incompatible {
        device: String,
        block: &'static str,
        major: u16,
        minor: u16,
        supported: u16,
    },
    #[error("{device}: image rejected, active image untouched: {error}")]
    Rejected { device: String, error: ImageError },
    #[error(
        "{device}: the flashed image (version {version}) did not boot; the device fell back to slot {slot} running version {running}"
    )]
    BootFailed {
        device: String,
        version: u32,
        slot: char,
        running: u32,
    },
    #[error(
        "{device}: flash interrupted after {written} of {total} bytes; the active image is untouched"
    )]
    Interrupted {
        device: String,
        written: usize,
        total: usize,
    },
    #[error("{device}: {what} refused, nothing applied: {}", .status.as_str())]
    Refused {
        device: String,
        what: &'static str,
        status: Status,
    },
    #[error("{device}: {what}")]
    Protocol { device: String, what: String },
}

/// Addresses of the register blocks, as found by walking the list.
#[derive(Clone, Copy, Debug)]
struct Blocks {
    ident: u32,
    cmd: u32,
    telem: u32,
    flash: u32,
}

#[derive(Debug)]
struct CmdRing {
    mem: SharedMemory,
    entries: u32,
    tail: u32,
    irq: EventFd,
}

#[derive(Debug)]
struct TelemRing {
    mem: SharedMemory,
    entries: u32,
    tail: u32,
}

/// A flash slot as status shows it.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct SlotStatus {
    pub valid: bool,
    pub version: u32,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct RingStatus {
    pub entries: u32,
    pub head: u32,
    pub tail: u32,
    /// Command ring: batches committed. Telemetry ring: entries lost.
    pub epoch_or_overflow: u32,
    /// Command ring: descriptors that failed.
    pub errors: u32,
}

/// What `flowshard status` shows.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct NicStatus {
    pub device: String,
    pub pci_id: String,
    pub running: bool,
    pub image_version: u32,
    pub slot: char,
    pub fell_back: bool,
    pub resets: u32,
    pub nic_time_ns: u64,
    pub flow_capacity: u32,
    pub flows_active: u32,
    pub buckets: u32,
    pub shards: u32,
    pub nodes: u32,
    /// Packets received, forwarded, and flows created since the image booted.
    pub packets: u64,
    pub forwarded: u64,
    pub flows_created: u64,
    pub slot_a: SlotStatus,
    pub slot_b: SlotStatus,
    /// Slot that boots at the next reset, if a flash committed one.
    pub pending: Option<char>,
    pub signature_required: bool,
    pub command_ring: RingStatus,
    pub telemetry_ring: RingStatus,
}

/// Result of a flash.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct FlashReport {
    pub bytes: usize,
    pub slot: char,
    pub image_version: u32,
    pub previous_version: u32,
}

/// Telemetry drained from the ring.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Telemetry {
    pub items: Vec<TelemetryItem>,
    /// Entries of a kind or layout this driver does not read.
    pub unreadable: u32,
}

/// The steering tables as the device holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tables {
    pub bucket_shard: Vec<u16>,
    pub shard_node: Vec<u16>,
    /// The nodes the image defines, by id.
    pub nodes: Vec<nic_firmware::config::NodeConfig>,
}

fn slot_name(i: u32) -> char {
    if i == 0 { 'A' } else { 'B' }
}

/// A flowshard NIC, opened.
#[derive(Debug)]
pub struct Nic<D: Device> {
    dev: D,
    name: String,
    blocks: Blocks,
    cmd: Option<CmdRing>,
    telem: Option<TelemRing>,
    /// The buffer mapped at `LIST_IOVA`, once a list command needed one.
    list: Option<SharedMemory>,
}

impl<D: Device> Nic<D> {
    /// Check the PCI identity, then find every register block this driver needs.
    pub fn open(mut dev: D) -> Result<Nic<D>, NicError> {
        let name = dev.describe();
        let mut id = [0u8; 4];
        dev.region_read(REGION_CONFIG, 0, &mut id)
            .map_err(|source| NicError::Device {
                device: name.clone(),
                source,
            })?;
        let vendor = u16::from_le_bytes([id[0], id[1]]);
        let device = u16::from_le_bytes([id[2], id[3]]);
        if (vendor, device) != (PCI_VENDOR_ID, PCI_DEVICE_ID) {
            return Err(NicError::NotFlowshard {
                device: name,
                vendor,
                dev: device,
            });
        }
        let blocks = enumerate(&mut dev, &name)?;
        Ok(Nic {
            dev,
            name,
            blocks,
            cmd: None,
            telem: None,
            list: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The transport, for traffic injection by in-process tests.
    pub fn device(&self) -> &D {
        &self.dev
    }

    fn err(&self, source: DeviceError) -> NicError {
        NicError::Device {
            device: self.name.clone(),
            source,
        }
    }

    /// Allocate `len` bytes of host memory (`what` names it in an error) and map it
    /// for the device at `iova`.
    fn map_new(&mut self, iova: u64, len: usize, what: &str) -> Result<SharedMemory, NicError> {
        let mem = SharedMemory::new(len).map_err(|source| {
            self.err(DeviceError::Io {
                op: format!("allocate {what}"),
                source,
            })
        })?;
        self.dev.dma_map(iova, &mem).map_err(|e| self.err(e))?;
        Ok(mem)
    }

    /// Take `mem`, mapped at `iova`, away from the device.
    fn unmap(&mut self, iova: u64, mem: &SharedMemory) -> Result<(), NicError> {
        self.dev
            .dma_unmap(iova, mem.len() as u64)
            .map_err(|e| self.err(e))
    }

    fn rd(&mut self, block: u32, reg: u32) -> Result<u32, NicError> {
        self.dev.read32(block + reg).map_err(|e| self.err(e))
    }

    fn wr(&mut self, block: u32, reg: u32, v: u32) -> Result<(), NicError> {
        self.dev.write32(block + reg, v).map_err(|e| self.err(e))
    }

    fn protocol(&self, what: impl Into<String>) -> NicError {
        NicError::Protocol {
            device: self.name.clone(),
            what: what.into(),
        }
    }

    /// One register round trip: write the scratch register and read it back.
    pub fn round_trip(&mut self, v: u32) -> Result<(), NicError> {
        let b = self.blocks.ident;
        self.wr(b, ident::SCRATCH, v)?;
        let back = self.rd(b, ident::SCRATCH)?;
        if back != v {
            return Err(self.protocol(format!(
                "scratch register read back {back:#x}, wrote {v:#x}"
            )));
        }
        Ok(())
    }

    pub fn status(&mut self) -> Result<NicStatus, NicError> {
        let b = self.blocks;
        let boot = self.rd(b.ident, ident::BOOT)?;
        let lo = self.rd(b.ident, ident::TIME_LO)?;
        let hi = self.rd(b.ident, ident::TIME_HI)?;
        let slots = self.rd(b.flash, flash::SLOTS)?;
        let cmd_log2 = self.rd(b.cmd, cmd::SIZE)?;
        let telem_log2 = self.rd(b.telem, telem::SIZE)?;
        let entries = |log2: u32| if log2 == 0 { 0 } else { 1 << log2 };
        let mut wide = |lo: u32, hi: u32| -> Result<u64, NicError> {
            let low = self.rd(b.ident, lo)?;
            Ok((u64::from(self.rd(b.ident, hi)?) << 32) | u64::from(low))
        };
        let packets = wide(ident::PACKETS_LO, ident::PACKETS_HI)?;
        let forwarded = wide(ident::FORWARDED_LO, ident::FORWARDED_HI)?;
        let flows_created = wide(ident::FLOWS_LO, ident::FLOWS_HI)?;
        Ok(NicStatus {
            device: self.name.clone(),
            pci_id: format!("{PCI_VENDOR_ID:04x}:{PCI_DEVICE_ID:04x}"),
            running: ident::boot::RUNNING.get(boot) == 1,
            image_version: self.rd(b.ident, ident::FW_VERSION)?,
            slot: slot_name(ident::boot::SLOT.get(boot)),
            fell_back: ident::boot::FELL_BACK.get(boot) == 1,
            resets: ident::boot::RESETS.get(boot),
            nic_time_ns: (u64::from(hi) << 32) | u64::from(lo),
            flow_capacity: self.rd(b.ident, ident::FLOW_CAPACITY)?,
            flows_active: self.rd(b.ident, ident::FLOWS_ACTIVE)?,
            buckets: self.rd(b.ident, ident::BUCKETS)?,
            shards: self.rd(b.ident, ident::SHARDS)?,
            nodes: self.rd(b.ident, ident::NODES)?,
            packets,
            forwarded,
            flows_created,
            slot_a: SlotStatus {
                valid: flash::slots::A_VALID.get(slots) == 1,
                version: self.rd(b.flash, flash::A_VERSION)?,
            },
            slot_b: SlotStatus {
                valid: flash::slots::B_VALID.get(slots) == 1,
                version: self.rd(b.flash, flash::B_VERSION)?,
            },
            pending: (flash::slots::PENDING.get(slots) == 1)
                .then(|| slot_name(flash::slots::NEXT.get(slots))),
            signature_required: flash::slots::SIG_REQUIRED.get(slots) == 1,
            command_ring: RingStatus {
                entries: entries(cmd_log2),
                head: self.rd(b.cmd, cmd::HEAD)?,
                tail: self.rd(b.cmd, cmd::TAIL)?,
                epoch_or_overflow: self.rd(b.cmd, cmd::EPOCH)?,
                errors: self.rd(b.cmd, cmd::ERRORS)?,
            },
            telemetry_ring: RingStatus {
                entries: entries(telem_log2),
                head: self.rd(b.telem, telem::HEAD)?,
                tail: self.rd(b.telem, telem::TAIL)?,
                epoch_or_overflow: self.rd(b.telem, telem::OVERFLOW)?,
                errors: 0,
            },
        })
    }

    /// Reset the device: it boots the committed slot, or the running one again. Rings
    /// must be set up again afterwards.
    pub fn reset(&mut self) -> Result<(), NicError> {
        self.wr(
            self.blocks.ident,
            ident::CONTROL,
            ident::control::RESET.set(0, 1),
        )?;
        if let Some(ring) = self.cmd.take() {
            self.unmap(CMD_IOVA, &ring.mem)?;
        }
        if let Some(ring) = self.telem.take() {
            self.unmap(TELEM_IOVA, &ring.mem)?;
        }
        Ok(())
    }

    /// Write `image` into the inactive slot in chunks of `chunk` bytes, have the device
    /// verify it, and reset into it. `progress(written, total)` after every chunk;
    /// returning false abandons the flash there (the device keeps its active image).
    pub fn flash(
        &mut self,
        image: &[u8],
        chunk: usize,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<FlashReport, NicError> {
        let previous_version = self.rd(self.blocks.ident, ident::FW_VERSION)?;
        let chunk = chunk.clamp(4, 1 << 20);
        let mem = self.map_new(FLASH_IOVA, chunk, "flash buffer")?;
        let result = self.flash_mapped(image, &mem, chunk, progress);
        let unmapped = self.unmap(FLASH_IOVA, &mem);
        result?;
        unmapped?;
        self.reset()?;
        let boot = self.rd(self.blocks.ident, ident::BOOT)?;
        let running = self.rd(self.blocks.ident, ident::FW_VERSION)?;
        let slot = slot_name(ident::boot::SLOT.get(boot));
        let version = hw_sim::image::verify(image, None).map_or(0, |i| i.image_version);
        if ident::boot::FELL_BACK.get(boot) == 1 {
            return Err(NicError::BootFailed {
                device: self.name.clone(),
                version,
                slot,
                running,
            });
        }
        Ok(FlashReport {
            bytes: image.len(),
            slot,
            image_version: running,
            previous_version,
        })
    }

    fn flash_mapped(
        &mut self,
        image: &[u8],
        mem: &SharedMemory,
        chunk: usize,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(), NicError> {
        let f = self.blocks.flash;
        let total = u32::try_from(image.len()).map_err(|_| NicError::Rejected {
            device: self.name.clone(),
            error: ImageError::TooLarge { len: u32::MAX },
        })?;
        self.wr(f, flash::SRC_LO, FLASH_IOVA as u32)?;
        self.wr(f, flash::SRC_HI, (FLASH_IOVA >> 32) as u32)?;
        self.wr(f, flash::LEN, total)?;
        self.flash_op(flash_op::BEGIN)?;
        let mut written = 0;
        for piece in image.chunks(chunk) {
            if !mem.mapping().write(0, piece) {
                return Err(self.protocol("flash chunk larger than its buffer"));
            }
            self.wr(f, flash::OFFSET, written as u32)?;
            self.wr(f, flash::LEN, piece.len() as u32)?;
            self.flash_op(flash_op::WRITE)?;
            written += piece.len();
            if !progress(written, image.len()) {
                return Err(NicError::Interrupted {
                    device: self.name.clone(),
                    written,
                    total: image.len(),
                });
            }
        }
        self.flash_op(flash_op::COMMIT)?;
        let state = flash::status::STATE.get(self.rd(f, flash::STATUS)?);
        if state != flash_state::COMMITTED {
            return Err(self.protocol(format!("flash ended in state {state}, not committed")));
        }
        Ok(())
    }

    fn flash_op(&mut self, op: u32) -> Result<(), NicError> {
        let f = self.blocks.flash;
        self.wr(f, flash::CMD, flash::cmd::OP.set(0, op))?;
        let status = self.rd(f, flash::STATUS)?;
        let code = flash::status::ERROR.get(status) as u8;
        if code == 0 {
            return Ok(());
        }
        let detail = self.rd(f, flash::DETAIL)?;
        match ImageError::from_code(code, detail) {
            Some(error) => Err(NicError::Rejected {
                device: self.name.clone(),
                error,
            }),
            None => Err(self.protocol(format!(
                "flash error code {code} (detail {detail:#x}) unknown to this driver"
            ))),
        }
    }

    /// Set up the command ring with 2^`log2` entries and its completion interrupt.
    pub fn setup_commands(&mut self, log2: u32) -> Result<(), NicError> {
        if !(1..=MAX_CMD_RING_LOG2).contains(&log2) {
            return Err(self.protocol(format!(
                "command ring size 2^{log2} outside 2^1..2^{MAX_CMD_RING_LOG2}"
            )));
        }
        if let Some(old) = self.cmd.take() {
            self.unmap(CMD_IOVA, &old.mem)?;
        }
        let entries = 1u32 << log2;
        let irq = EventFd::new().map_err(|source| {
            self.err(DeviceError::Io {
                op: "eventfd".into(),
                source,
            })
        })?;
        let len = entries as usize * (CMD_DESC_LEN + COMPLETION_LEN);
        let mem = self.map_new(CMD_IOVA, len, "command ring")?;
        self.dev.set_irq(IRQ_CMD, &irq).map_err(|e| self.err(e))?;
        let c = self.blocks.cmd;
        let cq = CMD_IOVA + u64::from(entries) * CMD_DESC_LEN as u64;
        self.wr(c, cmd::RING_LO, CMD_IOVA as u32)?;
        self.wr(c, cmd::RING_HI, (CMD_IOVA >> 32) as u32)?;
        self.wr(c, cmd::CQ_LO, cq as u32)?;
        self.wr(c, cmd::CQ_HI, (cq >> 32) as u32)?;
        self.wr(c, cmd::SIZE, cmd::size::LOG2.set(0, log2))?;
        self.cmd = Some(CmdRing {
            mem,
            entries,
            tail: 0,
            irq,
        });
        Ok(())
    }

    /// Send one batch (at most the ring's size) and wait for its completions: the
    /// device applies all of it in one epoch, or none of it. Returns each descriptor's
    /// status in order.
    pub fn submit(&mut self, batch: &[CmdDesc]) -> Result<Vec<Status>, NicError> {
        let ring = self
            .cmd
            .as_ref()
            .ok_or_else(|| self.protocol("command ring not set up"))?;
        let entries = ring.entries;
        if batch.is_empty() || batch.len() > entries as usize {
            return Err(self.protocol(format!(
                "a batch holds 1 to {entries} descriptors, got {}",
                batch.len()
            )));
        }
        let start = ring.tail;
        for (i, d) in batch.iter().enumerate() {
            let mut d = *d;
            d.flags.set(d.flags.get() & !hdl_bindings::ring::CMD_COMMIT);
            if i + 1 == batch.len() {
                d = d.commit();
            }
            let idx = (start.wrapping_add(i as u32) & (entries - 1)) as usize;
            if !ring.mem.mapping().write(idx * CMD_DESC_LEN, d.as_bytes()) {
                return Err(self.protocol("descriptor outside the command ring"));
            }
        }
        let tail = start.wrapping_add(batch.len() as u32);
        self.wr(self.blocks.cmd, cmd::TAIL, tail)?;
        self.wait_head(tail)?;
        let name = self.name.clone();
        let bad = |what: String| NicError::Protocol {
            device: name.clone(),
            what,
        };
        let ring = self
            .cmd
            .as_mut()
            .ok_or_else(|| bad("command ring vanished".into()))?;
        ring.tail = tail;
        let cq_base = entries as usize * CMD_DESC_LEN;
        let mut out = Vec::with_capacity(batch.len());
        for i in 0..batch.len() as u32 {
            let index = start.wrapping_add(i);
            let mut c = Completion::default();
            let at = cq_base + (index & (entries - 1)) as usize * COMPLETION_LEN;
            if !ring.mem.mapping().read(at, c.as_mut_bytes()) || c.index.get() != index {
                return Err(bad(format!(
                    "completion for descriptor {index} carries index {}",
                    c.index.get()
                )));
            }
            let s = c.status.get();
            out.push(
                Status::from_u16(s).ok_or_else(|| bad(format!("unknown completion status {s}")))?,
            );
        }
        Ok(out)
    }

    /// Wait until the device's HEAD reaches `tail`, sleeping on the completion interrupt.
    fn wait_head(&mut self, tail: u32) -> Result<(), NicError> {
        loop {
            let head = self.rd(self.blocks.cmd, cmd::HEAD)?;
            if head == tail {
                return Ok(());
            }
            let ring = self
                .cmd
                .as_ref()
                .ok_or_else(|| self.protocol("command ring not set up"))?;
            let woke = ring.irq.wait(TIMEOUT_MS).map_err(|source| {
                self.err(DeviceError::Io {
                    op: "wait for command completion".into(),
                    source,
                })
            })?;
            if woke == 0 {
                return Err(self.protocol(format!(
                    "command ring stalled: head {head}, tail {tail} after {TIMEOUT_MS} ms"
                )));
            }
        }
    }

    /// Hand established flows off to new nodes: each flow moves to its node at its next
    /// flowlet boundary (the node then must be active, or the move is dropped). Call it
    /// after the flow's state has reached the new node; `NO_FLOW_NODE` as the node
    /// cancels a pending handoff. One batch, one epoch: an undefined node or a
    /// malformed tuple refuses all of it. Returns what happened to each flow (a flow
    /// that has ended is [`FlowResult::NoSuchFlow`], not an error). Needs the command
    /// ring.
    pub fn hand_off_flows(
        &mut self,
        flows: &[(FlowTuple, u16)],
    ) -> Result<Vec<FlowResult>, NicError> {
        self.flow_list(Opcode::HandOffFlows, "flow handoff", flows)
    }

    /// Move flows to nodes now and keep them there through flowlet sharding;
    /// `NO_FLOW_NODE` as the node unpins. A node that is not active when the batch
    /// applies leaves its flow where it is ([`FlowResult::NodeNotActive`]).
    pub fn pin_flows(&mut self, flows: &[(FlowTuple, u16)]) -> Result<Vec<FlowResult>, NicError> {
        self.flow_list(Opcode::PinFlows, "flow pin", flows)
    }

    /// Push the profiler's classes down to live flows: per-class counters and class
    /// policies follow from each flow's next flowlet.
    pub fn push_flow_classes(
        &mut self,
        flows: &[(FlowTuple, Class)],
    ) -> Result<Vec<FlowResult>, NicError> {
        let list: Vec<(FlowTuple, u16)> = flows.iter().map(|(t, c)| (*t, *c as u16)).collect();
        self.flow_list(Opcode::SetFlowClasses, "class push", &list)
    }

    /// Load the classifier tables the NIC classifies new flows with at their N-th
    /// packet, or with `None` remove them. Their N must be the image's
    /// `feature_packets`.
    pub fn load_classifier(&mut self, tables: Option<&ClassifierTables>) -> Result<(), NicError> {
        let bytes = tables.map(ClassifierTables::to_bytes).unwrap_or_default();
        if bytes.len() > MAX_CLASSIFIER_LEN as usize {
            return Err(self.protocol(format!(
                "classifier tables of {} bytes; the command ring takes at most {MAX_CLASSIFIER_LEN}",
                bytes.len()
            )));
        }
        let iova = if bytes.is_empty() {
            0
        } else {
            let buf = self.list_buffer(bytes.len())?;
            if !buf.mapping().write(0, &bytes) {
                return Err(self.protocol("classifier tables larger than their buffer"));
            }
            LIST_IOVA
        };
        let desc = CmdDesc::list(Opcode::LoadClassifier, bytes.len() as u32, iova);
        match self.submit(&[desc])?[0] {
            Status::Ok => Ok(()),
            status => Err(NicError::Refused {
                device: self.name.clone(),
                what: "classifier load",
                status,
            }),
        }
    }

    /// The list buffer, mapped and at least `len` bytes long.
    fn list_buffer(&mut self, len: usize) -> Result<&SharedMemory, NicError> {
        if self.list.as_ref().is_none_or(|m| m.len() < len) {
            if let Some(old) = self.list.take() {
                self.unmap(LIST_IOVA, &old)?;
            }
            let mem = self.map_new(
                LIST_IOVA,
                len.next_power_of_two().max(1 << 16),
                "list buffer",
            )?;
            self.list = Some(mem);
        }
        self.list
            .as_ref()
            .ok_or_else(|| self.protocol("list buffer vanished"))
    }

    /// Send `flows` as list descriptors of `op` in one batch and read back each
    /// entry's result.
    fn flow_list(
        &mut self,
        op: Opcode,
        what: &'static str,
        flows: &[(FlowTuple, u16)],
    ) -> Result<Vec<FlowResult>, NicError> {
        if flows.is_empty() {
            return Ok(Vec::new());
        }
        let len = flows.len() * FLOW_LIST_ENTRY_LEN;
        let buf = self.list_buffer(len)?;
        let mut bytes = vec![0u8; len];
        for (chunk, (t, v)) in bytes.chunks_exact_mut(FLOW_LIST_ENTRY_LEN).zip(flows) {
            chunk.copy_from_slice(flow_list_entry(t, *v).as_bytes());
        }
        if !buf.mapping().write(0, &bytes) {
            return Err(self.protocol("flow list larger than its buffer"));
        }
        let per = MAX_LIST_ENTRIES as usize;
        let batch: Vec<CmdDesc> = (0..flows.len())
            .step_by(per)
            .map(|first| {
                let n = per.min(flows.len() - first);
                CmdDesc::list(
                    op,
                    n as u32,
                    LIST_IOVA + (first * FLOW_LIST_ENTRY_LEN) as u64,
                )
            })
            .collect();
        let statuses = self.submit(&batch)?;
        if let Some(status) = statuses.iter().find(|s| **s != Status::Ok) {
            return Err(NicError::Refused {
                device: self.name.clone(),
                what,
                status: *status,
            });
        }
        let buf = self.list_buffer(len)?;
        if !buf.mapping().read(0, &mut bytes) {
            return Err(self.protocol("flow list larger than its buffer"));
        }
        bytes
            .chunks_exact(FLOW_LIST_ENTRY_LEN)
            .enumerate()
            .map(|(i, e)| match FlowResult::from_u8(e[40]) {
                Some(FlowResult::NotApplied) | None => Err(self.protocol(format!(
                    "{what}: entry {i} of an applied list has result {}",
                    e[40]
                ))),
                Some(r) => Ok(r),
            })
            .collect()
    }

    /// Read the steering tables back in one command batch, so they are one consistent
    /// snapshot. Needs the command ring.
    pub fn read_tables(&mut self) -> Result<Tables, NicError> {
        let b = self.blocks.ident;
        let buckets = self.rd(b, ident::BUCKETS)? as usize;
        let shards = self.rd(b, ident::SHARDS)? as usize;
        let nodes = self.rd(b, ident::NODES)? as usize;
        let lens = [2 * buckets, 2 * shards, NODE_ENTRY_LEN * nodes];
        let total = lens.iter().fold(0usize, |a, l| a.saturating_add(*l));
        if buckets == 0 || shards == 0 || nodes == 0 || total > MAX_TABLE_BYTES {
            return Err(self.protocol(format!(
                "device reports {buckets} buckets, {shards} shards, {nodes} node ids: no image running, or tables beyond {MAX_TABLE_BYTES} bytes"
            )));
        }
        let mem = self.map_new(TABLES_IOVA, total, "table buffer")?;
        let at = [0, lens[0], lens[0] + lens[1]].map(|o| TABLES_IOVA + o as u64);
        let batch = [
            CmdDesc::read_table(Table::BucketShard, at[0]),
            CmdDesc::read_table(Table::ShardNode, at[1]),
            CmdDesc::read_table(Table::Nodes, at[2]),
        ];
        let result = self.submit(&batch);
        let unmapped = self.unmap(TABLES_IOVA, &mem);
        let statuses = result?;
        unmapped?;
        if let Some(s) = statuses.iter().find(|s| **s != Status::Ok) {
            return Err(self.protocol(format!("table read refused: {}", s.as_str())));
        }
        let mut bytes = vec![0u8; total];
        if !mem.mapping().read(0, &mut bytes) {
            return Err(self.protocol("table buffer shorter than the tables"));
        }
        let (bucket_bytes, rest) = bytes.split_at(lens[0]);
        let (shard_bytes, node_bytes) = rest.split_at(lens[1]);
        let u16s = |b: &[u8]| -> Vec<u16> {
            b.chunks_exact(2)
                .map(|w| u16::from_le_bytes([w[0], w[1]]))
                .collect()
        };
        let mut node_list = Vec::new();
        for (id, e) in node_bytes.chunks_exact(NODE_ENTRY_LEN).enumerate() {
            let state = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let weight = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            if state == NO_NODE {
                continue;
            }
            let state = hw_sim::image::node_state_from_code(state)
                .ok_or_else(|| self.protocol(format!("node {id} has unknown state {state}")))?;
            node_list.push(nic_firmware::config::NodeConfig {
                id: id as u16,
                weight,
                state,
            });
        }
        Ok(Tables {
            bucket_shard: u16s(bucket_bytes),
            shard_node: u16s(shard_bytes),
            nodes: node_list,
        })
    }

    /// Set up the telemetry ring with 2^`log2` entries and counter snapshots every
    /// `snapshot_us` of NIC time (0: none).
    pub fn setup_telemetry(
        &mut self,
        log2: u32,
        snapshot_us: u32,
        irq: &EventFd,
    ) -> Result<(), NicError> {
        if !(1..=MAX_TELEMETRY_RING_LOG2).contains(&log2) {
            return Err(self.protocol(format!(
                "telemetry ring size 2^{log2} outside 2^1..2^{MAX_TELEMETRY_RING_LOG2}"
            )));
        }
        if let Some(old) = self.telem.take() {
            self.unmap(TELEM_IOVA, &old.mem)?;
        }
        let entries = 1u32 << log2;
        let mem = self.map_new(
            TELEM_IOVA,
            entries as usize * TELEMETRY_ENTRY_LEN,
            "telemetry ring",
        )?;
        self.dev
            .set_irq(IRQ_TELEMETRY, irq)
            .map_err(|e| self.err(e))?;
        let t = self.blocks.telem;
        self.wr(t, telem::RING_LO, TELEM_IOVA as u32)?;
        self.wr(t, telem::RING_HI, (TELEM_IOVA >> 32) as u32)?;
        self.wr(t, telem::SNAPSHOT_US, snapshot_us)?;
        self.wr(t, telem::SIZE, telem::size::LOG2.set(0, log2))?;
        self.telem = Some(TelemRing {
            mem,
            entries,
            tail: 0,
        });
        Ok(())
    }

    /// Take every entry the device has written, and hand the space back.
    pub fn poll_telemetry(&mut self) -> Result<Telemetry, NicError> {
        let head = self.rd(self.blocks.telem, telem::HEAD)?;
        let name = self.name.clone();
        let ring = self.telem.as_mut().ok_or_else(|| NicError::Protocol {
            device: name,
            what: "telemetry ring not set up".into(),
        })?;
        let mut out = Telemetry::default();
        let mut entry = [0u8; TELEMETRY_ENTRY_LEN];
        let n = head.wrapping_sub(ring.tail).min(ring.entries);
        for i in 0..n {
            let idx = (ring.tail.wrapping_add(i) & (ring.entries - 1)) as usize;
            let read = ring
                .mem
                .mapping()
                .read(idx * TELEMETRY_ENTRY_LEN, &mut entry);
            match decode_entry(&entry).filter(|_| read) {
                Some((_, item)) => out.items.push(item),
                None => out.unreadable += 1,
            }
        }
        ring.tail = head;
        self.wr(self.blocks.telem, telem::TAIL, head)?;
        Ok(out)
    }
}

/// Walk BAR0's block list from offset 0 with bounds, alignment and loop checks, and
/// find each block this driver needs by type, refusing an unknown major version.
fn enumerate(dev: &mut dyn Device, name: &str) -> Result<Blocks, NicError> {
    let fail = |why: String| NicError::BlockList {
        device: name.into(),
        why,
    };
    let io = |source| NicError::Device {
        device: name.into(),
        source,
    };
    let mut found: Vec<(u32, u32, u32)> = Vec::new();
    let mut seen = HashSet::new();
    let mut at = 0u32;
    loop {
        if !at.is_multiple_of(4) || at.checked_add(12).is_none_or(|end| end > BAR0_SIZE) {
            return Err(fail(format!(
                "block at {at:#x} is misaligned or outside BAR0 ({BAR0_SIZE:#x} bytes)"
            )));
        }
        if !seen.insert(at) || seen.len() > MAX_BLOCKS {
            return Err(fail(format!("the list loops back to {at:#x}")));
        }
        let ty = dev.read32(at).map_err(io)?;
        let version = dev.read32(at + 4).map_err(io)?;
        let next = dev.read32(at + 8).map_err(io)?;
        found.push((ty, version, at));
        if next == 0 {
            break;
        }
        at = next;
    }
    let pick = |name_: &'static str, ty: u32, supported: u16| -> Result<u32, NicError> {
        let &(_, version, base) =
            found
                .iter()
                .find(|b| b.0 == ty)
                .ok_or(NicError::MissingBlock {
                    device: name.into(),
                    block: name_,
                })?;
        let (major, minor) = ((version >> 16) as u16, version as u16);
        if major != supported {
            return Err(NicError::Incompatible {
                device: name.into(),
                block: name_,
                major,
                minor,
                supported,
            });
        }
        Ok(base)
    };
    let [i, c, t, f] = BLOCKS;
    Ok(Blocks {
        ident: pick(i.0, i.1, i.2)?,
        cmd: pick(c.0, c.1, c.2)?,
        telem: pick(t.0, t.1, t.2)?,
        flash: pick(f.0, f.1, f.2)?,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use hw_sim::device::{DeviceOptions, NicDevice};

    use super::*;
    use crate::device::{InProcess, REGION_BAR0};

    /// BAR0 and configuration space as plain memory, copied from the real device
    /// model and then damaged, to show the driver refuses what a broken or foreign
    /// device could present.
    #[derive(Debug)]
    struct Bar {
        words: Vec<u32>,
        config: [u8; 4],
    }

    impl Bar {
        fn real() -> Bar {
            let dev = Arc::new(Mutex::new(NicDevice::new(DeviceOptions::default())));
            let mut d = InProcess::new(dev);
            let words = (0..BAR0_SIZE / 4)
                .map(|i| d.read32(i * 4).unwrap())
                .collect();
            let mut config = [0; 4];
            d.region_read(REGION_CONFIG, 0, &mut config).unwrap();
            Bar { words, config }
        }

        fn set(mut self, offset: u32, v: u32) -> Bar {
            self.words[offset as usize / 4] = v;
            self
        }
    }

    impl Device for Bar {
        fn describe(&self) -> String {
            "test BAR".into()
        }

        fn region_read(
            &mut self,
            region: u32,
            offset: u64,
            buf: &mut [u8],
        ) -> Result<(), DeviceError> {
            match region {
                REGION_CONFIG => buf.copy_from_slice(&self.config[..buf.len()]),
                REGION_BAR0 => buf.copy_from_slice(&self.words[offset as usize / 4].to_le_bytes()),
                _ => return Err(DeviceError::Refused("no such region".into())),
            }
            Ok(())
        }

        fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), DeviceError> {
            Ok(())
        }

        fn dma_map(&mut self, _: u64, _: &SharedMemory) -> Result<(), DeviceError> {
            Err(DeviceError::Refused("no DMA".into()))
        }

        fn dma_unmap(&mut self, _: u64, _: u64) -> Result<(), DeviceError> {
            Ok(())
        }

        fn set_irq(&mut self, _: u32, _: &EventFd) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    fn open_err(bar: Bar) -> String {
        Nic::open(bar).unwrap_err().to_string()
    }

    #[test]
    fn the_real_layout_opens() {
        Nic::open(Bar::real()).unwrap();
    }

    #[test]
    fn broken_block_lists_are_refused_with_a_reason() {
        let next = |b: u32| b + 8;
        let e = open_err(Bar::real().set(next(cmd::BASE), cmd::BASE));
        assert!(e.contains("loops back to 0x100"), "{e}");
        let e = open_err(Bar::real().set(next(flash::BASE), cmd::BASE));
        assert!(e.contains("loops back to 0x100"), "{e}");
        let e = open_err(Bar::real().set(next(ident::BASE), 0x102));
        assert!(e.contains("misaligned"), "{e}");
        let e = open_err(Bar::real().set(next(ident::BASE), 0x1000));
        assert!(e.contains("outside BAR0"), "{e}");
        let e = open_err(Bar::real().set(next(telem::BASE), 0));
        assert_eq!(e, "test BAR: no flash register block");
    }

    #[test]
    fn an_unknown_major_version_is_refused_and_a_newer_minor_accepted() {
        let e = open_err(Bar::real().set(cmd::BASE + 4, 0x0002_0000));
        assert_eq!(
            e,
            "test BAR: cmd register block has version 2.0; this driver supports major version 1"
        );
        Nic::open(Bar::real().set(cmd::BASE + 4, 0x0001_0007)).unwrap();
    }

    #[test]
    fn a_foreign_pci_function_is_refused() {
        let mut bar = Bar::real();
        bar.config = [0x86, 0x80, 0x3c, 0x15];
        assert!(open_err(bar).contains("not a flowshard NIC (PCI id 8086:153c"));
    }
}
