//! Seeded random test inputs. One seed per run, from `OLLM_TEST_SEED` or else fresh from the
//! clock. Each test draws its own streams, derived from the seed, its name and how many arrays
//! it drew before, so the same seed gives a test the same inputs whatever else runs beside it.
//! A test prints the seed when it first draws (seen with `--nocapture`) and again when it
//! fails: `OLLM_TEST_SEED=<seed> reproduces this`.

use std::cell::Cell;
use std::sync::OnceLock;

/// The variable that fixes the seed (a decimal u64).
pub const TEST_SEED: &str = "OLLM_TEST_SEED";

thread_local! {
    /// Arrays the test running on this thread has drawn (libtest runs each test on its own thread).
    static DRAWN: Cell<u64> = const { Cell::new(0) };
}

/// This run's seed, chosen on first use; the first use also makes a failing test print it.
pub fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        let seed = match std::env::var(TEST_SEED) {
            Ok(v) => v.trim().parse().unwrap_or_else(|_| {
                panic!("{TEST_SEED}={v:?} is not a seed: set a decimal number, e.g. {TEST_SEED}=12345")
            }),
            Err(_) => {
                let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                mix(clock.map_or(1, |d| d.as_nanos() as u64))
            }
        };
        print_on_panic(seed);
        seed
    })
}

/// After any panic on a thread that drew random inputs, names the seed that reproduces them.
fn print_on_panic(seed: u64) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        if DRAWN.try_with(Cell::get).unwrap_or(0) > 0 {
            eprintln!("{TEST_SEED}={seed} reproduces this ({} drew random inputs)", test_name());
        }
    }));
}

/// The running test's name (libtest names each test's thread after it).
fn test_name() -> String {
    std::thread::current().name().unwrap_or("this test").to_owned()
}

/// splitmix64's finaliser: spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of `bytes`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01B3))
}

/// `n` pseudo-random values in [-scale, scale): the running test's next stream of this run's seed.
pub fn random(n: usize, scale: f32) -> Vec<f32> {
    let seed = seed();
    let call = DRAWN.with(|c| {
        c.set(c.get() + 1);
        c.get() - 1
    });
    let test = test_name();
    if call == 0 {
        eprintln!("{test}: random inputs from {TEST_SEED}={seed}");
    }
    let mut s = mix(mix(seed ^ fnv1a(test.as_bytes())) ^ call) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}
