//! The emulated NIC's flash as files, so `flowshard nic-sim --flash-dir DIR` keeps its
//! slots and boot selection across restarts, as a real NIC keeps them across power
//! cycles.
//!
//! `DIR/slot-a.img` and `DIR/slot-b.img` hold the slots' images (absent: empty);
//! `DIR/boot` holds the selection, two lines: `active A|B` and `pending A|B|-`. Every
//! file is replaced whole — written to a temporary file, synced, renamed over the old
//! one, then the directory synced — so a process killed at any point leaves each file
//! either old or new, never half written. With the device's order of writes (a slot
//! before the selection that names it; the selection before the erase of a slot it
//! named), the stored state always names a slot that boots. A slot file that does not
//! verify (damaged on disk, or signed by another key) is left out, and the device
//! boots the other slot.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use crate::device::{FlashState, FlashStore};
use crate::image;

const SLOT_FILES: [&str; 2] = ["slot-a.img", "slot-b.img"];
const BOOT_FILE: &str = "boot";

fn slot_name(i: usize) -> char {
    if i == 0 { 'A' } else { 'B' }
}

/// Flash slots and boot selection kept in a directory.
#[derive(Debug)]
pub struct FileFlash {
    dir: PathBuf,
}

impl FileFlash {
    /// Open (creating) `dir` and read the flash state it holds. Each problem found —
    /// an unreadable or damaged file — is described in the returned notes, for the
    /// operator, and the state read leaves that file's contents out.
    pub fn open(
        dir: &Path,
        trusted: &VerifyingKey,
    ) -> io::Result<(FileFlash, FlashState, Vec<String>)> {
        fs::create_dir_all(dir)?;
        let store = FileFlash {
            dir: dir.to_owned(),
        };
        let mut notes = Vec::new();
        let mut state = FlashState::default();
        for (i, name) in SLOT_FILES.iter().enumerate() {
            let path = dir.join(name);
            match fs::read(&path) {
                Ok(bytes) => match image::verify(&bytes, Some(trusted)) {
                    Ok(_) => state.slots[i] = Some(bytes),
                    Err(e) => notes.push(format!(
                        "flash slot {} ({}) is not a bootable image: {e}; ignoring it",
                        slot_name(i),
                        path.display()
                    )),
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => notes.push(format!(
                    "flash slot {} ({}) cannot be read: {e}; ignoring it",
                    slot_name(i),
                    path.display()
                )),
            }
        }
        let boot = dir.join(BOOT_FILE);
        match fs::read_to_string(&boot) {
            Ok(text) => match parse_boot(&text) {
                Some((active, pending)) => {
                    state.active = active;
                    state.pending = pending;
                }
                None => notes.push(format!(
                    "boot selection {} is damaged; booting whichever slot verifies, A first",
                    boot.display()
                )),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => notes.push(format!(
                "boot selection {} cannot be read: {e}; booting whichever slot verifies, A first",
                boot.display()
            )),
        }
        Ok((store, state, notes))
    }

    /// Replace `name` in the directory with `bytes`, whole or not at all.
    fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, self.dir.join(name))?;
        self.sync_dir()
    }

    /// Make renames and removals in the directory durable.
    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    /// Say what failed, as the device has no one to tell when a reset cannot record
    /// its boot selection.
    fn logged(&self, what: &str, r: io::Result<()>) -> io::Result<()> {
        if let Err(e) = &r {
            eprintln!("nic-sim: flash {}: cannot {what}: {e}", self.dir.display());
        }
        r
    }
}

/// `active X` and `pending Y|-`, exactly.
fn parse_boot(text: &str) -> Option<(usize, Option<usize>)> {
    let slot = |s: &str| match s {
        "A" => Some(0),
        "B" => Some(1),
        _ => None,
    };
    let mut lines = text.lines();
    let active = slot(lines.next()?.strip_prefix("active ")?)?;
    let pending = match lines.next()?.strip_prefix("pending ")? {
        "-" => None,
        s => Some(slot(s)?),
    };
    lines.next().is_none().then_some((active, pending))
}

