//! `flowshard nic-sim`: the emulated NIC as a program. It serves the device over
//! vfio-user and feeds it traffic — a capture replayed at its captured pace, scaled, or
//! as fast as possible, optionally looped; live packets from an interface (libpcap); or
//! synthetic flows — and writes what the NIC decided: per-node counters, optional
//! per-node pcap files, an optional decision log (the CSV of `flowshard replay`).
//!
//! NIC time is the packets' time. A looped capture is shifted by its own length each
//! round, so NIC time never runs backwards. Traffic starts once an image runs (a NIC
//! without firmware receives nothing), so `nic-sim --pcap` then `flowshard flash`
//! replays the whole capture through the flashed image.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hw_sim::capture::{Burst, CaptureReader, PcapWriter, link_type};
use hw_sim::device::{DeviceOptions, NicDevice};
use hw_sim::flash_store::FileFlash;
use hw_sim::generate::{FrameWindow, Popularity, WIRE_LEN};
use nic_firmware::pipeline::{Decision, Packet};
use nic_firmware::{LinkType, Verdict};
use serde::Serialize;

use crate::Error;
use crate::nic_cmd::{json_line, read_file, trusted_key};
use crate::replay::{DECISIONS_HEADER, write_row};

/// How fast a capture is replayed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// At the captured pace times `speed` (1.0 = as captured, 2.0 = twice as fast).
    Captured { speed: f64 },
    /// As fast as the device takes them.
    Fast,
}

/// Where packets come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A pcap/pcapng file, `loops` times (0: until stopped).
    Pcap {
        path: PathBuf,
        pace: Pace,
        loops: u64,
    },
    /// Live capture on a network interface (libpcap), until stopped.
    Live { interface: String },
    /// `packets` synthetic 64-byte TCP frames of `flows` flows, `pps` packets per
    /// second of NIC time, as fast as possible.
    Generate {
        flows: u32,
        packets: u64,
        zipf: Option<f64>,
        seed: u64,
        pps: u64,
    },
}

/// Traffic and its outputs.
#[derive(Clone, Debug)]
pub struct TrafficOptions {
    pub source: Source,
    /// Write the decision log (CSV) here.
    pub decisions: Option<PathBuf>,
    /// Write `node-N.pcap` per node here: the packets steered to node N.
    pub node_pcap_dir: Option<PathBuf>,
}

/// One node's share, as the device counts it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct NodeTraffic {
    pub node: usize,
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
    pub active_flows: u64,
}

/// What a traffic run did.
#[derive(Debug, Serialize)]
pub struct TrafficSummary {
    pub packets: u64,
    pub forwarded: u64,
    pub rounds: u64,
    pub nic_time_ns: u64,
    pub flows: u64,
    pub nodes: Vec<NodeTraffic>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Sinks of decisions: the CSV log and the per-node captures.
struct Outputs {
    log: Option<(BufWriter<File>, PathBuf)>,
    row: String,
    index: u64,
    pcap_dir: Option<PathBuf>,
    pcaps: BTreeMap<(u16, u32), PcapWriter<BufWriter<File>>>,
}

impl Outputs {
    fn new(opts: &TrafficOptions) -> Result<Outputs, Error> {
        let log = match &opts.decisions {
            Some(path) => {
                let f = File::create(path).map_err(io(format!("create {}", path.display())))?;
                let mut w = BufWriter::with_capacity(1 << 20, f);
                writeln!(w, "{DECISIONS_HEADER}")
                    .map_err(io(format!("write {}", path.display())))?;
                Some((w, path.clone()))
            }
            None => None,
        };
        if let Some(dir) = &opts.node_pcap_dir {
            std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        }
        Ok(Outputs {
            log,
            row: String::new(),
            index: 0,
            pcap_dir: opts.node_pcap_dir.clone(),
            pcaps: BTreeMap::new(),
        })
    }

