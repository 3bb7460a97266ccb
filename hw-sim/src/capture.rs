//! Streaming reader for pcap and pcapng capture files.
//!
//! `flowshard replay` and the emulated NIC's traffic sources feed recorded traffic
//! through the data plane, so this reader has to cope with whatever captures people
//! bring: legacy pcap in either byte order with micro- or nanosecond timestamps, and
//! pcapng with several sections and interfaces, each with its own link type and
//! timestamp resolution. The file-format parsing itself is delegated to the
//! `pcap-parser` crate; this module owns the streaming buffer, the per-interface
//! state pcapng needs, byte offsets, and turning every malformed input into a
//! [`CaptureError`] that names the file and the offset instead of panicking.
//!
//! Files are streamed through a bounded buffer rather than read whole, because
//! replay captures can be far larger than the memory an emulator should claim.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use nic_firmware::LinkType;
use nic_firmware::pipeline::Packet;
use pcap_parser::nom::{self, IResult};
use pcap_parser::pcapng::{
    Block, EnhancedPacketBlock, InterfaceDescriptionBlock, OptionCode, SectionHeaderBlock,
    SimplePacketBlock, parse_sectionheaderblock, parse_unknownblock_be, parse_unknownblock_le,
};
use pcap_parser::traits::{PcapNGPacketBlock, PcapReaderIterator};
use pcap_parser::{
    LegacyPcapBlock, PcapBlockOwned, PcapError, PcapHeader, SHB_MAGIC, create_reader,
    parse_pcap_frame, parse_pcap_frame_be, parse_pcap_frame_modified, parse_pcap_header,
};

/// Streaming buffer size for files larger than it. It holds any legacy pcap record
/// that passes the [`MAX_CAPLEN`] check, so only oversized pcapng blocks (long
/// comments, custom blocks) ever make the buffer grow.
const INITIAL_CAPACITY: usize = 512 * 1024;

/// Largest pcapng block the buffer grows to hold. Anything bigger is treated as
/// corruption: a garbage length field must not make the reader allocate gigabytes.
const MAX_BLOCK: usize = 64 * 1024 * 1024;

/// Extra room when growing the buffer for a large block, so the block's trailer
/// and the next block's header fit without another grow.
const GROW_HEADROOM: usize = 64 * 1024;

/// Largest captured length accepted for a packet: libpcap's maximum snapshot
/// length. Larger values only come from corrupt or hostile files.
const MAX_CAPLEN: u32 = 256 * 1024;

/// pcapng's default timestamp resolution (microseconds) when an interface has no
/// `if_tsresol` option.
const DEFAULT_UNITS_PER_SEC: u64 = 1_000_000;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Map a pcap/pcapng `LINKTYPE_*` number to the link layers the data plane parses.
///
/// 12 and 14 are not official LINKTYPE values but are what some platforms wrote for
/// `DLT_RAW`, so captures from those platforms still replay as raw IP.
pub fn link_type(linktype: u32) -> LinkType {
    match linktype {
        1 => LinkType::Ethernet,
        101 | 12 | 14 | 228 | 229 => LinkType::RawIp,
        113 => LinkType::LinuxSll,
        276 => LinkType::LinuxSll2,
        0 => LinkType::Null,
        108 => LinkType::Loop,
        other => LinkType::Unsupported(other),
    }
}

/// The `LINKTYPE_*` number a capture of `link` is written with (inverse of [`link_type`]).
pub fn linktype_number(link: LinkType) -> u32 {
    match link {
        LinkType::Ethernet => 1,
        LinkType::RawIp => 101,
        LinkType::LinuxSll => 113,
        LinkType::LinuxSll2 => 276,
        LinkType::Null => 0,
        LinkType::Loop => 108,
        LinkType::Unsupported(n) => n,
    }
}

/// Writes a legacy pcap file with nanosecond timestamps (magic `a1b23c4d`), the format
/// every capture tool reads; the emulated NIC's per-node outputs use it.
#[derive(Debug)]
pub struct PcapWriter<W: std::io::Write> {
    out: W,
}

