//! Exceptions the emulator raises for the guest.

/// #DE
pub const VEC_DE: u8 = 0;
/// #UD
pub const VEC_UD: u8 = 6;
/// #NM
pub const VEC_NM: u8 = 7;
/// #SS
pub const VEC_SS: u8 = 12;
/// #GP
pub const VEC_GP: u8 = 13;
/// #PF
pub const VEC_PF: u8 = 14;
/// #MF
pub const VEC_MF: u8 = 16;
/// #AC
pub const VEC_AC: u8 = 17;
/// #XM
pub const VEC_XM: u8 = 19;

/// An exception to inject, with its error code and (for #PF) CR2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    /// Exception vector (0-31).
    pub vector: u8,
    /// The error code, for vectors that push one.
    pub error_code: Option<u32>,
    /// The faulting linear address, for #PF (goes to CR2).
    pub cr2: Option<u64>,
}

impl Exception {
    /// An exception without a CR2 value.
    pub const fn new(vector: u8, error_code: Option<u32>) -> Self {
        Exception {
            vector,
            error_code,
            cr2: None,
        }
    }
    /// #GP(0).
    pub const fn gp0() -> Self {
        Self::new(VEC_GP, Some(0))
    }
    /// #SS(0).
    pub const fn ss0() -> Self {
        Self::new(VEC_SS, Some(0))
    }
    /// #UD.
    pub const fn ud() -> Self {
        Self::new(VEC_UD, None)
    }
    /// #NM.
    pub const fn nm() -> Self {
        Self::new(VEC_NM, None)
    }
    /// #PF with `error_code` for the linear address `addr`.
    pub const fn page_fault(error_code: u32, addr: u64) -> Self {
        Exception {
            vector: VEC_PF,
            error_code: Some(error_code),
            cr2: Some(addr),
        }
    }
    /// #GP(0), or #SS(0) when the access went through SS.
    pub const fn segment_fault(is_ss: bool) -> Self {
        if is_ss {
            Self::ss0()
        } else {
            Self::gp0()
        }
    }
}