impl FlashStore for FileFlash {
    fn write_slot(&mut self, slot: usize, image: &[u8]) -> io::Result<()> {
        let r = self.replace(SLOT_FILES[slot.min(1)], image);
        self.logged("write a slot", r)
    }

    fn erase_slot(&mut self, slot: usize) -> io::Result<()> {
        let r = match fs::remove_file(self.dir.join(SLOT_FILES[slot.min(1)])) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        self.logged("erase a slot", r)
    }

    fn write_boot(&mut self, active: usize, pending: Option<usize>) -> io::Result<()> {
        let text = format!(
            "active {}\npending {}\n",
            slot_name(active),
            pending.map_or('-', slot_name)
        );
        let r = self.replace(BOOT_FILE, text.as_bytes());
        self.logged("record the boot selection", r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{DeviceOptions, NicDevice};
    use crate::image::{build, dev_signing_key, dev_verifying_key, sign};
    use nic_firmware::PipelineConfig;

    fn image(version: u32) -> Vec<u8> {
        sign(
            &build(&PipelineConfig::default(), version).unwrap(),
            &dev_signing_key(),
        )
        .unwrap()
    }

    fn start(dir: &Path) -> (NicDevice, Vec<String>) {
        let (store, state, notes) = FileFlash::open(dir, &dev_verifying_key()).unwrap();
        (
            NicDevice::restore(DeviceOptions::default(), state, Box::new(store)),
            notes,
        )
    }

    #[test]
    fn boot_selection_parses_only_what_it_writes() {
        assert_eq!(parse_boot("active A\npending -\n"), Some((0, None)));
        assert_eq!(parse_boot("active B\npending A\n"), Some((1, Some(0))));
        for bad in [
            "",
            "active C\npending -\n",
            "active A\n",
            "active A\npending -\nx\n",
        ] {
            assert_eq!(parse_boot(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn slots_and_selection_survive_a_restart_and_a_damaged_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let (dev, notes) = start(dir.path());
        assert!(dev.running_slot().is_none() && notes.is_empty());
        drop(dev);
        // A preloaded image is stored in slot A and boots after a restart.
        let (mut dev, _) = start(dir.path());
        dev.preload(image(1)).unwrap();
        drop(dev);
        let (dev, notes) = start(dir.path());
        assert_eq!(dev.running_slot(), Some((0, 1, false)));
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(
            fs::read_to_string(dir.path().join("boot")).unwrap(),
            "active A\npending -\n"
        );
        // A committed slot B, not yet reset into, boots at the next start.
        let mut state = FileFlash::open(dir.path(), &dev_verifying_key()).unwrap();
        state.0.write_slot(1, &image(2)).unwrap();
        state.0.write_boot(0, Some(1)).unwrap();
        drop(dev);
        let (dev, _) = start(dir.path());
        assert_eq!(dev.running_slot(), Some((1, 2, false)));
        drop(dev);
        // Slot B damaged on disk: named, and slot A boots instead.
        let b = dir.path().join("slot-b.img");
        let mut bytes = fs::read(&b).unwrap();
        bytes[100] ^= 1;
        fs::write(&b, bytes).unwrap();
        let (dev, notes) = start(dir.path());
        assert_eq!(dev.running_slot(), Some((0, 1, true)));
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].starts_with("flash slot B (")
                && notes[0].contains("bad CRC32C of the image payload")
                && notes[0].ends_with("ignoring it"),
            "{notes:?}"
        );
        // A damaged selection boots whatever verifies.
        fs::write(dir.path().join("boot"), "garbage").unwrap();
        let (dev, notes) = start(dir.path());
        assert_eq!(dev.running_slot().map(|r| r.0), Some(0));
        assert!(notes.iter().any(|n| n.contains("is damaged")), "{notes:?}");
    }
}