impl<W: std::io::Write> PcapWriter<W> {
    /// Start a capture of link type `link`, snapshot length 262144.
    pub fn new(mut out: W, link: LinkType) -> std::io::Result<PcapWriter<W>> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&0xa1b2_3c4du32.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&[0; 8]);
        h.extend_from_slice(&262_144u32.to_le_bytes());
        h.extend_from_slice(&linktype_number(link).to_le_bytes());
        out.write_all(&h)?;
        Ok(PcapWriter { out })
    }

    pub fn write(&mut self, ts_ns: u64, data: &[u8], wire_len: u32) -> std::io::Result<()> {
        let mut r = [0u8; 16];
        r[0..4].copy_from_slice(&((ts_ns / NANOS_PER_SEC) as u32).to_le_bytes());
        r[4..8].copy_from_slice(&((ts_ns % NANOS_PER_SEC) as u32).to_le_bytes());
        r[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        r[12..16].copy_from_slice(&wire_len.max(data.len() as u32).to_le_bytes());
        self.out.write_all(&r)?;
        self.out.write_all(data)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Captured packets gathered for one call of the data plane's burst API: copied out of
/// the reader's buffer (which the next read reuses), all of one link type.
#[derive(Debug)]
pub struct Burst {
    data: Vec<u8>,
    /// Per packet: timestamp, offset and length in `data`, wire length.
    meta: Vec<(u64, usize, usize, u32)>,
    link: LinkType,
}

impl Default for Burst {
    fn default() -> Burst {
        Burst {
            data: Vec::with_capacity(Burst::LEN * 2048),
            meta: Vec::with_capacity(Burst::LEN),
            link: LinkType::Ethernet,
        }
    }
}

impl Burst {
    /// Packets per burst.
    pub const LEN: usize = 32;

    /// Whether a packet of `link` has to wait until this burst is processed: the
    /// burst is full, or holds packets of another link type.
    pub fn is_full_for(&self, link: LinkType) -> bool {
        !self.meta.is_empty() && (link != self.link || self.meta.len() == Burst::LEN)
    }

    /// Copy `p` in, stamped `ts_ns` (a replay may shift capture time); a wire length
    /// shorter than the captured bytes is raised to them.
    pub fn push(&mut self, p: &CapturedPacket<'_>, ts_ns: u64) {
        if self.meta.is_empty() {
            self.link = p.link;
        }
        let at = self.data.len();
        self.data.extend_from_slice(p.data);
        let len = p.data.len();
        self.meta.push((ts_ns, at, len, p.wire_len.max(len as u32)));
    }

    pub fn link(&self) -> LinkType {
        self.link
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// The packets, as the pipeline takes them.
    pub fn packets(&self) -> Vec<Packet<'_>> {
        self.meta
            .iter()
            .map(|&(ts_ns, at, len, wire_len)| Packet {
                ts_ns,
                data: &self.data[at..at + len],
                wire_len,
            })
            .collect()
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.meta.clear();
    }
}

/// One packet from a capture file, borrowing its bytes from the reader's buffer
/// (so replay does not copy every packet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapturedPacket<'a> {
    /// Capture timestamp in nanoseconds since the Unix epoch. pcapng Simple Packet
    /// Blocks carry no timestamp; they repeat the previous packet's (0 if none) so
    /// replay pacing never jumps backwards.
    pub ts_ns: u64,
    /// Link layer of the interface the packet was captured on.
    pub link: LinkType,
    /// Captured bytes (possibly fewer than `wire_len` when the capture used a snaplen).
    pub data: &'a [u8],
    /// Original length of the packet on the wire.
    pub wire_len: u32,
    /// Byte offset of this packet's record or block in the file, for error reports
    /// and for locating the packet with other tools.
    pub offset: u64,
}

/// Which container format a capture file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CaptureFormat {
    /// Legacy libpcap format.
    Pcap,
    /// pcapng.
    PcapNg,
}

