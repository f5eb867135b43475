//! What a plugin built against another version of the SDK answers: its own ABI version in the
//! vtable's first field, and ENTRY_ABI_MISMATCH.

use amidala_plugin::{Vtable, ENTRY_ABI_MISMATCH};

/// The version this imaginary SDK speaks.
pub const OTHER_ABI: u32 = 99;

/// # Safety
/// `out` must be null or point to at least a writable `u32` (the first field of any vtable).
#[no_mangle]
pub unsafe extern "C" fn amidala_plugin_entry(_host_abi: u32, out: *mut Vtable) -> i32 {
    if !out.is_null() {
        // SAFETY: the caller passes memory for a vtable, whose first field is a u32 in every
        // ABI version.
        unsafe { out.cast::<u32>().write(OTHER_ABI) };
    }
    ENTRY_ABI_MISMATCH
}
