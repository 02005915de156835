//! Byte counts as text, for the one-line messages of budgets and allocations.

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;
const KIB: f64 = 1024.0;

/// `8.00 GiB`: budgets and totals, always in GiB with two decimals.
pub fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB)
}

/// `256.0 MiB`, `1.50 GiB`, `12.0 KiB`, `100 B`: a size in the largest unit that keeps it >= 1.
pub fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b >= MIB {
        format!("{:.1} MiB", b / MIB)
    } else if b >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{bytes} B")
    }
}