/// Why a capture file could not be read. Every variant names the file, and the
/// in-file ones the byte offset, so a user can inspect the damage with a hex dump.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The file could not be opened.
    #[error("{path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The file does not start like a pcap or pcapng file.
    #[error("{path}: not a pcap or pcapng file ({detail})")]
    NotACapture { path: String, detail: String },
    /// The file ends in the middle of a header, record or block.
    #[error("{path}: truncated at byte offset {offset}: {detail}")]
    Truncated {
        path: String,
        offset: u64,
        detail: String,
    },
    /// A header, record or block is malformed or implausible.
    #[error("{path}: corrupt at byte offset {offset}: {detail}")]
    Corrupt {
        path: String,
        offset: u64,
        detail: String,
    },
    /// Reading the file failed.
    #[error("{path}: read error at byte offset {offset}: {source}")]
    Io {
        path: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// Reads packets one at a time from a pcap or pcapng file.
pub struct CaptureReader {
    path: PathBuf,
    format: CaptureFormat,
    inner: Box<dyn PcapReaderIterator + Send>,
    /// The I/O error behind the parser's opaque `ReadError`, if any.
    read_error: SharedError,
    state: State,
    /// Current size of the parser's buffer (the trait cannot report it).
    capacity: usize,
    /// File offset of the first unconsumed byte in the parser's buffer.
    offset: u64,
    /// Size of the block behind the packet returned last. It is consumed on the
    /// next call, because the returned packet borrows it from the buffer.
    pending: usize,
    finished: bool,
}

impl fmt::Debug for CaptureReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaptureReader")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("offset", &self.offset)
            .field("capacity", &self.capacity)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl CaptureReader {
    /// Open a capture file and check its file header, so that a file that is not a
    /// capture at all is reported here rather than at the first packet.
    pub fn open(path: &Path) -> Result<CaptureReader, CaptureError> {
        let display = path.display().to_string();
        let mut file = File::open(path).map_err(|source| CaptureError::Open {
            path: display.clone(),
            source,
        })?;
        // The header is examined with the parser's own functions before the streaming
        // reader takes over, because `create_reader` collapses every failure into
        // "not recognized" and cannot tell a truncated file from a foreign one.
        let mut prefix = Vec::new();
        if let Err(source) = (&mut file)
            .take(INITIAL_CAPACITY as u64)
            .read_to_end(&mut prefix)
        {
            return Err(CaptureError::Io {
                path: display,
                offset: prefix.len() as u64,
                source,
            });
        }
        let at_eof = prefix.len() < INITIAL_CAPACITY;
        // A file that fits in the prefix gets a buffer sized to it: replaying many
        // small captures should not cost a full-size buffer each.
        let capacity = if at_eof {
            (prefix.len() + 1).next_power_of_two().max(4096)
        } else {
            INITIAL_CAPACITY
        };
        let state = classify(&prefix, at_eof).map_err(|fault| fault.at(&display, 0))?;
        let format = match state {
            State::Pcap(_) => CaptureFormat::Pcap,
            State::PcapNg(_) => CaptureFormat::PcapNg,
        };
        let read_error = SharedError::default();
        let source = Source {
            prefix,
            prefix_pos: 0,
            file,
            error: read_error.clone(),
        };
        let inner = create_reader(capacity, source).map_err(|e| match e {
            PcapError::ReadError => read_error.take_or_other(&display, 0),
            other => Fault::Corrupt(format!("capture header rejected: {other}")).at(&display, 0),
        })?;
        Ok(CaptureReader {
            path: path.to_path_buf(),
            format,
            inner,
            read_error,
            state,
            capacity,
            offset: 0,
            pending: 0,
            finished: false,
        })
    }

    /// Next packet, `Ok(None)` at a clean end of file.
    ///
    /// After an `Err` the reader is finished and further calls return `Ok(None)`.
    /// Packets before the damage are returned normally first: a truncated file
    /// yields every complete packet and then a [`CaptureError::Truncated`] naming the
    /// offset where the incomplete record starts.
    pub fn next_packet(&mut self) -> Result<Option<CapturedPacket<'_>>, CaptureError> {
        if self.finished {
            return Ok(None);
        }
        if self.pending > 0 {
            self.inner.consume(self.pending);
            self.offset += self.pending as u64;
            self.pending = 0;
        }
        let meta = match self.advance() {
            Ok(Some(meta)) => meta,
            Ok(None) => {
                self.finished = true;
                return Ok(None);
            }
            Err(e) => {
                self.finished = true;
                return Err(e);
            }
        };
        // `advance` leaves the packet's block at the head of the buffer, untouched.
        match meta.range.and_then(|range| self.inner.data().get(range)) {
            Some(data) => Ok(Some(CapturedPacket {
                ts_ns: meta.ts_ns,
                link: meta.link,
                data,
                wire_len: meta.wire_len,
                offset: self.offset,
            })),
            None => {
                self.finished = true;
                Err(Fault::Corrupt("packet data lies outside its block".into())
                    .at(&self.path.display().to_string(), self.offset))
            }
        }
    }

    /// The container format, known from the file header.
    pub fn format(&self) -> CaptureFormat {
        self.format
    }

    /// The path the reader was opened with, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Step through blocks until one holds a packet, leaving that block unconsumed
    /// at the head of the buffer and returning where its packet bytes are.
    fn advance(&mut self) -> Result<Option<PacketMeta>, CaptureError> {
        loop {
            let step = match self.inner.next() {
                Ok((size, block)) => Step::Block(size, self.state.interpret(block)),
                Err(PcapError::Eof) => return Ok(None),
                Err(
                    PcapError::Incomplete(_) | PcapError::BufferTooSmall | PcapError::UnexpectedEof,
                ) => Step::NeedMore,
                Err(PcapError::ReadError) => Step::ReadError,
                Err(other) => Step::Fault(Fault::Corrupt(self.state.malformed(&other))),
            };
            match step {
                Step::Block(size, Ok(Interpreted::Skip)) => {
                    self.inner.consume(size);
                    self.offset += size as u64;
                }
                Step::Block(size, Ok(Interpreted::Packet(found))) => {
                    self.pending = size;
                    let base = self.inner.data().as_ptr() as usize;
                    let range = found
                        .data_addr
                        .checked_sub(base)
                        .map(|start| start..start.saturating_add(found.data_len));
                    return Ok(Some(PacketMeta {
                        ts_ns: found.ts_ns,
                        link: found.link,
                        wire_len: found.wire_len,
                        range,
                    }));
                }
                Step::Block(_, Err(fault)) | Step::Fault(fault) => return Err(self.fail(fault)),
                Step::ReadError => return Err(self.read_failure()),
                Step::NeedMore => {
                    if !self.fetch_more()? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// The parser needs more bytes than the buffer holds. Decide whether the file is
    /// over, truncated, corrupt, or just needs a refill (growing the buffer first if
    /// one block is larger than it). Returns `false` at a clean end of file.
    fn fetch_more(&mut self) -> Result<bool, CaptureError> {
        let data = self.inner.data();
        let exhausted = self.inner.reader_exhausted();
        if data.is_empty() && exhausted {
            return Ok(false);
        }
        let available = data.len();
        let needed = match self.state.probe(data) {
            Probe::Need(total) => total,
            Probe::Complete => {
                return Err(self.fail(Fault::Corrupt(format!(
                    "{} is internally inconsistent (its contents overrun its length)",
                    self.state.unit()
                ))));
            }
            Probe::Invalid(detail) => return Err(self.fail(Fault::Corrupt(detail))),
        };
        if let Err(fault) = self.state.check_pending_size(needed) {
            return Err(self.fail(fault));
        }
        if exhausted {
            return Err(self.fail(Fault::Truncated(format!(
                "the file ends {available} bytes into this {}",
                self.state.unit()
            ))));
        }
        // Grow only once the buffer is full of this one block: a refill first shows
        // whether the file even has the bytes a (possibly garbage) length claims.
        if needed >= self.capacity && available >= self.capacity {
            let target = needed.saturating_add(GROW_HEADROOM);
            if self.inner.grow(target) {
                self.capacity = target;
            }
        }
        match self.inner.refill() {
            Ok(()) => Ok(true),
            Err(_) => Err(self.read_failure()),
        }
    }

    fn fail(&self, fault: Fault) -> CaptureError {
        fault.at(&self.path.display().to_string(), self.offset)
    }

    fn read_failure(&self) -> CaptureError {
        self.read_error
            .take_or_other(&self.path.display().to_string(), self.offset)
    }
}

/// Location and metadata of a packet found by [`CaptureReader::advance`].
struct PacketMeta {
    ts_ns: u64,
    link: LinkType,
    wire_len: u32,
    /// Where the packet bytes are within the parser's buffer (`None` if they
    /// somehow are not, which `next_packet` reports instead of panicking).
    range: Option<Range<usize>>,
}

/// What one call to the parser produced, with borrows of the buffer already dropped.
enum Step {
    Block(usize, Result<Interpreted, Fault>),
    NeedMore,
    ReadError,
    Fault(Fault),
}

/// What a parsed block means for the caller.
enum Interpreted {
    /// Not a packet (file header, section or interface description, statistics...).
    Skip,
    Packet(FoundPacket),
}

/// A packet inside a parsed block. The packet bytes are recorded by address
/// because the block borrows the parser mutably; the address is turned back into
/// a slice of the (unchanged) buffer once that borrow has ended.
struct FoundPacket {
    ts_ns: u64,
    link: LinkType,
    wire_len: u32,
    data_addr: usize,
    data_len: usize,
}

/// A problem found before the file path and offset are attached.
#[derive(Debug)]
enum Fault {
    NotACapture(String),
    Truncated(String),
    Corrupt(String),
}

impl Fault {
    fn at(self, path: &str, offset: u64) -> CaptureError {
        let path = path.to_owned();
        match self {
            Fault::NotACapture(detail) => CaptureError::NotACapture { path, detail },
            Fault::Truncated(detail) => CaptureError::Truncated {
                path,
                offset,
                detail,
            },
            Fault::Corrupt(detail) => CaptureError::Corrupt {
                path,
                offset,
                detail,
            },
        }
    }
}

/// How much of the block at the head of the buffer is present.
enum Probe {
    /// The whole block is there (so an "incomplete" verdict means its insides are bad).
    Complete,
    /// The block needs this many bytes in total.
    Need(usize),
    /// The block's framing is invalid.
    Invalid(String),
}

impl Probe {
    fn from_result<T>(available: usize, result: IResult<&[u8], T, PcapError<&[u8]>>) -> Probe {
        match result {
            Ok(_) => Probe::Complete,
            Err(nom::Err::Incomplete(nom::Needed::Size(n))) => {
                Probe::Need(available.saturating_add(n.get()))
            }
            Err(nom::Err::Incomplete(nom::Needed::Unknown)) => {
                Probe::Need(available.saturating_add(1))
            }
            Err(nom::Err::Error(e) | nom::Err::Failure(e)) => Probe::Invalid(describe(&e)),
        }
    }
}

type FrameParser =
    for<'a> fn(&'a [u8]) -> IResult<&'a [u8], LegacyPcapBlock<'a>, PcapError<&'a [u8]>>;

/// Format-specific decoding state.
enum State {
    Pcap(PcapState),
    PcapNg(PcapNgState),
}

struct PcapState {
    link: LinkType,
    snaplen: u32,
    /// Nanoseconds per unit of the record's fractional-seconds field.
    frac_to_ns: u64,
    /// Size of a record header: 16, or 24 in the "modified" (Kuznetzov) format.
    record_header_len: usize,
    parse_frame: FrameParser,
}

#[derive(Default)]
struct PcapNgState {
    /// Byte order of the current section (for probing blocks the parser rejected).
    big_endian: bool,
    /// Interfaces of the current section, indexed by interface id.
    interfaces: Vec<Interface>,
    /// Timestamp of the last packet, reused for Simple Packet Blocks.
    last_ts_ns: u64,
}

struct Interface {
    link: LinkType,
    snaplen: u32,
    units_per_sec: u64,
    offset_secs: i64,
}

impl Interface {
    /// Convert a raw pcapng timestamp to ns since the epoch, or `None` if it cannot
    /// be represented (before 1970 or after 2554).
    fn ts_ns(&self, raw: u64) -> Option<u64> {
        let ns = u128::from(raw) * u128::from(NANOS_PER_SEC) / u128::from(self.units_per_sec);
        let offset = i128::from(self.offset_secs) * i128::from(NANOS_PER_SEC);
        let total = i128::try_from(ns).ok()?.checked_add(offset)?;
        u64::try_from(total).ok()
    }
}

impl State {
    /// What the records or blocks of this format are called in messages.
    fn unit(&self) -> &'static str {
        match self {
            State::Pcap(_) => "pcap record",
            State::PcapNg(_) => "pcapng block",
        }
    }

    fn malformed(&self, error: &PcapError<&[u8]>) -> String {
        format!("malformed {}: {}", self.unit(), describe(error))
    }

    fn interpret(&mut self, block: PcapBlockOwned<'_>) -> Result<Interpreted, Fault> {
        match (self, block) {
            (State::Pcap(_), PcapBlockOwned::LegacyHeader(_)) => Ok(Interpreted::Skip),
            (State::Pcap(pcap), PcapBlockOwned::Legacy(record)) => pcap.packet(&record),
            (State::PcapNg(ng), PcapBlockOwned::NG(block)) => ng.interpret(block),
            (_, _) => Err(Fault::Corrupt(
                "block does not belong to the file's format".into(),
            )),
        }
    }

    /// See how much of the block at the head of `data` is present, using the
    /// parser's own framing functions.
    fn probe(&self, data: &[u8]) -> Probe {
        match self {
            State::Pcap(pcap) => Probe::from_result(data.len(), (pcap.parse_frame)(data)),
            State::PcapNg(ng) => {
                if data.starts_with(&SHB_MAGIC.to_le_bytes()) {
                    Probe::from_result(data.len(), parse_sectionheaderblock(data))
                } else if ng.big_endian {
                    Probe::from_result(data.len(), parse_unknownblock_be(data))
                } else {
                    Probe::from_result(data.len(), parse_unknownblock_le(data))
                }
            }
        }
    }

    /// Reject a block before buffering it if its declared size is implausible.
    fn check_pending_size(&self, needed: usize) -> Result<(), Fault> {
        match self {
            State::Pcap(pcap) => {
                let caplen = needed.saturating_sub(pcap.record_header_len);
                pcap.check_caplen(u32::try_from(caplen).unwrap_or(u32::MAX))
            }
            State::PcapNg(_) if needed > MAX_BLOCK => Err(Fault::Corrupt(format!(
                "pcapng block claims {needed} bytes, more than the {MAX_BLOCK}-byte limit"
            ))),
            State::PcapNg(_) => Ok(()),
        }
    }
}

impl PcapState {
    fn new(header: &PcapHeader) -> PcapState {
        let parse_frame: FrameParser = if header.is_modified_format() {
            parse_pcap_frame_modified
        } else if header.is_bigendian() {
            parse_pcap_frame_be
        } else {
            parse_pcap_frame
        };
        PcapState {
            // The upper 16 bits of the header's link type field carry FCS-length
            // flags, not the link type (libpcap's LT_LINKTYPE does the same).
            link: link_type(header.network.0 as u32 & 0xffff),
            snaplen: header.snaplen,
            frac_to_ns: if header.is_nanosecond_precision() {
                1
            } else {
                1_000
            },
            record_header_len: if header.is_modified_format() { 24 } else { 16 },
            parse_frame,
        }
    }

    fn check_caplen(&self, caplen: u32) -> Result<(), Fault> {
        check_caplen(caplen, self.snaplen)
    }

    fn packet(&self, record: &LegacyPcapBlock<'_>) -> Result<Interpreted, Fault> {
        self.check_caplen(record.caplen)?;
        // The header's `thiszone` is ignored, as libpcap and Wireshark do: writers
        // always store UTC and leave it zero.
        let ts_ns =
            u64::from(record.ts_sec) * NANOS_PER_SEC + u64::from(record.ts_usec) * self.frac_to_ns;
        Ok(Interpreted::Packet(FoundPacket {
            ts_ns,
            link: self.link,
            wire_len: record.origlen,
            data_addr: record.data.as_ptr() as usize,
            data_len: record.data.len(),
        }))
    }
}

impl PcapNgState {
    fn interpret(&mut self, block: Block<'_>) -> Result<Interpreted, Fault> {
        match block {
            Block::SectionHeader(shb) => {
                self.section(&shb);
                Ok(Interpreted::Skip)
            }
            Block::InterfaceDescription(idb) => {
                let interface = self.interface(&idb)?;
                self.interfaces.push(interface);
                Ok(Interpreted::Skip)
            }
            Block::EnhancedPacket(epb) => self.enhanced(&epb),
            Block::SimplePacket(spb) => self.simple(&spb),
            // Statistics, name resolution, decryption secrets, custom blocks and block
            // types the parser does not know carry nothing the data plane uses.
            _ => Ok(Interpreted::Skip),
        }
    }

    /// A new section starts: interface ids restart from zero and the byte order
    /// may change.
    fn section(&mut self, shb: &SectionHeaderBlock<'_>) {
        self.big_endian = shb.big_endian();
        self.interfaces.clear();
    }

    fn interface(&self, idb: &InterfaceDescriptionBlock<'_>) -> Result<Interface, Fault> {
        let units_per_sec = match idb
            .options
            .iter()
            .find(|opt| opt.code == OptionCode::IfTsresol)
        {
            None => DEFAULT_UNITS_PER_SEC,
            Some(option) => option
                .as_bytes()
                .ok()
                .and_then(|value| value.first().copied())
                .and_then(units_per_sec)
                .ok_or_else(|| {
                    Fault::Corrupt(format!(
                        "interface {} has an unusable if_tsresol option {:02x?}",
                        self.interfaces.len(),
                        option.value()
                    ))
                })?,
        };
        Ok(Interface {
            link: link_type(u32::try_from(idb.linktype.0).unwrap_or(u32::MAX)),
            snaplen: idb.snaplen,
            units_per_sec,
            offset_secs: self.ts_offset(idb)?,
        })
    }

    /// The interface's `if_tsoffset`, decoded in the section's byte order: the
    /// parser's own decoding assumes little-endian, which is wrong for big-endian
    /// sections.
    fn ts_offset(&self, idb: &InterfaceDescriptionBlock<'_>) -> Result<i64, Fault> {
        let Some(option) = idb
            .options
            .iter()
            .find(|opt| opt.code == OptionCode::IfTsoffset)
        else {
            return Ok(0);
        };
        let bytes = option
            .as_bytes()
            .ok()
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .ok_or_else(|| {
                Fault::Corrupt(format!(
                    "interface {} has an if_tsoffset option of {} bytes, expected 8",
                    self.interfaces.len(),
                    option.len
                ))
            })?;
        Ok(if self.big_endian {
            i64::from_be_bytes(bytes)
        } else {
            i64::from_le_bytes(bytes)
        })
    }

    fn enhanced(&mut self, epb: &EnhancedPacketBlock<'_>) -> Result<Interpreted, Fault> {
        let interface = usize::try_from(epb.if_id)
            .ok()
            .and_then(|id| self.interfaces.get(id))
            .ok_or_else(|| {
                Fault::Corrupt(format!(
                    "packet refers to interface {}, but the section describes {} interface(s)",
                    epb.if_id,
                    self.interfaces.len()
                ))
            })?;
        check_caplen(epb.caplen, interface.snaplen)?;
        let raw = (u64::from(epb.ts_high) << 32) | u64::from(epb.ts_low);
        let ts_ns = interface.ts_ns(raw).ok_or_else(|| {
            Fault::Corrupt(format!(
                "timestamp {raw} (units of 1/{} s, offset {} s) is outside 1970..2554",
                interface.units_per_sec, interface.offset_secs
            ))
        })?;
        let data = epb.packet_data();
        let found = FoundPacket {
            ts_ns,
            link: interface.link,
            wire_len: epb.origlen,
            data_addr: data.as_ptr() as usize,
            data_len: data.len(),
        };
        self.last_ts_ns = ts_ns;
        Ok(Interpreted::Packet(found))
    }

    /// A Simple Packet Block has no interface id, timestamp or captured length: it
    /// belongs to the section's first interface, and per the pcapng spec its
    /// captured length is the smallest of the original length, the bytes the block
    /// holds, and that interface's snaplen.
    fn simple(&self, spb: &SimplePacketBlock<'_>) -> Result<Interpreted, Fault> {
        let interface = self.interfaces.first().ok_or_else(|| {
            Fault::Corrupt("simple packet block in a section without interfaces".into())
        })?;
        let mut data = spb.packet_data();
        if interface.snaplen != 0 {
            let snaplen = usize::try_from(interface.snaplen).unwrap_or(usize::MAX);
            data = data.get(..snaplen).unwrap_or(data);
        }
        check_caplen(u32::try_from(data.len()).unwrap_or(u32::MAX), 0)?;
        Ok(Interpreted::Packet(FoundPacket {
            ts_ns: self.last_ts_ns,
            link: interface.link,
            wire_len: spb.origlen,
            data_addr: data.as_ptr() as usize,
            data_len: data.len(),
        }))
    }
}

/// Timestamp units per second for an `if_tsresol` value: the low 7 bits are a
/// negative power of 10, or of 2 when the top bit is set. Decoded here because the
/// parser's own decoding rejects every power-of-2 resolution.
fn units_per_sec(tsresol: u8) -> Option<u64> {
    let exponent = u32::from(tsresol & 0x7f);
    if tsresol & 0x80 == 0 {
        10u64.checked_pow(exponent)
    } else {
        1u64.checked_shl(exponent)
    }
}

/// Reject captured lengths no capture tool writes: above the snapshot length the
/// capture declared (0 means unlimited) or above [`MAX_CAPLEN`].
fn check_caplen(caplen: u32, snaplen: u32) -> Result<(), Fault> {
    if caplen > MAX_CAPLEN {
        return Err(Fault::Corrupt(format!(
            "captured length {caplen} exceeds the {MAX_CAPLEN}-byte maximum"
        )));
    }
    if snaplen != 0 && caplen > snaplen {
        return Err(Fault::Corrupt(format!(
            "captured length {caplen} exceeds the snapshot length {snaplen}"
        )));
    }
    Ok(())
}

/// Human-readable text for a parser error, without dumping the input bytes that
/// the parser's own `Display` includes.
fn describe(error: &PcapError<&[u8]>) -> String {
    match error {
        PcapError::NomError(_, kind) | PcapError::OwnedNomError(_, kind) => {
            format!("parser check failed ({kind:?})")
        }
        PcapError::HeaderNotRecognized => "unrecognized header".into(),
        other => other.to_string(),
    }
}

/// Decide from the first bytes of the file what it is, with the detail a user
/// needs when it is not a usable capture. `at_eof` says the prefix is the whole file.
fn classify(prefix: &[u8], at_eof: bool) -> Result<State, Fault> {
    if prefix.is_empty() {
        return Err(Fault::NotACapture("the file is empty".into()));
    }
    if prefix.starts_with(&SHB_MAGIC.to_le_bytes()) {
        return match parse_sectionheaderblock(prefix) {
            Ok((_, shb)) => Ok(State::PcapNg(PcapNgState {
                big_endian: shb.big_endian(),
                ..PcapNgState::default()
            })),
            Err(nom::Err::Incomplete(_)) if at_eof => Err(Fault::Truncated(format!(
                "the file ends {} bytes into the pcapng section header block",
                prefix.len()
            ))),
            Err(nom::Err::Incomplete(_)) => Err(Fault::Corrupt(format!(
                "the pcapng section header block is larger than {INITIAL_CAPACITY} bytes"
            ))),
            Err(nom::Err::Error(e) | nom::Err::Failure(e)) => Err(Fault::Corrupt(format!(
                "invalid pcapng section header block: {}",
                describe(&e)
            ))),
        };
    }
    match parse_pcap_header(prefix) {
        Ok((_, header)) => Ok(State::Pcap(PcapState::new(&header))),
        Err(nom::Err::Incomplete(_)) if prefix.len() < 4 => Err(Fault::NotACapture(format!(
            "the file is only {} bytes long",
            prefix.len()
        ))),
        Err(nom::Err::Incomplete(_)) => Err(Fault::Truncated(format!(
            "the file is {} bytes long, shorter than the 24-byte pcap file header",
            prefix.len()
        ))),
        Err(nom::Err::Error(_) | nom::Err::Failure(_)) => Err(Fault::NotACapture(format!(
            "unrecognized magic number {:02x?}",
            prefix.get(..4).unwrap_or(prefix)
        ))),
    }
}

/// Slot for the I/O error behind the parser's opaque `PcapError::ReadError`, so
/// the real cause (permission, EIO, ...) reaches the user.
#[derive(Clone, Default)]
struct SharedError(Arc<Mutex<Option<io::Error>>>);

impl SharedError {
    fn store(&self, error: io::Error) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
    }

    fn take_or_other(&self, path: &str, offset: u64) -> CaptureError {
        let source = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| io::Error::other("read failed"));
        CaptureError::Io {
            path: path.to_owned(),
            offset,
            source,
        }
    }
}

