//! The host↔NIC interface of flowshard, defined once and used by both sides.
//!
//! - [`regs`]: the BAR0 register map, generated from `rdl/flowshard_nic.rdl` (the same
//!   source gives the SystemVerilog register block, the C header and the docs under
//!   `generated/`; `tools/gen.py --check` fails when they are stale).
//! - [`ring`]: the DMA descriptors of the command, completion and telemetry rings.
//! - [`telemetry`]: the flow feature record carried by the telemetry ring.
//! - [`image`]: the firmware image format.
//!
//! Every layout is little-endian and versioned. Untrusted bytes are read through
//! zero-copy views (`zerocopy`) whose constructors check length and alignment, so no
//! accessor can panic on device or file input.
#![no_std]
#![deny(unsafe_code)]

pub mod image;
#[rustfmt::skip]
pub mod regs;
pub mod ring;
pub mod telemetry;

/// A bit field of a 32-bit register: `width` bits from bit `shift`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub shift: u32,
    pub width: u32,
}

impl Field {
    pub const fn new(shift: u32, width: u32) -> Field {
        Field { shift, width }
    }

    pub const fn mask(self) -> u32 {
        if self.width >= 32 {
            u32::MAX
        } else {
            ((1u32 << self.width) - 1) << self.shift
        }
    }

    /// The field's value in register value `reg`.
    pub const fn get(self, reg: u32) -> u32 {
        (reg & self.mask()) >> self.shift
    }

    /// `reg` with the field set to `value` (bits beyond the field's width are dropped).
    pub const fn set(self, reg: u32, value: u32) -> u32 {
        (reg & !self.mask()) | ((value << self.shift) & self.mask())
    }
}

/// PCI vendor id of the flowshard NIC function. A development id, not one assigned by
/// the PCI-SIG: a production card carries its maker's vendor id and the driver's id
/// table grows by that pair.
pub const PCI_VENDOR_ID: u16 = 0xf10f;
pub const PCI_DEVICE_ID: u16 = 0x0001;
/// MSI-X vector of command completions.
pub const IRQ_CMD: u32 = 0;
/// MSI-X vector of telemetry entries.
pub const IRQ_TELEMETRY: u32 = 1;
pub const IRQ_VECTORS: u32 = 2;

/// Size of BAR0: the register blocks, rounded up to a page.
pub const BAR0_SIZE: u32 = 0x1000;
const _: () = assert!(regs::MAP_SIZE <= BAR0_SIZE);

/// Register blocks the driver finds at run time, by type id, with the major version
/// this build speaks.
pub const BLOCKS: [(&str, u32, u16); 4] = [
    ("ident", regs::ident::TYPE_ID, regs::ident::VERSION_MAJOR),
    ("cmd", regs::cmd::TYPE_ID, regs::cmd::VERSION_MAJOR),
    ("telem", regs::telem::TYPE_ID, regs::telem::VERSION_MAJOR),
    ("flash", regs::flash::TYPE_ID, regs::flash::VERSION_MAJOR),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_get_and_set_only_their_bits() {
        let f = regs::flash::status::ERROR;
        assert_eq!(f.mask(), 0xff00);
        let r = f.set(0xffff_00ff, 0x1ab);
        assert_eq!(r, 0xffff_abff);
        assert_eq!(f.get(r), 0xab);
        assert_eq!(Field::new(0, 32).mask(), u32::MAX);
    }

    #[test]
    fn blocks_chain_in_address_order_and_end() {
        let chain = [
            (regs::ident::BASE, regs::cmd::BASE),
            (regs::cmd::BASE, regs::telem::BASE),
            (regs::telem::BASE, regs::flash::BASE),
        ];
        for (a, b) in chain {
            assert!(a < b && b % 0x100 == 0);
        }
    }
}
