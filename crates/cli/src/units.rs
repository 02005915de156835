//! Parsing sizes given on the command line (`--vram-budget 7.5GiB`).

/// Like [`parse_size`], but 0 is allowed (`--ram-budget 0`: nothing cached in RAM).
pub fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    match s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic()).trim() {
        "0" | "0.0" => Ok(0),
        _ => parse_size(s),
    }
}

/// Bytes in `s`: a number (decimal point allowed) and an optional unit, case-insensitive, with
/// optional space between them. `K`, `M`, `G`, `T` and `KiB` … `TiB` are binary (2¹⁰ …);
/// `KB` … `TB` are decimal (10³ …); `B` or no unit means bytes. Fractions of a byte round down.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let hint = "expected a size such as 8GiB, 8G, 7.5GiB, 512MiB, 512M or a number of bytes";
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1 {
        return Err(format!("'{s}' is not a size; {hint}"));
    }
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("unknown unit '{unit}' in '{s}'; {hint}")),
    };
    let too_big = || format!("'{s}' is too large");
    let bytes = match num.split_once('.') {
        None => num.parse::<u64>().map_err(|_| too_big())?.checked_mul(scale).ok_or_else(too_big)?,
        Some((whole, frac)) => {
            // whole·scale + frac·scale / 10^digits, in integers so that 7.5GiB is exact.
            let whole = whole.parse::<u64>().map_err(|_| too_big())?.checked_mul(scale).ok_or_else(too_big)?;
            let digits = u32::try_from(frac.len()).map_err(|_| too_big())?;
            let den = 10u128.checked_pow(digits).ok_or_else(too_big)?;
            let frac = frac.parse::<u128>().map_err(|_| too_big())?;
            let part = u64::try_from(frac * u128::from(scale) / den).map_err(|_| too_big())?;
            whole.checked_add(part).ok_or_else(too_big)?
        }
    };
    if bytes == 0 {
        return Err(format!("'{s}' is zero; give a size above 0"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::{parse_size, parse_size_or_zero};

    #[test]
    fn zero_only_where_allowed() {
        assert_eq!(parse_size_or_zero("0"), Ok(0));
        assert_eq!(parse_size_or_zero("0GiB"), Ok(0));
        assert_eq!(parse_size_or_zero("2G"), Ok(2 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size_or_zero("x").is_err());
    }

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn binary_decimal_and_plain_sizes() {
        assert_eq!(parse_size("8GiB"), Ok(8 * GIB));
        assert_eq!(parse_size("8G"), Ok(8 * GIB));
        assert_eq!(parse_size("8g"), Ok(8 * GIB));
        assert_eq!(parse_size("7.5GiB"), Ok(7 * GIB + GIB / 2));
        assert_eq!(parse_size("512MiB"), Ok(512 * MIB));
        assert_eq!(parse_size("512M"), Ok(512 * MIB));
        assert_eq!(parse_size("1.25 TiB"), Ok(5 * (1 << 40) / 4));
        assert_eq!(parse_size("64k"), Ok(64 * 1024));
        assert_eq!(parse_size("8GB"), Ok(8_000_000_000), "GB is decimal");
        assert_eq!(parse_size("1000000"), Ok(1_000_000), "plain bytes");
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size(" 2G "), Ok(2 * GIB));
        assert_eq!(parse_size("0.1K"), Ok(102), "fractions of a byte round down");
    }

    #[test]
    fn bad_sizes_say_why() {
        for bad in ["", "GiB", "8XB", "-1G", "1.2.3G", ".5G", "5.G", "eight", "8 Gibibytes"] {
            let e = parse_size(bad).expect_err(bad);
            assert!(!e.contains('\n') && (e.contains("8GiB") || e.contains("unit")), "{bad}: {e}");
        }
        assert!(parse_size("0").expect_err("zero").contains("zero"));
        assert!(parse_size("0.0G").is_err());
        assert!(parse_size("99999999999999999999").expect_err("huge").contains("too large"));
        assert!(parse_size("20000000T").expect_err("overflow").contains("too large"));
        assert!(
            parse_size("1.00000000000000000000000000000000000000001G").is_err(),
            "too many digits: an error, no panic"
        );
    }
}