/// The byte stream handed to the parser: the prefix already read by `open`, then
/// the rest of the file.
struct Source {
    prefix: Vec<u8>,
    prefix_pos: usize,
    file: File,
    error: SharedError,
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(rest) = self.prefix.get(self.prefix_pos..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.len());
            if let (Some(dst), Some(src)) = (buf.get_mut(..n), rest.get(..n)) {
                dst.copy_from_slice(src);
            }
            self.prefix_pos += n;
            if self.prefix_pos >= self.prefix.len() {
                // Release the prefix: it is as large as the parser's whole buffer.
                self.prefix = Vec::new();
                self.prefix_pos = 0;
            }
            return Ok(n);
        }
        loop {
            match self.file.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let kind = e.kind();
                    self.error.store(e);
                    return Err(kind.into());
                }
                ok => return ok,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_holds_one_link_type_and_at_most_its_length() {
        let pkt = |link, data: &'static [u8], wire_len| CapturedPacket {
            ts_ns: 7,
            link,
            data,
            wire_len,
            offset: 0,
        };
        let mut b = Burst::default();
        assert!(b.is_empty() && !b.is_full_for(LinkType::RawIp));
        b.push(&pkt(LinkType::RawIp, b"abc", 60), 100);
        b.push(&pkt(LinkType::RawIp, b"defgh", 2), 101);
        assert_eq!(b.link(), LinkType::RawIp);
        assert!(b.is_full_for(LinkType::Ethernet), "another link type waits");
        let got: Vec<(u64, &[u8], u32)> = b
            .packets()
            .iter()
            .map(|p| (p.ts_ns, p.data, p.wire_len))
            .collect();
        let want: [(u64, &[u8], u32); 2] = [(100, b"abc", 60), (101, b"defgh", 5)];
        assert_eq!(got, want, "stamps as given, wire length at least the bytes");
        for _ in 2..Burst::LEN {
            assert!(!b.is_full_for(LinkType::RawIp));
            b.push(&pkt(LinkType::RawIp, b"x", 1), 102);
        }
        assert!(b.is_full_for(LinkType::RawIp));
        b.clear();
        assert!(b.is_empty() && b.packets().is_empty());
        b.push(&pkt(LinkType::Ethernet, b"y", 1), 103);
        assert_eq!(
            b.link(),
            LinkType::Ethernet,
            "an empty burst takes the next link"
        );
    }

    #[test]
    fn link_type_numbers() {
        assert_eq!(link_type(1), LinkType::Ethernet);
        for raw in [101, 12, 14, 228, 229] {
            assert_eq!(link_type(raw), LinkType::RawIp, "{raw}");
        }
        assert_eq!(link_type(113), LinkType::LinuxSll);
        assert_eq!(link_type(276), LinkType::LinuxSll2);
        assert_eq!(link_type(0), LinkType::Null);
        assert_eq!(link_type(108), LinkType::Loop);
        assert_eq!(link_type(9), LinkType::Unsupported(9));
        assert_eq!(link_type(u32::MAX), LinkType::Unsupported(u32::MAX));
    }

    fn interface(units_per_sec: u64, offset_secs: i64) -> Interface {
        Interface {
            link: LinkType::Ethernet,
            snaplen: 0,
            units_per_sec,
            offset_secs,
        }
    }

    #[test]
    fn pcapng_timestamp_conversion() {
        assert_eq!(
            interface(1_000_000, 0).ts_ns(1_500_000),
            Some(1_500_000_000)
        );
        assert_eq!(interface(1_000_000_000, 0).ts_ns(7), Some(7));
        assert_eq!(interface(1 << 10, 0).ts_ns(3 << 9), Some(1_500_000_000));
        assert_eq!(interface(1 << 30, 0).ts_ns(1), Some(0));
        assert_eq!(interface(1_000, 100).ts_ns(1), Some(100_001_000_000));
        assert_eq!(interface(1, -1).ts_ns(1), Some(0));
        assert_eq!(interface(1, -2).ts_ns(1), None);
        assert_eq!(interface(1_000_000, 0).ts_ns(u64::MAX), None);
        assert_eq!(interface(1 << 63, i64::MAX).ts_ns(u64::MAX), None);
    }

    /// Traffic sources run readers on their own threads.
    #[test]
    fn reader_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<CaptureReader>();
    }

    #[test]
    fn tsresol_decimal_and_binary() {
        assert_eq!(units_per_sec(6), Some(1_000_000));
        assert_eq!(units_per_sec(9), Some(1_000_000_000));
        assert_eq!(units_per_sec(19), Some(10_000_000_000_000_000_000));
        assert_eq!(units_per_sec(20), None);
        assert_eq!(units_per_sec(0x80 | 10), Some(1024));
        assert_eq!(units_per_sec(0x80 | 63), Some(1 << 63));
        assert_eq!(units_per_sec(0x80 | 64), None);
    }

    #[test]
    fn classify_short_inputs() {
        assert!(matches!(classify(&[], true), Err(Fault::NotACapture(_))));
        assert!(matches!(
            classify(&[0xd4, 0xc3], true),
            Err(Fault::NotACapture(_))
        ));
        assert!(matches!(
            classify(&[0xd4, 0xc3, 0xb2, 0xa1, 2, 0], true),
            Err(Fault::Truncated(_))
        ));
        assert!(matches!(
            classify(
                &[0x0a, 0x0d, 0x0d, 0x0a, 28, 0, 0, 0, 0x4d, 0x3c, 0x2b, 0x1a],
                true
            ),
            Err(Fault::Truncated(_))
        ));
        assert!(matches!(
            classify(b"GET / HTTP/1.1\r\n", true),
            Err(Fault::NotACapture(_))
        ));
    }
}
