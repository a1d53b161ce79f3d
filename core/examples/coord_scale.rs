//! Coordinator scale benchmark: `coord_scale [MEMBERS [ROUNDS [JOIN_WINDOW_MS [PHASE_TIMEOUT_S]]]]`
//! (defaults 1000, 5, 50, 600).
//!
//! `cargo run --release -p braid --example coord_scale -- 10000 5`

use std::time::Duration;

use braid::membership::scale::{view_change_bench_with, ScaleOptions};

fn arg(i: usize, default: u64) -> Result<u64, String> {
    match std::env::args().nth(i) {
        None => Ok(default),
        Some(a) => a
            .parse()
            .map_err(|e| format!("argument {i} ({a:?}) is not a number: {e}")),
    }
}

fn main() -> std::process::ExitCode {
    let parsed = (|| -> Result<ScaleOptions, String> {
        let members = usize::try_from(arg(1, 1000)?).map_err(|e| e.to_string())?;
        let rounds = usize::try_from(arg(2, 5)?).map_err(|e| e.to_string())?;
        let mut o = ScaleOptions::new(members, rounds);
        o.join_window_ms = arg(3, 50)?;
        o.phase_timeout = Duration::from_secs(arg(4, 600)?);
        Ok(o)
    })();
    let opts = match parsed {
        Ok(o) => o,
        Err(e) => {
            eprintln!("coord_scale: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match view_change_bench_with(&opts) {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("coord_scale: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
