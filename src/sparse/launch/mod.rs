//! What an op's GPU twin records launches with, apart from the executor
//! that replays them (`sparse::gpu`): the kernels (their families, one `.cu`
//! file each, compiled after `common.cuh` as one module, and an entry point
//! by name), the parameter block a launch passes by value, and the view a
//! step records through ([`StepIo`]). Each kernel's parameter struct is a
//! `#[repr(C)]` type in the Rust file of the op it computes, laid out as its
//! C twin; a launch carries its bytes.

mod step;

pub use step::{Launch, Pool, StepIo};

use std::fmt;
use std::mem::{size_of, MaybeUninit};

/// What every family's source starts with.
const COMMON: &str = include_str!("../kernels/common.cuh");

/// The energy layer's head as device functions, shared with a gate.
const UNARY_HEAD: &str = include_str!("../../ersm/kernels/unary_head.cu");

/// A kernel family: one source file, one compiled module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// `conv.cu`: 1×1, rulebook and depthwise convs.
    Conv,
    /// `elementwise.cu`: binary ops, affine maps, activations.
    Elementwise,
    /// `pool.cu`: global average pooling.
    Pool,
    /// `linear.cu`: fully connected layers.
    Linear,
    /// `tokens.cu`: token sets and rulebooks from the kept list.
    Tokens,
    /// `gate.cu`: a gate's energies (after the energy layer's head
    /// functions, `ersm/kernels/unary_head.cu`) and rows.
    Gate,
}

impl Family {
    /// Every family.
    pub const ALL: [Family; 6] = [
        Family::Conv,
        Family::Elementwise,
        Family::Pool,
        Family::Linear,
        Family::Tokens,
        Family::Gate,
    ];

    /// The family's own file, without `common.cuh`.
    fn file(self) -> &'static str {
        match self {
            Family::Conv => include_str!("../kernels/conv.cu"),
            Family::Elementwise => include_str!("../kernels/elementwise.cu"),
            Family::Pool => include_str!("../kernels/pool.cu"),
            Family::Linear => include_str!("../kernels/linear.cu"),
            Family::Tokens => include_str!("../kernels/tokens.cu"),
            Family::Gate => include_str!("../kernels/gate.cu"),
        }
    }

    /// The source NVRTC compiles: `common.cuh`, then the family's file
    /// (the gate's after the energy layer's head functions).
    pub fn source(self) -> String {
        match self {
            Family::Gate => format!("{COMMON}\n{UNARY_HEAD}\n{}", self.file()),
            _ => format!("{COMMON}\n{}", self.file()),
        }
    }

    /// A name for logs and errors (`suffix conv kernels`).
    pub fn name(self) -> &'static str {
        match self {
            Family::Conv => "suffix conv",
            Family::Elementwise => "suffix elementwise",
            Family::Pool => "suffix pool",
            Family::Linear => "suffix linear",
            Family::Tokens => "suffix tokens",
            Family::Gate => "suffix gate",
        }
    }

    /// The entry points the family's file defines, in source order (read
    /// from the source, so a new kernel needs no list kept beside it).
    pub fn entries(self) -> Vec<&'static str> {
        const MARK: &str = "extern \"C\" __global__ void ";
        self.file()
            .split(MARK)
            .skip(1)
            .filter_map(|rest| rest.split('(').next())
            .map(str::trim)
            .collect()
    }
}

/// Every family's source in one piece, `common.cuh` once (its guard drops
/// the repeats): what the tests compile for the CPU.
pub fn all_sources() -> String {
    Family::ALL
        .iter()
        .map(|f| f.source())
        .collect::<Vec<_>>()
        .join("\n")
}

/// One entry point of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kernel {
    pub family: Family,
    pub name: &'static str,
}

/// A kernel's parameter struct.
///
/// # Safety
/// The type is `#[repr(C)]`, made of `u64` addresses, `i32`s, `f32`s and
/// other such structs only, laid out exactly as the C struct its kernels
/// take by value, and no larger than [`Args::CAPACITY`] bytes.
pub unsafe trait KernelArgs: Copy + fmt::Debug + 'static {}

/// The bytes of one [`KernelArgs`], as a launch passes them: the driver (or
/// the CPU emulation) reads as many as the kernel's parameter takes.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Args {
    bytes: [MaybeUninit<u8>; Args::CAPACITY],
    len: usize,
}

impl Args {
    /// The largest parameter struct a kernel may take.
    pub const CAPACITY: usize = 256;

    /// The bytes of `p`.
    pub fn of<T: KernelArgs>(p: &T) -> Args {
        const { assert!(size_of::<T>() <= Args::CAPACITY) };
        let mut bytes = [MaybeUninit::uninit(); Args::CAPACITY];
        // SAFETY: `T` is plain data no larger than the buffer; padding bytes
        // are copied as they are and never read as values on this side.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (p as *const T).cast::<MaybeUninit<u8>>(),
                bytes.as_mut_ptr(),
                size_of::<T>(),
            )
        };
        Args {
            bytes,
            len: size_of::<T>(),
        }
    }

    /// The size of the struct these are the bytes of.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: every parameter struct has fields.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the bytes start, for the driver or the emulation to read.
    pub fn as_ptr(&self) -> *const u8 {
        self.bytes.as_ptr().cast()
    }
}

impl fmt::Debug for Args {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Args({} bytes)", self.len)
    }
}