    fn write(
        &mut self,
        link: LinkType,
        pkts: &[Packet<'_>],
        decisions: &[Decision],
    ) -> Result<(), Error> {
        if let Some((w, path)) = &mut self.log {
            self.row.clear();
            for (d, p) in decisions.iter().zip(pkts) {
                write_row(&mut self.row, self.index, link, p, d);
                self.index += 1;
            }
            w.write_all(self.row.as_bytes())
                .map_err(io(format!("write {}", path.display())))?;
        }
        if let Some(dir) = &self.pcap_dir {
            let number = hw_sim::capture::linktype_number(link);
            for (d, p) in decisions.iter().zip(pkts) {
                if d.verdict != Verdict::Forward {
                    continue;
                }
                let key = (d.node, number);
                if !self.pcaps.contains_key(&key) {
                    // One file per node and link type; the first link type keeps the plain name.
                    let same_node = self.pcaps.keys().filter(|k| k.0 == d.node).count();
                    let name = if same_node == 0 {
                        format!("node-{}.pcap", d.node)
                    } else {
                        format!("node-{}-linktype-{number}.pcap", d.node)
                    };
                    let path = dir.join(name);
                    let f =
                        File::create(&path).map_err(io(format!("create {}", path.display())))?;
                    let w = PcapWriter::new(BufWriter::new(f), link)
                        .map_err(io(format!("write {}", path.display())))?;
                    self.pcaps.insert(key, w);
                }
                if let Some(w) = self.pcaps.get_mut(&key) {
                    w.write(p.ts_ns, p.data, p.wire_len)
                        .map_err(io(format!("write node {} capture", d.node)))?;
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), Error> {
        if let Some((w, path)) = &mut self.log {
            w.flush().map_err(io(format!("write {}", path.display())))?;
        }
        for ((node, _), w) in &mut self.pcaps {
            w.flush()
                .map_err(io(format!("write node {node} capture")))?;
        }
        Ok(())
    }
}

/// Feeds the device burst by burst.
struct Feeder<'a> {
    dev: &'a Mutex<NicDevice>,
    out: Outputs,
    decisions: Vec<Decision>,
    packets: u64,
    forwarded: u64,
}

impl Feeder<'_> {
    fn dev(&self) -> MutexGuard<'_, NicDevice> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn burst(&mut self, link: LinkType, pkts: &[Packet<'_>]) -> Result<(), Error> {
        if pkts.is_empty() {
            return Ok(());
        }
        self.decisions.clear();
        let mut decisions = std::mem::take(&mut self.decisions);
        self.dev().receive(link, pkts, &mut decisions);
        self.packets += pkts.len() as u64;
        self.forwarded += decisions
            .iter()
            .filter(|d| d.verdict == Verdict::Forward)
            .count() as u64;
        let r = self.out.write(link, pkts, &decisions);
        self.decisions = decisions;
        r
    }
}

/// Wait until the device runs an image (or `stop`); false when stopped.
fn wait_for_image(dev: &Mutex<NicDevice>, stop: &AtomicBool) -> bool {
    loop {
        if dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pipeline()
            .is_some()
        {
            return true;
        }
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run `opts.source` through `dev` until it ends or `stop` is set.
pub fn run_traffic(
    dev: &Mutex<NicDevice>,
    opts: &TrafficOptions,
    stop: &AtomicBool,
) -> Result<TrafficSummary, Error> {
    let mut f = Feeder {
        dev,
        out: Outputs::new(opts)?,
        decisions: Vec::with_capacity(Burst::LEN),
        packets: 0,
        forwarded: 0,
    };
    let mut rounds = 0;
    if wait_for_image(dev, stop) {
        rounds = match &opts.source {
            Source::Pcap { path, pace, loops } => replay(&mut f, path, *pace, *loops, stop)?,
            Source::Live { interface } => live(&mut f, interface, stop)?,
            Source::Generate {
                flows,
                packets,
                zipf,
                seed,
                pps,
            } => generate(&mut f, *flows, *packets, *zipf, *seed, *pps, stop)?,
        };
    }
    f.out.finish()?;
    let dev = f.dev();
    let (nodes, flows, now) = match dev.pipeline() {
        Some(p) => (
            p.nodes()
                .map(|n| {
                    let c = p.counters().nodes[n.id as usize];
                    NodeTraffic {
                        node: n.id.into(),
                        packets: c.packets,
                        bytes: c.bytes,
                        flows: c.flows,
                        active_flows: c.active_flows,
                    }
                })
                .collect(),
            p.counters().flows_created,
            p.now_ns(),
        ),
        None => (Vec::new(), 0, 0),
    };
    Ok(TrafficSummary {
        packets: f.packets,
        forwarded: f.forwarded,
        rounds,
        nic_time_ns: now,
        flows,
        nodes,
    })
}

fn replay(
    f: &mut Feeder<'_>,
    path: &Path,
    pace: Pace,
    loops: u64,
    stop: &AtomicBool,
) -> Result<u64, Error> {
    let start = Instant::now();
    // Round r's packets are shifted by r × (capture span + 1 µs).
    let mut shift = 0u64;
    let mut first: Option<u64> = None;
    let mut round = 0;
    let mut burst = Burst::default();
    let flush = |f: &mut Feeder<'_>, burst: &mut Burst| {
        let r = f.burst(burst.link(), &burst.packets());
        burst.clear();
        r
    };
    while (loops == 0 || round < loops) && !stop.load(Ordering::Relaxed) {
        let mut reader = CaptureReader::open(path)?;
        let mut last = 0u64;
        while let Some(p) = reader.next_packet()? {
            let base = *first.get_or_insert(p.ts_ns);
            last = last.max(p.ts_ns);
            let ts = p.ts_ns + shift;
            if let Pace::Captured { speed } = pace {
                let due = Duration::from_secs_f64(ts.saturating_sub(base) as f64 / 1e9 / speed);
                let now = start.elapsed();
                if due > now {
                    flush(f, &mut burst)?;
                    std::thread::sleep(due - now);
                }
            }
            if burst.is_full_for(p.link) {
                flush(f, &mut burst)?;
            }
            burst.push(&p, ts);
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        flush(f, &mut burst)?;
        round += 1;
        let Some(base) = first else {
            break; // an empty capture: nothing to loop
        };
        shift += last.saturating_sub(base) + 1_000;
    }
    Ok(round)
}

fn live(f: &mut Feeder<'_>, interface: &str, stop: &AtomicBool) -> Result<u64, Error> {
    use std::os::fd::AsRawFd;
    let fail = |e: pcap::Error| Error::Usage(format!("live capture on {interface}: {e}"));
    let mut cap = pcap::Capture::from_device(interface)
        .map_err(fail)?
        .promisc(false)
        .snaplen(65_535)
        .immediate_mode(true)
        .open()
        .map_err(fail)?
        // libpcap may block in a read for good on a quiet interface (its timeout is not
        // honoured everywhere): read without blocking and wait in poll(2) here instead.
        .setnonblock()
        .map_err(fail)?;
    let link = link_type(cap.get_datalink().0 as u32);
    eprintln!("nic-sim: capturing live on {interface}");
    // Once stopped, take what the kernel captured before the stop, then end.
    let mut stopped = false;
    loop {
        if stopped {
            return Ok(1);
        }
        stopped = stop.load(Ordering::Relaxed);
        let mut pfd = libc::pollfd {
            fd: cap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, if stopped { 0 } else { 100 }) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Io {
                what: format!("live capture on {interface}: poll"),
                source: e,
            });
        }
        loop {
            match cap.next_packet() {
                Ok(p) => {
                    let h = p.header;
                    let ts = (h.ts.tv_sec as u64) * 1_000_000_000 + (h.ts.tv_usec as u64) * 1_000;
                    let pkt = Packet {
                        ts_ns: ts,
                        data: p.data,
                        wire_len: h.len,
                    };
                    f.burst(link, &[pkt])?;
                }
                Err(pcap::Error::TimeoutExpired) => break,
                Err(e) => return Err(fail(e)),
            }
        }
    }
}

fn generate(
    f: &mut Feeder<'_>,
    flows: u32,
    packets: u64,
    zipf: Option<f64>,
    seed: u64,
    pps: u64,
    stop: &AtomicBool,
) -> Result<u64, Error> {
    let popularity = zipf.map_or(Popularity::Uniform, Popularity::Zipf);
    let window = FrameWindow::new(flows, 65_536.min(packets.max(1) as usize), popularity, seed)
        .map_err(Error::Usage)?;
    let gap = 1_000_000_000 / pps.max(1);
    let mut sent = 0u64;
    let mut i = 0usize;
    while sent < packets && !stop.load(Ordering::Relaxed) {
        let n = Burst::LEN.min((packets - sent) as usize);
        let pkts: Vec<Packet<'_>> = (0..n)
            .map(|k| Packet {
                ts_ns: (sent + k as u64) * gap,
                data: window.frame((i + k) % window.len()),
                wire_len: WIRE_LEN,
            })
            .collect();
        f.burst(LinkType::Ethernet, &pkts)?;
        sent += n as u64;
        i = (i + n) % window.len();
    }
    Ok(1)
}

/// Options of `flowshard nic-sim`.
#[derive(Debug)]
pub struct NicSimOptions {
    /// Serve the device over vfio-user here; without it, run the traffic and exit.
    pub socket: Option<PathBuf>,
    pub trusted_key: Option<PathBuf>,
    pub image: Option<PathBuf>,
    /// Keep the flash slots and boot selection in this directory across restarts.
    pub flash_dir: Option<PathBuf>,
    pub memory_mib: u64,
    pub traffic: Option<TrafficOptions>,
    pub json: bool,
}

fn print_summary(s: &TrafficSummary, json: bool) -> Result<(), Error> {
    if json {
        return json_line(s);
    }
    println!(
        "nic-sim: {} packets ({} forwarded) in {} round(s), {} flows, NIC time {} ns",
        s.packets, s.forwarded, s.rounds, s.flows, s.nic_time_ns
    );
    for n in &s.nodes {
        println!(
            "  node {:>4}: {:>10} packets {:>14} bytes {:>8} flows placed {:>8} active",
            n.node, n.packets, n.bytes, n.flows, n.active_flows
        );
    }
    Ok(())
}

/// Set by SIGINT/SIGTERM: traffic stops, outputs are flushed, the summary printed.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn stop_on_signals() -> Result<(), Error> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let old = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if old == libc::SIG_ERR {
            return Err(Error::Io {
                what: "install signal handler".into(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// `flowshard nic-sim`: until its traffic ends (without --socket) or a SIGINT/SIGTERM.
/// A device powered on with the flash kept in `dir`, saying what it booted and what it
/// had to leave out.
fn restore(dir: &Path, opts: DeviceOptions) -> Result<NicDevice, Error> {
    let (store, state, notes) = FileFlash::open(dir, &opts.trusted_key)
        .map_err(io(format!("open flash directory {}", dir.display())))?;
    for n in notes {
        eprintln!("nic-sim: {n}");
    }
    let dev = NicDevice::restore(opts, state, Box::new(store));
    let slot = |s: usize| if s == 0 { 'A' } else { 'B' };
    match dev.running_slot() {
        Some((s, version, fell_back)) => eprintln!(
            "nic-sim: flash {}: booted slot {} (image version {version}){}",
            dir.display(),
            slot(s),
            if fell_back {
                format!(", falling back from slot {}", slot(1 - s))
            } else {
                String::new()
            }
        ),
        None => eprintln!(
            "nic-sim: flash {}: no bootable image yet; flash one",
            dir.display()
        ),
    }
    Ok(dev)
}

pub fn run(opts: NicSimOptions) -> Result<(), Error> {
    stop_on_signals()?;
    let dev_opts = DeviceOptions {
        trusted_key: trusted_key(opts.trusted_key.as_deref())?,
        memory_bytes: opts.memory_mib << 20,
    };
    let mut dev = match &opts.flash_dir {
        Some(dir) => restore(dir, dev_opts)?,
        None => NicDevice::new(dev_opts),
    };
    let booted = dev.running_slot().is_some();
    let image = match (&opts.image, &opts.socket, &opts.trusted_key) {
        (Some(path), _, _) => Some((read_file(path)?, path.display().to_string())),
        // Flashed before and kept in --flash-dir: run that.
        (None, _, _) if booted => None,
        // Without a socket nobody can flash: boot the embedded default image.
        (None, None, None) => Some((crate::nic_cmd::default_image()?, "embedded default".into())),
        (None, None, Some(_)) => {
            return Err(Error::Usage(
                "nic-sim without --socket and with --trusted-key needs --image".into(),
            ));
        }
        (None, Some(_), _) => None,
    };
    if let Some((bytes, name)) = image {
        dev.preload(bytes).map_err(|error| Error::Image {
            path: name.into(),
            error,
        })?;
    }
    let dev = Arc::new(Mutex::new(dev));
    let Some(socket) = opts.socket else {
        let traffic = opts.traffic.ok_or_else(|| {
            Error::Usage("nic-sim needs --socket, a traffic source, or both".into())
        })?;
        let summary = run_traffic(&dev, &traffic, &STOP)?;
        return print_summary(&summary, opts.json);
    };
    let traffic = opts.traffic.map(|traffic| {
        let dev = dev.clone();
        let json = opts.json;
        std::thread::spawn(move || {
            run_traffic(&dev, &traffic, &STOP).and_then(|s| print_summary(&s, json))
        })
    });
    eprintln!(
        "nic-sim: serving vfio-user on {} ({})",
        socket.display(),
        if opts.trusted_key.is_some() {
            "trusting the given key"
        } else {
            "trusting the development key"
        }
    );
    let (sock, served) = (socket.clone(), dev.clone());
    let server = std::thread::spawn(move || hw_sim::vfio_user_server::serve(&sock, served));
    while !STOP.load(Ordering::SeqCst) && !server.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
    }
    STOP.store(true, Ordering::SeqCst);
    let traffic_result = match traffic {
        Some(t) => t
            .join()
            .map_err(|_| Error::Usage("nic-sim: the traffic thread panicked".into()))?,
        None => Ok(()),
    };
    if server.is_finished() {
        server
            .join()
            .map_err(|_| Error::Usage("nic-sim: the server thread panicked".into()))?
            .map_err(|e| Error::Usage(e.to_string()))?;
    } else {
        // The server thread waits in accept(); the socket goes, the process ends it.
        std::fs::remove_file(&socket).map_err(io(format!("remove {}", socket.display())))?;
    }
    traffic_result
}
